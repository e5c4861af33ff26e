"""HTTP/1.x decoder: byte streams in, exchanges out."""

from __future__ import annotations

import importlib.util
import re
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deetune.decoders.base import Chunk, Direction, Exchange, Undecodable
from deetune.decoders.http import MAX_HEAD_BYTES, MAX_PENDING, HttpDecoder

REQ = Direction.REQUEST
RESP = Direction.RESPONSE


def chunk(direction: Direction, data: bytes, ts: int, size: int | None = None) -> Chunk:
    return Chunk(direction, data, len(data) if size is None else size, ts)


def decode(chunks, close_ts=None, decoder=None) -> list[Exchange]:
    decoder = decoder or HttpDecoder()
    out = []
    for c in chunks:
        out.extend(decoder.feed(c))
    if close_ts is not None:
        out.extend(decoder.close(close_ts))
    return out


def exchange(**fields) -> Exchange:
    """An expected exchange: the usual defaults, overridden by ``fields``."""
    attributes = {
        "host": "example.com",
        "version": "1.1",
        "reason": "OK",
        "request_body_bytes": 0,
        "response_body_bytes": 0,
    }
    attributes.update(fields.pop("attributes", {}))
    values = dict(protocol="http", method="GET", target="/", status=200, error=False, attributes=attributes)
    values.update(fields)
    return Exchange(**values)


GET = b"GET /items?id=7&x=%20y HTTP/1.1\r\nHost: example.com\r\nUser-Agent: t\r\n\r\n"
OK_HELLO = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


# -- detection -------------------------------------------------------------------


@pytest.mark.parametrize(
    "direction, data, expected",
    [
        (REQ, b"GET / HTTP/1.1\r\n", True),
        (REQ, b"OPTIONS * HTTP/1.1\r\n", True),
        (REQ, b"PATCH /x", True),
        (REQ, b"CONNECT host:443 HTTP/1.1", True),
        (REQ, b"GET", False),  # not enough to tell
        (REQ, b"get / HTTP/1.1", False),
        (REQ, b"PROPFIND / HTTP/1.1", False),  # extension methods are decoded, not detected
        (REQ, b"\x16\x03\x01\x02\x00", False),  # TLS
        (REQ, b"PRI * HTTP/2.0\r\n", False),
        (REQ, b"", False),
        (RESP, b"HTTP/1.1 200 OK\r\n", True),
        (RESP, b"HTTP/1.0 404", True),
        (RESP, b"HTTP/2 200", False),
        (RESP, b"GET / HTTP/1.1", False),
        (RESP, b"", False),
    ],
)
def test_detect(direction, data, expected):
    assert HttpDecoder.detect(direction, data) is expected


def test_detect_never_raises_on_odd_input():
    assert HttpDecoder.detect(REQ, None) is False
    assert HttpDecoder.detect(RESP, 12) is False


# -- exchanges -------------------------------------------------------------------


def test_simple_get_with_content_length():
    decoder = HttpDecoder()
    assert decoder.feed(chunk(REQ, GET, 1_000)) == ()
    (got,) = decoder.feed(chunk(RESP, OK_HELLO, 3_500))
    assert got == exchange(
        target="/items?id=7&x=%20y",
        request_start_ns=1_000,
        request_end_ns=1_000,
        response_start_ns=3_500,
        response_end_ns=3_500,
        request_bytes=len(GET),
        response_bytes=len(OK_HELLO),
        attributes={"response_body_bytes": 5},
    )
    assert got.latency_ns == 2_500
    assert decoder.close(9_000) == []


CHUNKED = (
    b"HTTP/1.1 200 OK\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
    b"5;name=value;flag\r\n"
    b"hello\r\n"
    b"1A ; ext=\"quoted\"\r\n"
    b"abcdefghijklmnopqrstuvwxyz\r\n"
    b"0;last=1\r\n"
    b"X-Checksum: abc\r\n"
    b"X-Other: 1\r\n"
    b"\r\n"
)


def chunked_expected(**fields):
    values = dict(
        request_start_ns=1,
        request_end_ns=1,
        response_start_ns=10,
        request_bytes=len(GET),
        target="/items?id=7&x=%20y",
        response_bytes=len(CHUNKED),
        attributes={"response_body_bytes": 31},
    )
    values.update(fields)
    return exchange(**values)


def test_chunked_response_in_one_chunk():
    got = decode([chunk(REQ, GET, 1), chunk(RESP, CHUNKED, 10)])
    assert got == [chunked_expected(response_end_ns=10)]


def test_chunked_response_split_at_every_byte():
    chunks = [chunk(REQ, GET, 1)] + [chunk(RESP, CHUNKED[i : i + 1], 10 + i) for i in range(len(CHUNKED))]
    assert decode(chunks) == [chunked_expected(response_end_ns=10 + len(CHUNKED) - 1)]


@pytest.mark.parametrize("cut", range(1, len(CHUNKED)))
def test_chunked_response_split_in_two_anywhere(cut):
    chunks = [chunk(REQ, GET, 1), chunk(RESP, CHUNKED[:cut], 10), chunk(RESP, CHUNKED[cut:], 20)]
    assert decode(chunks) == [chunked_expected(response_end_ns=20)]


def test_request_split_at_every_byte():
    body_request = b"POST /form HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n\r\nhello world"
    chunks = [chunk(REQ, body_request[i : i + 1], i) for i in range(len(body_request))]
    chunks.append(chunk(RESP, OK_HELLO, 500))
    (got,) = decode(chunks)
    assert got == exchange(
        method="POST",
        target="/form",
        request_start_ns=0,
        request_end_ns=len(body_request) - 1,
        response_start_ns=500,
        response_end_ns=500,
        request_bytes=len(body_request),
        response_bytes=len(OK_HELLO),
        attributes={"request_body_bytes": 11, "response_body_bytes": 5},
    )


def test_chunked_request_body():
    request = b"PUT /up HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    response = b"HTTP/1.1 204 No Content\r\n\r\n"
    (got,) = decode([chunk(REQ, request, 1), chunk(RESP, response, 2)])
    assert (got.method, got.status, got.request_bytes, got.response_bytes) == ("PUT", 204, len(request), len(response))
    assert got.attributes["request_body_bytes"] == 3


def test_pipelining_three_requests_then_three_responses():
    requests = [f"GET /{name} HTTP/1.1\r\nHost: example.com\r\n\r\n".encode() for name in ("a", "b", "c")]
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nBB",
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n",
    ]
    decoder = HttpDecoder()
    assert decoder.feed(chunk(REQ, requests[0] + requests[1], 10)) == ()
    assert decoder.feed(chunk(REQ, requests[2], 20)) == ()
    got = list(decoder.feed(chunk(RESP, b"".join(responses), 30)))
    assert [(e.target, e.status, e.error) for e in got] == [("/a", 200, False), ("/b", 404, False), ("/c", 500, True)]
    assert [(e.request_start_ns, e.request_end_ns) for e in got] == [(10, 10), (10, 10), (20, 20)]
    assert [e.response_bytes for e in got] == [len(r) for r in responses]
    assert [e.attributes["reason"] for e in got] == ["OK", "Not Found", "Internal Server Error"]


def test_keep_alive_sequence_emits_each_exchange_on_its_response():
    decoder = HttpDecoder()
    for i in range(5):
        request = f"GET /n/{i} HTTP/1.1\r\nHost: example.com\r\n\r\n".encode()
        assert decoder.feed(chunk(REQ, request, 100 * i)) == ()
        (got,) = decoder.feed(chunk(RESP, OK_HELLO, 100 * i + 40))
        assert (got.target, got.request_start_ns, got.response_end_ns) == (f"/n/{i}", 100 * i, 100 * i + 40)
        assert got.latency_ns == 40
    assert decoder.close(1_000) == []


def test_100_continue_pairs_the_final_response():
    head = (
        b"POST /upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    final = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    decoder = HttpDecoder()
    assert decoder.feed(chunk(REQ, head, 1)) == ()
    assert decoder.feed(chunk(RESP, interim, 2)) == ()
    assert decoder.feed(chunk(REQ, b"0123456789", 3)) == ()
    (got,) = decoder.feed(chunk(RESP, final, 4))
    assert got == exchange(
        method="POST",
        target="/upload",
        status=201,
        request_start_ns=1,
        request_end_ns=3,
        response_start_ns=4,
        response_end_ns=4,
        request_bytes=len(head) + 10,
        response_bytes=len(final),  # the interim response is not part of the final one
        attributes={"reason": "Created", "request_body_bytes": 10, "response_body_bytes": 2, "continue": True},
    )


def test_other_interim_responses_are_skipped_without_continue_flag():
    responses = b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + OK_HELLO
    (got,) = decode([chunk(REQ, GET, 1), chunk(RESP, responses, 2)])
    assert got.status == 200 and "continue" not in got.attributes
    assert got.response_bytes == len(OK_HELLO)


def test_head_response_has_no_body_and_keeps_sync():
    head_request = b"HEAD /big HTTP/1.1\r\nHost: example.com\r\n\r\n"
    head_response = b"HTTP/1.1 200 OK\r\nContent-Length: 123456\r\n\r\n"
    got = decode(
        [chunk(REQ, head_request, 1), chunk(RESP, head_response, 2), chunk(REQ, GET, 3), chunk(RESP, OK_HELLO, 4)]
    )
    assert [(e.method, e.status, e.response_bytes) for e in got] == [
        ("HEAD", 200, len(head_response)),
        ("GET", 200, len(OK_HELLO)),
    ]
    assert got[0].attributes["response_body_bytes"] == 0


@pytest.mark.parametrize("status_line", [b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified"])
def test_204_and_304_have_no_body(status_line):
    # Even with a (wrong) Content-Length, and even though 304 often carries one.
    response = status_line + b"\r\nContent-Length: 99\r\nETag: \"x\"\r\n\r\n"
    got = decode([chunk(REQ, GET, 1), chunk(RESP, response, 2), chunk(REQ, GET, 3), chunk(RESP, OK_HELLO, 4)])
    assert [e.status for e in got] == [int(status_line[9:12]), 200]
    assert got[0].response_bytes == len(response)


def test_http10_body_until_close():
    request = b"GET /old HTTP/1.0\r\nHost: example.com\r\n\r\n"
    head = b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n"
    decoder = HttpDecoder()
    chunks = [chunk(REQ, request, 1), chunk(RESP, head + b"<html>", 2), chunk(RESP, b"</html>", 3)]
    assert decode(chunks, decoder=decoder) == []
    (got,) = decoder.close(50)
    assert got == exchange(
        target="/old",
        request_start_ns=1,
        request_end_ns=1,
        response_start_ns=2,
        response_end_ns=3,  # the last response byte, not the close
        request_bytes=len(request),
        response_bytes=len(head) + 13,
        attributes={"version": "1.0", "response_body_bytes": 13},
    )


def test_connection_close_without_length_is_body_until_close_even_with_gaps():
    head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    decoder = HttpDecoder()
    decode([chunk(REQ, GET, 1), chunk(RESP, head + b"abc", 2, size=len(head) + 5000)], decoder=decoder)
    (got,) = decoder.close(9)
    assert (got.status, got.response_bytes, got.attributes["response_body_bytes"]) == (200, len(head) + 5000, 5000)
    assert "incomplete" not in got.attributes


def test_traceparent_header():
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    request = f"GET / HTTP/1.1\r\nHost: example.com\r\nTraceParent:  {traceparent} \r\n\r\n".encode()
    (got,) = decode([chunk(REQ, request, 1), chunk(RESP, OK_HELLO, 2)])
    assert got.attributes["traceparent"] == traceparent
    (plain,) = decode([chunk(REQ, GET, 1), chunk(RESP, OK_HELLO, 2)])
    assert "traceparent" not in plain.attributes


@pytest.mark.parametrize(
    "status, error", [(200, False), (404, False), (499, False), (500, True), (503, True), (599, True)]
)
def test_error_flag_is_5xx(status, error):
    response = f"HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\n\r\n".encode()
    (got,) = decode([chunk(REQ, GET, 1), chunk(RESP, response, 2)])
    assert (got.status, got.error, got.error_message) == (status, error, None)


def test_missing_host_and_header_case_and_lf_line_ends():
    request = b"DELETE /r/1 HTTP/1.1\nCONTENT-LENGTH: 2\n\nxy"
    response = b"HTTP/1.1 202 Accepted\ncontent-length: 3\n\nabc"
    (got,) = decode([chunk(REQ, request, 1), chunk(RESP, response, 2)])
    assert (got.method, got.target, got.status, got.request_bytes, got.response_bytes) == (
        "DELETE", "/r/1", 202, len(request), len(response))  # fmt: skip
    assert got.attributes["host"] is None


def test_upgrade_101_then_the_connection_is_a_tunnel():
    request = b"GET /ws HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    response = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
    decoder = HttpDecoder()
    got = decode(
        [chunk(REQ, request, 1), chunk(RESP, response + b"\x81\x05hello", 2), chunk(REQ, b"\x81\x85garbage", 3)],
        decoder=decoder,
    )
    assert [(e.target, e.status, e.response_bytes) for e in got] == [("/ws", 101, len(response))]
    assert decoder.close(4) == []


def test_connect_then_the_connection_is_a_tunnel():
    request = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    response = b"HTTP/1.1 200 Connection Established\r\n\r\n"
    tls = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1"
    decoder = HttpDecoder()
    chunks = [chunk(REQ, request, 1), chunk(RESP, response, 2), chunk(REQ, tls, 3), chunk(RESP, tls, 4)]
    got = decode(chunks, decoder=decoder)
    assert [(e.method, e.target, e.status) for e in got] == [("CONNECT", "example.com:443", 200)]
    assert decoder.close(5) == []


def test_too_many_requests_without_response_are_reported_unanswered():
    decoder = HttpDecoder()
    got = decode([chunk(REQ, GET, i) for i in range(2000)], decoder=decoder)
    assert len(got) == MAX_PENDING and {(e.status, e.request_start_ns) for e in got[:1]} == {(None, 0)}
    assert [e.request_start_ns for e in got] == list(range(MAX_PENDING))
    assert decoder.take_counts() == {"pending_limit": 1}
    # A response now answers the last request sent before it; those passed over are reported without one.
    got = decoder.feed(chunk(RESP, OK_HELLO, 5000))
    assert [(e.request_start_ns, e.status, e.attributes.get("gap")) for e in got] == [
        (i, None, True) for i in range(MAX_PENDING, 1999)] + [(1999, 200, None)]


# -- truncated captures ------------------------------------------------------------


def test_truncated_body_is_skipped_and_the_next_exchange_decodes():
    body_len = 5000
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
    wire = head + b"z" * body_len
    truncated = chunk(RESP, wire[:256], 20, size=len(wire))  # the kernel kept 256 bytes of a 5040-byte write
    got = decode([chunk(REQ, GET, 10), truncated, chunk(REQ, GET, 30), chunk(RESP, OK_HELLO, 40)])
    assert [(e.status, e.response_bytes) for e in got] == [(200, len(wire)), (200, len(OK_HELLO))]
    assert got[0].attributes["response_body_bytes"] == body_len
    assert got[0].response_end_ns == 20


def test_truncated_body_spanning_several_syscalls():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n"
    chunks = [
        chunk(REQ, GET, 1),
        chunk(RESP, head + b"a" * 100, 2, size=len(head) + 4000),
        chunk(RESP, b"b" * 50, 3, size=4000),
        chunk(RESP, b"c" * 2000, 4),
        chunk(REQ, GET, 5),
        chunk(RESP, OK_HELLO, 6),
    ]
    got = decode(chunks)
    assert [(e.response_end_ns, e.response_bytes) for e in got] == [(4, len(head) + 10000), (6, len(OK_HELLO))]


def test_truncated_chunk_data_is_skipped():
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    first = head + b"1000\r\n" + b"x" * 4096 + b"\r\n"  # one write per chunk, as servers do
    last = b"0\r\n\r\n"
    chunks = [chunk(REQ, GET, 1), chunk(RESP, first[:200], 2, size=len(first)), chunk(RESP, last, 3)]
    chunks += [chunk(REQ, GET, 4), chunk(RESP, OK_HELLO, 5)]
    got = decode(chunks)
    assert [(e.status, e.response_bytes) for e in got] == [(200, len(first) + len(last)), (200, len(OK_HELLO))]
    assert got[0].attributes["response_body_bytes"] == 4096


def test_truncated_request_body():
    head = b"POST /big HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3000\r\n\r\n"
    wire = head + b"q" * 3000
    got = decode([chunk(REQ, wire[:100], 1, size=len(wire)), chunk(RESP, OK_HELLO, 2)])
    assert [(e.method, e.request_bytes, e.attributes["request_body_bytes"]) for e in got] == [("POST", len(wire), 3000)]


def test_gap_inside_request_headers_cut_before_the_first_line_end():
    # 20 bytes of the request line seen, the rest in a gap: nothing to report of it; its response
    # answers a request not seen and is skipped; the next exchange decodes.
    decoder = HttpDecoder()
    chunks = [chunk(REQ, GET[:20], 1, size=len(GET)), chunk(RESP, OK_HELLO, 2), chunk(REQ, GET, 3),
              chunk(RESP, OK_HELLO, 4)]
    got = decode(chunks, decoder=decoder)
    assert [(e.target, e.request_start_ns, e.response_start_ns) for e in got] == [("/items?id=7&x=%20y", 3, 4)]
    assert decoder.take_counts() == {"resync:gap": 1, "unsolicited_response": 1}


def test_gap_inside_response_headers_reports_it_incomplete_and_decodes_the_next():
    message = b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 10\r\n\r\n0123456789"
    decoder = HttpDecoder()
    chunks = [chunk(REQ, GET, 1), chunk(RESP, message[:20], 2, size=len(message)), chunk(REQ, GET, 3),
              chunk(RESP, OK_HELLO, 4)]
    got = decode(chunks, decoder=decoder)
    assert [(e.status, e.response_bytes, e.attributes.get("incomplete")) for e in got] == [
        (200, len(message), True), (200, len(OK_HELLO), None)]
    assert decoder.take_counts() == {"resync:gap": 1}


def test_gap_past_the_declared_body_ends_that_body_and_skips_what_follows():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    decoder = HttpDecoder()
    pipelined = chunk(REQ, GET + GET, 1)
    unseen = chunk(RESP, head + b"0123", 2, size=len(head) + 10 + len(OK_HELLO))  # the 2nd response unseen
    got = decode([pipelined, unseen, chunk(REQ, GET, 3), chunk(RESP, OK_HELLO, 4)], decoder=decoder)
    assert [(e.request_start_ns, e.status, e.response_bytes, e.attributes.get("gap")) for e in got] == [
        (1, 200, len(head) + 10, None), (1, None, 0, True), (3, 200, len(OK_HELLO), None)]
    assert decoder.take_counts() == {"resync:gap": 1}


def test_trusting_syscall_boundaries_ends_a_message_cut_inside_headers():
    request = (
        b"POST /q?a=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl\r\nContent-Length: 300\r\n\r\n" + b"b" * 300
    )
    response = b"HTTP/1.1 503 Service Unavailable\r\nServer: x\r\nContent-Length: 900\r\n\r\n" + b"e" * 900
    decoder = HttpDecoder(trust_syscall_boundaries=True)
    chunks = [chunk(REQ, request[:60], 1, size=len(request)), chunk(RESP, response[:50], 2, size=len(response))]
    chunks += [chunk(REQ, GET, 3), chunk(RESP, OK_HELLO, 4)]
    got = decode(chunks, decoder=decoder)
    assert got[0] == exchange(
        method="POST",
        target="/q?a=1",
        status=503,
        error=True,
        request_start_ns=1,
        request_end_ns=1,
        response_start_ns=2,
        response_end_ns=2,
        request_bytes=len(request),
        response_bytes=len(response),
        attributes={
            "reason": "Service Unavailable",
            "request_body_bytes": None,
            "response_body_bytes": None,
            "incomplete": True,
        },
    )
    assert (got[1].target, got[1].status) == ("/items?id=7&x=%20y", 200)


# -- close -----------------------------------------------------------------------


def test_close_reports_requests_without_response():
    post = b"POST /a HTTP/1.1\r\nHost: example.com\r\nContent-Length: 2\r\n\r\nhi"
    decoder = HttpDecoder()
    decode([chunk(REQ, GET, 1), chunk(REQ, post, 2)], decoder=decoder)
    got = list(decoder.close(10))
    assert got[1] == exchange(
        method="POST",
        target="/a",
        status=None,
        request_start_ns=2,
        request_end_ns=2,
        response_start_ns=None,
        response_end_ns=None,
        request_bytes=len(post),
        response_bytes=0,
        attributes={"reason": None, "request_body_bytes": 2, "response_body_bytes": 0},
    )
    assert [e.target for e in got] == ["/items?id=7&x=%20y", "/a"]
    assert got[0].latency_ns is None
    assert decoder.close(11) == []


def test_close_reports_a_cut_response_as_incomplete():
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    decoder = HttpDecoder()
    decode([chunk(REQ, GET, 1), chunk(RESP, head + b"4\r\nabcd\r\n", 2)], decoder=decoder)
    (got,) = decoder.close(3)
    assert (got.status, got.response_end_ns, got.response_bytes) == (200, 2, len(head) + 9)
    assert got.attributes["incomplete"] is True


def test_close_reports_a_response_head_cut_after_its_status_line():
    decoder = HttpDecoder()
    decode([chunk(REQ, GET, 1), chunk(RESP, b"HTTP/1.0 302 Found\r\nLocation: /x", 2)], decoder=decoder)
    (got,) = decoder.close(3)
    assert (got.status, got.attributes["reason"], got.attributes["incomplete"]) == (302, "Found", True)


def test_response_to_a_partly_seen_request_head():
    partial = b"GET /long HTTP/1.1\r\nHost: example.com\r\nCookie: aaaa"  # the rest was never captured
    response = b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n"
    (got,) = decode([chunk(REQ, partial, 1), chunk(RESP, response, 2)])
    assert (got.target, got.status, got.request_bytes) == ("/long", 431, len(partial))
    assert got.attributes["incomplete"] is True


# -- malformed input -------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes, first, counts",
    [
        (b"GET /a HTTP/1.1 extra\r\n\r\n", None, {"resync:garbage": 1, "skipped_bytes": 25}),
        (b"GET /a HTTP/2.0\r\n\r\n", None, {"resync:garbage": 1, "skipped_bytes": 19}),
        (b"get /a HTTP/1.1\r\n\r\n", None, {"resync:garbage": 1, "skipped_bytes": 19}),
        (b"\x00\x01\x02 garbage", None, {"resync:garbage": 1, "skipped_bytes": 11}),
        (b"POST /a HTTP/1.1\r\nContent-Length: abc\r\n\r\n", ("POST", "bad_content_length"), {}),
        (b"POST /a HTTP/1.1\r\nContent-Length: -1\r\n\r\n", ("POST", "bad_content_length"), {}),
        (b"POST /a HTTP/1.1\r\nContent-Length: 1_0\r\n\r\n", ("POST", "bad_content_length"), {}),
        (b"POST /a HTTP/1.1\r\nContent-Length: 18446744073709551616\r\n\r\n", ("POST", "bad_content_length"), {}),
        (b"POST /a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", ("POST", "unknown_transfer_encoding"), {}),
        (b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", ("POST", "bad_chunk_size"), {}),
        (b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x10\r\n", ("POST", "bad_chunk_size"), {}),
        (b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n", ("POST", "bad_chunk_size"), {}),
        (b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n", ("POST", "bad_chunk_size"),
         {}),
        (b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY", ("POST", "chunk_not_followed_by_crlf"),
         {}),
    ],
)
def test_malformed_requests_are_counted_and_the_next_exchange_decodes(request_bytes, first, counts):
    """A request that is no request is skipped (its response too: it answers nothing we saw); one whose
    body cannot be framed is reported incomplete with the reason.  Either way decoding goes on."""
    decoder = HttpDecoder()
    chunks = [chunk(REQ, request_bytes, 1), chunk(RESP, OK_HELLO, 2), chunk(REQ, GET, 3), chunk(RESP, OK_HELLO, 4)]
    got = decode(chunks, decoder=decoder)
    reported = [(e.method, e.attributes["anomalies"][0]) for e in got if "anomalies" in e.attributes]
    assert reported == ([] if first is None else [first])
    if first is not None:
        assert (got[0].status, got[0].attributes["incomplete"], got[0].attributes["request_body_bytes"]) == (
            200, True, None)
    assert (got[-1].target, got[-1].request_start_ns, got[-1].status) == ("/items?id=7&x=%20y", 3, 200)
    assert len(got) == (1 if first is None else 2)
    unsolicited = {"unsolicited_response": 1} if first is None else {}
    assert decoder.take_counts() == {**counts, **unsolicited}


@pytest.mark.parametrize(
    "response_bytes",
    [
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/3.0 200 OK\r\n\r\n",
        b"HTTX/1.1 200 OK\r\n\r\n",
    ],
)
def test_a_response_that_is_no_response_loses_the_request_waiting(response_bytes):
    decoder = HttpDecoder()
    chunks = [chunk(REQ, GET, 1), chunk(RESP, response_bytes, 2), chunk(REQ, GET, 3), chunk(RESP, OK_HELLO, 4)]
    got = decode(chunks, decoder=decoder)
    assert [(e.request_start_ns, e.status, e.attributes.get("gap")) for e in got] == [(1, None, True), (3, 200, None)]
    assert decoder.take_counts()["resync:garbage"] == 1


def test_a_response_whose_length_is_absurd_is_reported_incomplete():
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 9999999999999999999999\r\n\r\nbody"
    got = decode([chunk(REQ, GET, 1), chunk(RESP, response, 2), chunk(REQ, GET, 3), chunk(RESP, OK_HELLO, 4)])
    assert [(e.status, e.attributes.get("incomplete"), e.attributes.get("anomalies")) for e in got] == [
        (200, True, ["bad_content_length"]), (200, None, None)]


def test_an_unsolicited_response_is_counted_and_skipped_by_its_framing():
    decoder = HttpDecoder()
    extra = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 19\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"
    chunks = [chunk(REQ, GET, 1), chunk(RESP, OK_HELLO, 2), chunk(RESP, extra, 3), chunk(REQ, GET, 4),
              chunk(RESP, OK_HELLO, 5)]
    got = decode(chunks, decoder=decoder)
    assert [(e.request_start_ns, e.response_start_ns, e.status) for e in got] == [(1, 2, 200), (4, 5, 200)]
    assert decoder.take_counts() == {"unsolicited_response": 1}


def test_endless_headers_report_the_request_line_and_skip_the_rest():
    decoder = HttpDecoder()
    decoder.feed(chunk(REQ, b"GET / HTTP/1.1\r\n", 1))
    for i in range(MAX_HEAD_BYTES // 1000 + 2):
        decoder.feed(chunk(REQ, b"X-Filler: " + b"f" * 988 + b"\r\n", 2 + i))
    got = decode([chunk(RESP, b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\n\r\n", 100)], decoder=decoder)
    assert [(e.target, e.status, e.attributes.get("incomplete")) for e in got] == [("/", 431, True)]
    assert decoder.take_counts()["resync:garbage"] == 1


def test_unexpected_internal_errors_become_undecodable(monkeypatch):
    import deetune.decoders.http as http_module

    def broken(*args):
        raise IndexError("boom")

    monkeypatch.setattr(http_module, "_split_request_line", broken)
    with pytest.raises(Undecodable, match="IndexError"):
        HttpDecoder().feed(chunk(REQ, GET, 1))


# -- tolerance: what servers accept, each departure named ---------------------------------------


def one_exchange(request: bytes, response: bytes = OK_HELLO, decoder=None):
    (got,) = decode([chunk(REQ, request, 1), chunk(RESP, response, 2)], decoder=decoder)
    return got


@pytest.mark.parametrize(
    "request_line, method, target, version, anomalies",
    [
        (b"GET HTTP/1.1", "GET", "", "1.1", ["no_target"]),
        (b"OPTIONS HTTP/1.1", "OPTIONS", "", "1.1", ["no_target"]),
        (b"CONNECT host:25 / HTTP/1.0", "CONNECT", "host:25 /", "1.0", ["space_in_target"]),
        (b"GET /a b c HTTP/1.1", "GET", "/a b c", "1.1", ["space_in_target"]),
        (b"GET /x http/1.1", "GET", "/x", "1.1", ["version_case"]),
        (b"GET /x Http/1.0", "GET", "/x", "1.0", ["version_case"]),
    ],
)
def test_request_lines_servers_accept(request_line, method, target, version, anomalies):
    response = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"
    got = one_exchange(request_line + b"\r\nHost: h\r\n\r\n", response)
    assert (got.method, got.target, got.status, got.attributes["version"]) == (method, target, 502, version)
    assert got.attributes["anomalies"] == anomalies


def test_lower_case_version_in_a_status_line():
    response = b"http/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    got = one_exchange(GET, response)
    assert (got.status, got.response_bytes, got.attributes["anomalies"]) == (200, len(response), ["version_case"])


def test_http09_request_and_response_until_close():
    decoder = HttpDecoder()
    document = b"<html>a document, no status line</html>"
    got = decode([chunk(REQ, b"GET /old.html\r\n", 1), chunk(RESP, document[:10], 2), chunk(RESP, document[10:], 3)],
                 close_ts=9, decoder=decoder)
    assert got == [exchange(
        target="/old.html", status=None, request_start_ns=1, request_end_ns=1, response_start_ns=2, response_end_ns=3,
        request_bytes=15, response_bytes=len(document),
        attributes={"host": None, "version": "0.9", "reason": None, "response_body_bytes": len(document),
                    "anomalies": ["http09"]})]


@pytest.mark.parametrize("value, length", [(b"0" * 25, 0), (b"0" * 30 + b"5", 5), (b"5, 5", 5)])
def test_content_length_with_leading_zeros_or_repeated(value, length):
    body = b"x" * length
    response = b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\n" + body
    got = decode([chunk(REQ, GET, 1), chunk(RESP, response, 2), chunk(REQ, GET, 3), chunk(RESP, OK_HELLO, 4)])
    assert [(e.status, e.response_bytes, e.attributes["response_body_bytes"]) for e in got] == [
        (200, len(response), length), (200, len(OK_HELLO), 5)]
    assert "anomalies" not in got[0].attributes


@pytest.mark.parametrize("direction", [REQ, RESP])
def test_chunked_not_the_last_coding_is_still_chunked(direction):
    body = b"5\r\nhello\r\n0\r\n\r\n"
    if direction is REQ:
        request = b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n" + body
        got = one_exchange(request)
        assert (got.request_bytes, got.attributes["request_body_bytes"]) == (len(request), 5)
    else:
        response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n" + body
        got = one_exchange(GET, response)
        assert (got.response_bytes, got.attributes["response_body_bytes"]) == (len(response), 5)
    assert got.attributes["anomalies"] == ["chunked_not_last"]


def test_obsolete_line_folding_is_unfolded():
    request = b"POST /f HTTP/1.1\r\nHost: a\r\n  b\r\nContent-Length:\r\n\t3\r\n\r\nabc"
    got = decode([chunk(REQ, request, 1), chunk(RESP, OK_HELLO, 2), chunk(REQ, GET, 3), chunk(RESP, OK_HELLO, 4)])
    assert [(e.target, e.attributes["host"], e.request_bytes) for e in got] == [
        ("/f", "a b", len(request)), ("/items?id=7&x=%20y", "example.com", len(GET))]
    assert got[0].attributes["request_body_bytes"] == 3
    assert got[0].attributes["anomalies"] == ["obs_fold"]


def test_a_blank_before_the_colon():
    request = b"POST /s HTTP/1.1\r\nHost : h\r\nContent-Length : 2\r\n\r\nok"
    got = one_exchange(request)
    assert (got.attributes["host"], got.request_bytes, got.attributes["anomalies"]) == (
        "h", len(request), ["space_before_colon"])


def test_empty_lines_before_a_request_are_skipped():
    got = one_exchange(b"\r\n\r\n" + GET)
    assert (got.target, got.request_bytes, got.attributes["anomalies"]) == (
        "/items?id=7&x=%20y", len(GET), ["leading_empty_line"])


def test_mixed_line_ends_in_one_head():
    request = b"GET /m HTTP/1.1\r\nHost: h\nAccept: */*\n\n"
    got = one_exchange(request)
    assert (got.target, got.attributes["host"], got.request_bytes, got.attributes["anomalies"]) == (
        "/m", "h", len(request), ["bare_lf"])


def test_an_early_response_with_bare_lf_and_a_stray_line_feed_after_it():
    """The server answers before the request body is all there, with bare LF line ends and an extra LF after
    its body; the exchange and the next one are both reported."""
    post = b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n"
    early = b"HTTP/1.1 413 Payload Too Large\nContent-Length: 4\n\nnope\n"
    chunks = [chunk(REQ, post + b"abc", 1), chunk(RESP, early, 2), chunk(REQ, b"defghij", 3),
              chunk(REQ, GET, 4), chunk(RESP, OK_HELLO, 5)]
    got = decode(chunks)
    assert [(e.target, e.status, e.request_end_ns, e.response_bytes, e.attributes.get("anomalies")) for e in got] == [
        ("/upload", 413, 3, len(early) - 1, ["bare_lf"]),
        ("/items?id=7&x=%20y", 200, 4, len(OK_HELLO), ["leading_empty_line"]),
    ]


# -- properties --------------------------------------------------------------------

TOKEN_CHARS = string.ascii_letters + string.digits + "-._~/?=&%"


@st.composite
def conversations(draw):
    """Valid HTTP/1.1 traffic: a list of messages (direction, bytes) in the order they move, and the
    (method, target, status, request_bytes, response_bytes) each exchange must decode to."""
    messages, expected = [], []
    count = draw(st.integers(1, 4))
    pipelined = count > 1 and draw(st.booleans())
    pending_responses = []
    for index in range(count):
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]))
        target = "/" + draw(st.text(TOKEN_CHARS, max_size=20))
        body = draw(st.binary(max_size=50)) if method in ("POST", "PUT", "PATCH") else b""
        head = f"{method} {target} HTTP/1.1\r\n{draw(st.sampled_from(['Host', 'host', 'HOST']))}: h{index}\r\n"
        if body and draw(st.booleans()):
            head += "Transfer-Encoding: chunked\r\n\r\n"
            request_body = _chunked(draw, body)
        else:
            head += f"Content-Length: {len(body)}\r\n\r\n" if body or draw(st.booleans()) else "\r\n"
            request_body = body
        continued = bool(body) and not pipelined and draw(st.booleans())
        status = draw(st.sampled_from([200, 201, 204, 304, 404, 500, 503]))
        response_body = b"" if method == "HEAD" or status in (204, 304) else draw(st.binary(max_size=80))
        framing = draw(st.sampled_from(["length", "chunked"] + (["close"] if index == count - 1 else [])))
        response = f"HTTP/1.1 {status} R{status}\r\nServer: s\r\n"
        if framing == "chunked" and response_body:
            response = response.encode() + b"transfer-encoding: chunked\r\n\r\n" + _chunked(draw, response_body)
        elif framing == "close":
            response = response.encode() + b"Connection: close\r\n\r\n" + response_body
        else:
            response = response.encode() + f"Content-Length: {len(response_body)}\r\n\r\n".encode() + response_body
        if continued:
            messages += [(REQ, head.encode()), (RESP, b"HTTP/1.1 100 Continue\r\n\r\n"), (REQ, request_body)]
        else:
            messages.append((REQ, head.encode() + request_body))
        expected.append((method, target, status, len(head) + len(request_body), len(response)))
        if pipelined:
            pending_responses.append((RESP, response))
        else:
            messages.append((RESP, response))
    return messages + pending_responses, expected


def _chunked(draw, body: bytes) -> bytes:
    out, pos = b"", 0
    while pos < len(body):
        size = draw(st.integers(1, len(body) - pos))
        extension = draw(st.sampled_from([b"", b";a=b", b" ; x"]))
        out += b"%x%s\r\n%s\r\n" % (size, extension, body[pos : pos + size])
        pos += size
    return out + b"0\r\n" + draw(st.sampled_from([b"", b"Trailer-A: 1\r\n"])) + b"\r\n"


def summary(exchanges):
    return [(e.method, e.target, e.status, e.request_bytes, e.response_bytes) for e in exchanges]


def feed_safely(decoder, chunks):
    """Feed until the decoder gives up; anything but Undecodable fails the test."""
    try:
        for c in chunks:
            decoder.feed(c)
    except Undecodable as exc:
        assert "\n" not in str(exc)
    decoder.close(10**9)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.randoms(use_true_random=False))
def test_splitting_messages_anywhere_gives_the_same_exchanges(conversation, rng):
    messages, expected = conversation
    # Every chunk of a message carries the message's timestamp, so exchanges must match exactly.
    whole = [chunk(direction, data, index) for index, (direction, data) in enumerate(messages)]
    split = []
    for index, (direction, data) in enumerate(messages):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6))))
        for start, stop in zip([0] + cuts, cuts + [len(data)]):
            split.append(chunk(direction, data[start:stop], index))
    reference = decode(whole, close_ts=10**6)
    assert summary(reference) == expected
    assert decode(split, close_ts=10**6) == reference


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.randoms(use_true_random=False))
def test_coalescing_and_resplitting_a_direction_gives_the_same_exchanges(conversation, rng):
    messages, expected = conversation
    runs = []  # consecutive messages in one direction, as one stream segment
    for direction, data in messages:
        if runs and runs[-1][0] is direction:
            runs[-1][1] += data
        else:
            runs.append([direction, data])
    chunks = []
    for direction, data in runs:
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 4))))
        for start, stop in zip([0] + cuts, cuts + [len(data)]):
            chunks.append(chunk(direction, data[start:stop], len(chunks)))
    assert summary(decode(chunks, close_ts=10**6)) == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations(), st.randoms(use_true_random=False), st.booleans())
def test_random_truncation_and_reordering_only_ever_raise_undecodable(conversation, rng, trust):
    messages, _ = conversation
    chunks = []
    for index, (direction, data) in enumerate(messages):
        cut = rng.randint(1, len(data)) if len(data) > 1 else 1
        for piece in (data[:cut], data[cut:]):
            if piece:
                kept = rng.randint(0, len(piece)) if rng.random() < 0.3 else len(piece)
                chunks.append(Chunk(direction, piece[:kept], len(piece), index))
    if rng.random() < 0.3:
        rng.shuffle(chunks)
    feed_safely(HttpDecoder(trust_syscall_boundaries=trust), chunks)


PREFIXES = [
    b"",
    b"GET / HTTP/1.1\r\n",
    b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.booleans(), st.sampled_from(PREFIXES), st.binary(max_size=60), st.integers(0, 3), st.integers(0, 100)
        ),
        max_size=8,
    ),
    st.booleans(),
)
def test_random_bytes_only_ever_raise_undecodable(events, trust):
    chunks = []
    for is_request, prefix, data, extra_kind, extra in events:
        data = prefix + data
        size = len(data) + (extra if extra_kind == 0 else 0)  # a quarter of the chunks are truncated
        chunks.append(Chunk(REQ if is_request else RESP, data, size, len(chunks)))
    decoder = HttpDecoder(trust_syscall_boundaries=trust)
    if chunks and chunks[0].direction is RESP:
        decoder.feed(chunk(REQ, GET, 0))
    feed_safely(decoder, chunks)


# -- third-party vectors -------------------------------------------------------------

DEEPFLOW = "deepflow/agent/resources/test/flow_generator"
KINDLING = "kindling/collector/pkg/component/analyzer/network/protocol/testdata/http"


def pcap_chunks(vectors, relative_path):
    """Chunks of every connection in a capture, one per TCP segment, in time order."""
    spec = importlib.util.spec_from_file_location("pcap_to_streams", vectors / "pcap_to_streams.py")
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    _, _, _, connections = helper.read_streams(str(vectors / relative_path))
    result = []
    for connection in connections:
        chunks = []
        for name, direction in (("c2s", REQ), ("s2c", RESP)):
            offset = 0
            for ts, length in connection[name + "_events"]:
                data = connection[name][offset : offset + length]
                chunks.append(chunk(direction, data, round(ts * 1_000_000) * 1_000))  # pcap µs → ns, exactly
                offset += length
        chunks.sort(key=lambda c: c.ts_ns)  # stable: at equal times the request goes first
        result.append(chunks)
    return result


def deepflow_expected(result_text):
    """(METHOD, path, status) per exchange, from DeepFlow's per-packet HttpInfo lines."""
    requests, statuses = [], []
    for line in result_text.splitlines():
        if "msg_type: Request" in line:
            method = re.search(r"\bmethod: (\w+)", line).group(1).upper()
            path = re.search(r'\bpath: "((?:[^"\\]|\\.)*)"', line).group(1)
            requests.append((method, path))
        elif "msg_type: Response" in line:
            statuses.append(int(re.search(r"status_code: Some\((\d+)\)", line).group(1)))
    assert len(statuses) <= len(requests)
    return [(m, p, statuses[i] if i < len(statuses) else None) for i, (m, p) in enumerate(requests)]


@pytest.mark.parametrize("name", ["httpv1", "client-ip", "istio-tcp-frag", "sw8"])
def test_deepflow_http1_captures(vectors, name):
    expected = deepflow_expected((vectors / DEEPFLOW / "http" / f"{name}.result").read_text())
    (chunks,) = pcap_chunks(vectors, f"{DEEPFLOW}/http/{name}.pcap")
    got = decode(chunks, close_ts=chunks[-1].ts_ns)
    assert [(e.method, e.target, e.status) for e in got] == expected
    assert sum(e.request_bytes for e in got) == sum(len(c.data) for c in chunks if c.direction is REQ)
    assert sum(e.response_bytes for e in got) == sum(len(c.data) for c in chunks if c.direction is RESP)


def test_deepflow_httpv1_latency(vectors):
    (chunks,) = pcap_chunks(vectors, f"{DEEPFLOW}/http/httpv1.pcap")
    (got,) = decode(chunks)
    assert got.latency_ns == 84_051_000  # DeepFlow's L7PerfStats: rrt sum 84051 µs
    assert got.attributes["host"] == "rq.cct.cloud.duba.net"
    assert (got.attributes["request_body_bytes"], got.attributes["response_body_bytes"]) == (85, 54)


def test_deepflow_sw8_keep_alive_chunked(vectors):
    (chunks,) = pcap_chunks(vectors, f"{DEEPFLOW}/http/sw8.pcap")
    got = decode(chunks)  # all three complete without close()
    assert [e.response_bytes for e in got] == [154, 154, 154]
    assert [e.attributes["request_body_bytes"] for e in got] == [351, 247, 350]
    assert all(e.latency_ns > 0 for e in got)


def test_deepflow_plain_http_pcap(vectors):
    (chunks,) = pcap_chunks(vectors, f"{DEEPFLOW}/http.pcap")
    (got,) = decode(chunks)
    assert (got.method, got.target, got.status, got.attributes["response_body_bytes"]) == ("GET", "/", 200, 4833)


def kindling_data(items) -> bytes:
    """Kindling's payload encoding: "text", "hex|0a0b", "string|text", or "0a0b|text" (hex then text)."""
    out = b""
    for item in items:
        prefix, bar, rest = item.partition("|")
        if bar and prefix == "hex":
            out += bytes.fromhex(rest)
        elif bar and prefix == "string":
            out += rest.encode()
        elif bar and prefix and all(c in string.hexdigits for c in prefix):
            out += bytes.fromhex(prefix) + rest.encode()
        else:
            out += item.encode()
    return out


def kindling_trace(vectors, name):
    trace = yaml.safe_load((vectors / KINDLING / name).read_text())["trace"]
    events = []
    for key, direction in (("requests", REQ), ("responses", RESP)):
        for event in trace[key]:
            attrs = event["user_attributes"]
            data = kindling_data(attrs["data"])
            events.append((chunk(direction, data, event["timestamp"], size=attrs["res"]), attrs["latency"]))
    events.sort(key=lambda item: item[0].ts_ns)  # requests are reads, responses writes: one syscall timeline
    return events, trace["expects"][0]


KINDLING_DECODABLE = [
    "server-trace-normal.yml",
    "server-trace-error.yml",
    "server-trace-slow.yml",
    "server-trace-continue.yml",
]


@pytest.mark.parametrize("name", KINDLING_DECODABLE)
def test_kindling_server_traces(vectors, name):
    events, expect = kindling_trace(vectors, name)
    chunks = [c for c, _ in events]
    labels, values = expect["Labels"], expect["Values"]
    # Most of these captures cut the headers, so they decode only when trusting syscall boundaries.
    (got,) = decode(chunks, decoder=HttpDecoder(trust_syscall_boundaries=True))
    expected = (labels["http_method"], labels["http_url"], labels["http_status_code"])
    assert (got.method, got.target, got.status) == expected
    assert got.error is (labels["http_status_code"] >= 500)  # Kindling counts 4xx as errors too; we do not
    assert got.request_bytes == sum(c.size for c in chunks if c.direction is REQ) == values["request_io"]
    interim = [c for c in chunks if c.direction is RESP and c.data.startswith(b"HTTP/1.1 1")]
    final = [c for c in chunks if c.direction is RESP and c not in interim]
    assert got.response_bytes == sum(c.size for c in final) == values["response_io"]
    assert got.attributes.get("continue", False) is bool(interim)
    # Kindling times from syscall entry (exit timestamp minus syscall latency); we use exit timestamps.
    latency_of = {id(c): latency for c, latency in events}
    first_final = next(c for c in final if c.ts_ns == got.response_start_ns)
    assert got.latency_ns - latency_of[id(first_final)] == values["waiting_ttfb_time"]
    first_request = next(c for c in chunks if c.direction is REQ)
    assert got.response_end_ns - (got.request_start_ns - latency_of[id(first_request)]) == values["request_total_time"]


@pytest.mark.parametrize("name", ["server-trace-normal.yml", "server-trace-continue.yml"])
def test_kindling_without_trusting_syscall_boundaries_gives_the_same(vectors, name):
    chunks = [c for c, _ in kindling_trace(vectors, name)[0]]
    assert decode(chunks) == decode(chunks, decoder=HttpDecoder(trust_syscall_boundaries=True))


def test_kindling_split_trace_is_not_http(vectors):
    # The capture starts one byte into the request ("ET /test …"); Kindling guesses GET, we do not.
    events, expect = kindling_trace(vectors, "server-trace-split.yml")
    first = events[0][0]
    assert first.data.startswith(b"ET /") and expect["Labels"]["http_method"] == "GET"
    assert HttpDecoder.detect(first.direction, first.data) is False
    # Fed anyway, "ET" reads as an extension method (any upper-case token is one): no guessing.
    (got,) = decode([c for c, _ in events], decoder=HttpDecoder(trust_syscall_boundaries=True))
    assert (got.method, got.target) == ("ET", expect["Labels"]["http_url"])
