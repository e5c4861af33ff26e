"""HTTP/2 decoder, with gRPC on top: one exchange per stream.

Where HTTP/2 is met: cleartext with prior knowledge (the client opens with the
connection preface), cleartext after an HTTP/1.1 ``Upgrade: h2c`` answered by
``101 Switching Protocols`` (the upgrade request is stream 1), and TLS with
ALPN ``h2`` through the TLS probe's plaintext (again from the preface).  An
upgrade the server declines leaves an HTTP/1.1 connection: its bytes go to the
HTTP/1 decoder, and the exchanges are ``http`` ones.

Frames are followed in both directions across chunks; only header blocks (and
the few bytes of small control frames) are kept, DATA is counted, never
buffered.  Header blocks are decoded with ``hpack`` (python-hyper: its header table
and Huffman code), one context per direction.  A stream's exchange carries ``:method``, ``:path``,
``:authority`` (``host``), the final ``:status``, latency from the request's
END_STREAM to the first response HEADERS, and the bytes of its frames (9-byte
headers included).  RST_STREAM (other than NO_ERROR) and a GOAWAY that leaves a
stream unprocessed make it an error.  A stream whose ``content-type`` is
``application/grpc…`` is a ``grpc`` exchange (see :mod:`deetune.decoders.grpc`).

Joining mid-connection (the agent started after the connection, or a capture
gap hid a frame header): the decoder takes up at the first chunk that starts
with a plausible run of frames.  HPACK's dynamic table was filled before that,
so a header that refers to an entry inserted earlier cannot be known: it is
reported unknown (``attributes["headers_unknown"]`` counts them, and ``method``
or ``target`` is ``""`` when they are among them), while the entries inserted
from then on are known and positioned exactly (indexes count from the newest
entry).  The stream is still reported, with its status when the status was
sent literally or static-indexed (``:status: 200`` is static entry 8).
"""

from __future__ import annotations

import collections
import re
from typing import Iterable

import hpack
from hpack.exceptions import HPACKDecodingError, InvalidTableIndex
from hpack.hpack import decode_integer
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from deetune.decoders import grpc
from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable
from deetune.decoders.http import HttpDecoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 section 6) and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
FRAME_HEADER_BYTES = 9
#: Flags each frame type defines; a frame with others is not taken as the start of a stream of frames.
_DEFINED_FLAGS = {
    DATA: END_STREAM | PADDED, HEADERS: END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG, PRIORITY: 0,
    RST_STREAM: 0, SETTINGS: ACK, PUSH_PROMISE: END_HEADERS | PADDED, PING: ACK, GOAWAY: 0, WINDOW_UPDATE: 0,
    CONTINUATION: END_HEADERS,
}  # fmt: skip
_CONNECTION_FRAMES = (SETTINGS, PING, GOAWAY)
_FIXED_LENGTHS = {PRIORITY: 5, RST_STREAM: 4, PING: 8, WINDOW_UPDATE: 4}
ERROR_CODES = {
    0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR", 4: "SETTINGS_TIMEOUT",
    5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR", 7: "REFUSED_STREAM", 8: "CANCEL", 9: "COMPRESSION_ERROR",
    10: "CONNECT_ERROR", 11: "ENHANCE_YOUR_CALM", 12: "INADEQUATE_SECURITY", 13: "HTTP_1_1_REQUIRED",
}  # fmt: skip

#: Largest header block kept (HEADERS or PUSH_PROMISE with its CONTINUATIONs); beyond, it is lost.
MAX_HEADER_BLOCK = 256 * 1024
#: Largest HTTP/1.1 head of an upgrade request or its response.
MAX_H1_HEAD = 64 * 1024
#: Streams followed at once per connection; the oldest is reported incomplete beyond.
MAX_STREAMS = 4096
#: Chunks in a row in which a direction that lost the framing finds no frame to take up at.
MAX_LOST_CHUNKS = 256
#: Stream ids finished recently: a straggling frame of theirs opens no new stream.
_RECENT_FINISHED = 256

#: A header name or value from a dynamic table entry inserted before the decoder joined.
UNKNOWN = b"\x00unknown"
_UNKNOWN_ENTRY = (UNKNOWN, UNKNOWN)

_H1_UPGRADE = re.compile(rb"\r\nupgrade:[ \t]*h2c[ \t]*\r\n", re.IGNORECASE)
_H1_METHOD = re.compile(rb"[A-Z]{3,10} \S+ HTTP/1\.1\r\n")
_H1_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_H1_HOST = re.compile(rb"\r\nhost:[ \t]*([^\r\n]*)", re.IGNORECASE)

# Parser states of one direction.
_START = 0  # nothing seen yet
_PREFACE = 1  # within the client's connection preface
_HEAD = 2  # within a frame header
_PAYLOAD = 3  # within a frame's payload
_LOST = 4  # a gap hid a frame header: waiting for a chunk that starts with frames
_H1 = 5  # the HTTP/1.1 upgrade request, or its response
_H1_BODY = 6  # the upgrade request's body (Content-Length)


class _Table(HeaderTable):
    """hpack's header table, which after joining mid-connection (``partial``) answers an
    index past the entries it saw inserted with :data:`UNKNOWN` instead of an error."""

    partial = False

    def get_by_index(self, index: int) -> tuple[bytes, bytes]:
        try:
            return super().get_by_index(index)
        except InvalidTableIndex:
            if self.partial and index > HeaderTable.STATIC_TABLE_LENGTH:
                return _UNKNOWN_ENTRY
            raise


class _Hpack:
    """One direction's HPACK decoding context: hpack's header table (static table, insertions,
    eviction) and Huffman code, driven by a loop of our own (hpack's Decoder logs every field
    it decodes, which took a third of the decoder's time)."""

    def __init__(self) -> None:
        self.header_table = _Table()

    def forget(self) -> None:
        """Header blocks went by unseen: entries were inserted that we do not know, so every
        index into the dynamic table is unknown until new insertions are seen."""
        table = self.header_table
        table.dynamic_entries.clear()
        table._current_size = 0
        table.partial = True

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The header fields of one complete header block (RFC 7541 section 6)."""
        table = self.header_table
        get = table.get_by_index
        fields: list[tuple[bytes, bytes]] = []
        i, n = 0, len(block)
        while i < n:
            byte = block[i]
            if byte & 0x80:  # indexed field
                index = byte & 0x7F
                if index == 0x7F:
                    index, used = decode_integer(block[i:], 7)
                    i += used
                else:
                    i += 1
                fields.append(get(index))
                continue
            if byte & 0xE0 == 0x20:  # dynamic table size update
                size, used = decode_integer(block[i:], 5)
                i += used
                table.maxsize = size
                continue
            indexing = bool(byte & 0x40)  # else without indexing (0x00) or never indexed (0x10)
            prefix = 0x3F if indexing else 0x0F
            index = byte & prefix
            if index == prefix:
                index, used = decode_integer(block[i:], 6 if indexing else 4)
                i += used
            else:
                i += 1
            if index:
                name = get(index)[0]
            else:
                name, i = _string(block, i)
            value, i = _string(block, i)
            if indexing:
                table.add(name, value)
            fields.append((name, value))
        return fields


def _string(block: bytes, i: int) -> tuple[bytes, int]:
    """An HPACK string literal at ``i``: (its bytes, the position after it)."""
    if i >= len(block):
        raise HPACKDecodingError("truncated header block")
    huffman = block[i] & 0x80
    length = block[i] & 0x7F
    if length == 0x7F:
        length, used = decode_integer(block[i:], 7)
        i += used
    else:
        i += 1
    end = i + length
    if end > len(block):
        raise HPACKDecodingError("truncated header block")
    raw = block[i:end]
    return (decode_huffman(raw) if huffman else raw), end


class _Stream:
    __slots__ = (
        "id", "method", "path", "authority", "scheme", "traceparent", "status", "grpc_status", "grpc_message",
        "content_type", "unknown", "request_seen", "pushed", "first_ns", "request_start_ns", "request_end_ns",
        "last_request_ns", "response_start_ns", "response_end_ns", "request_bytes", "response_bytes",
        "request_body", "response_body", "request_done", "response_done", "final", "error", "request_msgs",
        "response_msgs", "upgraded", "gap",
    )  # fmt: skip

    def __init__(self, stream_id: int, ts: int) -> None:
        self.id = stream_id
        self.method = self.path = self.authority = self.scheme = self.traceparent = None
        self.status: int | None = None
        self.grpc_status: int | None = None
        self.grpc_message: bytes | None = None
        self.content_type: bytes | None = None
        self.unknown = 0  # header fields whose name or value is unknown
        self.request_seen = False  # the request's HEADERS were decoded
        self.pushed = False
        self.upgraded = False
        self.first_ns = ts
        self.request_start_ns: int | None = None
        self.request_end_ns: int | None = None
        self.last_request_ns: int | None = None
        self.response_start_ns: int | None = None
        self.response_end_ns: int | None = None
        self.request_bytes = self.response_bytes = 0
        self.request_body = self.response_body = 0
        self.request_done = self.response_done = False
        self.final = False  # the final (non-1xx) response headers were seen
        self.error: str | None = None
        self.request_msgs: grpc.MessageCounter | None = None
        self.response_msgs: grpc.MessageCounter | None = None
        #: Frames went by unseen while the stream was open (a capture gap hid a frame header):
        #: its byte and message counts are lower bounds.
        self.gap = False

    @property
    def grpc(self) -> bool:
        return grpc.is_grpc(self.content_type)

    def to_exchange(self, incomplete: bool = False) -> Exchange:
        is_grpc = self.grpc
        path = _text(self.path)
        attributes: dict = {"version": "2", "stream_id": self.id}
        if self.authority is not None:
            attributes["host"] = _text(self.authority)
        if self.traceparent is not None:
            attributes["traceparent"] = _text(self.traceparent)
        attributes["request_body_bytes"] = self.request_body
        attributes["response_body_bytes"] = self.response_body
        if self.unknown:
            attributes["headers_unknown"] = self.unknown
        if not self.request_seen:
            attributes["request_headers_seen"] = False
        if self.pushed:
            attributes["pushed"] = True
        if self.upgraded:
            attributes["upgrade"] = "h2c"
        if incomplete or not (self.request_done and self.response_done):
            attributes["incomplete"] = True
        if self.gap:
            attributes["bytes_exact"] = False
        status: int | str | None = self.status
        error = self.error is not None
        message = self.error
        if is_grpc:
            protocol = "grpc"
            service, method = grpc.split_path(path)
            attributes["grpc_service"] = service
            attributes["grpc_method"] = method
            attributes["http_status"] = self.status
            requests = self.request_msgs.count if self.request_msgs else 0
            responses = self.response_msgs.count if self.response_msgs else 0
            attributes["request_messages"] = requests
            attributes["response_messages"] = responses
            attributes["streaming"] = grpc.streaming(requests, responses)
            if self.gap or (self.request_msgs and not self.request_msgs.exact) or \
                    (self.response_msgs and not self.response_msgs.exact):
                attributes["messages_exact"] = False
            if self.grpc_status is not None:
                attributes["grpc_status"] = self.grpc_status
                status = grpc.status_name(self.grpc_status)
                if self.grpc_status != 0:
                    error = True
                    if self.grpc_message:
                        message = grpc.message_text(self.grpc_message)
                    elif message is None:
                        message = status
            elif self.status is not None:
                status = None  # no trailers: the call's outcome is not known
                if self.status != 200:
                    error = True
                    message = message or f"HTTP status {self.status}"
        else:
            protocol = "http2"
            if self.status is not None and self.status >= 500:
                error = True
        request_end = self.request_end_ns if self.request_end_ns is not None else (self.last_request_ns or self.first_ns)
        # Latency runs from the request's END_STREAM to the first response HEADERS: not defined when
        # the response began before the request ended (bidirectional streaming) or either is unseen.
        response_start = self.response_start_ns
        if response_start is not None and (self.request_end_ns is None or response_start < self.request_end_ns):
            response_start = None
        return Exchange(
            protocol,
            _text(self.method) if self.method is not None else "",
            path,
            status,
            error,
            self.request_start_ns if self.request_start_ns is not None else self.first_ns,
            request_end,
            response_start,
            self.response_end_ns,
            self.request_bytes,
            self.response_bytes,
            message,
            attributes,
        )


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", "replace")


class _Side:
    """Framing state of one direction, and its HPACK context."""

    __slots__ = ("request", "state", "head", "ftype", "flags", "stream", "length", "got", "payload", "holes",
                 "hpack", "block", "block_stream", "block_kind", "block_flags", "block_promised", "block_lost",
                 "block_ts", "pad", "lost_chunks", "h1", "h1_remaining", "fresh")  # fmt: skip

    def __init__(self, request: bool) -> None:
        self.request = request
        self.state = _START
        self.head = b""
        self.ftype = self.flags = self.stream = self.length = self.got = 0
        self.payload: bytearray | None = None  # the payload of a frame we keep (not DATA)
        self.holes = False  # part of the current frame's payload was not captured
        self.hpack = _Hpack()
        self.block: bytearray | None = None  # a header block waiting for its CONTINUATIONs
        self.block_stream = self.block_kind = self.block_flags = self.block_promised = 0
        self.block_lost = False
        self.block_ts = 0
        self.pad = -1  # the current DATA frame's pad length; -1: not read yet
        self.lost_chunks = 0
        self.h1 = bytearray()  # an HTTP/1.1 head being gathered
        self.h1_remaining = 0
        self.fresh = False  # seen from the connection's first byte


def plausible_frames(data: bytes, direction: Direction | None = None) -> bool:
    """Whether ``data`` starts with HTTP/2 frames: at least one whole frame, every frame
    header consistent (a type we know, its defined flags only, the right kind of stream,
    its fixed length), ending exactly at the end of ``data`` or followed by a frame that
    runs past it (a capture cut or a write split mid-frame).  A TLS record never passes:
    its header read as a frame's is longer than any chunk.  With a
    ``direction``, a header block that opens with a static-indexed pseudo-header of the
    other direction (``:method`` in a response, ``:status`` in a request) says no."""
    n = len(data)
    pos = 0
    frames = 0
    while pos + FRAME_HEADER_BYTES <= n:
        length = int.from_bytes(data[pos:pos + 3], "big")
        ftype = data[pos + 3]
        flags = data[pos + 4]
        stream = int.from_bytes(data[pos + 5:pos + 9], "big")
        defined = _DEFINED_FLAGS.get(ftype)
        if defined is None or flags & ~defined or stream & 0x80000000:
            return False
        if (ftype in _CONNECTION_FRAMES) != (stream == 0) and ftype != WINDOW_UPDATE:
            return False
        fixed = _FIXED_LENGTHS.get(ftype)
        if (fixed is not None and length != fixed) or (ftype == SETTINGS and length % 6):
            return False
        if ftype == SETTINGS and flags & ACK and length:
            return False
        end = pos + FRAME_HEADER_BYTES + length
        if direction is not None and ftype == HEADERS and end <= n:
            first = pos + FRAME_HEADER_BYTES + (1 if flags & PADDED else 0) + (5 if flags & PRIORITY_FLAG else 0)
            if first < end:
                byte = data[first]
                if direction is Direction.REQUEST and 0x88 <= byte <= 0x8E:
                    return False  # :status
                if direction is Direction.RESPONSE and 0x82 <= byte <= 0x87:
                    return False  # :method, :path, :scheme
        if direction is Direction.REQUEST and ftype == PUSH_PROMISE:
            return False
        if end > n:
            return frames >= 1
        frames += 1
        pos = end
    return frames > 0 and pos == n


def _h1_upgrade_request(data: bytes) -> bool:
    head_end = data.find(b"\r\n\r\n")
    head = data if head_end < 0 else data[:head_end + 2]
    return _H1_METHOD.match(head) is not None and _H1_UPGRADE.search(head) is not None


class Http2Decoder(Decoder):
    """HTTP/2 streams (and gRPC calls) of one connection."""

    protocol = "http2"
    #: h2c is served where HTTP/1.1 is; asked before the HTTP/1 decoder (see ``detect``).
    default_ports = (80, 8080, 8000)
    detect_order = -1

    def __init__(self, trust_syscall_boundaries: bool = False) -> None:
        self._trust_boundaries = trust_syscall_boundaries
        self._request = _Side(True)
        self._response = _Side(False)
        self._streams: collections.OrderedDict[int, _Stream] = collections.OrderedDict()
        self._finished: collections.deque[int] = collections.deque(maxlen=_RECENT_FINISHED)
        self._out: list[Exchange] = []
        #: The chunks of an upgrade in progress, for the HTTP/1 decoder should the server decline it.
        self._h1_chunks: list[Chunk] | None = None
        self._h1_bytes = 0
        self._delegate: HttpDecoder | None = None
        self._goaway: str | None = None

    @property
    def multiplexed(self) -> bool:
        """Streams interleave on the connection: an exchange owns no contiguous run of its bytes
        (so a recording keeps no payload for it).  Not so once a declined upgrade left HTTP/1.1."""
        return self._delegate is None

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        if direction is Direction.REQUEST:
            if len(data) >= 14 and PREFACE.startswith(data[:24]):
                return True
            if data[:1].isalpha():
                return _h1_upgrade_request(data)
        return plausible_frames(data, direction)

    # -- feeding ----------------------------------------------------------------------------
    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        if self._delegate is not None:
            return self._delegate.feed(chunk)
        request = chunk.direction is Direction.REQUEST
        side = self._request if request else self._response
        data = chunk.data
        ts = chunk.ts_ns
        missing = chunk.size - len(data)
        if side.state == _START:
            self._start(side, data)
        if self._h1_chunks is not None:
            self._h1_chunks.append(chunk)
            self._h1_bytes += len(chunk.data)
            if self._h1_bytes > MAX_H1_HEAD * 4:
                raise Undecodable("HTTP/1.1 upgrade to h2c: no answer within 256 KiB")
        if side.state == _LOST:
            if data and plausible_frames(data):
                side.state = _HEAD
                side.head = b""
                side.lost_chunks = 0
                side.hpack.forget()
                side.block = None
            else:
                side.lost_chunks += 1
                if side.lost_chunks > MAX_LOST_CHUNKS:
                    raise Undecodable(f"no HTTP/2 frame found in {MAX_LOST_CHUNKS} chunks after a capture gap")
                return self._take()
        pos = 0
        n = len(data)
        while pos < n and self._delegate is None:
            state = side.state
            if state == _PAYLOAD:
                pos = self._payload(side, data, pos, ts)
            elif state == _HEAD:
                pos = self._frame_head(side, data, pos, ts)
            elif state == _PREFACE:
                pos = self._preface(side, data, pos)
            elif state == _H1 or state == _H1_BODY:
                pos = self._h1(side, data, pos, ts)
            else:  # _LOST, from a malformed frame header
                break
        if self._delegate is not None:
            return self._take()
        if missing > 0:
            self._skip(side, missing, ts)
        return self._take()

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        if self._delegate is not None:
            return self._delegate.close(ts_ns)
        for stream in list(self._streams.values()):
            if stream.error is None and self._goaway is not None:
                stream.error = self._goaway
            self._finish(stream, incomplete=True)
        return self._take()

    def _take(self) -> list[Exchange]:
        out, self._out = self._out, []
        return out

    def _start(self, side: _Side, data: bytes) -> None:
        """The first bytes of a direction: the preface, an upgrade, or frames of a connection joined late."""
        if side.request:
            if data and (PREFACE.startswith(data[:24]) or data.startswith(PREFACE[:14])):
                side.state = _PREFACE
                side.fresh = True
            elif data[:1].isalpha() and _h1_upgrade_request(data):
                side.state = _H1
                side.fresh = True
                self._h1_chunks = []
                self._h1_bytes = 0
            else:
                side.state = _HEAD
                side.hpack.header_table.partial = True
        elif self._request.state in (_H1, _H1_BODY) or (self._request.fresh and self._h1_chunks is not None):
            side.state = _H1
            side.fresh = True
        else:
            side.state = _HEAD
            # Whether the connection was seen from its start is known from the request side;
            # the server may write its SETTINGS before reading the preface (see _decode_block).

    def _preface(self, side: _Side, data: bytes, pos: int) -> int:
        have = len(side.head)
        want = PREFACE[have:]
        piece = data[pos:pos + len(want)]
        if not want.startswith(piece):
            raise Undecodable("not the HTTP/2 connection preface")
        side.head += piece
        if len(side.head) == len(PREFACE):
            side.head = b""
            side.state = _HEAD
        return pos + len(piece)

    # -- frames -----------------------------------------------------------------------------
    def _frame_head(self, side: _Side, data: bytes, pos: int, ts: int) -> int:
        need = FRAME_HEADER_BYTES - len(side.head)
        if need == FRAME_HEADER_BYTES and len(data) - pos >= FRAME_HEADER_BYTES:
            head = data[pos:pos + FRAME_HEADER_BYTES]
        else:
            side.head += data[pos:pos + need]
            if len(side.head) < FRAME_HEADER_BYTES:
                return len(data)
            head = side.head
        pos += need
        side.head = b""
        length = int.from_bytes(head[:3], "big")
        ftype = head[3]
        flags = head[4]
        stream_id = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        fixed = _FIXED_LENGTHS.get(ftype)
        if (fixed is not None and length != fixed) or ((ftype in _CONNECTION_FRAMES) != (stream_id == 0)
                                                       and ftype <= CONTINUATION and ftype != WINDOW_UPDATE):
            # Not a frame header after all: the framing was lost where we could not see it.
            self._lose(side)
            return len(data)
        if side.block is not None and ftype != CONTINUATION:
            side.block_lost = True  # a header block must be followed by its CONTINUATIONs
            self._decode_block(side, ts)
        side.ftype, side.flags, side.stream, side.length = ftype, flags, stream_id, length
        side.got = 0
        side.holes = False
        side.pad = -1
        side.payload = bytearray() if ftype != DATA else None
        self._frame_started(side, ts)
        side.state = _PAYLOAD
        if length == 0:
            self._frame_done(side, ts)
        return pos

    def _payload(self, side: _Side, data: bytes, pos: int, ts: int) -> int:
        take = min(side.length - side.got, len(data) - pos)
        if side.payload is not None:
            if len(side.payload) + take <= MAX_HEADER_BLOCK:
                side.payload += data[pos:pos + take]
            else:
                side.holes = True
        else:
            self._data_bytes(side, data[pos:pos + take], side.got)
        side.got += take
        pos += take
        if side.got == side.length:
            self._frame_done(side, ts)
        return pos

    def _skip(self, side: _Side, missing: int, ts: int) -> None:
        """``missing`` bytes went by uncaptured (the kernel copied only a prefix of the call)."""
        while missing > 0:
            if side.state == _PAYLOAD:
                take = min(side.length - side.got, missing)
                if side.payload is None:
                    self._data_missing(side, take, side.got)
                side.holes = True
                side.got += take
                missing -= take
                if side.got == side.length:
                    self._frame_done(side, ts)
            elif side.state in (_HEAD, _PREFACE, _H1, _H1_BODY):
                self._lose(side)  # the next frame header is in the gap
                return
            else:
                return

    def _lose(self, side: _Side) -> None:
        """The framing of this direction is lost: frames of any open stream may go by unseen."""
        side.state = _LOST
        side.lost_chunks = 0
        for stream in self._streams.values():
            stream.gap = True

    def _frame_started(self, side: _Side, ts: int) -> None:
        if side.ftype != HEADERS:
            return
        stream = self._streams.get(side.stream) or self._open(side.stream, ts)
        if stream is None:
            return
        if side.request:
            if stream.request_start_ns is None:
                stream.request_start_ns = ts
        elif stream.response_start_ns is None:
            stream.response_start_ns = ts

    def _frame_done(self, side: _Side, ts: int) -> None:
        side.state = _HEAD
        ftype = side.ftype
        size = FRAME_HEADER_BYTES + side.length
        if ftype == DATA:
            stream = self._streams.get(side.stream)
            if stream is not None:
                self._count(stream, side, size, ts)
                if side.flags & END_STREAM:
                    self._half_done(stream, side.request, ts)
        elif ftype == HEADERS or ftype == PUSH_PROMISE:
            payload = side.payload
            start = 0
            end = len(payload)
            lost = side.holes
            if side.flags & PADDED:
                pad = payload[0] if payload else 0
                start = 1
                end = side.length - pad
                lost = lost or not payload
            if ftype == HEADERS and side.flags & PRIORITY_FLAG:
                start += 5
            promised = 0
            if ftype == PUSH_PROMISE:
                promised = int.from_bytes(payload[start:start + 4], "big") & 0x7FFFFFFF
                start += 4
            side.block = bytearray(payload[start:max(start, min(end, len(payload)))])
            side.block_stream = side.stream
            side.block_kind = ftype
            side.block_flags = side.flags
            side.block_promised = promised
            side.block_lost = lost or end < start
            side.block_ts = ts
            stream = self._streams.get(side.stream)
            if stream is not None:
                self._count(stream, side, size, ts)
            if side.flags & END_HEADERS:
                self._decode_block(side, ts)
        elif ftype == CONTINUATION:
            stream = self._streams.get(side.stream)
            if stream is not None:
                self._count(stream, side, size, ts)
            if side.block is None or side.block_stream != side.stream:
                return  # its HEADERS was not seen
            if side.holes or len(side.block) + len(side.payload) > MAX_HEADER_BLOCK:
                side.block_lost = True
            else:
                side.block += side.payload
            side.block_ts = ts
            if side.flags & END_HEADERS:
                self._decode_block(side, ts)
        elif ftype == RST_STREAM:
            stream = self._streams.get(side.stream)
            if stream is not None and not side.holes:
                code = int.from_bytes(side.payload[:4], "big")
                by = "client" if side.request else "server"
                if code != 0 or not (stream.response_done or side.request):
                    stream.error = f"RST_STREAM {ERROR_CODES.get(code, code)} from the {by}"
                if not side.request:
                    stream.response_end_ns = ts
                self._finish(stream)
        elif ftype == GOAWAY and not side.holes and len(side.payload) >= 8:
            last = int.from_bytes(side.payload[:4], "big") & 0x7FFFFFFF
            code = int.from_bytes(side.payload[4:8], "big")
            name = ERROR_CODES.get(code, str(code))
            # Streams the receiver opened above ``last`` were not processed: clients open odd ones.
            parity = 1 if not side.request else 0
            for stream in list(self._streams.values()):
                if stream.id > last and stream.id % 2 == parity:
                    stream.error = f"GOAWAY {name}: not processed"
                    self._finish(stream)
            if code != 0:
                self._goaway = f"GOAWAY {name}"
        side.payload = None

    def _count(self, stream: _Stream, side: _Side, size: int, ts: int) -> None:
        if side.request:
            stream.request_bytes += size
            stream.last_request_ns = ts
            if side.ftype == DATA:
                stream.request_body += side.length - (max(side.pad, 0) + 1 if side.flags & PADDED else 0)
        else:
            stream.response_bytes += size
            if side.ftype == DATA:
                stream.response_body += side.length - (max(side.pad, 0) + 1 if side.flags & PADDED else 0)

    # -- DATA, counted as it passes ---------------------------------------------------------
    def _messages(self, side: _Side) -> grpc.MessageCounter | None:
        stream = self._streams.get(side.stream)
        if stream is None or not stream.grpc:
            return None
        if side.request:
            if stream.request_msgs is None:
                stream.request_msgs = grpc.MessageCounter()
                if not stream.request_seen:
                    stream.request_msgs.exact = False  # joined within the call
            return stream.request_msgs
        if stream.response_msgs is None:
            stream.response_msgs = grpc.MessageCounter()
            if not stream.final:
                stream.response_msgs.exact = False
        return stream.response_msgs

    def _data_span(self, side: _Side, offset: int, n: int) -> tuple[int, int]:
        """The part of payload bytes [offset, offset+n) that is data, not padding: (start, end)."""
        start, end = offset, offset + n
        if side.flags & PADDED:
            start = max(start, 1)
            end = min(end, side.length - max(side.pad, 0))
        return start, end

    def _data_bytes(self, side: _Side, piece: bytes, offset: int) -> None:
        if side.flags & PADDED and offset == 0 and piece:
            side.pad = piece[0]
        counter = self._messages(side)
        if counter is None:
            return
        if side.flags & PADDED and side.pad < 0:
            counter.exact = False
            return
        start, end = self._data_span(side, offset, len(piece))
        if end > start:
            counter.feed(piece[start - offset:end - offset])

    def _data_missing(self, side: _Side, n: int, offset: int) -> None:
        counter = self._messages(side)
        if counter is None:
            return
        if side.flags & PADDED and side.pad < 0:
            counter.exact = False
            return
        start, end = self._data_span(side, offset, n)
        if end > start:
            counter.skip(end - start)

    # -- header blocks ----------------------------------------------------------------------
    def _decode_block(self, side: _Side, ts: int) -> None:
        block = side.block
        side.block = None
        if block is None:
            return
        table = side.hpack.header_table
        if not side.request and not table.partial and not side.fresh:
            # The first response header block: fresh when the request side began at the preface.
            side.fresh = self._request.fresh
            table.partial = not side.fresh
        headers = None
        if not side.block_lost:
            try:
                headers = side.hpack.decode(bytes(block))
            except (hpack.HPACKError, IndexError, ValueError):
                headers = None
        if headers is None:
            side.hpack.forget()  # insertions of the lost block are unknown
        kind = side.block_kind
        stream_id = side.block_promised if kind == PUSH_PROMISE else side.block_stream
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._open(stream_id, side.block_ts)
            if stream is None:
                return
        if kind == PUSH_PROMISE:
            stream.pushed = True
            stream.request_start_ns = stream.request_end_ns = side.block_ts
            stream.request_done = True
            self._request_headers(stream, headers)
            return
        if side.request:
            if not stream.request_seen:
                self._request_headers(stream, headers)
            if side.block_flags & END_STREAM:
                self._half_done(stream, True, ts)
            return
        if stream.response_start_ns is None:
            stream.response_start_ns = side.block_ts
        self._response_headers(stream, headers)
        if side.block_flags & END_STREAM:
            self._half_done(stream, False, ts)

    def _request_headers(self, stream: _Stream, headers) -> None:
        stream.request_seen = headers is not None
        if headers is None:
            stream.unknown += 1  # the whole block
            return
        for name, value in headers:
            if name == UNKNOWN or value == UNKNOWN:
                stream.unknown += 1
                continue
            if name == b":method":
                stream.method = value
            elif name == b":path":
                stream.path = value
            elif name == b":authority":
                stream.authority = value
            elif name == b":scheme":
                stream.scheme = value
            elif name == b"content-type":
                stream.content_type = value
            elif name == b"traceparent":
                stream.traceparent = value
            elif name == b"host" and stream.authority is None:
                stream.authority = value

    def _response_headers(self, stream: _Stream, headers) -> None:
        if headers is None:
            stream.unknown += 1
            return
        for name, value in headers:
            if name == UNKNOWN or value == UNKNOWN:
                stream.unknown += 1
                continue
            if name == b":status":
                try:
                    status = int(value)
                except ValueError:
                    continue
                if status >= 200 or status == 101:
                    stream.status = status
                    stream.final = True
            elif name == b"grpc-status":
                try:
                    stream.grpc_status = int(value)
                except ValueError:
                    pass
            elif name == b"grpc-message":
                stream.grpc_message = value
            elif name == b"content-type" and stream.content_type is None:
                stream.content_type = value

    # -- streams ----------------------------------------------------------------------------
    def _open(self, stream_id: int, ts: int) -> _Stream | None:
        if stream_id == 0 or stream_id in self._finished:
            return None
        stream = self._streams[stream_id] = _Stream(stream_id, ts)
        if len(self._streams) > MAX_STREAMS:
            oldest = next(iter(self._streams.values()))
            self._finish(oldest, incomplete=True)
        return stream

    def _half_done(self, stream: _Stream, request: bool, ts: int) -> None:
        if request:
            stream.request_done = True
            stream.request_end_ns = ts
            stream.last_request_ns = ts
        else:
            stream.response_done = True
            stream.response_end_ns = ts
        # A response that ended ends the exchange, even when the client had more to send.
        if stream.response_done:
            self._finish(stream)

    def _finish(self, stream: _Stream, incomplete: bool = False) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        self._finished.append(stream.id)
        if stream.request_start_ns is None and stream.status is None and stream.grpc_status is None \
                and stream.error is None and not stream.unknown:
            return  # only DATA of a stream that began before we joined: nothing to report
        self._out.append(stream.to_exchange(incomplete))

    # -- HTTP/1.1 upgrade -------------------------------------------------------------------
    def _h1(self, side: _Side, data: bytes, pos: int, ts: int) -> int:
        if side.state == _H1_BODY:
            take = min(side.h1_remaining, len(data) - pos)
            side.h1_remaining -= take
            stream = self._streams.get(1)
            if stream is not None:
                stream.request_bytes += take
                stream.request_body += take
            if side.h1_remaining == 0:
                self._h1_request_done(side, ts)
            return pos + take
        start = len(side.h1)
        side.h1 += data[pos:pos + MAX_H1_HEAD]
        end = side.h1.find(b"\r\n\r\n", max(0, start - 3))
        if end < 0:
            if len(side.h1) > MAX_H1_HEAD:
                raise Undecodable("HTTP/1.1 head over 64 KiB")
            return len(data)
        head = bytes(side.h1[:end + 4])
        used = len(head) - start
        side.h1 = bytearray()
        if side.request:
            first = head.split(b"\r\n", 1)[0].split(b" ")
            stream = self._open(1, ts)
            assert stream is not None
            stream.upgraded = True
            stream.request_seen = True
            stream.request_start_ns = ts
            stream.method, stream.path = first[0], first[1]
            host = _H1_HOST.search(head)
            stream.authority = host.group(1).strip() if host else None
            stream.scheme = b"http"
            stream.request_bytes = len(head)
            length = _H1_LENGTH.search(head)
            side.h1_remaining = int(length.group(1)) if length else 0
            if side.h1_remaining:
                side.state = _H1_BODY
            else:
                self._h1_request_done(side, ts)
            return pos + used
        if head.startswith((b"HTTP/1.1 101", b"HTTP/1.0 101")):
            side.state = _HEAD
            self._h1_chunks = None
            return pos + used
        # The server declined the upgrade: an HTTP/1.1 connection.
        self._delegate = HttpDecoder(trust_syscall_boundaries=self._trust_boundaries)
        chunks, self._h1_chunks = self._h1_chunks or [], None
        self._streams.clear()
        for held in chunks:
            self._out.extend(self._delegate.feed(held))
        return len(data)

    def _h1_request_done(self, side: _Side, ts: int) -> None:
        stream = self._streams.get(1)
        if stream is not None:
            stream.request_done = True
            stream.request_end_ns = stream.last_request_ns = ts
        side.state = _PREFACE
        side.head = b""


__all__ = ["Http2Decoder", "PREFACE", "UNKNOWN", "plausible_frames"]
