"""With the kernel counting HTTP, Redis, MySQL and PostgreSQL, the topology still counts the other protocols'
requests from their decoded exchanges (the kernel does not classify them)."""

from __future__ import annotations

from deetune.events import ExchangeEvent
from deetune.services import ServiceResolver
from deetune.topology.aggregator import TopologyAggregator
from deetune.topology.model import EdgeWindowEvent


def exchange(protocol: str, error: bool, sock_id: int) -> ExchangeEvent:
    return ExchangeEvent(
        ts=1, protocol=protocol, pid=1, comm="app", role="client", laddr="10.0.0.1", lport=40000 + sock_id,
        raddr="203.0.113.5", rport=11211, method="get", target="k1", status="ERR" if error else "OK",
        error=error, latency_ns=2_000_000, request_bytes=30, response_bytes=60, sock_id=sock_id)


def test_decoded_protocols_the_kernel_does_not_count_are_counted():
    clock = [10**18]
    aggregator = TopologyAggregator(ServiceResolver(), window_seconds=10, clock=lambda: clock[0],
                                    kernel_counts=True)
    for i, (protocol, error) in enumerate([("memcached", False), ("memcached", True), ("http", False)]):
        list(aggregator(exchange(protocol, error, i)))
    clock[0] += 11 * 10**9
    edges = [e for e in aggregator.flush() if isinstance(e, EdgeWindowEvent)]
    by_protocol = {e.key.protocol: e.stats for e in edges}
    assert (by_protocol["memcached"].requests, by_protocol["memcached"].errors) == (2, 1)
    assert by_protocol["memcached"].latency_sum_ns == 4_000_000
    # HTTP is the kernel's to count: its decoded exchange is detail only (PostgreSQL's too).
    assert (by_protocol["http"].requests, by_protocol["http"].decoded) == (0, 1)


def test_prometheus_counts_them_too():
    from deetune.sinks.prometheus import PrometheusSink
    from tests.test_prometheus import exchange as http_exchange
    from tests.test_prometheus import labels, scrape, series

    sink = PrometheusSink("127.0.0.1", 0, kernel_counts=True)
    try:
        sink.handle(http_exchange(role="server", comm="api"))  # the kernel's to count
        sink.handle(http_exchange(role="server", comm="postgres", lport=5432, protocol="postgres", method="EXECUTE",
                                  target="SELECT 1", status="ERR", error=True, latency_ns=1_000_000))  # the kernel's too
        sink.handle(http_exchange(role="server", comm="memcached", lport=11211, protocol="memcached", method="get",
                                  target="k1", status="ERR", error=True, latency_ns=1_000_000))
        got = scrape(sink)
    finally:
        sink.close()
    assert series(got, "deetune_requests_total") == {
        labels(protocol="memcached", client="127.0.0.1", server="memcached", method="get", status="ERR"): 1}


def test_a_kernel_counted_open_waits_for_its_edge_protocol_until_the_window_ends():
    """The kernel's maps can be read between a connect and its first answer: the open comes
    first, and counts on the protocol the edge shows by the window's end (tcp if none)."""
    from deetune.events import ConnectionCounts, RequestCounts
    from deetune.topology.model import EdgeKey

    clock = [10**19]
    aggregator = TopologyAggregator(ServiceResolver(), window_seconds=10, clock=lambda: clock[0],
                                    kernel_counts=True)
    side = dict(ts=1, role="client", pid=1, raddr="203.0.113.5", protocol="tcp")
    list(aggregator(ConnectionCounts(**side, port=8080, opened=1)))
    list(aggregator(ConnectionCounts(**side, port=9090, opened=2)))  # no exchange ever: tcp
    list(aggregator(RequestCounts(**{**side, "protocol": "http"}, port=8080, method="GET", status=200,
                                  outcome="ok", count=3, request_bytes=30, response_bytes=90)))
    clock[0] += 11 * 10**9
    edges = {e.key: e.stats for e in aggregator.flush() if isinstance(e, EdgeWindowEvent)}
    client = ServiceResolver().instance(1).service
    http, tcp = EdgeKey(client, "203.0.113.5:8080", "http", 8080), EdgeKey(client, "203.0.113.5:9090", "tcp", 9090)
    assert set(edges) == {http, tcp}
    assert (edges[http].requests, edges[http].connections_opened) == (3, 1)
    assert (edges[http].bytes_sent, edges[http].bytes_received) == (30, 90)
    assert edges[tcp].connections_opened == 2


def test_a_local_servers_clients_are_not_counted_twice_before_its_listener_is_known():
    """A server that started a moment ago is not in the /proc snapshot of listeners yet (read at
    most once a second): its side's counts, read first, say that its clients' sides on this host
    are not the ones to count."""
    import socket

    from deetune.events import RequestCounts

    with socket.socket() as unused:  # a local port nobody listens on: not in any snapshot
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    clock = [10**19]
    aggregator = TopologyAggregator(ServiceResolver(), window_seconds=10, clock=lambda: clock[0],
                                    kernel_counts=True)
    counts = dict(ts=1, protocol="http", port=port, method="GET", status=200, outcome="ok", count=5)
    server = RequestCounts(**counts, role="server", pid=1, raddr="127.0.0.1")
    client = RequestCounts(**counts, role="client", pid=1, raddr="127.0.0.1")
    remote = RequestCounts(**counts, role="client", pid=1, raddr="203.0.113.5")  # another host's server
    assert [e.counted for event in (server, client, remote) for e in aggregator(event)] == [True, False, True]
    clock[0] += 11 * 10**9
    edges = {e.key.server: e.stats.requests for e in aggregator.flush() if isinstance(e, EdgeWindowEvent)}
    assert sorted(edges.values()) == [5, 5]
