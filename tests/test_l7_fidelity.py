"""Decoder fidelity against real servers: traffic larger than the capture size, short connections
with large bodies, results of thousands of rows.  BPF payload capture → L7 handler → exchanges.

The capture size is the probe's default (4 KiB) unless a test says otherwise: what lies inside the
copied prefix of a call is decoded, exchanges whose bytes were not copied are reported as such
(``gap``, ``truncated``, ``rows_truncated``), and no exchange is paired with another's response.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

import pytest

from deetune.decoders.http import HttpDecoder
from deetune.decoders.mysql import MysqlDecoder
from deetune.decoders.redis import RedisDecoder
from deetune.events import ExchangeEvent
from deetune.l7 import L7Handler, ListeningPorts
from deetune.probes import ProbeOptions
from deetune.probes.payload import DEFAULT_CAPTURE_BYTES, PayloadProbe

SMALL_CAPTURE = 4096  # the default until measured (bench/bench_capture_size.py)
from deetune.probes.tcp import TcpProbe
from tests.harness import running_pipeline
from tests.servers import (  # noqa: F401  (fixtures)
    DB_NAME,
    DB_PASSWORD,
    DB_USER,
    HOST,
    mariadb_server,
    need_module,
    nginx_server,
    redis_server,
)

pytestmark = [pytest.mark.bpf, pytest.mark.servers]

DECODERS = [HttpDecoder, RedisDecoder, MysqlDecoder]
SETTLE = 0.5
WAIT = 30.0


@contextlib.contextmanager
def capture(*ports: int, capture_bytes: int = DEFAULT_CAPTURE_BYTES):
    # No CPU budget: on a shared test host the budget would sample connections out, and these tests
    # are about what the decoders make of what is copied (sampling gaps: tests/test_l7_handler.py).
    payload = PayloadProbe(ProbeOptions(), ports=ports, exclude_self=False, capture_bytes=capture_bytes,
                           busy_cpu=None)
    handler = L7Handler(DECODERS, mute=payload.mute, listening=ListeningPorts(reader=lambda: set(ports)))
    with running_pipeline([TcpProbe(ProbeOptions(port=ports[0])), payload], handlers=[handler]) as collector:
        collector.handler = handler
        yield collector
        time.sleep(SETTLE)


def exchanges(collector, port: int, role: str) -> list[ExchangeEvent]:
    return collector.matching(lambda e: isinstance(e, ExchangeEvent) and port in (e.lport, e.rport) and e.role == role)


def wait_quiet(collector, port: int, count: int, timeout: float = WAIT) -> None:
    """Until ``count`` exchanges on the port came, or nothing new for a second (some may be lost)."""
    deadline = time.monotonic() + timeout
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(collector.matching(lambda e: isinstance(e, ExchangeEvent) and port in (e.lport, e.rport)))
        if now >= count:
            return
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since > 1.0:
            return
        time.sleep(0.05)


# -- Redis pipelines -------------------------------------------------------------------------------


def value(i: int) -> bytes:
    return b"v%d-" % i + b"x" * (i % 37)


@pytest.mark.parametrize("count", [100, 1000])
def test_redis_py_pipelines_over_the_capture_size(redis_server, count):
    """redis-py writes a pipeline in calls of up to 6,000 bytes; the kernel copies 4 KiB of each.
    Every GET seen is paired with its own reply (its size says which), none is paired with another's;
    with the default capture (64 KiB), every one of them is decoded on both sides."""
    redis_py = need_module("redis", "redis")
    redis = redis_server
    tag = os.urandom(4).hex()
    keys = [f"fid:{tag}:{i:05d}" for i in range(count)]
    setup = redis_py.Redis(host=HOST, port=redis.port)
    setup.mset({key: value(i) for i, key in enumerate(keys)})
    setup.close()
    reply_size = {key: len(b"$%d\r\n%s\r\n" % (len(value(i)), value(i))) for i, key in enumerate(keys)}
    results = {}
    for capture_bytes in sorted({SMALL_CAPTURE, DEFAULT_CAPTURE_BYTES, 65536}):
        with capture(redis.port, capture_bytes=capture_bytes) as collector:
            client = redis_py.Redis(host=HOST, port=redis.port)
            try:
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.get(key)
                assert pipe.execute() == [value(i) for i in range(count)]
            finally:
                client.close()
            wait_quiet(collector, redis.port, 2 * count)
        for role in ("client", "server"):
            gets = [e for e in exchanges(collector, redis.port, role) if e.method == "GET" and tag in e.target]
            answered = [e for e in gets if e.status == "OK"]
            if os.environ.get("FIDELITY_DEBUG"):
                for e in gets:
                    print(role, e.target[-5:], e.status, e.response_bytes, reply_size.get(e.target), e.ts_mono_ns,
                          e.response_start_ns if hasattr(e, "response_start_ns") else "", e.attributes)
                print(collector.handler.stats)
            for e in answered:  # paired with its own reply: the reply's size is the key's
                if not e.attributes.get("truncated"):  # (a command cut short may show part of its key)
                    assert e.response_bytes == reply_size[e.target], e
            whole = [e.target for e in gets if not e.attributes.get("truncated")]
            assert len(set(whole)) == len(whole)  # each seen once
            results[(capture_bytes, role)] = (len(gets), len(answered))
    # Everything inside the copied prefixes is decoded: at 4 KiB at least the commands of the first
    # 4 KiB of each write; at 64 KiB all of them.
    per_prefix = SMALL_CAPTURE // len(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(keys[0]), keys[0].encode()))
    for role in ("client", "server"):
        seen, answered = results[(SMALL_CAPTURE, role)]
        assert min(count, per_prefix) <= answered <= seen <= count, (role, results)
        assert results[(65536, role)] == (count, count), (role, results)
        # The default (chosen with bench/bench_capture_size.py) decodes every one of them.
        assert results[(DEFAULT_CAPTURE_BYTES, role)] == (count, count), (role, results)
    print(results)


# -- HTTP -----------------------------------------------------------------------------------------


def http_get(port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()


def read_responses(sock: socket.socket, count: int, body: int) -> int:
    """Read ``count`` responses of ``body`` bytes each (in whatever reads the kernel gives); the bytes read."""
    total = 0
    data = b""
    while data.count(b"HTTP/1.1 200 OK") < count or len(data) < total_expected(data, count, body):
        block = sock.recv(262144)
        assert block, "server closed"
        data += block
    total = len(data)
    return total


def total_expected(data: bytes, count: int, body: int) -> int:
    head = data.index(b"\r\n\r\n") + 4 if b"\r\n\r\n" in data else 0
    return count * (head + body) if head else 1 << 62


def test_http_pipelining_with_large_responses(nginx_server):
    """Ten pipelined requests for a 3 KiB file: the client reads several responses per call (over the
    capture size).  nginx's side decodes all ten; the client's decodes those inside the copied part
    and reports the others without a response, never paired with another's."""
    nginx = nginx_server
    body = bytes(range(256)) * 12  # 3 KiB
    name = f"/pipelined-{os.urandom(4).hex()}.bin"
    (nginx.dir / "html" / name.lstrip("/")).write_bytes(body)
    count = 10
    with capture(nginx.port) as collector:
        with socket.create_connection((HOST, nginx.port)) as sock:
            sock.sendall(b"".join(http_get(nginx.port, f"{name}?{i}") for i in range(count)))
            read = read_responses(sock, count, len(body))
        wait_quiet(collector, nginx.port, 2 * count)
    response_bytes = read // count
    server = [e for e in exchanges(collector, nginx.port, "server") if name in e.target]
    client = [e for e in exchanges(collector, nginx.port, "client") if name in e.target]
    assert [(e.target, e.status, e.response_bytes) for e in server] == [
        (f"{name}?{i}", 200, response_bytes) for i in range(count)]
    assert [e.target for e in client] == [f"{name}?{i}" for i in range(count)]
    answered = [e for e in client if e.status is not None]
    assert answered, client
    for e in client:
        if e.status is None:
            assert e.attributes.get("gap") and e.response_bytes == 0, e
        else:
            assert (e.status, e.response_bytes) == (200, response_bytes), e
    print("client answered", len(answered), "of", count)


def test_short_connections_with_large_bodies_come_out_whole(nginx_server):
    """New connections one after the other, each for a 2 MB body: the next connection on the same
    kernel socket came before the previous one's last data, and responses were cut short
    (2 MB bodies ending at 1,179,853 bytes) or had no status."""
    nginx = nginx_server
    body = os.urandom(2 << 20)
    name = f"/large-{os.urandom(4).hex()}.bin"
    (nginx.dir / "html" / name.lstrip("/")).write_bytes(body)
    count = 12
    sizes = []
    with capture(nginx.port) as collector:
        for i in range(count):
            with socket.create_connection((HOST, nginx.port)) as sock:
                sock.sendall(f"GET {name}?{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                got = b""
                while block := sock.recv(1 << 20):
                    got += block
            assert got.endswith(body)
            sizes.append(len(got))
        wait_quiet(collector, nginx.port, 2 * count)
    for role in ("client", "server"):
        mine = sorted((e for e in exchanges(collector, nginx.port, role) if name in e.target),
                      key=lambda e: int(e.target.rsplit("?", 1)[1]))
        assert [(e.target, e.status, e.response_bytes, e.attributes["response_body_bytes"]) for e in mine] == [
            (f"{name}?{i}", 200, sizes[i], len(body)) for i in range(count)], role
        assert len({e.conn_id for e in mine}) == count


# -- MySQL ----------------------------------------------------------------------------------------

ROWS = 10_000
TEXT_ROWS = f"SELECT seq, seq * seq, CONCAT('row-', seq) FROM seq_1_to_{ROWS}"
PREPARED_ROWS = f"SELECT seq, CONCAT('row-', seq) FROM seq_1_to_{ROWS} WHERE seq > ?"


def mysql_rows(collector, port: int, role: str, target: str) -> list[tuple]:
    return [(e.status, e.attributes.get("rows"), e.attributes.get("rows_truncated"))
            for e in exchanges(collector, port, role) if e.target == target and e.method in ("QUERY", "STMT_EXECUTE")]


@pytest.mark.parametrize("capture_bytes", sorted({SMALL_CAPTURE, 16384, DEFAULT_CAPTURE_BYTES}))
def test_mysql_ten_thousand_rows_plain_and_prepared(mariadb_server, capture_bytes):
    """A 10,000-row result reported 263 rows.  Rows are counted by their packet headers where the bytes
    were seen; a count that could not be had exactly says so (rows_truncated).  mariadbd writes 16 KB at
    a time and pymysql reads as much: a 16 KiB capture sees every row header (mysql-connector reads a
    packet at a time: 4 KiB is enough for its side)."""
    pymysql = need_module("pymysql", "pymysql")
    connector = need_module("mysql.connector", "mysql-connector-python")
    db = mariadb_server
    with capture(db.port, capture_bytes=capture_bytes) as collector:
        conn = pymysql.connect(host=HOST, port=db.port, user=DB_USER, password=DB_PASSWORD, database=DB_NAME)
        with conn.cursor() as cur:
            assert cur.execute(TEXT_ROWS) == ROWS
        conn.close()
        conn = connector.connect(host=HOST, port=db.port, user=DB_USER, password=DB_PASSWORD, database=DB_NAME,
                                 use_pure=True, ssl_disabled=True)
        cur = conn.cursor(prepared=True)
        cur.execute(PREPARED_ROWS, (0,))
        assert len(cur.fetchall()) == ROWS
        cur.close()
        conn.close()
        wait_quiet(collector, db.port, 100)
    for role in ("client", "server"):
        for target in (TEXT_ROWS, PREPARED_ROWS):
            (got,) = mysql_rows(collector, db.port, role, target)
            print(capture_bytes, role, target[:20], got)
            status, rows, truncated = got
            assert status == "OK"
            if capture_bytes >= 16384 or (role, target) == ("client", PREPARED_ROWS):
                assert (rows, truncated) == (ROWS, None), (role, target, got)
            else:
                assert (rows, truncated) == (ROWS, None) or (truncated is True and rows < ROWS), (role, target, got)


# -- connections older than the capture -------------------------------------------------------------


def test_connections_older_than_the_capture_are_decoded_from_their_next_message(mariadb_server, nginx_server):
    """mariadbd reads a packet's header and its body in two calls: neither alone looked like a command,
    and its side of a connection opened before the capture was never decoded.  nginx's side of a
    keep-alive connection starts at the next request."""
    import http.client

    pymysql = need_module("pymysql", "pymysql")
    db, nginx = mariadb_server, nginx_server
    conn = pymysql.connect(host=HOST, port=db.port, user=DB_USER, password=DB_PASSWORD, database=DB_NAME,
                           autocommit=True)
    web = http.client.HTTPConnection(HOST, nginx.port)
    web.request("GET", "/static.bin")
    web.getresponse().read()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")  # before the capture
        with capture(db.port, nginx.port) as collector:
            with conn.cursor() as cur:
                for i in range(3):
                    cur.execute(f"SELECT n FROM numbers WHERE n = {i + 1}")
            for i in range(3):
                web.request("GET", f"/static.bin?older={i}")
                web.getresponse().read()
            wait_quiet(collector, db.port, 6)
            wait_quiet(collector, nginx.port, 6)
    finally:
        conn.close()
        web.close()
    for role in ("client", "server"):
        queries = [(e.method, e.target, e.status, e.attributes.get("rows"))
                   for e in exchanges(collector, db.port, role) if e.method == "QUERY"]
        assert queries == [("QUERY", f"SELECT n FROM numbers WHERE n = {i + 1}", "OK", 1) for i in range(3)], role
        gets = [(e.target, e.status) for e in exchanges(collector, nginx.port, role) if "older" in e.target]
        assert gets == [(f"/static.bin?older={i}", 200) for i in range(3)], role
