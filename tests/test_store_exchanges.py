"""The topology store's exchanges: the bound per edge and window, and pairing both ends' copies."""

from __future__ import annotations

import collections
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deetune.events import ExchangeEvent
from deetune.topology.store import StoreSink, TopologyStore, _ExchangePairs

SEC = 1_000_000_000
T0 = 1_700_000_000 * SEC  # a multiple of 10 s: windows start here


from tests.test_store import Clock, path  # noqa: E402,F401 - the same clock and database fixture


def exchange(ts: int, client: str = "web", server: str = "api", *, role: str = "server", port: int = 8080,
             error: bool = False, target: str = "/", protocol: str = "http", peer_port: int = 40000) -> ExchangeEvent:
    """One side's report; ``port`` is the server's port whichever side reports."""
    if role == "server":
        ends = {"laddr": "10.0.0.2", "lport": port, "raddr": "10.0.0.1", "rport": peer_port}
    else:
        ends = {"laddr": "10.0.0.1", "lport": peer_port, "raddr": "10.0.0.2", "rport": port}
    return ExchangeEvent(ts, protocol=protocol, pid=1, comm="x", role=role, method="GET", target=target,
                         status=500 if error else 200, error=error, latency_ns=1000, request_bytes=10,
                         response_bytes=20, client_service=client, server_service=server, **ends)


def stored(store: TopologyStore, **filters) -> list[tuple[int, str]]:
    """(ts, target) of the stored exchanges, oldest first."""
    return sorted((x["ts"], x["target"]) for x in store.exchanges(limit=10**6, **filters))


# ---- the bound per edge and window ------------------------------------------------------------------


def test_the_most_recent_exchanges_of_an_edge_and_window_are_kept_and_every_error(path) -> None:
    store = TopologyStore(path, clock=Clock(T0), exchange_hold_seconds=0)
    assert (store.max_exchanges_per_edge_window, store.exchange_window_ns) == (100, 10 * SEC)  # the defaults
    events = [exchange(T0 + i, target=f"/{i}", error=i % 50 == 7) for i in range(250)]
    store.write(events[:160])
    store.write(events[160:])
    errors = [(T0 + i, f"/{i}") for i in range(250) if i % 50 == 7]
    assert len(errors) == 5
    recent = [(T0 + i, f"/{i}") for i in range(250) if i % 50 != 7][-100:]
    assert recent[0] == (T0 + 148, "/148")  # 148…249 but 157 and 207
    assert stored(store) == sorted(set(errors) | set(recent))
    assert (store.stats.exchanges, store.stats.exchanges_not_kept) == (105, 145)
    assert store.exchange_counts() == {"stored": 105, "not_kept": 145}
    store.close()
    reopened = TopologyStore(path)  # the count of those not kept is in the database
    assert reopened.exchange_counts() == {"stored": 105, "not_kept": 145}
    reopened.close()


def test_rows_stored_by_earlier_batches_are_replaced(path) -> None:
    store = TopologyStore(path, clock=Clock(T0), exchange_hold_seconds=0, max_exchanges_per_edge_window=100)
    store.write([exchange(T0 + i, target=f"/{i}") for i in range(80)])
    assert len(stored(store)) == 80 and store.stats.exchanges_not_kept == 0
    store.write([exchange(T0 + 80 + i, target=f"/{80 + i}") for i in range(80)])
    assert stored(store) == [(T0 + i, f"/{i}") for i in range(60, 160)]
    assert (store.stats.exchanges, store.stats.exchanges_not_kept) == (100, 60)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'exchanges_not_kept'").fetchone() == ("60",)
    conn.close()
    store.close()


def test_each_edge_and_window_has_its_own_bound(path) -> None:
    store = TopologyStore(path, clock=Clock(T0), exchange_hold_seconds=0, max_exchanges_per_edge_window=2,
                          exchange_window_seconds=1)
    batch = []
    for n, (client, server, protocol, port) in enumerate([
            ("web", "api", "http", 8080), ("cron", "api", "http", 8080), ("web", "db", "http", 8080),
            ("web", "api", "redis", 8080), ("web", "api", "http", 9090)]):
        for i in range(5):  # 5 exchanges in window 0 and 5 in window 1 of each edge
            for second in (0, 1):
                batch.append(exchange(T0 + second * SEC + i, client, server, protocol=protocol, port=port,
                                      target=f"/{n}/{second}/{i}"))
    store.write(batch)
    kept = collections.Counter((x["client"], x["server"], x["protocol"], x["lport"], x["ts"] // SEC)
                               for x in store.exchanges(limit=1000))
    assert len(kept) == 10 and set(kept.values()) == {2}
    assert {x["target"][-2:] for x in store.exchanges(limit=1000)} == {"/3", "/4"}  # the most recent two
    assert (store.stats.exchanges, store.stats.exchanges_not_kept) == (20, 30)
    store.close()


def test_the_port_of_an_edge_is_the_servers_whichever_side_reports(path) -> None:
    store = TopologyStore(path, clock=Clock(T0), exchange_hold_seconds=0, max_exchanges_per_edge_window=1)
    # The server is remote: only the client's copies, its server port is rport.
    store.write([exchange(T0 + i, "web", "ext:443", role="client", port=443, peer_port=40000 + i)
                 for i in range(3)])
    store.write([exchange(T0 + 10 + i, "web", "ext:443", role="client", port=8443, peer_port=40000 + i)
                 for i in range(3)])
    assert [(x["ts"], x["rport"]) for x in store.exchanges()] == [(T0 + 12, 8443), (T0 + 2, 443)]
    assert store.stats.exchanges_not_kept == 4
    store.close()


def test_held_client_copies_count_when_they_are_released(path) -> None:
    clock = Clock(T0)
    store = TopologyStore(path, clock=clock, exchange_hold_seconds=2, max_exchanges_per_edge_window=2)
    store.write([exchange(T0 + i, "web", "ext:443", role="client", port=443, peer_port=40000 + i) for i in range(5)])
    assert store.exchanges() == [] and store.stats.exchanges_not_kept == 0  # held
    clock.now += 3 * SEC
    store.write([])
    assert [x["ts"] for x in store.exchanges()] == [T0 + 4, T0 + 3]
    assert store.stats.exchanges_not_kept == 3
    store.close()


def test_none_keeps_everything_and_zero_only_the_errors(path, tmp_path) -> None:
    unbounded = TopologyStore(path, clock=Clock(T0), exchange_hold_seconds=0, max_exchanges_per_edge_window=None)
    unbounded.write([exchange(T0 + i, target=f"/{i}") for i in range(300)])
    assert len(stored(unbounded)) == 300 and unbounded.exchange_counts() == {"stored": 300, "not_kept": 0}
    unbounded.close()
    errors_only = TopologyStore(tmp_path / "zero.db", clock=Clock(T0), exchange_hold_seconds=0,
                                max_exchanges_per_edge_window=0)
    errors_only.write([exchange(T0 + i, target=f"/{i}", error=i % 3 == 0) for i in range(30)])
    assert stored(errors_only) == [(T0 + i, f"/{i}") for i in range(0, 30, 3)]
    assert errors_only.exchange_counts() == {"stored": 10, "not_kept": 20}
    errors_only.close()


def test_older_windows_are_forgotten(path) -> None:
    clock = Clock(T0 + 5 * SEC)
    store = TopologyStore(path, clock=clock, exchange_hold_seconds=0, max_exchanges_per_edge_window=1,
                          exchange_window_seconds=1)
    store.write([exchange(T0 + w * SEC + i, target=f"/{w}/{i}") for w in range(5) for i in range(2)])
    assert [x["target"] for x in store.exchanges()] == ["/4/1", "/3/1", "/2/1", "/1/1", "/0/1"]
    assert sorted(k[4] for k in store._kept) == [T0 // SEC + 3, T0 // SEC + 4]  # the newest two windows only
    # A time ahead of the clock (a wrong one) does not make the current windows old.
    store.write([exchange(T0 + 3600 * SEC, target="/future")])
    store.write([exchange(T0 + 4 * SEC + 5, target="/4/5")])
    assert sorted(k[4] for k in store._kept) == [T0 // SEC + 3, T0 // SEC + 4, T0 // SEC + 3600]
    assert "/4/1" not in [x["target"] for x in store.exchanges()] and store.stats.exchanges_not_kept == 6
    store.close()


def test_the_bound_is_configurable_on_the_store_and_the_sink(path, tmp_path) -> None:
    for bad in (-1, 1.5, "10"):
        with pytest.raises(ValueError, match="exchanges per edge and window"):
            TopologyStore(tmp_path / "bad.db", max_exchanges_per_edge_window=bad)
    with pytest.raises(ValueError, match="exchange window"):
        TopologyStore(tmp_path / "bad.db", exchange_window_seconds=0)

    sink = StoreSink(path, max_exchanges_per_edge_window=3)
    assert (sink.store.max_exchanges_per_edge_window, sink.store.exchange_window_ns) == (3, 10 * SEC)
    for i in range(10):
        sink.handle(exchange(T0 + i, target=f"/{i}"))
    sink.close()
    reopened = TopologyStore(path)
    assert [x["target"] for x in reopened.exchanges()] == ["/9", "/8", "/7"]
    assert reopened.exchange_counts() == {"stored": 3, "not_kept": 7}
    reopened.close()

    # A store given to the sink keeps its settings unless the sink is told otherwise.
    for options, expected in [({}, (100, 10 * SEC)), ({"exchange_window_seconds": 1}, (100, SEC)),
                              ({"max_exchanges_per_edge_window": None}, (None, 10 * SEC)),
                              ({"max_exchanges_per_edge_window": 5, "exchange_window_seconds": 0.5}, (5, SEC // 2))]:
        store = TopologyStore(tmp_path / "given.db")
        sink = StoreSink(store, interval=60, **options)
        assert (store.max_exchanges_per_edge_window, store.exchange_window_ns) == expected
        sink.close()


def test_the_sink_bounds_a_flood_on_one_edge_before_queueing_it(path) -> None:
    """A client pipelining requests nobody answers (bench/soak.py: 10,000 exchanges a second on one
    edge): the sink keeps the most recent of each edge, side and window waiting, lets the older go
    (counted as not kept), and drops nothing: the queue stays free for the other edges' exchanges,
    the errors and the windows."""
    sink = StoreSink(TopologyStore(path, clock=Clock(T0), exchange_hold_seconds=0), max_queue=1_000, interval=60)
    flood = [exchange(T0 + i, "flood", "api", target=f"/{i}", error=i % 4_000 == 1) for i in range(20_000)]
    quiet = [exchange(T0 + i, "web", "api", target=f"/web/{i}") for i in range(10)]
    for i, event in enumerate(flood):
        sink.handle(event)
        if i % 2_000 == 0:
            sink.handle(quiet[i // 2_000])
    health = sink.health()
    assert sink.stats.dropped == 0 and health["status"] == "ok"
    assert health["store"]["pending_events"] == 100 + 10 + 5  # the flood's 100 most recent, web's 10, 5 errors
    assert sink.stats.not_kept == 20_000 - 5 - 100
    sink.close()
    reopened = TopologyStore(path)
    errors = [(T0 + i, f"/{i}") for i in range(1, 20_000, 4_000)]
    recent = [(T0 + i, f"/{i}") for i in range(20_000) if i % 4_000 != 1][-100:]
    assert stored(reopened, service="flood") == sorted(errors + recent)
    assert stored(reopened, service="web") == [(T0 + i, f"/web/{i}") for i in range(10)]
    assert reopened.exchange_counts() == {"stored": 115, "not_kept": 20_000 - 5 - 100}
    reopened.close()


def test_the_sink_bounds_each_side_and_the_store_pairs_what_is_left(path) -> None:
    sink = StoreSink(TopologyStore(path, clock=Clock(T0)), max_exchanges_per_edge_window=10, interval=60)
    for i in range(50):
        sink.handle(exchange(T0 + i, target=f"/{i}", peer_port=40000 + i))
        sink.handle(exchange(T0 + i, target=f"/{i}", role="client", peer_port=40000 + i))
    assert sink.stats.not_kept == 2 * 40 and sink.health()["store"]["pending_events"] == 2 * 10
    sink.close()
    assert sink.store.stats.duplicate_exchanges == 10  # the client copies of the 10 server copies kept
    reopened = TopologyStore(path)
    assert stored(reopened) == [(T0 + i, f"/{i}") for i in range(40, 50)]
    assert reopened.exchange_counts() == {"stored": 10, "not_kept": 80}
    reopened.close()


# ---- pairing both ends' copies ------------------------------------------------------------------------


class ReferencePairs:
    """The pairing as first written (a deque per key, a list per copy): the model the compact
    one must follow exactly."""

    def __init__(self, hold_ns: int):
        self.hold_ns = hold_ns
        self._clients: dict[tuple, collections.deque[list]] = {}
        self._servers: dict[tuple, collections.deque[list]] = {}
        self._order: collections.deque[list] = collections.deque()
        self.duplicates = 0

    @staticmethod
    def _key(e: ExchangeEvent) -> tuple | None:
        if e.role == "client":
            return e.laddr, e.lport, e.raddr, e.rport, e.method, e.target
        if e.role == "server":
            return e.raddr, e.rport, e.laddr, e.lport, e.method, e.target
        return None

    def add(self, event: ExchangeEvent, now: int) -> bool:
        key = self._key(event)
        if key is None:
            return True
        mine, theirs = (self._clients, self._servers) if event.role == "client" else (self._servers, self._clients)
        waiting = theirs.get(key)
        if waiting:
            other = waiting.popleft()
            other[1] = None
            if not waiting:
                del theirs[key]
            self.duplicates += 1
            return event.role == "server"
        entry = [now, event, key]
        mine.setdefault(key, collections.deque()).append(entry)
        self._order.append(entry)
        return event.role == "server"

    def release(self, now: int | None = None) -> list[ExchangeEvent]:
        ready = []
        order = self._order
        while order and (now is None or order[0][0] <= now - self.hold_ns):
            entry = order.popleft()
            _arrival, event, key = entry
            if event is None:
                continue
            table = self._clients if event.role == "client" else self._servers
            waiting = table.get(key)
            if waiting and waiting[0] is entry:
                waiting.popleft()
                if not waiting:
                    del table[key]
            if event.role == "client":
                ready.append(event)
        return ready


steps = st.lists(st.one_of(
    # a batch of copies: (role, connection, target) each, a few keys only so that they collide
    st.lists(st.tuples(st.sampled_from(["client", "server", "other"]), st.integers(0, 2), st.sampled_from("ab")),
             max_size=8).map(lambda batch: ("add", batch)),
    st.integers(0, 3 * SEC).map(lambda advance: ("release", advance)),
    st.just(("final", 0)),
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_pairing_is_the_reference_pairing(script) -> None:
    pairs, reference = _ExchangePairs(2 * SEC), ReferencePairs(2 * SEC)
    now = T0
    for action, arg in script:
        if action == "add":
            events = []
            for role, connection, target in arg:  # "other": neither side, kept as it is
                events.append(exchange(now, role=role, peer_port=40000 + connection, target=target))
            assert pairs.add_all(events, now) == [e for e in events if reference.add(e, now)]
            now += SEC // 2
        else:
            now += arg
            when = None if action == "final" else now
            assert pairs.release(when) == reference.release(when)
        assert pairs.duplicates == reference.duplicates
        assert pairs.holding == bool(reference._order)

