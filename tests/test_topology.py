"""The topology aggregator over synthetic events and a fake resolver."""

from __future__ import annotations

import attrs
import pytest

from deetune.events import ConnectionEvent, DataEvent, ExchangeEvent, ProcessEvent
from deetune.procnet import Owner, SocketEntry
from deetune.topology.aggregator import SocketOwners, TopologyAggregator, _enricher
from deetune.topology.model import EdgeKey, EdgeStats, EdgeWindowEvent, Instance, InstanceEvent

SEC = 1_000_000_000
T0 = 1_700_000_000 * SEC  # a multiple of 10 s: windows start here
HOST_IP = "10.0.0.1"


class FakeResolver:
    """The ServiceResolver API over fixed tables."""

    def __init__(self, services: dict[int, str], listeners: dict[tuple[str, int], str],
                 names: dict[str, str] | None = None):
        self.services = services
        #: (addr, port) of local listeners → service.
        self.listeners = listeners
        #: Mapping-file style names by address.
        self.names = names or {}
        self.cache: dict[int, Instance] = {}
        self.forgotten: list[int] = []

    def instance(self, pid: int, comm: str = "") -> Instance:
        if pid not in self.cache:
            service = self.services.get(pid, comm or f"pid-{pid}")
            self.cache[pid] = Instance(service=service, host="h", pid=pid, comm=comm)
        return self.cache[pid]

    def forget(self, pid: int) -> None:
        self.forgotten.append(pid)
        self.cache.pop(pid, None)

    def endpoint(self, addr: str, port: int) -> str:
        if (addr, port) in self.listeners:
            return self.listeners[(addr, port)]
        return self.names.get(addr) or (f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}")

    def is_local_listener(self, addr: str, port: int) -> bool:
        return (addr, port) in self.listeners


class Clock:
    def __init__(self, now: int = T0):
        self.now = now

    def __call__(self) -> int:
        return self.now


# pids: 10 frontend (client), 20 api (server on 8080, client of remote db), 30 cache (server on 6379)
SERVICES = {10: "frontend", 20: "api", 30: "cache"}
LISTENERS = {(HOST_IP, 8080): "api", ("127.0.0.1", 6379): "cache"}


def no_proc() -> SocketOwners:
    """Socket owners that never scan /proc (it would find this host's real sockets)."""
    return SocketOwners(read_sockets=lambda inodes: [], read_owners=lambda: {})


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + 1 * SEC)


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver(dict(SERVICES), LISTENERS, names={"203.0.113.9": "partner"})  # tests may rename


@pytest.fixture
def agg(resolver: FakeResolver, clock: Clock) -> TopologyAggregator:
    return TopologyAggregator(resolver, window_seconds=10, clock=clock, socket_owners=no_proc())


def exchange(pid: int, role: str, laddr: str, lport: int, raddr: str, rport: int, *, protocol: str = "http",
             sock_id: int = 1, error: bool = False, latency_ns: int | None = 1_000_000, req: int = 100,
             resp: int = 1000, comm: str = "") -> ExchangeEvent:
    return ExchangeEvent(
        T0, protocol=protocol, pid=pid, comm=comm or f"p{pid}", role=role, laddr=laddr, lport=lport, raddr=raddr,
        rport=rport, method="GET", target="/x", status=500 if error else 200, error=error, latency_ns=latency_ns,
        request_bytes=req, response_bytes=resp, sock_id=sock_id,
    )


def connection(phase: str, pid: int, role: str, laddr: str, lport: int, raddr: str, rport: int, *, sock_id: int = 1,
               sent: int | None = None, received: int | None = None, retransmits: int | None = None,
               reset: str | None = None, preexisting: bool = False, error: str | None = None,
               sampling: int = 1) -> ConnectionEvent:
    return ConnectionEvent(
        T0, phase=phase, role=role, pid=pid, comm=f"p{pid}", laddr=laddr, lport=lport, raddr=raddr, rport=rport,
        family=4, sock_id=sock_id, bytes_sent=sent, bytes_received=received, retransmits=retransmits, reset=reset,
        preexisting=preexisting, error=error, sampling=sampling,
    )


def run(agg: TopologyAggregator, events) -> list:
    out = []
    for event in events:
        out.extend(agg(event))
    return out


def windows(events) -> dict[EdgeKey, EdgeStats]:
    found: dict[EdgeKey, EdgeStats] = {}
    for e in events:
        if isinstance(e, EdgeWindowEvent):
            found.setdefault(e.key, EdgeStats()).merge(e.stats)
    return found


def stats(**counts) -> EdgeStats:
    latencies = counts.pop("latencies", [])
    result = EdgeStats(**counts)
    for latency in latencies:
        result.add_latency(latency)
    return result


# ---- edges and enrichment ---------------------------------------------------------------------


def test_client_side_exchanges_to_a_remote_server_make_one_edge(agg: TopologyAggregator) -> None:
    out = run(agg, [
        exchange(20, "client", HOST_IP, 50000, "10.9.9.9", 5432, protocol="mysql", latency_ns=2_000_000),
        exchange(20, "client", HOST_IP, 50000, "10.9.9.9", 5432, protocol="mysql", error=True, latency_ns=None),
    ])
    assert [(e.client_service, e.server_service) for e in out] == [("api", "10.9.9.9:5432")] * 2
    assert not [e for e in out if isinstance(e, EdgeWindowEvent)]  # the window is still open
    edges = windows(agg.flush())
    assert edges == {EdgeKey("api", "10.9.9.9:5432", "mysql", 5432): stats(
        requests=2, errors=1, latencies=[2_000_000], bytes_sent=200, bytes_received=2000)}


def test_enrichment_sets_the_two_service_fields_and_nothing_else(agg: TopologyAggregator) -> None:
    event = exchange(20, "client", HOST_IP, 50000, "10.9.9.9", 5432)
    before = attrs.asdict(event)
    [enriched] = agg(event)
    assert attrs.asdict(enriched) == {**before, "client_service": "api", "server_service": "10.9.9.9:5432"}
    assert enriched.to_json()["client_service"] == "api"
    conn = connection("open", 20, "client", HOST_IP, 50001, "10.9.9.9", 5432, sock_id=2)
    before = attrs.asdict(conn)
    [enriched] = agg(conn)
    assert attrs.asdict(enriched) == {**before, "client_service": "api", "server_service": "10.9.9.9:5432"}


def test_enricher_writes_in_place_and_events_stay_frozen_to_others() -> None:
    event = exchange(1, "client", "a", 1, "b", 2)
    before = attrs.asdict(event)
    same = _enricher(ExchangeEvent)(event, "c", "s")
    assert same is event
    assert attrs.asdict(event) == {**before, "client_service": "c", "server_service": "s"}
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        event.client_service = "x"  # type: ignore[misc]


def test_server_side_names_a_remote_client_by_address(agg: TopologyAggregator) -> None:
    out = run(agg, [
        exchange(20, "server", HOST_IP, 8080, "198.51.100.7", 41000, sock_id=1),
        exchange(20, "server", HOST_IP, 8080, "198.51.100.7", 41001, sock_id=2),  # another ephemeral port
        exchange(20, "server", HOST_IP, 8080, "203.0.113.9", 39000, sock_id=3),   # a mapped address
    ])
    assert [(e.client_service, e.server_service) for e in out] == [
        ("198.51.100.7", "api"), ("198.51.100.7", "api"), ("partner", "api")]
    edges = windows(agg.flush())
    assert set(edges) == {EdgeKey("198.51.100.7", "api", "http", 8080), EdgeKey("partner", "api", "http", 8080)}
    assert edges[EdgeKey("198.51.100.7", "api", "http", 8080)].requests == 2


def test_server_side_finds_the_local_client_process(agg: TopologyAggregator) -> None:
    """The client's connect event names the owner of the client socket, which the
    server side sees only as an (ephemeral) remote port."""
    out = run(agg, [
        connection("open", 10, "client", HOST_IP, 45000, HOST_IP, 8080, sock_id=1),
        connection("open", 20, "server", HOST_IP, 8080, HOST_IP, 45000, sock_id=2),
        exchange(10, "client", HOST_IP, 45000, HOST_IP, 8080, sock_id=1),
        exchange(20, "server", HOST_IP, 8080, HOST_IP, 45000, sock_id=2),
    ])
    assert {(e.client_service, e.server_service) for e in out} == {("frontend", "api")}
    window = agg.flush()
    [edge] = [e for e in window if isinstance(e, EdgeWindowEvent)]
    assert edge.key == EdgeKey("frontend", "api", "http", 8080)
    assert (edge.client_instances, edge.server_instances) == (("h:10",), ("h:20",))


def test_local_client_found_in_proc_when_its_events_were_missed(resolver: FakeResolver, clock: Clock) -> None:
    reads = []

    def read_sockets(inodes):
        reads.append(sorted(inodes))
        return [SocketEntry(4, "127.0.0.1", 46000, "127.0.0.1", 6379, 1, 777)]

    owners = SocketOwners(read_sockets=read_sockets, read_owners=lambda: {777: Owner(10, "frontend")})
    agg = TopologyAggregator(resolver, clock=clock, socket_owners=owners)
    [out] = agg(exchange(30, "server", "127.0.0.1", 6379, "127.0.0.1", 46000, protocol="redis"))
    assert (out.client_service, out.server_service) == ("frontend", "cache")
    # Found once: the next lookups hit the table, no new scan.
    agg(exchange(30, "server", "127.0.0.1", 6379, "127.0.0.1", 46000, protocol="redis"))
    assert reads == [[777]]


def test_proc_scans_are_rate_limited_and_unfound_local_clients_get_their_address(
        resolver: FakeResolver, clock: Clock) -> None:
    now = [0.0]
    owners = SocketOwners(read_sockets=lambda inodes: [], read_owners=lambda: {}, clock=lambda: now[0], min_interval=1.0)
    agg = TopologyAggregator(resolver, clock=clock, socket_owners=owners)
    for port in range(46000, 46010):
        [out] = agg(exchange(30, "server", "127.0.0.1", 6379, "127.0.0.1", port, sock_id=port, protocol="redis"))
        assert out.client_service == "127.0.0.1"
    assert owners.scans == 1
    # A second later, the next connection's exchange may scan again; the client learned
    # meanwhile (its own exchange) is found without one.
    now[0] = 1.5
    agg(exchange(10, "client", "127.0.0.1", 46000, "127.0.0.1", 6379, sock_id=99, protocol="redis"))
    [out] = agg(exchange(30, "server", "127.0.0.1", 6379, "127.0.0.1", 46000, sock_id=46000, protocol="redis"))
    assert out.client_service == "frontend"
    assert owners.scans == 1


# ---- counting once ----------------------------------------------------------------------------


def local_pair(client_sock: int = 1, server_sock: int = 2, port: int = 45000, **kwargs):
    """One exchange reported by both ends (frontend → api, both on this host)."""
    return [
        exchange(10, "client", HOST_IP, port, HOST_IP, 8080, sock_id=client_sock, latency_ns=3_000_000, **kwargs),
        exchange(20, "server", HOST_IP, 8080, HOST_IP, port, sock_id=server_sock, latency_ns=2_000_000, **kwargs),
    ]


def test_a_local_exchange_seen_by_both_ends_counts_once_from_the_server(agg: TopologyAggregator) -> None:
    events = [connection("open", 10, "client", HOST_IP, 45000, HOST_IP, 8080, sock_id=1),
              connection("open", 20, "server", HOST_IP, 8080, HOST_IP, 45000, sock_id=2)]
    for _ in range(3):
        events += local_pair()
    events += [
        connection("close", 10, "client", HOST_IP, 45000, HOST_IP, 8080, sock_id=1, sent=500, received=4000,
                   retransmits=1),
        connection("close", 20, "server", HOST_IP, 8080, HOST_IP, 45000, sock_id=2, sent=4000, received=500,
                   retransmits=2, reset="sent"),
    ]
    out = run(agg, events)
    assert len(out) == len(events)
    edges = windows(agg.flush())
    # The server's latencies (2 ms), its view of the bytes: 3 × 100 in exchanges + 200 more at close.
    assert edges == {EdgeKey("frontend", "api", "http", 8080): stats(
        requests=3, latencies=[2_000_000] * 3, bytes_sent=500, bytes_received=4000,
        connections_opened=1, retransmits=2, resets=1)}
    assert agg.stats.duplicates == 3 + 2  # the client's exchanges, open and close


def test_order_of_the_two_sides_does_not_matter(agg: TopologyAggregator) -> None:
    """The server usually reports an exchange first (it writes the response before
    the client reads it); the client's connect event came before both."""
    events = []
    for i in range(4):
        client, server = local_pair(client_sock=100 + i, server_sock=200 + i, port=45000 + i)
        events += [connection("open", 10, "client", HOST_IP, 45000 + i, HOST_IP, 8080, sock_id=100 + i),
                   server, client]
    run(agg, events)
    [(key, counted)] = windows(agg.flush()).items()
    assert key == EdgeKey("frontend", "api", "http", 8080) and counted.requests == 4


def test_local_client_unknown_until_its_own_events_name_it(agg: TopologyAggregator) -> None:
    """Without a connect event and without the socket in /proc, the first server-side
    exchange names the client by address; the client's own exchange teaches its owner."""
    client, server = local_pair()
    # Two events of the same exchange (the aggregator fills an event's services in place).
    out = run(agg, [server, client, attrs.evolve(server)])
    assert [e.client_service for e in out] == [HOST_IP, "frontend", "frontend"]
    edges = windows(agg.flush())
    assert {k.client: s.requests for k, s in edges.items()} == {HOST_IP: 1, "frontend": 1}


def test_client_side_counts_when_the_server_is_not_local(agg: TopologyAggregator) -> None:
    run(agg, [
        connection("open", 20, "client", HOST_IP, 50000, "10.9.9.9", 5432, sock_id=5),
        exchange(20, "client", HOST_IP, 50000, "10.9.9.9", 5432, sock_id=5, protocol="mysql", req=40, resp=400),
        connection("close", 20, "client", HOST_IP, 50000, "10.9.9.9", 5432, sock_id=5, sent=100, received=1000,
                   retransmits=3),
    ])
    assert windows(agg.flush()) == {EdgeKey("api", "10.9.9.9:5432", "mysql", 5432): stats(
        requests=1, latencies=[1_000_000], bytes_sent=100, bytes_received=1000,
        connections_opened=1, retransmits=3)}


# ---- connections and protocols ------------------------------------------------------------------


def test_undecoded_connections_make_a_tcp_edge(agg: TopologyAggregator) -> None:
    run(agg, [
        connection("open", 20, "client", HOST_IP, 50000, "10.9.9.9", 22, sock_id=5),
        connection("close", 20, "client", HOST_IP, 50000, "10.9.9.9", 22, sock_id=5, sent=10, received=20,
                   reset="received"),
        connection("open", 20, "client", HOST_IP, 50001, "10.9.9.9", 22, sock_id=6),  # still open at the end
    ])
    assert windows(agg.flush()) == {EdgeKey("api", "10.9.9.9:22", "tcp", 22): stats(
        bytes_sent=10, bytes_received=20, connections_opened=2, resets=1)}


def test_a_sampled_connection_counts_for_the_connections_it_stands_for(agg: TopologyAggregator) -> None:
    # Under the tcp probe's overload sampling 1 connection in 8 is reported, with sampling=8;
    # the exchange decoded on it (the payload probe samples on its own) counts once.
    run(agg, [
        connection("open", 20, "client", HOST_IP, 50000, "10.9.9.9", 22, sock_id=5, sampling=8),
        connection("close", 20, "client", HOST_IP, 50000, "10.9.9.9", 22, sock_id=5, sent=10, received=20,
                   retransmits=1, reset="received", sampling=8),
        connection("open", 20, "client", HOST_IP, 50001, "10.9.9.9", 6379, sock_id=6, sampling=4),
        exchange(20, "client", HOST_IP, 50001, "10.9.9.9", 6379, sock_id=6, protocol="redis", req=3, resp=5),
        connection("close", 20, "client", HOST_IP, 50001, "10.9.9.9", 6379, sock_id=6, sent=13, received=25,
                   sampling=4),
        connection("failed", 20, "client", HOST_IP, 50002, "10.9.9.9", 23, sock_id=7, error="refused"),
    ])
    assert windows(agg.flush()) == {
        EdgeKey("api", "10.9.9.9:22", "tcp", 22): stats(
            bytes_sent=80, bytes_received=160, connections_opened=8, retransmits=8, resets=8),
        EdgeKey("api", "10.9.9.9:6379", "redis", 6379): stats(
            requests=1, latencies=[1_000_000], bytes_sent=3 + 4 * 10, bytes_received=5 + 4 * 20, connections_opened=4),
        EdgeKey("api", "10.9.9.9:23", "tcp", 23): stats(connections_failed=1),
    }


def test_connections_count_on_the_edge_of_the_protocol_they_carry(agg: TopologyAggregator, clock: Clock) -> None:
    run(agg, [
        connection("open", 20, "server", HOST_IP, 8080, "198.51.100.7", 41000, sock_id=1),
        exchange(20, "server", HOST_IP, 8080, "198.51.100.7", 41000, sock_id=1),
        # A later connection without any exchange (a health check) from the same client.
        connection("open", 20, "server", HOST_IP, 8080, "198.51.100.7", 41001, sock_id=2),
        connection("close", 20, "server", HOST_IP, 8080, "198.51.100.7", 41001, sock_id=2, sent=0, received=0),
    ])
    assert windows(agg.flush()) == {EdgeKey("198.51.100.7", "api", "http", 8080): stats(
        requests=1, latencies=[1_000_000], bytes_sent=100, bytes_received=1000,
        connections_opened=2)}


def test_an_open_waits_for_its_protocol_until_the_window_ends(agg: TopologyAggregator, clock: Clock) -> None:
    run(agg, [connection("open", 20, "client", HOST_IP, 50000, "10.9.9.9", 6379, sock_id=5)])
    clock.now = T0 + 10 * SEC  # next window: the open counts in the first one, as tcp
    out = run(agg, [exchange(20, "client", HOST_IP, 50000, "10.9.9.9", 6379, sock_id=5, protocol="redis")])
    assert windows(out) == {EdgeKey("api", "10.9.9.9:6379", "tcp", 6379): stats(connections_opened=1)}
    assert windows(agg.flush()) == {EdgeKey("api", "10.9.9.9:6379", "redis", 6379): stats(
        requests=1, latencies=[1_000_000], bytes_sent=100, bytes_received=1000)}


def test_closed_connections_are_not_held_until_the_window_ends(agg: TopologyAggregator) -> None:
    """A window of short connections (10,000/s for 10 s) kept every one of them while its
    open waited for a protocol: 20 MB of agent memory.  An open counted at its close or
    first exchange lets go of its socket."""
    for port in range(40000, 41000):
        run(agg, [
            connection("open", 20, "client", HOST_IP, port, "10.9.9.9", 22, sock_id=port),
            connection("close", 20, "client", HOST_IP, port, "10.9.9.9", 22, sock_id=port, sent=1, received=2),
        ])
    run(agg, [
        connection("open", 20, "client", HOST_IP, 41000, "10.9.9.9", 22, sock_id=41000),
        exchange(20, "client", HOST_IP, 41000, "10.9.9.9", 22, sock_id=41000, protocol="redis"),
        # Still waiting at the end: counts on the protocol its edge has shown by then.
        connection("open", 20, "client", HOST_IP, 41001, "10.9.9.9", 22, sock_id=41001),
    ])
    assert list(agg._pending.values()) == [agg._socks[41001]]
    assert windows(agg.flush()) == {
        EdgeKey("api", "10.9.9.9:22", "tcp", 22): stats(bytes_sent=1000, bytes_received=2000, connections_opened=1000),
        EdgeKey("api", "10.9.9.9:22", "redis", 22): stats(
            requests=1, latencies=[1_000_000], bytes_sent=100, bytes_received=1000, connections_opened=2),
    }


def test_failed_connections(agg: TopologyAggregator) -> None:
    out = run(agg, [
        connection("failed", 10, "client", HOST_IP, 45000, "10.9.9.9", 9000, sock_id=1, error="refused"),
        connection("failed", 10, "client", HOST_IP, 45001, "10.9.9.9", 9000, sock_id=2, error="timeout"),
        # To a local port nobody listens on: counted too (there is no server side).
        connection("failed", 10, "client", "127.0.0.1", 45002, "127.0.0.1", 9999, sock_id=3, error="refused"),
    ])
    assert [(e.client_service, e.server_service) for e in out] == [
        ("frontend", "10.9.9.9:9000"), ("frontend", "10.9.9.9:9000"), ("frontend", "127.0.0.1:9999")]
    assert windows(agg.flush()) == {
        EdgeKey("frontend", "10.9.9.9:9000", "tcp", 9000): stats(connections_failed=2),
        EdgeKey("frontend", "127.0.0.1:9999", "tcp", 9999): stats(connections_failed=1),
    }


def test_failed_connections_to_a_known_http_server_count_on_its_http_edge(agg: TopologyAggregator) -> None:
    run(agg, [
        exchange(10, "client", HOST_IP, 45000, "10.9.9.9", 80, sock_id=1),
        connection("failed", 10, "client", HOST_IP, 45001, "10.9.9.9", 80, sock_id=2, error="refused"),
    ])
    [(key, counted)] = windows(agg.flush()).items()
    assert key.protocol == "http" and (counted.requests, counted.connections_failed) == (1, 1)


def test_preexisting_connection_close_adds_only_its_reset(agg: TopologyAggregator) -> None:
    run(agg, [
        exchange(20, "client", HOST_IP, 50000, "10.9.9.9", 5432, sock_id=5, protocol="mysql", req=10, resp=20),
        connection("close", 20, "client", HOST_IP, 50000, "10.9.9.9", 5432, sock_id=5, sent=10**9, received=10**9,
                   retransmits=50, reset="received", preexisting=True),
    ])
    [(key, counted)] = windows(agg.flush()).items()
    assert (counted.bytes_sent, counted.bytes_received, counted.retransmits, counted.resets) == (10, 20, 0, 1)
    assert counted.connections_opened == 0


def test_unknown_role_is_inferred_from_the_listeners(agg: TopologyAggregator) -> None:
    out = run(agg, [
        connection("close", 30, "unknown", "127.0.0.1", 6379, "198.51.100.7", 33000, sock_id=1, sent=5, received=6),
        connection("close", 20, "unknown", HOST_IP, 50000, "10.9.9.9", 5432, sock_id=2, sent=7, received=8),
    ])
    assert [(e.client_service, e.server_service) for e in out] == [("198.51.100.7", "cache"), ("api", "10.9.9.9:5432")]
    edges = windows(agg.flush())
    assert edges[EdgeKey("198.51.100.7", "cache", "tcp", 6379)] == stats(bytes_sent=6, bytes_received=5)
    assert edges[EdgeKey("api", "10.9.9.9:5432", "tcp", 5432)] == stats(bytes_sent=7, bytes_received=8)


# ---- windows ----------------------------------------------------------------------------------


def test_windows_close_on_the_wall_clock(agg: TopologyAggregator, clock: Clock) -> None:
    first = run(agg, [exchange(20, "client", HOST_IP, 50000, "10.9.9.9", 5432, sock_id=5)])
    clock.now = T0 + 9 * SEC + 999_999_999
    assert len(run(agg, [exchange(20, "client", HOST_IP, 50000, "10.9.9.9", 5432, sock_id=5)])) == 1
    clock.now = T0 + 25 * SEC  # skips a window: the closed one comes out, then the new event
    out = run(agg, [exchange(20, "client", HOST_IP, 50000, "10.9.9.9", 5432, sock_id=5)])
    assert len(first) == 1
    instance, edge, enriched = out
    assert isinstance(instance, InstanceEvent) and instance.instance.id == "h:20" and instance.ts == T0 + SEC
    assert isinstance(edge, EdgeWindowEvent)
    assert (edge.window_start, edge.window_ns, edge.ts, edge.stats.requests) == (T0, 10 * SEC, T0 + 10 * SEC, 2)
    assert isinstance(enriched, ExchangeEvent)
    clock.now = T0 + 27 * SEC
    [instance, partial] = agg.flush()
    assert (partial.window_start, partial.ts, partial.stats.requests) == (T0 + 20 * SEC, T0 + 27 * SEC, 1)
    assert instance.ts == T0 + 25 * SEC  # first seen in that window


def test_each_window_reports_the_instances_seen_in_it(agg: TopologyAggregator, clock: Clock) -> None:
    run(agg, [connection("open", 10, "client", HOST_IP, 45000, HOST_IP, 8080, sock_id=1),
              *local_pair()])
    clock.now = T0 + 11 * SEC
    out = run(agg, [exchange(20, "client", HOST_IP, 50000, "10.9.9.9", 5432, sock_id=7)])
    assert sorted(e.instance.id for e in out if isinstance(e, InstanceEvent)) == ["h:10", "h:20"]
    assert [e.instance.id for e in agg.flush() if isinstance(e, InstanceEvent)] == ["h:20"]


def test_nothing_to_flush_before_any_event(agg: TopologyAggregator) -> None:
    assert agg.flush() == []


def test_exec_and_exit_forget_the_pid_and_other_events_pass(agg: TopologyAggregator, resolver: FakeResolver) -> None:
    events = [ProcessEvent(T0, phase=p, pid=10, ppid=1, comm="x") for p in ("fork", "exec", "exit")]
    data = DataEvent(T0, pid=1, tid=1, comm="x", fd=3, sock_id=1, direction="egress", syscall="write", size=1,
                     data=b"x", start_mono_ns=0, laddr="a", lport=1, raddr="b", rport=2, family=4)
    assert run(agg, [*events, data]) == [*events, data]
    assert resolver.forgotten == [10, 10]


def test_exec_gives_the_connection_the_new_service(agg: TopologyAggregator, resolver: FakeResolver) -> None:
    [first] = agg(exchange(20, "client", HOST_IP, 50000, "10.9.9.9", 5432, sock_id=5))
    resolver.services[20] = "api-v2"
    agg(ProcessEvent(T0, phase="exec", pid=20, ppid=1, comm="x"))
    [second] = agg(exchange(20, "client", HOST_IP, 50000, "10.9.9.9", 5432, sock_id=5))
    assert (first.client_service, second.client_service) == ("api", "api-v2")


def test_socket_table_is_bounded(resolver: FakeResolver, clock: Clock) -> None:
    agg = TopologyAggregator(resolver, clock=clock, socket_owners=no_proc())
    agg.max_sockets = 10
    run(agg, [connection("open", 20, "client", HOST_IP, 50000 + i, "10.9.9.9", 22, sock_id=i) for i in range(25)])
    assert len(agg._socks) == 10 and agg.stats.evicted == 15
    # Evicted opens still count, in their window.
    [(key, counted)] = windows(agg.flush()).items()
    assert counted.connections_opened == 25


def test_a_proc_scan_replaces_what_the_last_one_found() -> None:
    """Sockets learned from a scan are never forgotten at their close (only client closes
    are), so each scan replaces the last: under load they filled the table."""
    now = [0.0]
    scans = [
        [SocketEntry(4, "127.0.0.1", 8080, "127.0.0.1", 40001, 1, 11)],
        [SocketEntry(4, "127.0.0.1", 8080, "127.0.0.1", 40002, 1, 12)],
    ]
    owners = SocketOwners(read_sockets=lambda inodes: scans.pop(0), read_owners=lambda: {11: Owner(5, "a"), 12: Owner(6, "b")},
                          clock=lambda: now[0])
    owners.learn(("127.0.0.1", 50000, "127.0.0.1", 8080), 7, "client")  # from an event: kept
    assert owners.owner(("127.0.0.1", 8080, "127.0.0.1", 40001)) == (5, "a")
    now[0] = 2.0
    assert owners.owner(("127.0.0.1", 8080, "127.0.0.1", 40002)) == (6, "b")
    assert owners.known(("127.0.0.1", 8080, "127.0.0.1", 40001)) is None
    assert owners.known(("127.0.0.1", 50000, "127.0.0.1", 8080)) == (7, "client")
    assert owners.scans == 2


def test_opens_waiting_for_a_protocol_are_bounded(agg: TopologyAggregator) -> None:
    agg.max_pending = 100
    for port in range(40000, 40250):  # opens whose close never comes (lost under overload)
        run(agg, [connection("open", 20, "client", HOST_IP, port, "10.9.9.9", 22, sock_id=port)])
    assert len(agg._pending) == 100
    assert windows(agg.flush()) == {EdgeKey("api", "10.9.9.9:22", "tcp", 22): stats(connections_opened=250)}


def test_fruitless_proc_scans_back_off() -> None:
    now = [0.0]
    found = SocketEntry(4, "127.0.0.1", 8080, "127.0.0.1", 40001, 1, 11)
    listing = [[], [], [found], []]
    owners = SocketOwners(read_sockets=lambda inodes: listing.pop(0), read_owners=lambda: {11: Owner(5, "a")},
                          clock=lambda: now[0], max_interval=4.0)
    key = ("127.0.0.1", 8080, "127.0.0.1", 40001)
    scans = []
    for t in (0.0, 1.5, 2.0, 3.9, 6.0, 6.5):
        now[0] = t
        owners.known(key) or owners.owner(key)
        scans.append(owners.scans)
    # miss at 0 (next in 2 s), miss at 2 (next in 4 s, the cap), found at 6: 1 s again
    assert scans == [1, 1, 2, 2, 3, 3]
    now[0] = 7.0
    assert owners.owner(("127.0.0.1", 8080, "127.0.0.1", 40009)) is None and owners.scans == 4
