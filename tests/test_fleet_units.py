"""The fleet's parts without a fleet: an agent's place, the Prometheus sink's fleet families, the
scrape config, the join on hand-made rows, the OTLP path to a collector, the server's CLI."""

from __future__ import annotations

import collections
import json
import subprocess
import time
import urllib.error
import sys

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from deetune.events import ConnectionEvent, ExchangeEvent
from deetune.place import MAX_LABELS, Place, PlaceError
from deetune.server.cli import PrometheusProcess
from deetune.server.fleet import (ENDPOINT, NS, PAIR, RECORDED, Fleet, FleetQueries, Host, Side, _Ambiguous,
                                  _unpack)
from deetune.server.prom import Prometheus
from deetune.server.scrape import ConfigError, check_target, rules_file, scrape_config, write_file_sd
from deetune.sinks.prometheus import PrometheusSink
from tests.conftest import ROOT
from tests.servers import require_binary

# ---- the place ---------------------------------------------------------------------------------


def test_place_from_the_command_line_and_the_environment():
    env = {"DEETUNE_HOST_NAME": "web-3", "DEETUNE_LABELS": "idc=bj1, zone=a"}
    assert Place.build(environ=env) == Place("web-3", (("idc", "bj1"), ("zone", "a")))
    # The command line wins, label by label.
    assert Place.build("web-4", ["zone=b", "rack=r7"], environ=env) == Place(
        "web-4", (("idc", "bj1"), ("zone", "b"), ("rack", "r7")))
    assert Place.build(environ={}).host  # the hostname
    assert Place.build("h", environ={}).labels == ()


@pytest.mark.parametrize("host, labels, message", [
    ("h", ["idc"], "--label: expected NAME=VALUE, got 'idc'"),
    ("h", ["9x=1"], "--label: label name must match [a-zA-Z_][a-zA-Z0-9_]* (not __…), got '9x'"),
    ("h", ["__x=1"], "--label: label name must match [a-zA-Z_][a-zA-Z0-9_]* (not __…), got '__x'"),
    ("h", ["server=1"], "--label: label name 'server' is taken"),
    ("h", ["idc="], "--label: label 'idc' needs a value of 1 to 128 printable characters"),
    ("h", ["idc=a", "idc=b"], "--label: label 'idc' given twice"),
    ("h", [f"l{i}=v" for i in range(MAX_LABELS + 1)], f"at most {MAX_LABELS} labels"),
    ("two words", [], "host name must be 1 to 253 printable characters without spaces"),
])
def test_place_errors(host, labels, message):
    with pytest.raises(PlaceError) as info:
        Place.build(host, labels, environ={})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_agent_refuses_a_bad_label_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "deetune.agent", "--no-store", "--label", "idc", "--duration", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["deetune: --label: expected NAME=VALUE, got 'idc'"]


# ---- the Prometheus sink's fleet families --------------------------------------------------------


def _samples(sink: PrometheusSink) -> dict[tuple, float]:
    text = generate_latest(sink.registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _event(cls, **kw):
    fields = dict(ts=1, pid=10, comm="checkout", role="client", laddr="10.1.0.1", lport=40000,
                  raddr="10.1.0.2", rport=6379, sock_id=1, client_service="checkout", server_service="10.1.0.2:6379")
    fields.update(kw)
    if cls is ExchangeEvent:
        fields = dict(protocol="redis", method="GET", target="k", status="OK", error=False, latency_ns=1000,
                      duration_ns=None, request_bytes=10, response_bytes=5, **fields)
    else:
        fields = dict(phase="open", family=4, **fields)
    return cls(**fields)


def test_place_labels_on_every_series_and_the_endpoints_of_client_edges():
    local = {("127.0.0.1", 5432)}
    sink = PrometheusSink(serve=False, max_series=3, service_of=None,
                          is_local_listener=lambda addr, port, ts=None: (addr, port) in local)
    sink.set_place(Place("web-3", (("idc", "bj1"),)), api_port=9477)
    sink.handle(_event(ConnectionEvent))
    sink.handle(_event(ExchangeEvent))
    # a local server: its own side counts, nothing to join
    sink.handle(_event(ExchangeEvent, raddr="127.0.0.1", rport=5432, server_service="postgres", sock_id=2))
    # the server side of an edge: no remote endpoint
    sink.handle(_event(ExchangeEvent, role="server", laddr="10.1.0.1", lport=80, raddr="10.1.0.9", rport=50000,
                       client_service="10.1.0.9", server_service="checkout", sock_id=3))
    for port in (1, 2, 3):  # past the cap of 3 label sets
        sink.handle(_event(ConnectionEvent, rport=port, server_service=f"10.1.0.2:{port}", sock_id=10 + port))
    got = _samples(sink)
    assert got, "nothing exported"
    assert all(dict(labels).get("host") == "web-3" and dict(labels).get("idc") == "bj1" for _, labels in got)

    def family(name):
        return {frozenset(kv for kv in labels if kv[0] not in ("host", "idc")): v
                for (n, labels), v in got.items() if n == name}

    assert family("deetune_remote_endpoint") == {
        frozenset({("client", "checkout"), ("server", "10.1.0.2:6379"), ("address", "10.1.0.2"), ("port", "6379")}): 1,
        frozenset({("client", "checkout"), ("server", "10.1.0.2:1"), ("address", "10.1.0.2"), ("port", "1")}): 1,
        frozenset({("client", "checkout"), ("server", "10.1.0.2:2"), ("address", "10.1.0.2"), ("port", "2")}): 1,
    }
    assert family("deetune_endpoint_series_overflow_total")[frozenset({("family", "deetune_remote_endpoint")})] == 1
    info = family("deetune_agent_info")
    assert list(info) == [frozenset({("version", "0.1.0"), ("api_port", "9477")})]
    assert family("deetune_agent_start_time_seconds") and family("deetune_agent_time_seconds")
    sink.close()


# ---- the scrape config ---------------------------------------------------------------------------


def test_scrape_config_from_a_list_of_agents_passes_promtool(tmp_path):
    promtool = require_binary("promtool", "prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(scrape_config(["10.0.0.1:9464", "[fd00::1]:9464", "web-3.example:9464"], interval="10s"))
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert '- targets: ["10.0.0.1:9464", "[fd00::1]:9464", "web-3.example:9464"]' in config.read_text()


def test_scrape_config_with_file_based_discovery(tmp_path):
    promtool = require_binary("promtool", "prometheus")
    targets = tmp_path / "agents.json"
    out = subprocess.run([sys.executable, "-m", "deetune.server", "scrape-config", "--agent", "10.0.0.1:9464",
                          "--agent", "10.0.0.2:9464", "--file-sd", str(targets)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(targets.read_text()) == [{"targets": ["10.0.0.1:9464", "10.0.0.2:9464"], "labels": {}}]
    config = tmp_path / "prometheus.yml"
    config.write_text(out.stdout)
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f'files: ["{targets}"]' in out.stdout
    # Agents from a file, rewritten in place.
    listing = tmp_path / "agents.txt"
    listing.write_text("# the fleet\n10.0.0.3:9464\n\n10.0.0.4:9464  # rack 2\n")
    write_file_sd(str(targets), ["10.0.0.3:9464", "10.0.0.4:9464"])
    assert json.loads(targets.read_text())[0]["targets"] == ["10.0.0.3:9464", "10.0.0.4:9464"]


@pytest.mark.parametrize("argv, message", [
    (["scrape-config"], "deetune: give the agents: --agent HOST:PORT (repeatable) or --agents FILE"),
    (["scrape-config", "--agent", "10.0.0.1"], "deetune: agent must be HOST:PORT of its Prometheus sink"),
    (["scrape-config", "--agents", "/nonexistent/agents"], "deetune: --agents /nonexistent/agents: No such file"),
    (["scrape-config", "--agent", "a:1", "--scrape-interval", "soon"], "deetune: interval must be a Prometheus duration"),
    ([], "deetune: give --prometheus URL (an existing Prometheus) or --run-prometheus DIR (start one)"),
    (["--prometheus", "localhost:9090"], "deetune: --prometheus: Prometheus URL must be http(s)://HOST:PORT"),
    (["--prometheus", "http://127.0.0.1:1", "--api", "0.0.0.0:0"], "deetune: --api: binding the API to '0.0.0.0' needs"),
])
def test_server_usage_errors_are_one_line(argv, message):
    proc = subprocess.run([sys.executable, "-m", "deetune.server", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines


def test_check_target():
    assert check_target(" [::1]:9464 ") == "[::1]:9464"
    for bad in ("::1:9464", "host:0", "host:99999", "host"):
        with pytest.raises(ConfigError):
            check_target(bad)


# ---- the join, on hand-made rows -----------------------------------------------------------------


def test_join_names_both_ends_and_keeps_what_it_cannot_join():
    hosts = {
        "a": Host("a", {"idc": "x"}, "10.0.0.1:9464", 9477, "0.1.0", True, addresses={"10.0.0.1"}),
        "b": Host("b", {"idc": "y"}, "10.0.0.2:9464", 9477, "0.1.0", True, addresses={"10.0.0.2"},
                  listeners=[("api", 20, "0.0.0.0", 80)]),
        "c": Host("c", {"idc": "y"}, "10.0.0.3:9464", 9477, "0.1.0", False, addresses={"10.0.0.3"},
                  listeners=[("api", 30, "10.0.0.3", 80)]),
    }
    rows = {}

    def row(host, client, server, requests, protocol="http"):
        rows[(host, protocol, client, server)] = Side(host, protocol, client, server, {"requests": requests, "errors": 0})

    row("a", "web", "api-pool", 10)      # a mapping name for both api hosts: joined to "api"
    row("a", "web", "10.0.0.9:80", 3)    # nobody's address: external
    row("b", "10.0.0.1", "api", 6)       # host a's address: the server side of web → api
    row("c", "10.0.0.1", "api", 4)
    row("b", "203.0.113.7", "api", 2)    # an external client
    remote = {("a", "web", "api-pool"): {("10.0.0.2", 80), ("10.0.0.3", 80)},
              ("a", "web", "10.0.0.9:80"): {("10.0.0.9", 80)}}
    fleet = Fleet.join("idc", hosts, rows, {}, remote, 0, 1)
    graph = fleet.graph(None)
    edges = {(e["client"], e["server"]): e for e in graph["edges"]}
    assert set(edges) == {("web", "api"), ("web", "10.0.0.9:80"), ("203.0.113.7", "api")}
    joined = edges[("web", "api")]
    assert (joined["requests"], joined["server_side"]["requests"], joined["port"]) == (10, 10, 80)
    assert (joined["client_hosts"], joined["server_hosts"], joined["cross_idc"]) == (["a"], ["b", "c"], True)
    assert edges[("web", "10.0.0.9:80")]["joined"] is False
    assert edges[("203.0.113.7", "api")]["client_hosts"] == [] and edges[("203.0.113.7", "api")]["requests"] == 2
    nodes = {n["name"]: n for n in graph["nodes"]}
    assert nodes["10.0.0.9:80"]["external"] and nodes["203.0.113.7"]["external"] and not nodes["api"]["external"]
    assert [(i["host"], i["reporting"]) for i in nodes["api"]["instances"]] == [("b", True), ("c", False)]



def test_the_connection_counters_of_a_graph_without_detail_go_to_their_pairs_rows():
    """A pair's connection counters go to its row with the most requests; a pair without a row
    becomes a "tcp" row."""
    hosts = {
        "a": Host("a", {"idc": "x"}, "10.0.0.1:9464", 9477, "0.1.0", True, addresses={"10.0.0.1"},
                  listeners=[("web", 10, "0.0.0.0", 8080)]),
        "b": Host("b", {"idc": "y"}, "10.0.0.2:9464", 9477, "0.1.0", True, addresses={"10.0.0.2"},
                  listeners=[("api", 20, "0.0.0.0", 80), ("db", 21, "10.0.0.2", 5432)]),
        "c": Host("c", {}, "10.0.0.3:9464", 9477, "0.1.0", True, addresses={"10.0.0.3"},
                  listeners=[("api", 30, "10.0.0.3", 80)]),
    }

    def build():
        rows = {}

        def row(host, client, server, protocol="http", **metrics):
            rows[(host, protocol, client, server)] = Side(host, protocol, client, server,
                                                          {"requests": 7.0, "errors": 1.0, **metrics})

        row("a", "web", "10.0.0.2:80")                            # joined, one row each side
        row("a", "web", "10.0.0.2:80", protocol="grpc", requests=9.0)  # a pair of two protocols
        row("a", "cron", "10.0.0.2:80")                           # shares b's row for 10.0.0.1
        row("b", "10.0.0.1", "api")
        row("b", "10.0.0.1", "api", protocol="grpc")
        row("a", "web", "api-pool", latency_count=2.0, latency_sum=0.5)  # two server hosts, latency
        row("c", "10.0.0.1", "api")
        row("a", "web", "10.0.0.9:80")                            # external endpoint
        row("b", "203.0.113.7", "api")                            # external client
        row("b", "api", "10.0.0.2:5432", protocol="postgres")     # a local call
        row("b", "10.0.0.2", "db", protocol="postgres", errors=float("0"))
        remote = {("a", "web", "10.0.0.2:80"): {("10.0.0.2", 80)},
                  ("a", "cron", "10.0.0.2:80"): {("10.0.0.2", 80)},
                  ("a", "web", "api-pool"): {("10.0.0.2", 80), ("10.0.0.3", 80)},
                  ("a", "web", "10.0.0.9:80"): {("10.0.0.9", 80)},
                  ("b", "api", "10.0.0.2:5432"): {("10.0.0.2", 5432)}}
        pairs = {("a", "web", "10.0.0.2:80"): {"connections_opened": 3.0, "connections_failed": 1.0},
                 ("b", "10.0.0.1", "api"): {"connections_opened": 4.0},
                 ("a", "web", "10.0.0.5:22"): {"connections_opened": 1.0}}  # no row: a tcp row
        fleet = Fleet.join("idc", hosts, rows, pairs, remote, 0, 1)
        fleet.partial = True
        return fleet

    edges = {(e["client"], e["server"], e["protocol"]): e for e in build().graph(None)["edges"]}
    # The pair's counters went to its row with the most requests; the pair without a row is "tcp".
    assert edges[("web", "api", "grpc")]["connections_opened"] == 3
    assert edges[("web", "api", "http")]["connections_opened"] == 0
    assert edges[("web", "10.0.0.5:22", "tcp")]["connections_opened"] == 1
    assert edges[("web", "api", "http")]["server_side"]["shared"] is True

# ---- OTLP: many agents into one collector ------------------------------------------------------


def test_agents_spans_gathered_by_one_collector_carry_their_place():
    """What a collector's otlp receiver gets from two agents: each one's place on its resources."""
    from tests.test_otlp import Receiver, exchange

    from deetune.sinks.otlp import OtlpSink

    receiver = Receiver()
    sinks = []
    try:
        for host, idc in (("web-1", "bj1"), ("db-1", "sh2")):
            sink = OtlpSink(endpoint=receiver.url, metric_interval=60.0, schedule_delay=0.2)
            sink.set_place(Place(host, (("idc", idc),)))
            sinks.append(sink)
            sink.handle(exchange())
            assert sink.flush(10)
        spans = receiver.wait_spans(2)
        assert sorted((r["host.name"], r["idc"], r["service.name"]) for r, _ in spans) == [
            ("db-1", "sh2", "nginx"), ("web-1", "bj1", "nginx")]
        for sink in sinks:
            sink.close()  # exports the metrics
        from tests.test_otlp import attributes

        places = {(a["host.name"], a["idc"]) for request in receiver.metrics for rm in request.resource_metrics
                  for a in [attributes(rm.resource.attributes)]}
        assert places == {("web-1", "bj1"), ("db-1", "sh2")}
    finally:
        for sink in sinks:
            sink.close()
        receiver.close()


def test_collector_config_example_receives_what_the_sink_sends():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "examples" / "otel-collector" / "config.yaml").read_text())
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    pipelines = config["service"]["pipelines"]
    assert "otlp" in pipelines["traces"]["receivers"] and "otlp" in pipelines["metrics"]["receivers"]
    for pipeline in pipelines.values():
        assert set(pipeline["exporters"]) <= set(config["exporters"])
        assert set(pipeline.get("processors", [])) <= set(config["processors"])


# ---- the agent's /api/series and /api/hosts ------------------------------------------------------


def test_agent_series_per_step_from_its_store(tmp_path):
    """RED over time on an agent: each step's edges asked of the store; its place on /api/hosts."""
    import urllib.request

    from deetune.api.routes import AgentPlaceRoutes
    from deetune.api.server import ApiServer
    from deetune.topology.model import EdgeKey, EdgeStats, EdgeWindowEvent
    from deetune.topology.store import TopologyStore

    second = 1_000_000_000
    now = 1_750_000_000 * second
    events = []
    for minute, (requests, errors) in enumerate([(10, 1), (0, 0), (30, 3)]):
        stats = EdgeStats(requests=requests, errors=errors)
        for _ in range(requests):
            stats.add_latency(2_000_000)
        start = now - (3 - minute) * 60 * second
        events.append(EdgeWindowEvent(start + 10 * second, key=EdgeKey("web", "db", "redis", 6379), window_start=start,
                                      window_ns=10 * second, stats=stats))
    store = TopologyStore(tmp_path / "t.db", clock=lambda: now)
    try:
        store.write(events)
        with ApiServer(store, clock=lambda: now, extensions=[AgentPlaceRoutes(Place("h1", (("idc", "bj1"),)))]) as srv:
            def get(path):
                with urllib.request.urlopen(srv.url + path) as response:
                    return json.load(response)

            answer = get("/api/series?service=db&window=3m&step=1m")
            assert [(p["t"], p["requests"], p["errors"]) for p in answer["points"]] == [
                (now - 120 * second, 10, 1), (now - 60 * second, 0, 0), (now, 30, 3)]
            assert answer["points"][2]["latency_p99_ns"] > 0 and answer["points"][1]["latency_p99_ns"] is None
            edge = get("/api/series?client=web&server=db&protocol=redis&port=6379&window=3m&step=1m")
            assert [p["requests"] for p in edge["points"]] == [10, 0, 30]
            assert get("/api/hosts")["hosts"] == [{"name": "h1", "labels": {"idc": "bj1"}, "idc": "bj1",
                                                   "reporting": True}]
            with pytest.raises(urllib.error.HTTPError) as info:
                get("/api/series?service=db&client=web")
            assert info.value.code == 400
    finally:
        store.close()


# ---- the recording rules -------------------------------------------------------------------------


def test_scrape_config_writes_and_loads_the_recording_rules(tmp_path):
    promtool = require_binary("promtool", "prometheus")
    rules = tmp_path / "deetune-rules.yml"
    out = subprocess.run([sys.executable, "-m", "deetune.server", "scrape-config", "--agent", "10.0.0.1:9464",
                          "--scrape-interval", "10s", "--rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f'rule_files: ["{rules}"]' in out.stdout.splitlines()
    config = tmp_path / "prometheus.yml"
    config.write_text(out.stdout)
    check = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 1 rule files found" in check.stdout, check.stdout + check.stderr
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0 and f"SUCCESS: {len(RECORDED) + 1} rules found" in check.stdout, check.stdout
    text = rules.read_text()
    assert "    interval: 10s" in text.splitlines()
    assert ('- record: "rowkey:deetune_requests_total:sum"\n'
            '        expr: "sum by (key) (label_join(sum by (host, protocol, client, server) (deetune_requests_total), '
            '\\"key\\", \\"\\\\u001f\\", \\"host\\", \\"protocol\\", \\"client\\", \\"server\\"))"') in text
    assert ('- record: "endpointkey:deetune_remote_endpoint:max"\n'
            '        expr: "max by (key) (label_join(max by (host, client, server, address, port) (deetune_remote_endpoint), '
            '\\"key\\", \\"\\\\u001f\\", \\"host\\", \\"client\\", \\"server\\", \\"address\\", \\"port\\"))"') in text
    assert '- record: "deetune:recording_rules"\n        expr: "vector(1)"\n        labels: {"version": "2"}' in text


class _Asked(Prometheus):
    """A Prometheus client that keeps the expressions it was asked."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.asked: list[str] = []

    def many(self, queries, each=None):
        self.asked += [args[0] for args in queries.values()]
        return super().many(queries, each)


def _fleet_openmetrics(t0: int, cron: str = "cron") -> str:
    """Four agents' series every 15 s over [t0, t0 + 1200] (host c's until t0 + 450: its agent goes
    away; host d's from t0 + 600: its agent started then): a's web calls api on b (and an endpoint no
    agent owns, connections only), c calls api on b too, d's ``cron`` an endpoint no agent owns; the
    counters step up once, at t0 + 300 (d's: 3 × their count from t0 + 600, 4 × from t0 + 900)."""
    families: dict[str, tuple[str, list[tuple[dict, float]]]] = {}

    def add(name, kind, labels, value):
        families.setdefault(name, (kind, []))[1].append((labels, value))

    hosts = {"a": "10.0.0.1", "b": "10.0.0.2", "c": "10.0.0.3"}
    for host, address in hosts.items():
        base = {"host": host, "idc": "x", "instance": f"{address}:9464", "job": "deetune"}
        add("deetune_agent_info", "gauge", {**base, "version": "0.1.0", "api_port": "9477"}, 1)
        add("deetune_agent_start_time_seconds", "gauge", base, t0 - 3600)
        add("deetune_host_address", "gauge", {**base, "address": address}, 1)
        if host != "b":  # a client of api on b
            add("deetune_remote_endpoint", "gauge", {**base, "client": "web", "server": "10.0.0.2:80",
                                                     "address": "10.0.0.2", "port": "80"}, 1)
            for status, count in (("200", 7), ("500", 2)):
                labels = {**base, "protocol": "http", "client": "web", "server": "10.0.0.2:80", "method": "GET",
                          "status": status}
                add("deetune_requests", "counter", labels, count)
                add("deetune_request_errors", "counter", labels, count if status == "500" else 0)
            add("deetune_connections_opened", "counter", {**base, "client": "web", "server": "10.0.0.2:80"}, 3)
            add("deetune_connections_failed", "counter", {**base, "client": "web", "server": "10.0.0.2:80"}, 1)
        else:
            add("deetune_listen_endpoint", "gauge", {**base, "service": "api", "pid": "20", "address": "0.0.0.0",
                                                     "port": "80"}, 1)
            for client in ("10.0.0.1", "10.0.0.3"):
                for method, count in (("GET", 9), ("POST", 1)):
                    labels = {**base, "protocol": "http", "client": client, "server": "api", "method": method,
                              "status": "200"}
                    add("deetune_requests", "counter", labels, count)
                    add("deetune_request_errors", "counter", labels, 0)
                add("deetune_connections_opened", "counter", {**base, "client": client, "server": "api"}, 3)
                add("deetune_connections_failed", "counter", {**base, "client": client, "server": "api"}, 0)
    d = {"host": "d", "idc": "y", "instance": "10.0.0.4:9464", "job": "deetune"}
    add("deetune_agent_info", "gauge", {**d, "version": "0.1.0", "api_port": "9477"}, 1)
    add("deetune_agent_start_time_seconds", "gauge", d, t0 + 600)
    add("deetune_host_address", "gauge", {**d, "address": "10.0.0.4"}, 1)
    add("deetune_remote_endpoint", "gauge", {**d, "client": cron, "server": "10.0.0.8:6379", "address": "10.0.0.8",
                                             "port": "6379"}, 1)
    for status, count in (("OK", 5), ("ERR", 1)):
        labels = {**d, "protocol": "redis", "client": cron, "server": "10.0.0.8:6379", "method": "GET",
                  "status": status}
        add("deetune_requests", "counter", labels, count)
        add("deetune_request_errors", "counter", labels, count if status == "ERR" else 0)
    add("deetune_connections_opened", "counter", {**d, "client": cron, "server": "10.0.0.8:6379"}, 2)
    add("deetune_connections_failed", "counter", {**d, "client": cron, "server": "10.0.0.8:6379"}, 0)
    a = {"host": "a", "idc": "x", "instance": "10.0.0.1:9464", "job": "deetune"}
    add("deetune_remote_endpoint", "gauge", {**a, "client": "web", "server": "10.0.0.9:5432", "address": "10.0.0.9",
                                             "port": "5432"}, 1)
    add("deetune_connections_opened", "counter", {**a, "client": "web", "server": "10.0.0.9:5432"}, 5)
    add("deetune_connections_failed", "counter", {**a, "client": "web", "server": "10.0.0.9:5432"}, 4)
    lines = []
    for name, (kind, samples) in families.items():
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{v}"' for k, v in labels.items())
            sample = f"{name}_total" if kind == "counter" else name
            for t in range(t0, t0 + 1201, 15):
                if labels["host"] == "c" and t > t0 + 450 or labels["host"] == "d" and t < t0 + 600:
                    continue
                # Counters: 10 × their count before t0 + 300, 11 × from then on (d's: 3 ×, then 4 × from t0 + 900).
                if labels["host"] == "d":
                    at = value * (3 if t < t0 + 900 else 4) if kind == "counter" else value
                else:
                    at = value * (10 if t < t0 + 300 else 11) if kind == "counter" else value
                lines.append(f"{sample}{{{text}}} {at} {t}")
    return "\n".join(lines) + "\n# EOF\n"


def _backfilled(tmp_path, text: str, t0: int, before_rules):
    """Prometheus on the series of ``text``: ``before_rules(url)`` called on them alone, then the
    recording rules backfilled from t0 + 240 (as when they were loaded then); Prometheus restarted
    with them (stop it)."""
    promtool = require_binary("promtool", "prometheus")
    require_binary("prometheus", "prometheus")
    (tmp_path / "fleet.om").write_text(text)
    subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", "-q", str(tmp_path / "fleet.om"),
                    str(tmp_path / "prom" / "data")], check=True)
    rules = tmp_path / "rules.yml"
    rules.write_text(rules_file("15s"))
    prometheus = PrometheusProcess(str(tmp_path / "prom"), scrape_config([], interval="15s"), ("127.0.0.1", 0))
    try:
        before_rules(prometheus.url)
        subprocess.run([promtool, "tsdb", "create-blocks-from", "rules", "-q", f"--url={prometheus.url}",
                        f"--start={t0 + 240}", f"--end={t0 + 1500}", f"--output-dir={tmp_path / 'rules'}", str(rules)],
                       check=True)
    finally:
        prometheus.stop()
    for block in (tmp_path / "rules").iterdir():
        block.rename(tmp_path / "prom" / "data" / block.name)
    return PrometheusProcess(str(tmp_path / "prom"), scrape_config([], interval="15s"), ("127.0.0.1", 0))


#: What each family of RECORDED is read by from the raw series.
_RAW = [f"sum by ({', '.join(by)}) ({metric})" if by != ENDPOINT else metric for _r, metric, by in RECORDED.values()]


def _asks_raw(raw: str, asked: list[str]) -> bool:
    """Whether any expression asked reads ``raw`` (a recorded family's name, which may hold it, aside)."""
    for expr in asked:
        for record, _m, _by in RECORDED.values():
            expr = expr.replace(record, "")
        if raw in expr:
            return True
    return False


def test_the_recorded_series_give_the_same_fleet_and_are_read_only_where_they_cover_the_range(tmp_path):
    """Prometheus on four agents' series, then the recording rules backfilled from a later time (as
    when they were loaded then): a range they cover is read from them, one they do not from the raw
    families, each with the same answers as without the rules (a host gone stale, and one whose
    agent started in the range, included)."""
    t0 = int(time.time()) // 60 * 60 - 1800
    # At `until`, host c's series (raw and recorded) are stale: read at their last samples.
    since, until, later = (t0 + 150) * NS, (t0 + 1230) * NS, (t0 + 270) * NS
    expected = {}

    def before_rules(url):
        raw = FleetQueries(Prometheus(url), use_rules=False)
        expected.update({(since, until): raw.graph(since, until), (later, until): raw.graph(later, until)})
        # Before the rules: read from the raw families.
        asked = _Asked(url)
        assert FleetQueries(asked).graph(since, until) == expected[(since, until)]
        assert not any(record in expr for expr in asked.asked for record, _m, _by in RECORDED.values())

    prometheus = _backfilled(tmp_path, _fleet_openmetrics(t0), t0, before_rules)
    try:
        for (start, end), answer in expected.items():
            asked = _Asked(prometheus.url)
            assert FleetQueries(asked).graph(start, end) == answer
            used = {record for record, _m, _by in RECORDED.values() if any(record in e for e in asked.asked)}
            if start == since:  # the rules' series begin after `since`: not read
                assert used == set() and all(_asks_raw(s, asked.asked) for s in _RAW), asked.asked
            else:  # read instead of the raw families they sum
                assert used == {record for record, _m, _by in RECORDED.values()}, asked.asked
                assert not any(_asks_raw(s, asked.asked) for s in _RAW), asked.asked
                # c's (stale) recorded series at their last samples, by its key.
                assert 'last_over_time(rowkey:deetune_requests_total:sum{key=~"(?:c)\\\\x1f(?s:.*)"}[960s])' \
                    in asked.asked, asked.asked
        # What they read: web → api joined (a's and c's client sides), the connections-only edge, d's
        # cron from 0 (its agent started after `later`).
        edges = {(e["client"], e["server"], e["protocol"]): e for e in expected[(later, until)]["edges"]}
        assert set(edges) == {("web", "api", "http"), ("web", "10.0.0.9:5432", "tcp"),
                              ("cron", "10.0.0.8:6379", "redis")}
        web = edges[("web", "api", "http")]
        assert (web["requests"], web["errors"], web["connections_opened"], web["connections_failed"]) == (18, 4, 6, 2)
        assert (web["server_side"]["requests"], web["client_hosts"], web["joined"]) == (20, ["a", "c"], True)
        tcp = edges[("web", "10.0.0.9:5432", "tcp")]
        assert (tcp["requests"], tcp["connections_opened"], tcp["connections_failed"]) == (0, 5, 4)
        cron = edges[("cron", "10.0.0.8:6379", "redis")]
        assert (cron["requests"], cron["errors"], cron["connections_opened"], cron["joined"]) == (24, 4, 8, False)
        hosts = {h["name"]: h["reporting"] for h in expected[(later, until)]["hosts"]}
        assert hosts == {"a": True, "b": True, "c": False, "d": True}
    finally:
        prometheus.stop()


def test_a_label_value_holding_the_recorded_keys_separator_sends_the_fleet_to_the_raw_families(tmp_path):
    """A service named with the separator the recording rules pack labels with: its keys split into
    more parts than they pack; the fleet is read again from the raw families, the same answer."""
    t0 = int(time.time()) // 60 * 60 - 1800
    later, until = (t0 + 270) * NS, (t0 + 1230) * NS
    expected = {}

    def before_rules(url):
        expected["graph"] = FleetQueries(Prometheus(url), use_rules=False).graph(later, until)

    prometheus = _backfilled(tmp_path, _fleet_openmetrics(t0, cron="cron\x1fd"), t0, before_rules)
    try:
        asked = _Asked(prometheus.url)
        assert FleetQueries(asked).graph(later, until) == expected["graph"]
        assert any(record in e for e in asked.asked for record, _m, _by in RECORDED.values()), asked.asked
        assert all(_asks_raw(s, asked.asked) for s in _RAW), asked.asked
        edges = {(e["client"], e["server"]): e for e in expected["graph"]["edges"]}
        cron = edges[("cron\x1fd", "10.0.0.8:6379")]
        assert (cron["requests"], cron["errors"], cron["connections_opened"], cron["joined"]) == (24, 4, 8, False)
        assert (edges[("web", "api")]["requests"], len(edges)) == (18, 3)
    finally:
        prometheus.stop()


def test_a_recorded_key_of_more_parts_than_it_packs_is_refused():
    with pytest.raises(_Ambiguous):
        _unpack([({"__name__": "r", "key": "h\x1fweb\x1fapi\x1fx"}, 1.0)], PAIR)
    assert _unpack([({"key": "h\x1f\x1fapi"}, 1.0, 2.0)], PAIR) == [({"host": "h", "server": "api"}, 1.0, 2.0)]
    hosts = {"h": Host("h", {}, "", 0, "", True)}
    pairs: dict = collections.defaultdict(dict)
    FleetQueries._read_increases("connections_opened", [({"key": "h\x1fweb\x1fapi"}, 2.0, 5.0),
                                                        ({"key": "g\x1fweb\x1fapi"}, None, 1.0)],
                                 hosts, pairs, True, True)
    assert pairs == {("h", "web", "api"): {"connections_opened": 3.0}}
    with pytest.raises(_Ambiguous):
        FleetQueries._read_increases("connections_opened", [({"key": "h\x1fweb\x1fapi\x1fx"}, None, 1.0)],
                                     hosts, pairs, True, True)


def test_many_hands_each_answer_over_as_it_arrives_and_returns_them_all():
    """``each`` is called once per query, in the calling thread, with its answer; its error is raised."""
    import http.server
    import threading
    import urllib.parse

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
            asked.append(form["query"][0])
            if form["query"][0] == "slow":
                time.sleep(0.2)  # answered after the others, which were asked after it
            body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
                {"metric": {"q": form["query"][0]}, "value": [float(form["time"][0]), "1"]}]}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    asked: list[str] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prom = Prometheus(f"http://127.0.0.1:{server.server_address[1]}", in_flight=2)
    try:
        seen = []
        got = prom.many({name: (name, 1.0) for name in ("slow", "a", "b", "c")},
                        lambda name, answer: seen.append((name, answer, threading.current_thread())))
        assert sorted(name for name, _, _ in seen) == ["a", "b", "c", "slow"]
        assert seen[-1][0] == "slow"
        assert all(thread is threading.current_thread() for _, _, thread in seen)
        assert got == {}  # each answer was let go once read
        assert {name: answer for name, answer, _ in seen} == {n: [({"q": n}, 1.0)] for n in ("slow", "a", "b", "c")}
        assert prom.many({"a": ("a", 1.0), "b": ("b", 1.0)}) == {n: [({"q": n}, 1.0)] for n in "ab"}
        # An error of `each` is raised; the queries not yet asked stay unasked.
        asked.clear()
        one = Prometheus(prom.url, in_flight=1, workers=1)

        def refuse(name, answer):
            raise ValueError(name)

        with pytest.raises(ValueError, match="^a$"):
            one.many({name: (name, 1.0) for name in ("a", "slow", "c")}, refuse)
        one._pool.shutdown(wait=True)
        assert asked[0] == "a" and "c" not in asked, asked  # `slow` may have been asked with a's answer in
    finally:
        prom.close()
        server.shutdown()
        server.server_close()
