"""HTTP/1.0 and HTTP/1.1 decoder.

Both directions go through the same framing state machine: a head (start line
and headers), then a body framed by Content-Length, by the chunked transfer
coding, or by the end of the connection.  Requests queue in order and
responses pair with them first in, first out (keep-alive and pipelining); an
exchange is emitted once both halves are complete.

The decoder runs once per syscall, so the common path is kept short: the end
of a head is found with ``bytes.find``, header values are looked up in one
lower-cased copy of the head instead of splitting every line, and bodies are
skipped by counting, never buffered.  Only an unfinished head or chunk-size
line is buffered.

Captures that keep only a prefix of a syscall leave gaps.  A gap inside a body
of declared length is skipped by counting.  A gap that hides framing (headers,
chunk-size lines) makes the stream :class:`Undecodable`, unless the decoder was
built with ``trust_syscall_boundaries=True``: then a message cut by such a gap
is assumed to end where the syscall ended.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable

#: Largest head (start line and headers) or trailer line buffered; longer means we lost the framing.
MAX_HEAD_BYTES = 64 * 1024
#: Largest chunk-size line (with its extensions) buffered.
MAX_CHUNK_LINE_BYTES = 4 * 1024
#: Requests waiting for a response; more means the responses are not reaching us.
MAX_PENDING = 1024

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

# Parser states of one direction.
_HEAD = 0  # start line and headers
_BODY = 1  # Content-Length body: `remaining` bytes left
_CHUNK_SIZE = 2  # chunk-size line
_CHUNK_DATA = 3  # chunk data and the CRLF after it: `remaining` bytes left
_TRAILER = 4  # trailer lines after the last chunk, up to an empty line
_UNTIL_CLOSE = 5  # body that ends when the connection closes
_TUNNEL = 6  # after CONNECT or 101 Switching Protocols: no longer HTTP
#: Enum member lookups cost ~80 ns each (a descriptor); a module constant costs nothing.
_REQUEST = Direction.REQUEST
_STATE_NAMES = ("headers", "body", "chunk-size line", "chunk data", "trailers", "body", "tunnel")


class _Pending:
    """A request and, once it arrives, its response."""

    __slots__ = (
        "method", "target", "version", "host", "traceparent",
        "request_start_ns", "request_end_ns", "request_bytes", "request_body_bytes",
        "status", "reason", "response_start_ns", "response_end_ns", "response_bytes",
        "response_body_bytes", "response_done", "continued", "incomplete",
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
        status = self.status
        # Positional: a third faster than keywords, and this runs once per exchange.
        return Exchange(
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
        )


class _Side:
    """Parser state of one direction."""

    __slots__ = ("state", "buf", "scanned", "remaining", "pending", "wire", "body", "start_ns", "last_ns")

    def __init__(self) -> None:
        self.state = _HEAD
        self.buf = bytearray()  # unfinished head or line; never holds body bytes
        self.scanned = 0  # bytes of `buf` already searched for the end of the head
        self.remaining = 0
        self.pending: _Pending | None = None  # the exchange the current message belongs to
        self.wire = 0  # bytes of the current message so far
        self.body: int | None = 0  # body bytes of the current message; None when unknown
        self.start_ns = 0  # timestamp of the chunk holding the message's first byte
        self.last_ns = 0  # timestamp of the last chunk seen


class HttpDecoder(Decoder):
    """HTTP/1.x exchanges of one connection.

    Attributes of each exchange: ``host`` (None without a Host header), ``version`` (the request's,
    ``"1.1"``), ``reason``, ``request_body_bytes`` and ``response_body_bytes`` (None when a gap hid
    the framing), plus ``traceparent`` when the request has one, ``continue`` when a 100 Continue
    preceded the final response, and ``incomplete`` when the capture or the close cut a message short.
    Interim (1xx) responses are not part of the exchange: its response fields describe the final one.
    """

    protocol = "http"
    default_ports = (80, 8080, 8000)

    def __init__(self, trust_syscall_boundaries: bool = False) -> None:
        #: When a capture gap hides framing, assume the message ends with the syscall
        #: (true when every read/write carries whole messages) instead of giving up.
        self._trust_boundaries = trust_syscall_boundaries
        self._reset()

    def _reset(self) -> None:
        self._request = _Side()
        self._response = _Side()
        self._open: deque[_Pending] = deque()  # not yet emitted, in request order
        self._unanswered: deque[_Pending] = deque()  # final response not started yet

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
        except Undecodable:
            raise
        except Exception as exc:  # a parsing slip must surface as Undecodable, never as a crash
            raise Undecodable(f"http: unexpected {type(exc).__name__} while parsing") from exc
        open_ = self._open
        if not open_ or not open_[0].response_done or open_[0].request_end_ns is None:
            return ()
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
            if pending.request_end_ns is None:  # defensive: every request is finished above
                pending.request_end_ns = pending.request_start_ns
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
                block, pos = self._read_head(side, data, pos, ts, is_request)
                if block is not None:
                    if is_request:
                        self._request_head(side, block, False)
                    else:
                        self._response_head(side, block, False)
                    if side.state == _BODY and not side.remaining:
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
                        raise Undecodable("http: chunk data not followed by CRLF")
                    side.state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                line, pos = _read_line(side, data, pos, MAX_CHUNK_LINE_BYTES)
                if line is None:
                    break
                size = _chunk_size(line)
                if size:
                    side.state = _CHUNK_DATA
                    side.remaining = size + 2
                    side.body += size
                else:
                    side.state = _TRAILER
            elif state == _TRAILER:
                line, pos = _read_line(side, data, pos, MAX_HEAD_BYTES)
                if line is None:
                    break
                if not line or line == b"\r":
                    self._complete(side, ts, is_request)
            elif state == _UNTIL_CLOSE:
                side.wire += end - pos
                side.body += end - pos
                break
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
            block_end, head_end = _find_head_end(data, pos, pos, pos + MAX_HEAD_BYTES)
            if head_end < 0:
                if end - pos > MAX_HEAD_BYTES:
                    raise Undecodable("http: headers longer than 64 KiB")
                _check_start(data[pos : pos + 40], is_request)
                buf += data[pos:]
                side.scanned = len(buf)
                side.wire = end - pos
                return None, end
            block = data[pos:block_end]
            side.wire = head_end - pos
            pos = head_end
        else:
            before = len(buf)
            if before + end - pos > MAX_HEAD_BYTES + 3:
                buf += data[pos : pos + MAX_HEAD_BYTES + 3 - before]
            else:
                buf += data[pos:]
            # Resume the search a few bytes back: the blank line may straddle the two chunks.
            block_end, head_end = _find_head_end(buf, 0, max(0, side.scanned - 3), len(buf))
            if head_end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise Undecodable("http: headers longer than 64 KiB")
                if before < 40:
                    _check_start(buf[:40], is_request)
                side.scanned = len(buf)
                side.wire += end - pos
                return None, end
            block = bytes(buf[:block_end])
            used = head_end - before
            side.wire += used
            pos += used
            buf.clear()
        return block, pos

    def _request_head(self, side: _Side, block: bytes, partial: bool) -> None:
        method, target, version, headers = _split_request_line(block)
        lowered = headers.lower()
        if len(self._unanswered) >= MAX_PENDING:
            raise Undecodable(f"http: more than {MAX_PENDING} requests without a response")
        # Inline finds: a call per absent header would cost more than the search.
        at = lowered.find(b"\nhost:")
        host = None if at < 0 else _text_at(headers, at + 6)
        at = lowered.find(b"\ntraceparent:")
        traceparent = None if at < 0 else _text_at(headers, at + 13)
        pending = _Pending(method, target, version, host, traceparent, side.start_ns)
        self._open.append(pending)
        self._unanswered.append(pending)
        side.pending = pending
        if partial:
            return
        at = lowered.find(b"\ntransfer-encoding:")
        if at >= 0:
            coding = _value_at(headers, at + 19)
            if not coding.lower().endswith(b"chunked"):
                raise Undecodable(f"http: request Transfer-Encoding {coding[:40]!r} is not chunked")
            side.state = _CHUNK_SIZE
            side.body = 0
            return
        at = lowered.find(b"\ncontent-length:")
        side.state = _BODY
        side.remaining = side.body = 0 if at < 0 else _content_length(_value_at(headers, at + 16))

    def _response_head(self, side: _Side, block: bytes, partial: bool) -> None:
        status, reason, headers = _split_status_line(block)
        unanswered = self._unanswered
        if not unanswered:
            if self._request.state != _HEAD or not self._request.buf:
                raise Undecodable("http: response without a pending request")
            # The server answers a request whose head we only partly saw (lost capture, or a 4xx to
            # an oversized head): report that request with what we saw.
            self._finish_partial(self._request, True)
        pending = unanswered[0]
        if status < 200 and status != 101:
            # Interim response (100 Continue, 103 Early Hints): the final response follows.
            if status == 100:
                pending.continued = True
            side.wire = 0
            return
        unanswered.popleft()
        pending.status = status
        pending.reason = reason
        pending.response_start_ns = side.start_ns
        side.pending = pending
        if partial:
            return
        side.state = _BODY
        side.remaining = side.body = 0
        if status == 101 or (pending.method == "CONNECT" and status < 300):
            return  # the tunnel starts after the head; see _complete
        if pending.method == "HEAD" or status == 204 or status == 304:
            return
        lowered = headers.lower()
        at = lowered.find(b"\ntransfer-encoding:")
        if at >= 0:
            chunked = _value_at(headers, at + 19).lower().endswith(b"chunked")
            side.state = _CHUNK_SIZE if chunked else _UNTIL_CLOSE
            return
        at = lowered.find(b"\ncontent-length:")
        if at < 0:
            side.state = _UNTIL_CLOSE
        else:
            side.remaining = side.body = _content_length(_value_at(headers, at + 16))

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
            if status == 101 or (pending.method == "CONNECT" and 200 <= status < 300):
                next_state = self._request.state = _TUNNEL
                self._request.buf.clear()
        side.state = next_state
        side.pending = None
        side.wire = 0
        side.body = 0

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
        elif state == _UNTIL_CLOSE:
            side.wire += gap
            side.body += gap
            return
        elif state == _TUNNEL:
            return
        if self._trust_boundaries and self._end_with_syscall(side, gap, ts, is_request):
            return
        raise Undecodable(f"http: capture gap of {gap} bytes inside {_STATE_NAMES[state]}")

    def _end_with_syscall(self, side: _Side, gap: int, ts: int, is_request: bool) -> bool:
        """End the message cut by a gap where the syscall ended; False when there is nothing to end."""
        state = side.state
        if state == _HEAD:
            if not side.buf:
                return False  # the gap holds a whole message we saw nothing of
            self._finish_partial(side, is_request, gap, ts)
            return True
        if state == _BODY:
            return False  # the body ended inside the gap; what follows it is unknown
        side.wire += gap
        side.body = None
        side.buf.clear()
        side.pending.incomplete = True
        self._complete(side, ts, is_request)
        return True

    def _finish_partial(self, side: _Side, is_request: bool, gap: int = 0, ts: int | None = None) -> None:
        """End the message whose head is partly in ``side.buf``, from its complete lines."""
        buf = side.buf
        last_line_end = buf.rfind(b"\n")
        if last_line_end < 0:
            raise Undecodable("http: capture ends inside the start line")
        if is_request:
            self._request_head(side, bytes(buf[:last_line_end]), True)
        else:
            self._response_head(side, bytes(buf[:last_line_end]), True)
        buf.clear()
        if side.pending is None:  # an interim response: nothing to report
            side.wire = 0
            return
        side.wire += gap
        side.body = None
        side.pending.incomplete = True
        self._complete(side, side.last_ns if ts is None else ts, is_request)

    def _finish_at_close(self, side: _Side, is_request: bool) -> None:
        state = side.state
        if state == _HEAD:
            if side.buf:
                self._finish_partial(side, is_request)
        elif state != _TUNNEL and side.pending is not None:
            if state != _UNTIL_CLOSE:
                side.pending.incomplete = True
            self._complete(side, side.last_ns, is_request)


# -- parsing helpers -------------------------------------------------------------


def _find_head_end(buf: bytes | bytearray, begin: int, resume: int, stop: int) -> tuple[int, int]:
    """(end of the head without its last line break, end of the blank line), or (-1, -1).

    The head starts at ``begin``; ``resume`` skips bytes already searched.  Line breaks are CRLF, or
    bare LF as RFC 9112 tolerates, as the start line's is: one search instead of one per style.
    """
    eol = buf.find(b"\n", begin, stop)
    if eol < 0:
        return -1, -1
    if eol > begin and buf[eol - 1] == 13:  # 13: "\r"
        blank = buf.find(b"\r\n\r\n", max(resume, eol - 1), stop)
        return (blank, blank + 4) if blank >= 0 else (-1, -1)
    blank = buf.find(b"\n\n", max(resume, eol), stop)
    return (blank, blank + 2) if blank >= 0 else (-1, -1)


def _read_line(side: _Side, data: bytes, pos: int, limit: int) -> tuple[bytes | None, int]:
    """The next line (without its LF) and the position after it, or (None, end) when it continues in the next chunk."""
    eol = data.find(b"\n", pos)
    buf = side.buf
    if eol < 0:
        if len(buf) + len(data) - pos > limit:
            raise Undecodable(f"http: line longer than {limit} bytes in chunked framing")
        buf += data[pos:]
        side.wire += len(data) - pos
        return None, len(data)
    side.wire += eol + 1 - pos
    line = data[pos:eol]
    if buf:
        line = bytes(buf) + line
        buf.clear()
    return line, eol + 1


def _check_start(start: bytes | bytearray, is_request: bool) -> None:
    """Fail early on a head that cannot become a valid start line, rather than buffering 64 KiB of it."""
    if is_request:
        method, space, _ = start.partition(b" ")
        if (space and not method) or len(method) > _MAX_METHOD_LEN or method.translate(None, _METHOD_CHARS):
            raise Undecodable(f"http: not a request line: {bytes(start[:20])!r}")
    else:
        seen = min(len(start), 7)
        if start[:seen] != b"HTTP/1."[:seen]:
            raise Undecodable(f"http: not a status line: {bytes(start[:20])!r}")


def _split_request_line(block: bytes) -> tuple[str, str, str, bytes]:
    """(method, target, version, headers) where headers starts at the LF ending the request line."""
    eol = block.find(b"\n")
    if eol < 0:
        line, headers = block, b""
    else:
        line, headers = block[:eol], block[eol:]
    parts = line.rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[1]:
        raise Undecodable(f"http: bad request line {line[:60]!r}")
    method, target, version = parts
    method_name = _KNOWN_METHODS.get(method)
    if method_name is None:
        if not method or len(method) > _MAX_METHOD_LEN or method.translate(None, _METHOD_CHARS):
            raise Undecodable(f"http: bad method {method[:20]!r}")
        method_name = method.decode("ascii")
    return method_name, target.decode("utf-8", "backslashreplace"), _version(version), headers


def _split_status_line(block: bytes) -> tuple[int, str, bytes]:
    """(status, reason, headers) where headers starts at the LF ending the status line."""
    eol = block.find(b"\n")
    if eol < 0:
        line, headers = block.rstrip(b"\r"), b""
    else:
        line, headers = block[:eol].rstrip(b"\r"), block[eol:]
    version, _, rest = line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    status = _STATUS_CODES.get(code)  # also validates: three digits, 100 to 999
    if status is None:
        raise Undecodable(f"http: bad status line {line[:60]!r}")
    if version not in _VERSIONS:
        _version(version)
    reason_text = _REASONS.get(reason)
    if reason_text is None:
        reason_text = reason.decode("utf-8", "backslashreplace")
    return status, reason_text, headers


def _version(version: bytes) -> str:
    known = _VERSIONS.get(version)
    if known is not None:
        return known
    if len(version) == 8 and version.startswith(b"HTTP/1.") and version[7:].isdigit():
        return version[5:].decode("ascii")
    raise Undecodable(f"http: bad version {version[:20]!r}")


# Header values are looked up by finding b"\nname:" in a lower-cased copy of the headers (same offsets).


def _value_at(headers: bytes, start: int) -> bytes:
    """The header value starting at ``start``, up to the end of its line, without surrounding spaces."""
    stop = headers.find(b"\n", start)
    return (headers[start:stop] if stop >= 0 else headers[start:]).strip()


def _text_at(headers: bytes, start: int) -> str:
    return _value_at(headers, start).decode("utf-8", "backslashreplace")


def _content_length(value: bytes) -> int:
    if not value.isdigit() or len(value) > 18:
        raise Undecodable(f"http: bad Content-Length {value[:20]!r}")
    return int(value)


def _chunk_size(line: bytes) -> int:
    digits = line.partition(b";")[0].strip()  # drop chunk extensions
    if not digits or len(digits) > 15 or digits.translate(None, _HEX_DIGITS):
        raise Undecodable(f"http: bad chunk-size line {line[:40]!r}")
    return int(digits, 16)
