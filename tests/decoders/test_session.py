"""StreamSession: detection from the first recognisable message, resync after a decoder gives up,
gaps; and properties over all three decoders: a valid stream split anywhere, with any one chunk
dropped, still gives every exchange that did not touch the dropped chunk, exactly."""

from __future__ import annotations

import struct
from typing import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable
from deetune.decoders.http import HttpDecoder
from deetune.decoders.mysql import MysqlDecoder
from deetune.decoders.redis import RedisDecoder
from deetune.decoders.session import DETECTION_CHUNKS, MAX_RESYNCS, State, StreamSession

ALL = [HttpDecoder, RedisDecoder, MysqlDecoder]
GET = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def mysql_packet(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload) | seq << 24) + payload


def feed(session: StreamSession, events) -> list[Exchange]:
    """``(egress, data, ts)`` or ``(egress, data, size, ts)`` events."""
    out = []
    for event in events:
        egress, data = event[0], event[1]
        size, ts = (len(data), event[2]) if len(event) == 3 else (event[2], event[3])
        out.extend(session.feed(egress, data, size, ts))
    return out


# -- detection ---------------------------------------------------------------------------------


def test_a_mysql_header_read_apart_from_its_body_is_recognised():
    """mariadbd reads a packet's 4-byte header and its body in two calls: each alone says nothing."""
    query = mysql_packet(0, b"\x03SELECT 1")
    ok = mysql_packet(1, b"\x00\x00\x00\x02\x00\x00\x00")
    session = StreamSession(ALL, "server")
    got = feed(session, [(False, query[:4], 1), (False, query[4:], 2), (True, ok, 3)])
    assert session.protocol == "mysql"
    assert [(e.method, e.target, e.status, e.request_bytes, e.request_start_ns) for e in got] == [
        ("QUERY", "SELECT 1", "OK", len(query), 1)]


def test_decoding_starts_at_the_first_message_recognised():
    """A connection older than the capture: the tail of a large response, then a full exchange."""
    session = StreamSession(ALL, "client")
    body_tail = [(False, b"x" * 4096, i) for i in range(1, 12)]  # more chunks than a message ever needs
    got = feed(session, body_tail + [(True, GET, 20), (False, OK, 21)])
    assert [(e.target, e.status, e.request_start_ns) for e in got] == [("/a", 200, 20)]
    assert session.take_counts() == {"skipped_bytes": 11 * 4096}


def test_a_response_first_is_skipped_and_the_next_exchange_decodes():
    """The server side of an older connection: its first chunk answers a request never seen."""
    session = StreamSession(ALL, "server")
    got = feed(session, [(True, OK, 1), (False, GET, 2), (True, OK, 3)])
    assert [(e.target, e.request_start_ns, e.response_start_ns) for e in got] == [("/a", 2, 3)]
    assert session.take_counts() == {"unsolicited_response": 1}


def test_bytes_of_no_protocol_are_given_up():
    session = StreamSession(ALL, None)
    feed(session, [(i % 2 == 0, b"\x16\x03\x01garbage %d" % i, i) for i in range(DETECTION_CHUNKS)])
    assert session.state is State.UNKNOWN and not session.active


# -- resync ------------------------------------------------------------------------------------


class LineDecoder(Decoder):
    """A plugin-like decoder: requests ``Q <name>\\n``, responses ``A <name>\\n``; gives up on anything
    else (it knows no resync of its own)."""

    protocol = "lines"

    def __init__(self) -> None:
        self.pending: list[tuple[str, int]] = []

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        return data.startswith(b"Q " if direction is Direction.REQUEST else b"A ")

    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        out = []
        for line in chunk.data.splitlines():
            if chunk.direction is Direction.REQUEST and line.startswith(b"Q "):
                self.pending.append((line[2:].decode(), chunk.ts_ns))
            elif chunk.direction is Direction.RESPONSE and line.startswith(b"A ") and self.pending:
                name, ts = self.pending.pop(0)
                out.append(Exchange("lines", "Q", name, "OK", False, ts, ts, chunk.ts_ns, chunk.ts_ns, 0, 0))
            else:
                raise Undecodable(f"bad line {line[:10]!r}", exchanges=out, reason="garbage")
        if chunk.size > len(chunk.data):
            raise Undecodable("gap", exchanges=out, reason="gap")
        return out

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        return [Exchange("lines", "Q", name, None, False, ts, ts, None, None, 0, 0) for name, ts in self.pending]


def test_a_decoder_that_gives_up_is_resynchronised_at_the_next_request():
    session = StreamSession([LineDecoder], "client")
    got = feed(session, [
        (True, b"Q a\nQ b\n", 1), (False, b"A a\n??\n", 2),  # b's answer is garbage: b is reported without one
        (False, b"A late\n", 3),  # answers nothing we saw: skipped
        (True, b"Q c\n", 4), (False, b"A c\n", 5),
        (True, b"Q d\n", 6, 100),  # a gap after it: d is reported, the next request starts afresh
        (False, b"A d?\n", 7), (True, b"Q e\n", 8), (False, b"A e\n", 9),
    ])
    assert [(e.target, e.status, e.attributes.get("gap")) for e in got] == [
        ("a", "OK", None), ("b", None, True), ("c", "OK", None), ("d", None, True), ("e", "OK", None)]
    assert session.resyncs == 2 and session.state is State.DECODING
    assert session.take_counts() == {"resync:garbage": 1, "resync:gap": 1, "skipped_bytes": 12}


def test_a_decoder_failing_at_every_request_is_given_up():
    session = StreamSession([LineDecoder], "client")
    feed(session, [(True, b"Q x\n#\n", i) for i in range(MAX_RESYNCS + 2)])
    assert session.state is State.UNDECODABLE


def test_an_unsupported_stream_is_given_up_at_once():
    session = StreamSession([MysqlDecoder], "client")
    login_free = mysql_packet(0, b"\x12" + b"\x00" * 10)  # binlog dump
    feed(session, [(True, mysql_packet(0, b"\x0e"), 1), (True, login_free, 2)])
    assert session.state is State.UNDECODABLE and "binlog" in session.reason


# -- properties: split anywhere, drop any one chunk ----------------------------------------------


def http_exchange(i: int, body: bytes) -> tuple[bytes, bytes, tuple]:
    request = b"GET /r%d HTTP/1.1\r\nHost: h\r\n\r\n" % i
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    return request, response, ("GET", f"/r{i}", 200, len(request), len(response))


def redis_exchange(i: int, body: bytes) -> tuple[bytes, bytes, tuple]:
    key = b"k%d" % i
    request = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key)
    response = b"$%d\r\n%s\r\n" % (len(body), body)
    return request, response, ("GET", f"k{i}", "OK", len(request), len(response))


def mysql_exchange(i: int, body: bytes) -> tuple[bytes, bytes, tuple]:
    text = b"SELECT %d" % i
    request = mysql_packet(0, b"\x03" + text)
    rows = b"".join(mysql_packet(4 + r, bytes([len(body)]) + body) for r in range(2))
    response = (mysql_packet(1, b"\x01") + mysql_packet(2, b"\x03def\x00\x00\x00\x01c\x00\x0c\x21\x00\x10\x00\x00\x00"
                b"\xfd\x00\x00\x00\x00\x00") + mysql_packet(3, b"\xfe\x00\x00\x02\x00") + rows
                + mysql_packet(6, b"\xfe\x00\x00\x02\x00"))
    return request, response, ("QUERY", text.decode(), "OK", len(request), len(response))


PROTOCOLS = {"http": (HttpDecoder, http_exchange), "redis": (RedisDecoder, redis_exchange),
             "mysql": (MysqlDecoder, mysql_exchange)}


@st.composite
def conversations(draw):
    """A protocol, its request/response exchanges in turn (no pipelining), each message cut into
    pieces at offsets drawn anywhere; and the index of one piece to drop (or None)."""
    protocol = draw(st.sampled_from(sorted(PROTOCOLS)))
    _, make = PROTOCOLS[protocol]
    count = draw(st.integers(2, 6))
    pieces, expected = [], []
    ts = 0
    for i in range(count):
        body = draw(st.binary(max_size=40).filter(lambda b: b"\r\n" not in b and b"\n" not in b))
        request, response, summary = make(i, body)
        expected.append(summary)
        for egress, message in ((True, request), (False, response)):
            ts += 1
            cuts = sorted(draw(st.sets(st.integers(1, len(message) - 1), max_size=3)))
            for start, stop in zip([0, *cuts], [*cuts, len(message)]):
                pieces.append((i, egress, message[start:stop], ts))
    dropped = draw(st.none() | st.integers(0, len(pieces) - 1))
    return protocol, pieces, expected, dropped


#: What an exchange touched by a gap says of itself.
FLAGS = ("gap", "incomplete", "truncated", "response_truncated", "target_truncated", "rows_truncated")


def summary(e: Exchange) -> tuple:
    return (e.method, e.target, e.status, e.request_bytes, e.response_bytes)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations())
def test_every_exchange_the_dropped_chunk_did_not_touch_is_reported_exactly(conversation):
    """Live, a chunk not copied (sampling, a lost record) reaches the decoder as a gap of its size."""
    protocol, pieces, expected, dropped = conversation
    decoder_class = PROTOCOLS[protocol][0]
    session = StreamSession([decoder_class], "client")
    got = []
    for index, (_, egress, data, ts) in enumerate(pieces):
        if index == dropped:
            got.extend(session.feed(egress, b"", len(data), ts))
        else:
            got.extend(session.feed(egress, data, len(data), ts))
    got.extend(session.close(10**9))
    touched = None if dropped is None else pieces[dropped][0]
    reported = [summary(e) for e in got]
    for i, exchange in enumerate(expected):
        if i != touched:
            assert reported.count(exchange) == 1, repr((i, exchange, reported, pieces, dropped))
    # Nothing else is reported as if it were whole: what the gap touched is flagged or absent.
    for e in got:
        if summary(e) not in expected:
            assert e.status is None or any(e.attributes.get(flag) for flag in FLAGS), repr((e, pieces, dropped))
    assert session.active


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations())
def test_truncating_any_one_chunk_keeps_the_others_exact(conversation):
    """The kernel copies a prefix of a call: the rest is a gap at the chunk's end."""
    protocol, pieces, expected, cut = conversation
    decoder_class = PROTOCOLS[protocol][0]
    session = StreamSession([decoder_class], "client")
    got = []
    for index, (_, egress, data, ts) in enumerate(pieces):
        kept = data[: len(data) // 2] if index == cut else data
        got.extend(session.feed(egress, kept, len(data), ts))
    got.extend(session.close(10**9))
    touched = None if cut is None else pieces[cut][0]
    reported = [summary(e) for e in got]
    for i, exchange in enumerate(expected):
        if i != touched:
            assert reported.count(exchange) == 1, repr((i, exchange, reported, pieces, cut))
