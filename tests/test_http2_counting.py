"""With the kernel's counts (the agent's topology and Prometheus sink), exchanges of protocols the kernel
does not count (HTTP/2, gRPC) are counted from their decoded events; HTTP/1, Redis and MySQL exchanges
stay detail (their counts come from RequestCounts)."""

from __future__ import annotations

from deetune.sinks.prometheus import PrometheusSink
from deetune.topology.aggregator import TopologyAggregator
from deetune.topology.model import EdgeKey
from tests.test_topology import HOST_IP, SEC, T0, Clock, FakeResolver, exchange, no_proc, run, windows


def test_topology_counts_http2_and_grpc_from_exchanges_when_the_kernel_counts_the_rest():
    resolver = FakeResolver({10: "frontend", 20: "api"}, {(HOST_IP, 8080): "api"})
    agg = TopologyAggregator(resolver, window_seconds=10, clock=Clock(T0 + SEC), socket_owners=no_proc(),
                             kernel_counts=True)
    run(agg, [
        exchange(20, "server", HOST_IP, 8080, "10.9.9.9", 40000, protocol="http2", sock_id=1),
        exchange(20, "server", HOST_IP, 8080, "10.9.9.9", 40000, protocol="http2", sock_id=1, error=True),
        exchange(20, "server", HOST_IP, 8080, "10.9.9.9", 40001, protocol="grpc", sock_id=2),
        exchange(20, "server", HOST_IP, 8080, "10.9.9.9", 40002, protocol="http", sock_id=3),
    ])
    edges = windows(agg.flush())
    http2 = edges[EdgeKey("10.9.9.9", "api", "http2", 8080)]
    grpc = edges[EdgeKey("10.9.9.9", "api", "grpc", 8080)]
    http = edges[EdgeKey("10.9.9.9", "api", "http", 8080)]
    assert (http2.requests, http2.errors, grpc.requests, grpc.errors) == (2, 1, 1, 0)
    assert (http.requests, http.decoded) == (0, 1)  # the kernel's RequestCounts count it


def test_prometheus_counts_http2_and_grpc_from_exchanges_when_the_kernel_counts_the_rest():
    sink = PrometheusSink("127.0.0.1", 0, kernel_counts=True, serve=False, is_local_listener=lambda *a: False,
                          service_of=None)
    for protocol in ("grpc", "grpc", "http2", "http"):
        sink.handle(exchange(20, "server", HOST_IP, 8080, "10.9.9.9", 40000, protocol=protocol, sock_id=1))
    counted = {labels[0]: value for labels, value in sink.requests.snapshot().items()}
    assert counted == {"grpc": 2, "http2": 1}
