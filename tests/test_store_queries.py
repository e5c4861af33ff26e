"""The topology store's edge metrics, computed in SQL, against the model (EdgeStats merged in Python)."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from deetune.topology.model import LATENCY_BUCKETS_NS, EdgeKey, EdgeStats, EdgeWindowEvent
from deetune.topology.store import TopologyStore, _edge_json, _edges_json

SEC = 1_000_000_000
T0 = 1_700_000_000 * SEC
W = 10 * SEC
EDGES = [EdgeKey("a", "b", "http", 80), EdgeKey("a", "c", "redis", 6379), EdgeKey("b", "c", "tcp", 22),
         EdgeKey("c", "a", "http", 8080)]

bucket_counts = st.lists(st.one_of(st.just(0), st.integers(0, 10), st.integers(0, 1 << 50)),
                         min_size=len(LATENCY_BUCKETS_NS) + 1, max_size=len(LATENCY_BUCKETS_NS) + 1)


@settings(max_examples=500, deadline=None)
@given(bucket_counts, st.integers(0, 1 << 40), st.integers(0, 1 << 60))
def test_percentiles_of_huge_and_sparse_histograms_are_the_models(buckets, requests, latency_sum) -> None:
    """Beyond 2**53 floats round: the SQL must round as Python does, operation for operation."""
    s = EdgeStats(requests=requests, errors=requests // 2, latency_sum_ns=latency_sum, latency_buckets=buckets)
    totals = (s.requests, s.errors, s.latency_sum_ns, 0, 0, 0, 0, 0, 0, 0, 0, 0, *itertools.accumulate(buckets))
    assert _edge_json("c", "s", "http", 80, totals) == {"client": "c", "server": "s", "protocol": "http", "port": 80,
                                                        **s.to_json()}


def test_a_rank_on_a_bucket_boundary_takes_the_first_bucket_reaching_it() -> None:
    """p50 of [1, 0, 0, 1]: the rank (1.0) is reached at the end of the first bucket, not at the
    start of the fourth; likewise when p90 and p99 land on a boundary."""
    n = len(LATENCY_BUCKETS_NS) + 1
    for buckets in ([1, 0, 0, 1] + [0] * (n - 4), [0, 5, 0, 0, 0, 5] + [0] * (n - 6),
                    [0] * (n - 3) + [9, 0, 1], [99] + [0] * (n - 2) + [1], [1] + [0] * (n - 1)):
        s = EdgeStats(requests=sum(buckets), latency_buckets=buckets)
        totals = (s.requests, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, *itertools.accumulate(buckets))
        assert _edge_json("c", "s", "http", 80, totals) == {"client": "c", "server": "s", "protocol": "http",
                                                            "port": 80, **s.to_json()}
    assert s.to_json()["latency_p50_ns"] == LATENCY_BUCKETS_NS[0] // 2


def test_edges_come_sorted_even_if_the_rows_do_not() -> None:
    names = {1: ("b", "a", "http", 80), 2: ("a", "z", "http", 80), 3: ("a", "b", "tcp", 22), 4: ("a", "b", "http", 9)}
    row = (10, 0, None, None, None, None, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    edges = _edges_json([(i, *row) for i in (1, 2, 3, 4)], names)
    assert [(e["client"], e["server"], e["protocol"], e["port"]) for e in edges] == sorted(names.values())
    assert edges[0]["requests"] == 10 and edges[0]["latency_p50_ns"] is None


window_stats = st.builds(
    lambda requests, errors, failed, buckets, latency_sum: EdgeStats(
        requests=requests, errors=errors, connections_failed=failed, latency_buckets=buckets,
        latency_sum_ns=latency_sum, bytes_sent=requests * 100, bytes_received=requests * 1000,
        connections_opened=requests // 10, retransmits=errors, resets=failed),
    st.integers(0, 1000), st.sampled_from([0, 0, 0, 1, 7]), st.sampled_from([0, 0, 2]),
    st.lists(st.integers(0, 50), min_size=len(LATENCY_BUCKETS_NS) + 1, max_size=len(LATENCY_BUCKETS_NS) + 1),
    st.integers(0, 10**9))
# (edge, window index, stats), written in the order given: windows arrive late or twice too.
writes = st.lists(st.tuples(st.sampled_from(EDGES), st.integers(0, 7), window_stats), min_size=1, max_size=25)
ranges = st.lists(st.tuples(st.integers(-2 * W, 9 * W), st.integers(-2 * W, 9 * W)), min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(writes, ranges, st.integers(1, 4))
def test_edges_over_any_range_are_the_merged_windows(written, queried, batches) -> None:
    """Windows overlapping [since, until) count whole; each edge's are merged as EdgeStats."""
    with tempfile.TemporaryDirectory() as tmp:
        store = TopologyStore(Path(tmp) / "t.db", clock=lambda: T0 + 10 * W, exchange_hold_seconds=0)
        events = [EdgeWindowEvent(T0 + (i + 1) * W, key=key, window_start=T0 + i * W, window_ns=W, stats=stats)
                  for key, i, stats in written]
        size = -(-len(events) // batches)
        for start in range(0, len(events), size):
            store.write(events[start:start + size])
        for since, until in ({(a, b) for a, b in queried} | {(0, 100 * W)}):
            since, until = T0 + since, T0 + until
            expected = []
            for key in EDGES:
                windows = [s for k, i, s in written  # an empty range has none
                           if k == key and T0 + i * W < until and T0 + (i + 1) * W > since and since < until]
                if windows:
                    total = EdgeStats()
                    for s in windows:
                        total.merge(s)
                    expected.append({"client": key.client, "server": key.server, "protocol": key.protocol,
                                     "port": key.port, **total.to_json()})
            expected.sort(key=lambda e: (e["client"], e["server"], e["protocol"], e["port"]))
            assert store.edges(since, until) == expected
            assert store.graph(since, until)["edges"] == expected
            assert store.edges(since, until, errors_only=True) == [
                e for e in expected if e["errors"] or e["connections_failed"]]
            for service in ("a", "c"):
                assert store.edges(since, until, service=service) == [
                    e for e in expected if service in (e["client"], e["server"])]
                downstream = store.dependencies(service, 1, "downstream", since, until)["edges"]
                assert downstream == [e for e in expected if e["client"] == service]
        store.close()
