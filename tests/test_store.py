"""The topology store (SQLite) and its sink: writes, queries, retention, migrations, concurrency."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deetune.events import ConnectionEvent, ExchangeEvent
from deetune.sinks.base import SinkError
from deetune.topology.model import LATENCY_BUCKETS_NS, EdgeKey, EdgeStats, EdgeWindowEvent, Instance, InstanceEvent
from deetune.topology.store import (
    MIGRATIONS, SCHEMA_VERSION, StoreError, StoreSink, TopologyStore, _edge_json, migrate,
)

SEC = 1_000_000_000
DAY = 86400 * SEC
T0 = 1_700_000_000 * SEC
W = 10 * SEC


class Clock:
    def __init__(self, now: int):
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def path(tmp_path):
    return tmp_path / "topology.db"


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + 3600 * SEC)


@pytest.fixture
def store(path, clock):
    s = TopologyStore(path, clock=clock, exchange_hold_seconds=0)
    yield s
    s.close()


def stats(requests=0, errors=0, latencies_us=(), **counters) -> EdgeStats:
    result = EdgeStats(requests=requests, errors=errors, **counters)
    for latency in latencies_us:
        result.add_latency(latency * 1000)
    return result


def window(client: str, server: str, start: int, s: EdgeStats, *, protocol="http", port=80,
           clients=(), servers=()) -> EdgeWindowEvent:
    return EdgeWindowEvent(start + W, key=EdgeKey(client, server, protocol, port), window_start=start, window_ns=W,
                           stats=s, client_instances=tuple(clients), server_instances=tuple(servers))


def instance(service: str, pid: int, ts: int, host="h") -> InstanceEvent:
    return InstanceEvent(ts, instance=Instance(service=service, host=host, pid=pid, comm=service[:15]))


def exchange(ts: int, client: str, server: str, *, role="client", lport=40000, target="/", error=False,
             laddr="10.0.0.1", raddr="10.0.0.2", rport=80) -> ExchangeEvent:
    return ExchangeEvent(ts, protocol="http", pid=1, comm="x", role=role, laddr=laddr, lport=lport, raddr=raddr,
                         rport=rport, method="GET", target=target, status=500 if error else 200, error=error,
                         latency_ns=1000, request_bytes=10, response_bytes=20, client_service=client,
                         server_service=server, attributes={"host": "h"})


def merged(*parts: EdgeStats) -> EdgeStats:
    total = EdgeStats()
    for part in parts:
        total.merge(part)
    return total


def edge_of(result, client, server):
    edges = result["edges"] if isinstance(result, dict) else result
    [found] = [e for e in edges if (e["client"], e["server"]) == (client, server)]
    return found


def metrics(edge: dict) -> dict:
    return {k: v for k, v in edge.items() if k not in ("client", "server", "protocol", "port")}


# ---- writing through the sink, exact numbers, reopening ----------------------------------------


def test_sink_batches_writes_and_history_survives_reopening(path, clock) -> None:
    a1 = stats(100, 3, [80, 120, 900, 4000] * 25, bytes_sent=1000, bytes_received=9000, connections_opened=4)
    a2 = stats(50, 0, [60, 70, 30_000] * 16 + [70, 70], bytes_sent=500, bytes_received=4000, retransmits=2)
    b1 = stats(0, 0, connections_failed=7, resets=1)
    events = [
        instance("frontend", 10, T0 + 1), instance("api", 20, T0 + 2),
        window("frontend", "api", T0, a1, port=8080, clients=["h:10"], servers=["h:20"]),
        window("api", "10.9.9.9:22", T0, b1, protocol="tcp", port=22, clients=["h:20"]),
        window("frontend", "api", T0 + W, a2, port=8080, clients=["h:10"], servers=["h:20"]),
    ]
    # Many small windows of another edge so that several batches are needed.
    filler = [window("cron", "api", T0 + i * W, stats(1, 0, [100]), port=8080) for i in range(250)]
    sink = StoreSink(TopologyStore(path, clock=clock), batch_size=100, interval=0.05)
    for event in events + filler:
        sink.handle(event)
    sink.handle(ConnectionEvent(T0, phase="open", role="client", pid=1, comm="x", laddr="a", lport=1, raddr="b",
                                rport=2, family=4, sock_id=1))  # not stored: ignored
    sink.close()
    assert sink.stats.queued == sink.stats.written == len(events) + len(filler)
    assert 3 <= sink.stats.batches <= 10 and sink.stats.dropped == 0

    reopened = TopologyStore(path, clock=clock)
    try:
        graph = reopened.graph(T0, T0 + 2 * W)
        assert metrics(edge_of(graph, "frontend", "api")) == merged(a1, a2).to_json()
        fe = edge_of(graph, "frontend", "api")
        assert (fe["protocol"], fe["port"], fe["requests"], fe["errors"]) == ("http", 8080, 150, 3)
        assert (fe["latency_p50_ns"], fe["latency_p90_ns"], fe["latency_p99_ns"]) == (
            merged(a1, a2).quantile_ns(0.5), merged(a1, a2).quantile_ns(0.9), merged(a1, a2).quantile_ns(0.99))
        assert metrics(edge_of(graph, "api", "10.9.9.9:22")) == b1.to_json()
        assert edge_of(graph, "cron", "api")["requests"] == 2
        nodes = {n["name"]: n for n in graph["nodes"]}
        assert sorted(nodes) == ["10.9.9.9:22", "api", "cron", "frontend"]
        assert nodes["10.9.9.9:22"]["external"] and nodes["cron"]["external"] and not nodes["api"]["external"]
        assert [i["id"] for i in nodes["frontend"]["instances"]] == ["h:10"]
        assert nodes["frontend"]["instances"][0]["service"] == "frontend"
        assert (graph["since"], graph["until"]) == (T0, T0 + 2 * W)
    finally:
        reopened.close()


def test_percentiles_are_those_of_the_merged_histograms(store) -> None:
    parts = [stats(10, 0, [50 * (i + 1)] * 10) for i in range(5)] + [stats(1, 0, [2_000_000])]
    store.write(window("a", "b", T0 + i * W, part) for i, part in enumerate(parts))
    edge = edge_of(store.edges(T0, T0 + 6 * W), "a", "b")
    total = merged(*parts)
    assert edge["latency_p50_ns"] == total.quantile_ns(0.5) == 127_500  # 100 µs + 150 µs × 5.5/30
    assert edge["latency_p90_ns"] == total.quantile_ns(0.9)
    assert edge["latency_p99_ns"] == total.quantile_ns(0.99)
    assert edge["latency_avg_ns"] == total.latency_sum_ns // 51


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=len(LATENCY_BUCKETS_NS) + 1, max_size=len(LATENCY_BUCKETS_NS) + 1),
       st.integers(0, 10**6), st.integers(0, 10**12))
def test_edge_json_is_edgestats_to_json(buckets, requests, latency_sum) -> None:
    s = EdgeStats(requests=requests, errors=requests // 3, latency_sum_ns=latency_sum, latency_buckets=buckets,
                  bytes_sent=1, bytes_received=2, connections_opened=3, connections_failed=4, retransmits=5, resets=6,
                  decoded=requests // 2, unparsed=7, unsolicited=8)
    totals = (s.requests, s.errors, s.latency_sum_ns, 1, 2, 3, 4, 5, 6, requests // 2, 7, 8,
              *itertools.accumulate(buckets))
    assert _edge_json("c", "s", "http", 80, totals) == {"client": "c", "server": "s", "protocol": "http", "port": 80,
                                                        **s.to_json()}


# ---- time ranges ---------------------------------------------------------------------------------


def test_windows_overlapping_the_range_count_whole(store) -> None:
    store.write([window("a", "b", T0 + i * W, stats(10 ** i)) for i in range(3)])  # 1, 10, 100 requests

    def requests(since, until):
        return {(e["client"], e["server"]): e["requests"] for e in store.edges(since, until)}

    assert requests(T0, T0 + 3 * W) == {("a", "b"): 111}
    assert requests(T0 + W, T0 + 2 * W) == {("a", "b"): 10}
    assert requests(T0 + W // 2, T0 + W + 1) == {("a", "b"): 11}
    assert requests(T0 + 2 * W, T0 + 10 * W) == {("a", "b"): 100}
    assert requests(T0 - W, T0) == {}  # ends where the first window starts
    assert requests(T0 + 3 * W, T0 + 4 * W) == {}
    assert requests(T0 + 2 * W, T0 + W) == {}  # an empty range


def test_late_and_repeated_windows(store) -> None:
    store.write([window("a", "b", T0 + 2 * W, stats(100))])
    store.write([window("a", "b", T0, stats(1))])        # late
    store.write([window("a", "b", T0 + W, stats(10))])   # late too
    store.write([window("a", "b", T0 + W, stats(1000))]) # the same window again (a partial one at a restart)
    store.write([window("a", "b", T0 + 3 * W, stats(10_000))])
    assert store.stats.late_windows == 3

    def requests(since, until):
        return sum(e["requests"] for e in store.edges(since, until))

    assert [requests(T0 + i * W, T0 + (i + 1) * W) for i in range(4)] == [1, 1010, 100, 10_000]
    assert requests(T0, T0 + 4 * W) == 11_111


def test_graph_of_one_service(store) -> None:
    store.write([instance("api", 20, T0),
                 window("web", "api", T0, stats(5)), window("api", "db", T0, stats(7)),
                 window("cron", "db", T0, stats(1))])
    graph = store.graph(T0, T0 + W, service="api")
    assert [(e["client"], e["server"]) for e in graph["edges"]] == [("api", "db"), ("web", "api")]
    assert [n["name"] for n in graph["nodes"]] == ["api", "db", "web"]
    assert store.graph(T0, T0 + W, service="nope") == {"nodes": [], "edges": [], "since": T0, "until": T0 + W}
    # A service with instances but no edges in the range is still a node.
    store.write([instance("idle", 30, T0 + W)])
    assert [n["name"] for n in store.graph(T0 + W, T0 + 2 * W, service="idle")["nodes"]] == ["idle"]
    assert "idle" in [n["name"] for n in store.graph(T0 + W, T0 + 2 * W)["nodes"]]


def test_services(store) -> None:
    store.write([
        instance("api", 20, T0 + 1), instance("api", 21, T0 + 2), instance("web", 10, T0 + 3),
        window("web", "api", T0, stats(5), clients=["h:10"], servers=["h:20"]),
        window("api", "10.9.9.9:5432", T0 + W, stats(7), clients=["h:20"]),
    ])
    services = {s["name"]: s for s in store.services(T0, T0 + 2 * W)}
    assert sorted(services) == ["10.9.9.9:5432", "api", "web"]
    api = services["api"]
    assert (api["requests_in"], api["requests_out"], api["external"]) == (5, 7, False)
    assert [i["id"] for i in api["instances"]] == ["h:20", "h:21"]
    assert (api["first_seen"], api["last_seen"]) == (T0, T0 + 2 * W)
    assert services["10.9.9.9:5432"]["external"] and services["10.9.9.9:5432"]["instances"] == []
    # Instances and services outside the range are left out.
    assert [s["name"] for s in store.services(T0 + 5 * W, T0 + 6 * W)] == []


# ---- dependencies and errors ----------------------------------------------------------------------


@pytest.fixture
def chain(store):
    """web → api → db → disk;  cron → api;  api → cache;  other → db."""
    store.write([window(c, s, T0, stats(1)) for c, s in [
        ("web", "api"), ("api", "db"), ("db", "disk"), ("cron", "api"), ("api", "cache"), ("other", "db")]])
    return store


def hops(result) -> dict[str, int]:
    return {n["name"]: n["hops"] for n in result["nodes"]}


def pairs(result) -> list[tuple[str, str]]:
    return [(e["client"], e["server"]) for e in result["edges"]]


def test_dependencies_downstream(chain) -> None:
    one = chain.dependencies("web", 1, "downstream", T0, T0 + W)
    assert (one["service"], one["depth"], one["direction"]) == ("web", 1, "downstream")
    assert hops(one) == {"web": 0, "api": 1} and pairs(one) == [("web", "api")]
    assert hops(chain.dependencies("web", 2, "downstream", T0, T0 + W)) == {"web": 0, "api": 1, "db": 2, "cache": 2}
    three = chain.dependencies("web", 3, "downstream", T0, T0 + W)
    assert hops(three) == {"web": 0, "api": 1, "db": 2, "cache": 2, "disk": 3}
    assert pairs(three) == [("api", "cache"), ("api", "db"), ("db", "disk"), ("web", "api")]


def test_dependencies_upstream_and_both(chain) -> None:
    assert hops(chain.dependencies("db", 1, "upstream", T0, T0 + W)) == {"db": 0, "api": 1, "other": 1}
    assert hops(chain.dependencies("db", 2, "upstream", T0, T0 + W)) == {
        "db": 0, "api": 1, "other": 1, "web": 2, "cron": 2}
    both = chain.dependencies("api", 2, "both", T0, T0 + W)
    # Callers and callees; not "other" (a caller of a callee).
    assert hops(both) == {"api": 0, "web": 1, "cron": 1, "db": 1, "cache": 1, "disk": 2}
    assert ("other", "db") not in pairs(both)
    with pytest.raises(ValueError):
        chain.dependencies("api", 1, "sideways", T0, T0 + W)


def test_errors_only(store) -> None:
    store.write([window("a", "b", T0, stats(10, 1)), window("a", "c", T0, stats(10, 0)),
                 window("a", "d", T0, stats(0, 0, connections_failed=2), protocol="tcp"),
                 window("x", "b", T0, stats(3, 0))])
    assert [(e["client"], e["server"]) for e in store.edges(T0, T0 + W, errors_only=True)] == [("a", "b"), ("a", "d")]
    assert [(e["client"], e["server"]) for e in store.edges(T0, T0 + W, service="b")] == [("a", "b"), ("x", "b")]
    assert [(e["client"], e["server"]) for e in store.edges(T0, T0 + W, errors_only=True, service="b")] == [("a", "b")]


# ---- exchanges ------------------------------------------------------------------------------------


def test_exchanges_most_recent_first_with_filters(store) -> None:
    store.write([exchange(T0 + i, "web", "api", lport=40000 + i) for i in range(5)]
                + [exchange(T0 + 10 + i, "api", "db", lport=41000 + i, rport=5432) for i in range(3)])
    found = store.exchanges(limit=4)
    assert [x["ts"] for x in found] == [T0 + 12, T0 + 11, T0 + 10, T0 + 4]
    assert (found[0]["client"], found[0]["server"], found[0]["type"], found[0]["attributes"]) == (
        "api", "db", "request", {"host": "h"})
    assert [x["ts"] for x in store.exchanges(service="web")] == [T0 + i for i in range(4, -1, -1)]
    assert [x["ts"] for x in store.exchanges(service="api", limit=6)] == [
        T0 + 12, T0 + 11, T0 + 10, T0 + 4, T0 + 3, T0 + 2]
    assert [x["ts"] for x in store.exchanges(service="api", since=T0 + 3)] == [
        T0 + 12, T0 + 11, T0 + 10, T0 + 4, T0 + 3]


def test_an_exchange_reported_by_both_ends_is_stored_once(path, clock) -> None:
    store = TopologyStore(path, clock=clock, exchange_hold_seconds=2)  # the clock stands still: nothing expires
    client = exchange(T0, "web", "api", role="client", lport=40000, rport=8080)
    server = exchange(T0 + 5, "web", "api", role="server", laddr="10.0.0.2", lport=8080, raddr="10.0.0.1",
                      rport=40000)
    store.write([client])
    store.write([server])
    store.write([exchange(T0 + 7, "web", "api", role="server", laddr="10.0.0.2", lport=8080, raddr="10.0.0.1",
                          rport=40000)])  # the next exchange, the server first this time
    store.write([exchange(T0 + 6, "web", "api", role="client", lport=40000, rport=8080)])
    store.write([exchange(T0 + 9, "web", "ext:443", role="client", lport=40001, rport=443)])  # remote server
    found = store.exchanges()
    assert [(x["ts"], x["role"]) for x in found] == [(T0 + 7, "server"), (T0 + 5, "server")]
    store.close()  # the remote server's exchange was still waiting for a server copy
    reopened = TopologyStore(path, clock=clock)
    assert [(x["ts"], x["role"]) for x in reopened.exchanges()] == [
        (T0 + 9, "client"), (T0 + 7, "server"), (T0 + 5, "server")]
    assert store.stats.duplicate_exchanges == 2
    reopened.close()


def test_client_copies_wait_for_their_server_copy(path, clock) -> None:
    store = TopologyStore(path, clock=clock, exchange_hold_seconds=2)
    store.write([exchange(T0, "web", "ext", lport=40000)])
    assert store.holding and store.exchanges() == []
    clock.now += 3 * SEC
    store.write([])
    assert not store.holding and len(store.exchanges()) == 1
    store.write([exchange(T0 + 1, "web", "ext", lport=40001)])
    store.close()  # stores what is held
    reopened = TopologyStore(path, clock=clock)
    assert len(reopened.exchanges()) == 2
    reopened.close()


def test_exchanges_are_bounded_in_number(path, clock) -> None:
    store = TopologyStore(path, clock=clock, max_exchanges=100, exchange_hold_seconds=0)
    for batch in range(10):
        store.write([exchange(T0 + batch * 100 + i, "a", "b", lport=i) for i in range(50)])
    count = len(store.exchanges(limit=10_000))
    assert 100 <= count <= 110  # pruned when a tenth over the bound
    store.maintain()
    assert [x["ts"] for x in store.exchanges(limit=10_000)] == [T0 + 949 - i for i in range(50)] + [
        T0 + 849 - i for i in range(50)]
    store.close()


# ---- retention ------------------------------------------------------------------------------------


def test_retention_deletes_old_data_and_keeps_the_rest_exact(path) -> None:
    clock = Clock(T0)
    store = TopologyStore(path, clock=clock, retention_seconds=86400, exchange_hold_seconds=0)
    # Day 0: a→b and an old-only edge; day 1: a→b again.
    store.write([instance("old", 1, T0), instance("a", 2, T0),
                 window("a", "b", T0, stats(1), clients=["h:2"]), window("a", "b", T0 + W, stats(10)),
                 window("old", "b", T0, stats(5)), exchange(T0, "a", "b")])
    clock.now = T0 + DAY
    store.write([window("a", "b", T0 + DAY, stats(100), clients=["h:2"]),
                 window("a", "b", T0 + DAY + W, stats(1000)), exchange(T0 + DAY, "a", "b", lport=1)])
    clock.now = T0 + DAY + 2 * W  # the first day's windows (ending by T0 + 2W) are past the retention
    store.maintain()
    assert sum(e["requests"] for e in store.edges(0, T0 + 2 * DAY)) == 1100
    assert [e["requests"] for e in store.edges(T0 + DAY + W, T0 + DAY + 2 * W)] == [1000]
    assert [(e["client"], e["requests"]) for e in store.edges(T0, T0 + 2 * W)] == []
    assert [x["ts"] for x in store.exchanges()] == [T0 + DAY]
    assert [s["name"] for s in store.services(0, T0 + 2 * DAY)] == ["a", "b"]
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM edges").fetchone()[0] == 1
    assert conn.execute("SELECT id FROM instances").fetchall() == [("h:2",)]
    # One floor row holds the expired totals; the two new windows follow it.
    assert conn.execute("SELECT window_start, windows, requests FROM edge_windows ORDER BY rowid").fetchall() == [
        (0, 2, 11), (T0 + DAY, 3, 111), (T0 + DAY + W, 4, 1111)]
    conn.close()
    # Writes go on after the floor; a second pass folds the next expired window into it.
    store.write([window("a", "b", T0 + DAY + 2 * W, stats(10_000))])
    clock.now = T0 + 2 * DAY + W + 1
    store.maintain()
    assert [e["requests"] for e in store.edges(0, T0 + 3 * DAY)] == [11_000]
    store.close()


def test_windows_older_than_the_retention_are_not_stored(store, clock) -> None:
    store.write([window("a", "b", clock.now - 8 * DAY, stats(1))])
    assert store.stats.expired_windows == 1 and store.edges(0, clock.now) == []


def test_a_floor_with_a_huge_latency_sum_is_rebased(path) -> None:
    clock = Clock(T0)
    store = TopologyStore(path, clock=clock, retention_seconds=86400, exchange_hold_seconds=0)
    store.write([window("a", "b", T0, stats(1, latency_sum_ns=TopologyStore.REBASE_ABOVE + 1)),
                 window("a", "b", T0 + DAY, stats(2, latency_sum_ns=20))])
    clock.now = T0 + DAY + W
    store.maintain()
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT window_start, requests, latency_sum_ns FROM edge_windows ORDER BY rowid").fetchall()
    assert rows == [(0, 0, 0), (T0 + DAY, 2, 20)]
    conn.close()
    store.write([window("a", "b", T0 + DAY + W, stats(4, latency_sum_ns=40))])
    [edge] = store.edges(T0 + DAY, T0 + DAY + 2 * W)
    assert (edge["requests"], edge["latency_avg_ns"]) == (6, 10)
    store.close()


# ---- schema ---------------------------------------------------------------------------------------


def test_migration_from_version_1_to_2(path, clock) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, 1) == 0
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "exchanges" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    # Data written under version 1 (same tables as now, no exchanges).
    conn.execute("INSERT INTO edges VALUES (1, 'a', 'b', 'http', 80, ?, ?)", (T0, T0 + W))
    buckets = [0, 0, 0] + [4] * (len(LATENCY_BUCKETS_NS) - 2)  # 4 samples in the 4th bucket, cumulative
    conn.execute(f"INSERT INTO edge_windows VALUES (1, ?, ?, 1, 4, 1, 1200000, 0, 0, 0, 0, 0, 0,"
                 f" {', '.join(map(str, buckets))})", (T0, T0 + W))
    conn.close()
    store = TopologyStore(path, clock=clock)
    try:
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4  # 4: detail coverage
        conn.close()
        [edge] = store.edges(T0, T0 + W)
        assert (edge["requests"], edge["errors"], edge["latency_avg_ns"]) == (4, 1, 300_000)
        store.write([exchange(T0, "a", "b", role="server")])
        assert len(store.exchanges()) == 1
    finally:
        store.close()


def test_a_newer_schema_is_refused(path) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        TopologyStore(path)


def test_the_database_is_in_wal_mode(store, path) -> None:
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


# ---- the sink -------------------------------------------------------------------------------------


def test_sink_spec(tmp_path) -> None:
    with pytest.raises(SinkError, match="store:PATH"):
        StoreSink.from_arg(None)
    with pytest.raises(SinkError):
        StoreSink.from_arg(str(tmp_path / "missing-dir" / "x.db"))
    sink = StoreSink.from_arg(str(tmp_path / "x.db"))
    assert sink.name == "store"
    sink.close()


def test_sink_is_registered() -> None:
    from deetune.plugins import default_plugins

    assert default_plugins().sinks.get("store") is StoreSink


def stuck_sink(path, clock) -> tuple[StoreSink, threading.Event]:
    """A sink (queue of 10) whose writer took one window and waits for the gate to write it."""
    gate = threading.Event()

    class SlowStore(TopologyStore):
        def write(self, events):
            gate.wait(10)
            super().write(events)

    sink = StoreSink(SlowStore(path, clock=clock), max_queue=10, interval=0.01)
    sink.handle(window("a", "b", T0, stats(1)))
    deadline = time.monotonic() + 5
    while sink._queue and time.monotonic() < deadline:  # the writer took it and is now stuck
        time.sleep(0.005)
    return sink, gate


def test_a_full_queue_drops_and_counts_never_blocks(path, clock) -> None:
    sink, gate = stuck_sink(path, clock)
    started = time.perf_counter()
    for i in range(1, 16):
        sink.handle(window("a", "b", T0 + i * W, stats(1)))
    assert time.perf_counter() - started < 0.5
    assert (sink.stats.queued, sink.stats.dropped) == (11, 5)
    gate.set()
    sink.close()
    reopened = TopologyStore(path, clock=clock)
    assert reopened.edges(0, T0 + DAY)[0]["requests"] == 11
    reopened.close()


def test_flush_waits_for_the_commit(path, clock) -> None:
    sink = StoreSink(TopologyStore(path, clock=clock), interval=60)
    sink.handle(window("a", "b", T0, stats(3)))
    sink.flush()
    assert sink.store.edges(T0, T0 + W)[0]["requests"] == 3
    sink.close()


def test_a_reader_while_the_writer_commits(path, clock) -> None:
    sink = StoreSink(TopologyStore(path, clock=clock), batch_size=50, interval=0.01)
    reader = TopologyStore(path, clock=clock, lock=False)  # a second handle that only reads
    seen: list[list[int]] = [[], []]
    errors: list[BaseException] = []
    stop = threading.Event()

    def read(mine: list[int]) -> None:
        try:
            while not stop.is_set():
                edges = reader.edges(T0, T0 + 10_000 * W)
                graph = reader.graph(T0, T0 + 10_000 * W)
                # One snapshot per query: graph's nodes are the ends of its edges.
                ends = {e["client"] for e in graph["edges"]} | {e["server"] for e in graph["edges"]}
                assert ends == {n["name"] for n in graph["nodes"]}
                mine.append(sum(e["requests"] for e in edges))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=read, args=(mine,)) for mine in seen]
    for t in threads:
        t.start()
    for i in range(2000):
        sink.handle(window(f"c{i % 7}", f"s{i % 5}", T0 + (i // 35) * W, stats(1)))
        if i % 100 == 0:
            time.sleep(0.002)
    sink.flush()
    time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    sink.close()
    assert not errors, errors[0]
    for mine in seen:  # each reader saw whole commits only, never going back
        assert mine and mine == sorted(mine) and mine[-1] == 2000
    assert reader.edges(T0, T0 + 10_000 * W) and sum(e["requests"] for e in reader.edges(T0, T0 + 10_000 * W)) == 2000
    reader.close()


def test_a_thread_per_query_does_not_pile_up_connections(path, clock) -> None:
    """The API server starts a thread per request: read connections are pooled, not per thread."""
    store = TopologyStore(path, clock=clock)
    store.write([window("a", "b", T0, stats(1))])
    opened = []
    real_connect = sqlite3.connect

    def counting_connect(*args, **kwargs):
        opened.append(args[0])
        return real_connect(*args, **kwargs)

    sqlite3.connect = counting_connect
    try:
        for _ in range(3):
            threads = [threading.Thread(target=store.graph, args=(T0, T0 + W)) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        after_bursts = len(opened)
        for _ in range(20):
            t = threading.Thread(target=store.edges, args=(T0, T0 + W))
            t.start()
            t.join()
    finally:
        sqlite3.connect = real_connect
    assert len(store._idle_readers) <= TopologyStore.MAX_IDLE_READERS
    assert len(opened) == after_bursts  # a thread per query, every one served from the pool
    assert after_bursts <= 8 + 2 * TopologyStore.MAX_IDLE_READERS  # a burst opens at most its width
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.graph(T0, T0 + W)


def test_instances_are_listed_by_pid_as_a_number(store) -> None:
    """Pids wrap: a service restarted after pid 32727 may get 442.  Listed by id, "h:32727" came first."""
    store.write([instance("orders", 32727, T0 + 1), instance("orders", 442, T0 + 2), instance("orders", 9, T0 + 3),
                 window("curl", "orders", T0, stats(1, 0, [100]), port=8080)])
    (node,) = [n for n in store.graph(T0, T0 + W)["nodes"] if n["name"] == "orders"]
    assert [i["pid"] for i in node["instances"]] == [9, 442, 32727]


def test_a_flood_of_exchanges_leaves_room_for_the_edges_counts(path, clock) -> None:
    """Exchanges (detail) fill half the queue at most: the edges' windows queued behind a flood of
    them are kept, and the edge's requests stay exact."""
    sink, gate = stuck_sink(path, clock)
    for i in range(20):
        sink.handle(exchange(T0 + i, "a", "b"))
    for i in range(1, 6):
        sink.handle(window("a", "b", T0 + i * W, stats(1)))
    assert (sink.stats.queued, sink.stats.dropped) == (1 + 5 + 5, 15)  # 5 exchanges, 5 windows
    gate.set()
    sink.close()
    reopened = TopologyStore(path, clock=clock)
    assert reopened.edges(0, T0 + DAY)[0]["requests"] == 6
    reopened.close()
