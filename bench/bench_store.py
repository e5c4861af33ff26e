"""Write rate and query latency of the topology store (SQLite).

Run: .venv/bin/python bench/bench_store.py [--edges 10000] [--services 1000] [--windows 30]

A synthetic topology: ``--services`` services (1 instance each), ``--edges`` edges
between them (http, a tenth with errors), ``--windows`` 10-second windows of
metrics for every edge, written through a StoreSink (its writer thread commits
batches); then 100,000 exchanges.  Then repeated queries: graph() over the last
window, the last 5 minutes and everything, graph(service=…), dependencies() at
depths 1–3, edges(errors_only=True).  Each query is timed by wall clock and by
the calling thread's CPU time (on a loaded machine the second shows the cost
without the waits); median and p99.  Target: a topology (graph) query < 100 ms.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from typing import Callable

from deetune.events import ExchangeEvent
from deetune.topology.model import EdgeKey, EdgeStats, EdgeWindowEvent, Instance, InstanceEvent
from deetune.topology.store import StoreSink, TopologyStore

SEC = 1_000_000_000
WINDOW = 10 * SEC
EXCHANGES = 100_000


def topology(services: int, edges: int, rng: random.Random) -> list[EdgeKey]:
    """A layered graph (callers call services further down), so dependencies have depth."""
    keys: set[EdgeKey] = set()
    while len(keys) < edges:
        client = rng.randrange(services - 1)
        server = rng.randrange(client + 1, min(services, client + 60))
        keys.add(EdgeKey(f"svc-{client:04d}", f"svc-{server:04d}", "http", 8000 + server % 100))
    return sorted(keys, key=lambda k: (k.client, k.server))


def window_stats(rng: random.Random, errors: bool) -> EdgeStats:
    stats = EdgeStats(requests=rng.randint(1, 500), bytes_sent=rng.randint(0, 10**6),
                      bytes_received=rng.randint(0, 10**7), connections_opened=rng.randint(0, 5))
    stats.errors = rng.randint(1, 5) if errors else 0
    for _ in range(8):  # a few latency samples per window keep generation quick
        stats.add_latency(int(rng.lognormvariate(13, 1.2)))
    return stats


def timed(call: Callable[[], object], repeat: int) -> tuple[float, float, float]:
    """Median and p99 of the wall time, median of the thread CPU time (ms)."""
    walls, cpus = [], []
    call()  # warm the page cache and the connection
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.thread_time()
        call()
        cpus.append((time.thread_time() - cpu) * 1000)
        walls.append((time.perf_counter() - wall) * 1000)
    walls.sort()
    return statistics.median(walls), walls[min(len(walls) - 1, int(len(walls) * 0.99))], statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--edges", type=int, default=10_000)
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    rng = random.Random(42)
    keys = topology(args.services, args.edges, rng)
    erroring = set(rng.sample(range(len(keys)), len(keys) // 10))
    now = (time.time_ns() // WINDOW) * WINDOW
    first = now - args.windows * WINDOW
    print(f"{args.services:,} services, {len(keys):,} edges, {args.windows} windows of 10 s "
          f"({len(keys) * args.windows:,} edge windows); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "topology.db")
        sink = StoreSink(TopologyStore(path))
        for i in range(args.services):
            inst = Instance(service=f"svc-{i:04d}", host="h", pid=1000 + i, comm="x")
            sink.handle(InstanceEvent(first, instance=inst))
        sink.flush()

        # Edge windows, generated ahead so that only the store is measured.
        batches = []
        for w in range(args.windows):
            start = first + w * WINDOW
            batches.append([EdgeWindowEvent(
                start + WINDOW, key=key, window_start=start, window_ns=WINDOW, stats=window_stats(rng, i in erroring),
                client_instances=(f"h:{1000 + int(key.client[4:])}",),
                server_instances=(f"h:{1000 + int(key.server[4:])}",))
                for i, key in enumerate(keys)])
        total = sum(len(b) for b in batches)
        started, handle_time = time.perf_counter(), 0.0
        for batch in batches:
            h = time.perf_counter()
            for event in batch:
                sink.handle(event)
            handle_time += time.perf_counter() - h
            sink.flush(timeout=None)  # one window at a time, as the aggregator delivers them
        elapsed = time.perf_counter() - started
        print(f"edge windows: {total / elapsed:,.0f}/s written ({total:,} in {elapsed:.1f} s); "
              f"handle() {handle_time / total * 1e6:.2f} µs/event; dropped {sink.stats.dropped}")

        exchanges = [ExchangeEvent(
            now - EXCHANGES + i, protocol="http", pid=1, comm="x", role="server", laddr="10.0.0.1", lport=8080,
            raddr="10.0.0.2", rport=30000 + i % 30000, method="GET", target=f"/items/{i}", status=200, error=False,
            latency_ns=1_000_000, request_bytes=200, response_bytes=2000, client_service=keys[i % len(keys)].client,
            server_service=keys[i % len(keys)].server, attributes={"host": "example"}) for i in range(EXCHANGES)]
        started = time.perf_counter()
        for event in exchanges:
            sink.handle(event)
        sink.flush(timeout=None)
        elapsed = time.perf_counter() - started
        print(f"exchanges: {EXCHANGES / elapsed:,.0f}/s written ({EXCHANGES:,} in {elapsed:.1f} s); "
              f"dropped {sink.stats.dropped}")
        sink.close()
        print(f"database: {os.path.getsize(path) / 2**20:.0f} MiB")

        store = TopologyStore(path)
        middle = f"svc-{args.services // 2:04d}"
        queries: list[tuple[str, Callable[[], object]]] = [
            ("graph(), last window", lambda: store.graph(now - WINDOW, now)),
            ("graph(), last 5 minutes", lambda: store.graph(now - 300 * SEC, now)),
            ("graph(), all windows", lambda: store.graph(first, now)),
            ("graph(service=…)", lambda: store.graph(first, now, service=middle)),
            ("dependencies(depth=1, both)", lambda: store.dependencies(middle, 1, "both", first, now)),
            ("dependencies(depth=2, downstream)", lambda: store.dependencies(middle, 2, "downstream", first, now)),
            ("dependencies(depth=3, both)", lambda: store.dependencies(middle, 3, "both", first, now)),
            ("edges(errors_only=True)", lambda: store.edges(first, now, errors_only=True)),
            ("exchanges(limit=100)", lambda: store.exchanges(limit=100)),
            ("exchanges(service=…, limit=100)", lambda: store.exchanges(service=middle, limit=100)),
        ]
        graph = store.graph(first, now)
        reach = {d: len(store.dependencies(middle, d, "both", first, now)["nodes"]) for d in (1, 2, 3)}
        print(f"graph: {len(graph['nodes']):,} nodes, {len(graph['edges']):,} edges; dependencies of {middle} "
              f"(both ways) reach {reach[1]}, {reach[2]}, {reach[3]} services at depth 1, 2, 3; "
              f"{len(store.edges(first, now, errors_only=True)):,} edges with errors")
        print(f"{'query':<36}{'median ms':>10}{'p99 ms':>9}{'CPU ms':>9}")
        for name, call in queries:
            median, p99, cpu = timed(call, args.repeat)
            print(f"{name:<36}{median:>10.1f}{p99:>9.1f}{cpu:>9.1f}")
        store.close()


if __name__ == "__main__":
    main()
