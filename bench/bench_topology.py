"""Per-event cost of the topology aggregator (it runs on the pipeline thread).

Run: .venv/bin/python bench/bench_topology.py

Synthetic traffic on 1,000 open connections of 50 services: a third seen from the
server side with a remote client, a third from the client side to a remote server,
a third local-to-local (both sides report, one counts).  The resolver is a fake
with the real one's cost profile on hits (a dict per pid); the clock is the real
one, windows of 10 s.  Target: < 5 µs per exchange.  Times are the thread's CPU
time (a loaded machine's waits excluded), median and best of 5 runs.
"""

from __future__ import annotations

import statistics
import time

from deetune.events import ConnectionEvent, ExchangeEvent
from deetune.topology.aggregator import SocketOwners, TopologyAggregator
from deetune.topology.model import Instance

CONNECTIONS = 1000
SERVICES = 50
EVENTS = 200_000
HOST = "10.0.0.1"


class CachedResolver:
    def __init__(self) -> None:
        self._instances: dict[int, Instance] = {}

    def instance(self, pid: int, comm: str = "") -> Instance:
        cached = self._instances.get(pid)
        if cached is None:
            cached = self._instances[pid] = Instance(service=f"svc-{pid % SERVICES}", host="h", pid=pid, comm=comm)
        return cached

    def forget(self, pid: int) -> None:
        self._instances.pop(pid, None)

    def endpoint(self, addr: str, port: int) -> str:
        return f"svc-{port % SERVICES}" if addr == HOST else f"{addr}:{port}"

    def is_local_listener(self, addr: str, port: int) -> bool:
        return addr == HOST and port >= 8000


def traffic() -> tuple[list[ConnectionEvent], list[ExchangeEvent]]:
    opens, exchanges = [], []
    for i in range(CONNECTIONS):
        kind = i % 3
        pid = 100 + i % 200
        eph = 30000 + i
        if kind == 0:    # server side, remote client
            ends = [("server", pid, HOST, 8000 + i % SERVICES, f"192.0.2.{i % 250}", eph, i * 2)]
        elif kind == 1:  # client side, remote server
            ends = [("client", pid, HOST, eph, f"198.51.100.{i % 250}", 5432, i * 2)]
        else:            # local pair: both sides
            port = 8000 + i % SERVICES
            ends = [("client", pid, HOST, eph, HOST, port, i * 2),
                    ("server", 1000 + i % 100, HOST, port, HOST, eph, i * 2 + 1)]
        for role, p, laddr, lport, raddr, rport, sock in ends:
            opens.append(ConnectionEvent(0, phase="open", role=role, pid=p, comm="x", laddr=laddr, lport=lport,
                                         raddr=raddr, rport=rport, family=4, sock_id=sock))
            exchanges.append(ExchangeEvent(
                0, protocol="http", pid=p, comm="x", role=role, laddr=laddr, lport=lport, raddr=raddr, rport=rport,
                method="GET", target="/api/items", status=200, error=i % 50 == 0, latency_ns=200_000 + i * 1000,
                request_bytes=120, response_bytes=900, sock_id=sock))
    return opens, exchanges


def per_event_us(agg: TopologyAggregator, events: list, repeat: int) -> float:
    """CPU time of this thread: other processes on a busy machine do not count."""
    started = time.thread_time()
    for _ in range(repeat):
        for event in events:
            agg(event)
    return (time.thread_time() - started) / (repeat * len(events)) * 1e6


def main() -> None:
    opens, exchanges = traffic()
    runs_ex, runs_conn = [], []
    for _ in range(5):
        agg = TopologyAggregator(CachedResolver(), socket_owners=SocketOwners(read_sockets=lambda: [],
                                                                              read_owners=lambda: {}))
        for event in opens:
            agg(event)
        runs_ex.append(per_event_us(agg, exchanges, EVENTS // len(exchanges)))
        # open + close of fresh connections: naming each one, then counting it.
        closes = [ConnectionEvent(0, phase="close", role=e.role, pid=e.pid, comm=e.comm, laddr=e.laddr,
                                  lport=e.lport, raddr=e.raddr, rport=e.rport, family=4, sock_id=e.sock_id,
                                  bytes_sent=1000, bytes_received=9000, retransmits=0) for e in opens]
        pairs = [x for pair in zip(opens, closes) for x in pair]
        runs_conn.append(per_event_us(agg, pairs, 20))
        agg.flush()
    print(f"exchanges on open connections: {statistics.median(runs_ex):.2f} µs/event "
          f"(best {min(runs_ex):.2f}, {len(exchanges)} connections' sides, median of 5 runs of {EVENTS:,})")
    print(f"connection open+close:         {statistics.median(runs_conn):.2f} µs/event (best {min(runs_conn):.2f})")


if __name__ == "__main__":
    main()
