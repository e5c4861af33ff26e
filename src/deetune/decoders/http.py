"""HTTP/1.x (and 0.9) decoder.

Both directions go through the same framing state machine: a head (start line
and headers), then a body framed by Content-Length, by the chunked transfer
coding, or by the end of the connection.  Requests queue in order and
responses pair with them first in, first out (keep-alive and pipelining); an
exchange is emitted once both halves are complete.

The decoder runs once per syscall, so the common path is kept short: the end
of a head is found with ``bytes.find``, header values are looked up in one
lower-cased copy of the head instead of splitting every line, and bodies are
skipped by counting, never buffered.  Only an unfinished head or chunk-size
line is buffered (at most 64 KiB).

Tolerance: what widely used servers accept is decoded, and every departure
from RFC 9112 is listed in the exchange's ``anomalies`` attribute rather than
being a reason to stop (its section 2.2 robustness advice: bare LF line ends,
empty lines before a message; besides, request lines with two or four tokens,
lower-case versions, HTTP/0.9, obsolete line folding, a space before a header's
colon, Content-Length with leading zeros, ``chunked`` not the last coding).  A
message whose body framing cannot be read (a negative or absurd length, an
unknown transfer coding) is reported as ``incomplete`` and the decoder looks
for the next message.

Losing the framing: captures that keep only a prefix of a call, or miss calls
(sampling, lost records), leave gaps.  A gap inside a body of declared length
is skipped by counting.  A gap that hides framing ends the message it cut (as
``incomplete``) and the decoder looks for the next message start (a start line
at the beginning of a chunk or of a line), skipping what comes before it.  The
number of messages the gap held is unknown, so pairing goes on safely:

* a lost stretch of *requests* puts a barrier in the queue: responses after the
  requests seen before it are skipped (they answer requests not seen) until a
  response starts after the end of a request queued behind the barrier;
* a lost stretch of *responses* reports the requests still waiting as answered
  by nothing (``gap``) and puts the same barrier in the queue.

An unsolicited response (no request waiting) is framed, counted and skipped.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Iterable

import attrs

from deetune.decoders._barrier import past_barrier
from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable
from deetune.events import positional_builder

#: Largest head (start line and headers) or trailer line buffered; longer means we lost the framing.
MAX_HEAD_BYTES = 64 * 1024
#: Largest chunk-size line (with its extensions) buffered.
MAX_CHUNK_LINE_BYTES = 4 * 1024
#: Requests waiting for a response; more means the responses are not reaching us: they are
#: reported unanswered (counted as ``pending_limit``) and later responses skipped.
MAX_PENDING = 1024
#: Bytes skipped in a row while looking for a message start before the stream is deemed not HTTP.
MAX_SEEK_BYTES = 1 << 20

_KNOWN_METHODS = {
    name.encode(): name
    for name in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE")
}
#: Bytes allowed in extension methods (PROPFIND, VERSION-CONTROL …) met after detection.
_METHOD_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_"
_MAX_METHOD_LEN = 32
_VERSIONS = {b"HTTP/1.1": "1.1", b"HTTP/1.0": "1.0"}
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_STATUS_CODES = {str(code).encode(): code for code in range(100, 1000)}
_REASONS = {
    reason.encode(): reason
    for reason in ("OK", "Created", "Accepted", "No Content", "Continue", "Switching Protocols", "Found",
                   "Moved Permanently", "Not Modified", "Bad Request", "Unauthorized", "Forbidden",
                   "Not Found", "Internal Server Error", "Bad Gateway", "Service Unavailable")
}  # fmt: skip
#: Where a message may start when the framing was lost: a known method and a space, or a status line.
_REQUEST_START = re.compile(rb"(?:GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT|TRACE) [^\r\n ]")
_RESPONSE_START = re.compile(rb"[Hh][Tt][Tt][Pp]/1\.[0-9] [0-9]{3}[ \r\n]")
_REQUEST_START_AFTER_LF = re.compile(rb"\n(?=(?:GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH|CONNECT|TRACE) [^\r\n ])")
_RESPONSE_START_AFTER_LF = re.compile(rb"\n(?=[Hh][Tt][Tt][Pp]/1\.[0-9] [0-9]{3}[ \r\n])")
#: Bytes kept from the end of a chunk while seeking: a start line may straddle two chunks.
_SEEK_CARRY = 16

# Parser states of one direction.
_HEAD = 0  # start line and headers
_BODY = 1  # Content-Length body: `remaining` bytes left
_CHUNK_SIZE = 2  # chunk-size line
_CHUNK_DATA = 3  # chunk data and the CRLF after it: `remaining` bytes left
_TRAILER = 4  # trailer lines after the last chunk, up to an empty line
_UNTIL_CLOSE = 5  # body that ends when the connection closes
_TUNNEL = 6  # after CONNECT or 101 Switching Protocols: no longer HTTP
_SEEK = 7  # framing lost: looking for the next message start
_build_exchange = positional_builder(Exchange)
assert [f.name for f in attrs.fields(Exchange)][-3:] == ["error_message", "attributes", "peer"]
#: Enum member lookups cost ~80 ns each (a descriptor); a module constant costs nothing.
_REQUEST = Direction.REQUEST
_STATE_NAMES = ("headers", "body", "chunk-size line", "chunk data", "trailers", "body", "tunnel", "lost framing")


class _Pending:
    """A request and, once it arrives, its response."""

    __slots__ = (
        "method", "target", "version", "host", "traceparent",
        "request_start_ns", "request_end_ns", "request_bytes", "request_body_bytes",
        "status", "reason", "response_start_ns", "response_end_ns", "response_bytes",
        "response_body_bytes", "response_done", "continued", "incomplete", "anomalies", "gap", "orphan",
        "eligible",
    )  # fmt: skip

    def __init__(self, method: str, target: str, version: str, host: str | None,
                 traceparent: str | None, start_ns: int) -> None:  # fmt: skip
        self.method = method
        self.target = target
        self.version = version
        self.host = host
        self.traceparent = traceparent
        self.request_start_ns = start_ns
        self.request_end_ns: int | None = None
        self.request_bytes = 0
        self.request_body_bytes: int | None = 0
        self.status: int | None = None
        self.reason: str | None = None
        self.response_start_ns: int | None = None
        self.response_end_ns: int | None = None
        self.response_bytes = 0
        self.response_body_bytes: int | None = 0
        self.response_done = False
        self.continued = False  # got 100 Continue before the final response
        self.incomplete = False  # a half was cut short by the capture or the close
        self.anomalies: list[str] | None = None
        self.gap = False  # its response was lost with the framing
        self.orphan = False  # a stand-in for the request an unsolicited response answers: never reported
        self.eligible = True  # may be paired past a barrier (see deetune.decoders._barrier)

    def to_exchange(self) -> Exchange:
        attributes = {
            "host": self.host,
            "version": self.version,
            "reason": self.reason,
            "request_body_bytes": self.request_body_bytes,
            "response_body_bytes": self.response_body_bytes,
        }
        if self.traceparent is not None:
            attributes["traceparent"] = self.traceparent
        if self.continued:
            attributes["continue"] = True
        if self.incomplete:
            attributes["incomplete"] = True
        if self.anomalies:
            attributes["anomalies"] = list(dict.fromkeys(self.anomalies))
        if self.gap:
            attributes["gap"] = True
        status = self.status
        # Positional, through the slots (deetune.events.positional_builder): this runs once per exchange.
        return _build_exchange(
            "http",  # protocol
            self.method,
            self.target,
            status,
            status is not None and status >= 500,  # error
            self.request_start_ns,
            self.request_end_ns,
            self.response_start_ns,
            self.response_end_ns,
            self.request_bytes,
            self.response_bytes,
            None,  # error_message
            attributes,
            None,  # peer
        )

    def note(self, anomaly: str) -> None:
        if self.anomalies is None:
            self.anomalies = [anomaly]
        else:
            self.anomalies.append(anomaly)


#: In the queue of unanswered requests: an unknown number of requests was lost here.
_BARRIER = _Pending("", "", "", None, None, 0)


class _Side:
    """Parser state of one direction."""

    __slots__ = ("state", "buf", "scanned", "remaining", "pending", "wire", "body", "start_ns", "last_ns",
                 "anomalies", "skipped", "carry_ns")  # fmt: skip

    def __init__(self) -> None:
        self.state = _HEAD
        self.buf = bytearray()  # unfinished head or line (or, seeking, the last bytes seen); never body bytes
        self.scanned = 0  # bytes of `buf` already searched for the end of the head
        self.remaining = 0
        self.pending: _Pending | None = None  # the exchange the current message belongs to
        self.wire = 0  # bytes of the current message so far
        self.body: int | None = 0  # body bytes of the current message; None when unknown
        self.start_ns = 0  # timestamp of the chunk holding the message's first byte
        self.last_ns = 0  # timestamp of the last chunk seen
        self.anomalies: list[str] | None = None  # departures seen before the message's head was parsed
        self.skipped = 0  # bytes skipped in a row while seeking
        self.carry_ns = 0  # timestamp of the chunk holding the seek carry


class HttpDecoder(Decoder):
    """HTTP/1.x exchanges of one connection.

    Attributes of each exchange: ``host`` (None without a Host header), ``version`` (the request's,
    ``"1.1"``), ``reason``, ``request_body_bytes`` and ``response_body_bytes`` (None when a gap hid
    the framing), plus ``traceparent`` when the request has one, ``continue`` when a 100 Continue
    preceded the final response, ``incomplete`` when the capture or the close cut a message short,
    ``anomalies`` for departures from RFC 9112 that were tolerated and ``gap`` when the response was
    lost with the framing.  Interim (1xx) responses are not part of the exchange: its response
    fields describe the final one.  An HTTP/0.9 response has no status line: its status is None.

    Counts (see :meth:`Decoder.count`): ``unsolicited_response``, ``skipped_bytes`` (looking for
    a message start), ``resync:gap`` / ``resync:garbage`` (framing lost), ``pending_limit``.
    """

    protocol = "http"
    default_ports = (80, 8080, 8000)

    def __init__(self, trust_syscall_boundaries: bool = False) -> None:
        #: Kept for compatibility: a message cut by a gap is reported as incomplete and decoding
        #: goes on at the next message either way (live chunks being whole syscalls, that is at
        #: the next chunk).
        self._trust_boundaries = trust_syscall_boundaries
        self._reset()

    def _reset(self) -> None:
        self._request = _Side()
        self._response = _Side()
        self._open: deque[_Pending] = deque()  # not yet emitted, in request order
        self._unanswered: deque[_Pending] = deque()  # final response not started yet (and barriers)

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        try:
            start = bytes(data[:16])
            if direction is Direction.RESPONSE:
                return start.startswith(b"HTTP/1.")
            method, space, _ = start.partition(b" ")
            return bool(space) and method in _KNOWN_METHODS
        except Exception:
            return False

    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        data = chunk.data
        try:
            if chunk.direction is _REQUEST:
                self._consume(self._request, data, chunk.size - len(data), chunk.ts_ns, True)
            else:
                self._consume(self._response, data, chunk.size - len(data), chunk.ts_ns, False)
        except Undecodable as exc:
            exc.exchanges[:0] = self._finished()
            raise
        except Exception as exc:  # a parsing slip must surface as Undecodable, never as a crash
            raise Undecodable(f"http: unexpected {type(exc).__name__} while parsing", exchanges=self._finished(),
                              reason="decoder_error") from exc  # fmt: skip
        open_ = self._open
        if not open_ or not open_[0].response_done or open_[0].request_end_ns is None:
            return ()
        return self._finished()

    def _finished(self) -> list[Exchange]:
        open_ = self._open
        finished = []
        while open_ and open_[0].response_done and open_[0].request_end_ns is not None:
            finished.append(open_.popleft().to_exchange())
        return finished

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        # A body ended by the close ends at the last byte seen (response_end_ns), not at ts_ns.
        # Requests first, so that a half-received request head exists before its response pairs with it.
        for side, is_request in ((self._request, True), (self._response, False)):
            try:
                self._finish_at_close(side, is_request)
            except Exception:  # leftovers too broken to report are dropped
                pass
        out = []
        for pending in self._open:
            if pending.request_end_ns is None:  # a request body cut by the close
                pending.request_end_ns = self._request.last_ns or pending.request_start_ns
                pending.incomplete = True
            out.append(pending.to_exchange())
        self._reset()
        return out

    # -- framing ---------------------------------------------------------------

    def _consume(self, side: _Side, data: bytes, gap: int, ts: int, is_request: bool) -> None:
        pos = 0
        end = len(data)
        if end:
            side.last_ns = ts
        while pos < end:
            state = side.state
            if state == _HEAD:
                if not side.buf and (data[pos] == 10 or data[pos] == 13):  # LF, CR
                    # Empty lines before a message (RFC 9112 2.2: ignore at least one).
                    stop = pos
                    while stop < end and (data[stop] == 10 or data[stop] == 13):
                        stop += 1
                    pos = stop
                    _note(side, "leading_empty_line")
                    continue
                if not is_request and not side.buf and self._simple_response(side, data, pos, ts):
                    continue
                block, pos = self._read_head(side, data, pos, ts, is_request)
                if block is not None:
                    if is_request:
                        self._request_head(side, block, ts)
                    else:
                        self._response_head(side, block, ts)
                    if side.state == _BODY and not side.remaining and side.pending is not None:
                        self._complete(side, ts, is_request)
            elif state == _BODY or state == _CHUNK_DATA:
                remaining = side.remaining
                if end - pos < remaining:
                    side.remaining = remaining - (end - pos)
                    side.wire += end - pos
                    break
                pos += remaining
                side.wire += remaining
                side.remaining = 0
                if state == _BODY:
                    self._complete(side, ts, is_request)
                else:
                    # The CRLF closing chunk data is counted blindly (it may fall in a gap); check it when seen.
                    if remaining >= 2 and data[pos - 2 : pos] != b"\r\n":
                        if data[pos - 1] == 10:  # bare LF: the chunk ended a byte early
                            pos -= 1
                            side.wire -= 1
                            side.pending.note("bare_lf")
                        else:
                            self._unframed(side, ts, is_request, "chunk_not_followed_by_crlf")
                            continue
                    side.state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                line, stop = _read_line(side, data, pos, MAX_CHUNK_LINE_BYTES)
                if line is None:
                    if stop < 0:  # the line is too long
                        self._unframed(side, ts, is_request, "bad_chunk_size")
                        continue
                    break
                pos = stop
                size = _chunk_size(line)
                if size is None:
                    if not line.strip():  # an empty line where a size belongs: tolerate it
                        side.pending.note("empty_chunk_size_line")
                        continue
                    self._unframed(side, ts, is_request, "bad_chunk_size")
                elif size:
                    side.state = _CHUNK_DATA
                    side.remaining = size + 2
                    side.body += size
                else:
                    side.state = _TRAILER
            elif state == _TRAILER:
                line, stop = _read_line(side, data, pos, MAX_HEAD_BYTES)
                if line is None:
                    if stop < 0:
                        self._unframed(side, ts, is_request, "trailer_too_long")
                        continue
                    break
                pos = stop
                if not line or line == b"\r":
                    self._complete(side, ts, is_request)
            elif state == _UNTIL_CLOSE:
                side.wire += end - pos
                side.body += end - pos
                break
            elif state == _SEEK:
                pos = self._seek(side, data, pos, ts, is_request)
            else:  # _TUNNEL
                break
        if gap > 0:
            self._skip_gap(side, gap, ts, is_request)

    def _read_head(self, side: _Side, data: bytes, pos: int, ts: int, is_request: bool) -> tuple[bytes | None, int]:
        """The head starting at ``data[pos:]`` (or continuing ``side.buf``) without its blank line, and the
        position after it; ``(None, end)`` when the head continues in the next chunk."""
        buf = side.buf
        end = len(data)
        if not buf:  # first byte of a message
            side.start_ns = ts
            block_end, head_end = _find_head_end(data, pos, pos, pos + MAX_HEAD_BYTES, is_request)
            if head_end < 0:
                if end - pos > MAX_HEAD_BYTES:
                    self._lose(side, ts, is_request, "garbage")
                    return None, pos
                if not _start_ok(data[pos : pos + 40], is_request):
                    self._lose(side, ts, is_request, "garbage")
                    return None, pos
                buf += data[pos:]
                side.scanned = len(buf)
                side.wire = end - pos
                return None, end
            block = data[pos:block_end]
            side.wire = head_end - pos
            if head_end - block_end < 4:
                _note(side, "bare_lf")
            pos = head_end
        else:
            before = len(buf)
            if before + end - pos > MAX_HEAD_BYTES + 3:
                buf += data[pos : pos + MAX_HEAD_BYTES + 3 - before]
            else:
                buf += data[pos:]
            # Resume the search a few bytes back: the blank line may straddle the two chunks.
            block_end, head_end = _find_head_end(buf, 0, max(0, side.scanned - 3), len(buf), is_request)
            if head_end < 0:
                if before < 40 and not _start_ok(buf[:40], is_request):
                    buf.clear()
                    self._lose(side, ts, is_request, "garbage")
                    return None, pos
                if len(buf) > MAX_HEAD_BYTES:  # its complete lines are reported (see _lose)
                    self._lose(side, ts, is_request, "garbage")
                    return None, pos
                side.scanned = len(buf)
                side.wire += end - pos
                return None, end
            block = bytes(buf[:block_end])
            if head_end - block_end < 4:
                _note(side, "bare_lf")
            used = head_end - before
            side.wire += used
            pos += used
            buf.clear()
        return block, pos

    def _request_head(self, side: _Side, block: bytes, ts: int, partial: bool = False) -> None:
        parsed = _split_request_line(block)
        if parsed is None:
            self.count("skipped_bytes", side.wire)
            self._lose(side, ts, True, "garbage")
            return
        method, target, version, headers, anomalies = parsed
        lowered = headers.lower()
        unanswered = self._unanswered
        if len(unanswered) >= MAX_PENDING:
            # The responses are not reaching us: report what waits, skip what comes for it.
            self.count("pending_limit")
            self._clear_unanswered(gap=False)
            unanswered.append(_BARRIER)
        odd: list[str] = anomalies or []
        value = _header(headers, lowered, b"\nhost", odd)
        host = None if value is None else value.decode("utf-8", "backslashreplace")
        # A header most heads lack is looked for by `in` first (a call to _header costs more).
        value = _header(headers, lowered, b"\ntraceparent", odd) if b"\ntraceparent" in lowered else None
        traceparent = None if value is None else value.decode("utf-8", "backslashreplace")
        pending = _Pending(method, target, version, host, traceparent, side.start_ns)
        if side.anomalies:
            pending.anomalies, side.anomalies = side.anomalies, None
            if version == "0.9":  # its line end is not a head's blank line
                pending.anomalies = [a for a in pending.anomalies if a != "bare_lf"] or None
        self._open.append(pending)
        if unanswered and unanswered[0] is not _BARRIER:
            pending.eligible = False
        unanswered.append(pending)
        side.pending = pending
        if partial:
            _note_all(pending, odd)
            return
        if version == "0.9":  # a simple request: the line is all of it
            _note_all(pending, odd)
            side.state = _BODY
            side.remaining = side.body = 0
            return
        coding = _header(headers, lowered, b"\ntransfer-encoding", odd) if b"\ntransfer-encoding" in lowered else None
        length_value = _header(headers, lowered, b"\ncontent-length", odd) if b"\ncontent-length" in lowered else None
        if odd:
            _note_all(pending, odd)
        if coding is not None:
            coding = coding.lower()
            if b"chunked" in coding:
                if not coding.endswith(b"chunked"):
                    pending.note("chunked_not_last")
                if length_value is not None:
                    pending.note("transfer_encoding_and_content_length")
                side.state = _CHUNK_SIZE
                side.body = 0
                return
            # No way to tell where the body ends (a server answers 501 and closes).
            self._unframed(side, ts, True, "unknown_transfer_encoding")
            return
        side.state = _BODY
        if length_value is None:
            side.remaining = side.body = 0
            return
        length = _content_length(length_value)
        if length is None:
            self._unframed(side, ts, True, "bad_content_length")
            return
        side.remaining = side.body = length

    def _response_head(self, side: _Side, block: bytes, ts: int, partial: bool = False) -> None:
        parsed = _split_status_line(block)
        if parsed is None:
            self.count("skipped_bytes", side.wire)
            self._lose(side, ts, False, "garbage")
            return
        status, reason, headers, anomalies = parsed
        pending = self._answered_request(side, status)
        if pending is None:
            return
        if status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): the final response follows.
            if status == 100:
                pending.continued = True
            side.wire = 0
            side.anomalies = None
            return
        if not pending.orphan:
            self._unanswered.popleft()
        pending.status = status
        pending.reason = reason
        pending.response_start_ns = side.start_ns
        side.pending = pending
        if side.anomalies:
            for anomaly in side.anomalies:
                pending.note(anomaly)
            side.anomalies = None
        if anomalies:
            _note_all(pending, anomalies)
        if partial:
            return
        side.state = _BODY
        side.remaining = side.body = 0
        if status == 101 or (pending.method == "CONNECT" and status < 300):
            return  # the tunnel starts after the head; see _complete
        if pending.method == "HEAD" or status == 204 or status == 304:
            return
        lowered = headers.lower()
        odd: list[str] = []
        coding = _header(headers, lowered, b"\ntransfer-encoding", odd) if b"\ntransfer-encoding" in lowered else None
        if coding is not None:
            _note_all(pending, odd)
            coding = coding.lower()
            if b"chunked" in coding:
                if not coding.endswith(b"chunked"):
                    pending.note("chunked_not_last")
                side.state = _CHUNK_SIZE
            else:
                side.state = _UNTIL_CLOSE
            return
        length_value = _header(headers, lowered, b"\ncontent-length", odd)
        if odd:
            _note_all(pending, odd)
        if length_value is None:
            side.state = _UNTIL_CLOSE
            return
        length = _content_length(length_value)
        if length is None:
            self._unframed(side, ts, False, "bad_content_length")
            return
        side.remaining = side.body = length

    def _simple_response(self, side: _Side, data: bytes, pos: int, ts: int) -> bool:
        """An HTTP/0.9 response (the document alone, until the close) to the first waiting request."""
        unanswered = self._unanswered
        if not unanswered or unanswered[0] is _BARRIER or unanswered[0].version != "0.9":
            return False
        start = data[pos : pos + 5].upper()
        if start == b"HTTP/"[: len(start)]:
            return False
        pending = unanswered.popleft()
        pending.response_start_ns = side.start_ns = ts
        side.pending = pending
        side.state = _UNTIL_CLOSE
        side.wire = side.body = 0
        return True

    def _answered_request(self, side: _Side, status: int) -> _Pending | None:
        """The request a response head answers: the first waiting.  Behind a barrier (requests or
        responses were lost), the first of the last requests written together that ended before
        this response started; those before it lost their responses with the framing (reported
        with ``gap``), and a response that started before any of them answers a request that was
        not seen.  Unsolicited responses are framed with a stand-in (see _orphan)."""
        unanswered = self._unanswered
        if not unanswered:
            if self._request.state == _HEAD and self._request.buf and self._request.buf.rfind(b"\n") >= 0:
                # The server answers a request whose head we only partly saw (lost capture, or a 4xx to
                # an oversized head): report that request with what we saw.
                self._finish_partial(self._request, True)
        if unanswered and unanswered[0] is _BARRIER:
            for lost in past_barrier(unanswered, side.start_ns, _request_end, _eligible) or ():
                if lost is not _BARRIER:
                    lost.response_done = lost.gap = True
        if not unanswered or unanswered[0] is _BARRIER:
            if status >= 200 or status == 101:
                self.count("unsolicited_response")
            return _orphan()
        return unanswered[0]

    def _complete(self, side: _Side, ts: int, is_request: bool) -> None:
        pending = side.pending
        next_state = _HEAD
        if is_request:
            pending.request_end_ns = ts
            pending.request_bytes = side.wire
            pending.request_body_bytes = side.body
        else:
            pending.response_end_ns = ts
            pending.response_bytes = side.wire
            pending.response_body_bytes = side.body
            pending.response_done = True
            status = pending.status
            if not pending.orphan and status is not None and (
                    status == 101 or (pending.method == "CONNECT" and 200 <= status < 300)):
                next_state = self._request.state = _TUNNEL
                self._request.buf.clear()
        side.state = next_state
        side.pending = None
        side.wire = 0
        side.body = 0

    def _unframed(self, side: _Side, ts: int, is_request: bool, anomaly: str) -> None:
        """The current message's body cannot be framed: report it as incomplete and look for the next one."""
        pending = side.pending
        pending.note(anomaly)
        pending.incomplete = True
        side.body = None
        side.buf.clear()
        self._complete(side, ts, is_request)
        side.state = _SEEK
        side.skipped = 0
        side.carry_ns = ts

    def _lose(self, side: _Side, ts: int, is_request: bool, reason: str) -> None:
        """The framing of one direction is lost: end what is cut, keep the pairing safe, and look
        for the next message start."""
        self.count(f"resync:{reason}")
        if side.pending is not None:
            side.pending.incomplete = True
            side.body = None
            self._complete(side, ts, is_request)
        elif side.state == _HEAD and side.buf and side.buf.rfind(b"\n") >= 0:
            try:
                self._finish_partial(side, is_request, 0, ts)
            except Undecodable:
                pass
        side.buf.clear()
        side.anomalies = None
        if not is_request:
            # Responses to the requests waiting may have gone by unseen.
            self._clear_unanswered(gap=True, since_barrier=True)
        if not self._unanswered or self._unanswered[-1] is not _BARRIER:
            self._unanswered.append(_BARRIER)
        side.state = _SEEK
        side.skipped = 0
        side.carry_ns = ts

    def _clear_unanswered(self, gap: bool, since_barrier: bool = False) -> None:
        """Report the requests waiting for a response as answered by nothing; with ``since_barrier``,
        only those queued before the last barrier: the requests seen after requests were lost came
        after those lost ones, and lost responses (sampled out with them) answered the earlier."""
        request_side = self._request
        unanswered = self._unanswered
        keep = 0
        if since_barrier:
            for index in range(len(unanswered) - 1, -1, -1):
                if unanswered[index] is _BARRIER:
                    keep = len(unanswered) - index
                    break
        while len(unanswered) > keep:
            pending = unanswered.popleft()
            if pending is _BARRIER:
                continue
            pending.response_done = True
            pending.gap = pending.gap or gap
            if pending.request_end_ns is None and request_side.pending is not pending:
                pending.request_end_ns = pending.request_start_ns
                pending.incomplete = True

    def _seek(self, side: _Side, data: bytes, pos: int, ts: int, is_request: bool) -> int:
        """Skip to the next message start in ``data[pos:]`` (at the chunk's first byte or after a line
        feed); return the position to go on from (the end when none is here)."""
        end = len(data)
        at_start = _REQUEST_START if is_request else _RESPONSE_START
        carry = side.buf  # a possible start at the end of the previous chunk, too short to tell
        if carry:
            joined = bytes(carry) + data[pos : pos + _SEEK_CARRY]
            if at_start.match(joined):  # the message began in the previous chunk
                side.start_ns = side.carry_ns
                side.wire = side.scanned = len(carry)
                side.state = _HEAD
                side.skipped = 0
                return pos
            if len(joined) == len(carry) + end - pos and _could_start(joined, is_request):
                carry += data[pos:]  # still too short to tell
                return end
            self.count("skipped_bytes", len(carry))
            side.skipped += len(carry)
            carry.clear()
        if (pos == 0 or data[pos - 1] == 10) and at_start.match(data, pos):
            found = pos
        else:
            match = (_REQUEST_START_AFTER_LF if is_request else _RESPONSE_START_AFTER_LF).search(data, pos)
            found = -1 if match is None else match.start() + 1
        if found < 0:
            # A start line may begin near the end and go on in the next chunk: keep those bytes.
            tail = data.rfind(b"\n", max(pos, end - _SEEK_CARRY)) + 1
            if not tail and (pos or end > _SEEK_CARRY):
                tail = end
            elif not tail:
                tail = pos
            carry += data[tail:]
            side.carry_ns = ts
            side.skipped += tail - pos
            self.count("skipped_bytes", tail - pos)
            if side.skipped > MAX_SEEK_BYTES:
                raise Undecodable(f"http: no message start in {MAX_SEEK_BYTES} bytes", reason="garbage")
            return end
        if found > pos:
            self.count("skipped_bytes", found - pos)
        side.state = _HEAD
        side.skipped = 0
        return found

    def _skip_gap(self, side: _Side, gap: int, ts: int, is_request: bool) -> None:
        """Step over ``gap`` bytes that moved but were not captured."""
        state = side.state
        if state == _BODY or state == _CHUNK_DATA:
            if gap <= side.remaining:
                side.remaining -= gap
                side.wire += gap
                if not side.remaining:
                    if state == _BODY:
                        self._complete(side, ts, is_request)
                    else:
                        side.state = _CHUNK_SIZE
                return
            if state == _BODY:
                # The body ended inside the gap, and whatever followed it is unknown.
                side.wire += side.remaining
                side.remaining = 0
                self._complete(side, ts, is_request)
                self._lose(side, ts, is_request, "gap")
                return
        elif state == _UNTIL_CLOSE:
            side.wire += gap
            side.body += gap
            return
        elif state == _TUNNEL:
            return
        elif state == _SEEK:
            side.buf.clear()
            return
        elif state == _HEAD and not side.buf:
            # Whole messages we saw nothing of (or nothing at all: the gap ends with the call).
            self._lose(side, ts, is_request, "gap")
            return
        # The message cut by the gap ends with it (live, where the call ended).
        if state == _HEAD:
            if side.buf.rfind(b"\n") >= 0:
                self._finish_partial(side, is_request, gap, ts)
        else:
            side.wire += gap
            side.body = None
            side.buf.clear()
            side.pending.incomplete = True
            self._complete(side, ts, is_request)
        self._lose(side, ts, is_request, "gap")

    def _finish_partial(self, side: _Side, is_request: bool, gap: int = 0, ts: int | None = None) -> None:
        """End the message whose head is partly in ``side.buf``, from its complete lines."""
        buf = side.buf
        last_line_end = buf.rfind(b"\n")
        if last_line_end < 0:
            raise Undecodable("http: capture ends inside the start line", reason="gap")
        block = bytes(buf[:last_line_end])
        buf.clear()
        at = ts if ts is not None else side.last_ns
        if is_request:
            self._request_head(side, block, at, True)
        else:
            self._response_head(side, block, at, True)
        if side.pending is None:  # an interim response or an unparsable line: nothing to report
            side.wire = 0
            return
        side.wire += gap
        side.body = None
        side.pending.incomplete = True
        self._complete(side, at, is_request)

    def _finish_at_close(self, side: _Side, is_request: bool) -> None:
        state = side.state
        if state == _HEAD:
            if side.buf:
                if not is_request and not side.pending and self._unanswered \
                        and self._unanswered[0] is not _BARRIER and self._unanswered[0].version == "0.9":
                    return
                self._finish_partial(side, is_request)
        elif state != _TUNNEL and state != _SEEK and side.pending is not None:
            if state != _UNTIL_CLOSE:
                side.pending.incomplete = True
            self._complete(side, side.last_ns, is_request)


_RESPONSE_START_PREFIX = re.compile(
    rb"[Hh](?:[Tt](?:[Tt](?:[Pp](?:/(?:1(?:\.(?:[0-9](?: (?:[0-9](?:[0-9](?:[0-9])?)?)?)?)?)?)?)?)?)?)?")


def _could_start(head: bytes, is_request: bool) -> bool:
    """Whether ``head``, too short to match a start line, is the beginning of one."""
    if not is_request:
        return _RESPONSE_START_PREFIX.fullmatch(head) is not None
    method, space, rest = head.partition(b" ")
    if not space:
        return any(known.startswith(method) for known in _KNOWN_METHODS)
    return method in _KNOWN_METHODS and not rest


def _request_end(pending: _Pending) -> int | None:
    return -1 if pending is _BARRIER else pending.request_end_ns


def _eligible(pending: _Pending) -> bool:
    return pending.eligible and pending is not _BARRIER


def _orphan() -> _Pending:
    """A stand-in request for an unsolicited response, whose framing is followed but never reported."""
    pending = _Pending("GET", "", "1.1", None, None, 0)
    pending.orphan = True
    return pending


def _note(side: _Side, anomaly: str) -> None:
    if side.anomalies is None:
        side.anomalies = [anomaly]
    else:
        side.anomalies.append(anomaly)


# -- parsing helpers -------------------------------------------------------------


def _find_head_end(buf: bytes | bytearray, begin: int, resume: int, stop: int,
                   is_request: bool) -> tuple[int, int]:  # fmt: skip
    """(end of the head without its last line break, end of the blank line), or (-1, -1).

    The head starts at ``begin``; ``resume`` skips bytes already searched.  Line breaks are CRLF, or
    bare LF as RFC 9112 tolerates.  A request line without a version (HTTP/0.9) is a whole head.
    """
    eol = buf.find(b"\n", begin, stop)
    if eol < 0:
        return -1, -1
    # _is_simple_request's usual answer (a version before the line end: no) without the call.
    if is_request and not (eol > begin and buf[eol - 1] == 13 and buf[eol - 9 : eol - 4] == b"HTTP/") \
            and _is_simple_request(buf, begin, eol):
        return (eol - 1 if eol > begin and buf[eol - 1] == 13 else eol), eol + 1
    if eol > begin and buf[eol - 1] == 13:  # 13: "\r"
        blank = buf.find(b"\r\n\r\n", max(resume, eol - 1), stop)
        if blank >= 0:
            return blank, blank + 4
        # Mixed line ends (a CRLF start line, then bare LF).
        blank = buf.find(b"\n\n", max(resume, eol), stop)
        if blank >= 0:
            return blank, blank + 2
        blank = buf.find(b"\n\r\n", max(resume, eol), stop)
        return (blank, blank + 3) if blank >= 0 else (-1, -1)
    blank = buf.find(b"\n\n", max(resume, eol), stop)
    crlf_blank = buf.find(b"\n\r\n", max(resume, eol), stop if blank < 0 else blank)
    if crlf_blank >= 0:
        return crlf_blank, crlf_blank + 3
    return (blank, blank + 2) if blank >= 0 else (-1, -1)


def _is_simple_request(buf: bytes | bytearray, begin: int, eol: int) -> bool:
    """Whether the request line ``buf[begin:eol]`` has no version: an HTTP/0.9 simple request."""
    end = eol - 1 if eol > begin and buf[eol - 1] == 13 else eol
    if buf[end - 8 : end - 3] == b"HTTP/":  # the usual case, at the cost of one slice
        return False
    whole = bytes(buf[begin:end])
    space = whole.rfind(b" ")
    # Exactly a method and a target, and the target is no version ("OPTIONS HTTP/1.1").
    return space > 0 and whole.count(b" ") == 1 and whole[space + 1 : space + 6].upper() != b"HTTP/"


def _read_line(side: _Side, data: bytes, pos: int, limit: int) -> tuple[bytes | None, int]:
    """The next line (without its LF) and the position after it; (None, end) when it continues in the
    next chunk, (None, -1) when it is longer than ``limit``."""
    eol = data.find(b"\n", pos)
    buf = side.buf
    if eol < 0:
        if len(buf) + len(data) - pos > limit:
            buf.clear()
            return None, -1
        buf += data[pos:]
        side.wire += len(data) - pos
        return None, len(data)
    side.wire += eol + 1 - pos
    line = data[pos:eol]
    if buf:
        line = bytes(buf) + line
        buf.clear()
    return line, eol + 1


def _start_ok(start: bytes | bytearray, is_request: bool) -> bool:
    """Whether a head's first bytes can still become a valid start line (rather than buffering 64 KiB)."""
    if is_request:
        method, space, _ = start.partition(b" ")
        return not ((space and not method) or len(method) > _MAX_METHOD_LEN or method.translate(None, _METHOD_CHARS))
    seen = min(len(start), 7)
    return bytes(start[:seen]).upper() == b"HTTP/1."[:seen]


def _split_request_line(block: bytes) -> tuple[str, str, str, bytes, list[str] | None] | None:
    """(method, target, version, headers, anomalies) where headers starts at the LF ending the request
    line; None when the line is not a request line."""
    eol = block.find(b"\n")
    if eol < 0:
        line, headers = block, b""
    else:
        line, headers = block[:eol], block[eol:]
    parts = line.rstrip(b"\r").split(b" ")
    anomalies = None
    if len(parts) != 3 or not parts[1]:
        parts = [p for p in parts if p]
        if len(parts) < 2:
            return None
        if len(parts) == 2:
            if parts[1][:5].upper() == b"HTTP/":  # "OPTIONS HTTP/1.1": no target
                parts = [parts[0], b"", parts[1]]
                anomalies = ["no_target"]
            else:  # "GET /": HTTP/0.9
                parts = [parts[0], parts[1], b"HTTP/0.9"]
                anomalies = ["http09"]
        elif parts[-1][:5].upper() == b"HTTP/":  # spaces in the target
            parts = [parts[0], b" ".join(parts[1:-1]), parts[-1]]
            anomalies = ["space_in_target"]
        else:
            return None
    method, target, version = parts
    method_name = _KNOWN_METHODS.get(method)
    if method_name is None:
        if not method or len(method) > _MAX_METHOD_LEN or method.translate(None, _METHOD_CHARS):
            return None
        method_name = method.decode("ascii")
    version_text = _version(version)
    if version_text is None:
        return None
    if version_text[0] == "!":
        version_text = version_text[1:]
        anomalies = (anomalies or []) + ["version_case"]
    return method_name, target.decode("utf-8", "backslashreplace"), version_text, headers, anomalies


def _split_status_line(block: bytes) -> tuple[int, str, bytes, list[str] | None] | None:
    """(status, reason, headers, anomalies) where headers starts at the LF ending the status line;
    None when the line is not a status line."""
    eol = block.find(b"\n")
    if eol < 0:
        line, headers = block.rstrip(b"\r"), b""
    else:
        line, headers = block[:eol].rstrip(b"\r"), block[eol:]
    version, _, rest = line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    status = _STATUS_CODES.get(code)  # also validates: three digits, 100 to 999
    if status is None:
        return None
    anomalies = None
    if version not in _VERSIONS:
        checked = _version(version)
        if checked is None or checked == "0.9":
            return None
        if checked[0] == "!":
            anomalies = ["version_case"]
    reason_text = _REASONS.get(reason)
    if reason_text is None:
        reason_text = reason.decode("utf-8", "backslashreplace")
    return status, reason_text, headers, anomalies


def _version(version: bytes) -> str | None:
    """"1.1" …; "!1.1" when the name is not upper case (tolerated); None when not a version."""
    known = _VERSIONS.get(version)
    if known is not None:
        return known
    if version == b"HTTP/0.9":
        return "0.9"
    if len(version) == 8 and version[:7].upper() == b"HTTP/1." and version[7:].isdigit():
        text = version[5:].decode("ascii")
        return text if version.startswith(b"HTTP/") else "!" + text
    return None


# Header values are looked up by finding b"\nname:" in a lower-cased copy of the headers (same offsets).


def _header(headers: bytes, lowered: bytes, name: bytes, odd: list[str]) -> bytes | None:
    """The value of the first header ``name`` (given as b"\\nname"), without surrounding blanks, or None.

    Tolerated, and added to ``odd``: blanks before the colon (``Name :``) and obsolete line folding
    (continuation lines starting with a blank, joined with a space)."""
    at = lowered.find(name)
    length = len(lowered)
    while at >= 0:
        stop = at + len(name)
        if stop < length and lowered[stop] == 58:  # ":"
            break
        blank = stop
        while blank < length and (lowered[blank] == 32 or lowered[blank] == 9):
            blank += 1
        if blank > stop and blank < length and lowered[blank] == 58:
            odd.append("space_before_colon")
            stop = blank
            break
        at = lowered.find(name, stop)
    else:
        return None
    start = stop + 1
    stop = headers.find(b"\n", start)
    if stop < 0:
        return headers[start:].strip()
    value = headers[start:stop].strip()
    if stop + 1 < len(headers) and (headers[stop + 1] == 32 or headers[stop + 1] == 9):
        odd.append("obs_fold")
        while stop >= 0 and stop + 1 < len(headers) and (headers[stop + 1] == 32 or headers[stop + 1] == 9):
            following = headers.find(b"\n", stop + 1)
            more = (headers[stop + 1 : following] if following >= 0 else headers[stop + 1 :]).strip()
            value = value + b" " + more if value else more
            stop = following
    return value


def _note_all(pending: _Pending, anomalies: list[str]) -> None:
    for anomaly in anomalies:
        pending.note(anomaly)


def _content_length(value: bytes) -> int | None:
    """The length, or None when it cannot be one (RFC 9112 6.3: the framing is then unknown)."""
    if not value.isdigit():
        # "5, 5": the same length repeated (a proxy joined two fields) is that length.
        values = {part.strip() for part in value.split(b",")}
        if len(values) != 1:
            return None
        value = values.pop()
        if not value.isdigit():
            return None
    digits = value.lstrip(b"0")
    if len(digits) > 18:
        return None
    return int(digits) if digits else 0


def _chunk_size(line: bytes) -> int | None:
    digits = line.partition(b";")[0].strip()  # drop chunk extensions
    if not digits or digits.translate(None, _HEX_DIGITS):
        return None
    digits = digits.lstrip(b"0")
    if len(digits) > 15:
        return None
    return int(digits, 16) if digits else 0
