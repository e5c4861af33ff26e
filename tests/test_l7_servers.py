"""L7 decoding of real servers' traffic, end to end: BPF payload capture → L7 handler → exchanges.

nginx (static files, a 404, a keep-alive proxy to an upstream), Redis (redis-cli, redis-py
pipelines, redis-benchmark) and MariaDB (pymysql, the mariadb CLI, binary-protocol prepared
statements through mysql-connector-python) run on loopback; clients and servers both run on
this host, so every exchange is reported twice, once per side, and the tests check both.

Each test runs its own pipeline and makes all the traffic its servers see while it runs, so
the exchanges on the servers' ports are exactly the test's: counts are asserted exactly.
Events are awaited (``wait_for``), then the pipeline runs a short settle and stops, which
drains the rings: the assertions look at everything the kernel captured.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
import uuid

import pytest

from deetune.decoders.http import HttpDecoder
from deetune.decoders.mysql import MysqlDecoder
from deetune.decoders.redis import RedisDecoder
from deetune.events import DataEvent, ExchangeEvent
from deetune.l7 import L7Handler, ListeningPorts
from deetune.probes import ProbeOptions
from deetune.probes.payload import PayloadProbe
from deetune.probes.tcp import TcpProbe
from tests.harness import running_pipeline
from tests.servers import (  # noqa: F401  (fixtures)
    DB_NAME,
    DB_PASSWORD,
    DB_USER,
    HOST,
    STATIC_BYTES,
    Redis,
    free_port,
    mariadb_server,
    need_module,
    nginx_server,
    port_is_free,
    redis_server,
    require_binary,
    upstream_response,
)

pytestmark = [pytest.mark.bpf, pytest.mark.servers]

DECODERS = [HttpDecoder, RedisDecoder, MysqlDecoder]
#: After the awaited events: time for stragglers (which would break the exact counts) to show up.
SETTLE = 0.3
WAIT = 20.0


# -- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def capture(*ports: int, emit_data: bool = False, tcp: bool = True, listening: ListeningPorts | None = None):
    """A pipeline capturing the payload of connections on ``ports`` and decoding it.

    The TCP probe (roles from connection opens) watches the first port only: the kernel filter
    takes one port, and an unfiltered TCP probe would copy every connection of a busy host.
    The servers' ports are the listening ports the handler knows (the fallback for roles):
    reading the host's socket table takes seconds on a host with many TIME-WAIT sockets.
    """
    payload = PayloadProbe(ProbeOptions(), ports=ports, exclude_self=False)
    if listening is None:
        listening = ListeningPorts(reader=lambda: set(ports))
    handler = L7Handler(DECODERS, mute=payload.mute, emit_data=emit_data, listening=listening)
    probes = [TcpProbe(ProbeOptions(port=ports[0])), payload] if tcp else [payload]
    with running_pipeline(probes, handlers=[handler]) as collector:
        collector.handler = handler
        yield collector
        time.sleep(SETTLE)


def exchanges(collector, *ports: int, role: str | None = None) -> list[ExchangeEvent]:
    return collector.matching(
        lambda e: isinstance(e, ExchangeEvent)
        and (e.lport in ports or e.rport in ports)
        and (role is None or e.role == role)
    )


def wait_exchanges(collector, count: int, predicate=lambda e: True, timeout: float = WAIT) -> None:
    collector.wait_for(lambda e: isinstance(e, ExchangeEvent) and predicate(e), count, timeout=timeout)


def by_role(events: list[ExchangeEvent]) -> dict[str, list[ExchangeEvent]]:
    out: dict[str, list[ExchangeEvent]] = {"client": [], "server": []}
    for e in events:
        out.setdefault(e.role, []).append(e)
    return out


def run(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run a client to completion; (its pid, its stdout)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}): {err.strip()}"
    return proc.pid, out


def check_timing(e: ExchangeEvent) -> None:
    assert e.latency_ns is not None and e.latency_ns >= 0
    assert e.duration_ns is not None and e.duration_ns >= e.latency_ns
    assert abs(e.ts - time.time_ns()) < 120e9


def uid() -> str:
    return uuid.uuid4().hex[:10]


# -- nginx --------------------------------------------------------------------------------------

CURL_FORMAT = "%{local_port} %{http_code} %{size_request} %{size_header} %{size_download}\\n"


def curl(*urls: str) -> tuple[int, list[tuple[int, int, int, int, int]]]:
    """curl the URLs on one connection; (pid, [(local port, status, request, header, body bytes)])."""
    binary = require_binary("curl", "curl")
    args = [binary, "-s", "-w", CURL_FORMAT]
    for url in urls:
        args += [url, "-o", "/dev/null"]
    pid, out = run(args)
    return pid, [tuple(int(x) for x in line.split()) for line in out.splitlines()]


def check_http_pair(sides, *, curl_pid, nginx, path, transfer, reason, body=None):
    """The client (curl) and server (nginx) views of one exchange, checked against what curl measured."""
    port, status, request, header, size = transfer
    client, server = sides
    assert (client.role, client.pid, client.comm) == ("client", curl_pid, "curl")
    assert (server.role, server.pid, server.comm) == ("server", nginx.pid, "nginx")
    assert (client.laddr, client.lport, client.raddr, client.rport) == (HOST, port, HOST, nginx.port)
    assert (server.laddr, server.lport, server.raddr, server.rport) == (HOST, nginx.port, HOST, port)
    for e in (client, server):
        assert e.protocol == "http"
        assert (e.method, e.target, e.status, e.error, e.error_message) == ("GET", path, status, status >= 500, None)
        assert e.request_bytes == request
        assert e.response_bytes == header + size
        assert e.attributes == {
            "host": f"{HOST}:{nginx.port}",
            "version": "1.1",
            "reason": reason,
            "request_body_bytes": 0,
            "response_body_bytes": size if body is None else body,
        }
        check_timing(e)


@pytest.mark.parametrize("path, body_syscall", [("/static.bin", "sendfile"), ("/nosendfile/static.bin", "writev")])
def test_nginx_static_file(nginx_server, path, body_syscall):
    nginx = nginx_server
    with capture(nginx.port, emit_data=True) as collector:
        pid, [transfer] = curl(nginx.url(path))
        wait_exchanges(collector, 2, lambda e: e.target == path)
    assert transfer[1:] == (200, transfer[2], transfer[3], len(STATIC_BYTES))
    events = exchanges(collector, nginx.port)
    assert len(events) == 2
    sides = by_role(events)
    assert len(sides["client"]) == len(sides["server"]) == 1
    check_http_pair((sides["client"][0], sides["server"][0]), curl_pid=pid, nginx=nginx, path=path,
                    transfer=transfer, reason="OK", body=1024)
    # How nginx moved the body: sendfile carries no bytes to copy, only its length to skip.
    sent = [e for e in collector.matching(lambda e: isinstance(e, DataEvent)) if e.pid == nginx.pid
            and e.direction == "egress"]
    assert body_syscall in {e.syscall for e in sent}
    assert sum(e.size for e in sent) == transfer[3] + transfer[4]
    assert collector.handler.stats.unknown == 0 and collector.handler.stats.undecodable == {}


def test_nginx_not_found(nginx_server):
    nginx = nginx_server
    path = f"/missing-{uid()}"
    with capture(nginx.port) as collector:
        pid, [transfer] = curl(nginx.url(path))
        wait_exchanges(collector, 2, lambda e: e.target == path)
    assert transfer[1] == 404 and transfer[4] > 0
    sides = by_role(exchanges(collector, nginx.port))
    assert len(sides["client"]) == len(sides["server"]) == 1
    check_http_pair((sides["client"][0], sides["server"][0]), curl_pid=pid, nginx=nginx, path=path,
                    transfer=transfer, reason="Not Found")


def test_nginx_keep_alive_three_requests_on_one_connection(nginx_server):
    nginx = nginx_server
    paths = ["/static.bin", f"/missing-{uid()}", "/nosendfile/static.bin"]
    with capture(nginx.port) as collector:
        pid, transfers = curl(*(nginx.url(p) for p in paths))
        wait_exchanges(collector, 6, lambda e: e.lport == nginx.port or e.rport == nginx.port)
    assert len(transfers) == 3 and len({t[0] for t in transfers}) == 1, transfers  # one connection
    sides = by_role(exchanges(collector, nginx.port))
    assert len(sides["client"]) == len(sides["server"]) == 3
    assert len({e.sock_id for e in sides["client"]}) == len({e.sock_id for e in sides["server"]}) == 1
    assert {e.lport for e in sides["client"]} == {transfers[0][0]}
    assert [e.target for e in sides["client"]] == [e.target for e in sides["server"]] == paths
    for client, server, path, transfer, reason in zip(sides["client"], sides["server"], paths, transfers,
                                                       ["OK", "Not Found", "OK"]):
        check_http_pair((client, server), curl_pid=pid, nginx=nginx, path=path, transfer=transfer, reason=reason)
    # In order on the connection.
    assert all(a.ts_mono_ns < b.ts_mono_ns for a, b in zip(sides["client"], sides["client"][1:]))


def test_nginx_proxies_to_a_keep_alive_upstream(nginx_server):
    nginx = nginx_server
    upstream = nginx.upstream
    tag = uid()
    paths = [f"/api/hello-{tag}", f"/api/status/503/{tag}", f"/api/again-{tag}"]
    transfers = []
    bodies = []
    with capture(nginx.port, upstream.port) as collector:
        for path in paths:
            binary = require_binary("curl", "curl")
            pid, out = run([binary, "-s", "-w", "\n" + CURL_FORMAT, nginx.url(path)])
            body, line = out.rsplit("\n", 2)[0], out.rsplit("\n", 2)[1]
            transfers.append((pid, tuple(int(x) for x in line.split())))
            bodies.append(body)
        wait_exchanges(collector, 4 * len(paths), lambda e: tag in e.target)
    events = [e for e in exchanges(collector, nginx.port, upstream.port)]
    assert len(events) == 4 * len(paths)
    front = by_role([e for e in events if nginx.port in (e.lport, e.rport)])
    back = by_role([e for e in events if upstream.port in (e.lport, e.rport)])
    assert [len(front["client"]), len(front["server"]), len(back["client"]), len(back["server"])] == [3, 3, 3, 3]
    for i, path in enumerate(paths):
        pid, transfer = transfers[i]
        status = 503 if "/status/503/" in path else 200
        assert transfer[1] == status
        # curl → nginx
        check_http_pair((front["client"][i], front["server"][i]), curl_pid=pid, nginx=nginx, path=path,
                        transfer=transfer, reason="Service Unavailable" if status == 503 else "OK")
        # nginx → upstream: nginx's worker is the client; the upstream says what it read.
        read = int(re.search(r'"request_bytes":(\d+)', bodies[i]).group(1))
        answer = upstream_response(path, read)
        client, server = back["client"][i], back["server"][i]
        assert (client.pid, client.comm, client.rport, client.raddr) == (nginx.pid, "nginx", upstream.port, HOST)
        assert (server.pid, server.lport) == (upstream.pid, upstream.port)
        assert (client.lport, client.sock_id != server.sock_id) == (server.rport, True)
        for e in (client, server):
            assert e.protocol == "http"
            assert (e.method, e.target, e.status, e.error) == ("GET", path, status, status == 503)
            assert (e.request_bytes, e.response_bytes) == (read, len(answer))
            assert e.attributes["host"] == "backend"
            assert e.attributes["response_body_bytes"] == len(answer) - answer.index(b"\r\n\r\n") - 4
            check_timing(e)
    # Keep-alive to the upstream (proxy_http_version 1.1, Connection ""): one connection for all three.
    assert len({e.lport for e in back["client"]}) == 1
    assert len({e.sock_id for e in back["server"]}) == 1


# -- Redis --------------------------------------------------------------------------------------


def resp(*args) -> bytes:
    """A command as RESP encodes it."""
    parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def redis_cli(server, *args) -> tuple[int, str]:
    binary = require_binary("redis-cli", "redis-tools")
    return run([binary, "-h", HOST, "-p", str(server.port), *args])


def check_redis_pair(events, *, client_pid, server, method, target, request, reply, status="OK",
                     error_message=None, reply_type=None, argc=None):
    sides = by_role(events)
    assert len(sides["client"]) == len(sides["server"]) == 1, events
    client, server_side = sides["client"][0], sides["server"][0]
    assert client.pid == client_pid and server_side.pid == server.pid and server_side.comm == "redis-server"
    assert (client.rport, server_side.lport, client.lport) == (server.port, server.port, server_side.rport)
    for e in (client, server_side):
        assert e.protocol == "redis"
        assert (e.method, e.target, e.status, e.error, e.error_message) == (
            method, target, status, status == "ERR", error_message)
        assert (e.request_bytes, e.response_bytes) == (len(request), len(reply))
        if reply_type is not None:
            assert e.attributes["reply_type"] == reply_type
        if argc is not None:
            assert e.attributes["argc"] == argc
        check_timing(e)


def test_redis_cli_set_get_and_error(redis_server):
    redis = redis_server
    key = f"k-{uid()}"
    with capture(redis.port) as collector:
        set_pid, out = redis_cli(redis, "SET", key, "v")
        assert out.strip() == "OK"
        get_pid, out = redis_cli(redis, "GET", key)
        assert out.strip() == "v"
        incr_pid, out = redis_cli(redis, "INCR", key)
        assert out.strip().startswith("ERR")
        wait_exchanges(collector, 6, lambda e: e.target == key)
    events = exchanges(collector, redis.port)
    assert len(events) == 6
    check_redis_pair([e for e in events if e.method == "SET"], client_pid=set_pid, server=redis, method="SET",
                     target=key, request=resp("SET", key, "v"), reply=b"+OK\r\n", reply_type="simple", argc=2)
    check_redis_pair([e for e in events if e.method == "GET"], client_pid=get_pid, server=redis, method="GET",
                     target=key, request=resp("GET", key), reply=b"$1\r\nv\r\n", reply_type="bulk", argc=1)
    message = "ERR value is not an integer or out of range"
    check_redis_pair([e for e in events if e.method == "INCR"], client_pid=incr_pid, server=redis, method="INCR",
                     target=key, request=resp("INCR", key), reply=b"-" + message.encode() + b"\r\n",
                     status="ERR", error_message=message, reply_type="error")
    assert all(e.error_message.startswith("ERR") for e in events if e.method == "INCR")


def test_redis_py_pipeline_in_order(redis_server):
    redis_py = need_module("redis", "redis")
    redis = redis_server
    tag = uid()
    a, b, lst = f"p:{tag}:a", f"p:{tag}:b", f"p:{tag}:l"
    # (command, its reply in RESP3)
    commands = [
        (("SET", a, "1"), b"+OK\r\n"),
        (("SET", b, "hello"), b"+OK\r\n"),
        (("GET", b), b"$5\r\nhello\r\n"),
        (("INCR", a), b":2\r\n"),
        (("RPUSH", lst, "x", "y", "z"), b":3\r\n"),
        (("LRANGE", lst, "0", "-1"), b"*3\r\n$1\r\nx\r\n$1\r\ny\r\n$1\r\nz\r\n"),
        (("GET", f"p:{tag}:missing"), b"_\r\n"),
        (("DEL", a, b, lst), b":3\r\n"),
    ]
    with capture(redis.port) as collector:
        client = redis_py.Redis(host=HOST, port=redis.port, protocol=3)
        try:
            pipe = client.pipeline(transaction=False)
            for args, _ in commands:
                pipe.execute_command(*args)
            results = pipe.execute()
        finally:
            client.close()
        assert results == [True, True, b"hello", 2, 3, [b"x", b"y", b"z"], None, 3]
        wait_exchanges(collector, 2 * len(commands), lambda e: tag in e.target)
    sides = by_role(exchanges(collector, redis.port))
    setup = {"HELLO", "CLIENT", "AUTH", "SELECT", "PING"}  # what redis-py says when it connects
    for role, pid in (("client", os.getpid()), ("server", redis.pid)):
        mine = [e for e in sides[role] if e.method not in setup]
        assert len(mine) == len(commands), mine
        assert all(e.pid == pid for e in sides[role])
        assert len({e.sock_id for e in sides[role]}) == 1
        assert sides[role][-len(commands):] == mine  # the connection's set-up came first
        for e, (args, reply) in zip(mine, commands):
            assert (e.method, e.target, e.status, e.error) == (args[0], args[1], "OK", False)
            assert (e.request_bytes, e.response_bytes) == (len(resp(*args)), len(reply))
            assert e.attributes["argc"] == len(args) - 1
        assert [e.attributes["reply_type"] for e in mine] == [
            "simple", "simple", "bulk", "integer", "integer", "array", "null", "integer"]
    # Pipelined: the client wrote all the commands at once (one syscall: one start time).
    assert len({e.ts_mono_ns for e in sides["client"][-len(commands):]}) == 1


def test_redis_benchmark_thousand_gets(redis_server):
    redis = redis_server
    binary = require_binary("redis-benchmark", "redis-tools")
    n = 1000
    with capture(redis.port) as collector:
        pid, _ = run([binary, "-h", HOST, "-p", str(redis.port), "-n", str(n), "-c", "1", "-t", "get",
                      "-P", "1", "-q"], timeout=120)
        wait_exchanges(collector, 2 * n, lambda e: e.method == "GET", timeout=60)
    events = exchanges(collector, redis.port)
    gets = by_role([e for e in events if e.method == "GET"])
    assert len(gets["client"]) == n and len(gets["server"]) == n
    assert {e.pid for e in gets["client"]} == {pid} and {e.pid for e in gets["server"]} == {redis.pid}
    request = resp("GET", "key:__rand_int__")
    for e in gets["client"] + gets["server"]:
        assert (e.target, e.status, e.error) == ("key:__rand_int__", "OK", False)
        assert (e.request_bytes, e.response_bytes) == (len(request), len(b"$-1\r\n"))
        assert e.attributes["reply_type"] == "null"
    # Nothing but GETs and redis-benchmark's preliminary CONFIG GETs.
    assert {e.method for e in events} <= {"GET", "CONFIG"}
    assert collector.stats.lost == 0


@pytest.fixture
def redis_on_10625(tmp_path):
    """A Redis on a port no decoder knows (10625, or another if that one is taken)."""
    server = Redis.start(tmp_path / "redis", port=10625 if port_is_free(10625) else free_port())
    yield server
    server.stop()


def test_redis_on_other_port_recognised_by_content(redis_on_10625):
    """No port hint, no connection open seen, no listening-port table: the bytes alone tell
    the protocol and which side is the client."""
    redis_py = need_module("redis", "redis")
    redis = redis_on_10625
    assert redis.port not in RedisDecoder.default_ports
    client = redis_py.Redis(host=HOST, port=redis.port, protocol=2)
    try:
        client.ping()  # connected (and set up) before the capture starts
        key = f"c-{uid()}"
        with capture(redis.port, tcp=False, listening=ListeningPorts(reader=set)) as collector:
            assert client.set(key, "value") is True
            assert client.get(key) == b"value"
            wait_exchanges(collector, 4, lambda e: e.target == key)
    finally:
        client.close()
    events = exchanges(collector, redis.port)
    assert len(events) == 4
    sides = by_role(events)
    assert [(e.method, e.pid) for e in sides["client"]] == [("SET", os.getpid()), ("GET", os.getpid())]
    assert [(e.method, e.pid) for e in sides["server"]] == [("SET", redis.pid), ("GET", redis.pid)]
    for e in events:
        assert (e.protocol, e.target, e.status) == ("redis", key, "OK")
    assert [e.response_bytes for e in sides["client"]] == [5, len(b"$5\r\nvalue\r\n")]


# -- MariaDB ------------------------------------------------------------------------------------


def check_mysql_sides(events, *, client_pid, db):
    """Exchanges of one connection: client and server views pair up; returns the client's."""
    sides = by_role(events)
    client, server = sides["client"], sides["server"]
    assert len(client) == len(server), events
    assert {e.pid for e in client} == {client_pid}
    assert {e.pid for e in server} == {db.pid} and {e.comm for e in server} == {"mariadbd"}
    for c, s in zip(client, server):
        assert c.protocol == s.protocol == "mysql"
        assert (c.method, c.target, c.status, c.error, c.error_message) == (
            s.method, s.target, s.status, s.error, s.error_message)
        assert (c.request_bytes, c.response_bytes) == (s.request_bytes, s.response_bytes)
        assert c.attributes == s.attributes
        assert (c.rport, s.lport, c.lport) == (db.port, db.port, s.rport)
    return client


def no_secret(events, *secrets: str) -> None:
    for e in events:
        text = json.dumps(e.to_json(), default=str)
        for secret in secrets:
            assert secret not in text
            assert secret.encode().hex() not in text


def test_mysql_login_query_and_syntax_error(mariadb_server):
    pymysql = need_module("pymysql", "pymysql")
    db = mariadb_server
    select = "SELECT n, square, name FROM numbers WHERE n <= 7"
    with capture(db.port) as collector:
        conn = pymysql.connect(host=HOST, port=db.port, user=DB_USER, password=DB_PASSWORD, database=DB_NAME,
                               autocommit=True)
        lport = conn._sock.getsockname()[1]
        with conn.cursor() as cur:
            assert cur.execute(select) == 7
            assert len(cur.fetchall()) == 7 and len(cur.description) == 3
            with pytest.raises(pymysql.err.ProgrammingError) as syntax:
                cur.execute("SELEC 1")
        conn.close()
        wait_exchanges(collector, 10, lambda e: db.port in (e.lport, e.rport))
    assert syntax.value.args[0] == 1064
    events = exchanges(collector, db.port)
    assert len(events) == 10
    client = check_mysql_sides(events, client_pid=os.getpid(), db=db)
    assert {e.lport for e in client} == {lport}
    assert [(e.method, e.target) for e in client] == [
        ("LOGIN", ""), ("QUERY", "SET NAMES utf8mb4"), ("QUERY", select), ("QUERY", "SELEC 1"), ("QUIT", "")]
    login, names, rows, error, quit_ = client
    assert (login.status, login.error) == ("OK", False)
    assert login.attributes["user"] == DB_USER and login.attributes["database"] == DB_NAME
    assert "MariaDB" in login.attributes["server_version"]
    assert (rows.status, rows.attributes["columns"], rows.attributes["rows"]) == ("OK", 3, 7)
    assert rows.request_bytes == 4 + 1 + len(select)
    assert (error.status, error.error, error.attributes["error_code"], error.attributes["sql_state"]) == (
        "ERR", True, 1064, "42000")
    assert error.error_message == syntax.value.args[1]
    assert error.request_bytes == 4 + 1 + len("SELEC 1")
    assert (quit_.status, quit_.response_bytes, quit_.latency_ns) == (None, 0, None)
    for e in (login, names, rows, error):
        check_timing(e)
    no_secret(collector.events, DB_PASSWORD)


def test_mysql_failed_login(mariadb_server):
    pymysql = need_module("pymysql", "pymysql")
    db = mariadb_server
    wrong = "not-the-Pa55word"
    with capture(db.port) as collector:
        with pytest.raises(pymysql.err.OperationalError) as denied:
            pymysql.connect(host=HOST, port=db.port, user=DB_USER, password=wrong, database=DB_NAME)
        wait_exchanges(collector, 2, lambda e: db.port in (e.lport, e.rport))
    assert denied.value.args[0] == 1045
    events = exchanges(collector, db.port)
    assert len(events) == 2
    (login,) = check_mysql_sides(events, client_pid=os.getpid(), db=db)
    assert (login.method, login.status, login.error) == ("LOGIN", "ERR", True)
    assert login.error_message == f"Access denied for user '{DB_USER}'@'127.0.0.1' (using password: YES)"
    assert login.error_message == denied.value.args[1]
    assert (login.attributes["error_code"], login.attributes["sql_state"]) == (1045, "28000")
    assert login.attributes["user"] == DB_USER
    no_secret(collector.events, wrong, DB_PASSWORD)


def test_mysql_sql_level_prepare_with_the_cli(mariadb_server):
    db = mariadb_server
    binary = require_binary("mariadb", "mariadb-client")
    sql = ["PREPARE s FROM 'SELECT ?, ? + 1'", "SET @a = 41", "EXECUTE s USING @a, @a", "DEALLOCATE PREPARE s"]
    with capture(db.port) as collector:
        pid, out = run([binary, "--no-defaults", "-h", HOST, "-P", str(db.port), f"-u{DB_USER}",
                        f"-p{DB_PASSWORD}", "-N", "-B", DB_NAME, "-e", "; ".join(sql)])
        assert out.split() == ["41", "42"]
        wait_exchanges(collector, 2 * (len(sql) + 2), lambda e: db.port in (e.lport, e.rport))
    events = exchanges(collector, db.port)
    assert len(events) == 2 * (len(sql) + 2)
    client = check_mysql_sides(events, client_pid=pid, db=db)
    assert [(e.method, e.target) for e in client] == [("LOGIN", "")] + [("QUERY", s) for s in sql] + [("QUIT", "")]
    assert all(e.status == "OK" and not e.error for e in client[:-1])
    assert client[0].attributes["user"] == DB_USER and client[0].attributes["database"] == DB_NAME
    assert (client[3].attributes["columns"], client[3].attributes["rows"]) == (2, 1)
    assert [e.request_bytes for e in client[1:-1]] == [4 + 1 + len(s) for s in sql]
    no_secret(collector.events, DB_PASSWORD)


def test_mysql_binary_prepared_statements(mariadb_server):
    connector = need_module("mysql.connector", "mysql-connector-python")
    db = mariadb_server
    statement = "SELECT n, name FROM numbers WHERE n > ?"
    with capture(db.port) as collector:
        conn = connector.connect(host=HOST, port=db.port, user=DB_USER, password=DB_PASSWORD, database=DB_NAME,
                                 use_pure=True, ssl_disabled=True)
        cur = conn.cursor(prepared=True)
        cur.execute(statement, (7,))
        assert [tuple(r) for r in cur.fetchall()] == [(8, "n8"), (9, "n9"), (10, "n10")]
        cur.execute(statement, (8,))
        assert [tuple(r) for r in cur.fetchall()] == [(9, "n9"), (10, "n10")]
        cur.close()
        conn.close()
        wait_exchanges(collector, 2, lambda e: e.method == "QUIT")
    events = exchanges(collector, db.port)
    client = check_mysql_sides(events, client_pid=os.getpid(), db=db)
    binary = [e for e in client if e.method.startswith("STMT_")]
    assert [e.method for e in binary if e.method != "STMT_RESET"] == [
        "STMT_PREPARE", "STMT_EXECUTE", "STMT_EXECUTE", "STMT_CLOSE"]
    assert all(e.target == statement for e in binary)
    prepare = binary[0]
    assert prepare.status == "OK" and not prepare.error
    assert (prepare.attributes["params"], prepare.attributes["columns"]) == (1, 2)
    statement_id = prepare.attributes["statement_id"]
    assert {e.attributes["statement_id"] for e in binary} == {statement_id}
    executes = [e for e in binary if e.method == "STMT_EXECUTE"]
    assert [(e.status, e.attributes["columns"], e.attributes["rows"]) for e in executes] == [("OK", 2, 3), ("OK", 2, 2)]
    assert [e.request_bytes for e in executes] == [executes[0].request_bytes] * 2
    close = binary[-1]
    assert (close.method, close.status, close.response_bytes) == ("STMT_CLOSE", None, 0)
    # The rest: the login, the connector's set-up queries, its pings and resets, and QUIT.
    assert client[0].method == "LOGIN" and client[0].status == "OK" and client[-1].method == "QUIT"
    others = [e for e in client[1:-1] if not e.method.startswith("STMT_")]
    assert all(e.method in ("QUERY", "PING") and e.status == "OK" for e in others), others
    assert all(e.target.upper().startswith("SET ") for e in others if e.method == "QUERY")
    no_secret(collector.events, DB_PASSWORD)
