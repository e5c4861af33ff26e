"""Recording without BPF: redaction, filters, sampling, the byte logs of the L7 handler, task
descriptions, storage, the manager and recorder, the API and the CLI.

The end-to-end tests (real servers, the agent) are in tests/test_recording.py.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from deetune.api import ApiServer, openapi_document
from deetune.decoders.http import HttpDecoder
from deetune.decoders.mysql import MysqlDecoder
from deetune.decoders.redis import RedisDecoder
from deetune.events import DataEvent, ExchangeEvent
from deetune.l7 import L7Handler, ListeningPorts
from deetune.recording import storage
from deetune.recording.capture import ConnLog, RecordingPorts, Stream
from deetune.recording.events import RecordedEvent, RecordingStatusEvent
from deetune.recording.export import har_document
from deetune.recording.model import RecordedExchange
from deetune.recording.recorder import Recorder, RecordingManager
from deetune.recording.redact import Redactor
from deetune.recording.tasks import Matcher, Redaction, TaskError, TaskSpec, sample_point, sampled
from deetune.topology.store import SCHEMA_VERSION, StoreSink, TopologyStore, migrate

NS = 1_000_000_000


# ---- redaction --------------------------------------------------------------------------------------


def redact(protocol: str, request: bytes, response: bytes = b"", method: str = "GET", target: str = "",
           **rules: Any):
    return Redactor(Redaction(**rules)).apply(protocol, method, request, response, target)


def test_http_default_headers_are_masked_in_both_directions():
    request = (b"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cr3t-token\r\ncookie: sid=abc; u=1\r\n"
               b"Proxy-Authorization:Basic Zm9vOmJhcg==\r\n\r\n")
    response = b"HTTP/1.1 200 OK\r\nSet-Cookie: sid=zzz; HttpOnly\r\nContent-Length: 2\r\n\r\nok"
    req, resp, target, rules = redact("http", request, response, target="/a")
    assert req == (b"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: [REDACTED]\r\ncookie: [REDACTED]\r\n"
                   b"Proxy-Authorization: [REDACTED]\r\n\r\n")
    assert resp == b"HTTP/1.1 200 OK\r\nSet-Cookie: [REDACTED]\r\nContent-Length: 2\r\n\r\nok"
    assert rules == ("http.authorization", "http.cookie", "http.proxy-authorization", "http.set-cookie")
    assert target == "/a"


def test_http_headers_of_a_cut_head_and_no_defaults():
    cut = b"GET / HTTP/1.1\r\nAuthorization: Bearer abcdef"
    assert redact("http", cut)[0] == b"GET / HTTP/1.1\r\nAuthorization: [REDACTED]"
    untouched = b"GET / HTTP/1.1\r\nAuthorization: Bearer abc\r\n\r\n"
    req, _, _, rules = redact("http", untouched, defaults=False)
    assert req == untouched and rules == ()
    req, _, _, rules = redact("http", b"GET / HTTP/1.1\r\nX-Api-Key: k1\r\nAuthorization: b\r\n\r\n",
                              defaults=False, headers=("x-API-key",))
    assert req == b"GET / HTTP/1.1\r\nX-Api-Key: [REDACTED]\r\nAuthorization: b\r\n\r\n"
    assert rules == ("header:x-api-key",)


def test_json_body_fields_are_masked_and_content_length_fixed():
    body = b'{"user": {"name": "ann", "password": "pw1"}, "items": [{"token": "t1"}, {"token": "t2"}]}'
    request = b"POST /login HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body)
    req, _, _, rules = redact("http", request, method="POST", json=("user.password", "**.token"))
    head, _, new_body = req.partition(b"\r\n\r\n")
    assert json.loads(new_body) == {"user": {"name": "ann", "password": "[REDACTED]"},
                                    "items": [{"token": "[REDACTED]"}, {"token": "[REDACTED]"}]}
    assert f"Content-Length: {len(new_body)}".encode() in head
    assert rules == ("json:user.password", "json:**.token")
    # arrays along a path are walked through; * is any key
    req, _, _, rules = redact("http", request, method="POST", json=("items.token", "user.*"))
    assert json.loads(req.partition(b"\r\n\r\n")[2]) == {
        "user": {"name": "[REDACTED]", "password": "[REDACTED]"},
        "items": [{"token": "[REDACTED]"}, {"token": "[REDACTED]"}]}


def test_json_rules_on_chunked_and_cut_bodies():
    body = b'{"password":"pw1","a":1}'
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"5\r\n" + body[:5] + b"\r\n"
               + b"%x\r\n" % (len(body) - 5) + body[5:] + b"\r\n0\r\n\r\n")
    _, resp, _, rules = redact("http", b"", chunked, json=("password",))
    masked = b'{"password":"[REDACTED]","a":1}'
    assert resp == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(masked), masked)
    assert rules == ("json:password",)
    cut = b'POST / HTTP/1.1\r\nContent-Length: 500\r\n\r\n{"a": 1, "password": "pw1", "b": "' + b"x" * 20
    req, _, _, rules = redact("http", cut, json=("password",), method="POST")
    assert b"pw1" not in req and b'"password": "[REDACTED]"' in req and b"Content-Length: 500" in req
    assert rules == ("json:password",)


def test_regex_rules_keep_lengths():
    request = b"GET /x?token=abc123&q=1 HTTP/1.1\r\n\r\n"
    req, resp, target, rules = redact("http", request, b"HTTP/1.1 200 OK\r\n\r\ntoken=zz", target="/x?token=abc123&q=1",
                                      patterns=("token=([^& ]+)",))
    assert req == b"GET /x?token=******&q=1 HTTP/1.1\r\n\r\n"
    assert resp.endswith(b"token=**") and target == "/x?token=******&q=1"
    assert rules == ("regex:token=([^& ]+)",)
    redis_req = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$11\r\ncard=123456\r\n"
    req, _, _, rules = redact("redis", redis_req, method="SET", patterns=(r"\d{6}",))
    assert req == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$11\r\ncard=******\r\n"


def test_redis_auth_hello_and_friends():
    req, _, _, rules = redact("redis", b"*2\r\n$4\r\nAUTH\r\n$9\r\nhunter2!!\r\n", method="AUTH")
    assert req == b"*2\r\n$4\r\nAUTH\r\n$10\r\n[REDACTED]\r\n" and rules == ("redis.auth",)
    req, _, _, _ = redact("redis", b"*3\r\n$4\r\nauth\r\n$5\r\nalice\r\n$2\r\npw\r\n", method="AUTH")
    assert req == b"*3\r\n$4\r\nauth\r\n$10\r\n[REDACTED]\r\n$10\r\n[REDACTED]\r\n"
    hello = b"*6\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH\r\n$5\r\nalice\r\n$6\r\nsecret\r\n$7\r\nSETNAME\r\n"
    req, _, _, _ = redact("redis", hello + b"", method="HELLO")
    assert b"alice" not in req and b"secret" not in req and req.startswith(b"*6\r\n$5\r\nHELLO\r\n$1\r\n3\r\n$4\r\nAUTH")
    # cut before the end: nothing after the command name may be secret
    req, _, _, rules = redact("redis", b"*2\r\n$4\r\nAUTH\r\n$9\r\nhunt", method="AUTH")
    assert req == b"*2\r\n$4\r\nAUTH\r\n" and rules == ("redis.auth",)
    req, _, _, _ = redact("redis", b"AUTH hunter2\r\n", method="AUTH")
    assert req == b"AUTH [REDACTED]\r\n"
    req, _, _, rules = redact("redis", b"*4\r\n$6\r\nCONFIG\r\n$3\r\nSET\r\n$11\r\nrequirepass\r\n$3\r\npw9\r\n",
                              method="CONFIG")
    assert b"pw9" not in req and rules == ("redis.secrets",)
    req, _, _, _ = redact("redis", b"*4\r\n$3\r\nACL\r\n$7\r\nSETUSER\r\n$3\r\nbob\r\n$6\r\n>pw123\r\n", method="ACL")
    assert b"pw123" not in req and b"bob" in req
    plain = b"*2\r\n$3\r\nGET\r\n$4\r\nAUTH\r\n"
    assert redact("redis", plain, method="GET")[0] == plain
    assert redact("redis", b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n", method="AUTH", defaults=False)[0].endswith(b"pw\r\n")


def _packet(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


def _login(auth: bytes, database: bytes = b"db1") -> bytes:
    caps = 0x00000200 | 0x00008000 | 0x00200000 | 0x00000008 | 0x00080000
    payload = (caps.to_bytes(4, "little") + (1 << 24).to_bytes(4, "little") + b"\x21" + b"\0" * 23 + b"alice\0"
               + bytes([len(auth)]) + auth + database + b"\0" + b"mysql_native_password\0")
    return _packet(1, payload)


def test_mysql_login_keeps_the_user_not_the_auth_data():
    from deetune.replay.mysql import parse_recorded_login

    scramble = bytes(range(100, 120))
    request = _login(scramble) + _packet(3, b"more-auth-data")
    req, _, _, rules = redact("mysql", request, method="LOGIN")
    assert scramble not in req and b"more-auth-data" not in req and b"alice\0" in req
    assert rules == ("mysql.auth",)
    login = parse_recorded_login(req)  # what replay reads still parses
    assert login is not None and login.database == "db1"
    # the packet lengths are right
    from deetune.recording.redact import _packets
    packets, rest = _packets(req)
    assert rest == b"" and [seq for seq, _ in packets] == [1, 3] and packets[1][1] == b""
    # cut inside the auth data: everything after the user goes
    cut, _, _, _ = redact("mysql", _login(scramble)[:50], method="LOGIN")
    assert scramble[:5] not in cut and b"alice" in cut


def test_mysql_change_user_and_password_literals():
    change = _packet(0, b"\x11bob\0" + bytes([20]) + b"S" * 20 + b"db\0")
    req, _, _, rules = redact("mysql", change, method="CHANGE_USER")
    assert b"S" * 20 not in req and b"bob\0\0db\0" in req and rules == ("mysql.auth",)
    sql = b"CREATE USER 'u'@'%' IDENTIFIED BY 'p@ss''word'"
    req, _, target, rules = redact("mysql", _packet(0, b"\x03" + sql), method="QUERY", target=sql.decode())
    assert b"p@ss" not in req and b"IDENTIFIED BY '[REDACTED]'" in req and "p@ss" not in target
    assert rules == ("mysql.password",) and int.from_bytes(req[:3], "little") == len(req) - 4
    plain = _packet(0, b"\x03SELECT 1")
    assert redact("mysql", plain, method="QUERY", target="SELECT 1") == (plain, b"", "SELECT 1", ())


# ---- filters, sampling, task descriptions -------------------------------------------------------------


def matcher(**spec: Any) -> Matcher:
    return Matcher(TaskSpec.from_json({"server": "s", **spec}))


def test_filters():
    m = matcher(method="get", path="/api/*")
    assert m.matches("http", "GET", "/api/orders?x=1", "c")
    assert not m.matches("http", "POST", "/api/orders", "c")
    assert not m.matches("http", "GET", "/other/api/x", "c")
    assert not m.matches("redis", "GET", "/api/x", "c")  # the filter implies http
    m = matcher(path="/items/?")
    assert m.matches("http", "PUT", "/items/7?q", None) and not m.matches("http", "PUT", "/items/77", None)
    m = matcher(command="hget")
    assert m.matches("redis", "HGET", "k", None) and not m.matches("redis", "GET", "k", None)
    m = matcher(statement=r"FROM\s+numbers\b")
    assert m.matches("mysql", "QUERY", "SELECT * FROM  numbers WHERE n=1", None)
    assert not m.matches("mysql", "QUERY", "SELECT * FROM numbers2", None)
    assert not m.matches("mysql", "LOGIN", "", None)
    m = matcher(client="web", protocol="redis")
    assert m.matches("redis", "GET", "k", "web") and not m.matches("redis", "GET", "k", "worker")
    assert not m.matches("http", "GET", "/", "web")
    assert matcher().matches("mysql", "QUERY", "x", None)


@pytest.mark.parametrize(("spec", "message"), [
    ({}, "server must be a service name (1 to 256 characters)"),
    ({"server": " "}, "server must be a service name (1 to 256 characters)"),
    ({"server": "s", "bogus": 1}, "unknown field 'bogus'"),
    ({"server": "s", "method": "GET", "command": "GET"}, "an endpoint filter is for one protocol"),
    ({"server": "s", "path": "/x", "protocol": "redis"}, "the filter is for http, not redis"),
    ({"server": "s", "statement": "("}, "statement is not a regular expression"),
    ({"server": "s", "limit": 65537}, "limit must be an integer from 1 to 65536"),
    ({"server": "s", "limit": 0}, "limit must be an integer from 1 to 65536"),
    ({"server": "s", "sample": 0}, "sample must be a ratio"),
    ({"server": "s", "sample": 1.5}, "sample must be a ratio"),
    ({"server": "s", "count": 0}, "count must be an integer from 1"),
    ({"server": "s", "count": True}, "count must be an integer from 1"),
    ({"server": "s", "duration": -1}, "duration must be seconds"),
    ({"server": "s", "webhook": "ftp://x"}, "webhook must be an http:// or https:// URL"),
    ({"server": "s", "redact": {"headers": ["bad header"]}}, "redact.headers: 'bad header' is not"),
    ({"server": "s", "redact": {"patterns": ["a*"]}}, "redact.patterns: 'a*' is not"),
    ({"server": "s", "redact": {"nope": 1}}, "unknown redaction field 'nope'"),
    ([], "a task is a JSON object"),
])
def test_bad_task_descriptions(spec, message):
    with pytest.raises(TaskError) as caught:
        TaskSpec.from_json(spec)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_task_defaults_and_round_trip():
    spec = TaskSpec.from_json({"server": "nginx"})
    assert (spec.limit, spec.sample, spec.redact.defaults, spec.effective_protocol) == (65536, 1.0, True, None)
    assert TaskSpec.from_json(spec.to_json()) == spec
    assert TaskSpec.from_json({"server": "s", "statement": "x"}).effective_protocol == "mysql"


def test_sampling_is_deterministic_and_close_to_the_ratio():
    requests = [b"GET /item/%d HTTP/1.1\r\n\r\n" % i for i in range(4000)]
    kept = [r for r in requests if sampled("rec-000000000001", r, 0.25)]
    assert kept == [r for r in requests if sample_point("rec-000000000001", r) < 0.25]
    assert 0.22 < len(kept) / len(requests) < 0.28
    other = [r for r in requests if sampled("rec-000000000002", r, 0.25)]
    assert other != kept  # per task
    assert all(sampled("t", r, 1.0) for r in requests[:10])


# ---- byte logs ------------------------------------------------------------------------------------------


def test_stream_peek_stops_at_gaps_and_trims():
    stream = Stream(100, cap=1 << 20)
    stream.append(b"abcd", 4)
    stream.append(b"ef", 5)  # 3 bytes not captured
    stream.append(b"ghij", 4)
    assert stream.peek(100, 100) == b"abcdef"
    assert stream.peek(102, 3) == b"cde"
    assert stream.peek(106, 10) == b""  # inside the gap
    assert stream.peek(109, 10) == b"ghij"
    assert stream.peek(99, 10) == b""  # before the log
    stream.trim(109)
    assert len(stream.segments) == 1 and stream.held == 4
    small = Stream(0, cap=5)
    small.append(b"abc", 3)
    small.append(b"defg", 4)  # over the cap: a gap
    assert small.peek(0, 10) == b"abcde"


def test_conn_log_slices_by_sizes_and_steps_over_interim_responses():
    log = ConnLog(0, 0, limit=1000)
    req1 = b"POST /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    resp1 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    req2 = b"GET /b HTTP/1.1\r\n\r\n"
    resp2 = b"HTTP/1.1 204 No Content\r\n\r\n"
    log.feed(False, req1, len(req1))  # a server: reads requests
    log.feed(True, interim, len(interim))
    log.feed(False, b"abc", 3)
    log.feed(True, resp1 + resp2, len(resp1 + resp2))
    log.feed(False, req2, len(req2))
    assert log.take(False, "http", "POST", len(req1) + 3, len(resp1)) == (req1 + b"abc", resp1)
    assert log.take(False, "http", "GET", len(req2), len(resp2)) == (req2, resp2)
    # the limit cuts
    log = ConnLog(0, 0, limit=10)
    log.feed(True, req2, len(req2))
    log.feed(False, resp2, len(resp2))
    assert log.take(True, "http", "GET", len(req2), len(resp2)) == (req2[:10], resp2[:10])
    # misaligned: not plausible
    log = ConnLog(0, 0, limit=1000)
    log.feed(True, b"xxGET / HTTP/1.1\r\n\r\n", 20)
    assert log.take(True, "http", "GET", 18, 0) is None


def test_conn_log_steps_over_the_mysql_greeting():
    greeting = _packet(0, b"\x0a5.5.5-10.11.6-MariaDB\0" + b"\0" * 40)
    login = _login(b"x" * 20)
    ok = _packet(2, b"\x00\x00\x00\x02\x00\x00\x00")
    log = ConnLog(0, 0, limit=65536)
    log.feed(True, greeting, len(greeting))  # server side: writes the greeting
    log.feed(False, login, len(login))
    log.feed(True, ok, len(ok))
    assert log.take(False, "mysql", "LOGIN", len(login), len(ok)) == (login, ok)


def data_event(sock: int, egress: bool, data: bytes, *, size: int | None = None, lport: int = 8080,
               rport: int = 40000, t: int = 0) -> DataEvent:
    return DataEvent(t, ts_mono_ns=t, pid=10, tid=10, comm="srv", fd=3, sock_id=sock,
                     direction="egress" if egress else "ingress", syscall="write" if egress else "read",
                     size=len(data) if size is None else size, data=data, start_mono_ns=t, laddr="127.0.0.1",
                     lport=lport, raddr="127.0.0.1", rport=rport, family=4)


def l7(ports: dict[int, int]) -> tuple[L7Handler, RecordingPorts]:
    recording = RecordingPorts()
    recording.ports = ports
    handler = L7Handler([HttpDecoder, RedisDecoder, MysqlDecoder], listening=ListeningPorts(reader=lambda: {8080, 6379}),
                        recording=recording)
    return handler, recording


def exchanges_of(events) -> list[ExchangeEvent]:
    return [e for e in events if isinstance(e, ExchangeEvent)]


def test_l7_attaches_payloads_only_on_recorded_ports():
    handler, recording = l7({8080: 65536})
    req = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    out = [*handler(data_event(1, False, req, t=1)), *handler(data_event(1, True, resp, t=2))]
    [x] = exchanges_of(out)
    assert (x.request_payload, x.response_payload) == (req, resp)
    assert x.to_json()["request_payload"] == base64.b64encode(req).decode()
    # another port: no payload, and the JSON is what it always was
    out = [*handler(data_event(2, False, req, lport=9090, t=3)), *handler(data_event(2, True, resp, lport=9090, t=4))]
    [y] = exchanges_of(out)
    assert y.request_payload is None and "request_payload" not in y.to_json() and "response_payload" not in y.to_json()
    # a capture gap: a prefix, shorter than the wire size
    out = [*handler(data_event(3, False, req, t=5)),
           *handler(data_event(3, True, resp[:20], size=len(resp), t=6))]
    [z] = exchanges_of(out)
    assert z.response_payload == resp[:20] and z.response_bytes == len(resp)


def test_l7_starts_a_pooled_connection_at_a_request_boundary():
    handler, recording = l7({})
    get = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    reply = b"$2\r\nvv\r\n"
    out = [*handler(data_event(5, False, get, lport=6379)), *handler(data_event(5, True, reply, lport=6379))]
    assert exchanges_of(out)[0].request_payload is None
    # the port becomes recorded while a request is in flight: not this one, the next
    handler(data_event(5, False, get, lport=6379))
    recording.ports = {6379: 65536}
    out = [*handler(data_event(5, True, reply, lport=6379))]
    assert exchanges_of(out)[0].request_payload is None
    set_cmd = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"
    out = [*handler(data_event(5, False, set_cmd, lport=6379)), *handler(data_event(5, True, b"+OK\r\n", lport=6379))]
    [x] = exchanges_of(out)
    assert (x.method, x.request_payload, x.response_payload) == ("SET", set_cmd, b"+OK\r\n")
    # the port no longer recorded: the log goes
    recording.ports = {}
    out = [*handler(data_event(5, False, get, lport=6379)), *handler(data_event(5, True, reply, lport=6379))]
    assert exchanges_of(out)[0].request_payload is None


def test_l7_skips_the_client_side_of_a_local_server():
    handler, _ = l7({8080: 65536})
    req = b"GET / HTTP/1.1\r\n\r\n"
    resp = b"HTTP/1.1 204 No Content\r\n\r\n"
    # a client (ephemeral local port) of the local listener 8080
    out = [*handler(data_event(7, True, req, lport=40001, rport=8080)),
           *handler(data_event(7, False, resp, lport=40001, rport=8080))]
    [x] = exchanges_of(out)
    assert x.role == "client" and x.request_payload is None


# ---- storage, manager, recorder ---------------------------------------------------------------------------


class FakeKernel:
    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}
        self.calls: list[tuple[int, int | None]] = []

    def __call__(self, port: int, size: int | None) -> None:
        self.calls.append((port, size))
        if size is None:
            self.sizes.pop(port, None)
        else:
            self.sizes[port] = size


class Setup:
    """A store, a manager over a fake kernel map, a recorder and a store sink, without threads
    of a pipeline: tests call the recorder like the pipeline does and flush the sink."""

    def __init__(self, path, ports: dict[str, set[int]] | None = None, clock=None) -> None:
        self.store = TopologyStore(path)
        self.kernel = FakeKernel()
        self.ports = ports if ports is not None else {"web": {8080}}
        self.now = [1_000 * NS]
        clock = clock or (lambda: self.now[0])
        self.manager = RecordingManager(self.store, set_port_capture=self.kernel, ports_of=lambda s: self.ports.get(s, set()),
                                        clock=clock)
        self.recorder = Recorder(self.manager, clock=clock)
        self.sink = StoreSink(self.store, interval=0.05)
        self.manager.start()

    def feed(self, *events) -> list:
        out = []
        for event in events:
            for item in self.recorder(event):
                out.append(item)
                self.sink.handle(item)
        return out

    def tick(self) -> list:
        out = self.recorder.tick()
        for item in out:
            self.sink.handle(item)
        return out

    def close(self) -> None:
        for item in self.recorder.flush():
            self.sink.handle(item)
        self.sink.close()


def exchange(i: int, *, server="web", client="cli", role="server", payload=True, method="GET",
             target=None, protocol="http", request=None, response=None) -> ExchangeEvent:
    target = target or f"/items/{i}"
    request = request if request is not None else b"%s %s HTTP/1.1\r\nAuthorization: Bearer tok%d\r\n\r\n" % (
        method.encode(), target.encode(), i)
    response = response if response is not None else b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    return ExchangeEvent(
        1_000 * NS + i, ts_mono_ns=i, protocol=protocol, pid=10, comm="srv", role=role, laddr="127.0.0.1",
        lport=8080, raddr="127.0.0.1", rport=40000 + i, method=method, target=target, status=200, error=False,
        latency_ns=1000, duration_ns=2000, request_bytes=len(request), response_bytes=len(response), sock_id=i,
        attributes={"host": "x"}, client_service=client, server_service=server,
        request_payload=request if payload else None, response_payload=response if payload else None)


def test_migration_from_version_2_adds_the_recording_tables(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, target=2)
    conn.execute("INSERT INTO exchanges (ts, client, server, data) VALUES (1, 'a', 'b', '{}')")
    conn.close()
    store = TopologyStore(path)
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    assert conn.execute("SELECT count(*) FROM exchanges").fetchone()[0] == 1
    assert conn.execute("SELECT count(*) FROM recording_tasks").fetchone()[0] == 0


def test_manager_and_recorder_record_count_and_complete(tmp_path):
    s = Setup(tmp_path / "r.db")
    status = s.manager.create({"server": "web", "count": 3, "path": "/items/*", "redact": {"headers": ["x-trace"]}})
    task_id = status["id"]
    assert status["state"] == "pending" and s.kernel.sizes == {8080: 65536}
    out = s.feed(exchange(0))
    assert s.manager.status(task_id)["state"] == "running"
    out += s.feed(exchange(1, target="/other"), exchange(2, role="client"), exchange(3, payload=False), exchange(4),
                  exchange(5), exchange(6))
    # exchange(6) came after the count was reached
    recorded = [e.exchange for e in out if isinstance(e, RecordedEvent)]
    assert [x.target for x in recorded] == ["/items/0", "/items/4", "/items/5"]
    assert [x.seq for x in recorded] == [0, 1, 2]
    assert all(b"tok" not in x.request and x.redactions == ("http.authorization",) for x in recorded)
    # the exchanges passed on carry no payload
    passed = [e for e in out if isinstance(e, ExchangeEvent)]
    assert len(passed) == 7 and all(e.request_payload is None for e in passed)
    final = s.manager.status(task_id)
    assert (final["state"], final["matched"], final["recorded"], final["dropped"]) == ("completed", 4, 3, 1)
    assert final["dropped_by"] == {"sampling": 0, "capture": 1, "queue": 0}
    assert s.kernel.sizes == {} and s.manager.recording_ports.ports == {}
    s.sink.flush()
    stored = list(s.manager.exchanges(task_id))
    assert stored == recorded
    row = s.store.read(lambda c: storage.load_task(c, task_id))
    assert (row.state, row.recorded, row.matched) == ("completed", 3, 4)
    s.close()


def test_duration_stop_restart_resume_and_delete(tmp_path):
    s = Setup(tmp_path / "r.db")
    timed = s.manager.create({"server": "web", "duration": 10})["id"]
    forever = s.manager.create({"server": "web", "protocol": "http", "limit": 100})["id"]
    s.feed(exchange(0))
    assert s.kernel.sizes == {8080: 65536}  # the largest limit of the two
    s.now[0] += 11 * NS
    out = s.tick()
    assert any(isinstance(e, RecordingStatusEvent) and e.task_id == timed and e.state == "completed" for e in out)
    assert s.kernel.sizes == {8080: 100}
    big = exchange(1, response=b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n" + b"z" * 300)
    size = len(big.response_payload)
    [rec] = [e.exchange for e in s.feed(big) if isinstance(e, RecordedEvent)]
    assert len(rec.response) == 100 and rec.response_truncated and not rec.request_truncated
    assert rec.response_size == size and big.response_payload is None  # taken off the event, in place
    s.close()  # the agent stops: the running task stays running
    s2 = Setup(tmp_path / "r.db")
    assert s2.manager.status(forever)["state"] == "running" and s2.manager.status(forever)["recorded"] == 2
    assert s2.manager.status(timed)["state"] == "completed"
    assert s2.kernel.sizes == {8080: 100}
    [rec2] = [e.exchange for e in s2.feed(exchange(2)) if isinstance(e, RecordedEvent)]
    assert (rec2.task_id, rec2.seq) == (forever, 2)  # the sequence goes on
    stopped = s2.manager.stop_task(forever)
    assert stopped["state"] == "stopped" and stopped["recorded"] == 3 and s2.kernel.sizes == {}
    s2.sink.flush()
    assert [x.seq for x in s2.manager.exchanges(forever)] == [0, 1, 2]
    s2.manager.delete(forever)
    s2.sink.flush()
    assert s2.store.read(lambda c: c.execute("SELECT count(*) FROM recorded_exchanges WHERE task_id = ?",
                                             (forever,)).fetchone()[0]) == 0
    assert [t["id"] for t in s2.manager.list()] == [timed]
    s2.close()


def test_sampling_and_queue_full(tmp_path):
    s = Setup(tmp_path / "r.db")
    task_id = s.manager.create({"server": "web", "sample": 0.5})["id"]
    events = [exchange(i) for i in range(200)]
    expected = [e.target for e in events if sampled(task_id, e.request_payload, 0.5)]
    out = s.feed(*events)
    assert [e.exchange.target for e in out if isinstance(e, RecordedEvent)] == expected
    status = s.manager.status(task_id)
    assert status["recorded"] == len(expected) and status["dropped_by"]["sampling"] == 200 - len(expected)
    s.sink.max_queue = 0  # the writer fell behind
    s.feed(*[exchange(i) for i in range(200, 220)])
    status = s.manager.status(task_id)
    assert status["dropped_by"]["queue"] == status["matched"] - status["recorded"] - status["dropped_by"]["sampling"]
    assert status["dropped_by"]["queue"] > 0
    s.sink.max_queue = 100_000
    s.close()


class Hook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hook_server():
    Hook.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def test_webhook_is_called_when_a_task_ends(tmp_path, hook_server):
    s = Setup(tmp_path / "r.db")
    task_id = s.manager.create({"server": "web", "count": 1, "webhook": hook_server})["id"]
    s.feed(exchange(0))
    for thread in s.manager.webhook_threads:
        thread.join(10)
    assert len(Hook.received) == 1
    assert Hook.received[0]["event"] == "recording.completed"
    assert Hook.received[0]["task"]["id"] == task_id and Hook.received[0]["task"]["recorded"] == 1
    assert s.manager.status(task_id)["webhook_status"] == "sent: HTTP 204"
    s.close()


def test_har_export_of_http_exchanges():
    x = RecordedExchange(
        task_id="rec-000000000001", seq=0, ts=1_700_000_000_123_000_000, protocol="http", client="c", server="s",
        method="POST", target="/a?x=1&y=", status=201, error=False,
        request=b"POST /a?x=1&y= HTTP/1.1\r\nHost: h:80\r\nCookie: a=1; b=2\r\nContent-Length: 3\r\n\r\nabc",
        response=b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\nhi\r\n0\r\n\r\n",
        request_size=80, response_size=95, latency_ns=2_000_000, duration_ns=3_000_000, server_address="127.0.0.1",
        server_port=80)
    har = har_document([x, RecordedExchange(task_id="t", seq=1, ts=1, protocol="redis", client="", server="",
                                            method="GET", target="k", status="OK", error=False, request=b"",
                                            response=b"")])
    [entry] = har["log"]["entries"]
    assert har["log"]["version"] == "1.2" and har["log"]["creator"]["name"] == "deetune"
    check_har(har)
    assert entry["request"]["url"] == "http://h:80/a?x=1&y="
    assert entry["request"]["queryString"] == [{"name": "x", "value": "1"}, {"name": "y", "value": ""}]
    assert entry["request"]["cookies"] == [{"name": "a", "value": "1"}, {"name": "b", "value": "2"}]
    assert entry["request"]["postData"]["text"] == "abc"
    assert entry["response"]["content"] == {"size": 2, "mimeType": "text/plain", "text": "hi"}
    assert (entry["time"], entry["timings"]) == (3.0, {"send": 0, "wait": 2.0, "receive": 1.0})
    assert entry["startedDateTime"] == "2023-11-14T22:13:20.123Z"


def check_har(har: dict) -> None:
    """The fields HAR 1.2 requires, with their types."""
    log = har["log"]
    assert log["version"] == "1.2" and isinstance(log["creator"]["name"], str)
    assert isinstance(log["creator"]["version"], str) and isinstance(log["entries"], list)
    for entry in log["entries"]:
        for key in ("startedDateTime", "time", "request", "response", "cache", "timings"):
            assert key in entry, key
        assert isinstance(entry["time"], (int, float))
        request, response = entry["request"], entry["response"]
        for key, kind in (("method", str), ("url", str), ("httpVersion", str), ("cookies", list), ("headers", list),
                          ("queryString", list), ("headersSize", int), ("bodySize", int)):
            assert isinstance(request[key], kind), key
        for key, kind in (("status", int), ("statusText", str), ("httpVersion", str), ("cookies", list),
                          ("headers", list), ("content", dict), ("redirectURL", str), ("headersSize", int),
                          ("bodySize", int)):
            assert isinstance(response[key], kind), key
        assert isinstance(response["content"]["size"], int) and isinstance(response["content"]["mimeType"], str)
        for header in request["headers"] + response["headers"]:
            assert set(header) >= {"name", "value"}
        for key in ("send", "wait", "receive"):
            assert isinstance(entry["timings"][key], (int, float)) and entry["timings"][key] >= -1
        if "postData" in request:
            assert isinstance(request["postData"]["mimeType"], str)
        assert entry["startedDateTime"].endswith("Z")


# ---- the API and the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path):
    s = Setup(tmp_path / "r.db")
    stop = threading.Event()

    def ticker():  # the pipeline's side: drains the inbox
        while not stop.wait(0.05):
            for item in s.recorder.tick():
                s.sink.handle(item)

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    with ApiServer(s.store, recordings=s.manager) as server:
        server.setup = s
        yield server
    stop.set()
    thread.join()
    s.close()


def call(server: ApiServer, method: str, path: str, body: Any = None, headers: dict | None = None,
         raw: bytes | None = None, auth: bool = True) -> tuple[int, dict, bytes]:
    """A request with the server's token (``auth=False``: without)."""
    conn = http.client.HTTPConnection(*server.address, timeout=10)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    if auth:
        hdrs["Authorization"] = f"Bearer {server.token}"
    hdrs.update(headers or {})
    conn.request(method, path, body=data, headers=hdrs)
    reply = conn.getresponse()
    payload = reply.read()
    conn.close()
    return reply.status, dict(reply.getheaders()), payload


def test_api_create_list_status_stop_export_delete(api):
    status, headers, body = call(api, "POST", "/api/recordings", {"server": "web", "method": "GET"})
    task = json.loads(body)
    assert status == 201 and headers["Location"] == f"/api/recordings/{task['id']}"
    assert task["state"] == "pending" and task["spec"]["method"] == "GET"
    s = api.setup
    s.feed(*[exchange(i) for i in range(3)])
    status, _, body = call(api, "GET", "/api/recordings")
    assert status == 200 and [t["id"] for t in json.loads(body)["recordings"]] == [task["id"]]
    assert json.loads(call(api, "GET", f"/api/recordings/{task['id']}")[2])["recorded"] == 3
    s.sink.flush()
    status, _, body = call(api, "GET", f"/api/recordings/{task['id']}/exchanges?limit=2&offset=1")
    page = json.loads(body)
    assert status == 200 and (page["total"], page["offset"], page["limit"]) == (3, 1, 2)
    assert [x["seq"] for x in page["exchanges"]] == [1, 2]
    status, headers, body = call(api, "GET", f"/api/recordings/{task['id']}/exchanges?format=jsonl")
    assert status == 200 and headers["Content-Type"] == "application/x-ndjson"
    lines = [RecordedExchange.from_json(json.loads(line)) for line in body.splitlines()]
    assert [x.target for x in lines] == ["/items/0", "/items/1", "/items/2"]
    status, headers, body = call(api, "GET", f"/api/recordings/{task['id']}/exchanges?format=har")
    assert status == 200 and headers["Content-Type"] == "application/json"
    check_har(json.loads(body))
    assert len(json.loads(body)["log"]["entries"]) == 3
    status, _, body = call(api, "POST", f"/api/recordings/{task['id']}/stop")
    assert status == 200 and json.loads(body)["state"] == "stopped"
    status, _, body = call(api, "POST", f"/api/recordings/{task['id']}/stop")
    assert status == 409 and json.loads(body)["error"] == f"task {task['id']} is stopped, not running"
    assert call(api, "DELETE", f"/api/recordings/{task['id']}")[:1] == (200,)
    assert call(api, "GET", f"/api/recordings/{task['id']}")[0] == 404


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "message"), [
    ("POST", "/api/recordings", {"server": ""}, None, 400, "server must be a service name (1 to 256 characters)"),
    ("POST", "/api/recordings", None, None, 400, "a task is a JSON object"),
    ("POST", "/api/recordings", b"{nope", None, 400, "the body is not JSON: "),
    ("POST", "/api/recordings", {"server": "x"}, {"Content-Type": "text/plain"}, 415,
     "the body must be application/json"),
    ("POST", "/api/recordings", {"server": "x"}, {"Origin": "http://evil.example"}, 403,
     "cross-origin POST refused (Origin http://evil.example)"),
    ("POST", "/api/recordings", b"x" * 70000, None, 413, "the body is larger than 65536 bytes"),
    ("GET", "/api/recordings/rec-000000000000", None, None, 404, "no recording task 'rec-000000000000'"),
    ("GET", "/api/recordings/nope", None, None, 404, "no recording task 'nope'"),
    ("DELETE", "/api/recordings/rec-000000000000", None, None, 404, "no recording task 'rec-000000000000'"),
    ("PUT", "/api/recordings", None, None, 405, "method PUT not allowed (GET, HEAD and POST only)"),
    ("POST", "/api/recordings/rec-000000000000", None, None, 405,
     "method POST not allowed (GET, HEAD and DELETE only)"),
    ("GET", "/api/recordings/rec-000000000000/stop", None, None, 405, "method GET not allowed (POST only)"),
    ("GET", "/api/recordings?x=1", None, None, 400, "unknown parameter 'x' (this endpoint takes: none)"),
    ("DELETE", "/api/services", None, None, 405, "method DELETE not allowed (GET and HEAD only)"),
])
def test_api_errors(api, method, path, body, headers, status, message):
    raw = body if isinstance(body, bytes) else None
    got, _, reply = call(api, method, path, None if raw is not None else body, headers, raw=raw)
    assert got == status, reply
    assert json.loads(reply)["error"].startswith(message)


def test_api_export_parameters(api):
    task = json.loads(call(api, "POST", "/api/recordings", {"server": "web", "protocol": "redis"})[2])
    base = f"/api/recordings/{task['id']}/exchanges"
    assert json.loads(call(api, "GET", base + "?format=xml")[2])["error"] == \
        "format must be one of json, jsonl, har, got 'xml'"
    assert json.loads(call(api, "GET", base + "?format=har")[2])["error"] == \
        f"HAR is for HTTP exchanges; task {task['id']} records redis"
    assert json.loads(call(api, "GET", base + "?limit=0")[2])["error"] == "limit must be an integer from 1 to 1000, got '0'"
    assert call(api, "GET", base + "?format=jsonl")[2] == b""


def test_api_token_and_no_manager(tmp_path):
    store = TopologyStore(tmp_path / "t.db")
    try:
        with ApiServer(store) as server:
            status, _, body = call(server, "GET", "/api/recordings")
            assert status == 404 and json.loads(body)["error"].startswith("recording is not available")
        manager = RecordingManager(store, set_port_capture=FakeKernel(), ports_of=lambda s: set())
        manager.start()
        with ApiServer(store, token="tok", recordings=manager) as server:
            assert call(server, "POST", "/api/recordings", {"server": "x"}, auth=False)[0] == 401
            assert call(server, "POST", "/api/recordings", {"server": "x"}, {"Authorization": "Bearer to"})[0] == 401
            assert call(server, "POST", "/api/recordings", {"server": "x"}, {"Authorization": "Bearer tok"})[0] == 201
    finally:
        store.close()


def test_api_answers_match_the_openapi_document(api):
    import jsonschema

    from tests.test_api import _resolve

    document = openapi_document()
    task = json.loads(call(api, "POST", "/api/recordings", {"server": "web"})[2])
    api.setup.feed(exchange(0))
    api.setup.sink.flush()
    checks = [
        ("post", "/api/recordings", "201", task),
        ("get", "/api/recordings", "200", json.loads(call(api, "GET", "/api/recordings")[2])),
        ("get", "/api/recordings/{id}", "200", json.loads(call(api, "GET", f"/api/recordings/{task['id']}")[2])),
        ("get", "/api/recordings/{id}/exchanges", "200",
         json.loads(call(api, "GET", f"/api/recordings/{task['id']}/exchanges")[2])),
        ("get", "/api/recordings/{id}/exchanges", "200",
         json.loads(call(api, "GET", f"/api/recordings/{task['id']}/exchanges?format=har")[2])),
        ("post", "/api/recordings/{id}/stop", "200",
         json.loads(call(api, "POST", f"/api/recordings/{task['id']}/stop")[2])),
        ("delete", "/api/recordings/{id}", "200", json.loads(call(api, "DELETE", f"/api/recordings/{task['id']}")[2])),
    ]
    for method, path, status, body in checks:
        response = _resolve(document, document["paths"][path][method]["responses"][status])
        jsonschema.Draft202012Validator(response["content"]["application/json"]["schema"]).validate(body)
    # and the task description schema accepts what the API accepts
    schema = _resolve(document, document["components"]["schemas"]["RecordingTask"])
    jsonschema.Draft202012Validator(schema).validate(task["spec"])


try:
    import schemathesis
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover
    schemathesis = None

if schemathesis is not None:
    _schema = schemathesis.openapi.from_dict(openapi_document()).include(path_regex="^/api/recordings")
    _schema.config.generation.update(modes=["positive", "negative"])

    @pytest.fixture(scope="module")
    def fuzz_api(tmp_path_factory):
        store = TopologyStore(tmp_path_factory.mktemp("fuzz") / "f.db")
        manager = RecordingManager(store, set_port_capture=FakeKernel(), ports_of=lambda s: {8080})
        manager.start()
        with ApiServer(store, recordings=manager) as server:
            yield server
        store.close()

    @_schema.parametrize()
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    def test_fuzz_recordings_api(case, fuzz_api):
        case.call_and_validate(base_url=fuzz_api.url, headers={"Authorization": f"Bearer {fuzz_api.token}"},
                               excluded_checks=[schemathesis.checks.positive_data_acceptance])


def cli(*args: str, api: ApiServer | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    base = ["--api", api.url, "--token", api.token] if api is not None else []
    return subprocess.run([sys.executable, "-m", "deetune.record", *base, *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_cli(api, tmp_path):
    created = cli("create", "--server", "web", "--method", "get", "--count", "5", "--limit", "4k",
                  "--redact-header", "X-Key", "--redact-json", "**.password", api=api)
    assert created.returncode == 0, created.stderr
    task_id = created.stdout.strip()
    spec = api.setup.manager.status(task_id)["spec"]
    assert (spec["method"], spec["count"], spec["limit"], spec["redact"]["headers"], spec["redact"]["json"]) == (
        "GET", 5, 4096, ["X-Key"], ["**.password"])
    api.setup.feed(exchange(0), exchange(1))
    api.setup.sink.flush()
    listing = cli("list", api=api)
    assert listing.returncode == 0 and task_id in listing.stdout and "running" in listing.stdout
    status = cli("status", task_id, "--api", api.url, "--token", api.token)  # --api after the command works too
    assert status.returncode == 0 and "recorded:   2" in status.stdout
    out = tmp_path / "x.jsonl"
    export = cli("export", task_id, "--output", str(out), api=api)
    assert export.returncode == 0, export.stderr
    assert [RecordedExchange.from_json(json.loads(line)).seq for line in out.read_text().splitlines()] == [0, 1]
    har = cli("export", task_id, "--format", "har", api=api)
    check_har(json.loads(har.stdout))
    stopped = cli("stop", task_id, api=api)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{task_id} stopped: 2 exchanges recorded"
    again = cli("stop", task_id, api=api)
    assert again.returncode == 1 and again.stderr == f"deetune.record: task {task_id} is stopped, not running (HTTP 409)\n"
    assert cli("delete", task_id, api=api).stdout.strip() == f"{task_id} deleted"
    missing = cli("status", task_id, api=api)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    bad = cli("create", "--server", "web", "--path", "/x", "--command", "GET", api=api)
    assert bad.returncode == 2 and bad.stderr.startswith("deetune.record: an endpoint filter is for one protocol")


@pytest.mark.parametrize(("args", "code", "message"), [
    (["create"], 2, "deetune.record: the following arguments are required: --server"),
    (["create", "--server", "x", "--limit", "70000"], 2, "deetune.record: argument --limit: must be 1 to 65536"),
    (["create", "--server", "x", "--sample", "0"], 2, "deetune.record: argument --sample: must be more than 0"),
    (["frobnicate"], 2, "deetune.record: argument COMMAND: invalid choice: 'frobnicate'"),
    ([], 2, "deetune.record: a command is needed"),
    (["--api", "ftp://x", "list"], 2, "deetune.record: --api must be an http:// or https:// URL"),
    (["--api", "http://127.0.0.1:9", "list"], 1, "deetune.record: cannot reach the agent at http://127.0.0.1:9: "),
])
def test_cli_usage_errors(args, code, message):
    result = cli(*args)
    assert result.returncode == code, result
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def only_conn(handler: L7Handler, sock: int):
    (conn,) = [c for c in handler._conns.values() if c.sock_id == sock]
    return conn


def test_l7_records_a_connection_again_after_bytes_were_skipped():
    handler, recording = l7({8080: 65536})
    req = b"GET /a HTTP/1.1\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    out = [*handler(data_event(9, False, req)), *handler(data_event(9, True, resp))]
    [x] = exchanges_of(out)
    assert (x.request_payload, x.response_payload) == (req, resp)
    # the kernel lost the next request's record: its response comes without a request, and is skipped
    assert exchanges_of([*handler(data_event(9, True, resp))]) == []
    assert only_conn(handler, 9).session.active and only_conn(handler, 9).log is None
    assert exchanges_of([*handler(data_event(9, True, resp))]) == []
    # the next request starts the recording again, with its bytes
    out = [*handler(data_event(9, False, req)), *handler(data_event(9, True, resp))]
    [x] = exchanges_of(out)
    assert (x.target, x.request_payload, x.response_payload) == ("/a", req, resp)
    assert handler.stats.skipped == {"http": {"unsolicited_response": 2}}
    # on ports no task records too (decoding goes on; nothing is recorded)
    recording.ports = {}
    assert exchanges_of([*handler(data_event(9, True, resp))]) == []
    [x] = exchanges_of([*handler(data_event(9, False, req)), *handler(data_event(9, True, resp))])
    assert (x.target, x.status, x.request_payload, x.response_payload) == ("/a", 200, None, None)


def test_l7_mutes_only_streams_with_no_protocol():
    muted: list[int] = []
    handler = L7Handler([HttpDecoder, RedisDecoder, MysqlDecoder], listening=ListeningPorts(reader=lambda: {8080}),
                        mute=muted.append)
    req = b"GET /a HTTP/1.1\r\n\r\n"
    resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    handler(data_event(9, False, req))
    handler(data_event(9, True, resp))
    handler(data_event(9, True, resp))  # a response without its request: a record was lost
    assert only_conn(handler, 9).session.active and muted == []  # kept: it goes on at the next request
    for i in range(20):  # never a protocol: given up and muted in the kernel
        handler(data_event(11, False, b"\x00\x01garbage%d" % i, rport=40001))
    assert muted == [11]
