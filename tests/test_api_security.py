"""Issue 18, items 1, 2, 7 and 8: the API closed by default, Host checked, webhooks limited,
user patterns linear, bounded numbers and nesting, bounded descriptors and threads."""

from __future__ import annotations

import concurrent.futures
import http.client
import http.server
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from deetune.api import ApiServer
from deetune.recording.recorder import Recorder, RecordingManager
from deetune.topology.store import StoreSink, TopologyStore
from tests.test_recording_units import FakeKernel, exchange


def call(server: ApiServer, method: str, path: str, *, token: str | None = None, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.address, timeout=10)
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    if body is not None:
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=hdrs)
        reply = conn.getresponse()
        data = reply.read()
    finally:
        conn.close()
    return reply.status, json.loads(data) if data else {}


@pytest.fixture
def setup(tmp_path):
    store = TopologyStore(tmp_path / "t.db")
    manager = RecordingManager(store, set_port_capture=FakeKernel(), ports_of=lambda s: {8080})
    manager.start()
    sink = StoreSink(store, interval=0.05)
    server = ApiServer(store, recordings=manager, health=sink.health).start()
    yield server, manager, sink
    server.stop()
    sink.close()


# -- the token ----------------------------------------------------------------------------------------


def test_a_token_is_made_when_none_is_given(setup):
    server, _, _ = setup
    assert len(server.token) == 43 and server.token != ApiServer(server.queries).token


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/api/recordings", b'{"server": "web"}'),
    ("GET", "/api/recordings", None),
    ("GET", "/api/exchanges", None),
    ("GET", "/api/recordings/rec-000000000000/exchanges?format=jsonl", None),
])
def test_payload_and_state_changes_need_the_token_on_loopback(setup, method, path, body):
    server, _, _ = setup
    status, answer = call(server, method, path, body=body)
    assert (status, answer) == (401, {"error": "missing or wrong bearer token"})
    assert call(server, method, path, body=body, token="wrong")[0] == 401
    assert call(server, method, path, body=body, token=server.token)[0] in (200, 201, 404)


def test_topology_reads_stay_open_on_loopback_only(setup, tmp_path):
    server, _, _ = setup
    for path in ("/api/topology", "/api/services", "/api/edges", "/healthz", "/openapi.json"):
        assert call(server, "GET", path)[0] == 200, path
    closed = ApiServer(server.queries, open_reads=False).start()
    try:
        assert call(closed, "GET", "/api/topology")[0] == 401
        assert call(closed, "GET", "/api/topology", token=closed.token)[0] == 200
    finally:
        closed.stop()
    wide = ApiServer(server.queries, host="0.0.0.0", token="t0k", open_reads=True)
    assert wide.open_reads is False  # never beyond loopback


def test_another_local_user_cannot_create_a_task(setup):
    """The issue: uid nobody got 201 from POST /api/recordings on loopback."""
    server, manager, _ = setup
    script = textwrap.dedent(f"""
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", {server.address[1]}, timeout=10)
        conn.request("POST", "/api/recordings", body=b'{{"server": "web"}}', headers={{"Content-Type": "application/json"}})
        print(conn.getresponse().status)
    """)
    result = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
                             script], capture_output=True, text=True, timeout=30)
    assert result.stdout.strip() == "401", result.stderr
    assert manager.list() == []


# -- DNS rebinding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}",
                                  "127.0.0.1:1", "[::1]:1", "localhost:1", "x:y:z"])
def test_a_host_header_naming_another_server_is_refused(setup, host):
    server, manager, _ = setup
    host = host.format(port=server.address[1])
    for method, path, body in (("POST", "/api/recordings", b'{"server": "web"}'), ("GET", "/api/exchanges", None),
                               ("GET", "/api/topology", None), ("GET", "/", None)):
        status, answer = call(server, method, path, token=server.token, body=body, headers={"Host": host})
        assert status == 403 and answer["error"].startswith(f"Host {host!r} does not name this server"), answer
    assert manager.list() == []


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "127.0.0.1", "localhost."])
def test_the_servers_own_names_pass(setup, host):
    server, _, _ = setup
    assert call(server, "GET", "/api/topology", headers={"Host": host.format(port=server.address[1])})[0] == 200


def test_wildcard_binding_takes_ip_literals_and_allowed_names(tmp_path):
    store = TopologyStore(tmp_path / "w.db")
    server = ApiServer(store, host="0.0.0.0", token="tok", allowed_hosts=["agent.example"]).start()
    try:
        port = server.address[1]
        for host, status in ((f"10.1.2.3:{port}", 200), ("agent.example:8443", 200), (f"evil.example:{port}", 403)):
            assert call(server, "GET", "/api/topology", token="tok", headers={"Host": host})[0] == status, host
    finally:
        server.stop()
        store.close()


# -- bounded input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("body,message", [
    (b"[" * 20000 + b"]" * 20000, "the body nests arrays and objects more than 64 deep"),
    (b'{"server": "web", "count": ' + b"9" * 5000 + b"}", "the body has a number of more than 30 digits"),
    (b'{"server": "web", "sample": 0.' + b"1" * 5000 + b"}", "the body has a number of more than 30 digits"),
    (b'{"server": "web", "sample": NaN}', "the body is not JSON: NaN is not a JSON value"),
])
def test_hostile_json_bodies_are_400(setup, body, message):
    server, _, _ = setup
    assert call(server, "POST", "/api/recordings", token=server.token, body=body) == (400, {"error": message})


@pytest.mark.parametrize("path", ["/api/exchanges?limit=" + "9" * 5000, "/api/exchanges?since=" + "9" * 5000,
                                  "/api/services/x/dependencies?depth=" + "1" * 5000,
                                  "/api/recordings/rec-000000000000/exchanges?offset=" + "1" * 5000])
def test_huge_numbers_in_parameters_are_400(setup, path):
    server, _, _ = setup
    status, answer = call(server, "GET", path, token=server.token)
    assert status == 400 and len(answer["error"]) < 200 and "digits" not in answer["error"], answer


# -- webhooks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("url,why", [
    ("http://169.254.169.254/latest/meta-data/", "is link-local (where clouds serve instance metadata)"),
    ("http://[fe80::1]/hook", "is link-local (where clouds serve instance metadata)"),
    ("http://[fd00:ec2::254]/", "is a cloud metadata address"),
    ("http://100.100.100.200/", "is a cloud metadata address"),
    ("http://[::ffff:169.254.169.254]/", "is link-local (where clouds serve instance metadata)"),
    ("http://0.0.0.0:9/", "is unspecified"),
])
def test_webhooks_to_metadata_addresses_are_refused(setup, url, why):
    server, manager, _ = setup
    body = json.dumps({"server": "web", "webhook": url}).encode()
    status, answer = call(server, "POST", "/api/recordings", token=server.token, body=body)
    assert status == 400 and why in answer["error"] and "--webhook-allow" in answer["error"], answer
    assert manager.list() == []


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO",
                                 "http://user:pw@127.0.0.1/"])
def test_webhooks_are_http_only_without_credentials(setup, url):
    server, _, _ = setup
    body = json.dumps({"server": "web", "webhook": url}).encode()
    assert call(server, "POST", "/api/recordings", token=server.token, body=body)[0] == 400


def test_an_allowed_network_lets_a_webhook_through(tmp_path):
    import ipaddress

    store = TopologyStore(tmp_path / "a.db")
    manager = RecordingManager(store, set_port_capture=FakeKernel(), ports_of=lambda s: {8080},
                               webhook_allow=[ipaddress.ip_network("169.254.0.0/16")])
    manager.start()
    try:
        assert manager.create({"server": "web", "webhook": "http://169.254.169.254/hook"})["state"] == "pending"
    finally:
        store.close()


class _Redirect(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_POST(self):
        self.hits.append(self.path)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(302)
        self.send_header("Location", self.headers["X-Target"] if "X-Target" in self.headers else _Redirect.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_redirects_are_not_followed(setup):
    server, manager, _ = setup
    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    _Redirect.hits = []
    _Redirect.target = f"http://127.0.0.1:{other.server_address[1]}/stolen"
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (other, hook)]
    for t in threads:
        t.start()
    try:
        task = manager.create({"server": "web", "webhook": f"http://127.0.0.1:{hook.server_address[1]}/hook"})
        manager.stop_task(task["id"])
        for thread in manager.webhook_threads:
            thread.join(10)
        assert _Redirect.hits == ["/hook"]
        assert manager.status(task["id"])["webhook_status"] == "sent: HTTP 302"
    finally:
        for s in (other, hook):
            s.shutdown()
            s.server_close()


# -- user patterns: linear time, the API answering ----------------------------------------------------


def test_a_catastrophic_statement_pattern_stalls_nothing(setup):
    """The issue: {"server": "mariadbd", "statement": "(a+)+$"} and a 39-byte query stalled
    /healthz for 14.5 s (Python's re backtracks; 23 bytes take it about 2 s)."""
    server, manager, sink = setup
    status, task = call(server, "POST", "/api/recordings", token=server.token,
                        body=json.dumps({"server": "db", "statement": "(a+)+$",
                                         "redact": {"patterns": ["(x+x+)+y"]}}).encode())
    assert status == 201, task
    recorder = Recorder(manager)
    statement = "a" * 22 + "!"  # Python's re: 0.7 s each here (39 bytes: hours); RE2: microseconds
    event = exchange(0, server="db", protocol="mysql", method="QUERY", target=statement,
                     request=b"\x18\x00\x00\x00\x03" + statement.encode() + b"x" * 40, response=b"\x07\x00\x00\x01\x00")
    list(recorder(exchange(99, server="db", protocol="mysql", method="QUERY", target="SELECT 1")))  # starts the task
    latencies = []
    done = threading.Event()

    def probe_health():
        while not done.is_set():
            began = time.monotonic()
            assert call(server, "GET", "/healthz")[0] == 200
            latencies.append(time.monotonic() - began)

    prober = threading.Thread(target=probe_health, daemon=True)
    prober.start()
    began = time.monotonic()
    for _ in range(20):
        list(recorder(event))
    took = time.monotonic() - began
    time.sleep(0.2)
    done.set()
    prober.join(10)
    assert took < 1.0, took
    assert latencies and max(latencies) < 0.5, max(latencies)
    assert manager.status(task["id"])["matched"] == 0  # "(a+)+$" does not match "aaa…!"


def test_patterns_re2_does_not_take_are_refused(setup):
    server, _, _ = setup
    for spec, field in (({"server": "db", "statement": r"(a)\1"}, "statement"),
                        ({"server": "db", "redact": {"patterns": ["(?<=a)b"]}}, "redact.patterns")):
        status, answer = call(server, "POST", "/api/recordings", token=server.token, body=json.dumps(spec).encode())
        assert status == 400 and answer["error"].startswith(field), answer


# -- bounded descriptors and threads -------------------------------------------------------------------

_BURST_SERVER = textwrap.dedent("""
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    from deetune.api import ApiServer
    from deetune.topology.store import TopologyStore
    store = TopologyStore(sys.argv[1])
    server = ApiServer(store, token="tok").start()
    print(server.address[1], flush=True)
    sys.stdin.readline()
    server.stop()
    store.close()
""")


def _descriptors(pid: int, suffix: str) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(suffix):
                count += 1
        except OSError:
            pass
    return count


def test_a_burst_of_slow_connections_under_ulimit_1024(tmp_path):
    """The issue: 2,000 API connections left 544 SQLite descriptors open, a burst of 1,100 under
    ulimit -n 1024 gave 631 'unable to open database file', one thread per connection (578).
    Here 1,100 slow clients at once against a server limited to 1,024 descriptors."""
    db = tmp_path / "burst.db"
    proc = subprocess.Popen([sys.executable, "-c", _BURST_SERVER, str(db)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())

        def one(i: int) -> int:
            """A slow client: half a request line, a pause, the rest (the server holds the connection)."""
            path = b"/api/exchanges" if i % 2 else b"/api/topology"
            for attempt in range(8):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                        sock.sendall(b"GET " + path)
                        time.sleep(0.5)
                        sock.sendall(b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer tok\r\n"
                                     b"Connection: close\r\n\r\n")
                        reply = b""
                        while chunk := sock.recv(65536):
                            reply += chunk
                    return int(reply.split(b" ", 2)[1])
                except (OSError, IndexError, ValueError):
                    time.sleep(0.2 * (attempt + 1))
            return -1

        threads_seen = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=1100) as pool:
            futures = [pool.submit(one, i) for i in range(1100)]
            while not all(f.done() for f in futures):
                threads_seen.append(len(os.listdir(f"/proc/{proc.pid}/task")))
                time.sleep(0.05)
            statuses = [f.result() for f in futures]
        assert statuses.count(200) == 1100, {s: statuses.count(s) for s in set(statuses)}
        # one I/O thread, four workers, the main thread (and its pool's none)
        assert max(threads_seen) <= 8, max(threads_seen)
        time.sleep(0.5)
        open_db = _descriptors(proc.pid, str(db))
        # the writer (database, WAL, shared memory) and at most 4 idle readers (3 each)
        assert open_db <= 3 + 4 * 3, open_db
        assert _descriptors(proc.pid, "socket:") <= 4
    finally:
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(30)
