"""memcached decoder: the text protocol and the meta protocol (``mg``/``ms``/``md``/``ma``/``mn``).

Both are lines ending in ``\\r\\n``; storage commands (``set``, ``cas``, ``ms`` …) and
value responses (``VALUE``, ``VA``) are followed by a data block whose length the
line declares, so a capture gap inside a value is stepped over; a gap inside a line
loses the framing.  Commands are answered in order, except that ``noreply`` (text)
gets no answer at all, and a quiet meta command (flag ``q``) is answered only when
the answer is worth it (a hit for ``mg``, a failure for ``ms``/``md``): the answer
is paired with the quiet command when it is one that command can get, and a quiet
command passed over is reported as answered silently (``result`` ``quiet``).

An exchange: ``method`` the command in upper case (``GET``, ``SET``, ``MG`` …),
``target`` its first key, ``status`` ``OK`` or ``ERR`` (``ERROR``, ``CLIENT_ERROR``,
``SERVER_ERROR``: ``error_message`` has the text).  Attributes: ``result`` (the
response word: ``STORED``, ``NOT_FOUND``, ``HD``, ``EN`` …), ``hits`` and ``misses``
for retrievals (``get a b c`` is one exchange with three keys), ``keys``.  The binary
protocol (deprecated upstream) is not decoded.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable

__all__ = ["MemcachedDecoder"]

#: memcached's own limit on a command line is 2048 bytes (keys are at most 250).
MAX_LINE = 8192
#: Commands awaiting a response beyond which the response direction is deemed lost.
MAX_PENDING = 1 << 16
#: Largest data block believed (memcached's item size limit is at most 1 GB).
MAX_DATA = 1 << 30

_STORAGE = frozenset((b"set", b"add", b"replace", b"append", b"prepend", b"cas"))
_RETRIEVAL = frozenset((b"get", b"gets", b"gat", b"gats"))
_TEXT_COMMANDS = _STORAGE | _RETRIEVAL | frozenset((
    b"delete", b"incr", b"decr", b"touch", b"stats", b"flush_all", b"version", b"verbosity", b"quit",
    b"shutdown", b"cache_memlimit", b"lru_crawler", b"slabs", b"watch", b"misbehave", b"lru", b"mn", b"mg",
    b"ms", b"md", b"ma", b"me",
))
_META = frozenset((b"mg", b"ms", b"md", b"ma", b"mn", b"me"))
# Responses that end a retrieval (END) or a multi-line listing.
_ERRORS = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")
_RESPONSE_WORDS = frozenset((
    b"VALUE", b"END", b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND", b"DELETED", b"TOUCHED", b"OK",
    b"VERSION", b"STAT", b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR", b"VA", b"HD", b"EN", b"NF", b"NS",
    b"EX", b"MN", b"ME", b"RESET", b"ITEM",
))
# What a quiet meta command can still be answered with.
_QUIET_ANSWERS = {b"mg": (b"VA", b"HD"), b"ms": (b"NS", b"EX", b"NF"), b"md": (b"NF", b"EX"),
                  b"ma": (b"NF", b"NS", b"EX", b"VA", b"HD")}
_CRLF = b"\r\n"


def _data_length(token: bytes, request: bool = False) -> int:
    if not token.isdigit() or len(token) > 10:
        if request:
            return -1  # the server answers CLIENT_ERROR and expects no data block
        raise Undecodable(f"memcached: bad data length {token[:12]!r}")
    value = int(token)
    if value > MAX_DATA:
        raise Undecodable(f"memcached: data block of {value} bytes")
    return value


class _Lines:
    """One direction: lines, each with the data block that follows it when the line declares one."""

    def __init__(self, block_length) -> None:
        self._block_length = block_length  # line → data block length (without its CRLF), or -1
        self._carry = b""
        self._carry_ts = 0
        self._line: bytes | None = None  # a line whose data block is still arriving
        self._line_ts = 0
        self._left = 0  # bytes of that block (and its CRLF) still to come
        self._nbytes = 0
        self._truncated = False

    def feed(self, data: bytes, size: int, ts: int) -> list[tuple[bytes, int, int, int, bool]]:
        """(line, bytes on the wire with its data block, first ts, last ts, truncated) per item."""
        out: list[tuple[bytes, int, int, int, bool]] = []
        pos = 0
        end = len(data)
        if self._left:
            take = min(self._left, end)
            self._left -= take
            pos = take
            if not self._left:
                out.append((self._line, self._nbytes, self._line_ts, ts, self._truncated))
                self._line = None
        start_ts = ts
        if self._carry:
            data = self._carry + data[pos:]
            size += len(self._carry) - pos
            pos = 0
            end = len(data)
            start_ts = self._carry_ts
            self._carry = b""
        find = data.find
        block_length = self._block_length
        while pos < end and not self._left:
            eol = find(_CRLF, pos, pos + MAX_LINE)
            if eol < 0:
                if end - pos >= MAX_LINE:
                    raise Undecodable(f"memcached: line longer than {MAX_LINE} bytes")
                self._carry = data[pos:]
                self._carry_ts = start_ts
                break
            line = data[pos:eol]
            block = block_length(line)
            stop = eol + 2
            if block < 0:
                out.append((line, stop - pos, start_ts, ts, False))
            else:
                total = stop - pos + block + 2
                stop = pos + total
                if stop <= end:
                    if data[stop - 2:stop] != _CRLF:
                        raise Undecodable("memcached: data block not followed by CRLF")
                    out.append((line, total, start_ts, ts, False))
                else:
                    self._line, self._line_ts, self._nbytes = line, start_ts, total
                    self._left = stop - end
                    self._truncated = False
                    stop = end
            pos = stop
            start_ts = ts
        gap = size - len(data)
        if gap > 0:
            if not self._left or gap > self._left or self._carry:
                raise Undecodable("memcached: capture gap outside a data block: framing lost")
            self._left -= gap
            self._truncated = True
            if not self._left:
                out.append((self._line, self._nbytes, self._line_ts, ts, True))
                self._line = None
        return out


def _request_block(line: bytes) -> int:
    if line[:2] == b"ms":
        if line[2:3] != b" ":
            return -1
        parts = line.split(b" ", 3)
        return _data_length(parts[2], True) if len(parts) > 2 else -1
    command, _, rest = line.partition(b" ")
    if command in _STORAGE:
        parts = rest.split(b" ", 4)
        return _data_length(parts[3], True) if len(parts) >= 4 else -1
    return -1


def _response_block(line: bytes) -> int:
    if line[:6] == b"VALUE ":
        parts = line.split(b" ", 4)
        if len(parts) < 4:
            raise Undecodable("memcached: malformed VALUE line")
        return _data_length(parts[3])
    if line[:3] == b"VA ":
        return _data_length(line[3:].partition(b" ")[0])
    return -1


def _echoes(command: "_Command", tokens) -> bool:
    """Whether an answer's flags fit a quiet meta command: the key (flag k) and the opaque token
    (flag O) it returns, when it returns them."""
    for token in tokens:
        if token[:1] == b"k" and token[1:] != command.key:
            return False
        if token[:1] == b"O" and token != command.opaque:
            return False
    return True


class _Command:
    __slots__ = ("name", "method", "target", "keys", "quiet", "opaque", "key", "start", "end", "nbytes", "resp_start", "resp_end",
                 "resp_bytes", "hits", "result", "error", "truncated")

    def __init__(self, name: bytes, target: str, keys: int, quiet: bool, start: int, end: int, nbytes: int,
                 truncated: bool) -> None:
        self.name = name
        self.method = name.decode("ascii", "replace").upper()
        self.target = target
        self.keys = keys
        self.quiet = quiet
        self.opaque: bytes | None = None  # meta: the O flag's token, echoed in the answer
        self.key = b""
        self.start = start
        self.end = end
        self.nbytes = nbytes
        self.resp_start: int | None = None
        self.resp_end: int | None = None
        self.resp_bytes = 0
        self.hits = 0
        self.result: str | None = None
        self.error: str | None = None
        self.truncated = truncated


class MemcachedDecoder(Decoder):
    """memcached text and meta commands of one connection."""

    protocol = "memcached"
    default_ports = (11211,)

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        try:
            eol = data.find(_CRLF, 0, MAX_LINE)
            if eol <= 0:
                return False
            line = data[:eol]
            word = line.partition(b" ")[0]
            if direction is Direction.REQUEST:
                if word not in _TEXT_COMMANDS:
                    return False
                if word in _STORAGE or word in _RETRIEVAL or word in _META or word in (b"delete", b"incr", b"decr",
                                                                                        b"touch"):
                    return line[len(word):len(word) + 1] == b" " or word == b"mn"
                return True
            if word not in _RESPONSE_WORDS:
                return False
            return word.isupper() and (len(line) == len(word) or line[len(word):len(word) + 1] == b" ")
        except Exception:  # detect() must never raise, whatever the bytes
            return False

    def __init__(self) -> None:
        self._requests = _Lines(_request_block)
        self._responses = _Lines(_response_block)
        self._pending: deque[_Command] = deque()
        self._out: list[Exchange] = []
        #: Responses that answered no command seen (the capture started mid-stream).
        self.orphan_responses = 0

    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        self._out = out = []
        try:
            if chunk.direction is Direction.REQUEST:
                for item in self._requests.feed(chunk.data, chunk.size, chunk.ts_ns):
                    self._on_command(*item)
                if len(self._pending) > MAX_PENDING:
                    raise Undecodable(f"memcached: over {MAX_PENDING} commands without a response")
            else:
                for item in self._responses.feed(chunk.data, chunk.size, chunk.ts_ns):
                    self._on_response(*item)
        except Undecodable:
            raise
        except Exception as exc:  # a slip on malformed bytes: stop decoding, never crash the caller
            raise Undecodable(f"memcached: malformed line ({type(exc).__name__}: {exc})") from None
        return out

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        self._out = []
        while self._pending:
            command = self._pending.popleft()
            if command.resp_start is not None:
                command.result = command.result or "incomplete"
            self._emit(command)
        return self._out

    # ------------------------------------------------------------------ commands

    def _on_command(self, line: bytes, nbytes: int, ts0: int, ts1: int, truncated: bool) -> None:
        parts = line.split()
        if not parts:
            raise Undecodable("memcached: empty command line")
        name = parts[0]
        if name not in _TEXT_COMMANDS and (len(name) > 32 or not name.isalnum()):
            # An unknown word gets ERROR from the server; bytes that are no word are not memcached.
            raise Undecodable(f"memcached: not a command: {name[:20]!r}")
        keys = 1
        if name in _RETRIEVAL:
            first = 2 if name in (b"gat", b"gats") else 1
            keys = len(parts) - first
            target = parts[first] if keys > 0 else b""
        elif name in (b"stats", b"flush_all", b"version", b"verbosity", b"quit", b"mn", b"shutdown",
                      b"cache_memlimit", b"lru_crawler", b"slabs", b"watch", b"misbehave", b"lru"):
            keys = 0
            target = parts[1] if name == b"stats" and len(parts) > 1 else b""
        else:
            target = parts[1] if len(parts) > 1 else b""
        quiet = False
        replies = True
        if name in _META:
            quiet = b"q" in parts[2:] if name != b"ms" else b"q" in parts[3:]
        elif parts[-1] == b"noreply" and len(parts) > 1:
            replies = False
        command = _Command(name, target.decode("utf-8", "backslashreplace"), keys, quiet, ts0, ts1, nbytes,
                           truncated)
        if quiet:
            command.key = target
            command.opaque = next((p for p in parts[2:] if p[:1] == b"O"), None)
        if name == b"quit" or not replies:
            command.result = "noreply" if not replies else None
            if not self._pending:
                self._emit(command)
                return
        self._pending.append(command)

    # ------------------------------------------------------------------ responses

    def _on_response(self, line: bytes, nbytes: int, ts0: int, ts1: int, truncated: bool) -> None:
        pending = self._pending
        word, _, rest = line.partition(b" ")
        echoed = rest.split() if pending and pending[0].quiet else ()
        while pending:
            command = pending[0]
            if command.result == "noreply" or command.name == b"quit":
                self._emit(pending.popleft())  # answers nothing: reported as soon as its turn comes
                continue
            if command.quiet and word not in _ERRORS and (
                    word not in _QUIET_ANSWERS.get(command.name, ()) or not _echoes(command, echoed)):
                command.result = "quiet"  # passed over: answered silently
                self._emit(pending.popleft())
                continue
            break
        else:
            self.orphan_responses += 1
            return
        if command.resp_start is None:
            command.resp_start = ts0
        command.resp_end = ts1
        command.resp_bytes += nbytes
        if truncated:
            command.truncated = True
        name = command.name
        if word in _ERRORS:
            command.error = line[len(word) + 1:].decode("utf-8", "replace") or word.decode()
            command.result = word.decode()
            self._done()
        elif name in _RETRIEVAL:
            if word == b"VALUE":
                command.hits += 1
            elif word == b"END":
                command.result = "END"
                self._done()
            else:
                raise Undecodable(f"memcached: {word[:20]!r} answering {name.decode()}")
        elif name == b"stats" or name == b"lru_crawler" and word != b"OK":
            if word == b"END":
                command.result = "END"
                self._done()
        else:
            command.result = word.decode("ascii", "replace") if not word.isdigit() else "VALUE"
            if word == b"VA" or (word == b"HD" and name == b"mg"):
                command.hits += 1
            self._done()

    def _done(self) -> None:
        command = self._pending.popleft()
        self._emit(command)
        pending = self._pending
        while pending and pending[0].result == "noreply":
            self._emit(pending.popleft())

    def _emit(self, command: _Command) -> None:
        attributes: dict[str, Any] = {}
        if command.result is not None:
            attributes["result"] = command.result
        name = command.name
        if name in _RETRIEVAL or name == b"mg":
            hits = command.hits
            if command.result == "quiet":  # a quiet mg passed over is a miss
                hits = 0
            attributes["hits"] = hits
            attributes["misses"] = max(command.keys - hits, 0) if command.result is not None else 0
        if command.keys != 1:
            attributes["keys"] = command.keys
        if command.truncated:
            attributes["truncated"] = True
        answered = command.resp_start is not None or command.result == "quiet"
        error = command.error is not None
        status = ("ERR" if error else "OK") if answered else None
        self._out.append(Exchange(
            "memcached", command.method, command.target, status, error, command.start, command.end,
            command.resp_start, command.resp_end, command.nbytes, command.resp_bytes, command.error, attributes,
        ))
