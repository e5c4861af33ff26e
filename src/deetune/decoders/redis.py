"""Redis decoder: RESP2 and RESP3, incremental, pipelined, tolerant of truncated captures.

Each direction is split into top-level RESP messages by :class:`_RespReader`, a
resumable parser that keeps only an unfinished header line buffered: bulk
payloads are consumed (and counted) as they arrive, so a reply of any size costs
no memory and a capture gap inside a declared ``$<n>`` payload is stepped over
by counting.  :class:`RedisDecoder` pairs commands with replies in FIFO order,
knowing which commands get no reply (``CLIENT REPLY OFF``/``SKIP``) and which
frames are not replies at all (pub/sub messages, RESP3 pushes).
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from typing import Any, Callable, Iterable

import attrs

from deetune.decoders._barrier import past_barrier
from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable

#: Longest header or inline line accepted (Redis' own inline limit).
_MAX_LINE = 64 * 1024
#: Leading elements kept of a top-level aggregate: command, subcommand and keys,
#: or a push's kind and channel.
_MAX_ITEMS = 4
#: Bytes kept of one captured string (a key, a channel, an error blob); the rest is only counted.
_MAX_CAPTURE = 4096
#: Upper bound of declared lengths and counts: anything larger is garbage, not Redis.
_MAX_LENGTH = 1 << 32
#: Aggregates nested deeper than this are not followed (real replies nest a few levels; a peer
#: nesting `*1` a million times must not cost a million stack entries).
MAX_DEPTH = 64

# RESP type bytes.
_SIMPLE, _ERROR, _INTEGER, _BULK, _ARRAY = 0x2B, 0x2D, 0x3A, 0x24, 0x2A  # + - : $ *
_NULL, _DOUBLE, _BOOLEAN, _BLOB_ERROR, _VERBATIM = 0x5F, 0x2C, 0x23, 0x21, 0x3D  # _ , # ! =
_BIGNUM, _MAP, _SET, _ATTRIBUTE, _PUSH = 0x28, 0x25, 0x7E, 0x7C, 0x3E  # ( % ~ | >
_CR, _LF = 0x0D, 0x0A
_REQUEST = Direction.REQUEST

_REPLY_TYPES = {
    _SIMPLE: "simple", _ERROR: "error", _INTEGER: "integer", _BULK: "bulk", _ARRAY: "array",
    _NULL: "null", _DOUBLE: "double", _BOOLEAN: "boolean", _BLOB_ERROR: "error",
    _VERBATIM: "verbatim", _BIGNUM: "bignum", _MAP: "map", _SET: "set", _PUSH: "push",
}
_ERROR_TYPES = (_ERROR, _BLOB_ERROR)
_TYPE_BYTES = frozenset({*_REPLY_TYPES, _ATTRIBUTE})

_DOUBLE_RE = re.compile(rb"[-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|inf|nan)")
_INLINE_RE = re.compile(rb"[A-Za-z][^\x00-\x08\x0a-\x1f\x7f]*")  # no control bytes but tab

# Commands whose first argument is not a key, or must not be exposed (AUTH, HELLO carry passwords).
_NO_KEY = frozenset({
    "ACL", "ASKING", "AUTH", "BGREWRITEAOF", "BGSAVE", "CLIENT", "CLUSTER", "COMMAND", "CONFIG",
    "DBSIZE", "DEBUG", "DISCARD", "ECHO", "EXEC", "FAILOVER", "FLUSHALL", "FLUSHDB", "FUNCTION",
    "HELLO", "INFO", "KEYS", "LASTSAVE", "LATENCY", "LOLWUT", "MIGRATE", "MODULE", "MONITOR",
    "MULTI", "PING", "PSYNC", "PUBSUB", "QUIT", "RANDOMKEY", "READONLY", "READWRITE", "REPLCONF",
    "REPLICAOF", "RESET", "ROLE", "SAVE", "SCAN", "SCRIPT", "SELECT", "SENTINEL", "SHUTDOWN",
    "SLAVEOF", "SLOWLOG", "SWAPDB", "SYNC", "TIME", "UNWATCH", "WAIT", "WAITAOF", "XREAD",
    "XREADGROUP",
})
# Commands whose first argument names a subcommand (CLIENT REPLY, CONFIG GET, OBJECT ENCODING …).
_CONTAINERS = frozenset({
    "ACL", "CLIENT", "CLUSTER", "COMMAND", "CONFIG", "DEBUG", "FUNCTION", "LATENCY", "MEMORY",
    "MODULE", "OBJECT", "PUBSUB", "SCRIPT", "SENTINEL", "SLOWLOG", "XGROUP", "XINFO",
})
# Where the first key sits when it is not the first argument (index in [command, arg1, arg2, arg3]).
_KEY_INDEX = {
    "BITOP": 2, "MEMORY": 2, "OBJECT": 2, "XGROUP": 2, "XINFO": 2,  # after an operation/subcommand
    "LMPOP": 2, "SINTERCARD": 2, "ZDIFF": 2, "ZINTER": 2, "ZINTERCARD": 2, "ZMPOP": 2,
    "ZUNION": 2,  # after numkeys
    "BLMPOP": 3, "BZMPOP": 3,  # after timeout and numkeys
}
# Script calls: the first key follows numkeys, and exists only when numkeys > 0.
_SCRIPT_CALLS = frozenset({"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"})

# Pub/sub: confirmations answer the (un)subscribe command that names them; messages answer nothing.
_CONFIRMATIONS = frozenset({
    b"subscribe", b"psubscribe", b"ssubscribe", b"unsubscribe", b"punsubscribe", b"sunsubscribe",
})
_SUBSCRIBE_COMMANDS = {kind.decode().upper(): kind for kind in _CONFIRMATIONS}
_MESSAGE_LENGTHS = {b"message": 3, b"smessage": 3, b"pmessage": 4}
# Commands that change whether, or how, commands are answered.
_REPLY_SHAPING = frozenset({"CLIENT", "RESET", *_SUBSCRIBE_COMMANDS})


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "backslashreplace")


_method_names: dict[bytes, str] = {}


def _method(name: bytes | None) -> str:
    """Upper-case command name; the few names a server knows are decoded once."""
    method = _method_names.get(name)  # type: ignore[arg-type]
    if method is None:
        method = _text(name).upper()
        if len(_method_names) < 4096:  # bounded: garbage names must not grow it forever
            _method_names[name] = method  # type: ignore[index]
    return method


def _length(buf: bytes, start: int, stop: int) -> int:
    """A declared length or count: digits, or -1 for RESP2 nulls."""
    digits = buf[start:stop]
    if digits.isdigit() and len(digits) < 12:
        value = int(digits)
        if value <= _MAX_LENGTH:
            return value
    elif digits == b"-1":
        return -1
    elif digits[:1] == b"?":
        raise Undecodable("streamed RESP3 aggregates are not supported")
    raise Undecodable(f"bad RESP length {digits[:20]!r}")


def _whole_command(buf: bytes, pos: int, end: int) -> tuple[int, int, list[bytes | None]] | None:
    """Fast path: a complete ``*<n>`` array of bulk strings at ``pos``.

    Returns (position after it, element count, leading elements), or None when
    the command is incomplete or unusual: the resumable parser then takes over
    (and raises on malformed bytes).
    """
    find = buf.find
    eol = find(b"\r\n", pos, pos + 16)
    if eol < 0:
        return None
    digits = buf[pos + 1:eol]
    if not digits.isdigit():
        return (eol + 2, 0, []) if digits == b"-1" else None
    count = int(digits)
    p = eol + 2
    items: list[bytes | None] = []
    for index in range(count):
        eol = find(b"\r\n", p, p + 16)
        if eol < 0 or buf[p] != _BULK:
            return None
        digits = buf[p + 1:eol]
        if not digits.isdigit():
            return None
        p = eol + 2
        stop = p + int(digits)
        if buf[stop:stop + 2] != b"\r\n":
            return None
        if index < _MAX_ITEMS:
            items.append(buf[p:stop] if stop - p <= _MAX_CAPTURE else buf[p:p + _MAX_CAPTURE])
        p = stop + 2
    return p, count, items


def _whole_reply(buf: bytes, pos: int, end: int, kind: int) -> int:
    """Fast path: the end of a complete ``+``, ``-``, ``:`` or ``$`` reply at ``pos``, or 0.

    Anything else, incomplete or malformed is left to the resumable parser.
    """
    if kind == _BULK:
        eol = buf.find(b"\r\n", pos, pos + 16)
        if eol < 0:
            return 0
        digits = buf[pos + 1:eol]
        if not digits.isdigit():
            return eol + 2 if digits == b"-1" else 0
        stop = eol + 2 + int(digits)
        if stop + 2 > end or buf[stop] != _CR or buf[stop + 1] != _LF:
            return 0
        return stop + 2
    if kind == _SIMPLE or kind == _ERROR:
        eol = buf.find(b"\r\n", pos, pos + _MAX_LINE)
        return eol + 2 if eol >= 0 else 0
    if kind == _INTEGER:
        eol = buf.find(b"\r\n", pos, pos + 24)
        if eol < 0:
            return 0
        digits = buf[pos + 1:eol]
        if digits.isdigit() or (digits[:1] == b"-" and digits[1:].isdigit()):
            return eol + 2
    return 0


class _Message:
    """One top-level RESP message: a command, a reply or a push."""

    __slots__ = ("kind", "count", "items", "text", "start_ns", "end_ns", "nbytes", "truncated", "errors")

    def __init__(self, start_ns: int, kind: int = 0, count: int = 0,
                 items: list[bytes | None] | None = None, text: bytes | None = None,
                 end_ns: int = 0, nbytes: int = 0) -> None:
        self.kind = kind  # type byte of the message proper (attributes skipped); 0 until known
        self.count = count  # elements of an aggregate; -1 for a RESP2 null
        self.items = [] if items is None else items  # leading elements (None: not a string)
        self.text = text  # a scalar's line, or a blob error's text
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.nbytes = nbytes
        self.truncated = False  # a capture gap was stepped over inside it (or cut it short)
        self.errors: dict[int, bytes] | None = None  # error elements of a top-level array, by index


class _RespReader:
    """Splits one direction's byte stream into top-level RESP messages, resumably."""

    def __init__(self, request_side: bool) -> None:
        self._request_side = request_side
        self._buf = b""
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._carry_ts = 0  # timestamp of the chunk holding _buf[0] (an unfinished line)
        self._msg: _Message | None = None
        self._msg_offset = 0  # stream offset of the message's first byte
        self._stack: list[list[Any]] = []  # [elements left, is_attribute] per open aggregate
        self._bulk_left = 0  # bytes of the current bulk payload + CRLF not consumed yet
        self._bulk_parts: list[bytes] | None = None  # kept pieces of that payload
        #: An unfinished line: its stream offset and how much of it was searched for its end
        #: (fed a byte at a time, a long line must not be searched from its start every time).
        self._line_at = -1
        self._line_scanned = 0
        self.last_ts = 0
        #: (reason, message) once the stream could not be followed; the reader then stops.
        self.error: tuple[str, str] | None = None

    def feed(self, data: bytes, size: int, ts: int) -> list[_Message]:
        """The messages this chunk completes; on bytes that cannot be followed, those completed
        before them, with :attr:`error` set."""
        out: list[_Message] = []
        if self.error is not None:
            return out
        carry = len(self._buf) - self._pos
        if carry:
            buf = self._buf
            if not isinstance(buf, bytearray):
                buf = self._buf = bytearray(buf[self._pos:])
            elif self._pos:
                del buf[: self._pos]
            self._base += self._pos
            buf += data  # amortised: one long line fed in pieces costs linear time
        else:
            self._base += len(self._buf)
            self._buf = data
            self._carry_ts = ts
        self._pos = 0
        self.last_ts = ts
        try:
            if not carry and self._msg is None:
                self._pos = self._whole_messages(data, 0, ts, ts, out)
            if self._pos < len(self._buf):
                self._parse(ts, carry, out)
            if self._pos or not carry:
                self._carry_ts = ts
            if size > len(data):
                self._skip_gap(size - len(data), ts, out)
        except Undecodable as exc:  # bytes that are not RESP, unless said otherwise
            self._stop("garbage" if exc.reason == "undecodable" else exc.reason, str(exc))
        return out

    def _stop(self, reason: str, message: str) -> None:
        self.error = (reason, message)
        self._buf = b""
        self._pos = 0
        self._msg = None
        self._stack = []
        self._bulk_left = 0
        self._bulk_parts = None

    def partial(self) -> tuple[_Message, int] | None:
        """The message being received, with its bytes so far."""
        if self._msg is None:
            return None
        return self._msg, self._base + len(self._buf) - self._msg_offset

    def _parse(self, ts: int, carry: int, out: list[_Message]) -> None:
        buf = self._buf
        end = len(buf)
        pos = self._pos
        stack = self._stack
        request_side = self._request_side
        try:
            while pos < end:
                if self._bulk_left:
                    pos = self._take_bulk(buf, pos, end)
                    if self._bulk_left:
                        break
                    if self._element_done(self._kept_bulk()):
                        self._finish(ts, pos, out)
                    continue
                msg = self._msg
                kind = buf[pos]
                if kind not in _TYPE_BYTES and not (request_side and msg is None):
                    raise Undecodable(f"not a RESP type byte: 0x{kind:02x}", reason="garbage")
                if msg is None:
                    start_ns = self._carry_ts if pos < carry else ts
                    if type(buf) is bytes:  # the fast path keeps slices of its buffer as they are
                        stop = self._whole_messages(buf, pos, start_ns, ts, out)
                        if stop > pos:
                            pos = stop
                            continue
                    if request_side and kind != _ARRAY:
                        stop = self._inline(buf, pos, end, start_ns, ts, out)
                        if stop < 0:
                            break
                        pos = stop
                        continue
                    msg = self._msg = _Message(start_ns)
                    self._msg_offset = self._base + pos
                line_at = self._base + pos
                start = pos + self._line_scanned - 1 if line_at == self._line_at else pos
                eol = buf.find(b"\r\n", start, pos + _MAX_LINE)
                if eol < 0:
                    if end - pos >= _MAX_LINE:
                        raise Undecodable("RESP line longer than 64 KiB", reason="line_limit")
                    self._line_at, self._line_scanned = line_at, end - pos
                    break
                top = not stack
                if request_side and kind != (_ARRAY if top else _BULK):
                    raise Undecodable("command is not an array of bulk strings", reason="garbage")
                if kind == _BULK or kind == _BLOB_ERROR or kind == _VERBATIM:
                    length = _length(buf, pos + 1, eol)
                    pos = eol + 2
                    if top:
                        msg.kind = kind
                    if length < 0:
                        if kind != _BULK or request_side:
                            raise Undecodable("null length on a non-bulk RESP type")
                        msg.count = -1 if top else msg.count
                        value = None
                    else:
                        keep = (top and kind == _BLOB_ERROR) or (
                            len(stack) == 1 and not stack[0][1] and len(msg.items) < _MAX_ITEMS)
                        stop = pos + length
                        if stop + 2 > end:
                            self._bulk_left = length + 2
                            self._bulk_parts = [] if keep else None
                            continue
                        if buf[stop] != _CR or buf[stop + 1] != _LF:
                            raise Undecodable("bulk string not followed by CRLF", reason="garbage")
                        value = bytes(buf[pos:min(stop, pos + _MAX_CAPTURE)]) if keep else None
                        pos = stop + 2
                elif kind in (_ARRAY, _MAP, _SET, _PUSH, _ATTRIBUTE):
                    count = _length(buf, pos + 1, eol)
                    pos = eol + 2
                    if count < 0 and kind != _ARRAY:
                        raise Undecodable("null count on a non-array RESP aggregate")
                    if kind == _MAP or kind == _ATTRIBUTE:
                        count *= 2
                    if top and kind != _ATTRIBUTE:
                        msg.kind, msg.count = kind, count
                    if count > 0:
                        if len(stack) >= MAX_DEPTH:
                            raise Undecodable(f"RESP aggregates nested deeper than {MAX_DEPTH}",
                                              reason="nesting_limit")
                        stack.append([count, kind == _ATTRIBUTE])
                        continue
                    if request_side:  # *0 / *-1: Redis ignores it, no reply
                        self._msg = None
                        continue
                    if kind == _ATTRIBUTE:  # empty: annotates nothing, is no element
                        continue
                    value = None
                else:
                    value = bytes(buf[pos + 1:eol])
                    _check_scalar(kind, value)
                    pos = eol + 2
                    if top:
                        msg.kind = kind
                    elif (kind == _ERROR) and len(stack) == 1 and not stack[0][1]:
                        # An error inside an array (an EXEC reply): which element, and why.
                        if msg.errors is None:
                            msg.errors = {}
                        msg.errors[msg.count - stack[0][0]] = value[:_MAX_CAPTURE]
                if self._element_done(value):
                    self._finish(ts, pos, out)
        finally:
            self._pos = pos

    def _whole_messages(self, buf: bytes, pos: int, start_ns: int, ts: int,
                        out: list[_Message]) -> int:
        """Fast path from a message boundary: complete common messages; returns where it stopped."""
        end = len(buf)
        if self._request_side:
            while pos < end and buf[pos] == _ARRAY:
                whole = _whole_command(buf, pos, end)
                if whole is None:
                    break
                stop, count, items = whole
                if count:  # Redis ignores empty commands (*0, *-1)
                    out.append(_Message(start_ns, _ARRAY, count, items, None, ts, stop - pos))
                pos = stop
                start_ns = ts
            return pos
        while pos < end:
            kind = buf[pos]
            stop = _whole_reply(buf, pos, end, kind)
            if not stop:
                break
            if kind == _BULK:
                null = -1 if buf[pos + 1] == 0x2D else 0  # $-1
                out.append(_Message(start_ns, kind, null, None, None, ts, stop - pos))
            else:
                out.append(_Message(start_ns, kind, 0, None, buf[pos + 1:stop - 2], ts, stop - pos))
            pos = stop
            start_ns = ts
        return pos

    def _inline(self, buf: bytes, pos: int, end: int, start_ns: int, ts: int,
                out: list[_Message]) -> int:
        """An inline command (``PING\\r\\n``, as typed in telnet); -1 when incomplete."""
        if not (buf[pos:pos + 1].isalpha() or buf[pos:pos + 1].isspace()):
            raise Undecodable("neither a RESP array nor an inline command", reason="garbage")
        line_at = self._base + pos
        start = pos + self._line_scanned - 1 if line_at == self._line_at else pos
        newline = buf.find(b"\n", start, pos + _MAX_LINE)
        if newline < 0:
            if end - pos >= _MAX_LINE:
                raise Undecodable("inline command longer than 64 KiB", reason="line_limit")
            self._line_at, self._line_scanned = line_at, end - pos
            return -1
        line = bytes(buf[pos:newline]).rstrip(b"\r")
        if line.strip():  # Redis ignores empty lines
            if not _INLINE_RE.fullmatch(line):
                raise Undecodable("neither a RESP array nor an inline command", reason="garbage")
            words = line.split()
            items: list[bytes | None] = [word[:_MAX_CAPTURE] for word in words[:_MAX_ITEMS]]
            out.append(_Message(start_ns, _ARRAY, len(words), items, None, ts, newline + 1 - pos))
        return newline + 1

    def _take_bulk(self, buf: bytes, pos: int, end: int) -> int:
        """Consume what is here of a bulk payload and its CRLF; keep a prefix if asked."""
        left = self._bulk_left
        take = min(left, end - pos)
        payload_left = left - 2 if left > 2 else 0
        parts = self._bulk_parts
        if parts is not None and payload_left:
            room = _MAX_CAPTURE - sum(map(len, parts))
            keep = min(take, payload_left, room)
            if keep > 0:
                parts.append(bytes(buf[pos:pos + keep]))
        if take > payload_left:  # this piece holds (part of) the CRLF: check it
            crlf = b"\r\n"[2 - (left - payload_left):]
            if buf[pos + payload_left:pos + take] != crlf[:take - payload_left]:
                raise Undecodable("bulk string not followed by CRLF", reason="garbage")
        self._bulk_left = left - take
        return pos + take

    def _kept_bulk(self) -> bytes | None:
        parts, self._bulk_parts = self._bulk_parts, None
        return None if parts is None else b"".join(parts)

    def _element_done(self, value: bytes | None) -> bool:
        """Account one finished element; True when it finished the top-level message."""
        stack = self._stack
        msg = self._msg
        if not stack:
            msg.text = value
            return True
        frame = stack[-1]
        if len(stack) == 1 and not frame[1] and len(msg.items) < _MAX_ITEMS:
            msg.items.append(value)
        while True:
            frame[0] -= 1
            if frame[0]:
                return False
            stack.pop()
            if frame[1]:  # an attribute annotates what follows; it is not an element
                return False
            if not stack:
                return True
            frame = stack[-1]
            if len(stack) == 1 and not frame[1] and len(msg.items) < _MAX_ITEMS:
                msg.items.append(None)

    def _finish(self, ts: int, pos: int, out: list[_Message]) -> None:
        msg = self._msg
        msg.end_ns = ts
        msg.nbytes = self._base + pos - self._msg_offset
        out.append(msg)
        self._msg = None

    def _skip_gap(self, gap: int, ts: int, out: list[_Message]) -> None:
        """Step over bytes that moved but were not captured, using declared bulk lengths.  When they
        hide framing, the message they cut ends with them (where the call ended) and the reader
        stops (:attr:`error`): how many messages the rest of the gap held is unknown."""
        if self._pos >= len(self._buf):
            self._base += len(self._buf)
            self._buf = b""
            self._pos = 0
            while gap and self._bulk_left:
                step = min(gap, self._bulk_left)
                self._bulk_left -= step
                self._base += step
                gap -= step
                self._msg.truncated = True
                if not self._bulk_left and self._element_done(self._kept_bulk()):
                    self._finish(ts, 0, out)
            if not gap:
                return
        msg = self._msg
        if msg is not None and (msg.kind if not self._request_side else msg.items and msg.items[0] is not None):
            msg.truncated = True
            msg.end_ns = ts
            msg.nbytes = self._base + len(self._buf) + gap - self._msg_offset
            out.append(msg)
        raise Undecodable("a capture gap hides the RESP framing", reason="gap")


def _check_scalar(kind: int, line: bytes) -> None:
    if kind == _SIMPLE or kind == _ERROR:
        return
    if kind == _INTEGER or kind == _BIGNUM:
        digits = line[1:] if line[:1] in (b"-", b"+") else line
        if digits.isdigit():
            return
    elif kind == _NULL:
        if not line:
            return
    elif kind == _BOOLEAN:
        if line == b"t" or line == b"f":
            return
    elif kind == _DOUBLE:
        if _DOUBLE_RE.fullmatch(line):
            return
    else:
        raise Undecodable(f"unknown RESP type byte 0x{kind:02x}")
    raise Undecodable(f"bad RESP {chr(kind)} value {line[:20]!r}")


class _Command:
    """A command waiting for its reply.

    Up to ``max_pending`` of them wait per connection and direction (a client pipelining commands
    nobody answers keeps the queue full): each is kept small, its message without its leading
    elements (``msg.items``, dropped once read) and its attributes made when first asked for
    (``{"argc": …}`` unless the command had more).  A GET of a short key: 250 bytes waiting instead of 600."""

    __slots__ = ("msg", "method", "target", "_attributes", "replies", "confirmations", "eligible")

    def __init__(self, msg: _Message, method: str, target: str, attributes: dict[str, Any] | None,
                 replies: bool) -> None:
        self.msg = msg
        self.method = method
        self.target = target
        self._attributes = attributes
        self.replies = replies  # False: the server sends nothing back (CLIENT REPLY OFF/SKIP)
        #: For (un)subscribe commands: the confirmation kind, and how many come (None: unknown).
        self.confirmations: tuple[bytes, int | None] | None = None
        self.eligible = True  # may be paired past a barrier (see deetune.decoders._barrier)

    @property
    def attributes(self) -> dict[str, Any]:
        attributes = self._attributes
        if attributes is None:
            attributes = self._attributes = {"argc": self.msg.count - 1}
        return attributes


def _too_short(data: bytes, request: bool) -> bool:
    """Whether ``data`` is too short to tell whether it starts a message: a command's start takes
    two lines and the command name's first byte (``*2\\r\\n$3\\r\\nG``), a reply's one line."""
    lines = data.count(b"\r\n")
    if not request:
        return lines < 1
    return lines < 2 or (lines == 2 and data.endswith(b"\r\n"))


#: In the queue of commands: an unknown number of commands was lost here (see RedisDecoder).
_BARRIER = _Command(_Message(0), "", "", {}, True)
#: A waiting command's message keeps no leading elements (see _Command).
_NO_ITEMS: Any = ()


def _command_end(command: _Command) -> int | None:
    return -1 if command is _BARRIER else command.msg.end_ns


def _eligible(command: _Command) -> bool:
    return command.eligible and command is not _BARRIER


def _command_target(method: str, items: list[bytes | None]) -> str:
    if method in _NO_KEY:
        return ""
    index = _KEY_INDEX.get(method, 1)
    if method in _SCRIPT_CALLS:
        numkeys = items[2] if len(items) > 2 else None
        index = 3 if numkeys and numkeys.isdigit() and int(numkeys) > 0 else _MAX_ITEMS
    return _text(items[index]) if index < len(items) else ""


#: Command names an inline command (``PING\r\n``, as typed in telnet) is recognised by when a
#: connection is detected; once it is, any word is a command.
_INLINE_COMMANDS = frozenset({
    "APPEND", "AUTH", "BGSAVE", "CLIENT", "CONFIG", "DBSIZE", "DECR", "DECRBY", "DEL", "ECHO", "EXISTS", "EXPIRE",
    "FLUSHALL", "FLUSHDB", "GET", "GETSET", "HDEL", "HELLO", "HGET", "HGETALL", "HMSET", "HSET", "INCR", "INCRBY",
    "INFO", "KEYS", "LLEN", "LPOP", "LPUSH", "LRANGE", "MGET", "MONITOR", "MSET", "PING", "PSUBSCRIBE", "PUBLISH",
    "QUIT", "RPOP", "RPUSH", "SADD", "SAVE", "SCAN", "SELECT", "SET", "SETEX", "SMEMBERS", "SUBSCRIBE", "TTL",
    "TYPE", "UNSUBSCRIBE", "ZADD", "ZRANGE",
})
_INLINE_START = re.compile(rb"([A-Za-z]{2,16})(?:[ \t][^\r\n]{0,200})?\r?\n")


class RedisDecoder(Decoder):
    """Redis RESP2/RESP3 commands and replies of one connection.

    Losing the framing (a gap the declared lengths cannot step over, bytes that are not RESP):
    the message cut is reported as ``truncated``, and the direction is taken up again at the next
    chunk that starts a message.  Commands lost in between put a barrier in the queue: replies
    after those of the commands seen before it are skipped until one starts after a command
    queued behind it ended.  Replies lost report the commands waiting as answered by nothing
    (``gap``) and put the same barrier.  Counts: ``unsolicited_response``, ``skipped_bytes``,
    ``resync:<reason>``, ``pending_limit``.  Commands between MULTI and EXEC are reported when
    EXEC is answered, each with its own outcome from EXEC's reply (``transaction``).
    """

    protocol = "redis"
    default_ports = (6379,)
    #: Commands awaiting replies beyond which the replies are deemed lost: those commands are
    #: reported unanswered (counted as ``pending_limit``), and replies for them skipped.
    max_pending = 8192
    #: Commands of one MULTI held for EXEC's outcome; beyond, they are reported as answered (QUEUED).
    max_queued = 1024

    _REQUEST_START = re.compile(rb"\*[1-9][0-9]{0,6}\r\n\$([1-9][0-9]{0,8})\r\n")
    _COMMAND_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9|_-]*")
    _REPLY_START = re.compile(
        rb"\+[A-Za-z]+\r\n"  # +OK, +PONG, +QUEUED: one word (POP3 says "+OK <text>")
        rb"|-[A-Z]+[ \r]"  # -ERR …, -NOAUTH …, -WRONGTYPE …
        rb"|:-?[0-9]{1,19}\r\n"
        rb"|\$(?:-1|[0-9]{1,10})\r\n"
        rb"|[*%~>|](?:-1|[0-9]{1,10})\r\n(?:[-+:$*%~>_,#!=(|]|$)"
        rb"|_\r\n|#[tf]\r\n"
    )

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        try:
            if direction is Direction.REQUEST:
                return cls._command_start(data) or cls._inline_start(data)
            return cls._REPLY_START.match(data) is not None
        except Exception:  # detection must never raise, whatever it is given
            return False

    @classmethod
    def _command_start(cls, data: bytes) -> bool:
        head = cls._REQUEST_START.match(data)
        if head is None:
            return False
        name = data[head.end():head.end() + int(head.group(1))]
        return bool(name) and cls._COMMAND_NAME.fullmatch(name) is not None

    @staticmethod
    def _inline_start(data: bytes) -> bool:
        line = _INLINE_START.match(data)
        if line is None or line.group(1).upper().decode() not in _INLINE_COMMANDS:
            return False
        if b" HTTP/1." in line.group(0)[-12:]:  # an HTTP request line on Redis' port
            return False
        # What follows is more inline commands, not RESP (the tail of a command whose start was lost).
        following = data[line.end() : line.end() + 1]
        return following not in (b"$", b"*")

    def __init__(self) -> None:
        self._commands = _RespReader(request_side=True)
        self._replies = _RespReader(request_side=False)
        self._pending: deque[_Command] = deque()
        self._replies_off = False  # CLIENT REPLY OFF in force
        self._skip_next = False  # CLIENT REPLY SKIP: the next command gets no reply
        self._resp3 = False
        self._channels = 0  # RESP2 subscriptions (channels + patterns), as the server counts them
        self._shard_channels = 0
        #: Confirmations still to come for the last answered (un)subscribe command.
        self._extra_kind: bytes | None = None
        self._extra_left: int | None = 0
        #: Replies that matched no command (capture started mid-stream).
        self.orphan_replies = 0
        #: Between MULTI's OK and EXEC: the exchanges of the queued commands, held for EXEC's reply.
        self._queued: list[Exchange] | None = None
        #: A direction whose framing was lost waits for a chunk that starts a message.
        self._commands_lost = False
        self._replies_lost = False
        #: Short chunks held while telling whether they start a message (see _take_up).
        self._held_start: list[Chunk] = []

    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        out: list[Exchange] = []
        try:
            if chunk.direction is _REQUEST:
                chunks = [chunk]
                if self._commands_lost:
                    chunks = self._take_up(chunk, self._command_start, True)
                    if not chunks:
                        return out
                for piece in chunks:
                    for msg in self._commands.feed(piece.data, piece.size, piece.ts_ns):
                        self._on_command(msg)
                if self._commands.error is not None:
                    self._lose_commands(*self._commands.error)
                if len(self._pending) > self.max_pending:
                    self._too_many_pending(out)
            else:
                chunks = [chunk]
                if self._replies_lost:
                    chunks = self._take_up(chunk, self._reply_start, False)
                    if not chunks:
                        return out
                for piece in chunks:
                    for msg in self._replies.feed(piece.data, piece.size, piece.ts_ns):
                        self._on_reply(msg, out)
                if self._replies.error is not None:
                    self._lose_replies(*self._replies.error, out)
        except Undecodable as exc:
            exc.exchanges[:0] = out
            raise
        except Exception as exc:  # a bug must not escape as anything but "stop decoding"
            raise Undecodable(f"redis decoder error: {exc!r}", exchanges=out, reason="decoder_error") from exc
        if self._pending and not self._pending[0].replies:
            self._flush_unanswered(out)
        return out

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        out: list[Exchange] = self._release_queued(None)
        partial = None if self._replies_lost else self._replies.partial()
        while self._pending:
            command = self._pending.popleft()
            if command is _BARRIER:
                continue
            if command.replies and partial is not None and partial[0].kind != _PUSH:
                out.append(self._incomplete(command, *partial))
                partial = None
            else:
                out.append(self._unanswered(command))
        return out

    # Losing and taking up the framing.

    def _lose_commands(self, reason: str, message: str) -> None:
        self.count(f"resync:{reason}")
        self._commands_lost = True
        self._add_barrier()

    def _lose_replies(self, reason: str, message: str, out: list[Exchange]) -> None:
        self.count(f"resync:{reason}")
        self._replies_lost = True
        pending = self._pending
        out.extend(self._release_queued(None))
        # Commands seen after commands were lost (behind the last barrier) came after those lost
        # ones: the replies lost with these answered the earlier commands (see HttpDecoder).
        keep = next((len(pending) - i for i in range(len(pending) - 1, -1, -1) if pending[i] is _BARRIER), 0)
        while len(pending) > keep:
            command = pending.popleft()
            if command is _BARRIER:
                continue
            exchange = self._unanswered(command)
            if command.replies:
                exchange.attributes["gap"] = True
            out.append(exchange)
        self._add_barrier()

    def _add_barrier(self) -> None:
        if not self._pending or self._pending[-1] is not _BARRIER:
            self._pending.append(_BARRIER)

    def _take_up(self, chunk: Chunk, starts: Callable[[bytes], bool], request: bool) -> list[Chunk]:
        """The chunks to follow the lost direction again from, when this one (or it joined to short
        ones held before it: a message's first line may come in pieces) starts a message; else none."""
        held, self._held_start = self._held_start, []
        if held and held[-1].size > len(held[-1].data):
            self.count("skipped_bytes", sum(c.size for c in held))
            held = []
        chunks = [*held, chunk]
        joined = [b"".join(c.data for c in chunks[i:]) for i in range(len(chunks))]

        for i, data in enumerate(joined):
            if chunk.data and starts(data) and (request or self._reply_may_start(chunks[i])):
                if request:
                    self._commands, self._commands_lost = _RespReader(request_side=True), False
                else:
                    self._replies, self._replies_lost = _RespReader(request_side=False), False
                self.count("skipped_bytes", sum(c.size for c in chunks[:i]))
                return chunks[i:]
        if chunk.data and chunk.size == len(chunk.data):
            for i, data in enumerate(joined):
                if data and len(data) < 64 and _too_short(data, request):
                    self._held_start = chunks[i:]  # too short to tell yet
                    self.count("skipped_bytes", sum(c.size for c in chunks[:i]))
                    return []
        self.count("skipped_bytes", sum(c.size for c in chunks))
        return []

    def _reply_may_start(self, chunk: Chunk) -> bool:
        """Replies lost: only a reply that started after a command seen since can be paired."""
        pending = self._pending
        if len(pending) < 2 or pending[0] is not _BARRIER:
            return False
        return any(_eligible(c) and c.msg.end_ns <= chunk.ts_ns for c in itertools.islice(pending, 1, None))

    def _reply_start(self, data: bytes) -> bool:
        return self._REPLY_START.match(data) is not None

    def _too_many_pending(self, out: list[Exchange]) -> None:
        self.count("pending_limit")
        pending = self._pending
        while pending:
            command = pending.popleft()
            if command is not _BARRIER:
                out.append(self._unanswered(command))
        self._add_barrier()

    # Commands.

    def _on_command(self, msg: _Message) -> None:
        items = msg.items
        method = _method(items[0])
        attributes: dict[str, Any] | None = None  # {"argc": …}, made when asked for (see _Command)
        if method in _CONTAINERS and len(items) > 1:
            attributes = {"argc": msg.count - 1, "subcommand": _text(items[1]).upper()}
        command = _Command(msg, method, _command_target(method, items), attributes, True)
        if method in _REPLY_SHAPING or self._replies_off or self._skip_next:
            self._shape_reply(command)
        msg.items = _NO_ITEMS  # read: the command waits without them
        pending = self._pending
        if pending and pending[0] is not _BARRIER:
            command.eligible = False
        pending.append(command)

    def _shape_reply(self, command: _Command) -> None:
        """Whether the command gets a reply, and of which form (CLIENT REPLY, subscriptions)."""
        method = command.method
        items = command.msg.items
        if (method == "CLIENT" and command.attributes.get("subcommand") == "REPLY"
                and command.msg.count == 3):
            mode = _text(items[2]).upper()
            if mode == "ON":  # answered +OK, even when replies were off
                self._replies_off = self._skip_next = False
            elif mode == "OFF":
                self._replies_off = True
                command.replies = False
            elif mode == "SKIP":  # SKIP itself is not answered either
                self._skip_next = not self._replies_off
                command.replies = False
        elif self._replies_off:
            command.replies = False
        elif self._skip_next:
            self._skip_next = False
            command.replies = False
        if method == "RESET":
            self._replies_off = self._skip_next = False
        kind = _SUBSCRIBE_COMMANDS.get(method)
        if kind is not None and command.replies:
            argc = command.msg.count - 1
            command.confirmations = (kind, argc if argc else None)

    def _flush_unanswered(self, out: list[Exchange]) -> None:
        """Commands that get no reply are reported as soon as the ones before them are."""
        pending = self._pending
        while pending and not pending[0].replies:
            out.append(self._unanswered(pending.popleft()))

    # Replies.

    def _on_reply(self, msg: _Message, out: list[Exchange]) -> None:
        kind = msg.kind
        if kind == _PUSH or kind == _ARRAY:
            first = msg.items[0] if msg.items else None
            name = first.lower() if first is not None and len(first) < 16 else None
            if name in _CONFIRMATIONS and (kind == _PUSH or self._expects_confirmation(name)):
                self._on_confirmation(msg, name, out)
                return
            if kind == _PUSH:
                self._resp3 = True
                out.append(self._push(msg, name))
                return
            if (name in _MESSAGE_LENGTHS and msg.count == _MESSAGE_LENGTHS[name]
                    and not self._resp3 and (self._channels or self._shard_channels)):
                out.append(self._push(msg, name))
                return
        pending = self._pending
        if pending and pending[0] is _BARRIER:
            for lost in past_barrier(pending, msg.start_ns, _command_end, _eligible) or ():
                if lost is _BARRIER:
                    continue
                exchange = self._unanswered(lost)
                exchange.attributes["gap"] = True
                out.append(exchange)
        if not pending or pending[0] is _BARRIER:
            self.orphan_replies += 1
            self.count("unsolicited_response")
            return
        command = pending.popleft()
        method = command.method
        if method == "HELLO" and kind not in _ERROR_TYPES:
            self._resp3 = kind == _MAP  # HELLO 3 answers with a map, HELLO 2 with an array
        elif method == "RESET":
            self._resp3 = False
            self._channels = self._shard_channels = 0
        exchange = self._answered(command, msg)
        queued = self._queued
        if queued is not None and method not in ("EXEC", "DISCARD", "MULTI") and len(queued) < self.max_queued:
            queued.append(exchange)  # its outcome comes with EXEC's reply
        elif method == "EXEC" or method == "DISCARD":
            out.extend(self._release_queued(msg if method == "EXEC" else None))
            out.append(exchange)
        else:
            out.append(exchange)
            if method == "MULTI" and kind not in _ERROR_TYPES:
                self._queued = []
        if pending and not pending[0].replies:
            self._flush_unanswered(out)

    def _release_queued(self, exec_reply: _Message | None) -> list[Exchange]:
        """The commands of a transaction, each with its outcome from EXEC's reply (an array with
        one reply per command, errors among them); without it (DISCARD, EXECABORT, a null reply
        after WATCH, or the connection ended), as discarded."""
        queued, self._queued = self._queued, None
        if not queued:
            return []
        executed = exec_reply is not None and exec_reply.kind == _ARRAY and exec_reply.count == len(queued)
        out = []
        errors = exec_reply.errors or {} if executed else {}
        for index, exchange in enumerate(queued):
            attributes = exchange.attributes
            attributes["transaction"] = "executed" if executed else "discarded"
            text = errors.get(index)
            if text is not None:
                exchange = attrs.evolve(exchange, status="ERR", error=True, error_message=_text(text))
            out.append(exchange)
        return out

    def _expects_confirmation(self, name: bytes) -> bool:
        if self._extra_kind == name and self._extra_left != 0:
            return True
        confirmations = self._head_confirmations()
        return confirmations is not None and confirmations[0] == name

    def _head_confirmations(self) -> tuple[bytes, int | None] | None:
        return self._pending[0].confirmations if self._pending else None  # a barrier's is None

    def _on_confirmation(self, msg: _Message, name: bytes, out: list[Exchange]) -> None:
        """(Un)subscribe confirmations: one per channel; the first one answers the command."""
        count = msg.items[2] if len(msg.items) > 2 else None
        remaining = int(count) if count is not None and count.isdigit() else None
        if remaining is not None:
            if name in (b"ssubscribe", b"sunsubscribe"):
                self._shard_channels = remaining
            else:
                self._channels = remaining
        head = self._head_confirmations()
        head_matches = head is not None and head[0] == name
        if self._extra_kind == name and (
                (self._extra_left is None and not head_matches) or self._extra_left):
            # A further confirmation of the command already answered.
            if self._extra_left:
                self._extra_left -= 1
            elif remaining == 0:  # unsubscribe-all has reached the last channel
                self._extra_left = 0
            return
        if not head_matches:
            self.orphan_replies += 1
            return
        command = self._pending.popleft()
        expected = head[1]
        self._extra_kind = name
        self._extra_left = expected - 1 if expected is not None else (0 if remaining == 0 else None)
        out.append(self._answered(command, msg))
        self._flush_unanswered(out)

    # Exchanges.

    @staticmethod
    def _answered(command: _Command, reply: _Message) -> Exchange:
        request = command.msg
        attributes = command.attributes
        kind = reply.kind
        attributes["reply_type"] = "null" if reply.count < 0 else _REPLY_TYPES[kind]
        if request.truncated or reply.truncated:
            attributes["truncated"] = True
        error = kind == _ERROR or kind == _BLOB_ERROR
        return Exchange(
            "redis", command.method, command.target, "ERR" if error else "OK", error,
            request.start_ns, request.end_ns, reply.start_ns, reply.end_ns,
            request.nbytes, reply.nbytes, _text(reply.text) if error else None, attributes,
        )

    @staticmethod
    def _unanswered(command: _Command) -> Exchange:
        request = command.msg
        attributes = command.attributes
        if request.truncated:
            attributes["truncated"] = True
        return Exchange(
            "redis", command.method, command.target, None, False,
            request.start_ns, request.end_ns, None, None, request.nbytes, 0, None, attributes,
        )

    def _incomplete(self, command: _Command, reply: _Message, nbytes: int) -> Exchange:
        """The connection closed while this command's reply was still arriving."""
        request = command.msg
        attributes = command.attributes
        attributes["incomplete"] = True
        if reply.kind:
            attributes["reply_type"] = _REPLY_TYPES[reply.kind]
        error = reply.kind in _ERROR_TYPES
        status = ("ERR" if error else "OK") if reply.kind else None
        return Exchange(
            "redis", command.method, command.target, status, error,
            request.start_ns, request.end_ns, reply.start_ns, self._replies.last_ts,
            request.nbytes, nbytes, None, attributes,
        )

    @staticmethod
    def _push(msg: _Message, name: bytes | None) -> Exchange:
        """A frame the server sent on its own (pub/sub message, invalidation): no command."""
        items = msg.items
        attributes: dict[str, Any] = {"push": True, "reply_type": _REPLY_TYPES[msg.kind]}
        channel_index = 1
        if name == b"pmessage":
            attributes["pattern"] = _text(items[1])
            channel_index = 2
        target = _text(items[channel_index]) if len(items) > channel_index else ""
        if msg.truncated:
            attributes["truncated"] = True
        return Exchange(
            "redis", _text(name).upper(), target, "OK", False,
            msg.start_ns, msg.start_ns, msg.start_ns, msg.end_ns, 0, msg.nbytes, None, attributes,
        )
