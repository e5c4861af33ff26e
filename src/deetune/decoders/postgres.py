"""PostgreSQL frontend/backend protocol 3.0 decoder.

Wire format: after an untyped start-up message (length, protocol code, parameters),
every message is a type byte, a 4-byte big-endian length (itself included) and a
body.  A connection opens with SSLRequest/GSSENCRequest (answered by one byte,
``S``/``G`` or ``N``) or the StartupMessage, authentication round trips, and
ReadyForQuery; then the client sends simple queries (``Q``) or extended-protocol
messages (Parse, Bind, Describe, Execute, Close, Sync, Flush), possibly pipelined.

Pairing.  Every request message the server answers is an *operation* queued in
order; backend messages complete the operation at the head of the queue
(ParseComplete a Parse, ReadyForQuery a Sync or a Query, CommandComplete an
Execute …).  Operations are grouped into exchanges: a Query (with its COPY data)
is one exchange; in the extended protocol the messages up to an Execute are one
(``EXECUTE`` with the statement text the portal was bound to), and a Sync
directly behind an Execute joins it, so the usual Parse/Bind/Describe/Execute/Sync
burst is one exchange from the first request byte to ReadyForQuery.  After an
ErrorResponse the server skips everything up to the next Sync: the exchanges it
skipped are reported as errors (``aborted``), the one that failed carries the
SQLSTATE and message.

Flush messages (5 bytes each) are counted in no exchange.  Not decoded: anything after an
accepted SSLRequest or GSSENCRequest (encrypted),
the replication sub-protocol (``CopyBoth``).  Passwords and SASL messages are
counted, never kept.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any, Iterable

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable
from deetune.decoders.framing import Framer

__all__ = ["PostgresDecoder"]

#: Statement text kept for ``target`` (bytes).
MAX_STATEMENT_BYTES = 16 * 1024
#: Bytes kept of a backend message (error fields, command tags).
RESPONSE_KEEP = 2048
#: Prepared statements and portals remembered per connection (oldest forgotten first).
MAX_STATEMENTS = 1024
#: Operations awaiting a response beyond which the response direction is deemed lost.
MAX_PENDING = 1 << 16
#: Largest message length believed (the server's own limit for most messages is 1 GB).
MAX_LENGTH = 1 << 30

PROTOCOL_3 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_unpack_u32 = _U32.unpack_from

# Frontend message types that the server answers, and how (the operation kinds).
_PARSE, _BIND, _DESCRIBE_S, _DESCRIBE_P, _EXECUTE, _CLOSE, _SYNC, _QUERY, _STARTUP, _FUNCTION = range(10)
_FRONTEND_TYPES = frozenset(b"BCDEFHPQSXcdfp")
_BACKEND_TYPES = frozenset(b"123ACDEGHIKNRSTVWZcdnstv")
# Backend messages that may come at any time and answer nothing.
_ASYNC = frozenset(b"NAS")
_ROW_COUNT_COMMANDS = frozenset((b"SELECT", b"INSERT", b"UPDATE", b"DELETE", b"COPY", b"FETCH", b"MOVE", b"MERGE"))
# (operation << 8 | backend type) that completes the operation.
_COMPLETES = frozenset((
    _PARSE << 8 | 0x31, _BIND << 8 | 0x32, _CLOSE << 8 | 0x33, _SYNC << 8 | 0x5A,  # '1' '2' '3' 'Z'
    _DESCRIBE_S << 8 | 0x54, _DESCRIBE_S << 8 | 0x6E, _DESCRIBE_P << 8 | 0x54, _DESCRIBE_P << 8 | 0x6E,  # 'T' 'n'
    _EXECUTE << 8 | 0x49, _EXECUTE << 8 | 0x73,  # EmptyQueryResponse, PortalSuspended
))
_BEFORE_BIND = frozenset(("", "PARSE", "DESCRIBE", "CLOSE"))
_REQUEST = Direction.REQUEST
#: CommandComplete tags read so far (bounded): tag → (command, rows to add or None).
_TAGS: dict[bytes, tuple[str, int | None]] = {}
MAX_TAGS = 4096


def _command_tag(tag: bytes) -> tuple[str, int | None]:
    """A CommandComplete tag's command and the rows it counts (None: none counted)."""
    parsed = _TAGS.get(tag)
    if parsed is None:
        rows_added = None
        command, _, rows = tag.rpartition(b" ")
        if rows.isdigit() and command:
            command = command.partition(b" ")[0]
            if command in _ROW_COUNT_COMMANDS:
                rows_added = int(rows)
        else:
            command = tag
        parsed = (command.decode("ascii", "replace"), rows_added)
        if len(_TAGS) < MAX_TAGS:
            _TAGS[tag] = parsed
    return parsed
_TEXT_BYTES = bytes([9, 10, 13, *range(0x20, 0x7F), *range(0x80, 0x100)])


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _cstring(body: bytes, pos: int) -> tuple[bytes, int]:
    """A NUL-terminated string at ``pos`` (all that is kept when the NUL was cut off)."""
    end = body.find(b"\x00", pos)
    if end < 0:
        return body[pos:], len(body)
    return body[pos:end], end + 1


def _error_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields: one code byte and a C string each."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos]:
        code = chr(body[pos])
        value, pos = _cstring(body, pos + 1)
        fields[code] = _text(value)
    return fields


def _startup_parameters(body: bytes) -> dict[str, str]:
    params: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos]:
        key, pos = _cstring(body, pos)
        value, pos = _cstring(body, pos)
        params[_text(key)] = _text(value)
    return params


class _Frontend(Framer):
    """Client → server: the untyped start-up message, then typed messages."""

    keep = MAX_STATEMENT_BYTES + 512
    length_at = 1  # type byte, then the length (itself included)
    length_adds = 1
    min_size = 5
    max_size = MAX_LENGTH

    def __init__(self) -> None:
        super().__init__()
        #: The next message has no type byte (start-up, SSLRequest, GSSENCRequest, CancelRequest).
        self.special = True

    def header(self, buf: bytes, pos: int, end: int) -> int:
        """The untyped start-up message: a length (itself included), then a code."""
        if end - pos < 4:
            return 0
        length = _unpack_u32(buf, pos)[0]
        if length < 8 or length > 10000:
            raise Undecodable(f"postgres: bad start-up message length {length}")
        self.special = False
        return length


class _Backend(Framer):
    """Server → client: typed messages, and the one-byte answer to SSLRequest/GSSENCRequest."""

    keep = RESPONSE_KEEP
    length_at = 1
    length_adds = 1
    min_size = 5
    max_size = MAX_LENGTH

    def header(self, buf: bytes, pos: int, end: int) -> int:
        """(While ``special``.)  The single byte answering an SSLRequest or GSSENCRequest."""
        self.special = False
        return 1


class _Group:
    """Request messages reported as one exchange, and the response gathered for them."""

    __slots__ = ("method", "target", "attrs", "req_start", "req_end", "req_bytes", "resp_start", "resp_end",
                 "resp_bytes", "ops", "closed", "error_message", "copy_in", "aborted", "status", "synced", "held")

    def __init__(self, method: str, ts0: int) -> None:
        self.method = method
        self.target = ""
        #: The exchange's attributes (``command``, ``rows``, ``truncated`` … as they come).
        self.attrs: dict[str, Any] = {}
        self.req_start = self.req_end = ts0
        self.req_bytes = self.resp_bytes = 0
        self.resp_start: int | None = None
        self.resp_end: int | None = None
        self.ops = 0  # operations not answered yet
        self.closed = False  # no more request messages join it
        self.error_message: str | None = None
        self.copy_in = False  # COPY FROM STDIN in progress: the client's CopyData joins it
        self.aborted = False
        self.status: str | None = None  # "ERR" after an ErrorResponse (or skipped after one)
        self.synced = False  # a Sync joined it
        self.held = False  # answered, waiting to see whether a Sync joins


class PostgresDecoder(Decoder):
    """Decodes one PostgreSQL connection into exchanges."""

    protocol = "postgres"
    default_ports = (5432,)

    def __init__(self, skipping: bool = False) -> None:
        """``skipping``: the bytes start after an error was answered and before the next Sync
        (what the server skips: errors, ``aborted``)."""
        self._front = _Frontend()
        self._back = _Backend()
        #: Operations awaiting their response, in order: (kind, group).
        self._ops: deque[tuple[int, _Group]] = deque()
        #: Groups not reported yet, in request order.
        self._groups: deque[_Group] = deque()
        self._open: _Group | None = None  # the group request messages join
        self._last: _Group | None = None  # the group the latest request message joined
        self._holding = False  # a group is held (see _settle)
        self._skipping = skipping  # an error: the server ignores messages up to the next Sync
        self._statements: dict[bytes, str] = {}
        self._texts: dict[bytes, str] = {}
        self._portals: dict[bytes, str] = {}
        self._out: list[Exchange] = []
        self._failed: str | None = None
        self._encrypted = False
        self._fresh = True
        self._user: str | None = None
        self._database: str | None = None

    # ------------------------------------------------------------------ detect

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        try:
            if direction is Direction.REQUEST:
                return _detect_request(data)
            return _detect_response(data)
        except Exception:  # detect() must never raise, whatever the bytes
            return False

    # ------------------------------------------------------------------ feed

    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        if self._failed is not None:
            raise Undecodable(self._failed)
        self._out = out = []
        try:
            if self._encrypted:
                raise Undecodable("postgres: encrypted after the server accepted SSLRequest/GSSENCRequest")
            if chunk.direction is _REQUEST:
                data = chunk.data
                if self._fresh and data:
                    # A connection seen from its start opens with an untyped message (whose length's
                    # first byte is 0); one joined later starts at a typed message.
                    self._fresh = False
                    self._front.special = data[0] == 0
                # The whole messages the chunk starts with are decoded straight from it (no slice,
                # no frame per message); the rest goes through the framer: a message across
                # chunks, a capture gap, the untyped start-up messages.
                front, ts = self._front, chunk.ts_ns
                pos = 0 if front.special or front._left or front._carry else self._requests(data, ts, ts)
                if pos != chunk.size:
                    self._framed(front, self._requests, data, pos, chunk.size, ts)
                if len(self._ops) > MAX_PENDING or len(self._groups) > MAX_PENDING:
                    raise Undecodable(f"postgres: over {MAX_PENDING} operations without a response")
            else:
                back, data, ts = self._back, chunk.data, chunk.ts_ns
                pos = 0 if back.special or back._left or back._carry else self._responses(data, ts, ts)
                if pos != chunk.size:
                    self._framed(back, self._responses, data, pos, chunk.size, ts)
        except Undecodable as exc:
            self._failed = str(exc)
            raise
        except Exception as exc:  # a slip on malformed bytes: stop decoding, never crash the caller
            self._failed = f"postgres: malformed message ({type(exc).__name__}: {exc})"
            raise Undecodable(self._failed) from None
        return out

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        if self._failed is not None:
            return ()
        self._out = []
        for group in self._groups:
            if group.resp_start is not None and group.status is None:
                group.attrs["incomplete"] = True
            self._emit(group)
        self._groups.clear()
        self._ops.clear()
        return self._out

    # ------------------------------------------------------------------ requests

    @staticmethod
    def _framed(framer: Framer, decode, data: bytes, pos: int, size: int, ts: int) -> None:
        """The chunk from ``pos`` on (where its whole messages ended) through the framer."""
        for m, total, ts0, ts1, truncated in framer.feed(data[pos:] if pos else data, size - pos, ts):
            decode(m, ts0, ts1, total, truncated)

    def _requests(self, buf: bytes, ts0: int, ts1: int, size: int = 0, truncated: bool = False) -> int:
        """Frontend messages: the whole ones ``buf`` starts with (``size`` 0), or ``buf`` is the
        kept head of one message of ``size`` bytes.  Returns where the whole messages end."""
        ops = self._ops
        end = len(buf)
        pos = 0
        last_start = end - (1 if size else 5)  # the last position a (whole) message may start at
        while pos <= last_start:
            p = pos
            total = size or _unpack_u32(buf, p + 1)[0] + 1
            pos = p + total
            if pos > end or total < 5:
                if not size:
                    return p  # not whole (or not valid: the framer says so)
                pos = end
            q = pos  # end of the message's kept bytes
            kind = buf[p]
            if self._holding and kind != 0x53:
                self._release()
            if kind == 0x50:  # 'P' Parse: name, query, parameter types
                if buf[p + 5]:  # a named statement
                    name_end = buf.find(b"\x00", p + 5, q)
                    if name_end < 0:
                        name_end = q
                    name = buf[p + 5:name_end]
                else:  # the unnamed one
                    name_end = p + 5
                    name = b""
                group = self._open or self._join(ts0)
                sql = self._statement(group, buf, name_end + 1, q, q - p < total)
                statements = self._statements
                if name not in statements and len(statements) >= MAX_STATEMENTS:
                    statements.pop(next(iter(statements)))
                statements[name] = sql
                if not group.method or group.method == "PARSE":
                    group.method = "PARSE"
                    group.target = sql
                op = _PARSE
            elif kind == 0x42:  # 'B' Bind: portal, statement, …
                if buf[p + 5] or buf[p + 6]:  # a named portal or statement
                    portal_end = buf.find(b"\x00", p + 5, q)
                    if portal_end < 0:
                        portal_end = q
                    statement_end = buf.find(b"\x00", portal_end + 1, q)
                    statement = buf[portal_end + 1:statement_end if statement_end >= 0 else q]
                    portal = buf[p + 5:portal_end]
                else:  # both unnamed
                    portal = statement = b""
                portals = self._portals
                if portal not in portals and len(portals) >= MAX_STATEMENTS:
                    portals.pop(next(iter(portals)))
                portals[portal] = sql = self._statements.get(statement, "")
                group = self._open or self._join(ts0)
                if group.method in _BEFORE_BIND:
                    group.method = "BIND"
                    group.target = sql
                if statement:
                    group.attrs["statement"] = _text(statement)
                op = _BIND
            elif kind == 0x44:  # 'D' Describe
                group = self._open or self._join(ts0)
                if not group.method:
                    group.method = "DESCRIBE"
                op = _DESCRIBE_S if total > 5 and buf[p + 5] == 0x53 else _DESCRIBE_P
            elif kind == 0x45:  # 'E' Execute: portal, max rows
                group = self._open or self._join(ts0)
                group.method = "EXECUTE"
                if buf[p + 5]:  # a named portal
                    portal_end = buf.find(b"\x00", p + 5, q)
                    portal = buf[p + 5:portal_end if portal_end >= 0 else q]
                else:
                    portal = b""
                group.target = self._portals.get(portal, group.target)
                group.closed = True
                self._open = None
                op = _EXECUTE
            elif kind == 0x53:  # 'S' Sync
                group = self._open
                if group is None:
                    last = self._last
                    if (last is not None and last.method == "EXECUTE" and not last.synced
                            and self._groups and self._groups[-1] is last):
                        group = last  # the Sync right behind an Execute: one exchange
                        group.held = self._holding = False
                    else:
                        group = self._new_group("SYNC", ts0)
                group.closed = True
                group.synced = True
                self._open = None
                op = _SYNC
            elif kind == 0x51 or kind == 0x46:  # 'Q' Query, 'F' FunctionCall
                self._close_open()
                group = self._new_group("QUERY" if kind == 0x51 else "FUNCTION_CALL", ts0)
                if kind == 0x51:
                    group.target = self._statement(group, buf, p + 5, q, q - p < total)
                group.closed = True
                op = _QUERY if kind == 0x51 else _FUNCTION
            elif kind == 0x43:  # 'C' Close
                group = self._open or self._join(ts0)
                if not group.method:
                    group.method = "CLOSE"
                op = _CLOSE
            elif kind == 0:
                self._untyped(buf[p:q], total, ts0, ts1)
                continue
            else:
                if kind not in _FRONTEND_TYPES:
                    raise Undecodable(f"postgres: unknown frontend message type 0x{kind:02x}")
                if kind == 0x58:  # 'X' Terminate: the connection ends, nothing answers
                    self._close_open()
                    continue
                if kind == 0x48:
                    # 'H' Flush asks for output and answers nothing; its 5 bytes join no exchange
                    # (which one it follows depends on timing, and both sides must agree).
                    continue
                else:  # 'p' password / SASL, 'd' 'c' 'f' COPY data: part of the exchange in progress
                    group = self._continued_group()
                    if group is not None:
                        # Sent after the server asked for it: the answer is what follows, and the
                        # latency runs from here.
                        group.resp_start = None
                if group is not None:
                    group.req_bytes += total
                    group.req_end = ts1
                    if truncated:
                        group.attrs["truncated"] = True
                continue
            group.req_bytes += total
            if op != _SYNC or group.resp_start is None:
                # (A Sync after its group's answer began, e.g. the error that skipped it: the
                # answer did not wait for it.)
                group.req_end = ts1
            if truncated:
                group.attrs["truncated"] = True
            if op == _SYNC:
                self._skipping = False
            elif group.aborted:
                continue  # the server skips it: it is never answered
            group.ops += 1
            ops.append((op, group))
        return pos

    def _untyped(self, m: bytes, size: int, ts0: int, ts1: int) -> None:
        """The untyped messages that open a connection."""
        if size < 8 or size != _unpack_u32(m, 0)[0]:
            raise Undecodable("postgres: malformed start-up message")
        code = _unpack_u32(m, 4)[0]
        if code == SSL_REQUEST or code == GSSENC_REQUEST:
            group = self._new_group("SSL_REQUEST" if code == SSL_REQUEST else "GSSENC_REQUEST", ts0)
            self._enqueue(group, _STARTUP, size, ts1)
            group.closed = True
            self._back.special = True
        elif code == CANCEL_REQUEST:
            group = self._new_group("CANCEL", ts0)
            group.req_bytes += size
            group.req_end = ts1
            if size >= 16:
                group.attrs["backend_pid"] = _unpack_u32(m, 8)[0]
            group.closed = True
            self._groups.remove(group)
            self._emit(group)
        elif code >> 16 == 3:
            params = _startup_parameters(m[8:])
            group = self._new_group("STARTUP", ts0)
            self._user = params.get("user")
            self._database = params.get("database", self._user)
            group.attrs["user"] = self._user
            group.attrs["database"] = self._database
            if "application_name" in params:
                group.attrs["application_name"] = params["application_name"]
            if code != PROTOCOL_3:
                group.attrs["protocol_version"] = f"{code >> 16}.{code & 0xFFFF}"
            group.target = self._database or ""
            self._enqueue(group, _STARTUP, size, ts1)
            group.closed = True
        else:
            raise Undecodable(f"postgres: unknown start-up code {code}")
        self._open = None

    def _new_group(self, method: str, ts0: int) -> _Group:
        group = self._last = _Group(method, ts0)
        self._groups.append(group)
        if self._skipping and method != "SYNC":
            self._mark_aborted(group)
        return group

    def _join(self, ts0: int) -> _Group:
        """A new group for extended-protocol messages to join."""
        group = self._open = self._last = _Group("", ts0)
        self._groups.append(group)
        if self._skipping:
            self._mark_aborted(group)
        return group

    def _close_open(self) -> None:
        group = self._open
        if group is not None:
            group.closed = True
            self._open = None
            if not group.ops:
                self._settle(group)

    def _continued_group(self) -> _Group | None:
        """The exchange a password or COPY data message belongs to."""
        if self._ops:
            group = self._ops[0][1]
            if group.copy_in or group.method == "STARTUP":
                return group
        return self._last

    def _enqueue(self, group: _Group, op: int, size: int, ts1: int) -> None:
        group.req_bytes += size
        group.req_end = ts1
        group.ops += 1
        self._ops.append((op, group))

    def _statement(self, group: _Group, buf: bytes, pos: int, stop: int, cut: bool) -> str:
        """The statement text at ``buf[pos]`` (NUL-terminated before ``stop``; cut at
        MAX_STATEMENT_BYTES); ``cut``: the message's end was not kept."""
        end = buf.find(b"\x00", pos, stop)
        if end < 0:
            end = stop
            if cut:
                group.attrs["target_truncated"] = True
        if end - pos > MAX_STATEMENT_BYTES:
            end = pos + MAX_STATEMENT_BYTES
            group.attrs["target_truncated"] = True
        sql = buf[pos:end]
        text = self._texts.get(sql)
        if text is None:
            text = _text(sql)
            if len(self._texts) < MAX_STATEMENTS:  # the few statements an application runs, decoded once
                self._texts[sql] = text
        return text

    # ------------------------------------------------------------------ responses

    def _responses(self, buf: bytes, ts0: int, ts1: int, size: int = 0, truncated: bool = False) -> int:
        """Backend messages, as :meth:`_requests` takes frontend ones."""
        ops = self._ops
        end = len(buf)
        pos = 0
        last_start = end - (1 if size else 5)
        while pos <= last_start:
            p = pos
            total = size or _unpack_u32(buf, p + 1)[0] + 1
            pos = p + total
            if pos > end or total < 5:
                if not size:
                    return p
                pos = end
            try:
                kind, group = ops[0]
            except IndexError:
                continue  # an asynchronous message, or the answer to a request not seen (started mid-stream)
            t = buf[p]
            if group.resp_start is None:
                group.resp_start = ts0
            group.resp_end = ts1
            group.resp_bytes += total
            if truncated:
                group.attrs["truncated"] = True
            if t == 0x44 or t == 0x64:  # DataRow, CopyData
                continue
            if (kind << 8 | t) in _COMPLETES:
                ops.popleft()
                group.ops -= 1
                if not group.ops:
                    self._settle(group)
            elif t == 0x43:  # CommandComplete
                tag_end = buf.find(b"\x00", p + 5, pos)
                attrs = group.attrs
                attrs["command"], rows = _command_tag(buf[p + 5:tag_end if tag_end >= 0 else pos])
                if rows is not None:
                    attrs["rows"] = attrs.get("rows", 0) + rows
                group.copy_in = False
                if kind == _EXECUTE:
                    ops.popleft()
                    group.ops -= 1
                    if not group.ops:
                        self._settle(group)
            elif t == 0x5A:  # ReadyForQuery: ends a Query, a FunctionCall, the start-up
                if kind == _QUERY or kind == _FUNCTION or kind == _STARTUP:
                    group.copy_in = False
                    ops.popleft()
                    group.ops -= 1
                    if not group.ops:
                        self._settle(group)
            elif t == 0x45:  # ErrorResponse
                self._on_error(kind, group, buf[p:pos], ts0)
            elif total == 1 and kind == _STARTUP:  # the answer to SSLRequest / GSSENCRequest
                accepted = t == 0x53 or t == 0x47  # 'S', 'G'
                group.attrs["encryption"] = "accepted" if accepted else "refused"
                ops.popleft()
                group.ops -= 1
                self._settle(group)
                if accepted:
                    self._encrypted = True
                else:
                    self._front.special = True  # the start-up message follows
            elif t == 0x47:  # CopyInResponse: the client's CopyData follows
                group.copy_in = True
            elif t == 0x57:
                raise Undecodable("postgres: CopyBoth (replication) is not decoded")
            elif t not in _BACKEND_TYPES and total > 1:
                raise Undecodable(f"postgres: unknown backend message type 0x{t:02x}")
            elif kind == _STARTUP:
                if t == 0x52 and pos - p >= 9:  # Authentication*
                    code = _unpack_u32(buf, p + 5)[0]
                    if code != 0 and "auth" not in group.attrs:
                        group.attrs["auth"] = _AUTH_METHODS.get(code, str(code))
                elif t == 0x4B and pos - p >= 13:  # BackendKeyData
                    group.attrs["backend_pid"] = _unpack_u32(buf, p + 5)[0]
            elif t == 0x73 and kind == _EXECUTE:  # PortalSuspended: the row limit was reached
                group.attrs["suspended"] = True
        return pos

    def _on_error(self, kind: int, group: _Group, m: bytes, ts: int) -> None:
        fields = _error_fields(m[5:])
        group.status = "ERR"
        if group.error_message is None:
            group.error_message = fields.get("M", "")
            if "C" in fields:
                group.attrs["sqlstate"] = fields["C"]
            severity = fields.get("V") or fields.get("S")
            if severity:
                group.attrs["severity"] = severity
        group.copy_in = False
        ops = self._ops
        if kind == _QUERY or kind == _FUNCTION or kind == _SYNC:
            return  # ReadyForQuery still follows and ends it
        if kind == _STARTUP:
            self._done(ops)  # a refused login: the server closes the connection
            return
        # Extended protocol: the server discards every message up to the next Sync.
        self._done(ops)
        while ops and ops[0][0] != _SYNC:
            _, skipped = ops.popleft()
            skipped.ops -= 1
            if skipped is not group:
                self._abort(skipped, ts)
            elif not skipped.ops:
                self._settle(skipped)
        if not ops:
            self._skipping = True
            if self._open is not None:
                self._abort(self._open, ts)

    def _abort(self, group: _Group, ts: int) -> None:
        """``group`` skipped for the error written at ``ts``: answered by it (its ReadyForQuery may
        come in a later write, after the client's Sync: the error's heads end before it, and the
        exchange must start its answer at the same time whether decoded from them or the stream)."""
        if group.resp_start is None:
            group.resp_start = ts
        self._mark_aborted(group)
        if not group.ops:
            self._settle(group)

    @staticmethod
    def _mark_aborted(group: _Group) -> None:
        if not group.aborted:
            group.aborted = True
            group.status = "ERR"
            group.error_message = "not executed: an earlier statement failed (the server skips to the next Sync)"
            group.attrs["aborted"] = True

    def _done(self, ops: deque) -> None:
        _, group = ops.popleft()
        group.ops -= 1
        if not group.ops:
            self._settle(group)

    def _settle(self, group: _Group) -> None:
        if not group.closed and group is self._open:
            return  # more request messages may join it
        if group.status is None:
            group.status = "OK"
        if not group.synced and group is self._last and group.method == "EXECUTE":
            # Answered before the client sent anything after its Execute: a Sync may still come and
            # join it (the server flushes results as soon as it waits for input, so whether the
            # answer or the Sync comes first is a race).  Reported at the client's next message.
            group.held = self._holding = True
            return
        groups = self._groups
        if groups and groups[0] is group and not (group.ops or group.held or group is self._open):
            # The oldest group, finished: out at once (the common case of _finish).
            groups.popleft()
            self._emit(group)
            if not groups:
                return
        self._finish()

    def _release(self) -> None:
        """The client sent something after an answered Execute: that exchange is over."""
        self._holding = False
        last = self._last
        if last is not None and last.held:
            last.held = False
            self._finish()

    def _finish(self) -> None:
        """Report every finished group at the head of the queue (exchanges come out in order)."""
        groups = self._groups
        while groups:
            head = groups[0]
            if head.ops or head.status is None or head.held or head is self._open:
                break
            groups.popleft()
            self._emit(head)

    def _emit(self, group: _Group) -> None:
        status = group.status
        self._out.append(Exchange(
            "postgres", group.method or "SYNC", group.target, status, status == "ERR",
            group.req_start, group.req_end, group.resp_start, group.resp_end,
            group.req_bytes, group.resp_bytes, group.error_message, group.attrs,
        ))


_AUTH_METHODS = {2: "kerberos", 3: "password", 5: "md5", 7: "gss", 9: "sspi", 10: "sasl"}


def _printable(raw: bytes) -> bool:
    return bool(raw) and not raw.translate(None, _TEXT_BYTES)


def _detect_request(data: bytes) -> bool:
    if len(data) < 8:
        return False
    length = _unpack_u32(data, 0)[0]
    code = _unpack_u32(data, 4)[0]
    if data[0] == 0:  # untyped: start-up, SSLRequest, GSSENCRequest, CancelRequest
        if code in (SSL_REQUEST, GSSENC_REQUEST):
            return length == 8 and len(data) == 8
        if code == CANCEL_REQUEST:
            return length == 16 and len(data) == 16
        if code >> 16 != 3 or not 8 < length <= 10000 or len(data) > length:
            return False
        body = data[8:length]
        # key\0value\0 … \0 with printable keys; "user" is required.
        return b"user\x00" in body and (len(data) < length or body.endswith(b"\x00\x00"))
    # Mid-connection: a Query or a Parse.
    kind = data[0]
    length = _unpack_u32(data, 1)[0]
    if kind not in (0x51, 0x50) or not 5 < length < MAX_LENGTH:
        return False
    body = data[5:1 + length]
    if kind == 0x50:
        name_end = body.find(b"\x00")
        if name_end < 0:
            return False
        body = body[name_end + 1:]
    end = body.find(b"\x00")
    sql = body[:end] if end >= 0 else body
    if len(data) >= 1 + length and end < 0:
        return False
    return _printable(sql[:256]) and (sql[:1].isalpha() or sql[:1] in b"(/- \t\r\n")


def _detect_response(data: bytes) -> bool:
    """Whole backend messages ending the chunk with ReadyForQuery, or an authentication request."""
    pos = 0
    end = len(data)
    for _ in range(64):
        if end - pos < 5 or data[pos] not in _BACKEND_TYPES:
            return False
        kind = data[pos]
        length = _unpack_u32(data, pos + 1)[0]
        if length < 4 or length > MAX_LENGTH:
            return False
        if kind == 0x52 and pos == 0:  # Authentication*: the server's first message
            return 8 <= length <= 2048 and _unpack_u32(data, 5)[0] in (0, 2, 3, 5, 7, 9, 10) if end >= 9 else False
        pos += 1 + length
        if pos == end:
            return kind == 0x5A and length == 5 and data[pos - 1] in b"ITE"
        if pos > end:
            return False
    return False
