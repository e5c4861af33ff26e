"""The fleet server end to end: three hosts (network namespaces on a bridge) in two IDCs, an agent
on each (``--netns``), a client on host-a calling nginx on host-b, which proxies to an app on
host-c, which calls redis-server on host-c; the client also calls redis directly and a server on
a fourth namespace that runs no agent.  One real Prometheus (started by the server itself,
``--run-prometheus``) scrapes the three agents; everything is asserted through the server's API
and its web UI in headless Chromium."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import urllib.parse

import pytest

from tests.fleet_hosts import Fleet, http_json
from tests.servers import free_port, require_binary

pytestmark = [pytest.mark.bpf, pytest.mark.servers]

TOKEN = "fleet-s3cret"
METRICS_PORT, API_PORT, NGINX_PORT, APP_PORT, REDIS_PORT, EXTERNAL_PORT = 9464, 9477, 8080, 8000, 6379, 9000
OK_REQUESTS, FAILED_REQUESTS = 6, 3
REQUESTS = OK_REQUESTS + FAILED_REQUESTS

#: An HTTP/1.1 keep-alive server; with a redis port, one GET per request on one connection.
#: /fail answers 500.
APP = r"""
import socket, sys, threading
port, redis_port = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(64)
lock = threading.Lock()
redis = None

def redis_get():
    global redis
    with lock:
        if redis is None:  # at the first request: the agent sees the connection open
            redis = socket.create_connection(("127.0.0.1", redis_port))
        redis.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        data = b""
        while not data.endswith(b"\r\n") or (data.startswith(b"$") and data.count(b"\r\n") < 2 and not data.startswith(b"$-1")):
            data += redis.recv(4096)

def serve(conn):
    buf = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            if redis_port:
                redis_get()
            status = b"500 Internal Server Error" if path.startswith(b"/fail") else b"200 OK"
            conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 3\r\n\r\nok\n")

while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

#: The client: HTTP to nginx (keep-alive), Redis commands, HTTP to the external server.
CLIENT = r"""
import socket, sys, time
nginx, redis, external = sys.argv[1:4]
ok, failed = int(sys.argv[4]), int(sys.argv[5])

def http(address, paths):
    host, port = address.split(":")
    with socket.create_connection((host, int(port))) as s:
        for path in paths:
            s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"ok\n"):
                data += s.recv(4096)

http(nginx, ["/ok"] * ok + ["/fail"] * failed)
host, port = redis.split(":")
with socket.create_connection((host, int(port))) as s:
    for command, reply in ((b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n", b"+OK\r\n"),
                           (b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", b"$1\r\nv\r\n"),
                           (b"*2\r\n$4\r\nINCR\r\n$1\r\nk\r\n", b"-ERR"),
                           (b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", b"$1\r\nv\r\n")):
        s.sendall(command)
        data = b""
        while not data.endswith(b"\r\n") or (data.startswith(b"$") and data.count(b"\r\n") < 2):
            data += s.recv(4096)
        assert data.startswith(reply), data
http(external, ["/ext", "/ext"])
print("done", flush=True)
time.sleep(3)  # alive while the agent names it (a process gone is named by its comm)
"""

NGINX_CONF = """\
master_process off;
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/cb; proxy_temp_path {dir}/px; fastcgi_temp_path {dir}/fc;
    uwsgi_temp_path {dir}/uw; scgi_temp_path {dir}/sc;
    upstream app {{ server {app}; keepalive 4; }}
    server {{
        listen 0.0.0.0:{port};
        location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
}}
"""


def _agent(fleet: Fleet, host: str, idc: str, tmp_path) -> object:
    return fleet.spawn(None, [sys.executable, "-m", "deetune.agent", "--netns", fleet.namespaces[host],
                              "--host-name", host, "--label", f"idc={idc}", "--label", "zone=z1",
                              "--sink", f"prometheus:0.0.0.0:{METRICS_PORT}", "--api", f"0.0.0.0:{API_PORT}",
                              "--api-token", TOKEN, "--store", str(tmp_path / f"{host}.db"), "--window", "1",
                              # Exact counts on a shared, busy machine: no overload sampling for CPU.
                              "--busy-cpu", "off"],
                       log=str(tmp_path / f"agent-{host}.log"))


def _wait_healthy(fleet: Fleet, host: str, proc, tmp_path, timeout: float = 90) -> None:
    url = f"http://{fleet.hosts[host]}:{API_PORT}/healthz"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"agent on {host} exited {proc.returncode}: "
                                 + (tmp_path / f"agent-{host}.log").read_text()[-2000:])
        try:
            http_json(url, timeout=2)
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"agent on {host} not healthy after {timeout}s")
        time.sleep(0.3)


class FleetUnderTest:
    def __init__(self, fleet: Fleet, server_url: str, agents: dict, addresses: dict) -> None:
        self.fleet = fleet
        self.url = server_url
        self.agents = agents
        self.addresses = addresses

    def api(self, path: str, **params) -> object:
        query = urllib.parse.urlencode({"window": "1h", **params})
        return http_json(f"{self.url}{path}?{query}", token=TOKEN)

    def edges(self) -> dict[tuple, dict]:
        return {(e["client"], e["server"], e["protocol"], e["port"]): e for e in self.api("/api/topology")["edges"]}


def _expected(addresses: dict) -> dict[tuple, tuple[int, int]]:
    return {
        ("client", "nginx", "http", NGINX_PORT): (REQUESTS, FAILED_REQUESTS),
        ("nginx", "app", "http", APP_PORT): (REQUESTS, FAILED_REQUESTS),
        ("app", "redis-server", "redis", REDIS_PORT): (REQUESTS, 0),
        ("client", "redis-server", "redis", REDIS_PORT): (4, 1),
        ("client", f"{addresses['external']}:{EXTERNAL_PORT}", "http", EXTERNAL_PORT): (2, 0),
    }


@pytest.fixture(scope="module")
def fleet_server(tmp_path_factory):
    require_binary("prometheus", "prometheus")
    nginx = require_binary("nginx", "nginx")
    redis = require_binary("redis-server", "redis-server")
    tmp_path = tmp_path_factory.mktemp("fleet")
    fleet = Fleet()
    try:
        addresses = {name: fleet.add_host(name) for name in ("host-a", "host-b", "host-c", "external")}
        # Servers first: the agents must not see the connections that check they listen.
        redis_dir = tmp_path / "redis"
        redis_dir.mkdir()
        proc = fleet.spawn("host-c", [redis, "--port", str(REDIS_PORT), "--bind", "0.0.0.0", "--protected-mode", "no",
                                      "--save", "", "--appendonly", "no", "--dir", str(redis_dir)],
                           log=str(redis_dir / "redis.log"))
        fleet.wait_listening("host-c", REDIS_PORT, proc)
        proc = fleet.spawn("host-c", [sys.executable, "-c", APP, str(APP_PORT), str(REDIS_PORT)],
                           env={"DEETUNE_SERVICE": "app"}, log=str(tmp_path / "app.log"))
        fleet.wait_listening("host-c", APP_PORT, proc)
        nginx_dir = tmp_path / "nginx"
        nginx_dir.mkdir()
        (nginx_dir / "nginx.conf").write_text(NGINX_CONF.format(dir=nginx_dir, port=NGINX_PORT,
                                                                app=f"{addresses['host-c']}:{APP_PORT}"))
        proc = fleet.spawn("host-b", [nginx, "-p", str(nginx_dir), "-c", str(nginx_dir / "nginx.conf"),
                                      "-e", str(nginx_dir / "error.log")], log=str(nginx_dir / "out.log"))
        fleet.wait_listening("host-b", NGINX_PORT, proc)
        proc = fleet.spawn("external", [sys.executable, "-c", APP, str(EXTERNAL_PORT), "0"],
                           log=str(tmp_path / "external.log"))
        fleet.wait_listening("external", EXTERNAL_PORT, proc)
        agents = {host: _agent(fleet, host, idc, tmp_path)
                  for host, idc in (("host-a", "bj1"), ("host-b", "bj1"), ("host-c", "sh2"))}
        for host, proc in agents.items():
            _wait_healthy(fleet, host, proc, tmp_path)
        # The server, and its own Prometheus scraping the three agents.
        port = free_port()
        server = fleet.spawn(None, [sys.executable, "-m", "deetune.server", "--run-prometheus", str(tmp_path / "prom"),
                                    "--scrape-interval", "1s", "--api", f"127.0.0.1:{port}", "--api-token", TOKEN,
                                    "--agent-token", TOKEN,
                                    *[arg for host in agents for arg in ("--agent", f"{addresses[host]}:{METRICS_PORT}")]],
                             log=str(tmp_path / "server.log"))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                http_json(f"{url}/healthz", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)
        under_test = FleetUnderTest(fleet, url, agents, addresses)
        # Every agent scraped before the traffic: its host is in the fleet.
        deadline = time.monotonic() + 60
        while len([h for h in under_test.api("/api/hosts")["hosts"] if h["reporting"]]) < 3:
            assert time.monotonic() < deadline, under_test.api("/api/hosts")
            time.sleep(0.5)
        done = fleet.run("host-a", [sys.executable, "-c", CLIENT, f"{addresses['host-b']}:{NGINX_PORT}",
                                    f"{addresses['host-c']}:{REDIS_PORT}", f"{addresses['external']}:{EXTERNAL_PORT}",
                                    str(OK_REQUESTS), str(FAILED_REQUESTS)], env={"DEETUNE_SERVICE": "client"})
        assert done.stdout.strip() == "done", done.stderr
        # Until every agent's counts are scraped.
        expected = _expected(addresses)
        deadline = time.monotonic() + 90
        while True:
            edges = under_test.edges()
            got = {key: (e["requests"], e["errors"]) for key, e in edges.items() if key in expected}
            joined = all(e["joined"] and e["server_side"]["latency_p50_ns"] and e["latency_p50_ns"]
                         for k, e in edges.items()
                         if k in expected and k[0] != "app" and not k[1].startswith(addresses["external"]))
            # The agents' stores commit their exchanges about once a second.
            kept = [x for x in under_test.api("/api/exchanges", service="nginx", limit="100")["exchanges"]
                    if x["server"] == "nginx"]
            if got == expected and joined and len(kept) == 2 * REQUESTS:
                break
            if time.monotonic() > deadline:
                break  # the test's assertions say what is missing
            time.sleep(0.5)
        yield under_test
    finally:
        fleet.close()


def test_fleet_topology_through_the_server_api(fleet_server):
    addresses = fleet_server.addresses
    edges = fleet_server.edges()
    expected = _expected(addresses)
    # One edge per call path, both services named, exact request and error counts; nothing else.
    assert {k: (e["requests"], e["errors"]) for k, e in edges.items()} == expected
    # Joined across hosts: the client's count and the server's, and both sides' latency.
    for key in (("client", "nginx", "http", NGINX_PORT), ("nginx", "app", "http", APP_PORT),
                ("client", "redis-server", "redis", REDIS_PORT)):
        edge = edges[key]
        assert edge["joined"], edge
        assert edge["server_side"]["requests"] == edge["requests"] and edge["server_side"]["errors"] == edge["errors"]
        assert edge["client_side"]["latency_p50_ns"] > 0 and edge["server_side"]["latency_p50_ns"] > 0
        assert edge["latency_avg_ns"] >= edge["server_side"]["latency_avg_ns"] > 0
        assert edge["network_latency_avg_ns"] == edge["latency_avg_ns"] - edge["server_side"]["latency_avg_ns"]
    assert edges[("client", "nginx", "http", NGINX_PORT)]["client_hosts"] == ["host-a"]
    assert edges[("client", "nginx", "http", NGINX_PORT)]["server_hosts"] == ["host-b"]
    local = edges[("app", "redis-server", "redis", REDIS_PORT)]
    assert (local["client_hosts"], local["server_hosts"], local["joined"]) == (["host-c"], ["host-c"], False)
    # Cross-IDC edges flagged and listed: host-a and host-b are in bj1, host-c in sh2.
    assert {k for k, e in edges.items() if e["cross_idc"]} == {("nginx", "app", "http", APP_PORT),
                                                               ("client", "redis-server", "redis", REDIS_PORT)}
    listed = fleet_server.api("/api/cross-idc")["edges"]
    assert sorted((e["client"], e["server"], e["idcs"][0]["client"], e["idcs"][0]["server"]) for e in listed) == [
        ("client", "redis-server", "bj1", "sh2"), ("nginx", "app", "bj1", "sh2")]
    # The server without an agent: an external endpoint.
    nodes = {n["name"]: n for n in fleet_server.api("/api/topology")["nodes"]}
    external = f"{addresses['external']}:{EXTERNAL_PORT}"
    assert nodes[external]["external"] is True and nodes[external]["instances"] == []
    assert {name: sorted(i["host"] for i in n["instances"]) for name, n in nodes.items()} == {
        "client": ["host-a"], "nginx": ["host-b"], "app": ["host-c"], "redis-server": ["host-c"], external: []}
    # Impact analysis: who depends on redis-server, transitively.
    upstream = fleet_server.api("/api/services/redis-server/dependencies", depth="10", direction="upstream")
    hops = {n["name"]: n["hops"] for n in upstream["nodes"]}
    assert hops == {"redis-server": 0, "app": 1, "client": 1, "nginx": 2}
    downstream = fleet_server.api("/api/services/client/dependencies", depth="10", direction="downstream")
    assert {n["name"]: n["hops"] for n in downstream["nodes"]} == {
        "client": 0, "nginx": 1, "redis-server": 1, external: 1, "app": 2}
    # Hosts, with their labels and IDCs.
    hosts = {h["name"]: h for h in fleet_server.api("/api/hosts")["hosts"]}
    assert {name: (h["idc"], h["labels"], h["reporting"]) for name, h in hosts.items()} == {
        "host-a": ("bj1", {"idc": "bj1", "zone": "z1"}, True),
        "host-b": ("bj1", {"idc": "bj1", "zone": "z1"}, True),
        "host-c": ("sh2", {"idc": "sh2", "zone": "z1"}, True)}
    assert hosts["host-b"]["addresses"] == [addresses["host-b"]]


def test_fleet_exchanges_come_from_the_agents(fleet_server):
    """Per-request detail: the server asks the agents (token-authenticated) and says which host."""
    answer = fleet_server.api("/api/exchanges", service="nginx", limit="100")["exchanges"]
    assert {(x["client"], x["server"]) for x in answer} == {("client", "nginx"), ("nginx", "app")}
    got = [x for x in answer if x["server"] == "nginx"]
    # Each of host-a and host-b kept the 9 exchanges (each agent its side), named as in the fleet.
    assert sorted((x["host"], x["client"], x["server"], x["target"], x["error"]) for x in got) == sorted(
        (host, "client", "nginx", target, target == "/fail")
        for host in ("host-a", "host-b") for target in ["/ok"] * OK_REQUESTS + ["/fail"] * FAILED_REQUESTS)
    b = fleet_server.addresses["host-b"]
    assert {(x["host"], x["agent_client"], x["agent_server"]) for x in got} == {
        ("host-a", "client", f"{b}:{NGINX_PORT}"), ("host-b", fleet_server.addresses["host-a"], "nginx")}


def test_fleet_series(fleet_server):
    answer = fleet_server.api("/api/series", service="nginx", window="5m", step="10s")
    assert len(answer["points"]) == 30
    # Exact per step: each series' value at the step's end minus at its start (0 before it existed).
    assert sum(p["requests"] for p in answer["points"]) == REQUESTS
    assert sum(p["errors"] for p in answer["points"]) == FAILED_REQUESTS
    busy = [p for p in answer["points"] if p["requests"]]
    assert busy and all(p["latency_p50_ns"] > 0 and p["latency_p99_ns"] >= p["latency_p50_ns"] for p in busy)
    edge = fleet_server.api("/api/series", client="client", server="redis-server", protocol="redis",
                            port=str(REDIS_PORT), window="5m", step="10s")
    assert (sum(p["requests"] for p in edge["points"]), sum(p["errors"] for p in edge["points"])) == (4, 1)


def test_fleet_ui_draws_the_hosts(fleet_server):
    from tests.test_api import run_chromium

    dom, console = run_chromium(f"{fleet_server.url}/?token={TOKEN}&window=1h", "--dump-dom")
    assert console == [], console
    graph = re.search(r'<div id="graph"[^>]*>', dom).group(0)
    assert 'data-host-count="3"' in graph and 'data-idc-count="2"' in graph, graph
    hosts = re.findall(r'<li data-host="([^"]+)"[^>]*>', dom)
    assert sorted(hosts) == ["host-a", "host-b", "host-c"]
    assert 'data-edge-count="5"' in graph
    # An edge's details: both sides, its recent errors (fetched from the agents), its charts.
    edge = urllib.parse.quote(f"client → nginx http:{NGINX_PORT}")
    dom, console = run_chromium(f"{fleet_server.url}/?token={TOKEN}&window=1h&select={edge}", "--dump-dom")
    assert console == [], console
    details = re.search(r'<section id="details"[^>]*>(.*?)</section>', dom, re.DOTALL).group(1)
    assert "<h3>client → nginx</h3>" in details and "<td>host-a</td>" in details and "<td>host-b</td>" in details
    # Each failed request as each side's agent kept it.
    assert f'data-errors="{2 * FAILED_REQUESTS}"' in details
    assert details.count("@host-a · GET · /fail · 500") == details.count("@host-b · GET · /fail · 500") == FAILED_REQUESTS
    assert details.count('class="uplot') == 2, details
    if os.environ.get("DEETUNE_FLEET_SCREENSHOT"):  # docs/fleet.png
        out = os.path.abspath(os.environ["DEETUNE_FLEET_SCREENSHOT"])
        run_chromium(f"{fleet_server.url}/?token={TOKEN}&window=1h&select=nginx", f"--screenshot={out}",
                     "--window-size=1400,850", "--hide-scrollbars")


def test_recording_tasks_are_read_from_the_agent_that_holds_them(fleet_server):
    """A task started on host-b's agent, read through the server; the server does not start one."""
    import json
    import urllib.error
    import urllib.request

    b = fleet_server.addresses["host-b"]
    request = urllib.request.Request(
        f"http://{b}:{API_PORT}/api/recordings", data=json.dumps({"server": "nginx", "count": 2}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        task = json.load(response)["id"]
    done = fleet_server.fleet.run("host-a", [sys.executable, "-c", CLIENT, f"{b}:{NGINX_PORT}",
                                             f"{fleet_server.addresses['host-c']}:{REDIS_PORT}",
                                             f"{fleet_server.addresses['external']}:{EXTERNAL_PORT}", "2", "0"],
                                  env={"DEETUNE_SERVICE": "client"})
    assert done.stdout.strip() == "done", done.stderr
    deadline = time.monotonic() + 30
    while (status := http_json(f"{fleet_server.url}/api/recordings/{task}", token=TOKEN))["recorded"] < 2:
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    assert (status["host"], status["state"], status["recorded"]) == ("host-b", "completed", 2)
    listed = http_json(f"{fleet_server.url}/api/recordings", token=TOKEN)["recordings"]
    assert [(t["id"], t["host"]) for t in listed] == [(task, "host-b")]
    page = http_json(f"{fleet_server.url}/api/recordings/{task}/exchanges", token=TOKEN)
    assert (page["total"], page["state"], len(page["exchanges"])) == (2, "completed", 2)
    request = urllib.request.Request(f"{fleet_server.url}/api/recordings", data=b'{"server": "nginx"}', method="POST",
                                     headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 404
    assert "create a recording task on the agent that records" in json.load(refused.value)["error"]


def test_a_stopped_agent_is_reported_as_not_reporting(fleet_server):
    """Last: host-c's agent stops; its host is then not reporting, and its edges stay."""
    before = fleet_server.edges()
    proc = fleet_server.agents["host-c"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    deadline = time.monotonic() + 30
    while True:
        hosts = {h["name"]: h for h in fleet_server.api("/api/hosts")["hosts"]}
        if not hosts["host-c"]["reporting"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {name: h["reporting"] for name, h in hosts.items()} == {"host-a": True, "host-b": True, "host-c": False}
    assert hosts["host-c"]["last_seen"] is not None
    after = fleet_server.edges()
    assert {k: (e["requests"], e["errors"]) for k, e in after.items()} == {
        k: (e["requests"], e["errors"]) for k, e in before.items()}
    nodes = {n["name"]: n for n in fleet_server.api("/api/topology")["nodes"]}
    assert [i["reporting"] for i in nodes["redis-server"]["instances"]] == [False]
    assert [i["reporting"] for i in nodes["nginx"]["instances"]] == [True]
