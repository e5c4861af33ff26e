"""Exact counts at any load: the agent's edges and Prometheus series against the servers' own counts.

Real servers and load generators at full speed (nginx + wrk, redis-benchmark with -P 1 and -P 16,
mariadb-slap), each with some errors mixed in; the agent with its default flags (its outputs
aside), on an idle host and on a saturated one (a busy loop at nice 19 on every CPU).  The
requests and errors of each edge, in the topology API and in the Prometheus exposition, must be
those the servers counted (within 0.5 %; they are exact here); every error must be in
/api/exchanges; the detail's weights must add up to the truth within 5 %.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import (  # noqa: F401  (fixtures)
    DB_NAME, DB_PASSWORD, DB_USER, HOST, free_port, mariadb_server, nginx_server, redis_server, require_binary,
)
from tests.test_topology_e2e import Agent, settled, wait_for

pytestmark = [pytest.mark.bpf, pytest.mark.servers]

#: Within this share of the servers' counts (the issue's bar; the counts are exact here).
TOLERANCE = 0.005
#: The detail's weights add up to the truth within this share.
WEIGHT_TOLERANCE = 0.05
#: Seconds around a range with no traffic to the server: counts reach the agent up to a second late.
QUIET = 2.5

WRK_SCRIPT = """
local n = 0
request = function()
    n = n + 1
    if n % 500 == 0 then return wrk.format("GET", "/fail") end
    return wrk.format("GET", "/static.bin")
end
"""


@contextlib.contextmanager
def saturated_host(on: bool) -> Iterator[None]:
    """A busy loop at nice 19 on every CPU: no CPU is idle (ended by pid)."""
    loops = [subprocess.Popen([sys.executable, "-c", "import os\nos.nice(19)\nwhile True: pass"])
             for _ in range(os.cpu_count() or 1)] if on else []
    try:
        time.sleep(0.5 if on else 0)
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def near(got: float, truth: float, share: float) -> bool:
    return abs(got - truth) <= share * truth


def metrics(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def prometheus_counts(port: int, server: str, protocol: str, clients: tuple[str, ...]) -> tuple[float, float]:
    """Requests and errors of the edges from ``clients`` to ``server`` (the series have no port:
    another test's server of the same name on this host is told apart by its clients)."""
    got = metrics(port)

    def total(name: str) -> float:
        return sum(v for (n, labels), v in got.items()
                   if n == name and ("server", server) in labels and ("protocol", protocol) in labels
                   and dict(labels).get("client") in clients)

    return total("deetune_requests_total"), total("deetune_request_errors_total")


class Run:
    """An agent with the store, the API, Prometheus and jsonl sinks; default flags otherwise."""

    def __init__(self, tmp: pathlib.Path):
        self.events = tmp / "events.jsonl"
        self.metrics_port = free_port()
        self.agent = Agent(tmp / "deetune.db", self.events, free_port(),
                           extra=("--sink", f"prometheus:{HOST}:{self.metrics_port}"))

    def edges(self, since: int, until: int, server: str, port: int) -> list[dict]:
        return [e for e in self.agent.get("/api/edges", since=since, until=until)["edges"]
                if e["server"] == server and e["port"] == port]

    def counted(self, since: int, until: int, server: str, port: int) -> tuple[int, int]:
        edges = self.edges(since, until, server, port)
        return sum(e["requests"] for e in edges), sum(e["errors"] for e in edges)

    def errors_kept(self, since: int, server: str, port: int) -> list[dict]:
        exchanges = self.agent.get("/api/exchanges", service=server, since=since, limit=1000)["exchanges"]
        return [x for x in exchanges if x["error"] and x["role"] == "server" and x["lport"] == port]

    def weights(self, since: int, until: int, port: int) -> float:
        total = 0.0
        with open(self.events) as lines:
            for line in lines:
                if '"type":"request"' not in line:
                    continue
                event = json.loads(line)
                if event["role"] == "server" and event["lport"] == port and since <= event["ts"] < until:
                    total += event["sampling"]
        return total

    def check(self, since: int, until: int, *, server: str, port: int, protocol: str, clients: tuple[str, ...],
              truth_of: Callable[[], tuple[int, int]], weigh: bool = True) -> None:
        """The edges of ``server`` over the range against what the server counted (``truth_of()``:
        (requests, errors), asked once the agent's numbers are in: asking may be a request too);
        then, unless ``weigh`` is false (``check_weights`` later), the detail's weights."""
        requests, failed = settled(lambda: self.counted(since, until, server, port))
        prom = prometheus_counts(self.metrics_port, server, protocol, clients)
        truth, errors = truth_of()
        assert truth > 1000 and errors > 0, (truth, errors)
        assert near(requests, truth, TOLERANCE) and near(failed, errors, TOLERANCE), (
            f"{server}: the agent counted {requests} requests and {failed} errors, the server {truth} and {errors}")
        # The exposition holds every range the agent saw: this one's share is what it added.
        assert near(prom[0] - self.prom_before[0], truth, TOLERANCE), (
            prom, self.prom_before, truth, [(dict(k[1]), v) for k, v in metrics(self.metrics_port).items()
                                            if k[0] == "deetune_requests_total" and v])
        assert near(prom[1] - self.prom_before[1], errors, TOLERANCE), (
            prom, self.prom_before, errors, [(dict(k[1]), v) for k, v in metrics(self.metrics_port).items()
                                             if k[0] == "deetune_request_errors_total" and v])
        try:
            kept = wait_for(lambda: self.errors_kept(since, server, port), lambda found: len(found) >= errors,
                            f"the {errors} errors of {server} in /api/exchanges")
        except AssertionError:
            found = self.errors_kept(since, server, port)
            self.agent.stop()  # its stop line says what it lost
            raise AssertionError(f"{len(found)} of the {errors} errors of {server} in /api/exchanges; the agent's "
                                 f"log: {self.agent.log[-1500:]}") from None
        assert len(kept) == errors and all(x["sampling"] == 1 for x in kept)
        if weigh:
            self.check_weights(since, until, port, truth)

    def check_weights(self, since: int, until: int, port: int, truth: int) -> None:
        """The detail's weights against the truth; the agent is stopped first."""
        # The detail trails the counts (decoded as fast as the agent goes, weighed once the reads
        # after it are in; the last sample waits up to HOLD_TICKS reads for more): the agent stops,
        # flushing what it holds, before the weights are added up.
        self.agent.stop()
        weights = self.weights(since, until, port)
        if not near(weights, truth, WEIGHT_TOLERANCE):
            raise AssertionError(f"the detail's weights add up to {weights}, the server counted {truth}; "
                                 f"the agent's log: {self.agent.log[-1500:]}")

    def begin(self, server: str, protocol: str, clients: tuple[str, ...]) -> int:
        """The start of a range: after a quiet moment (counts reach the agent up to a second late)."""
        time.sleep(QUIET)
        self.prom_before = prometheus_counts(self.metrics_port, server, protocol, clients)
        return time.time_ns()

    def end(self) -> int:
        """The end of a range: the load's last counts are in it, and nothing else happens until then."""
        until = time.time_ns() + int(QUIET * 1e9)
        time.sleep(QUIET + 1)
        return until

    def stop(self) -> None:
        self.agent.stop()


@pytest.fixture(params=["idle", "saturated"])
def load(request) -> bool:
    return request.param == "saturated"


def test_nginx_under_wrk_at_full_speed(nginx_server, tmp_path, load):
    wrk = require_binary("wrk", "wrk")
    script = tmp_path / "mix.lua"
    script.write_text(WRK_SCRIPT)
    access = nginx_server.dir / "access.log"
    run = Run(tmp_path)
    try:
        with saturated_host(load):
            before = access.read_text().count("\n")
            since = run.begin("nginx", "http", ("wrk",))
            subprocess.run([wrk, "-t2", "-c16", "-d3s", "-s", str(script), nginx_server.url("/")],
                           check=True, capture_output=True, timeout=60)
            until = run.end()

            def truth() -> tuple[int, int]:
                lines = access.read_text().splitlines()[before:]
                return len(lines), sum(" 503 " in line for line in lines)

            run.check(since, until, server="nginx", port=nginx_server.port, protocol="http", clients=("wrk",),
                      truth_of=truth)
    finally:
        run.stop()


def redis_calls(port: int) -> tuple[int, int]:
    """(calls, failed calls) over every command, from the server's INFO commandstats (whose own
    call is counted after it answers)."""
    out = subprocess.run(["redis-cli", "-p", str(port), "info", "commandstats"], capture_output=True, text=True,
                         check=True).stdout
    calls = sum(int(n) for n in re.findall(r"calls=(\d+)", out))
    failed = sum(int(n) for n in re.findall(r"failed_calls=(\d+)", out))
    return calls, failed


def redis_errors(port: int, *, connections: int, pipeline: int, rounds: int) -> None:
    """INCR of a text value, ``pipeline`` at a time on each connection: an error reply each."""
    for _ in range(connections):
        with socket.create_connection((HOST, port), timeout=10) as conn:
            for _ in range(rounds):
                conn.sendall(b"*2\r\n$4\r\nINCR\r\n$7\r\ntextkey\r\n" * pipeline)  # as clients send it (RESP)
                got = b""
                while got.count(b"\r\n") < pipeline:
                    chunk = conn.recv(65536)
                    assert chunk, "redis closed the connection"
                    got += chunk
                assert got.count(b"-ERR") == pipeline, got


@pytest.mark.parametrize("pipeline", [1, 16])
def test_redis_benchmark_pipelined_and_not(redis_server, tmp_path, load, pipeline):
    bench = require_binary("redis-benchmark", "redis-tools")
    run = Run(tmp_path)
    port = redis_server.port
    try:
        subprocess.run(["redis-cli", "-p", str(port), "set", "textkey", "not a number"], check=True,
                       capture_output=True)
        with saturated_host(load):
            calls0, failed0 = redis_calls(port)
            since = run.begin("redis-server", "redis", ("redis-benchmark",))
            subprocess.run([bench, "-p", str(port), "-n", "20000", "-P", str(pipeline), "-q", "-t", "set,get,lpush"],
                           check=True, capture_output=True, timeout=120)
            # Errors: INCR of a text value answers an error, each time (from this process: redis-benchmark
            # stops at the first error, and may close its other connections before their answers).
            redis_errors(port, connections=2, pipeline=pipeline, rounds=4)
            until = run.end()

            def truth() -> tuple[int, int]:
                calls1, failed1 = redis_calls(port)
                return calls1 - calls0 - 1, failed1 - failed0  # less the first INFO (before the range)

            run.check(since, until, server="redis-server", port=port, protocol="redis",
                      clients=("redis-benchmark", "pytest"), truth_of=truth)  # pytest: this process
    finally:
        run.stop()


def general_log(db, path: pathlib.Path, on: bool) -> None:
    db.root_sql(f"SET GLOBAL general_log_file='{path}'; SET GLOBAL general_log={int(on)}")


def tcp_commands(path: pathlib.Path) -> int:
    """Commands the server ran for clients over TCP, from its general log: logins, queries, quits."""
    tcp: set[str] = set()
    commands = 0
    for line in path.read_text(errors="replace").splitlines():
        match = re.match(r"^(?:\d+\s+[\d:]+\s+)?\s*(\d+)\s+(Connect|Query|Quit|Init DB|Ping|Prepare|Execute|Close stmt)\b(.*)",
                         line.strip())
        if not match:
            continue
        session, command, rest = match.groups()
        if command == "Connect":
            if "TCP/IP" not in rest:
                continue
            tcp.add(session)
        if session in tcp and command != "Close stmt":  # a statement's close has no answer
            commands += 1
    return commands


def test_mariadb_slap(mariadb_server, tmp_path, load):
    slap = require_binary("mariadb-slap", "mariadb-client")
    db = mariadb_server
    run = Run(tmp_path)
    log = tmp_path / "general.log"
    try:
        with saturated_host(load):
            general_log(db, log, True)
            since = run.begin("mariadbd", "mysql", ("mariadb-slap", "mariadb"))
            subprocess.run([slap, "--no-defaults", f"-h{HOST}", f"-P{db.port}", f"-u{DB_USER}", f"-p{DB_PASSWORD}",
                            "--concurrency=8", "--iterations=2", "--number-of-queries=2000",
                            "--query=SELECT square, name FROM numbers WHERE n = 3", f"--create-schema={DB_NAME}",
                            "--no-drop"], check=True, capture_output=True, timeout=180)
            for _ in range(5):  # errors: a table that is not there
                subprocess.run([db.client, "--no-defaults", f"-h{HOST}", f"-P{db.port}", f"-u{DB_USER}",
                                f"-p{DB_PASSWORD}", DB_NAME, "-e", "SELECT * FROM nowhere"], capture_output=True,
                               timeout=60)
            until = run.end()
            general_log(db, log, False)  # over the Unix socket: not in the agent's view
            run.check(since, until, server="mariadbd", port=db.port, protocol="mysql",
                      clients=("mariadb-slap", "mariadb"), truth_of=lambda: (tcp_commands(log), 5))
    finally:
        run.stop()
