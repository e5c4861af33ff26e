"""Running a real pipeline inside a test and waiting for what it reports."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, Sequence

from deetune.events import Event
from deetune.pipeline import Pipeline
from deetune.sinks.base import Sink


class CollectSink(Sink):
    """Keeps every event in memory, for assertions."""

    name = "collect"

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._cond = threading.Condition()

    def handle(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def matching(self, predicate: Callable[[Event], bool]) -> list[Event]:
        with self._cond:
            return [e for e in self.events if predicate(e)]

    def wait_for(self, predicate: Callable[[Event], bool], count: int = 1, timeout: float = 10.0) -> list[Event]:
        """Wait until ``count`` events match; return them (all that matched)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self.events if predicate(e)]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"expected {count} matching events within {timeout}s, got {len(found)}: {found!r}"
                    )
                self._cond.wait(remaining)


@contextlib.contextmanager
def running_pipeline(probes: Sequence, handlers: Sequence = (), sinks: Sequence[Sink] = ()) -> Iterator[CollectSink]:
    """Attach the probes (synchronously: when this yields, they are live) and
    process events in a thread until the block ends."""
    collector = CollectSink()
    pipeline = Pipeline(probes, [collector, *sinks], handlers, poll_interval=0.02)
    pipeline.start()
    thread = threading.Thread(target=pipeline.run, name="pipeline", daemon=True)
    thread.start()
    try:
        yield collector
    finally:
        pipeline.stop()
        thread.join(15)
        assert not thread.is_alive(), "pipeline did not stop"
    collector.stats = pipeline.stats  # type: ignore[attr-defined]


class FakeControls:
    """Stands in for a probe's one-entry controls map: keeps the values written to it."""

    def __init__(self):
        self.values: list[bytes] = []

    def update(self, key: bytes, value: bytes) -> None:
        self.values.append(bytes(value))

    @property
    def masks(self) -> list[int]:
        """The first field of each value written: the sample mask, in both probes' controls."""
        return [int.from_bytes(value[:4], "little") for value in self.values]


def with_fake_controls(probe, counts: dict[str, int] | None = None) -> FakeControls:
    """Give an unstarted probe a stand-in object (its controls map) and, with ``counts``, kernel counters."""
    controls = FakeControls()
    probe.obj = type("Obj", (), {"maps": {"controls": controls}})()
    if counts is not None:
        probe.counters = lambda: dict(counts)
    return controls


PEER = r"""
import socket, struct, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
mode = sys.argv[2]
reply = int(sys.argv[3])
srv = socket.socket(family)
srv.bind((sys.argv[1], 0))
srv.listen(8)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
if mode == "reset":
    conn.recv(65536)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    sys.exit(0)
received = 0
while True:
    data = conn.recv(65536)
    if not data:
        break
    received += len(data)
conn.sendall(b"r" * reply)
conn.close()
print(received, flush=True)
"""


class TcpPeer:
    """A one-connection TCP server in its own process (so its pid differs from ours)."""

    def __init__(self, host: str = "127.0.0.1", *, reply: int = 0, mode: str = "echo-count"):
        self.host = host
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PEER, host, mode, str(reply)], stdout=subprocess.PIPE, text=True
        )
        self.pid = self.proc.pid
        self.port = int(self.proc.stdout.readline())

    def finish(self, timeout: float = 10) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        return out.strip()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
