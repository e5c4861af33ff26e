"""Soak: the agent under mixed traffic with adversarial clients, for minutes (issue 18; not a test).

Run (root)::

    .venv/bin/python bench/soak.py --minutes 10        # the series; --minutes 1 to check it runs
    .venv/bin/python bench/soak.py --minutes 10 --saturated   # beside a busy loop at nice 19 on every CPU

The agent (``--probe process --probe tcp --probe payload --api … --window 5``, every port) watches,
all on loopback, processes named by ``DEETUNE_SERVICE``:

- normal traffic: ``soak-client`` → ``soak-server``, HTTP/1.1 keep-alive GETs at ``--rate`` per
  second, every one counted by the client;
- adversaries, all the time: a **slow** client sending a 60 KiB request head one byte at a time;
  **never-answering** listeners fed pipelined HTTP requests, Redis commands and MySQL COM_PINGs
  without end; a Redis-like server answering with replies **nested** 100,000 deep; servers
  announcing **huge lengths** (an HTTP Content-Length of 10^12, a Redis bulk of 2^31 − 1, a
  16 MiB MySQL packet) and sending a little of them.

What it asserts (and prints, and saves as bench/results/soak-STAMP.json):

- the agent's RSS stays under ``--max-rss-mb`` (100) at every sample (once a second);
- the API (``/healthz`` and ``/api/topology``, four times a second) answers every request within
  ``--max-api-ms`` (100);
- the normal traffic is counted exactly: the requests of the ``soak-client`` edges to the server's
  port in the store equal the requests the client completed.

``DEETUNE_BENCH_AGENT_ARGS="--busy-cpu off"`` (bench/common.py) runs the agent with other options.

Exit code 0 when all three hold, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402

HOST = "127.0.0.1"
TOKEN = f"soak-{os.getpid()}"


# -- the roles (each a process of its own, named by DEETUNE_SERVICE) --------------------------------------


def _listener(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    sock.listen(512)
    return sock


def _serve(port: int, handle) -> None:
    listener = _listener(port)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_guarded, args=(handle, conn), daemon=True).start()


def _guarded(handle, conn: socket.socket) -> None:
    with contextlib.suppress(OSError), conn:
        handle(conn)


def role_server(port: int) -> None:
    """HTTP/1.1 keep-alive: every request head gets a 200 with a small body."""
    body = b"ok\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    def handle(conn: socket.socket) -> None:
        buffer = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buffer += data
            while b"\r\n\r\n" in buffer:
                _, buffer = buffer.split(b"\r\n\r\n", 1)
                conn.sendall(answer)
            if len(buffer) > 1 << 20:
                return

    _serve(port, handle)


def role_client(port: int, rate: float, count_file: str) -> None:
    """GETs at ``rate`` per second on one keep-alive connection (a new one every 1000); the count
    of completed exchanges goes to ``count_file`` after each."""
    done = 0
    interval = 1.0 / rate
    next_at = time.monotonic()
    stopping = []  # SIGTERM: finish (and count) the request under way, then stop
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while not stopping:
        with socket.create_connection((HOST, port)) as conn:
            reader = conn.makefile("rb")
            for _ in range(1000):
                if stopping:
                    return
                conn.sendall(b"GET /normal/%d HTTP/1.1\r\nHost: soak\r\n\r\n" % done)
                status = reader.readline()
                while reader.readline() not in (b"\r\n", b""):
                    pass
                reader.read(3)
                if not status.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"unexpected answer {status!r}")
                done += 1
                pathlib.Path(count_file).write_text(str(done))
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))


def role_blackhole(port: int) -> None:
    """Accepts and reads, never answers."""
    def handle(conn: socket.socket) -> None:
        while conn.recv(65536):
            pass

    _serve(port, handle)


def role_nesting(port: int) -> None:
    """Answers every request with a Redis reply nested 100,000 deep."""
    reply = b"*1\r\n" * 100_000 + b":1\r\n"

    def handle(conn: socket.socket) -> None:
        while conn.recv(65536):
            conn.sendall(reply)

    _serve(port, handle)


def role_huge(port: int, kind: str) -> None:
    """Announces a huge length, sends 64 KiB of it, closes."""
    heads = {"http": b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n",
             "redis": b"$2147483647\r\n",
             "mysql": b"\xff\xff\xff\x01"}

    def handle(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(heads[kind] + b"x" * 65536)

    _serve(port, handle)


def role_adversary(ports: dict[str, int]) -> None:
    """Every adversarial client at once, for ever."""
    def slow() -> None:  # a 60 KiB head, one byte at a time
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, ports["server"])) as conn:
                conn.sendall(b"GET /slow HTTP/1.1\r\nX-Long: ")
                for _ in range(60_000):
                    conn.send(b"a")
                    time.sleep(0.0005)
                conn.sendall(b"\r\n\r\n")
                conn.recv(65536)

    def flood(message: bytes) -> None:  # requests that are never answered
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, ports["blackhole"])) as conn:
                for _ in range(2000):
                    conn.sendall(message * 64)
                    time.sleep(0.01)

    def ask(port_name: str, request: bytes) -> None:
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, ports[port_name]), timeout=5) as conn:
                conn.sendall(request)
                with contextlib.suppress(OSError):
                    while conn.recv(65536):
                        pass
            time.sleep(0.2)

    jobs = [slow,
            lambda: flood(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n"),
            lambda: flood(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
            lambda: flood(b"\x01\x00\x00\x00\x0e"),  # COM_PING
            lambda: ask("nesting", b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
            lambda: ask("huge_http", b"GET /huge HTTP/1.1\r\nHost: x\r\n\r\n"),
            lambda: ask("huge_redis", b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
            lambda: ask("huge_mysql", b"\x09\x00\x00\x00\x03SELECT 1")]
    threads = [threading.Thread(target=job, daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# -- the run --------------------------------------------------------------------------------------------


def spawn(service: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "DEETUNE_SERVICE": service}
    return subprocess.Popen([sys.executable, __file__, "--role", *args], env=env, stdin=subprocess.DEVNULL)


def api_get(port: int, path: str) -> tuple[int, float, bytes]:
    began = time.monotonic()
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            body, status = reply.read(), reply.status
    except OSError as exc:
        body, status = str(exc).encode(), 0
    return status, time.monotonic() - began, body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=200.0, help="normal requests per second")
    parser.add_argument("--max-rss-mb", type=float, default=100.0)
    parser.add_argument("--max-api-ms", type=float, default=100.0)
    parser.add_argument("--saturated", action="store_true",
                        help="a busy loop at nice 19 on every CPU all along: no CPU is ever idle")
    parser.add_argument("--role", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        name, *rest = args.role
        if name == "adversary":
            role_adversary(json.loads(rest[0]))
        elif name == "client":
            role_client(int(rest[0]), float(rest[1]), rest[2])
        elif name == "huge":
            role_huge(int(rest[0]), rest[1])
        else:
            {"server": role_server, "blackhole": role_blackhole, "nesting": role_nesting}[name](int(rest[0]))
        return 0
    common.require_root()
    work = pathlib.Path(tempfile.mkdtemp(prefix="deetune-soak-"))
    ports = {name: common.free_port() for name in ("server", "blackhole", "nesting", "huge_http", "huge_redis",
                                                  "huge_mysql")}
    api_port = common.free_port()
    agent = common.Agent(["process", "tcp", "payload"], work / "events.jsonl",
                         ["--store", str(work / "store.db"), "--api", f"{HOST}:{api_port}", "--api-token", TOKEN,
                          "--window", "5"])
    agent.start()
    children: list[subprocess.Popen] = []
    samples: list[dict] = []
    breakdowns: list[dict] = []
    api_slow: list[tuple[str, float, int]] = []
    stop = threading.Event()
    count_file = work / "normal.count"
    busy = contextlib.ExitStack()
    try:
        busy.enter_context(common.busy_loops(args.saturated))
        children += [spawn("soak-server", "server", str(ports["server"])),
                     spawn("soak-blackhole", "blackhole", str(ports["blackhole"])),
                     spawn("soak-nesting", "nesting", str(ports["nesting"]))]
        children += [spawn(f"soak-huge-{k}", "huge", str(ports[f"huge_{k}"]), k) for k in ("http", "redis", "mysql")]
        for port in ports.values():
            common.wait_port(port)
        began_ns = time.time_ns()
        other_cpu, host_cpu, began = common.OtherCpu(), common.busy_cores_since(), time.monotonic()
        children.append(spawn("soak-client", "client", str(ports["server"]), str(args.rate), str(count_file)))
        children.append(spawn("soak-adversary", "adversary", json.dumps(ports)))

        api_times: list[float] = []

        def watch_api() -> None:
            while not stop.is_set():
                for path in ("/healthz", "/api/topology?window=1m"):
                    status, took, _ = api_get(api_port, path)
                    api_times.append(took)
                    if status != 200 or took * 1000 > args.max_api_ms:
                        api_slow.append((path, round(took * 1000, 1), status))
                stop.wait(0.25)

        watcher = threading.Thread(target=watch_api, daemon=True)
        watcher.start()
        end = time.monotonic() + args.minutes * 60
        while time.monotonic() < end:
            if agent.proc.poll() is not None:
                raise RuntimeError("the agent exited: " + "\n".join(agent.stderr[-10:]))
            samples.append({"t": round(time.monotonic() - (end - args.minutes * 60), 1),
                            **common.memory_mb(agent.pid)})
            if len(samples) % 30 == 1:  # where the RSS goes: Python's heap is [anonymous] and [heap]
                breakdowns.append({"t": samples[-1]["t"], **common.smaps_breakdown(agent.pid, 6)})
            time.sleep(1.0)
        # Normal traffic stops; its last window reaches the store.
        children[-2].send_signal(signal.SIGTERM)
        children[-2].wait(10)
        sent = int(count_file.read_text()) if count_file.exists() else 0
        counted, soak_edges = None, []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, _, body = api_get(api_port, f"/api/edges?since={began_ns}")
            if status == 200:
                # By the server's port: a connection seen before the server's listener was known
                # names the server by its address.
                edges = [e for e in json.loads(body)["edges"]
                         if (e["client"], e["port"], e["protocol"]) == ("soak-client", ports["server"], "http")]
                counted = sum(e["requests"] for e in edges)
                soak_edges = [{k: e[k] for k in ("client", "server", "protocol", "port", "requests", "errors")}
                              for e in json.loads(body)["edges"] if e["client"].startswith("soak-")]
                if counted == sent:
                    break
            time.sleep(1.0)
        stop.set()
        watcher.join(10)
        # The host is shared: how busy it was, and with what besides this benchmark.
        load = {"host_busy_cores": common.busy_cores_since(host_cpu), **other_cpu.stop(time.monotonic() - began)}
        health = json.loads(api_get(api_port, "/healthz")[2] or b"{}")
    finally:
        stop.set()
        busy.close()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    result = agent.stop()
    max_rss = max((s["rss_mb"] for s in samples), default=None)
    api_ms = sorted(api_times)
    out = {
        "machine": common.machine(),
        "minutes": args.minutes, "rate": args.rate, "saturated": args.saturated,
        "normal_sent": sent, "normal_counted": counted, "soak_edges": soak_edges,
        "max_rss_mb": max_rss, "rss_samples": samples, "rss_breakdown_mb": breakdowns,
        "api_requests": len(api_ms), "api_max_ms": round(api_ms[-1] * 1000, 1) if api_ms else None,
        "api_p99_ms": round(api_ms[int(len(api_ms) * 0.99)] * 1000, 1) if api_ms else None,
        "api_over_limit": api_slow[:50], "api_over_limit_count": len(api_slow),
        "health_at_end": health, "agent": result, "load": load,
        "stop_line": next((line for line in reversed(agent.stderr) if " events in " in line), None),
    }
    checks = [
        ["agent RSS", f"< {args.max_rss_mb:g} MB", f"max {max_rss:.1f} MB" if max_rss else "-",
         "ok" if max_rss is not None and max_rss < args.max_rss_mb else "FAIL"],
        ["API answers", f"< {args.max_api_ms:g} ms", f"max {out['api_max_ms']} ms, {len(api_slow)} over",
         "ok" if not api_slow else "FAIL"],
        ["normal traffic", "counted exactly", f"{counted} of {sent}", "ok" if counted == sent and sent else "FAIL"],
    ]
    out["checks"] = checks
    common.report("soak", out, [common.table(["check", "target", "measured", ""], checks),
                                f"agent stop line: {result.get('summary')}"])
    return 0 if all(c[-1] == "ok" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
