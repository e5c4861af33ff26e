"""The agent's HTTP API and web UI, served over a fixed topology (a test fake of the store)."""

from __future__ import annotations

import http.client
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from collections import deque
from typing import Any

import pytest

from deetune.api import ApiServer, openapi_document
from deetune.api.server import STATIC_DIR
from deetune.topology.model import EdgeStats, TopologyQueries
from tests.conftest import IN_CI, ROOT

NOW = 1_750_000_000_000_000_000  # the fake clock: ns since the epoch
MIN = 60 * 1_000_000_000
CYTOSCAPE = STATIC_DIR / "vendor" / "cytoscape.min.js"


# ---- the fixed topology -------------------------------------------------------------------


def _stats(requests: int, errors: int, latencies_us: list[int], sent: int, received: int, opened: int, **extra: int):
    stats = EdgeStats(requests=requests, errors=errors, bytes_sent=sent, bytes_received=received,
                      connections_opened=opened, **extra)
    for i in range(requests):
        stats.add_latency(latencies_us[i % len(latencies_us)] * 1000)
    return stats.to_json()


def _instance(service: str, host: str, pid: int, comm: str, container: str | None = None) -> dict[str, Any]:
    return {
        "id": f"{host}:{pid}" + (f":{container[:12]}" if container else ""), "service": service, "host": host,
        "pid": pid, "comm": comm, "container_id": container, "container_name": f"{service}-1" if container else None,
        "pod": None, "namespace": None,
    }


INSTANCES = {
    "frontend": [_instance("frontend", "web-1", 101, "nginx"), _instance("frontend", "web-2", 102, "nginx")],
    "checkout": [_instance("checkout", "app-1", 201, "python3", "4f1c2a9be0d3aa55")],
    "redis": [_instance("redis", "db-1", 301, "redis-server")],
    "mysql": [_instance("mysql", "db-1", 302, "mariadbd")],
    "payments.example.com:443": [],
}
EXTERNAL = {"payments.example.com:443"}
EDGES = [
    {"client": "frontend", "server": "checkout", "protocol": "http", "port": 8080,
     **_stats(900, 9, [800, 1200, 5000], 450_000, 1_800_000, 40)},
    {"client": "checkout", "server": "redis", "protocol": "redis", "port": 6379,
     **_stats(2700, 0, [90, 120, 300], 120_000, 90_000, 3)},
    {"client": "checkout", "server": "mysql", "protocol": "mysql", "port": 3306,
     **_stats(450, 0, [700, 2000, 15_000], 60_000, 400_000, 5)},
    {"client": "checkout", "server": "payments.example.com:443", "protocol": "tcp", "port": 443,
     **_stats(0, 0, [1], 30_000, 20_000, 30, connections_failed=3, resets=1)},
]
NODE_NAMES = sorted(INSTANCES)


def _node(name: str) -> dict[str, Any]:
    return {"name": name, "instances": INSTANCES[name], "external": name in EXTERNAL}


def _service(name: str) -> dict[str, Any]:
    return {
        "name": name, "external": name in EXTERNAL, "instances": INSTANCES[name],
        "first_seen": NOW - 60 * MIN, "last_seen": NOW - 1_000_000_000,
        "requests_in": sum(e["requests"] for e in EDGES if e["server"] == name),
        "requests_out": sum(e["requests"] for e in EDGES if e["client"] == name),
    }


EXCHANGES = [
    {"type": "request", "ts": NOW - i * 1_000_000_000, "protocol": "http", "role": "client", "pid": 101,
     "comm": "nginx", "laddr": "10.0.0.1", "lport": 40000 + i, "raddr": "10.0.0.2", "rport": 8080,
     "method": "GET", "target": f"/cart/{i}", "status": 200 if i % 3 else 500, "error": i % 3 == 0,
     "error_message": None, "latency_ns": 1_000_000 + i, "duration_ns": 1_200_000 + i,
     "request_bytes": 120, "response_bytes": 2000, "attributes": {"host": "checkout"},
     "client": "frontend", "server": "checkout"}
    for i in range(5)
] + [
    {"type": "request", "ts": NOW - 10 * 1_000_000_000, "protocol": "redis", "role": "client", "pid": 201,
     "comm": "python3", "laddr": "10.0.0.2", "lport": 50000, "raddr": "10.0.0.3", "rport": 6379,
     "method": "GET", "target": "cart:42", "status": "OK", "error": False, "error_message": None,
     "latency_ns": 90_000, "duration_ns": 95_000, "request_bytes": 30, "response_bytes": 80, "attributes": {},
     "client": "checkout", "server": "redis"},
]


class FakeStore:
    """A TopologyQueries over the fixed topology above; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []
        self.fail: Exception | None = None

    def _record(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.calls.append((name, args, kwargs))
        if self.fail is not None:
            raise self.fail

    def graph(self, since: int, until: int, service: str | None = None) -> dict[str, Any]:
        self._record("graph", since, until, service)
        edges = [e for e in EDGES if service is None or service in (e["client"], e["server"])]
        if service is None:
            names = NODE_NAMES
        else:
            names = sorted({service} | {e["client"] for e in edges} | {e["server"] for e in edges}) if (
                service in INSTANCES) else []
        return {"nodes": [_node(n) for n in names], "edges": edges, "since": since, "until": until}

    def services(self, since: int, until: int) -> list[dict[str, Any]]:
        self._record("services", since, until)
        return [_service(n) for n in NODE_NAMES]

    def dependencies(self, service: str, depth: int, direction: str, since: int, until: int) -> dict[str, Any]:
        self._record("dependencies", service, depth, direction, since, until)
        hops, edges, todo = {service: 0}, [], deque([service])
        while todo:
            name = todo.popleft()
            if hops[name] >= depth:
                continue
            for edge in EDGES:
                ends = []
                if direction in ("downstream", "both") and edge["client"] == name:
                    ends.append(edge["server"])
                if direction in ("upstream", "both") and edge["server"] == name:
                    ends.append(edge["client"])
                for other in ends:
                    if edge not in edges:
                        edges.append(edge)
                    if other not in hops:
                        hops[other] = hops[name] + 1
                        todo.append(other)
        return {"service": service, "depth": depth, "direction": direction,
                "nodes": [{"name": n, "hops": h} for n, h in hops.items()], "edges": edges}

    def edges(self, since: int, until: int, *, errors_only: bool = False, service: str | None = None):
        self._record("edges", since, until, errors_only=errors_only, service=service)
        return [e for e in EDGES if (not errors_only or e["errors"] or e["connections_failed"])
                and (service is None or service in (e["client"], e["server"]))]

    def exchanges(self, *, service: str | None = None, limit: int = 100, since: int | None = None):
        self._record("exchanges", service=service, limit=limit, since=since)
        found = [x for x in EXCHANGES if (service is None or service in (x["client"], x["server"]))
                 and (since is None or x["ts"] >= since)]
        return found[:limit]


def test_fake_is_a_topology_queries() -> None:
    store: TopologyQueries = FakeStore()  # type-checks against the protocol
    assert store.graph(0, 1)["nodes"]


# ---- HTTP helpers ---------------------------------------------------------------------------


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        assert self.headers["Content-Type"] == "application/json", self.headers["Content-Type"]
        return json.loads(self.body)


def request(server: ApiServer, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Reply:
    """A request; with the server's token unless ``headers`` are given."""
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    if headers is None:
        headers = {"Authorization": f"Bearer {server.token}"}
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def get_json(server: ApiServer, path: str, status: int = 200, **kwargs: Any) -> Any:
    reply = request(server, path, **kwargs)
    assert reply.status == status, (reply.status, reply.body[:300])
    return reply.json()


def error_of(server: ApiServer, path: str, status: int, **kwargs: Any) -> str:
    body = get_json(server, path, status, **kwargs)
    assert set(body) == {"error"} and "\n" not in body["error"] and body["error"], body
    return body["error"]


@pytest.fixture(scope="module")
def _store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def store(_store: FakeStore) -> FakeStore:
    """The servers' store, its call log cleared."""
    _store.calls.clear()
    _store.fail = None
    return _store


@pytest.fixture(scope="module")
def _server(_store: FakeStore):
    with ApiServer(_store, clock=lambda: NOW) as srv:
        yield srv


@pytest.fixture
def server(_server: ApiServer, store: FakeStore) -> ApiServer:
    return _server


@pytest.fixture(scope="module")
def _token_server(_store: FakeStore):
    with ApiServer(_store, host="0.0.0.0", token="s3cret-token", clock=lambda: NOW) as srv:
        yield srv


@pytest.fixture
def token_server(_token_server: ApiServer, store: FakeStore) -> ApiServer:
    return _token_server


# ---- endpoints ------------------------------------------------------------------------------


def test_topology_defaults_to_the_last_15_minutes(server: ApiServer, store: FakeStore) -> None:
    body = get_json(server, "/api/topology")
    assert body == {"nodes": [_node(n) for n in NODE_NAMES], "edges": EDGES, "since": NOW - 15 * MIN, "until": NOW}
    assert store.calls == [("graph", (NOW - 15 * MIN, NOW, None), {})]
    # exact JSON of one node and one edge, as the UI and clients read them
    assert body["nodes"][0] == {
        "name": "checkout", "external": False,
        "instances": [{"id": "app-1:201:4f1c2a9be0d3", "service": "checkout", "host": "app-1", "pid": 201,
                       "comm": "python3", "container_id": "4f1c2a9be0d3aa55", "container_name": "checkout-1",
                       "pod": None, "namespace": None}],
    }
    assert body["edges"][1] == {
        "client": "checkout", "server": "redis", "protocol": "redis", "port": 6379, "requests": 2700, "errors": 0,
        "latency_p50_ns": 175_000, "latency_p90_ns": 425_000, "latency_p99_ns": 492_500, "latency_avg_ns": 170_000,
        "bytes_sent": 120_000, "bytes_received": 90_000, "connections_opened": 3, "connections_failed": 0,
        "retransmits": 0, "resets": 0, "decoded": 0, "unparsed": 0, "unsolicited": 0,
    }


@pytest.mark.parametrize(
    ("query", "since", "until"),
    [
        ("window=30s", NOW - 30 * 10**9, NOW),
        ("window=5m", NOW - 5 * MIN, NOW),
        ("window=1h", NOW - 60 * MIN, NOW),
        ("window=1d", NOW - 24 * 60 * MIN, NOW),
        ("until=1000000000000&window=1s", 999_000_000_000, 1_000_000_000_000),
        ("until=5&window=1m", 0, 5),  # clamped at the epoch
        (f"since={NOW - 7}&until={NOW - 2}", NOW - 7, NOW - 2),
        (f"since={NOW - 7}", NOW - 7, NOW),
        ("since=2025-06-15T16:00:00Z&until=2025-06-15T16:10:00.5%2B00:00", 1_750_003_200 * 10**9,
         1_750_003_800_500_000_000),
        ("since=2025-06-15t16:00:00.123456789z&until=2025-06-15T19:00:00%2B02:00", 1_750_003_200_123_456_000,
         1_750_006_800 * 10**9),
    ],
)
def test_topology_time_range(server: ApiServer, store: FakeStore, query: str, since: int, until: int) -> None:
    body = get_json(server, f"/api/topology?{query}")
    assert (body["since"], body["until"]) == (since, until)
    assert store.calls == [("graph", (since, until, None), {})]


def test_topology_of_one_service(server: ApiServer, store: FakeStore) -> None:
    body = get_json(server, "/api/topology?service=redis&window=5m")
    assert body == {"nodes": [_node("checkout"), _node("redis")], "edges": [EDGES[1]],
                    "since": NOW - 5 * MIN, "until": NOW}
    assert store.calls == [("graph", (NOW - 5 * MIN, NOW, "redis"), {})]


def test_services(server: ApiServer, store: FakeStore) -> None:
    body = get_json(server, "/api/services?window=1h")
    assert body == {"since": NOW - 60 * MIN, "until": NOW, "services": [_service(n) for n in NODE_NAMES]}
    assert body["services"][1] == {
        "name": "frontend", "external": False, "instances": INSTANCES["frontend"],
        "first_seen": NOW - 60 * MIN, "last_seen": NOW - 10**9, "requests_in": 0, "requests_out": 900,
    }


def test_one_service(server: ApiServer) -> None:
    assert get_json(server, "/api/services/mysql") == _service("mysql")
    # names are percent-decoded (an external endpoint's name has a colon, some have slashes)
    assert get_json(server, "/api/services/payments.example.com%3A443") == _service("payments.example.com:443")
    assert error_of(server, "/api/services/nope", 404) == "no service 'nope' seen in the time range"


@pytest.mark.parametrize(
    ("query", "nodes", "edges"),
    [
        ("", {"frontend": 0, "checkout": 1}, [0]),
        ("?depth=2", {"frontend": 0, "checkout": 1, "redis": 2, "mysql": 2, "payments.example.com:443": 2},
         [0, 1, 2, 3]),
        ("?depth=3&direction=upstream", {"frontend": 0}, []),
        ("?direction=downstream&depth=10", {"frontend": 0, "checkout": 1, "redis": 2, "mysql": 2,
                                            "payments.example.com:443": 2}, [0, 1, 2, 3]),
    ],
)
def test_dependencies(server: ApiServer, store: FakeStore, query: str, nodes: dict, edges: list) -> None:
    body = get_json(server, f"/api/services/frontend/dependencies{query}")
    params = dict(urllib.parse.parse_qsl(query.lstrip("?")))
    assert body == {
        "service": "frontend", "depth": int(params.get("depth", 1)), "direction": params.get("direction", "downstream"),
        "nodes": [{"name": n, "hops": h} for n, h in nodes.items()], "edges": [EDGES[i] for i in edges],
    }
    assert store.calls[-1] == ("dependencies", ("frontend", int(params.get("depth", 1)),
                                                params.get("direction", "downstream"), NOW - 15 * MIN, NOW), {})


def test_dependencies_both_ways(server: ApiServer) -> None:
    body = get_json(server, "/api/services/redis/dependencies?direction=both&depth=2")
    assert body["nodes"] == [{"name": "redis", "hops": 0}, {"name": "checkout", "hops": 1},
                             {"name": "frontend", "hops": 2}, {"name": "mysql", "hops": 2},
                             {"name": "payments.example.com:443", "hops": 2}]
    assert error_of(server, "/api/services/ghost/dependencies", 404) == "no service 'ghost' seen in the time range"


def test_edges(server: ApiServer, store: FakeStore) -> None:
    assert get_json(server, "/api/edges") == {"since": NOW - 15 * MIN, "until": NOW, "edges": EDGES}
    assert get_json(server, "/api/edges?errors=true")["edges"] == [EDGES[0], EDGES[3]]
    assert get_json(server, "/api/edges?errors=1&service=frontend")["edges"] == [EDGES[0]]
    assert get_json(server, "/api/edges?errors=false&service=mysql&window=6h") == {
        "since": NOW - 360 * MIN, "until": NOW, "edges": [EDGES[2]]}
    assert [c[2] for c in store.calls] == [
        {"errors_only": False, "service": None}, {"errors_only": True, "service": None},
        {"errors_only": True, "service": "frontend"}, {"errors_only": False, "service": "mysql"},
    ]


def test_exchanges(server: ApiServer, store: FakeStore) -> None:
    assert get_json(server, "/api/exchanges") == {"exchanges": EXCHANGES}
    assert get_json(server, "/api/exchanges?service=redis") == {"exchanges": [EXCHANGES[5]]}
    assert get_json(server, "/api/exchanges?limit=2") == {"exchanges": EXCHANGES[:2]}
    assert get_json(server, "/api/exchanges?window=3s") == {"exchanges": EXCHANGES[:4]}
    assert get_json(server, f"/api/exchanges?since={NOW - 10**9}&service=frontend") == {"exchanges": EXCHANGES[:2]}
    assert [c[2] for c in store.calls] == [
        {"service": None, "limit": 100, "since": None}, {"service": "redis", "limit": 100, "since": None},
        {"service": None, "limit": 2, "since": None}, {"service": None, "limit": 100, "since": NOW - 3 * 10**9},
        {"service": "frontend", "limit": 100, "since": NOW - 10**9},
    ]


def test_healthz_and_openapi(server: ApiServer) -> None:
    assert get_json(server, "/healthz") == {"status": "ok", "version": "0.1.0"}
    assert get_json(server, "/openapi.json") == openapi_document()


def test_head_and_other_methods(server: ApiServer) -> None:
    reply = request(server, "/api/services", method="HEAD")
    assert reply.status == 200 and reply.body == b"" and int(reply.headers["Content-Length"]) > 0
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "QUERY", "BREW"):
        reply = request(server, "/api/services", method=method)
        assert reply.status == 405 and reply.headers["Allow"] == "GET, HEAD"
        assert reply.json() == {"error": f"method {method} not allowed (GET and HEAD only)"}


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/api/topology?window=5", "window must be 1 to 4 digits followed by s, m, h or d (e.g. 5m), got '5'"),
        ("/api/topology?window=0m", "window must be 1 to 4 digits followed by s, m, h or d (e.g. 5m), got '0m'"),
        ("/api/topology?window=-5m", "window must be 1 to 4 digits followed by s, m, h or d (e.g. 5m), got '-5m'"),
        ("/api/topology?window=12345d",
         "window must be 1 to 4 digits followed by s, m, h or d (e.g. 5m), got '12345d'"),
        ("/api/topology?window=5m&since=1", "give since or window, not both"),
        ("/api/topology?since=yesterday",
         "since must be nanoseconds since the epoch or an RFC 3339 time, got 'yesterday'"),
        ("/api/topology?until=2025-01-01T00:00:00",
         "until needs a UTC offset (e.g. 2025-01-31T12:00:00Z), got '2025-01-01T00:00:00'"),
        ("/api/topology?since=0001-01-01T00:00:00Z", "since is out of range: '0001-01-01T00:00:00Z'"),
        ("/api/topology?until=99999999999999999999", "until is out of range: '99999999999999999999'"),
        (f"/api/topology?since={NOW}", "since must be before until"),
        ("/api/topology?since=20&until=10", "since must be before until"),
        ("/api/topology?service=", "service must not be empty"),
        ("/api/topology?service=a&service=b", "parameter 'service' given more than once"),
        ("/api/topology?servce=a", "unknown parameter 'servce' (this endpoint takes: since, until, window, service)"),
        ("/api/services?service=a", "unknown parameter 'service' (this endpoint takes: since, until, window)"),
        ("/api/services/redis/dependencies?depth=0", "depth must be an integer from 1 to 10, got '0'"),
        ("/api/services/redis/dependencies?depth=11", "depth must be an integer from 1 to 10, got '11'"),
        ("/api/services/redis/dependencies?depth=two", "depth must be an integer from 1 to 10, got 'two'"),
        ("/api/services/redis/dependencies?direction=sideways",
         "direction must be one of downstream, upstream, both, got 'sideways'"),
        ("/api/edges?errors=maybe", "errors must be true or false, got 'maybe'"),
        # an empty value is not a missing one
        ("/api/edges?errors=", "errors must be true or false, got ''"),
        ("/api/exchanges?limit=", "limit must be an integer from 1 to 1000, got ''"),
        ("/api/services/redis/dependencies?depth=", "depth must be an integer from 1 to 10, got ''"),
        ("/api/services/redis/dependencies?direction=", "direction must be one of downstream, upstream, both, got ''"),
        ("/api/topology?window=", "window must be 1 to 4 digits followed by s, m, h or d (e.g. 5m), got ''"),
        ("/api/topology?since=", "since must be nanoseconds since the epoch or an RFC 3339 time, got ''"),
        ("/api/exchanges?window=", "window must be 1 to 4 digits followed by s, m, h or d (e.g. 5m), got ''"),
        ("/api/exchanges?limit=0", "limit must be an integer from 1 to 1000, got '0'"),
        ("/api/exchanges?limit=1001", "limit must be an integer from 1 to 1000, got '1001'"),
        ("/api/exchanges?until=1", "unknown parameter 'until' (this endpoint takes: since, window, service, limit)"),
        ("/api/exchanges?since=1&window=1m", "give since or window, not both"),
        ("/api/topology?" + "&".join(f"p{i}=1" for i in range(40)), "too many query parameters"),
    ],
)
def test_bad_parameters(server: ApiServer, store: FakeStore, path: str, message: str) -> None:
    assert error_of(server, path, 400) == message
    assert not [c for c in store.calls if c[0] != "services"]


@pytest.mark.parametrize("path", ["/api", "/api/", "/api/nodes", "/api/services/", "/api/services/a/b",
                                  "/api/services/redis/dependencies/x", "/nope", "/static/", "/static/../server.py",
                                  "/static/%2e%2e/server.py", "/static/nope.js", "/static/vendor/nope.js",
                                  "/static/.hidden.js", "/favicon.ico"])
def test_unknown_paths(server: ApiServer, path: str) -> None:
    message = error_of(server, path, 404)
    assert message.startswith(("no such endpoint: ", "not found: ", "no such file: ")), message


def test_store_failure_is_a_one_line_500(server: ApiServer, store: FakeStore, caplog) -> None:
    store.fail = RuntimeError("database is locked\n  while reading edges")
    with caplog.at_level(logging.ERROR, logger="deetune.api"):
        for path in ("/api/topology", "/api/services", "/api/services/redis", "/api/edges", "/api/exchanges",
                     "/api/services/redis/dependencies"):
            reply = request(server, path)
            assert reply.status == 500
            # no internal text for the client: the agent's log has it
            assert reply.json() == {"error": "internal error: the request failed (the agent's log says why)"}
            assert b"Traceback" not in reply.body and b"locked" not in reply.body
    assert len(caplog.records) == 6
    assert caplog.records[0].getMessage() == "GET /api/topology failed" and caplog.records[0].exc_info
    assert "database is locked" in str(caplog.records[0].exc_info[1])
    # the server goes on
    store.fail = None
    assert get_json(server, "/healthz")["status"] == "ok"


def test_unserializable_store_answer_is_a_500(server: ApiServer, store: FakeStore, caplog, monkeypatch) -> None:
    monkeypatch.setattr(store, "graph", lambda since, until, service=None: {"nodes": [float("nan")]})
    with caplog.at_level(logging.ERROR, logger="deetune.api"):
        assert error_of(server, "/api/topology", 500) == "internal error: the request failed (the agent's log says why)"


def _raw(server: ApiServer, data: bytes) -> bytes:
    """What the server answers to raw bytes (it may reset the connection after its answer when
    it did not read all of them)."""
    import socket

    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(data)
        reply = b""
        try:
            while chunk := sock.recv(4096):
                reply += chunk
        except ConnectionResetError:
            pass
    return reply


def test_malformed_requests_get_json_errors(server: ApiServer) -> None:
    head, _, body = _raw(server, b"GARBAGE\r\n\r\n").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400") and b"Content-Type: application/json" in head, head
    assert json.loads(body) == {"error": "Bad Request: Start line is invalid"}
    start = b"GET /healthz HTTP/1.1\r\nX: "
    head, _, body = _raw(server, start + b"a" * (70000 - len(start))).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 431") and b"Content-Type: application/json" in head, head
    assert json.loads(body) == {"error": "the request head is larger than 65536 bytes"}


# ---- binding and tokens ---------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.10", "example.com"])
def test_non_loopback_needs_a_token(store: FakeStore, host: str) -> None:
    with pytest.raises(ValueError) as info:
        ApiServer(store, host=host)
    message = str(info.value)
    assert "needs a bearer token" in message and "\n" not in message


@pytest.mark.parametrize("token", ["", "two words", "tab\there", "caf\u00e9"])
def test_bad_tokens(store: FakeStore, token: str) -> None:
    with pytest.raises(ValueError, match="^the API token must be non-empty printable ASCII without spaces$"):
        ApiServer(store, token=token)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_goes_without_token(store: FakeStore, host: str) -> None:
    try:
        srv = ApiServer(store, host=host, clock=lambda: NOW).start()
    except OSError as exc:  # e.g. no IPv6 in this container
        pytest.skip(f"cannot listen on {host}: {exc}")
    try:
        assert get_json(srv, "/api/services")["services"][0]["name"] == "checkout"
        assert srv.url.startswith("http://[::1]:" if host == "::1" else "http://127.0.0.1:")
    finally:
        srv.stop()


def test_token_rules(token_server: ApiServer, store: FakeStore) -> None:
    assert token_server.address[0] == "0.0.0.0" and token_server.address[1] > 0
    for path in ("/api/topology", "/api/services", "/api/services/redis", "/api/services/redis/dependencies",
                 "/api/edges", "/api/exchanges", "/api/nope", "/api"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret-tokenX"},
                        {"Authorization": "Basic s3cret-token"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Bearer caf\u00e9".encode().decode("latin-1")}):
            reply = request(token_server, path, headers=headers)
            assert reply.status == 401, (path, headers)
            assert reply.json() == {"error": "missing or wrong bearer token"}
            assert reply.headers["WWW-Authenticate"] == 'Bearer realm="deetune"'
    assert store.calls == []
    good = {"Authorization": "Bearer s3cret-token"}
    assert get_json(token_server, "/api/services", headers=good)["services"][0]["name"] == "checkout"
    assert get_json(token_server, "/api/topology?window=5m", headers={"Authorization": "bearer  s3cret-token"})
    assert error_of(token_server, "/api/nope", 404, headers=good) == "no such endpoint: /api/nope"
    # what holds no data stays public
    assert get_json(token_server, "/healthz")["status"] == "ok"
    assert get_json(token_server, "/openapi.json")["openapi"] == "3.1.0"
    assert request(token_server, "/").status == 200


def test_start_stop(store: FakeStore) -> None:
    srv = ApiServer(store)
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.address
    srv.start()
    with pytest.raises(RuntimeError, match="already started"):
        srv.start()
    host, port = srv.address
    assert host == "127.0.0.1" and port > 0
    srv.stop()
    srv.stop()  # twice is fine
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection(host, port, timeout=2).request("GET", "/healthz")
    with pytest.raises(ValueError, match="not a TCP port"):
        ApiServer(store, port=70000)


# ---- OpenAPI --------------------------------------------------------------------------------


def test_openapi_document_validates() -> None:
    from openapi_spec_validator import validate
    from openapi_spec_validator.versions.shortcuts import get_spec_version

    document = openapi_document()
    validate(document)
    assert str(get_spec_version(document)) == "OpenAPIV3.1"
    assert set(document["paths"]) == {
        "/api/topology", "/api/services", "/api/services/{name}", "/api/services/{name}/dependencies",
        "/api/edges", "/api/exchanges", "/openapi.json", "/healthz",
        "/api/recordings", "/api/recordings/{id}", "/api/recordings/{id}/stop", "/api/recordings/{id}/exchanges",
        "/api/series", "/api/hosts", "/api/cross-idc",
    }


def _resolve(document: dict, schema: Any) -> Any:
    """Inline the document's $refs (for jsonschema validation of our responses)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            target: Any = document
            for part in schema["$ref"].lstrip("#/").split("/"):
                target = target[part]
            return _resolve(document, target)
        return {k: _resolve(document, v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_resolve(document, v) for v in schema]
    return schema


@pytest.mark.parametrize(
    ("path", "operation", "status"),
    [
        ("/api/topology", "/api/topology", "200"),
        ("/api/topology?service=checkout", "/api/topology", "200"),
        ("/api/services", "/api/services", "200"),
        ("/api/services/redis", "/api/services/{name}", "200"),
        ("/api/services/checkout/dependencies?direction=both&depth=3", "/api/services/{name}/dependencies", "200"),
        ("/api/edges?errors=true", "/api/edges", "200"),
        ("/api/exchanges", "/api/exchanges", "200"),
        ("/healthz", "/healthz", "200"),
        ("/openapi.json", "/openapi.json", "200"),
        ("/api/topology?window=x", "/api/topology", "400"),
        ("/api/services/x", "/api/services/{name}", "404"),
    ],
)
def test_responses_match_the_openapi_schemas(server: ApiServer, path: str, operation: str, status: str) -> None:
    import jsonschema

    document = openapi_document()
    response = _resolve(document, document["paths"][operation]["get"]["responses"][status])
    schema = response["content"]["application/json"]["schema"]
    body = get_json(server, path, int(status))
    jsonschema.Draft202012Validator(schema).validate(body)


def test_real_store_answers_match_the_openapi_schemas(tmp_path) -> None:
    """The same checks over the SQLite store (not the fake): the document describes what it answers."""
    import jsonschema

    store_module = pytest.importorskip("deetune.topology.store")
    from deetune.events import ExchangeEvent
    from deetune.topology.model import EdgeKey, EdgeWindowEvent, Instance, InstanceEvent

    window_ns = 10 * 1_000_000_000
    start = NOW - 5 * MIN
    stats = EdgeStats(requests=10, errors=1, bytes_sent=100, bytes_received=200, connections_opened=2)
    for latency in (100_000, 2_000_000):
        stats.add_latency(latency)
    events = [
        InstanceEvent(start, instance=Instance(service="web", host="h", pid=10, comm="nginx")),
        InstanceEvent(start, instance=Instance(service="db", host="h", pid=20, comm="redis-server")),
        EdgeWindowEvent(start + window_ns, key=EdgeKey("web", "db", "redis", 6379), window_start=start,
                        window_ns=window_ns, stats=stats, client_instances=("h:10",), server_instances=("h:20",)),
        EdgeWindowEvent(start + window_ns, key=EdgeKey("db", "10.9.9.9:443", "tcp", 443), window_start=start,
                        window_ns=window_ns, stats=EdgeStats(connections_opened=1, connections_failed=1)),
        ExchangeEvent(start + 1, protocol="redis", pid=20, comm="redis-server", role="server", laddr="127.0.0.1",
                      lport=6379, raddr="127.0.0.1", rport=40000, method="GET", target="k", status="OK",
                      error=False, latency_ns=1000, request_bytes=10, response_bytes=20, client_service="web",
                      server_service="db"),
    ]
    store = store_module.TopologyStore(tmp_path / "topology.db", clock=lambda: NOW, exchange_hold_seconds=0)
    try:
        store.write(events)
        document = openapi_document()
        with ApiServer(store, clock=lambda: NOW) as srv:
            for path, operation in [
                ("/api/topology", "/api/topology"), ("/api/topology?service=db", "/api/topology"),
                ("/api/services", "/api/services"), ("/api/services/web", "/api/services/{name}"),
                ("/api/services/web/dependencies?direction=both&depth=3", "/api/services/{name}/dependencies"),
                ("/api/edges?errors=true", "/api/edges"), ("/api/exchanges", "/api/exchanges"),
            ]:
                response = _resolve(document, document["paths"][operation]["get"]["responses"]["200"])
                body = get_json(srv, path)
                jsonschema.Draft202012Validator(response["content"]["application/json"]["schema"]).validate(body)
            topology = get_json(srv, "/api/topology")
            assert [n["name"] for n in topology["nodes"]] == ["10.9.9.9:443", "db", "web"]
            assert [n["external"] for n in topology["nodes"]] == [True, False, False]
            assert get_json(srv, "/api/exchanges")["exchanges"][0]["target"] == "k"
    finally:
        store.close()


# Fuzzing the API against its own OpenAPI document (schemathesis: every operation, generated
# parameters, valid and not; checks: no 500, documented status codes and content types, bodies
# that match their schemas).
try:
    import schemathesis
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - the test extra installs it
    schemathesis = None

if schemathesis is not None:
    _fuzz_schema = schemathesis.openapi.from_dict(openapi_document())
    _fuzz_schema.config.generation.update(modes=["positive", "negative"])

    @pytest.fixture(scope="module")
    def fuzz_server():
        with ApiServer(FakeStore(), clock=lambda: NOW) as srv:
            yield srv

    @_fuzz_schema.parametrize()
    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    def test_fuzz_api_against_its_openapi(case, fuzz_server: ApiServer) -> None:
        # Schema-valid but rejected on purpose (400), as the schema cannot say it: since after until,
        # since and window together, times before the epoch.  Everything else is checked.
        case.call_and_validate(base_url=fuzz_server.url, excluded_checks=[schemathesis.checks.positive_data_acceptance])
else:  # pragma: no cover

    def test_fuzz_api_against_its_openapi() -> None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")


# ---- the web UI -----------------------------------------------------------------------------


def test_ui_is_served(server: ApiServer) -> None:
    reply = request(server, "/")
    assert reply.status == 200 and reply.headers["Content-Type"] == "text/html; charset=utf-8"
    csp = reply.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    page = reply.body.decode()
    assert 'id="node-list"' in page and 'data-node-count="0"' in page
    # everything the page loads is served here: no CDN
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets and all(a.startswith("/static/") or a == "data:," for a in assets), assets
    for asset in assets:
        if asset.startswith("/static/vendor/") and not CYTOSCAPE.exists():
            continue
        if asset.startswith("/static/"):
            assert request(server, asset).status == 200, asset
    js = request(server, "/static/app.js")
    assert js.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert request(server, "/static/style.css").headers["Content-Type"] == "text/css; charset=utf-8"


def test_ui_vendor_is_built() -> None:
    """`make ui` (part of `make setup`) copies cytoscape from npm; under CI it must have run."""
    if not CYTOSCAPE.exists():
        if IN_CI:
            pytest.fail(f"{CYTOSCAPE} missing under CI=true: `make ui` did not run")
        pytest.skip(f"{CYTOSCAPE.relative_to(ROOT)} missing: run `make ui`")
    lock = json.loads((ROOT / "ui" / "package-lock.json").read_text())
    version = lock["packages"]["node_modules/cytoscape"]["version"]
    assert f'.version="{version}"' in CYTOSCAPE.read_text(errors="replace"), f"{CYTOSCAPE} is not cytoscape {version}"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if IN_CI:
            pytest.fail("chromium is missing under CI=true (it is in the Makefile's TEST_DEBS)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    if not CYTOSCAPE.exists():
        if IN_CI:
            pytest.fail("the UI's vendor files are missing under CI=true: `make ui` did not run")
        pytest.skip("cytoscape is missing: run `make ui`")
    return found


def run_chromium(url: str, *extra: str, timeout: float = 90) -> tuple[str, list[str]]:
    """Loads ``url`` headless; returns the DOM it ends with and the console messages."""
    with tempfile.TemporaryDirectory(prefix="deetune-chromium-") as profile:
        cmd = [
            _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
            "--enable-logging=stderr", "--v=0", *extra, url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return proc.stdout, console


def _node_list(dom: str) -> list[str]:
    match = re.search(r'<ul id="node-list">(.*?)</ul>', dom, re.DOTALL)
    assert match, dom[:2000]
    return re.findall(r'<li data-name="([^"]*)"', match.group(1))


def test_ui_in_headless_chromium(server: ApiServer) -> None:
    dom, console = run_chromium(server.url + "/", "--dump-dom")
    assert console == [], console
    assert sorted(_node_list(dom)) == NODE_NAMES
    graph = re.search(r'<div id="graph"[^>]*>', dom)
    assert graph, dom[:2000]
    assert 'data-node-count="5"' in graph.group(0) and 'data-edge-count="4"' in graph.group(0)
    assert 'data-loaded="true"' in graph.group(0)
    assert "<canvas" in dom  # cytoscape drew
    assert "5 services, 4 edges" in dom


def test_ui_details_panel(server: ApiServer) -> None:
    dom, console = run_chromium(server.url + "/?select=frontend", "--dump-dom")
    assert console == [], console
    details = re.search(r'<section id="details"[^>]*>(.*?)</section>', dom, re.DOTALL).group(1)
    assert "<h3>frontend<" in details and "900 (9 errors)" in details
    assert "<li>web-1:101 · nginx</li><li>web-2:102 · nginx</li>" in details

    edge = urllib.parse.quote("checkout → payments.example.com:443 tcp:443")
    dom, console = run_chromium(server.url + f"/?select={edge}", "--dump-dom")
    assert console == [], console
    details = re.search(r'<section id="details"[^>]*>(.*?)</section>', dom, re.DOTALL).group(1)
    assert "<h3>checkout → payments.example.com:443</h3>" in details
    assert '<td class="bad">30 opened, 3 failed</td>' in details and "<td>tcp :443</td>" in details


def test_ui_with_token_and_filter(token_server: ApiServer) -> None:
    url = token_server.url.replace("0.0.0.0", "127.0.0.1")
    dom, console = run_chromium(url + "/?token=s3cret-token&service=redis&window=1h", "--dump-dom")
    assert console == [], console
    assert _node_list(dom) == ["checkout", "redis"]
    assert 'data-node-count="2"' in dom


def test_ui_reports_a_wrong_token(token_server: ApiServer) -> None:
    url = token_server.url.replace("0.0.0.0", "127.0.0.1")
    dom, _ = run_chromium(url + "/?token=wrong", "--dump-dom")
    assert _node_list(dom) == []
    assert "error: missing or wrong bearer token" in dom


@pytest.mark.skipif(not os.environ.get("DEETUNE_UI_SCREENSHOT"), reason="set DEETUNE_UI_SCREENSHOT=PATH to take it")
def test_ui_screenshot(server: ApiServer) -> None:
    """``DEETUNE_UI_SCREENSHOT=docs/ui.png`` (docs/make_screenshot.py) saves a picture of the UI."""
    out = pathlib.Path(os.environ["DEETUNE_UI_SCREENSHOT"]).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    _, console = run_chromium(server.url + "/?select=checkout", f"--screenshot={out}", "--window-size=1280,800",
                              "--hide-scrollbars")
    assert console == [], console
    assert out.stat().st_size > 10_000
