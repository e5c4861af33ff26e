"""Issue 18: fuzzing, with a bounded budget, every decoder as the session layer drives it
(StreamSession: detection, decoding, close), and the JSON encoders (the jsonl sink, the API's
answers).  What must hold: no exception escapes, every exchange becomes an event whose JSON is
valid and whose text carries no secret the redaction knows, and the API always answers JSON."""

from __future__ import annotations

import http.client
import io
import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deetune.api import ApiServer
from deetune.decoders.session import StreamSession
from deetune.events import ExchangeEvent
from deetune.jsontext import dumps, dumps_line
from deetune.plugins import Plugins
from deetune.sinks.jsonl import JsonlSink

BUDGET = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

#: Whole, well-formed messages the mutations start from (request direction, response direction).
SEEDS: dict[str, tuple[list[bytes], list[bytes]]] = {
    "http": ([b"GET /a?password=x HTTP/1.1\r\nHost: h\r\nAuthorization: Basic eA==\r\n\r\n",
              b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
              b"PUT /c HTTP/1.1\nTransfer-Encoding: chunked\n\n3\r\nabc\r\n0\r\n\r\n"],
             [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
              b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
              b"HTTP/1.0 204 No Content\n\n"]),
    "redis": ([b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n", b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n", b"PING\r\n",
               b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n"],
              [b"+OK\r\n", b"$5\r\nhello\r\n", b"-ERR bad\r\n", b"*1\r\n*1\r\n*1\r\n:1\r\n", b":12\r\n",
               b"%1\r\n+a\r\n:1\r\n"]),
    "mysql": ([b"\x21\x00\x00\x00\x03CREATE USER a IDENTIFIED BY 'pw1'",
               b"\x09\x00\x00\x00\x03SELECT 1", b"\x01\x00\x00\x00\x0e", b"\x05\x00\x00\x00\x02test"],
              [b"\x07\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00",
               b"\x0b\x00\x00\x01\x00\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x00",
               b"\x17\x00\x00\x01\xff\x28\x04#42000You have an error",
               b"\x01\x00\x00\x01\x01\x17\x00\x00\x02\x03def\x00\x00\x00\x011\x00\x0c?\x00\x01\x00\x00\x00\x08\x81"
               b"\x00\x00\x00\x00\x05\x00\x00\x03\xfe\x00\x00\x02\x00\x02\x00\x00\x04\x011\x05\x00\x00\x05\xfe"
               b"\x00\x00\x02\x00"]),
}


def _decoder_classes():
    plugins = Plugins()
    return [plugins.decoders.get(name) for name in plugins.decoders.names()]


DECODERS = _decoder_classes()


@st.composite
def conversations(draw, protocol: str):
    """A connection's chunks: seeds and random bytes, mutated, cut at random points, either way."""
    requests, responses = SEEDS.get(protocol, ([b"\x00\x01"], [b"\x00\x02"]))
    chunks = []
    for _ in range(draw(st.integers(1, 8))):
        egress = draw(st.booleans())
        base = draw(st.sampled_from(requests if egress else responses) | st.binary(max_size=64))
        data = bytearray(base)
        for _ in range(draw(st.integers(0, 3))):
            kind = draw(st.sampled_from(["flip", "insert", "cut", "repeat"]))
            at = draw(st.integers(0, len(data)))
            if kind == "flip" and data:
                data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
            elif kind == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=16))
            elif kind == "cut":
                del data[at:]
            elif kind == "repeat":
                data += bytes(data) * draw(st.integers(1, 50))
        # the capture may keep a prefix of what the call moved
        size = len(data) + draw(st.sampled_from([0, 0, 0, 1, 1000, 1 << 20]))
        chunks.append((egress, bytes(data), size))
    return chunks


@pytest.mark.parametrize("cls", DECODERS, ids=lambda c: c.protocol)
def test_every_decoder_through_the_session_layer(cls):
    @BUDGET
    @given(conversations(cls.protocol), st.sampled_from([None, "client", "server"]))
    def run(chunks, role):
        session = StreamSession([cls], role, ports=tuple(getattr(cls, "default_ports", ())))
        exchanges = []
        for i, (egress, data, size) in enumerate(chunks):
            exchanges += session.feed(egress, data, size, 1_000 + i)
        exchanges += session.close(10_000)
        assert session.state.value in ("detecting", "decoding", "resyncing", "unknown", "undecodable")
        for x in exchanges:
            assert x.protocol == cls.protocol and isinstance(x.target, str) and isinstance(x.method, str)
            assert x.request_bytes >= 0 and x.response_bytes >= 0
            event = ExchangeEvent.from_exchange(x, clock_offset=0, pid=1, comm="c", role=session.role or "unknown",
                                                laddr="127.0.0.1", lport=1, raddr="127.0.0.1", rport=2)
            line = dumps_line(event.to_json())
            assert line.endswith(b"\n") and json.loads(line)["type"] == "request"
            assert "pw1" not in event.target  # the seed's password never survives redaction

    run()


# -- the JSON encoders -----------------------------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63, max_value=2**200)
            | st.integers(max_value=-(2**63) - 1, min_value=-(2**200)) | st.floats(allow_nan=True)
            | st.text() | st.text(alphabet=st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF), min_size=1)
            | st.binary(max_size=8))
values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=30)


def _same(decoded, original) -> bool:
    """What a JSON round trip keeps of a value (see deetune.jsontext)."""
    if isinstance(original, bool) or original is None:
        return decoded == original
    if isinstance(original, float):
        return decoded is None if not math.isfinite(original) else decoded == original
    if isinstance(original, bytes):
        return decoded == original.hex()
    if isinstance(original, (list, tuple)):
        return isinstance(decoded, list) and len(decoded) == len(original) and all(map(_same, decoded, original))
    if isinstance(original, dict):
        return decoded.keys() == original.keys() and all(_same(decoded[k], v) for k, v in original.items())
    return decoded == original


@BUDGET
@given(values)
def test_jsonl_lines_keep_every_value(value):
    out = io.BytesIO()
    sink = JsonlSink(out, owned=False)
    event = ExchangeEvent(1, ts_mono_ns=1, protocol="p", pid=1, comm="c", role="client", laddr="a", lport=1,
                          raddr="b", rport=2, method="M", target="t", status=None, error=False, latency_ns=None,
                          request_bytes=0, response_bytes=0, attributes={"v": value})
    sink.handle(event)
    sink.flush()
    [line] = out.getvalue().splitlines()
    assert _same(json.loads(line)["attributes"]["v"], value)
    assert _same(json.loads(dumps(value)), value)


@BUDGET
@given(st.integers(200, 5000))
def test_deep_values_are_cut_not_lost(depth):
    value: list = []
    for _ in range(depth):
        value = [value]
    text = dumps({"v": value, "n": 10**5000})
    decoded = json.loads(text)
    assert decoded["n"] == "<integer of 16610 bits>" and b"nested too deep" in text


class _AnyStore:
    """A store whose answers are whatever the test puts in ``answer``."""

    answer = None

    def graph(self, since, until, service=None):
        return {"nodes": self.answer, "edges": []}

    def exchanges(self, *, service=None, limit=100, since=None):
        return [{"x": self.answer}]


@pytest.fixture(scope="module")
def any_server():
    store = _AnyStore()
    with ApiServer(store, token="t") as server:
        yield server, store


def test_api_answers_are_json_whatever_the_store_holds(any_server):
    server, store = any_server

    @BUDGET
    @given(values)
    def run(value):
        store.answer = value
        for path in ("/api/topology", "/api/exchanges"):
            conn = http.client.HTTPConnection(*server.address, timeout=10)
            conn.request("GET", path, headers={"Authorization": "Bearer t"})
            reply = conn.getresponse()
            body = json.loads(reply.read())
            conn.close()
            if reply.status == 200:
                got = body["nodes"] if path == "/api/topology" else body["exchanges"][0]["x"]
                assert _same(got, value)
            else:  # NaN, infinity, bytes: not JSON; the client gets no internal text
                assert (reply.status, body) == (500, {"error": "internal error: the request failed (the agent's log "
                                                               "says why)"})

    run()
