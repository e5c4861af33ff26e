"""Write rate and query latency of the topology store (SQLite).

Run: .venv/bin/python bench/bench_store.py [--edges 10000] [--services 1000] [--windows 30] [--json OUT]

A synthetic topology: ``--services`` services (1 instance each), ``--edges`` edges
between them (http, a tenth with errors), ``--windows`` 10-second windows of
metrics for every edge, written through a StoreSink (its writer thread commits
batches): edge windows per second, and the writer thread's CPU time per window.

Exchanges, 100,000 per run, through a StoreSink into a store of their own, in two
shapes: *spread* (10 per edge and 10-second window over all the edges) and *hot*
(10 edges, 10,000 per second of event time: what one busy service gives), each with the
store's default bound on exchanges per edge and window and without a bound: exchanges
per second, the writer thread's CPU time per exchange, rows stored and not kept.

The pipeline's side: a thread doing 40 µs of Python work per event (the agent's own work
per side of an exchange is about that), building an ExchangeEvent (hot shape) and handing
it to a sink as the agent's pipeline does, 30,000 times, with no store and with a store
(default bound, no bound), three passes in turn: the events per second that thread reaches
and its CPU time per event, i.e. what the writer thread (sharing the GIL) costs the agent's
event rate, and the writer thread's CPU time per event.

Then the topology database gets 100,000 spread exchanges, and repeated queries:
graph() over the last window, the last 5 minutes and everything, graph(service=…),
dependencies() at depths 1–3, edges(errors_only=True), exchanges().  Each query is timed
by wall clock and by the calling thread's CPU time (on a loaded machine the second
shows the cost without the waits); median and p99.  Last, graph() over the last window
again while another thread of the process runs Python (as the pipeline does while the API
answers): the query's thread shares the GIL.  Target: a topology (graph) query < 100 ms.

``--json OUT`` also writes every figure as JSON (for comparing runs).  The store's code is
whatever ``deetune`` imports: an older tree on PYTHONPATH is measured the same way (options
it lacks are reported as null).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import random
import statistics
import tempfile
import threading
import time
from typing import Any, Callable

from deetune.events import ExchangeEvent
from deetune.topology.model import EdgeKey, EdgeStats, EdgeWindowEvent, Instance, InstanceEvent
from deetune.topology.store import StoreSink, TopologyStore

SEC = 1_000_000_000
WINDOW = 10 * SEC
EXCHANGES = 100_000
#: Events the pipeline thread builds and hands over per measurement, and the Python work it
#: does per event besides building it (the agent spends ~50 µs of CPU per side of an exchange,
#: docs/performance.md: decoding both sides ~95 µs).
PIPELINE_EVENTS = 30_000
PIPELINE_WORK_US = 40
PIPELINE_PASSES = 3
#: Whether this store has the bound on exchanges per edge and window.
BOUNDED = "max_exchanges_per_edge_window" in inspect.signature(TopologyStore).parameters
UNSET = object()


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


def exchange(ts: int, i: int, key: EdgeKey) -> ExchangeEvent:
    """A server's report of an HTTP exchange on ``key`` (its own connection, path and port)."""
    return ExchangeEvent(
        ts, protocol="http", pid=1, comm="x", role="server", laddr="10.0.0.1", lport=key.port,
        raddr="10.0.0.2", rport=30000 + i % 30000, method="GET", target=f"/items/{i}", status=200, error=False,
        latency_ns=1_000_000, request_bytes=200, response_bytes=2000, client_service=key.client,
        server_service=key.server, attributes={"host": "example"})


def exchanges(shape: str, keys: list[EdgeKey], count: int, end: int) -> list[ExchangeEvent]:
    """``spread``: 10 per edge and window over all ``keys``; ``hot``: on 10 edges, 10,000/s."""
    if shape == "spread":
        per_window = 10 * len(keys)
        return [exchange(end - (count - i) * WINDOW // per_window, i, keys[i % len(keys)]) for i in range(count)]
    hot = keys[:: max(1, len(keys) // 10)][:10]
    return [exchange(end - (count - i) * (SEC // 10_000), i, hot[i % len(hot)]) for i in range(count)]


def busy_loop(work_us: float) -> Callable[[], None]:
    """A pure-Python loop taking about ``work_us`` µs (calibrated here), like the pipeline's own work."""
    def spin(n: int) -> None:
        for _ in range(n):
            pass

    n, took = 1000, 0.0
    while took < 0.05:
        n *= 2
        started = time.thread_time()
        spin(n)
        took = time.thread_time() - started
    count = max(1, int(n * work_us * 1e-6 / took))
    return lambda: spin(count)


def thread_cpu(thread: threading.Thread) -> float:
    """A thread's CPU time so far (s)."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def sink_for(path: str, bound: Any) -> StoreSink:
    if bound is UNSET:
        return StoreSink(TopologyStore(path))
    if not BOUNDED:
        raise LookupError("this store has no bound on exchanges per edge and window")
    return StoreSink(TopologyStore(path, max_exchanges_per_edge_window=bound))


def write_exchanges(tmp: str, name: str, events: list[ExchangeEvent], bound: Any) -> dict[str, Any]:
    """Hand ``events`` to a fresh store's sink and wait for the commit."""
    sink = sink_for(os.path.join(tmp, f"{name}.db"), bound)
    cpu = thread_cpu(sink._thread)
    started = time.perf_counter()
    for event in events:
        sink.handle(event)
    sink.flush(timeout=None)
    elapsed = time.perf_counter() - started
    writer_cpu = thread_cpu(sink._thread) - cpu
    sink.close()
    stats = sink.store.stats
    return {"per_s": len(events) / elapsed, "writer_cpu_us": writer_cpu / len(events) * 1e6,
            "stored": stats.exchanges, "not_kept": getattr(stats, "exchanges_not_kept", None),
            "dropped": sink.stats.dropped}


def pipeline_rate(tmp: str, name: str | None, keys: list[EdgeKey], end: int, bound: Any,
                  work: Callable[[], None]) -> dict[str, Any]:
    """Events/s of a thread doing ``work``, building an exchange and handing it to a sink, per
    event (``name`` None: to no sink)."""
    hot = keys[:: max(1, len(keys) // 10)][:10]
    sink = None if name is None else sink_for(os.path.join(tmp, f"{name}.db"), bound)
    handle = sink.handle if sink is not None else (lambda event: None)
    cpu = thread_cpu(sink._thread) if sink is not None else 0.0
    first = end - PIPELINE_EVENTS * (SEC // 10_000)
    started, own_cpu = time.perf_counter(), time.thread_time()
    for i in range(PIPELINE_EVENTS):
        work()
        handle(exchange(first + i * (SEC // 10_000), i, hot[i % 10]))
    elapsed, own_cpu = time.perf_counter() - started, time.thread_time() - own_cpu
    result: dict[str, Any] = {"per_s": PIPELINE_EVENTS / elapsed, "cpu_us": own_cpu / PIPELINE_EVENTS * 1e6}
    if sink is not None:
        sink.flush(timeout=None)
        result["writer_cpu_s"] = thread_cpu(sink._thread) - cpu
        result["dropped"] = sink.stats.dropped
        sink.close()
    return result


def timed(call: Callable[[], object], repeat: int) -> dict[str, float]:
    """Median and p99 of the wall time and of the thread CPU time (ms)."""
    walls, cpus = [], []
    call()  # warm the page cache and the connection
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.thread_time()
        call()
        cpus.append((time.thread_time() - cpu) * 1000)
        walls.append((time.perf_counter() - wall) * 1000)
    walls.sort()
    cpus.sort()
    p99 = min(len(walls) - 1, int(len(walls) * 0.99))
    return {"median_ms": statistics.median(walls), "p99_ms": walls[p99],
            "cpu_median_ms": statistics.median(cpus), "cpu_p99_ms": cpus[p99]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--edges", type=int, default=10_000)
    parser.add_argument("--windows", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=30, help="runs of each query")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    args = parser.parse_args()
    rng = random.Random(42)
    keys = topology(args.services, args.edges, rng)
    erroring = set(rng.sample(range(len(keys)), len(keys) // 10))
    now = (time.time_ns() // WINDOW) * WINDOW
    first = now - args.windows * WINDOW
    results: dict[str, Any] = {"services": args.services, "edges": len(keys), "windows": args.windows,
                               "load_average": os.getloadavg()[0], "bounded_store": BOUNDED}
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
        cpu = thread_cpu(sink._thread)
        started, handle_time = time.perf_counter(), 0.0
        for batch in batches:
            h = time.perf_counter()
            for event in batch:
                sink.handle(event)
            handle_time += time.perf_counter() - h
            sink.flush(timeout=None)  # one window at a time, as the aggregator delivers them
        elapsed = time.perf_counter() - started
        writer_cpu = thread_cpu(sink._thread) - cpu
        results["edge_windows"] = {"per_s": total / elapsed, "writer_cpu_us": writer_cpu / total * 1e6,
                                   "handle_us": handle_time / total * 1e6, "dropped": sink.stats.dropped}
        print(f"edge windows: {total / elapsed:,.0f}/s written ({total:,} in {elapsed:.1f} s); writer thread CPU "
              f"{writer_cpu / total * 1e6:.1f} µs/window; handle() {handle_time / total * 1e6:.2f} µs/event; "
              f"dropped {sink.stats.dropped}")

        # Exchanges, each shape and bound into a store of its own.
        results["exchanges"] = {}
        print(f"{'exchanges (100,000)':<40}{'per s':>10}{'writer CPU µs':>15}{'stored':>9}{'not kept':>10}"
              f"{'dropped':>9}")
        for shape in ("spread", "hot"):
            events = exchanges(shape, keys, EXCHANGES, now)
            for label, bound in (("default bound", UNSET), ("no bound", None)):
                name = f"{shape}, {label}"
                try:
                    r = write_exchanges(tmp, f"x-{shape}-{bound}", events, bound)
                except LookupError:
                    r = None
                results["exchanges"][name] = r
                if r is None:
                    print(f"{name:<40}{'n/a (no bound in this store)':>53}")
                    continue
                not_kept = "–" if r["not_kept"] is None else f"{r['not_kept']:,}"
                print(f"{name:<40}{r['per_s']:>10,.0f}{r['writer_cpu_us']:>15.2f}{r['stored']:>9,}{not_kept:>10}"
                      f"{r['dropped']:>9,}")

        # The pipeline's event rate with and without the store's writer thread: the cases in turn,
        # PIPELINE_PASSES times (the order rotating), medians.
        cases = [("no store", None, None), ("store, default bound", "p-default", UNSET),
                 ("store, no bound", "p-none", None)]
        passes: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in cases}
        work = busy_loop(PIPELINE_WORK_US)
        for n in range(PIPELINE_PASSES):
            for label, name, bound in cases[n % len(cases):] + cases[:n % len(cases)]:
                try:
                    passes[label].append(pipeline_rate(tmp, name and f"{name}-{n}", keys, now, bound, work))
                except LookupError:
                    pass
        results["pipeline"] = {}
        print(f"pipeline thread ({PIPELINE_EVENTS:,} hot exchanges per pass, {PIPELINE_WORK_US} µs of other Python "
              f"work each; median of {PIPELINE_PASSES} passes):")
        for label, runs in passes.items():
            if not runs:
                results["pipeline"][label] = None
                print(f"  {label}: n/a (no bound in this store)")
                continue
            r = results["pipeline"][label] = {
                key: statistics.median(run[key] for run in runs) for key in runs[0]}
            r["passes"] = runs
            line = f"  {label}: {r['per_s']:,.0f} events/s, {r['cpu_us']:.1f} µs of its CPU per event"
            if label != "no store":
                line += (f" ({r['per_s'] / results['pipeline']['no store']['per_s'] - 1:+.1%}); writer thread CPU "
                         f"{r['writer_cpu_s'] / PIPELINE_EVENTS * 1e6:.1f} µs per event, dropped {r['dropped']:,.0f}")
            print(line)

        # The topology database gets exchanges too, for the exchange queries.
        events = exchanges("spread", keys, EXCHANGES, now)
        for event in events:
            sink.handle(event)
        sink.flush(timeout=None)
        sink.close()
        # The events generated above are the bench's, not an agent's: a full collection of the
        # garbage collector over them (~240 ms) would land in some query.
        del batches, events, batch
        gc.collect()
        results["database_mib"] = os.path.getsize(path) / 2**20
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
        print(f"{'query':<36}{'median ms':>10}{'p99 ms':>9}{'CPU ms':>9}{'CPU p99':>9}")
        results["queries"] = {}
        for name, call in queries:
            r = results["queries"][name] = timed(call, args.repeat)
            print(f"{name:<36}{r['median_ms']:>10.1f}{r['p99_ms']:>9.1f}{r['cpu_median_ms']:>9.1f}"
                  f"{r['cpu_p99_ms']:>9.1f}")
        # The API answers from its own thread while the pipeline runs Python: the query shares the GIL.
        stop = threading.Event()

        def busy() -> None:
            while not stop.is_set():
                for _ in range(1000):
                    pass

        spinner = threading.Thread(target=busy, daemon=True)
        spinner.start()
        try:
            name = "graph(), last window, busy thread"
            r = results["queries"][name] = timed(lambda: store.graph(now - WINDOW, now), max(5, args.repeat // 3))
        finally:
            stop.set()
            spinner.join()
        print(f"{name:<36}{r['median_ms']:>10.1f}{r['p99_ms']:>9.1f}{r['cpu_median_ms']:>9.1f}{r['cpu_p99_ms']:>9.1f}"
              "   (another thread runs Python meanwhile)")
        store.close()
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
