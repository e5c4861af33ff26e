"""``python -m deetune.replay`` against real servers, plus its comparison rules and command line.

The recordings are made from real traffic without the agent: a recording relay
on loopback sits between a real client (http.client, redis-py, pymysql,
mysql-connector-python) and a real server, keeps every byte each way in order,
and cuts the two streams into exchanges with the project's decoders — what a
recording task stores.  Each recording is then replayed (a) against the same
server, where every replayed exchange must match, and (b) against a second
instance that differs in one place, where exactly that difference must be found.
"""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deetune.decoders.base import Chunk, Direction
from deetune.decoders.http import HttpDecoder
from deetune.decoders.mysql import MysqlDecoder
from deetune.decoders.redis import RedisDecoder
from deetune.recording.model import RecordedExchange
from deetune.replay import cli
from deetune.replay import mysql as my
from deetune.replay.compare import (
    ABSENT,
    Diff,
    JsonPath,
    Rules,
    compare_http,
    compare_json,
    compare_mysql,
    compare_redis,
)
from deetune.replay.handlers import MysqlHandler, Plan, RedisHandler, Skip
from deetune.replay.protocols import Resp, encode_command, parse_http_response, parse_resp
from tests.servers import DB_NAME, DB_PASSWORD, DB_USER, HOST, MariaDB, Nginx, Redis, need_module

ROOT = pathlib.Path(__file__).resolve().parent.parent


# -- recording without the agent ------------------------------------------------------------------


class RecordingRelay:
    """A TCP relay to ``upstream_port`` that keeps each connection's chunks, both ways, in order."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        #: Per connection: (client address, [(direction, bytes, monotonic ns)]).
        self.connections: list[tuple[str, list[tuple[Direction, bytes, int]]]] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, address = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((HOST, self.upstream_port))
            chunks: list[tuple[Direction, bytes, int]] = []
            with self._lock:
                self.connections.append((f"{address[0]}:{address[1]}", chunks))
                self._sockets += [client, upstream]
                for src, dst, direction in ((client, upstream, Direction.REQUEST),
                                            (upstream, client, Direction.RESPONSE)):
                    thread = threading.Thread(target=self._pump, args=(src, dst, direction, chunks), daemon=True)
                    thread.start()
                    self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket, direction: Direction, chunks: list) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:  # kept before it is forwarded: the order of the chunks is causal
                    chunks.append((direction, data, time.monotonic_ns()))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def finish(self) -> None:
        """Wait until every relayed connection has closed both ways, then stop listening."""
        deadline = time.monotonic() + 20
        while True:
            with self._lock:
                threads = list(self._threads)
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
                assert not thread.is_alive(), "a relayed connection did not close"
            with self._lock:
                if len(self._threads) == len(threads):
                    break
        self.listener.close()
        for sock in self._sockets:
            sock.close()

    def recorded(self, protocol: str) -> list[RecordedExchange]:
        """The exchanges of every relayed connection, with their exact bytes, in request order."""
        self.finish()
        decoder_class = {"http": HttpDecoder, "redis": RedisDecoder, "mysql": MysqlDecoder}[protocol]
        wall_offset = time.time_ns() - time.monotonic_ns()
        found = []
        for client, chunks in self.connections:
            decoder = decoder_class()
            exchanges = []
            for direction, data, ts in chunks:
                exchanges += decoder.feed(Chunk(direction, data, len(data), ts))
            exchanges += decoder.close(chunks[-1][2] if chunks else 0)
            requests = b"".join(data for direction, data, _ in chunks if direction is Direction.REQUEST)
            responses = b"".join(data for direction, data, _ in chunks if direction is Direction.RESPONSE)
            at_request = 0
            at_response = 4 + int.from_bytes(responses[:3], "little") if protocol == "mysql" else 0  # the greeting
            for exchange in exchanges:
                request = requests[at_request : at_request + exchange.request_bytes]
                response = responses[at_response : at_response + exchange.response_bytes]
                at_request += exchange.request_bytes
                at_response += exchange.response_bytes
                found.append((exchange, client, request, response))
            assert (at_request, at_response) == (len(requests), len(responses)), "exchanges do not tile the streams"
        found.sort(key=lambda item: item[0].request_start_ns)
        return [
            RecordedExchange(
                task_id="test", seq=seq, ts=ex.request_start_ns + wall_offset, protocol=ex.protocol, client=client,
                server=f"{HOST}:{self.upstream_port}", method=ex.method, target=ex.target, status=ex.status,
                error=ex.error, request=request, response=response, request_size=len(request),
                response_size=len(response), latency_ns=ex.latency_ns,
                duration_ns=None if ex.response_end_ns is None else ex.response_end_ns - ex.request_start_ns,
                error_message=ex.error_message, server_address=HOST, server_port=self.upstream_port,
                attributes=dict(ex.attributes),
            )
            for seq, (ex, client, request, response) in enumerate(found, 1)
        ]


def write_jsonl(path: pathlib.Path, exchanges: list[RecordedExchange]) -> pathlib.Path:
    path.write_text("".join(json.dumps(e.to_json()) + "\n" for e in exchanges))
    return path


def replay(capsys, path: pathlib.Path, *args: str) -> tuple[int, str, dict]:
    report_path = path.with_name(path.stem + f".report{time.monotonic_ns()}.json")
    code = cli.main(["--from", str(path), "--report", str(report_path), *args])
    captured = capsys.readouterr()
    assert not captured.err, captured.err
    return code, captured.out, json.loads(report_path.read_text())


def by_result(report: dict, result: str) -> list[dict]:
    return [e for e in report["exchanges"] if e["result"] == result]


def paths(entry: dict) -> list[str]:
    return [d["path"] for d in entry["diffs"]]


# -- a small JSON application ------------------------------------------------------------------


class _App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    variant = 0

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)  # adds Date and Server
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Request-Id", os.urandom(6).hex())
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, document: dict, status: int = 200) -> None:
        self._send(status, json.dumps(document).encode(), "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        variant = self.server.variant  # type: ignore[attr-defined]
        if self.path == "/api/users/1":
            self._json({"id": 1, "name": "Ada", "generated_at": time.time(),
                        "score": 0.75 + variant * 1e-7, "tags": ["a", "b"]})
        elif self.path == "/api/users/2":
            self._json({"id": 2, "name": "Robert" if variant else "Bob", "generated_at": time.time(),
                        "score": 0.5, "tags": ["c"]})
        elif self.path == "/text":
            lines = ["alpha", "beta" if not variant else "BETA", "gamma", ""]
            self._send(200, "\n".join(lines).encode(), "text/plain; charset=utf-8")
        elif self.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            body = json.dumps({"items": list(range(20)), "at": time.time()}).encode()
            for start in range(0, len(body), 16):
                piece = body[start : start + 16]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._json({"error": "not found"}, 404)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self._json({"received": len(body), "echo": json.loads(body), "at": time.time()}, 201)


def start_app(variant: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((HOST, 0), _App)
    server.daemon_threads = True
    server.variant = variant  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def apps():
    first, second = start_app(0), start_app(1)
    yield first, second
    for server in (first, second):
        server.shutdown()
        server.server_close()


def record_app(port: int) -> list[RecordedExchange]:
    relay = RecordingRelay(port)
    # First a request that closes its connection: replay has to open another one for the rest.
    conn = http.client.HTTPConnection(HOST, relay.port, timeout=10)
    conn.request("GET", "/api/users/2", headers={"Connection": "close"})
    conn.getresponse().read()
    conn.close()
    conn = http.client.HTTPConnection(HOST, relay.port, timeout=10)
    for path in ("/api/users/1", "/api/users/2", "/text", "/chunked", "/nope"):
        conn.request("GET", path)
        conn.getresponse().read()
    conn.request("HEAD", "/api/users/1")
    conn.getresponse().read()
    conn.request("POST", "/api/echo", body=json.dumps({"x": [1, 2, 3]}), headers={"Content-Type": "application/json"})
    conn.getresponse().read()
    conn.close()
    return relay.recorded("http")


@pytest.fixture(scope="module")
def app_recording(apps, tmp_path_factory):
    exchanges = record_app(apps[0].server_port)
    assert [(e.method, e.target) for e in exchanges] == [
        ("GET", "/api/users/2"), ("GET", "/api/users/1"), ("GET", "/api/users/2"), ("GET", "/text"),
        ("GET", "/chunked"), ("GET", "/nope"), ("HEAD", "/api/users/1"), ("POST", "/api/echo")]
    assert len({e.client for e in exchanges}) == 2
    return write_jsonl(tmp_path_factory.mktemp("app") / "app.jsonl", exchanges), exchanges


NOISE = ["--ignore-json", "$..generated_at", "--ignore-json", "$.at"]


def test_app_same_server_matches_with_noise_rules(apps, app_recording, capsys):
    path, _ = app_recording
    port = apps[0].server_port
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{port}", *NOISE)
    assert code == 0, out
    assert report["summary"] == {"total": 8, "matched": 8, "mismatched": 0, "skipped": 0, "errors": 0}
    assert report["target"] == f"{HOST}:{port}"
    assert [e["seq"] for e in report["exchanges"]] == list(range(1, 9))
    assert all(e["latency_replayed_ns"] > 0 and e["latency_recorded_ns"] > 0 for e in report["exchanges"])
    assert out.strip().splitlines() == [f"replay: 8 exchanges against {HOST}:{port}: 8 matched, 0 mismatched, "
                                        "0 skipped, 0 errors"]
    # Without the JSON rules the timestamps differ; Date and X-Request-Id stay ignored by default.
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{port}")
    assert code == 1
    mismatched = by_result(report, "mismatch")
    assert [e["target"] for e in mismatched] == ["/api/users/2", "/api/users/1", "/api/users/2", "/chunked", "/api/echo"]
    assert all(set(paths(e)) <= {"body $.generated_at", "body $.at"} for e in mismatched)
    assert "MISMATCH #2 GET /api/users/1" in out and "    body $.generated_at: " in out
    # Asking for the default-ignored headers to be compared shows their noise.
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{port}", "--no-default-ignores", *NOISE)
    assert code == 1
    assert {"header Date", "header X-Request-Id"} <= set(paths(by_result(report, "mismatch")[0])) | {"header Date"}
    assert any("header X-Request-Id" in paths(e) for e in by_result(report, "mismatch"))


def test_app_second_instance_differences(apps, app_recording, capsys):
    path, _ = app_recording
    port = apps[1].server_port
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{port}", *NOISE)
    assert code == 1
    mismatched = {e["seq"]: e for e in by_result(report, "mismatch")}
    # /api/users/1: the score differs by 1e-7 only.
    assert paths(mismatched[2]) == ["body $.score"]
    assert mismatched[2]["diffs"][0] == {"path": "body $.score", "recorded": 0.75, "replayed": 0.75 + 1e-7}
    # /api/users/2 (twice): the name changed.
    for seq in (1, 3):
        assert mismatched[seq]["diffs"] == [{"path": "body $.name", "recorded": "Bob", "replayed": "Robert"}]
    # /text: a unified diff, and (byte-compared) its Content-Length is compared too but is equal.
    text = mismatched[4]["diffs"]
    assert [d["path"] for d in text] == ["body"]
    assert "-beta" in text[0]["diff"] and "+BETA" in text[0]["diff"] and "--- recorded" in text[0]["diff"]
    assert set(mismatched) == {1, 2, 3, 4}
    assert '    body $.name: "Bob" → "Robert"' in out
    assert "    -beta" in out and "    +BETA" in out
    assert out.strip().splitlines()[-1].endswith("4 matched, 4 mismatched, 0 skipped, 0 errors")
    # A tolerance absorbs the score.
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{port}", *NOISE, "--tolerance", "1e-6")
    assert sorted(e["seq"] for e in by_result(report, "mismatch")) == [1, 3, 4]


def test_app_concurrency_rate_and_host_rewrite(apps, app_recording, capsys):
    path, _ = app_recording
    port = apps[0].server_port
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{port}", *NOISE, "--concurrency", "4")
    assert code == 0, out
    assert [e["seq"] for e in report["exchanges"]] == list(range(1, 9))
    started = time.monotonic()
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{port}", *NOISE, "--rate", "20",
                               "--rewrite-host", "--http-header", "X-Replay: yes")
    assert code == 0, out
    assert time.monotonic() - started >= 7 / 20 - 0.02  # 8 starts, 1/20 s apart


def test_app_unreachable_target_is_an_error(app_recording, capsys):
    path, _ = app_recording
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        code, out, report = replay(capsys, path, "--target", f"{HOST}:{port}", "--timeout", "2")
    assert code == 1
    assert report["summary"]["errors"] == 8
    assert "cannot connect to" in report["exchanges"][0]["reason"]
    assert out.splitlines()[0].startswith("ERROR    #1 GET /api/users/2: cannot connect to")


def test_truncated_request_is_skipped(apps, app_recording, tmp_path, capsys):
    _, exchanges = app_recording
    post = next(e for e in exchanges if e.method == "POST")
    cut = attrs.evolve(post, request=post.request[:-5], request_truncated=True, seq=100)
    path = write_jsonl(tmp_path / "cut.jsonl", [exchanges[0], cut])
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{apps[0].server_port}", *NOISE, "-v")
    assert code == 0
    skipped = by_result(report, "skipped")
    assert [(e["seq"], e["reason"]) for e in skipped] == [
        (100, f"request truncated in the recording ({len(post.request) - 5} of {len(post.request)} bytes)")]
    assert "SKIPPED  #100 POST /api/echo: request truncated" in out


# -- fetching a task from the agent's API ----------------------------------------------------------


class _Api(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        api = self.server
        api.requests.append(self.path)  # type: ignore[attr-defined]
        if self.headers.get("Authorization") != "Bearer s3cret":
            return self._reply(401, {"error": "missing or wrong bearer token"})
        prefix, suffix = "/api/recordings/", "/exchanges?format=jsonl"
        if not (self.path.startswith(prefix) and self.path.endswith(suffix)):
            return self._reply(404, {"error": "no such route"})
        task = self.path[len(prefix) : -len(suffix)]
        if task not in api.tasks:  # type: ignore[attr-defined]
            return self._reply(404, {"error": f"no recording task {task!r}"})
        body = api.tasks[task]  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _reply(self, status: int, document: dict) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_task_from_api(apps, app_recording, capsys):
    path, _ = app_recording
    api = ThreadingHTTPServer((HOST, 0), _Api)
    api.tasks = {"task-7": path.read_bytes()}  # type: ignore[attr-defined]
    api.requests = []  # type: ignore[attr-defined]
    threading.Thread(target=api.serve_forever, daemon=True).start()
    url = f"http://{HOST}:{api.server_port}"
    target = f"{HOST}:{apps[0].server_port}"
    try:
        code = cli.main(["--task", "task-7", "--api", url, "--token", "s3cret", "--target", target, *NOISE])
        out = capsys.readouterr().out
        assert code == 0, out
        assert out.strip().endswith("8 matched, 0 mismatched, 0 skipped, 0 errors")
        assert api.requests == ["/api/recordings/task-7/exchanges?format=jsonl"]  # type: ignore[attr-defined]
        for args, message in [
            (["--token", "wrong"], f"deetune: {url}/api/recordings/task-7/exchanges?format=jsonl: HTTP 401 "
                                   "Unauthorized: missing or wrong bearer token"),
            (["--token", "s3cret", "--task", "nope"], f"deetune: {url}/api/recordings/nope/exchanges?format=jsonl: "
                                                      "HTTP 404 Not Found: no recording task 'nope'"),
        ]:
            code = cli.main(["--task", "task-7", "--api", url, "--target", target, *args])
            captured = capsys.readouterr()
            assert code == 2 and captured.err == message + "\n" and not captured.out
    finally:
        api.shutdown()
        api.server_close()
    code = cli.main(["--task", "task-7", "--api", url, "--target", target, "--timeout", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"deetune: cannot reach the API at {url}: ") and err.count("\n") == 1


# -- nginx static files ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nginx_pair(tmp_path_factory):
    first = Nginx.start(tmp_path_factory.mktemp("nginx-a"))
    try:
        second = Nginx.start(tmp_path_factory.mktemp("nginx-b"))
    except BaseException:
        first.stop()
        raise
    for server, word in ((first, "world"), (second, "there")):
        (server.dir / "html" / "page.html").write_text(f"<p>hello</p>\n<p>{word}</p>\n<p>bye</p>\n")
        (server.dir / "html" / "same.html").write_text("<p>the same everywhere</p>\n")
    # The files of the second root are written later: other mtimes, so other ETag / Last-Modified.
    time.sleep(1.1)
    (second.dir / "html" / "same.html").write_text("<p>the same everywhere</p>\n")
    yield first, second
    first.stop()
    second.stop()


@pytest.mark.servers
def test_nginx_static_files(nginx_pair, tmp_path, capsys):
    first, second = nginx_pair
    relay = RecordingRelay(first.port)
    with socket.create_connection((HOST, relay.port)) as sock:  # raw requests on one keep-alive connection
        for method, path in (("GET", "/static.bin"), ("GET", "/page.html"), ("GET", "/same.html"),
                             ("GET", "/missing.html"), ("HEAD", "/page.html")):
            sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: site.example\r\nUser-Agent: test\r\n\r\n".encode())
            buf = b""
            while True:
                buf += sock.recv(65536)
                parsed = parse_http_response(buf, method, at_eof=False)
                if parsed:
                    break
    exchanges = relay.recorded("http")
    assert [(e.method, e.target, e.status) for e in exchanges] == [
        ("GET", "/static.bin", 200), ("GET", "/page.html", 200), ("GET", "/same.html", 200),
        ("GET", "/missing.html", 404), ("HEAD", "/page.html", 200)]
    path = write_jsonl(tmp_path / "nginx.jsonl", exchanges)
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{first.port}")
    assert code == 0, out
    assert report["summary"]["matched"] == 5
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{second.port}")
    assert code == 1
    mismatched = by_result(report, "mismatch")
    assert [e["target"] for e in mismatched] == ["/page.html"]  # same.html: only ETag / Last-Modified differ
    assert paths(mismatched[0]) == ["body"]
    assert "-<p>world</p>" in mismatched[0]["diffs"][0]["diff"] and "+<p>there</p>" in mismatched[0]["diffs"][0]["diff"]


# -- Redis -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_pair(tmp_path_factory):
    redis = need_module("redis", "redis")
    servers = []
    try:
        for name in ("redis-a", "redis-b"):
            servers.append(Redis.start(tmp_path_factory.mktemp(name)))
        for index, server in enumerate(servers):
            client = redis.Redis(host=HOST, port=server.port)
            if index == 0:
                client.set("greeting", "hello")
            client.rpush("list", "a", "b", "c")
            client.hset("h", mapping={"f1": "v1", "f2": "v2", "f3": "v3"})
            client.sadd("s", *[f"member-{n}" for n in range(40)])
            client.set("counter", 10)
            client.close()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.mark.servers
def test_redis(redis_pair, tmp_path, capsys):
    redis = need_module("redis", "redis")
    first, second = redis_pair
    relay = RecordingRelay(first.port)
    client = redis.Redis(host=HOST, port=relay.port)
    assert client.ping()
    assert client.get("greeting") == b"hello"
    client.lrange("list", 0, -1)
    client.hgetall("h")
    assert len(client.smembers("s")) == 40
    client.get("counter")
    client.exists("greeting")
    client.get("no-such-key")
    client.set("tmp", "1")
    client.type("h")
    with pytest.raises(redis.ResponseError):
        client.incr("greeting")
    client.close()
    exchanges = relay.recorded("redis")
    methods = [e.method for e in exchanges]
    assert methods[-11:] == ["PING", "GET", "LRANGE", "HGETALL", "SMEMBERS", "GET", "EXISTS", "GET", "SET", "TYPE",
                             "INCRBY"]
    # A redacted AUTH, as the agent would record it.
    auth = attrs.evolve(exchanges[-1], seq=len(exchanges) + 1, method="AUTH", target="",
                        request=encode_command([b"AUTH", b"********"]), response=b"+OK\r\n", status="OK", error=False)
    path = write_jsonl(tmp_path / "redis.jsonl", exchanges + [auth])
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{first.port}")
    assert code == 0, out
    total = len(exchanges) + 1
    assert report["summary"] == {"total": total, "matched": total - 1, "mismatched": 0, "skipped": 1, "errors": 0}
    assert by_result(report, "skipped")[0]["reason"] == (
        "AUTH carries a redacted password: give --redis-password to replay it")
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{second.port}")
    assert code == 1
    mismatched = {e["method"] + " " + e["target"]: e["diffs"] for e in by_result(report, "mismatch")}
    assert mismatched == {
        "GET greeting": [{"path": "reply", "recorded": '"hello"', "replayed": "(nil)"}],
        "EXISTS greeting": [{"path": "reply", "recorded": "(integer) 1", "replayed": "(integer) 0"}],
        "INCRBY greeting": [{"path": "reply", "recorded": "(error) ERR value is not an integer or out of range",
                           "replayed": "(integer) 1"}],
    }
    assert '    reply: "hello" → (nil)' in out
    # With a password, AUTH is sent (this server has none: its error is a mismatch).
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{first.port}", "--redis-password", "pw")
    assert code == 1
    assert [e["method"] for e in by_result(report, "mismatch")] == ["AUTH"]
    assert by_result(report, "mismatch")[0]["diffs"][0]["recorded"] == "+OK"


# -- MariaDB ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mariadb_pair(tmp_path_factory):
    servers = []
    try:
        for name in ("mariadb-a", "mariadb-b"):
            servers.append(MariaDB.start(tmp_path_factory.mktemp(name)))
        servers[1].root_sql(f"UPDATE {DB_NAME}.numbers SET name = 'changed' WHERE n = 3")
        yield servers
    finally:
        for server in servers:
            server.stop()


QUERIES = [
    "SELECT n, square, name FROM numbers ORDER BY n",
    "SELECT COUNT(*) AS c, SUM(square) FROM numbers",
    "SELECT name, NULL AS nothing FROM numbers WHERE n = 3",
    "SELECT * FROM no_such_table",
    "UPDATE numbers SET square = square WHERE n = 1",
]


@pytest.mark.servers
def test_mariadb(mariadb_pair, tmp_path, capsys):
    pymysql = need_module("pymysql", "pymysql")
    connector = need_module("mysql.connector", "mysql-connector-python")
    first, second = mariadb_pair
    relay = RecordingRelay(first.port)
    conn = pymysql.connect(host=HOST, port=relay.port, user=DB_USER, password=DB_PASSWORD, database=DB_NAME)
    with conn.cursor() as cursor:
        for sql in QUERIES:
            try:
                cursor.execute(sql)
                cursor.fetchall()
            except pymysql.err.ProgrammingError:
                pass
    conn.close()
    conn = connector.connect(host=HOST, port=relay.port, user=DB_USER, password=DB_PASSWORD, database=DB_NAME,
                             use_pure=True, ssl_disabled=True)
    cursor = conn.cursor(prepared=True)
    cursor.execute("SELECT n, name, square * 1.5 FROM numbers WHERE n > ? AND name <> ?", (1, "x"))
    assert len(cursor.fetchall()) == 9
    cursor.execute("SELECT n, name, square * 1.5 FROM numbers WHERE n > ? AND name <> ?", (7, "x"))
    cursor.fetchall()
    cursor.close()
    conn.close()
    exchanges = relay.recorded("mysql")
    methods = [e.method for e in exchanges]
    assert "STMT_PREPARE" in methods and methods.count("STMT_EXECUTE") == 2 and methods.count("LOGIN") == 2
    path = write_jsonl(tmp_path / "mysql.jsonl", exchanges)
    login = ["--mysql-user", DB_USER, "--mysql-password", DB_PASSWORD]
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{first.port}", *login, "-v")
    assert code == 0, out
    skipped = by_result(report, "skipped")
    assert sorted(e["method"] for e in skipped) == ["LOGIN", "LOGIN", "QUIT", "QUIT", "STMT_CLOSE"]
    assert {e["reason"] for e in skipped if e["method"] == "LOGIN"} == {
        "login is not replayed: replay logs in itself with --mysql-user"}
    assert report["summary"] == {"total": len(exchanges), "matched": len(exchanges) - 5, "mismatched": 0,
                                 "skipped": 5, "errors": 0}
    matched = by_result(report, "match")
    assert [e["target"] for e in matched if e["target"] in QUERIES] == QUERIES
    statements = [e["method"] for e in matched if e["method"] in ("STMT_PREPARE", "STMT_EXECUTE")]
    assert statements == ["STMT_PREPARE", "STMT_EXECUTE", "STMT_EXECUTE"]

    code, out, report = replay(capsys, path, "--target", f"{HOST}:{second.port}", *login)
    assert code == 1
    mismatched = {(e["method"], e["target"]): e["diffs"] for e in by_result(report, "mismatch")}
    statement = "SELECT n, name, square * 1.5 FROM numbers WHERE n > ? AND name <> ?"
    assert mismatched == {
        ("QUERY", QUERIES[0]): [{"path": "rows[2].name", "recorded": "n3", "replayed": "changed"}],
        ("QUERY", QUERIES[2]): [{"path": "rows[0].name", "recorded": "n3", "replayed": "changed"}],
        ("STMT_EXECUTE", statement): [{"path": "rows[1].name", "recorded": "n3", "replayed": "changed"}],
    }
    assert '    rows[2].name: "n3" → "changed"' in out
    errors = [e for e in report["exchanges"] if e["target"] == QUERIES[3]]
    assert errors[0]["result"] == "match"  # ERR 1146 both times

    # Concurrency: the prepared statements are prepared on each worker's connection as needed.
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{first.port}", *login, "--concurrency", "3")
    assert code == 0, out

    # A wrong password: every replayed exchange is an error saying why.
    code, out, report = replay(capsys, path, "--target", f"{HOST}:{first.port}", "--mysql-user", DB_USER,
                               "--mysql-password", "wrong")
    assert code == 1 and report["summary"]["matched"] == 0
    assert "login as 'deetune' failed: 1045" in by_result(report, "error")[0]["reason"]


# -- comparison rules (no servers) -----------------------------------------------------------------


@pytest.mark.parametrize("text, path, expected", [
    ("$.a.b[*].c", ("a", "b", 3, "c"), True),
    ("$.a.b[*].c", ("a", "b", "x", "c"), True),  # as in RFC 9535: [*] and .* select every child
    ("$.a.b[*].c", ("a", "b", "c"), False),
    ("$.a.*.c", ("a", "b", "c"), True),
    ("$.a.*.c", ("a", 0, "c"), True),
    ("$..timestamp", ("timestamp",), True),
    ("$..timestamp", ("x", 1, "y", "timestamp"), True),
    ("$..timestamp", ("timestamp", "x"), False),
    ("$.items[0]", ("items", 0), True),
    ("$.items[0]", ("items", 1), False),
    ("$['odd key'].v", ("odd key", "v"), True),
    ('$["q"]', ("q",), True),
    ("$", (), True),
    ("$.a", ("a", "b"), False),
    ("$..[*]", (1,), True),
])  # fmt: skip
def test_json_path_matching(text, path, expected):
    assert JsonPath.parse(text).matches(path) is expected


@pytest.mark.parametrize("text", ["a.b", "$.", "$[x]", "$[1", "$a", "$..", "$.a[]"])
def test_json_path_syntax_errors(text):
    with pytest.raises(ValueError):
        JsonPath.parse(text)


def test_json_comparison_rules():
    recorded = {"id": 1, "at": 1700000000.1, "items": [{"id": 1, "price": 100.0, "ts": 1}, {"id": 2, "price": 0.001}],
                "flag": True, "gone": "x"}
    replayed = {"id": 1, "at": 1700000099.9, "items": [{"id": 1, "price": 100.5, "ts": 2}, {"id": 2, "price": 0.0015}],
                "flag": 1, "new": None}
    rules = Rules.build(ignore_json=["$.at", "$.items[*].ts"])
    assert [(d.path, d.recorded, d.replayed) for d in compare_json(recorded, replayed, rules)] == [
        ("$.items[0].price", 100.0, 100.5), ("$.items[1].price", 0.001, 0.0015), ("$.flag", True, 1),
        ("$.gone", "x", ABSENT), ("$.new", ABSENT, None)]
    # Tolerance: relative for large numbers (0.5 of 100.5 is within 1%), absolute near zero.
    tolerant = Rules.build(ignore_json=["$.at", "$.items[*].ts"], tolerance=0.01)
    assert [d.path for d in compare_json(recorded, replayed, tolerant)] == ["$.flag", "$.gone", "$.new"]
    assert [d.path for d in compare_json({"n": 1000}, {"n": 1011}, tolerant)] == ["$.n"]
    assert compare_json([1, 2], [1, 2, 3], Rules())[0] == Diff("$[2]", ABSENT, 3)
    assert compare_json(1, 1.0, Rules()) == []
    assert compare_json({"a b": {"c": 1}}, {"a b": {"c": 2}}, Rules())[0].path == '$["a b"].c'
    diff = compare_json({"gone": 1}, {}, Rules())[0]
    assert diff.lines() == ["$.gone: 1 → (absent)"] and diff.to_json() == {"path": "$.gone", "recorded": 1}


def _response(head: str, body: bytes = b"", method: str = "GET"):
    data = head.replace("\n", "\r\n").encode() + b"\r\n" + body
    parsed = parse_http_response(data, method, at_eof=True)
    assert parsed is not None
    return parsed[0]


def test_http_comparison_rules():
    json_a = _response("HTTP/1.1 200 OK\nContent-Type: application/json\nDate: Mon\nETag: \"1\"\nCache-Control: no-cache\n"
                       "Content-Length: 17\n", b'{"a":1,"t":10000}')
    json_b = _response("HTTP/1.1 200 OK\ncontent-type: application/json\ndate: Tue\netag: \"2\"\ncache-control: no-cache\n"
                       "Transfer-Encoding: chunked\n", b"9\r\n{\"a\":1,\"t\r\n7\r\n\":9999}\r\n0\r\n\r\n")
    # Names compare case-insensitively; Date/ETag are noise; Content-Length vs chunked framing is not a difference.
    assert [d.path for d in compare_http(json_a, json_b, Rules())] == ["body $.t"]
    assert compare_http(json_a, json_b, Rules.build(ignore_json=["$.t"])) == []
    assert [d.path for d in compare_http(json_a, json_b, Rules.build(ignore_json=["$.t"], default_headers=False))] == [
        "header Date", "header ETag"]
    assert [d.path for d in compare_http(json_a, json_b, Rules.build(["cache-control"], ["$.t"]))] == []
    text_a = _response("HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 12\n", b"one\ntwo\nsix\n")
    text_b = _response("HTTP/1.1 404 Not Found\nContent-Type: text/plain\nContent-Length: 14\nX-New: 1\n",
                       b"one\ntwo\nseven\n")
    diffs = compare_http(text_a, text_b, Rules())
    assert [(d.path, d.to_json().get("recorded"), d.to_json().get("replayed")) for d in diffs] == [
        ("status", 200, 404), ("header Content-Length", "12", "14"), ("header X-New", None, "1"), ("body", "12 bytes", "14 bytes")]
    assert diffs[2].lines() == ["header X-New: (absent) → \"1\""]
    assert diffs[3].text.splitlines()[2:] == ["@@ -1,3 +1,3 @@", " one", " two", "-six", "+seven"]
    binary_a = _response("HTTP/1.1 200 OK\nContent-Length: 4\n", b"\x00\x01\x02\x03")
    binary_b = _response("HTTP/1.1 200 OK\nContent-Length: 4\n", b"\x00\x01\x09\x03")
    (diff,) = compare_http(binary_a, binary_b, Rules())
    assert diff.path == "body" and diff.text == "first difference at byte 2"
    # HEAD: no body to compare, Content-Length is compared.
    head_a = _response("HTTP/1.1 200 OK\nContent-Length: 4\n", method="HEAD")
    head_b = _response("HTTP/1.1 200 OK\nContent-Length: 5\n", method="HEAD")
    assert [d.path for d in compare_http(head_a, head_b, Rules(), "HEAD")] == ["header Content-Length"]
    # A truncated recording: only its prefix is compared, and not the length.
    cut = _response("HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: 100\n", b'{"a":')
    assert not cut.complete
    full = _response("HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: 8\n", b'{"a":12}')
    assert compare_http(cut, full, Rules()) == []
    # An interim 100 Continue is skipped.
    final = _response("HTTP/1.1 100 Continue\n\nHTTP/1.1 204 No Content\n")
    assert final.status == 204


def test_redis_comparison_rules():
    def parse(data: bytes) -> Resp:
        value, end = parse_resp(data)
        assert end == len(data)
        return value

    a = parse(b"*3\r\n$1\r\nx\r\n*2\r\n:1\r\n$-1\r\n+OK\r\n")
    b = parse(b"*3\r\n$1\r\ny\r\n*2\r\n:2\r\n$0\r\n\r\n+OK\r\n")
    assert [(d.path, d.to_json()["recorded"], d.to_json()["replayed"]) for d in compare_redis(a, b, Rules())] == [
        ("reply[0]", '"x"', '"y"'), ("reply[1][0]", "(integer) 1", "(integer) 2"), ("reply[1][1]", "(nil)", '""')]
    # Set-like replies compare as multisets; RESP3 maps by key; attributes are skipped.
    members_a = parse(b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n")
    members_b = parse(b"*3\r\n$1\r\nc\r\n$1\r\na\r\n$1\r\nb\r\n")
    assert compare_redis(members_a, members_b, Rules(), "smembers") == []
    assert [d.path for d in compare_redis(members_a, members_b, Rules(), "LRANGE")] == ["reply[0]", "reply[1]", "reply[2]"]
    (diff,) = compare_redis(members_a, parse(b"*2\r\n$1\r\na\r\n$1\r\nd\r\n"), Rules(), "SMEMBERS")
    assert diff.text == '- "b"\n- "c"\n+ "d"'
    map_a = parse(b"%2\r\n+k1\r\n:1\r\n+k2\r\n:2\r\n")
    map_b = parse(b"|1\r\n+ttl\r\n:3\r\n%2\r\n+k2\r\n:2\r\n+k1\r\n:5\r\n")
    assert [(d.path, d.to_json()["replayed"]) for d in compare_redis(map_a, map_b, Rules())] == [
        ("reply[+k1]", "(integer) 5")]
    hash_a = parse(b"*4\r\n$2\r\nf1\r\n$1\r\n1\r\n$2\r\nf2\r\n$1\r\n2\r\n")
    hash_b = parse(b"*4\r\n$2\r\nf2\r\n$1\r\n2\r\n$2\r\nf1\r\n$1\r\n1\r\n")
    assert compare_redis(hash_a, hash_b, Rules(), "HGETALL") == []
    # Volatile commands: the type only.
    assert compare_redis(parse(b"$3\r\nabc\r\n"), parse(b"$3\r\nxyz\r\n"), Rules(), "INFO") == []
    assert compare_redis(parse(b"-ERR x\r\n"), parse(b":1\r\n"), Rules())[0].lines() == [
        "reply: (error) ERR x → (integer) 1"]


def test_redis_auth_handling():
    auth = RecordedExchange("t", 1, 0, "redis", "c", "s", "AUTH", "", "OK", False,
                            encode_command([b"AUTH", b"default", b"****"]), b"+OK\r\n")
    assert RedisHandler(HOST, 1, Rules(), 1).plan(auth) == Skip(
        "AUTH carries a redacted password: give --redis-password to replay it")
    plan = RedisHandler(HOST, 1, Rules(), 1, password="pw").plan(auth)
    assert isinstance(plan, Plan) and plan.request.data == encode_command([b"AUTH", b"default", b"pw"])
    hello = attrs.evolve(auth, method="HELLO", request=encode_command([b"HELLO", b"3", b"AUTH", b"u", b"***",
                                                                       b"SETNAME", b"n"]), response=b"%0\r\n")
    assert RedisHandler(HOST, 1, Rules(), 1).plan(hello).request.data == encode_command(
        [b"HELLO", b"3", b"SETNAME", b"n"])
    assert RedisHandler(HOST, 1, Rules(), 1, password="pw").plan(hello).request.data == encode_command(
        [b"HELLO", b"3", b"AUTH", b"u", b"pw", b"SETNAME", b"n"])


def _packets(*payloads: bytes, seq: int = 1) -> bytes:
    out = b""
    for payload in payloads:
        data, seq = my.encode_packets(payload, seq)
        out += data
    return out


def _coldef(name: str, field_type: int = 0xFD) -> bytes:
    def s(text: str) -> bytes:
        return my.encode_lenenc(len(text)) + text.encode()

    return s("def") + s("db") + s("t") + s("t") + s(name) + s(name) + b"\x0c" + b"\x21\x00" + b"\x00\x01\x00\x00" + \
        bytes([field_type]) + b"\x00\x00" + b"\x00\x00\x00"


def _row(*values: str | None) -> bytes:
    return b"".join(b"\xfb" if v is None else my.encode_lenenc(len(v)) + v.encode() for v in values)


def test_mysql_responses_and_comparison():
    eof = b"\xfe\x00\x00\x02\x00"
    classic = _packets(b"\x02", _coldef("id"), _coldef("name"), eof, _row("1", "a"), _row("2", None), eof)
    # The same result with CLIENT_DEPRECATE_EOF: no EOF after the columns, an OK (0xFE) at the end.
    deprecated = _packets(b"\x02", _coldef("id"), _coldef("name"), _row("1", "a"), _row("2", "b"),
                          b"\xfe\x00\x00\x02\x00\x00\x00")
    a = my.parse_recorded_response(classic, my.SHAPE_RESULT, False)
    b = my.parse_recorded_response(deprecated, my.SHAPE_RESULT, False)
    assert a.complete and b.complete
    assert a.parts[0].rows == [["1", "a"], ["2", None]] and [c.name for c in a.parts[0].columns] == ["id", "name"]
    assert [(d.path, d.recorded, d.replayed) for d in compare_mysql(a, b, Rules())] == [("rows[1].name", None, "b")]
    error = my.parse_recorded_response(_packets(b"\xff\x7a\x04#42S02Table 'x' doesn't exist"), my.SHAPE_RESULT, False)
    ok = my.parse_recorded_response(_packets(b"\x00\x01\x00\x02\x00\x00\x00"), my.SHAPE_RESULT, False)
    assert compare_mysql(error, ok, Rules())[0].lines() == [
        "status: ERR 1146 (42S02): Table 'x' doesn't exist → OK, 1 affected rows"]
    other_error = my.parse_recorded_response(_packets(b"\xff\x28\x04#42000syntax"), my.SHAPE_RESULT, False)
    assert [d.path for d in compare_mysql(error, other_error, Rules())] == ["error"]
    fewer = my.parse_recorded_response(_packets(b"\x01", _coldef("id"), eof, _row("1"), eof), my.SHAPE_RESULT, False)
    assert [d.path for d in compare_mysql(a, fewer, Rules())] == ["column count", "column names", "row count",
                                                                     "rows[0].name", "rows[1]"]
    # A recording cut inside the rows: only the rows it holds are compared.
    cut = my.parse_recorded_response(classic[:-12], my.SHAPE_RESULT, False)
    assert not cut.complete and compare_mysql(cut, a, Rules()) == []
    # Binary rows (STMT_EXECUTE): LONGLONG, VAR_STRING, NULL.
    binary = _packets(b"\x03", _coldef("n", 0x08), _coldef("s", 0xFD), _coldef("z", 0xFD), eof,
                      b"\x00" + bytes([0b10000]) + (7).to_bytes(8, "little") + b"\x02hi", eof)
    assert my.parse_recorded_response(binary, my.SHAPE_RESULT, True).parts[0].rows == [["7", "hi", None]]


def test_mysql_wire_details():
    pymysql_auth = need_module("pymysql._auth", "pymysql")
    salt = bytes(range(1, 21))
    assert my.scramble_native(b"secret", salt) == pymysql_auth.scramble_native_password(b"secret", salt)
    assert my.scramble_caching_sha2(b"secret", salt) == pymysql_auth.scramble_caching_sha2(b"secret", salt)
    assert my.scramble_native(b"", salt) == b""
    # Query attributes (MySQL 8 clients) are stripped from COM_QUERY.
    assert my.query_text(b"\x03\x00\x01SELECT 1", None) == b"SELECT 1"
    assert my.query_text(b"\x03SELECT 1", None) == b"SELECT 1"
    assert my.query_text(b"\x03\x00\x01SELECT 1", False) == b"\x00\x01SELECT 1"
    # STMT_EXECUTE re-addressed to another statement id, with the types of an earlier execution.
    payload = b"\x17\x05\x00\x00\x00\x00\x01\x00\x00\x00" + b"\x00" + b"\x01" + b"\x08\x00" + (3).to_bytes(8, "little")
    parsed = my.parse_execute(payload, 1)
    assert parsed.types == b"\x08\x00"
    assert parsed.payload(9, parsed.types) == payload.replace(b"\x05", b"\x09", 1)
    again = my.parse_execute(b"\x17\x05\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00" + (4).to_bytes(8, "little"), 1)
    assert again.types is None and again.payload(9, b"\x08\x00")[11:14] == b"\x01\x08\x00"
    # MySQL 8 query attributes: parameter count and names in the packet, attribute values after the
    # parameters' — told apart by which layout the values fill exactly, and sent in the classic one.
    head = b"\x17\x05\x00\x00\x00\x00\x01\x00\x00\x00"
    with_attribute = (head + b"\x02" + b"\x00" + b"\x01" + b"\x08\x00\x00" + b"\xfd\x00\x05trace"
                      + (3).to_bytes(8, "little") + b"\x01x")
    for attributes in (None, True):
        parsed = my.parse_execute(with_attribute, 1, attributes)
        assert parsed.attributes and parsed.trailing and parsed.types == b"\x08\x00"
        assert parsed.payload(5, parsed.types) == payload
    without_attribute = head + b"\x01" + b"\x00" + b"\x01" + b"\x08\x00\x00" + (3).to_bytes(8, "little")
    assert my.parse_execute(without_attribute, 1).payload(5, b"\x08\x00") == payload
    with pytest.raises(my.ProtocolError):
        my.parse_execute(payload + b"junk", 1)
    flagged = b"\x17\x05\x00\x00\x00\x08\x01\x00\x00\x00" + b"\x01\x00\x01\xfd\x00\x01a\x01z"  # no parameters
    assert my.parse_execute(flagged, 0).payload(9, None) == b"\x17\x09\x00\x00\x00\x00\x01\x00\x00\x00"
    # 16 MiB packets are split and joined.
    big = bytes(my.MAX_PAYLOAD + 10)
    packets, whole = my.split_packets(my.encode_packets(big, 0)[0])
    assert whole and packets == [(0, big)]
    # The recorded login gives the capabilities and the database.
    handler = MysqlHandler(HOST, 1, Rules(), 1, "u")
    caps = my.CLIENT_PROTOCOL_41 | my.CLIENT_SECURE_CONNECTION | my.CLIENT_CONNECT_WITH_DB | my.CLIENT_FOUND_ROWS
    login = (caps.to_bytes(4, "little") + bytes(4) + b"\x21" + bytes(23) + b"user\x00" + b"\x14" + bytes(20) +
             b"shop\x00")
    exchange = RecordedExchange("t", 1, 0, "mysql", "c", "s", "LOGIN", "", "OK", False, _packets(login),
                                _packets(b"\x00\x00\x00\x02\x00\x00\x00", seq=2))
    assert handler.plan(exchange) == Skip("login is not replayed: replay logs in itself with --mysql-user")
    assert handler.recorded_login == my.RecordedLogin(caps, 0x21, "shop")


# -- the command line ------------------------------------------------------------------------------


def _run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, "-m", "deetune.replay", *args], capture_output=True, text=True,
                          timeout=60, env=env, input=stdin, cwd=ROOT, check=False)


def test_cli_usage_errors(tmp_path, app_recording, capsys):
    path, exchanges = app_recording
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [exchanges[0], attrs.evolve(exchanges[1], protocol="redis")])
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps(exchanges[0].to_json()) + "\n{not json\n")
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({**exchanges[0].to_json(), "colour": "red"}) + "\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    pg = write_jsonl(tmp_path / "pg.jsonl", [attrs.evolve(exchanges[0], protocol="postgres")])
    my_file = write_jsonl(tmp_path / "my.jsonl", [attrs.evolve(exchanges[0], protocol="mysql")])
    cases = [
        ([], "--target HOST:PORT is required"),
        (["--from", str(path)], "--target HOST:PORT is required"),
        (["--from", str(path), "--target", "nowhere"], "--target must be HOST:PORT, got 'nowhere'"),
        (["--from", str(path), "--target", "[::1]:99999"], "--target must be HOST:PORT, got '[::1]:99999'"),
        (["--target", "h:1"], "give either --from FILE or --task ID (with --api URL)"),
        (["--from", str(path), "--task", "t", "--target", "h:1"], "give either --from FILE or --task ID (with --api URL)"),
        (["--task", "t", "--target", "h:1"], "--task needs --api URL"),
        (["--from", str(path), "--target", "h:1", "--api", "http://x"], "--api and --token go with --task, not --from"),
        (["--from", str(tmp_path / "none.jsonl"), "--target", "h:1"],
         f"{tmp_path / 'none.jsonl'}: No such file or directory"),
        (["--from", str(bad_line), "--target", "h:1"],
         f"{bad_line}:2: not JSON: Expecting property name enclosed in double quotes"),
        (["--from", str(unknown), "--target", "h:1"],
         f"{unknown}:1: not a recorded exchange: unknown fields in a recorded exchange: colour"),
        (["--from", str(empty), "--target", "h:1"], f"nothing to replay: {empty} holds no recorded exchanges"),
        (["--from", str(mixed), "--target", "h:1"], "the records mix protocols (http, redis): pick one with --protocol"),
        (["--from", str(mixed), "--target", "h:1", "--protocol", "mysql"],
         "no mysql exchanges to replay (the records hold http, redis)"),
        (["--from", str(pg), "--target", "h:1"], "cannot replay postgres exchanges (replay knows http, redis, mysql)"),
        (["--from", str(my_file), "--target", "h:1"],
         "replaying MySQL needs --mysql-user (and --mysql-password): recorded logins are redacted"),
        (["--from", str(path), "--target", "h:1", "--ignore-json", "items[0]"],
         "--ignore-json: JSON path must start with '$': 'items[0]'"),
        (["--from", str(path), "--target", "h:1", "--ignore-json", "$[x]"],
         "--ignore-json: bad JSON path '$[x]': [x] is not [N], [*] or ['name']"),
        (["--from", str(path), "--target", "h:1", "--concurrency", "0"],
         "argument --concurrency: must be a positive integer: '0'"),
        (["--from", str(path), "--target", "h:1", "--tolerance", "-1"],
         "argument --tolerance: must be zero or positive: '-1'"),
        (["--from", str(path), "--target", "h:1", "--http-header", "nocolon"],
         "argument --http-header: must be 'Name: value': 'nocolon'"),
        (["--from", str(path), "--target", "h:1", "--bogus"], "unrecognized arguments: --bogus"),
    ]
    for args, message in cases:
        assert cli.main(args) == 2, args
        captured = capsys.readouterr()
        assert (captured.err, captured.out) == (f"deetune: {message}\n", ""), args
    # The same through `python -m deetune.replay`.
    for args, message in (cases[0], cases[9], cases[12]):
        result = _run_cli(*args)
        assert (result.returncode, result.stderr, result.stdout) == (2, f"deetune: {message}\n", ""), args


def test_cli_exit_codes_end_to_end(apps, app_recording, tmp_path):
    path, _ = app_recording
    same = _run_cli("--from", str(path), "--target", f"{HOST}:{apps[0].server_port}", *NOISE)
    assert (same.returncode, same.stderr) == (0, "")
    other = _run_cli("--from", "-", "--target", f"{HOST}:{apps[1].server_port}", *NOISE, stdin=path.read_text())
    assert other.returncode == 1 and other.stderr == ""
    assert other.stdout.splitlines()[-1] == (f"replay: 8 exchanges against {HOST}:{apps[1].server_port}: 4 matched, "
                                             "4 mismatched, 0 skipped, 0 errors")
    report = tmp_path / "no-such-dir" / "r.json"
    failed = _run_cli("--from", str(path), "--target", f"{HOST}:{apps[0].server_port}", "--report", str(report))
    assert (failed.returncode, failed.stderr) == (2, f"deetune: {report}: No such file or directory\n")


# -- parsers on arbitrary bytes --------------------------------------------------------------------

_HTTP_LIKE = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda head, body: b"HTTP/1.1 " + head + b"\r\n\r\n" + body, st.binary(max_size=80), st.binary(max_size=80)),
    st.builds(lambda n, body: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + n + b"\r\n" + body,
              st.binary(max_size=6), st.binary(max_size=40)),
)


@settings(max_examples=300, deadline=None)
@given(_HTTP_LIKE, st.sampled_from(["GET", "HEAD"]), st.booleans())
def test_http_parser_only_raises_protocol_errors(data, method, at_eof):
    from deetune.replay.protocols import ProtocolError, parse_http_request

    for parse in (lambda: parse_http_response(data, method, at_eof), lambda: parse_http_request(data)):
        try:
            parse()
        except ProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.lists(st.sampled_from(
    [b"*2\r\n", b"$3\r\nabc\r\n", b"%1\r\n", b"|1\r\n", b":12\r\n", b"$-1\r\n", b"*-1\r\n", b"+OK\r\n", b",1.5\r\n",
     b"#t\r\n", b"_\r\n", b"=7\r\ntxt:abc\r\n", b"$9\r\n", b"-ERR x\r\n", b"~1\r\n", b">2\r\n", b"*x\r\n"]),
    max_size=8).map(b"".join)))
def test_resp_parser_only_raises_protocol_errors(data):
    from deetune.replay.protocols import NeedMore, ProtocolError

    try:
        parse_resp(data)
    except (NeedMore, ProtocolError):
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6), st.sampled_from(
    [my.SHAPE_RESULT, my.SHAPE_PREPARE, my.SHAPE_FIELD_LIST, my.SHAPE_SINGLE]), st.booleans())
def test_mysql_parser_only_raises_protocol_errors(payloads, shape, binary):
    from deetune.replay.protocols import ProtocolError

    parser = my.ResponseParser(shape, binary)
    try:
        for payload in payloads:
            if parser.feed(payload):
                break
    except ProtocolError:
        pass
    try:
        my.parse_recorded_response(_packets(*payloads), shape, binary)
    except ProtocolError:
        pass
