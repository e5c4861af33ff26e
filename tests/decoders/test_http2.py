"""HTTP/2 and gRPC decoder: byte streams in, one exchange per stream out.

The traffic is made by a real HTTP/2 implementation (python-hyper's ``h2``: client and server
connections talking to each other in memory), so framing, HPACK indexing and flow control are
what a peer really sends; expected byte counts are read back from the frames with ``hyperframe``.
"""

from __future__ import annotations

import urllib.parse

import h2.config
import h2.connection
import h2.errors
import h2.events
import hyperframe.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deetune.decoders.base import Chunk, Direction, Undecodable
from deetune.decoders.http import HttpDecoder
from deetune.decoders.http2 import PREFACE, Http2Decoder, plausible_frames
from deetune.decoders.session import StreamSession
from deetune.plugins import default_plugins

REQ = Direction.REQUEST
RESP = Direction.RESPONSE
GRPC_HEADERS = [("content-type", "application/grpc"), ("te", "trailers")]


class Wire:
    """An h2 client and server connected in memory; every write is a chunk, 1 ms apart."""

    def __init__(self, preface: bool = True):
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.chunks: list[Chunk] = []
        self.t = 1_000_000_000
        if preface:
            self.client.initiate_connection()
            self.flush()
            self.server.initiate_connection()
            self.flush()

    def flush(self) -> list:
        """Deliver what each side has to send, the client's first; received DATA is acknowledged
        (WINDOW_UPDATE) as a real peer would, in the receiver's next write."""
        events = []
        for conn, peer, direction in ((self.client, self.server, REQ), (self.server, self.client, RESP)):
            data = conn.data_to_send()
            if data:
                self.t += 1_000_000
                self.chunks.append(Chunk(direction, data, len(data), self.t))
                for event in peer.receive_data(data):
                    events.append(event)
                    if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                        peer.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        return events

    def request(self, path: str, *, method: str = "GET", body: bytes = b"", extra=(), end: bool = True) -> int:
        sid = self.client.get_next_available_stream_id()
        headers = [(":method", method), (":path", path), (":authority", "svc.test"), (":scheme", "http"), *extra]
        self.client.send_headers(sid, headers, end_stream=end and not body)
        if body:
            self.client.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def respond(self, sid: int, status: int = 200, body: bytes = b"", extra=(), trailers=None) -> None:
        self.server.send_headers(sid, [(":status", str(status)), *extra], end_stream=not body and not trailers)
        if body:
            self.server.send_data(sid, body, end_stream=not trailers)
        if trailers:
            self.server.send_headers(sid, trailers, end_stream=True)
        self.flush()


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def send_data(conn, sid: int, data: bytes, end_stream: bool = False) -> None:
    """DATA frames of at most 16 KiB (the default SETTINGS_MAX_FRAME_SIZE)."""
    pieces = [data[i:i + 16384] for i in range(0, len(data), 16384)] or [b""]
    for i, piece in enumerate(pieces):
        conn.send_data(sid, piece, end_stream=end_stream and i == len(pieces) - 1)


def frame_bytes(chunks: list[Chunk], direction: Direction, stream_id: int) -> int:
    """Bytes of HEADERS, CONTINUATION and DATA frames of one stream in one direction, read by hyperframe."""
    data = b"".join(c.data for c in chunks if c.direction is direction)
    if data.startswith(PREFACE):
        data = data[len(PREFACE):]
    total = 0
    pos = 0
    while pos < len(data):
        frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(data[pos:pos + 9]))
        if frame.stream_id == stream_id and frame.type in (0x0, 0x1, 0x9):
            total += 9 + length
        pos += 9 + length
    return total


def decode(chunks, decoder=None, close_ts=None):
    decoder = decoder or Http2Decoder()
    out = []
    for c in chunks:
        out.extend(decoder.feed(c))
    if close_ts is not None:
        out.extend(decoder.close(close_ts))
    return out


# -- detection ------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction, data, expected", [
    (REQ, PREFACE, True),
    (REQ, PREFACE[:14], True),
    (REQ, b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", False),
    (REQ, b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n", True),
    (REQ, b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", False),
    (REQ, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", False),
    (RESP, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", True),  # SETTINGS
    (RESP, b"\x00\x00\x00\x04\x00\x00\x00\x00\x01", False),  # SETTINGS on a stream
    (RESP, b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5, False),  # SETTINGS of 5 bytes
    (RESP, b"\x00\x00\x01\x01\x04\x00\x00\x00\x01\x88", True),  # HEADERS :status 200
    (REQ, b"\x00\x00\x01\x01\x04\x00\x00\x00\x01\x88", False),  # a request does not carry :status
    (RESP, b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\x82", False),  # a response does not carry :method
    (REQ, b"\x00\x00\x01\x01\x05\x00\x00\x00\x01\x82", True),
    (RESP, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, False),  # TLS ClientHello
    (RESP, b"\x17\x03\x03\x00\x45" + b"\x00" * 0x45, False),  # TLS application data
    (REQ, b"*1\r\n$4\r\nPING\r\n", False),
    (RESP, b"HTTP/1.1 200 OK\r\n\r\n", False),
    (REQ, b"", False),
])
def test_detect(direction, data, expected):
    assert Http2Decoder.detect(direction, data) is expected


def test_detect_runs_past_the_end_only_after_a_whole_frame():
    headers = b"\x00\x00\x01\x01\x04\x00\x00\x00\x01\x88"
    data_frame_start = b"\x00\x40\x00\x00\x00\x00\x00\x00\x01" + b"x" * 100  # 16 KiB DATA, cut
    assert plausible_frames(headers + data_frame_start)
    assert not plausible_frames(data_frame_start)


def test_http2_is_detected_before_http1_for_an_upgrade():
    plugins = default_plugins()
    session = StreamSession(plugins.decoders.classes(), "client")
    session.feed(True, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                       b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n", 90, 1)
    assert session.protocol == "http2"
    plain = StreamSession(plugins.decoders.classes(), "client")
    plain.feed(True, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 27, 1)
    assert plain.protocol == "http"


# -- streams ----------------------------------------------------------------------------------------


def test_interleaved_streams_with_exact_fields():
    w = Wire()
    a = w.request("/a?x=1", extra=[("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")])
    a_sent = w.t
    b = w.request("/upload", method="POST", body=b"p" * 300)
    b_sent = w.t
    w.respond(b, 503, b"busy")
    b_answered = w.t
    w.respond(a, 200, b"A" * 1000)
    a_answered = w.t
    out = decode(w.chunks)
    assert [(x.method, x.target, x.status, x.error) for x in out] == [
        ("POST", "/upload", 503, True), ("GET", "/a?x=1", 200, False)]
    post, get = out
    assert (get.request_start_ns, get.request_end_ns, get.response_start_ns, get.response_end_ns) == (
        a_sent, a_sent, a_answered, a_answered)
    assert (post.request_start_ns, post.request_end_ns, post.response_start_ns) == (b_sent, b_sent, b_answered)
    assert get.latency_ns == a_answered - a_sent and post.latency_ns == b_answered - b_sent
    assert get.request_bytes == frame_bytes(w.chunks, REQ, a)
    assert get.response_bytes == frame_bytes(w.chunks, RESP, a)
    assert post.request_bytes == frame_bytes(w.chunks, REQ, b)
    assert post.response_bytes == frame_bytes(w.chunks, RESP, b)
    assert get.attributes == {
        "version": "2", "stream_id": a, "host": "svc.test",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "request_body_bytes": 0, "response_body_bytes": 1000}
    assert post.attributes["request_body_bytes"] == 300 and post.attributes["response_body_bytes"] == 4


def test_chunks_split_anywhere_give_the_same_exchanges():
    w = Wire()
    sids = [w.request(f"/p{i}", method="POST", body=b"q" * (i * 700)) for i in range(4)]
    for i, sid in enumerate(reversed(sids)):
        w.respond(sid, 200 + i, b"r" * (i * 5000))
    whole = decode(w.chunks)
    split = []
    for c in w.chunks:
        for start in range(0, len(c.data), 7):
            piece = c.data[start:start + 7]
            split.append(Chunk(c.direction, piece, len(piece), c.ts_ns))
    assert decode(split) == whole
    assert [x.status for x in whole] == [200, 201, 202, 203]


def test_interim_response_and_trailers():
    w = Wire()
    sid = w.request("/slow", method="POST", body=b"x", extra=[("expect", "100-continue")])
    w.server.send_headers(sid, [(":status", "103"), ("link", "</s.css>; rel=preload")])
    w.flush()
    early_hints = w.t
    w.respond(sid, 201, b"made", trailers=[("x-checksum", "abc")])
    [x] = decode(w.chunks)
    assert (x.status, x.error) == (201, False)
    assert (x.response_start_ns, x.response_end_ns) == (early_hints, w.t)  # the 103 is the first response byte


def test_rst_stream_and_goaway_are_errors():
    w = Wire()
    cancelled = w.request("/long")
    w.client.reset_stream(cancelled, h2.errors.ErrorCodes.CANCEL)
    w.flush()
    done = w.request("/ok")
    unprocessed = w.request("/late")
    w.respond(done, 200)
    w.server.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=done)
    w.flush()
    out = decode(w.chunks)
    got = {x.target: (x.status, x.error, x.error_message) for x in out}
    assert got == {
        "/long": (None, True, "RST_STREAM CANCEL from the client"),
        "/ok": (200, False, None),
        "/late": (None, True, "GOAWAY NO_ERROR: not processed"),
    }


def test_goaway_with_an_error_fails_the_streams_left_at_close():
    w = Wire()
    w.request("/pending")
    w.server.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, last_stream_id=1)
    w.flush()
    [x] = decode(w.chunks, close_ts=w.t + 5)
    assert (x.target, x.error, x.error_message, x.attributes["incomplete"]) == (
        "/pending", True, "GOAWAY ENHANCE_YOUR_CALM", True)


def test_request_without_response_is_reported_at_close():
    w = Wire()
    w.request("/never")
    assert decode(w.chunks) == []
    [x] = decode(w.chunks, close_ts=w.t + 1)
    assert (x.target, x.status, x.latency_ns, x.attributes["incomplete"]) == ("/never", None, None, True)


def test_server_push():
    w = Wire()
    sid = w.request("/index.html")
    pushed = 2
    w.server.push_stream(sid, pushed, [(":method", "GET"), (":path", "/style.css"), (":authority", "svc.test"),
                                       (":scheme", "http")])
    w.respond(pushed, 200, b"css")
    w.respond(sid, 200, b"html")
    out = decode(w.chunks)
    assert [(x.target, x.status, x.attributes.get("pushed")) for x in out] == [
        ("/style.css", 200, True), ("/index.html", 200, None)]


# -- gRPC ---------------------------------------------------------------------------------------------


def grpc_call(w: Wire, method: str, requests: list[bytes], responses: list[bytes], status: int = 0,
              message: str | None = None, trailers_only: bool = False) -> int:
    sid = w.client.get_next_available_stream_id()
    w.client.send_headers(sid, [(":method", "POST"), (":path", method), (":authority", "svc.test"),
                                (":scheme", "http"), *GRPC_HEADERS], end_stream=False)
    for i, req in enumerate(requests):
        send_data(w.client, sid, grpc_message(req), end_stream=i == len(requests) - 1)
        w.flush()
    if not requests:
        w.client.end_stream(sid)
        w.flush()
    trailers = [("grpc-status", str(status))]
    if message is not None:
        trailers.append(("grpc-message", urllib.parse.quote(message)))
    if trailers_only:
        w.server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"), *trailers],
                              end_stream=True)
    else:
        w.server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        for resp in responses:
            send_data(w.server, sid, grpc_message(resp))
            w.flush()
            w.flush()  # the client's WINDOW_UPDATE
        w.server.send_headers(sid, trailers, end_stream=True)
    w.flush()
    return sid


def test_grpc_calls_of_every_kind():
    w = Wire()
    grpc_call(w, "/demo.Greeter/SayHello", [b"hi"], [b"hello"])
    grpc_call(w, "/demo.Greeter/ListHellos", [b"n=3"], [b"a", b"b" * 40000, b"c"])
    grpc_call(w, "/demo.Greeter/CollectHellos", [b"1", b"2", b"3", b"4"], [b"4 seen"])
    grpc_call(w, "/demo.Greeter/Chat", [b"x", b"y"], [b"X", b"Y"])
    grpc_call(w, "/demo.Greeter/SayHello", [b""], [], status=5, message="no such greeter: ümlaut 100%",
              trailers_only=True)
    out = decode(w.chunks)
    assert [(x.protocol, x.method, x.target, x.status, x.error, x.error_message) for x in out] == [
        ("grpc", "POST", "/demo.Greeter/SayHello", "OK", False, None),
        ("grpc", "POST", "/demo.Greeter/ListHellos", "OK", False, None),
        ("grpc", "POST", "/demo.Greeter/CollectHellos", "OK", False, None),
        ("grpc", "POST", "/demo.Greeter/Chat", "OK", False, None),
        ("grpc", "POST", "/demo.Greeter/SayHello", "NOT_FOUND", True, "no such greeter: ümlaut 100%"),
    ]
    assert [(x.attributes["grpc_service"], x.attributes["grpc_method"], x.attributes["request_messages"],
             x.attributes["response_messages"], x.attributes["streaming"], x.attributes["grpc_status"])
            for x in out] == [
        ("demo.Greeter", "SayHello", 1, 1, "unary", 0),
        ("demo.Greeter", "ListHellos", 1, 3, "server", 0),
        ("demo.Greeter", "CollectHellos", 4, 1, "client", 0),
        ("demo.Greeter", "Chat", 2, 2, "bidi", 0),
        ("demo.Greeter", "SayHello", 1, 0, "unary", 5),
    ]
    assert all("messages_exact" not in x.attributes for x in out)


def big_response_call(w: Wire, frames: list[bytes], frames_per_write: int) -> None:
    """A server-streaming call whose responses are these DATA frame payloads, written
    ``frames_per_write`` frames at a time."""
    sid = w.request("/demo.Big/Stream", method="POST", extra=GRPC_HEADERS, body=grpc_message(b"q"))
    w.server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    w.flush()
    for i, payload in enumerate(frames):
        w.server.send_data(sid, payload)
        if (i + 1) % frames_per_write == 0 or i == len(frames) - 1:
            w.flush()
            w.flush()  # the client's WINDOW_UPDATE
    w.server.send_headers(sid, [("grpc-status", "0")], end_stream=True)
    w.flush()


MESSAGES = [grpc_message(bytes([65 + i]) * 12000) for i in range(3)]


def cut(chunks: list[Chunk], capture: int) -> list[Chunk]:
    """What the kernel copies with ``--capture-bytes capture``: a prefix of each write."""
    return [Chunk(c.direction, c.data[:capture], c.size, c.ts_ns) for c in chunks]


def test_grpc_message_counts_step_over_gaps_inside_frames():
    w = Wire()
    big_response_call(w, MESSAGES, frames_per_write=1)  # a message per frame and write
    chunks = cut(w.chunks, 4096)
    assert sum(c.size - len(c.data) for c in chunks) > 20000
    [x] = decode(chunks)
    assert (x.status, x.attributes["response_messages"], x.response_bytes) == ("OK", 3, frame_bytes(w.chunks, RESP, 1))
    assert "messages_exact" not in x.attributes and "bytes_exact" not in x.attributes


def test_a_message_prefix_in_a_gap_makes_the_count_a_lower_bound():
    w = Wire()
    joined = b"".join(MESSAGES)
    big_response_call(w, [joined[:16000], joined[16000:32000], joined[32000:]], 1)  # prefix 2 at 12005
    [x] = decode(cut(w.chunks, 4096))
    assert (x.status, x.attributes["response_messages"], x.attributes["messages_exact"]) == ("OK", 1, False)
    assert x.response_bytes == frame_bytes(w.chunks, RESP, 1) and "bytes_exact" not in x.attributes


def test_a_gap_over_frame_headers_is_taken_up_at_the_next_write():
    w = Wire()
    big_response_call(w, MESSAGES, frames_per_write=3)  # frame headers 2 and 3 in the gap
    [x] = decode(cut(w.chunks, 4096))
    assert (x.status, x.attributes["messages_exact"], x.attributes["bytes_exact"]) == ("OK", False, False)
    assert x.response_bytes < frame_bytes(w.chunks, RESP, 1)
    [whole] = decode(w.chunks)
    assert (whole.attributes["response_messages"], whole.response_bytes) == (3, frame_bytes(w.chunks, RESP, 1))


# -- capture gaps and joining mid-connection ------------------------------------------------------------


def test_a_gap_over_a_frame_header_loses_the_framing_until_a_chunk_starts_with_frames():
    w = Wire()
    first = w.request("/first")
    second = w.request("/second")
    w.server.send_headers(first, [(":status", "200")])
    w.server.send_data(first, b"z" * 5000)
    w.server.send_headers(second, [(":status", "404")], end_stream=True)  # in the same write, past the cut
    w.flush()
    w.server.send_data(first, b"", end_stream=True)
    w.flush()
    third = w.request("/third")
    w.respond(third, 200, b"t")
    chunks = list(w.chunks)
    big = next(i for i, c in enumerate(chunks) if c.direction is RESP and c.size > 5000)
    chunks[big] = Chunk(RESP, chunks[big].data[:1000], chunks[big].size, chunks[big].ts_ns)
    out = decode(chunks, close_ts=w.t + 1)
    got = [(x.target, x.status, x.attributes.get("incomplete", False)) for x in out]
    # /first's END_STREAM came in its own write: taken up there. /second's response was in the gap.
    assert got == [("/first", 200, False), ("/third", 200, False), ("/second", None, True)]


def test_joining_mid_connection_reports_unseen_table_entries_as_unknown():
    w = Wire()
    ua = [("user-agent", "joiner/1.0")]
    w.respond(w.request("/a", extra=ua), 200, b"one", extra=[("x-served-by", "node-7")])
    joined_at = len(w.chunks)
    # Repeated headers are now sent as indexes into the dynamic table filled above.
    w.respond(w.request("/a", extra=ua), 200, b"two", extra=[("x-served-by", "node-7")])
    w.respond(w.request("/b", extra=ua), 404, b"", extra=[("x-served-by", "node-7")])
    w.respond(w.request("/b", extra=ua), 200, b"", extra=[("x-served-by", "node-7")])
    late = w.chunks[joined_at:]
    assert Http2Decoder.detect(REQ, late[0].data)
    out = decode(late)
    assert [(x.method, x.target, x.status, x.attributes.get("headers_unknown", 0)) for x in out] == [
        # :path /a, :authority and user-agent (request); x-served-by (response).
        ("GET", "", 200, 4),
        # /b is new: sent literally and inserted; :authority, user-agent, x-served-by still unknown.
        ("GET", "/b", 404, 3),
        # /b now comes from an entry inserted after the join: known.
        ("GET", "/b", 200, 3),
    ]
    assert [x.attributes["host"] for x in out if "host" in x.attributes] == []
    # From the start, nothing is unknown.
    assert all("headers_unknown" not in x.attributes for x in decode(w.chunks))


def test_gap_over_a_header_block_forgets_the_table():
    w = Wire()
    first = w.request("/a", extra=[("x-tenant", "blue")])
    lost = len(w.chunks) - 1  # this write's HEADERS fill the client's table
    w.respond(first, 200)
    second = w.request("/a", extra=[("x-tenant", "blue")])  # now all indexed
    w.respond(second, 200)
    chunks = list(w.chunks)
    chunks[lost] = Chunk(REQ, b"", chunks[lost].size, chunks[lost].ts_ns)  # not captured at all
    out = decode(chunks)
    assert [(x.method, x.target, x.status, x.attributes.get("headers_unknown", 0),
             x.attributes.get("request_headers_seen", True)) for x in out] == [
        ("", "", 200, 0, False),  # its response only
        ("GET", "", 200, 3, True),  # :path, :authority and x-tenant were inserted by the lost block
    ]


# -- h2c upgrade -------------------------------------------------------------------------------------


UPGRADE_REQUEST = (b"GET /up?q=1 HTTP/1.1\r\nHost: svc.test:8080\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                   b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nUser-Agent: t\r\n\r\n")


def test_h2c_upgrade_makes_the_upgrade_request_stream_1():
    w = Wire(preface=False)
    settings_header = w.client.initiate_upgrade_connection()
    assert settings_header
    w.server.initiate_upgrade_connection(settings_header)
    w.client.data_to_send()  # the preface, sent after the 101 below
    w.server.data_to_send()
    chunks = [Chunk(REQ, UPGRADE_REQUEST, len(UPGRADE_REQUEST), 10)]
    switching = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    w.t = 20
    w.server.send_headers(1, [(":status", "200"), ("content-length", "2")])
    w.server.send_data(1, b"ok", end_stream=True)
    server_bytes = w.server.data_to_send()
    chunks.append(Chunk(RESP, switching + server_bytes, len(switching) + len(server_bytes), 20))
    w.client.receive_data(server_bytes)
    w.chunks = chunks
    w.client.initiate_connection()
    w.flush()
    w.respond(w.request("/after"), 204)
    out = decode(w.chunks)
    assert [(x.protocol, x.method, x.target, x.status, x.attributes.get("upgrade"), x.attributes["stream_id"])
            for x in out] == [("http2", "GET", "/up?q=1", 200, "h2c", 1), ("http2", "GET", "/after", 204, None, 3)]
    up = out[0]
    assert (up.request_bytes, up.latency_ns, up.attributes["host"]) == (len(UPGRADE_REQUEST), 10, "svc.test:8080")


def test_declined_upgrade_is_http1():
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    second = b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n"
    chunks = [Chunk(REQ, UPGRADE_REQUEST, len(UPGRADE_REQUEST), 10), Chunk(RESP, response, len(response), 20),
              Chunk(REQ, second, len(second), 30), Chunk(RESP, response, len(response), 40)]
    out = decode(chunks)
    reference = decode(chunks, decoder=HttpDecoder())
    assert out == reference
    assert [(x.protocol, x.target, x.status) for x in out] == [("http", "/up?q=1", 200), ("http", "/two", 200)]


# -- robustness ------------------------------------------------------------------------------------


def test_bad_preface_is_undecodable():
    with pytest.raises(Undecodable):
        decode([Chunk(REQ, b"PRI * HTTP/2.0\r\n\r\nXX", 20, 1)])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=80), st.integers(0, 100)), max_size=12))
def test_any_bytes_give_exchanges_or_undecodable(parts):
    decoder = Http2Decoder()
    try:
        for i, (request, data, extra) in enumerate(parts):
            decoder.feed(Chunk(REQ if request else RESP, data, len(data) + extra, i))
        decoder.close(len(parts))
    except Undecodable:
        pass


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64), st.sampled_from([REQ, RESP]))
def test_detect_never_raises(data, direction):
    Http2Decoder.detect(direction, data)


# -- third-party captures (DeepFlow's HTTP/2 and gRPC test pcaps, through the offline reader) -----------

FLOWS = "deepflow/agent/resources/test/flow_generator/http"


def vector(vectors, name: str) -> list[dict]:
    from deetune.offline import decode_file

    return [e.to_json() for e in decode_file(str(vectors / FLOWS / f"{name}.pcap"))]


def summary(e: dict) -> tuple:
    a = e["attributes"]
    return (e["protocol"], e["method"], e["target"], e["status"], a["stream_id"], a.get("host"),
            a.get("http_status"), a.get("grpc_status"), a["request_body_bytes"], a["response_body_bytes"])


# Expected values are those of each capture's .result file (DeepFlow's per-packet parse): path, host,
# stream id, HTTP status, grpc status, content lengths; paths DeepFlow prints empty are header fields
# indexed into a dynamic table filled before the capture began (reported unknown here too).
@pytest.mark.parametrize("name, expected, latency_ns, duration_ns, extra", [
    ("h2c_ascii", ("grpc", "POST", "/hipstershop.CartService/GetCart", "OK", 1, "cartservice:7070", 200, 0, 43, 21),
     2_023_000, 2_023_000, {"request_messages": 1, "response_messages": 1, "streaming": "unary"}),
    ("grpc-server-stream", ("grpc", "POST", "/timeseriesquery.TimeSeriesQueryService/ServerStreamQuery", "OK", 1,
                            "localhost:9001", 200, 0, 35, 3223),
     501_692_000, 2_506_326_000, {"request_messages": 1, "response_messages": 5, "streaming": "server",
                                  # Two 17-byte holes in the capture, between frames: counts are lower bounds.
                                  "messages_exact": False, "bytes_exact": False}),
    ("grpc-service-name", ("grpc", "POST", "/StreamingService/ClientStreamRPC", "OK", 1, "10.1.23.22:38888", 200, 0,
                           90, 108),
     233_000, 3_002_001_000, {"request_messages": 3, "response_messages": 1, "streaming": "client"}),
    ("grpc-unary", ("grpc", "POST", "/agent.Synchronizer/Sync", None, 1, "10.1.23.21:30035", 200, None, 242, 0),
     30_826_000, None, {"incomplete": True}),  # the capture ends within the response's 16 KiB DATA frame
    ("grpc-segmented", ("grpc", "POST", "/agent.Synchronizer/Push", None, 1, "192.168.199.215:30035", None, None,
                        2438, 0), None, None, {"incomplete": True}),
    ("grpc-unknown", ("grpc", "POST", "", None, 928401, "currencyservice:7000", 200, None, 5, 170),
     2_251_000, 2_405_000, {"headers_unknown": 7}),
    ("httpv2-stream-id", ("http2", "POST", "", None, 1392369, None, None, None, 0, 0), None, None,
     {"headers_unknown": 7, "incomplete": True}),
])
def test_vectors(vectors, name, expected, latency_ns, duration_ns, extra):
    [e] = vector(vectors, name)
    assert summary(e) == expected
    assert (e["latency_ns"], e["duration_ns"]) == (latency_ns, duration_ns)
    assert {k: e["attributes"].get(k) for k in extra} == extra


def test_vector_two_streams_in_one_segment(vectors):
    out = vector(vectors, "http2-multi")
    assert [summary(e) for e in out] == [
        ("http2", "POST", "", 200, 18131983, None, None, None, 17, 150),
        ("http2", "POST", "", 200, 18131981, None, None, None, 17, 148),
    ]
    assert [e["attributes"]["headers_unknown"] for e in out] == [9, 9]
