"""Wire formats and connections for replay: HTTP/1.x and Redis (MySQL is in :mod:`.mysql`).

Each protocol has a parser that works on a complete byte string (a recorded
response) and on a growing buffer (a response being read from the target),
and a connection class that sends one request and reads exactly one
response.  Parsers return ``None`` while more bytes are needed and raise
:class:`ProtocolError` on bytes that cannot be this protocol.
"""

from __future__ import annotations

import gzip
import socket
import time
import zlib
from typing import Any

import attrs


class ProtocolError(Exception):
    """Bytes that cannot be parsed as the expected protocol; the message is one line."""


class ReplayError(Exception):
    """A request could not be replayed (connection refused, timeout, closed early …)."""


class Deadline:
    """An absolute time limit for one exchange, applied to every socket operation."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise ReplayError(f"no complete response within {self.seconds:g}s")
        return left


def connect(host: str, port: int, deadline: Deadline) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=deadline.left())
    except TimeoutError:
        raise ReplayError(f"connecting to {host}:{port} timed out") from None
    except OSError as exc:
        raise ReplayError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_some(sock: socket.socket, deadline: Deadline) -> bytes:
    """One recv() within the deadline; b"" when the peer closed."""
    sock.settimeout(deadline.left())
    try:
        return sock.recv(256 * 1024)
    except TimeoutError:
        raise ReplayError(f"no complete response within {deadline.seconds:g}s") from None
    except ConnectionResetError:
        return b""
    except OSError as exc:
        raise ReplayError(f"receive failed: {exc.strerror or exc}") from None


def send_all(sock: socket.socket, data: bytes, deadline: Deadline) -> None:
    sock.settimeout(deadline.left())
    try:
        sock.sendall(data)
    except TimeoutError:
        raise ReplayError(f"sending timed out after {deadline.seconds:g}s") from None
    except OSError as exc:
        raise ReplayError(f"send failed: {exc.strerror or exc}") from None


def close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


# -- HTTP/1.x -----------------------------------------------------------------------------------


@attrs.define
class HttpMessage:
    """A parsed HTTP request or response."""

    start_line: str
    version: str
    headers: list[tuple[str, str]]
    #: The body after removing the chunked transfer coding (content codings are kept).
    body: bytes = b""
    #: Responses: status code and reason; requests: method and target.
    status: int | None = None
    reason: str = ""
    method: str = ""
    target: str = ""
    #: False when the bytes ended before the message did (a truncated recording).
    complete: bool = True
    #: Length of the head (start line, headers, blank line) in bytes.
    head_length: int = 0

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    @property
    def chunked(self) -> bool:
        coding = self.header("transfer-encoding")
        return coding is not None and coding.strip().lower().endswith("chunked")

    def decoded_body(self) -> bytes:
        """The body with a gzip or deflate content coding undone (as is when it cannot be)."""
        coding = (self.header("content-encoding") or "").strip().lower()
        try:
            if coding in ("gzip", "x-gzip"):
                return gzip.decompress(self.body)
            if coding == "deflate":
                try:
                    return zlib.decompress(self.body)
                except zlib.error:
                    return zlib.decompress(self.body, -zlib.MAX_WBITS)
        except (OSError, EOFError, zlib.error):
            pass
        return self.body


def _find_head_end(data: bytes, start: int) -> tuple[int, int]:
    """(end of the head's last line, position after the blank line), or (-1, -1)."""
    crlf = data.find(b"\r\n\r\n", start)
    lf = data.find(b"\n\n", start)
    if crlf >= 0 and (lf < 0 or crlf <= lf):
        return crlf, crlf + 4
    if lf >= 0:
        return lf, lf + 2
    return -1, -1


def _parse_head(block: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = block.decode("latin-1").replace("\r\n", "\n").split("\n")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in " \t" and headers:  # obsolete line folding
            name, value = headers[-1]
            headers[-1] = (name, value + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise ProtocolError(f"http: bad header line {line[:60]!r}")
        headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _read_body(data: bytes, pos: int, message: HttpMessage, mode: str, length: int,
               at_eof: bool) -> int | None:
    """Fill ``message.body`` from ``data[pos:]``; the end position, or None when more bytes are needed."""
    if mode == "none":
        return pos
    if mode == "length":
        if len(data) - pos >= length:
            message.body = data[pos : pos + length]
            return pos + length
        if not at_eof:
            return None
        message.body = data[pos:]
        message.complete = False
        return len(data)
    if mode == "close":
        if not at_eof:
            return None
        message.body = data[pos:]
        return len(data)
    # chunked
    body = bytearray()
    while True:
        eol = data.find(b"\n", pos)
        if eol < 0:
            break
        size_text = data[pos:eol].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ProtocolError(f"http: bad chunk-size line {data[pos:eol][:40]!r}") from None
        pos = eol + 1
        if size == 0:
            # Trailers up to an empty line.
            while True:
                eol = data.find(b"\n", pos)
                if eol < 0:
                    break
                line = data[pos:eol].rstrip(b"\r")
                pos = eol + 1
                if not line:
                    message.body = bytes(body)
                    return pos
            break
        if len(data) - pos < size + 2:
            body += data[pos : pos + size]
            pos = len(data)
            break
        body += data[pos : pos + size]
        pos += size
        if data[pos : pos + 2] == b"\r\n":
            pos += 2
        elif data[pos : pos + 1] == b"\n":
            pos += 1
        else:
            raise ProtocolError("http: chunk data not followed by CRLF")
    if not at_eof:
        return None
    message.body = bytes(body)
    message.complete = False
    return len(data)


def parse_http_request(data: bytes) -> HttpMessage:
    """The request at the start of ``data``; ``complete`` is False when the bytes end early."""
    block_end, head_end = _find_head_end(data, 0)
    if head_end < 0:
        start, _ = _parse_head(data.split(b"\n", 1)[0])
        parts = start.split(" ")
        return HttpMessage(start, "", [], complete=False, method=parts[0], target=parts[1] if len(parts) > 1 else "")
    start, headers = _parse_head(data[:block_end])
    parts = start.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ProtocolError(f"http: bad request line {start[:60]!r}")
    message = HttpMessage(start, parts[2][5:], headers, method=parts[0], target=parts[1], head_length=head_end)
    if message.chunked:
        mode, length = "chunked", 0
    else:
        declared = message.header("content-length")
        mode, length = ("length", _content_length(declared)) if declared is not None else ("none", 0)
    _read_body(data, head_end, message, mode, length, at_eof=True)
    return message


def _content_length(value: str) -> int:
    value = value.split(",")[0].strip()
    if not value.isdigit():
        raise ProtocolError(f"http: bad Content-Length {value[:20]!r}")
    return int(value)


def parse_http_response(data: bytes, method: str, at_eof: bool) -> tuple[HttpMessage, int] | None:
    """The final response at the start of ``data`` (interim 1xx responses skipped) and its end.

    ``None`` when more bytes are needed; with ``at_eof`` (the peer closed, or the bytes are a
    recording), an incomplete response is returned with ``complete=False`` instead.
    """
    pos = 0
    while True:
        block_end, head_end = _find_head_end(data, pos)
        if head_end < 0:
            if not at_eof:
                return None
            if pos >= len(data):
                raise ProtocolError("http: no response")
            first = data[pos:].split(b"\n", 1)[0].rstrip(b"\r")
            status, reason, version = _status_line(first.decode("latin-1"))
            return HttpMessage(first.decode("latin-1"), version, [], status=status, reason=reason,
                               complete=False), len(data)
        start, headers = _parse_head(data[pos:block_end])
        status, reason, version = _status_line(start)
        if 100 <= status < 200 and status != 101:
            pos = head_end  # interim response: the final one follows
            continue
        message = HttpMessage(start, version, headers, status=status, reason=reason, head_length=head_end - pos)
        if method == "HEAD" or status in (101, 204, 304) or (method == "CONNECT" and 200 <= status < 300):
            mode, length = "none", 0
        elif message.chunked:
            mode, length = "chunked", 0
        elif message.header("transfer-encoding") is not None:
            mode, length = "close", 0
        else:
            declared = message.header("content-length")
            mode, length = ("length", _content_length(declared)) if declared is not None else ("close", 0)
        end = _read_body(data, head_end, message, mode, length, at_eof)
        if end is None:
            return None
        return message, end


def _status_line(line: str) -> tuple[int, str, str]:
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"http: bad status line {line[:60]!r}")
    return int(code), reason.strip(), version[5:]


def rewrite_http_request(data: bytes, host: str | None, set_headers: list[tuple[str, str]]) -> bytes:
    """The request with its Host header replaced by ``host`` (when given) and ``set_headers``
    replacing (or added after) the headers of the same names.  The body is kept as is."""
    if host is None and not set_headers:
        return data
    block_end, head_end = _find_head_end(data, 0)
    if head_end < 0:
        raise ProtocolError("http: request head incomplete")
    lines = data[:block_end].split(b"\n")
    eol = b"\r\n" if lines[0].endswith(b"\r") else b"\n"
    lines = [line.rstrip(b"\r") for line in lines]
    replace = {name.lower(): (name, value) for name, value in set_headers}
    if host is not None:
        replace["host"] = ("Host", host)
    out = [lines[0]]
    done = set()
    for line in lines[1:]:
        name = line.split(b":", 1)[0].strip().decode("latin-1").lower()
        if name in replace:
            if name not in done:
                new_name, value = replace[name]
                out.append(f"{new_name}: {value}".encode("latin-1"))
                done.add(name)
            continue
        out.append(line)
    for name, (new_name, value) in replace.items():
        if name not in done:
            out.append(f"{new_name}: {value}".encode("latin-1"))
    return eol.join(out) + eol + eol + data[head_end:]


class HttpConnection:
    """One keep-alive connection to the target, reopened when the server closes it."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None

    def roundtrip(self, request: bytes, method: str, close_after: bool) -> tuple[HttpMessage, int]:
        """Send ``request``, read its response; (response, latency in ns)."""
        deadline = Deadline(self.timeout)
        reused = self._sock is not None
        try:
            try:
                response, latency, closed = self._try(request, method, deadline)
            except _StaleConnection:
                if not reused:
                    raise ReplayError("connection closed before any response byte") from None
                # A kept-alive connection the server had already closed: once more on a new one.
                self.close()
                try:
                    response, latency, closed = self._try(request, method, deadline)
                except _StaleConnection:
                    raise ReplayError("connection closed before any response byte") from None
        except BaseException:
            self.close()
            raise
        connection = (response.header("connection") or "").lower()
        if closed or close_after or "close" in connection or (response.version == "1.0" and "keep-alive" not in connection):
            self.close()
        return response, latency

    def _try(self, request: bytes, method: str, deadline: Deadline) -> tuple[HttpMessage, int, bool]:
        if self._sock is None:
            self._sock = connect(self.host, self.port, deadline)
        sock = self._sock
        try:
            send_all(sock, request, deadline)
        except ReplayError:
            self.close()
            raise _StaleConnection() from None
        sent = time.perf_counter_ns()
        first: int | None = None
        buf = b""
        while True:
            data = recv_some(sock, deadline)
            if not data:
                self.close()
                if not buf:
                    raise _StaleConnection()
                parsed = parse_http_response(buf, method, at_eof=True)
                assert parsed is not None
                if not parsed[0].complete:
                    raise ReplayError(f"connection closed after {len(buf)} bytes, before the response was complete")
                return parsed[0], first - sent, True
            if first is None:
                first = time.perf_counter_ns()
            buf += data
            try:
                parsed = parse_http_response(buf, method, at_eof=False)
            except ProtocolError as exc:
                raise ReplayError(str(exc)) from None
            if parsed is not None:
                return parsed[0], first - sent, False

    def close(self) -> None:
        close_quietly(self._sock)
        self._sock = None


class _StaleConnection(Exception):
    pass


# -- Redis (RESP2 / RESP3) ----------------------------------------------------------------------


@attrs.frozen
class Resp:
    """One RESP value: ``kind`` is the type name, ``value`` a scalar or a list of :class:`Resp`
    (for ``map``: a flat list of keys and values)."""

    kind: str
    value: Any = None

    def to_python(self) -> Any:
        if isinstance(self.value, list):
            return [item.to_python() for item in self.value]
        if isinstance(self.value, bytes):
            return self.value.decode("utf-8", "backslashreplace")
        return self.value


class NeedMore(Exception):
    pass


_AGGREGATES = {ord("*"): "array", ord("%"): "map", ord("~"): "set", ord(">"): "push", ord("|"): "attribute"}
_BLOBS = {ord("$"): "bulk", ord("!"): "error", ord("="): "verbatim"}
_LINES = {ord("+"): "simple", ord("-"): "error", ord(":"): "integer", ord(","): "double",
          ord("#"): "boolean", ord("("): "bignum", ord("_"): "null"}  # fmt: skip
_MAX_DEPTH = 64


def parse_resp(data: bytes, pos: int = 0, depth: int = 0) -> tuple[Resp, int]:
    """The RESP value at ``pos`` and the position after it.  RESP3 attributes are skipped.

    Raises :class:`NeedMore` when ``data`` ends inside the value, :class:`ProtocolError` on bytes that are not RESP.
    """
    if depth > _MAX_DEPTH:
        raise ProtocolError("resp: nesting too deep")
    if pos >= len(data):
        raise NeedMore()
    kind = data[pos]
    eol = data.find(b"\r\n", pos)
    if eol < 0:
        if len(data) - pos > 512 * 1024:
            raise ProtocolError("resp: line too long")
        raise NeedMore()
    line = data[pos + 1 : eol]
    after = eol + 2
    if kind in _LINES:
        name = _LINES[kind]
        if name == "integer":
            try:
                return Resp(name, int(line)), after
            except ValueError:
                raise ProtocolError(f"resp: bad integer {line[:20]!r}") from None
        if name == "boolean":
            return Resp(name, line == b"t"), after
        if name == "null":
            return Resp("null"), after
        if name == "double":
            return Resp(name, line.decode("ascii", "replace")), after
        return Resp(name, bytes(line)), after
    if kind in _BLOBS:
        length = _resp_length(line)
        if length < 0:
            return Resp("null"), after
        end = after + length
        if len(data) < end + 2:
            raise NeedMore()
        if data[end : end + 2] != b"\r\n":
            raise ProtocolError("resp: bulk string not followed by CRLF")
        value = bytes(data[after:end])
        name = _BLOBS[kind]
        if name == "verbatim":
            value = value[4:]  # "txt:" format prefix
        return Resp(name, value), end + 2
    if kind in _AGGREGATES:
        count = _resp_length(line)
        name = _AGGREGATES[kind]
        if count < 0:
            return Resp("null"), after
        if name in ("map", "attribute"):
            count *= 2
        items = []
        pos = after
        for _ in range(count):
            item, pos = parse_resp(data, pos, depth + 1)
            items.append(item)
        if name == "attribute":
            return parse_resp(data, pos, depth + 1)  # the value the attributes annotate
        return Resp(name, items), pos
    raise ProtocolError(f"resp: unknown type byte {bytes([kind])!r}")


def _resp_length(line: bytes) -> int:
    try:
        value = int(line)
    except ValueError:
        raise ProtocolError(f"resp: bad length {line[:20]!r}") from None
    if value < -1 or value > 1 << 32:
        raise ProtocolError(f"resp: bad length {line[:20]!r}")
    return value


def parse_command(data: bytes) -> list[bytes]:
    """The arguments of the command in ``data`` (a RESP array of bulk strings, or an inline command)."""
    if data[:1] == b"*":
        try:
            value, _ = parse_resp(data)
        except NeedMore:
            raise ProtocolError("resp: command incomplete") from None
        if value.kind != "array" or any(item.kind != "bulk" for item in value.value):
            raise ProtocolError("resp: command is not an array of bulk strings")
        return [item.value for item in value.value]
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    return line.split()


def encode_command(args: list[bytes]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class RedisConnection:
    """One connection to the target; reopened after QUIT or when the server closes it."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None

    def roundtrip(self, command: bytes, close_after: bool = False) -> tuple[Resp, int]:
        deadline = Deadline(self.timeout)
        try:
            if self._sock is None:
                self._sock = connect(self.host, self.port, deadline)
            sock = self._sock
            send_all(sock, command, deadline)
            sent = time.perf_counter_ns()
            first: int | None = None
            buf = b""
            while True:
                data = recv_some(sock, deadline)
                if not data:
                    raise ReplayError(
                        "connection closed before the reply" if not buf else "connection closed inside the reply")
                if first is None:
                    first = time.perf_counter_ns()
                buf += data
                try:
                    reply, _ = parse_resp(buf)
                except NeedMore:
                    continue
                except ProtocolError as exc:
                    raise ReplayError(str(exc)) from None
                if close_after:
                    self.close()
                return reply, first - sent
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        close_quietly(self._sock)
        self._sock = None
