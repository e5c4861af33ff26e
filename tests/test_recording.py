"""Recording tasks end to end: the agent (a subprocess with --api and a store of its own), real
servers (nginx with its Python upstream, redis-server, MariaDB), real clients, tasks created with
``python -m deetune.record`` and with the HTTP API while the agent runs.

The clients are a helper process speaking raw HTTP and RESP (so the test knows every byte it sent
and received, and names its service through DEETUNE_SERVICE) and pymysql with its socket wrapped
(the same for MySQL).  The tests check the exact recorded bytes, truncation, sampling, filters,
stop conditions and the webhook, redaction (secrets never reach the store file nor an export),
HAR exports, a restart of the agent, and that only recorded ports are copied more.

Unit tests of the parts (redaction, filters, byte logs, storage, API, CLI): tests/test_recording_units.py.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import pytest

from deetune.recording.model import RecordedExchange
from deetune.recording.tasks import sample_point
from deetune.services import ServiceResolver
from tests.servers import (  # noqa: F401  (fixtures)
    DB_NAME,
    DB_PASSWORD,
    DB_USER,
    HOST,
    STATIC_BYTES,
    free_port,
    mariadb_server,
    need_module,
    nginx_server,
    redis_server,
    upstream_response,
)
from tests.test_agent import AgentProcess
from tests.test_recording_units import check_har

pytestmark = [pytest.mark.bpf, pytest.mark.servers]

WAIT = 30.0
SECRET_TOKEN = "tok-9f83b1c2d4e5-secret"
REDIS_PASSWORD = "redis-pw-7c1d99e0aa"


# -- the agent ------------------------------------------------------------------------------------------


class Agent:
    """``python -m deetune.agent --api 127.0.0.1:PORT --store PATH`` in the background."""

    def __init__(self, store: pathlib.Path, *extra: str) -> None:
        self.store = store
        self.extra = extra
        self.port = free_port()
        self.process: AgentProcess | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        self.process = AgentProcess("--api", f"{HOST}:{self.port}", "--store", str(self.store),
                                    "--sink", "jsonl:/dev/null", *self.extra)
        wait_until(lambda: self._healthy(), "the agent's API to answer")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2):
                return True
        except OSError:
            return False

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def stop(self) -> str:
        code, _, err = self.process.finish(signal.SIGTERM)
        assert code == 0, err
        assert "Traceback" not in err, err
        return err

    def restart(self) -> None:
        self.stop()
        self.start()

    def api(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        """JSON, or the bytes of a JSON Lines export."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                got, payload = reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            got, payload = exc.code, exc.read()
        assert got == status, (got, payload)
        return payload if "format=jsonl" in path and status == 200 else json.loads(payload)

    def task(self, task_id: str) -> dict:
        return self.api("GET", f"/api/recordings/{task_id}")

    def exchanges(self, task_id: str) -> list[RecordedExchange]:
        body = self.api("GET", f"/api/recordings/{task_id}/exchanges?format=jsonl")
        return [RecordedExchange.from_json(json.loads(line)) for line in body.splitlines()]

    def wait_recorded(self, task_id: str, count: int, timeout: float = WAIT) -> list[RecordedExchange]:
        """Until the store holds ``count`` exchanges of the task (the sink commits about every second)."""
        found: list[RecordedExchange] = []

        def enough() -> bool:
            nonlocal found
            found = self.exchanges(task_id)
            return len(found) >= count

        wait_until(enough, f"{count} exchanges recorded by {task_id} ({self.task(task_id)})", timeout)
        return found

    @property
    def token_file(self) -> pathlib.Path:
        """The token the agent made at its first start, beside its store."""
        return self.store.parent / (self.store.name + ".api-token")

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def cli(self, *args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "deetune.record", "--api", self.url,
                                 "--token-file", str(self.token_file), *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def capture_map(self) -> dict[int, int]:
        """The agent's per-port capture sizes, read from the kernel map (bpftool)."""
        for map_id in _map_ids(self.pid):
            info = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "id", str(map_id)],
                                             capture_output=True, text=True, check=True).stdout)
            if info.get("name") != "port_capture_by":  # names are cut at 15 characters
                continue
            dump = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)],
                                             capture_output=True, text=True, check=True).stdout)
            sizes = {}
            for entry in dump:
                entry = entry.get("formatted", entry)
                key, value = entry["key"], entry["value"]
                if isinstance(key, list):
                    key = int.from_bytes(bytes(int(b, 16) for b in key), "little")
                    value = int.from_bytes(bytes(int(b, 16) for b in value), "little")
                sizes[int(key)] = int(value)
            return sizes
        raise AssertionError("the agent has no port_capture_bytes map")


def _map_ids(pid: int) -> set[int]:
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as info:
            for line in info:
                if line.startswith("map_id:"):
                    ids.add(int(line.split()[1]))
    return ids


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    instance = Agent(tmp_path_factory.mktemp("recording") / "agent.db")
    yield instance
    instance.stop()


def service_of(pid: int) -> str:
    """The service name the agent's resolver gives a server (the same code)."""
    return ServiceResolver().instance(pid).service


def exported(agent: Agent, task_id: str, formats: tuple[str, ...]) -> bytes:
    """Every export of a task as it is sent, plus the recorded bytes decoded from them."""
    parts = []
    for fmt in formats:
        body = agent.api("GET", f"/api/recordings/{task_id}/exchanges?format={fmt}")
        parts.append(body if isinstance(body, bytes) else json.dumps(body).encode())
    for x in agent.exchanges(task_id):
        parts += [x.request, x.response, x.target.encode()]
    return b"\n".join(parts)


def store_bytes(path: pathlib.Path) -> bytes:
    """The database file and its WAL: everything the store wrote."""
    return b"".join(p.read_bytes() for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
                    if p.exists())


# -- clients that know their bytes ----------------------------------------------------------------------

CLIENT = r"""
import base64, json, re, socket, sys

def read_more(sock, buf):
    data = sock.recv(65536)
    if not data:
        raise EOFError("closed")
    return buf + data

def read_http(sock, buf):
    while b"\r\n\r\n" not in buf:
        buf = read_more(sock, buf)
    end = buf.index(b"\r\n\r\n") + 4
    head = buf[:end].lower()
    if b"transfer-encoding: chunked" in head:
        pos = end
        while True:
            while b"\r\n" not in buf[pos:]:
                buf = read_more(sock, buf)
            line_end = buf.index(b"\r\n", pos)
            size = int(buf[pos:line_end].split(b";")[0], 16)
            pos = line_end + 2 + size + 2
            while len(buf) < pos:
                buf = read_more(sock, buf)
            if size == 0:
                return buf[:pos], buf[pos:]
    match = re.search(rb"\ncontent-length:\s*(\d+)", head)
    total = end + (int(match.group(1)) if match else 0)
    while len(buf) < total:
        buf = read_more(sock, buf)
    return buf[:total], buf[total:]

def resp_end(buf, pos):
    line_end = buf.find(b"\r\n", pos)
    if line_end < 0:
        return None
    kind, value = buf[pos:pos + 1], buf[pos + 1:line_end]
    pos = line_end + 2
    if kind in b"$=!" and kind:
        n = int(value)
        return pos if n < 0 else (pos + n + 2 if len(buf) >= pos + n + 2 else None)
    if kind in (b"*", b"%", b"~", b">"):
        n = int(value) * (2 if kind == b"%" else 1)
        for _ in range(max(n, 0)):
            pos = resp_end(buf, pos)
            if pos is None:
                return None
        return pos
    return pos

def read_redis(sock, buf):
    while True:
        end = resp_end(buf, 0) if buf else None
        if end is not None:
            return buf[:end], buf[end:]
        buf = read_more(sock, buf)

sock, buf = None, b""
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "connect":
        sock = socket.create_connection((cmd["host"], cmd["port"]))
        buf = b""
        out = {"local_port": sock.getsockname()[1]}
    elif op in ("http", "redis"):
        sock.sendall(base64.b64decode(cmd["data"]))
        received, buf = (read_http if op == "http" else read_redis)(sock, buf)
        out = {"received": base64.b64encode(received).decode()}
    elif op == "close":
        sock.close()
        sock = None
        out = {"ok": True}
    print(json.dumps(out), flush=True)
"""


class RawClient:
    """A client process (service ``name``) sending exactly the bytes it is given."""

    def __init__(self, name: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "DEETUNE_SERVICE": name})
        self.local_port = 0

    def _call(self, **cmd: Any) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the client helper died"
        return json.loads(line)

    def connect(self, port: int) -> int:
        self.local_port = self._call(op="connect", host=HOST, port=port)["local_port"]
        return self.local_port

    def http(self, data: bytes) -> bytes:
        return base64.b64decode(self._call(op="http", data=base64.b64encode(data).decode())["received"])

    def redis(self, data: bytes) -> bytes:
        return base64.b64decode(self._call(op="redis", data=base64.b64encode(data).decode())["received"])

    def close(self) -> None:
        self._call(op="close")

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


@contextlib.contextmanager
def raw_client(name: str):
    client = RawClient(name)
    try:
        yield client
    finally:
        client.stop()


def get(path: str, port: int, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: rec-test\r\n{extra}\r\n".encode()


def resp(*args: bytes | str) -> bytes:
    items = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(items) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in items)


class Hook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    Hook.received = []
    server = http.server.ThreadingHTTPServer((HOST, 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{HOST}:{server.server_address[1]}/hooks/recording"
    server.shutdown()
    server.server_close()


# -- HTTP through nginx ------------------------------------------------------------------------------------


def test_http_task_from_the_cli_records_exact_redacted_bytes_and_completes(agent, nginx_server, webhook):
    nginx = nginx_server
    server = service_of(nginx.pid)
    task_id = agent.cli("create", "--server", server, "--client", "rec-web", "--method", "GET",
                        "--path", "/api/rec/*", "--count", "3", "--webhook", webhook).strip()
    status = agent.task(task_id)
    assert status["state"] in ("pending", "running") and nginx.port in status["ports"]
    assert agent.capture_map().get(nginx.port) == 65536
    sent, received = [], []
    with raw_client("rec-other") as other:  # another client: filtered out by --client
        other.connect(nginx.port)
        other.http(get("/api/rec/other", nginx.port))
        other.close()
    with raw_client("rec-web") as web:
        web.connect(nginx.port)
        web.http(get("/static.bin", nginx.port))  # not under the path
        post = b"POST /api/rec/post HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi"  # not a GET
        web.http(post)
        for i in range(3):
            request = get(f"/api/rec/{i}?q={i}", nginx.port, f"Authorization: Bearer {SECRET_TOKEN}",
                          "Cookie: session=c00k1e-value")
            sent.append(request)
            received.append(web.http(request))
        web.http(get("/api/rec/after", nginx.port))  # after the count: not recorded
        recorded = agent.wait_recorded(task_id, 3)
        web.close()
    wait_until(lambda: agent.task(task_id)["state"] == "completed", "the task to complete")
    wait_until(lambda: len(Hook.received) == 1, "the webhook")
    assert Hook.received[0]["event"] == "recording.completed"
    assert Hook.received[0]["task"]["id"] == task_id and Hook.received[0]["task"]["recorded"] == 3
    status = agent.task(task_id)
    assert (status["matched"], status["recorded"], status["dropped"]) == (3, 3, 0)
    wait_until(lambda: agent.task(task_id)["webhook_status"] == "sent: HTTP 200", "the webhook's outcome")
    assert agent.capture_map().get(nginx.port) is None  # restored: no task needs the port any more

    time.sleep(1.5)
    assert len(agent.exchanges(task_id)) == 3
    for i, (x, request, response) in enumerate(zip(recorded, sent, received)):
        assert (x.seq, x.protocol, x.method, x.target, x.status) == (i, "http", "GET", f"/api/rec/{i}?q={i}", 200)
        assert (x.client, x.server, x.server_port, x.server_address) == ("rec-web", server, nginx.port, HOST)
        assert x.request == request.replace(f"Bearer {SECRET_TOKEN}".encode(), b"[REDACTED]").replace(
            b"session=c00k1e-value", b"[REDACTED]")
        assert x.response == response  # exactly what the client received
        assert (x.request_size, x.response_size) == (len(request), len(response))
        assert not x.request_truncated and not x.response_truncated
        assert x.redactions == ("http.authorization", "http.cookie")
        assert response.endswith(upstream_response(f"/api/rec/{i}?q={i}", 0)[-2:])
    # the secret never reached the store, nor an export
    for secret in (SECRET_TOKEN.encode(), b"c00k1e-value"):
        assert secret not in store_bytes(agent.store)
        assert secret not in exported(agent, task_id, ("jsonl", "json", "har"))
    har = agent.api("GET", f"/api/recordings/{task_id}/exchanges?format=har")
    check_har(har)
    entries = har["log"]["entries"]
    assert [e["request"]["url"] for e in entries] == [f"http://{HOST}:{nginx.port}/api/rec/{i}?q={i}" for i in range(3)]
    assert all(e["response"]["status"] == 200 and e["response"]["content"]["text"].startswith('{"path"')
               for e in entries)
    assert {"name": "Authorization", "value": "[REDACTED]"} in entries[0]["request"]["headers"]


def test_limits_truncate_and_capture_gaps_show(agent, nginx_server):
    nginx = nginx_server
    server = service_of(nginx.pid)
    small = agent.api("POST", "/api/recordings",
                      {"server": server, "client": "rec-limits", "path": "/nosendfile/*", "limit": 1000},
                      status=201)["id"]
    files = agent.api("POST", "/api/recordings", {"server": server, "client": "rec-limits", "path": "/static.bin"},
                      status=201)["id"]
    with raw_client("rec-limits") as client:
        client.connect(nginx.port)
        request = get("/nosendfile/static.bin", nginx.port)
        response = client.http(request)
        sendfile_request = get("/static.bin", nginx.port)
        sendfile_response = client.http(sendfile_request)
        [x] = agent.wait_recorded(small, 1)
        [y] = agent.wait_recorded(files, 1)
        client.close()
    assert len(response) > 1000 and response.endswith(STATIC_BYTES)
    assert x.request == request and not x.request_truncated
    assert x.response == response[:1000] and x.response_truncated and x.response_size == len(response)
    # nginx sent the body with sendfile: the kernel copies nothing of it, the gap makes it truncated
    head = sendfile_response[:sendfile_response.index(b"\r\n\r\n") + 4]
    assert y.request == sendfile_request
    assert y.response == head and y.response_truncated and y.response_size == len(sendfile_response)
    for task_id in (small, files):
        agent.api("POST", f"/api/recordings/{task_id}/stop")
    har = agent.api("GET", f"/api/recordings/{small}/exchanges?format=har")
    check_har(har)
    [entry] = har["log"]["entries"]
    assert entry["response"]["_truncated"] is True and entry["response"]["bodySize"] == -1


def test_sampling_ratio(agent, nginx_server):
    nginx = nginx_server
    task_id = agent.api("POST", "/api/recordings",
                        {"server": service_of(nginx.pid), "client": "rec-sample", "path": "/api/sample/*",
                         "sample": 0.5}, status=201)["id"]
    requests = [get(f"/api/sample/{i}", nginx.port) for i in range(40)]
    expected = [r for r in requests if sample_point(task_id, r) < 0.5]
    assert 5 < len(expected) < 35
    with raw_client("rec-sample") as client:
        client.connect(nginx.port)
        for request in requests:
            client.http(request)
        recorded = agent.wait_recorded(task_id, len(expected))
        wait_until(lambda: agent.task(task_id)["matched"] == 40, "40 matches")
        client.close()
    stopped = agent.api("POST", f"/api/recordings/{task_id}/stop")
    assert stopped["state"] == "stopped"
    assert (stopped["matched"], stopped["recorded"], stopped["dropped_by"]["sampling"]) == (
        40, len(expected), 40 - len(expected))
    time.sleep(1.2)
    assert [x.request for x in agent.exchanges(task_id)] == expected == [x.request for x in recorded]


# -- Redis ---------------------------------------------------------------------------------------------------


def test_redis_command_filter_and_auth_redaction(agent, redis_server):
    redis = redis_server
    server = service_of(redis.pid)
    created = agent.api("POST", "/api/recordings", {"server": server, "client": "rec-redis", "command": "set"},
                        status=201)
    assert redis.port in created["ports"]  # found at once, even for a server that just started
    sets = created["id"]
    everything = agent.cli("create", "--server", server, "--client", "rec-redis", "--protocol", "redis").strip()
    commands = [
        resp("AUTH", REDIS_PASSWORD),
        resp("HELLO", "2", "AUTH", "default", REDIS_PASSWORD),
        resp("SET", "rec:k1", "v" * 100),
        resp("GET", "rec:k1"),
        resp("SET", "rec:k2", "x"),
        resp("DEL", "rec:k1", "rec:k2"),
    ]
    with raw_client("rec-redis") as client:
        client.connect(redis.port)
        replies = [client.redis(c) for c in commands]
        recorded_sets = agent.wait_recorded(sets, 2)
        recorded_all = agent.wait_recorded(everything, len(commands))
        client.close()
    assert replies[0].startswith(b"-ERR") and replies[2] == b"+OK\r\n"
    assert [(x.method, x.request, x.response) for x in recorded_sets] == [
        ("SET", commands[2], replies[2]), ("SET", commands[4], replies[4])]
    assert [x.method for x in recorded_all] == ["AUTH", "HELLO", "SET", "GET", "SET", "DEL"]
    auth, hello = recorded_all[0], recorded_all[1]
    assert auth.request == resp("AUTH", "[REDACTED]") and auth.response == replies[0]
    assert auth.redactions == ("redis.auth",) and auth.client == "rec-redis"
    assert hello.request == resp("HELLO", "2", "AUTH", "[REDACTED]", "[REDACTED]")
    assert all(x.request == c and x.response == r for x, c, r in zip(recorded_all[2:], commands[2:], replies[2:]))
    for task_id in (sets, everything):
        agent.api("POST", f"/api/recordings/{task_id}/stop")
    time.sleep(1.2)
    assert REDIS_PASSWORD.encode() not in store_bytes(agent.store)
    assert REDIS_PASSWORD.encode() not in exported(agent, everything, ("jsonl", "json"))
    agent.api("GET", f"/api/recordings/{everything}/exchanges?format=har", status=400)


# -- MariaDB -------------------------------------------------------------------------------------------------


class _Recording:
    """A socket that logs what pymysql sends and receives."""

    def __init__(self, sock: socket.socket, log: list) -> None:
        self._sock, self._log = sock, log

    def sendall(self, data: bytes, *args) -> None:
        self._log.append(("sent", bytes(data)))
        self._sock.sendall(data, *args)

    def makefile(self, mode: str = "rb", *args, **kwargs) -> io.BufferedReader:
        return io.BufferedReader(_Reader(self._sock, self._log))

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class _Reader(io.RawIOBase):
    def __init__(self, sock: socket.socket, log: list) -> None:
        self._sock, self._log = sock, log

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._sock.recv_into(buffer)
        self._log.append(("received", bytes(memoryview(buffer)[:n])))
        return n


def test_mysql_statement_filter_and_login_redaction(agent, mariadb_server, monkeypatch):
    pymysql = need_module("pymysql", "pymysql")
    db = mariadb_server
    server = service_of(db.pid)
    me = service_of(os.getpid())
    created = agent.api("POST", "/api/recordings", {"server": server, "client": me, "statement": r"FROM\s+numbers"},
                        status=201)
    assert db.port in created["ports"]
    numbers = created["id"]
    everything = agent.api("POST", "/api/recordings", {"server": server, "client": me, "protocol": "mysql"},
                           status=201)["id"]
    log: list = []


    class SocketModule:  # pymysql's view of the socket module: its connections log their bytes
        def __getattr__(self, name: str):
            return getattr(socket, name)

        @staticmethod
        def create_connection(*args, **kwargs):
            return _Recording(socket.create_connection(*args, **kwargs), log)

    monkeypatch.setattr(pymysql.connections, "socket", SocketModule())
    conn = pymysql.connect(host=HOST, port=db.port, user=DB_USER, password=DB_PASSWORD, database=DB_NAME)
    try:
        with conn.cursor() as cursor:
            login_sent = [data for kind, data in log if kind == "sent"]
            log_mark = len(log)
            cursor.execute("SELECT n, square, name FROM numbers WHERE n = 3")
            assert cursor.fetchall() == ((3, 9, "n3"),)
            query_log = log[log_mark:]
            log_mark = len(log)
            cursor.execute("SELECT 1")
        [x] = agent.wait_recorded(numbers, 1)
        recorded = agent.wait_recorded(everything, 3)
    finally:
        conn.close()
    query_sent = b"".join(d for k, d in query_log if k == "sent")
    query_received = b"".join(d for k, d in query_log if k == "received")
    assert (x.method, x.target) == ("QUERY", "SELECT n, square, name FROM numbers WHERE n = 3")
    assert x.request == query_sent and x.response == query_received
    assert (x.request_size, x.response_size) == (len(query_sent), len(query_received))
    assert [r.method for r in recorded[:3]] == ["LOGIN", "QUERY", "QUERY"]
    login = recorded[0]
    assert login.attributes["user"] == DB_USER and login.redactions == ("mysql.auth",)
    # The handshake response the client sent, and its auth data (20 scrambled bytes): not stored.
    handshake = login_sent[0]
    payload = handshake[4:]
    user_end = payload.index(b"\0", 32)
    auth = payload[user_end + 2:user_end + 2 + payload[user_end + 1]]
    assert len(auth) >= 20 and auth not in login.request
    assert payload[32:user_end] == DB_USER.encode() and DB_USER.encode() in login.request
    from deetune.replay.mysql import parse_recorded_login

    parsed = parse_recorded_login(login.request)
    assert parsed is not None and parsed.database == DB_NAME
    for task_id in (numbers, everything):
        agent.api("POST", f"/api/recordings/{task_id}/stop")
    time.sleep(1.2)
    assert auth not in store_bytes(agent.store)
    assert DB_PASSWORD.encode() not in store_bytes(agent.store)


# -- restarts ----------------------------------------------------------------------------------------------


def test_a_running_task_resumes_after_a_restart(agent, nginx_server):
    nginx = nginx_server
    task_id = agent.api("POST", "/api/recordings",
                        {"server": service_of(nginx.pid), "client": "rec-restart", "path": "/api/restart/*",
                         "count": 4}, status=201)["id"]
    with raw_client("rec-restart") as client:
        client.connect(nginx.port)
        for i in range(2):
            client.http(get(f"/api/restart/{i}", nginx.port))
        agent.wait_recorded(task_id, 2)
        client.close()
    agent.restart()
    status = agent.task(task_id)
    assert (status["state"], status["recorded"]) == ("running", 2)
    wait_until(lambda: agent.capture_map().get(nginx.port) == 65536, "the port's capture size after the restart")
    with raw_client("rec-restart") as client:
        client.connect(nginx.port)
        for i in range(2, 5):
            client.http(get(f"/api/restart/{i}", nginx.port))
        recorded = agent.wait_recorded(task_id, 4)
        client.close()
    wait_until(lambda: agent.task(task_id)["state"] == "completed", "the task to complete")
    assert [(x.seq, x.target) for x in recorded] == [(i, f"/api/restart/{i}") for i in range(4)]
    listing = agent.cli("list")
    assert re.search(rf"^{task_id} +completed ", listing, re.M)


# -- what is copied --------------------------------------------------------------------------------------


def test_only_recorded_ports_are_copied_more(tmp_path, nginx_server, redis_server):
    nginx, redis = nginx_server, redis_server
    big = bytes(range(256)) * 256  # 64 KiB, served by writev (sendfile off)
    (nginx.dir / "html" / "nosendfile" / "big.bin").write_bytes(big)
    events = tmp_path / "events.jsonl"
    # A capture smaller than the default (64 KiB), for the task's to be seen.
    agent = Agent(tmp_path / "agent.db", "--emit-data", "--capture-bytes", "4096", "--sink", f"jsonl:{events}")
    try:
        def phase(client: RawClient) -> tuple[int, int]:
            nginx_port = client.connect(nginx.port)
            assert client.http(get("/nosendfile/big.bin", nginx.port)).endswith(big)
            client.close()
            redis_port = client.connect(redis.port)
            assert client.redis(resp("SET", "rec:big", "r" * 20000)) == b"+OK\r\n"
            client.close()
            return nginx_port, redis_port

        def captured(client_port: int, server_port: int) -> list[tuple[int, int]]:
            """(size, captured) of the server's writes and reads on the client's connection."""
            out = []
            for line in events.read_text().splitlines(keepends=True):
                if not line.endswith("\n"):
                    continue  # being written
                event = json.loads(line)
                if event["type"] == "data" and event["lport"] == server_port and event["rport"] == client_port:
                    out.append((event["size"], len(event["data"]) // 2))
            return out

        def settled(client_port: int, server_port: int, total: int) -> bool:
            return sum(size for size, _ in captured(client_port, server_port)) >= total

        with raw_client("rec-copy") as client:
            before = phase(client)
            # (other nginx servers may run on this host: the service's ports are all theirs)
            task_id = agent.api("POST", "/api/recordings", {"server": service_of(nginx.pid)}, status=201)["id"]
            sizes = agent.capture_map()
            assert sizes[nginx.port] == 65536 and redis.port not in sizes
            during = phase(client)
            agent.api("POST", f"/api/recordings/{task_id}/stop")
            assert agent.capture_map() == {}
            after = phase(client)
        for ports in (before, during, after):
            wait_until(lambda p=ports: settled(p[0], nginx.port, len(big)) and settled(p[1], redis.port, 20000),
                       "the data events")
        for name, ports in (("before", before), ("during", during), ("after", after)):
            nginx_writes = captured(ports[0], nginx.port)
            redis_reads = captured(ports[1], redis.port)
            assert max(size for size, _ in nginx_writes) > 4096 and max(size for size, _ in redis_reads) > 4096
            if name == "during":  # the recorded port: whole syscalls (up to the limit)
                assert all(got == size for size, got in nginx_writes), nginx_writes
            else:
                assert all(got == min(size, 4096) for size, got in nginx_writes), (name, nginx_writes)
            assert all(got == min(size, 4096) for size, got in redis_reads), (name, redis_reads)  # never recorded
    finally:
        agent.stop()
