"""Helpers for testing a protocol decoder against real servers, real agents and captures.

Everything a decoder's tests need besides the server itself, in four steps
(docs/plugins.md walks through them):

1. **Start a server** on a free loopback port and wait until it accepts
   connections: :func:`free_port`, :class:`ServerProcess`.
2. **Drive traffic** through it with its real client, and record what moved:
   :class:`RecordingProxy` (no privileges: the client talks to the proxy, which
   keeps every ``recv`` as a :class:`~deetune.decoders.base.Chunk`) or
   :func:`capture_pcap` (root: a loopback packet capture written as a pcap file).
3. **Collect exchanges**: :func:`decode_chunks` (a decoder on recorded chunks),
   :func:`decode_pcap` (the offline decoder on a capture), or :func:`agent`
   (root and BPF: the live probes and the L7 handler, as the agent runs them).
4. **Compare**: :func:`summary` and :func:`assert_exchanges` (exact lists of the
   fields you name, with a readable difference).

Nothing here sends traffic anywhere but loopback, and every process it starts is
stopped by its pid.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable

__all__ = [
    "AgentRun", "RecordingProxy", "ServerProcess", "agent", "assert_exchanges", "capture_pcap", "decode_chunks",
    "decode_pcap", "free_port", "summary", "undecodable", "wait_for_port",
]

LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------- 1. servers


def free_port(host: str = LOOPBACK, kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing is bound to right now on ``host`` (TCP, or UDP with ``kind=socket.SOCK_DGRAM``)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, *, host: str = LOOPBACK,
                  timeout: float = 60.0, log: str | None = None) -> None:
    """Poll until ``host:port`` accepts a TCP connection; fail early, with the log's tail, if
    ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}"
                               + _tail(log))
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s" + _tail(log))
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _tail(log: str | None, lines: int = 20) -> str:
    if not log or not os.path.exists(log):
        return ""
    with open(log, errors="replace") as f:
        return f"\n--- {log} ---\n" + "".join(f.readlines()[-lines:])


class ServerProcess:
    """A server started from a command line, ready once its port accepts connections.

    ``ServerProcess.start(["memcached", "-l", "127.0.0.1", "-p", "{port}"], log="/tmp/mc.log")``
    picks a free port, substitutes ``{port}`` (and any ``fields``), starts the command and waits;
    when another process took the port in between, it tries another (three times).  ``ready``
    replaces the TCP readiness check (a UDP server, a server that listens on another port).
    :meth:`stop` sends SIGTERM to the pid it started, then SIGKILL.
    """

    def __init__(self, proc: subprocess.Popen, port: int, log: str | None) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, args: Sequence[str], *, host: str = LOOPBACK, port: int | None = None, log: str | None = None,
              ready: Callable[[int, subprocess.Popen], None] | None = None, timeout: float = 60.0,
              env: dict[str, str] | None = None, cwd: str | None = None, **fields: Any) -> "ServerProcess":
        for attempt in range(3):
            chosen = port if port is not None else free_port(host)
            argv = [a.format(port=chosen, host=host, **fields) for a in args]
            out = open(log, "ab") if log else subprocess.DEVNULL
            try:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=env, cwd=cwd)
            finally:
                if log:
                    out.close()
            server = cls(proc, chosen, log)
            try:
                if ready is not None:
                    ready(chosen, proc)
                else:
                    wait_for_port(chosen, proc, host=host, timeout=timeout, log=log)
            except RuntimeError:
                server.stop()
                if port is not None or attempt == 2:
                    raise
                continue
            return server
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- 2. traffic


class RecordingProxy:
    """A TCP proxy on loopback that records each connection's bytes as decoder chunks.

    Point the real client at :attr:`port` instead of the server's: every ``recv`` on either
    side becomes a :class:`Chunk` (``REQUEST`` from the client, ``RESPONSE`` from the server),
    timestamped with ``time.monotonic_ns()``, in the order the proxy saw them.  No privileges
    needed.  Use as a context manager; :meth:`connections` gives the chunks per connection.
    """

    def __init__(self, server_port: int, server_host: str = LOOPBACK, *, max_chunk: int = 65536) -> None:
        self.server = (server_host, server_port)
        self.max_chunk = max_chunk
        self._listener = socket.socket()
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._conns: list[list[Chunk]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="recording-proxy", daemon=True)
        self._thread.start()

    def connections(self) -> list[list[Chunk]]:
        """The chunks of every connection so far, in the order they were accepted."""
        with self._lock:
            return [list(c) for c in self._conns]

    def close(self) -> None:
        self._stop.set()
        self._wake_w.send(b"x")
        self._thread.join(10)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "RecordingProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        peers: dict[socket.socket, tuple[socket.socket, Direction, list[Chunk]]] = {}
        while not self._stop.is_set():
            for key, _ in sel.select():
                sock = key.fileobj
                if sock is self._wake_r:
                    continue
                if sock is self._listener:
                    client, _ = self._listener.accept()
                    upstream = socket.create_connection(self.server)
                    chunks: list[Chunk] = []
                    with self._lock:
                        self._conns.append(chunks)
                    peers[client] = (upstream, Direction.REQUEST, chunks)
                    peers[upstream] = (client, Direction.RESPONSE, chunks)
                    sel.register(client, selectors.EVENT_READ, None)
                    sel.register(upstream, selectors.EVENT_READ, None)
                    continue
                if sock not in peers:
                    continue  # closed earlier in this round, with its peer
                other, direction, chunks = peers[sock]
                try:
                    data = sock.recv(self.max_chunk)
                except OSError:
                    data = b""
                if data:
                    with self._lock:
                        chunks.append(Chunk(direction, data, len(data), time.monotonic_ns()))
                    try:
                        other.sendall(data)
                        continue
                    except OSError:
                        pass
                for s in (sock, other):  # one side closed: close both
                    if s in peers:
                        sel.unregister(s)
                        del peers[s]
                        s.close()
        for s in peers:
            s.close()
        sel.close()


@contextlib.contextmanager
def capture_pcap(path: str, ports: Iterable[int], *, interface: str = "lo") -> Iterator[None]:
    """Write the loopback packets to or from ``ports`` (TCP and UDP) into a pcap file while the
    block runs.  Needs root (an AF_PACKET socket); each packet is kept once (loopback shows
    every packet leaving and arriving)."""
    import dpkt

    wanted = set(ports)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    sock.bind((interface, 0))
    sock.settimeout(0.05)
    stop = threading.Event()
    packets: list[tuple[float, bytes]] = []

    def run() -> None:
        while not stop.is_set():
            try:
                frame, address = sock.recvfrom(262144)
            except TimeoutError:
                continue
            except OSError:
                return
            if address[2] == socket.PACKET_OUTGOING:
                continue
            if _frame_ports(frame) & wanted:
                packets.append((time.time(), frame))

    thread = threading.Thread(target=run, name="capture-pcap", daemon=True)
    thread.start()
    try:
        yield
        time.sleep(0.05)  # the last packets are on their way through the loopback
    finally:
        stop.set()
        thread.join(5)
        sock.close()
        with open(path, "wb") as f:
            writer = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB, nano=True)
            for ts, frame in packets:
                writer.writepkt(frame, ts)


def _frame_ports(frame: bytes) -> set[int]:
    """The TCP/UDP ports of an Ethernet frame carrying IPv4 or IPv6 (empty for anything else)."""
    if len(frame) < 14:
        return set()
    ethertype = struct.unpack_from(">H", frame, 12)[0]
    if ethertype == 0x0800 and len(frame) >= 34:
        proto = frame[23]
        start = 14 + (frame[14] & 0x0F) * 4
    elif ethertype == 0x86DD and len(frame) >= 54:
        proto = frame[20]
        start = 54
    else:
        return set()
    if proto not in (6, 17) or len(frame) < start + 4:
        return set()
    return set(struct.unpack_from(">HH", frame, start))


# --------------------------------------------------------------------------- 3. exchanges


def decode_chunks(decoder: type[Decoder] | Decoder, chunks: Iterable[Chunk], *, close: bool = True,
                  **options: Any) -> list[Exchange]:
    """Feed chunks to a decoder (a class is instantiated with ``options``); the exchanges it
    reported, plus what :meth:`~Decoder.close` reports when ``close``.  ``Undecodable``
    propagates: a test that expects it says so with ``pytest.raises``."""
    instance = decoder(**options) if isinstance(decoder, type) else decoder
    out: list[Exchange] = []
    last = 0
    for chunk in chunks:
        out.extend(instance.feed(chunk))
        last = chunk.ts_ns
    if close:
        out.extend(instance.close(last))
    return out


def decode_pcap(path: str, decoders: Sequence[type[Decoder]] | None = None) -> list[Any]:
    """The exchange events the offline decoder (``python -m deetune decode``) finds in a capture,
    with every registered decoder or those given."""
    from deetune.offline import DecodeStats, decode_file

    return list(decode_file(path, decoders, DecodeStats()))


class AgentRun:
    """What :func:`agent` collected: every event, and the exchange events on the watched ports."""

    def __init__(self, collector: Any, ports: Sequence[int]) -> None:
        self._collector = collector
        self.ports = tuple(ports)

    @property
    def events(self) -> list[Any]:
        return self._collector.matching(lambda e: True)

    def exchanges(self, *, role: str | None = None, protocol: str | None = None) -> list[Any]:
        """Exchange events on the watched ports (either side), optionally of one role/protocol."""
        from deetune.events import ExchangeEvent

        ports = self.ports
        return self._collector.matching(
            lambda e: isinstance(e, ExchangeEvent) and (e.lport in ports or e.rport in ports)
            and (role is None or e.role == role) and (protocol is None or e.protocol == protocol))

    def wait(self, count: int, *, role: str | None = None, protocol: str | None = None,
             timeout: float = 20.0) -> list[Any]:
        """Wait until at least ``count`` exchanges (of that role/protocol) were reported."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.exchanges(role=role, protocol=protocol)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.02)


@contextlib.contextmanager
def agent(ports: Sequence[int], *, decoders: Sequence[type[Decoder]] | None = None,
          protocols: Sequence[str] = (), settle: float = 0.3) -> Iterator[AgentRun]:
    """The live agent's capture path, in this process: the payload probe (filtered in the kernel
    to ``ports``), the tcp probe (connection roles, on the first port) and the L7 handler with
    ``decoders`` (default: every registered decoder, or those named in ``protocols``).  When the
    block is entered the probes are attached; when it ends, the pipeline runs ``settle`` seconds
    more and drains the rings, so :meth:`AgentRun.exchanges` holds everything the kernel saw.
    Needs root and a BPF-capable kernel; this process's own sockets are captured too."""
    from deetune.l7 import L7Handler, ListeningPorts
    from deetune.pipeline import Pipeline
    from deetune.plugins import default_plugins
    from deetune.probes import ProbeOptions
    from deetune.probes.payload import PayloadProbe
    from deetune.probes.tcp import TcpProbe

    if decoders is None:
        registry = default_plugins().decoders
        decoders = [registry.get(name) for name in protocols] if protocols else registry.classes()
    collector = _Collector()
    payload = PayloadProbe(ProbeOptions(), ports=ports, exclude_self=False)
    listening = ListeningPorts(reader=lambda: set(ports))
    handler = L7Handler(decoders, mute=payload.mute, listening=listening)
    pipeline = Pipeline([TcpProbe(ProbeOptions(port=ports[0])), payload], [collector], [handler],
                        poll_interval=0.02)
    pipeline.start()
    thread = threading.Thread(target=pipeline.run, name="deetune-testing-agent", daemon=True)
    thread.start()
    run = AgentRun(collector, ports)
    try:
        yield run
        time.sleep(settle)
    finally:
        pipeline.stop()
        thread.join(15)
    run.stats = pipeline.stats  # type: ignore[attr-defined]
    run.l7 = handler.stats  # type: ignore[attr-defined]


class _Collector:
    """An in-memory sink."""

    name = "collect"

    def __init__(self) -> None:
        self._events: list[Any] = []
        self._lock = threading.Lock()

    def handle(self, event: Any) -> None:
        with self._lock:
            self._events.append(event)

    def matching(self, predicate: Callable[[Any], bool]) -> list[Any]:
        with self._lock:
            return [e for e in self._events if predicate(e)]

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- 4. comparing

DEFAULT_FIELDS = ("method", "target", "status", "error")


def summary(exchanges: Iterable[Any], fields: Sequence[str] = DEFAULT_FIELDS) -> list[dict[str, Any]]:
    """Each exchange (decoder :class:`Exchange` or agent event) as a dict of the named fields;
    a name ``attributes.KEY`` reads one attribute (None when absent)."""
    out = []
    for x in exchanges:
        row = {}
        for name in fields:
            if name.startswith("attributes."):
                row[name] = x.attributes.get(name[len("attributes."):])
            else:
                row[name] = getattr(x, name)
        out.append(row)
    return out


def assert_exchanges(actual: Iterable[Any], expected: Sequence[dict[str, Any]], *, ordered: bool = True) -> None:
    """Assert that the exchanges are exactly ``expected`` on the fields ``expected`` names
    (the first row's keys); ``ordered=False`` compares as multisets."""
    expected = list(expected)
    fields = tuple(expected[0]) if expected else DEFAULT_FIELDS
    got = summary(actual, fields)
    if not ordered:
        def key(row: dict[str, Any]) -> str:
            return repr(sorted(row.items()))
        got, expected = sorted(got, key=key), sorted(expected, key=key)
    if got != expected:
        lines = [f"{len(got)} exchanges, {len(expected)} expected"]
        for i in range(max(len(got), len(expected))):
            a = got[i] if i < len(got) else None
            b = expected[i] if i < len(expected) else None
            if a != b:
                lines.append(f"  #{i}: got {a!r}\n        want {b!r}")
        raise AssertionError("\n".join(lines))


def undecodable(decoder: type[Decoder], chunks: Iterable[Chunk], **options: Any) -> str | None:
    """The one-line reason a decoder gives up on these chunks, or None when it does not."""
    try:
        decode_chunks(decoder, chunks, **options)
    except Undecodable as exc:
        return str(exc)
    return None
