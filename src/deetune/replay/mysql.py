"""MySQL / MariaDB wire code for replay: packets, responses, login, prepared statements.

Replay never re-sends a recorded login (its credentials are redacted): it logs
in itself with ``--mysql-user`` / ``--mysql-password`` (``mysql_native_password``,
or ``caching_sha2_password`` when the server's cache makes the fast path
enough), then sends the recorded commands.  Responses — recorded and replayed
— are parsed into :class:`MysqlResponse` objects: OK (affected rows), ERR
(code, SQL state, message) and result sets (column names and rows, text or
binary protocol, rows as lists of strings / ``None``).
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from collections.abc import Iterable

import attrs

from deetune.replay.protocols import Deadline, ProtocolError, ReplayError, close_quietly, connect, recv_some, send_all

MAX_PAYLOAD = 0xFFFFFF

CLIENT_LONG_PASSWORD = 0x1
CLIENT_FOUND_ROWS = 0x2
CLIENT_LONG_FLAG = 0x4
CLIENT_CONNECT_WITH_DB = 0x8
CLIENT_IGNORE_SPACE = 0x100
CLIENT_PROTOCOL_41 = 0x200
CLIENT_SSL = 0x800
CLIENT_TRANSACTIONS = 0x2000
CLIENT_SECURE_CONNECTION = 0x8000
CLIENT_MULTI_STATEMENTS = 0x10000
CLIENT_MULTI_RESULTS = 0x20000
CLIENT_PS_MULTI_RESULTS = 0x40000
CLIENT_PLUGIN_AUTH = 0x80000
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 0x200000
CLIENT_QUERY_ATTRIBUTES = 0x8000000

#: Capabilities replay always asks for (when the server offers them).
BASE_CAPABILITIES = (
    CLIENT_LONG_PASSWORD | CLIENT_LONG_FLAG | CLIENT_PROTOCOL_41 | CLIENT_TRANSACTIONS
    | CLIENT_SECURE_CONNECTION | CLIENT_MULTI_RESULTS | CLIENT_PS_MULTI_RESULTS | CLIENT_PLUGIN_AUTH
    | CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
)
#: Capabilities that change what the server answers: copied from the recorded login when there is one.
RECORDED_CAPABILITIES = CLIENT_FOUND_ROWS | CLIENT_IGNORE_SPACE | CLIENT_MULTI_STATEMENTS

SERVER_MORE_RESULTS_EXISTS = 0x0008
UNSIGNED_FLAG = 0x20
CURSOR_TYPE_MASK = 0x07  # STMT_EXECUTE flags asking for a cursor

COM_QUIT = 0x01
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_STATISTICS = 0x09
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A

#: Default character set: utf8mb4_general_ci (known to MySQL 5.5+ and every MariaDB).
DEFAULT_CHARSET = 45

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


# -- encoding helpers ---------------------------------------------------------------------------


#: Bytes after the first one of a length-encoded integer, by its first byte.
_LENENC_WIDTH = {0xFC: 2, 0xFD: 3, 0xFE: 8}


def lenenc(p: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(p):
        raise ProtocolError("mysql: length-encoded integer past the end of its packet")
    b = p[pos]
    if b < 0xFB:
        return b, pos + 1
    width = _LENENC_WIDTH.get(b)
    if width is None:
        raise ProtocolError(f"mysql: bad length-encoded integer 0x{b:02x}")
    end = pos + 1 + width
    if end > len(p):
        raise ProtocolError("mysql: length-encoded integer past the end of its packet")
    return int.from_bytes(p[pos + 1 : end], "little"), end


def lenenc_bytes(p: bytes, pos: int) -> tuple[bytes | None, int]:
    """A length-encoded string (``None`` for the 0xFB NULL marker)."""
    if pos < len(p) and p[pos] == 0xFB:
        return None, pos + 1
    size, pos = lenenc(p, pos)
    if pos + size > len(p):
        raise ProtocolError("mysql: string longer than its packet")
    return bytes(p[pos : pos + size]), pos + size


def encode_lenenc(n: int) -> bytes:
    if n < 0xFB:
        return bytes([n])
    if n < 1 << 16:
        return b"\xfc" + _U16.pack(n)
    if n < 1 << 24:
        return b"\xfd" + n.to_bytes(3, "little")
    return b"\xfe" + struct.pack("<Q", n)


def cstring(p: bytes, pos: int) -> tuple[bytes, int]:
    end = p.find(b"\x00", pos)
    if end < 0:
        return bytes(p[pos:]), len(p)
    return bytes(p[pos:end]), end + 1


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "backslashreplace")


def split_packets(data: bytes) -> tuple[list[tuple[int, bytes]], bool]:
    """The packets in ``data`` as (sequence id, payload), 16 MiB pieces joined; and whether the
    bytes end at a packet boundary (False: the last packet was cut, and is left out)."""
    packets: list[tuple[int, bytes]] = []
    pos = 0
    joined: bytearray | None = None
    joined_seq = 0
    while pos + 4 <= len(data):
        header = _U32.unpack_from(data, pos)[0]
        length, seq = header & MAX_PAYLOAD, header >> 24
        if pos + 4 + length > len(data):
            return packets, False
        payload = data[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if joined is not None:
            joined += payload
            if length < MAX_PAYLOAD:
                packets.append((joined_seq, bytes(joined)))
                joined = None
        elif length == MAX_PAYLOAD:
            joined, joined_seq = bytearray(payload), seq
        else:
            packets.append((seq, bytes(payload)))
    return packets, pos == len(data) and joined is None


def encode_packets(payload: bytes, seq: int) -> tuple[bytes, int]:
    """``payload`` framed as packets starting at ``seq``; (bytes, next sequence id)."""
    out = bytearray()
    pos = 0
    while True:
        piece = payload[pos : pos + MAX_PAYLOAD]
        out += (len(piece) | (seq & 0xFF) << 24).to_bytes(4, "little") + piece
        seq = (seq + 1) & 0xFF
        pos += len(piece)
        if len(piece) < MAX_PAYLOAD:
            return bytes(out), seq


# -- responses ----------------------------------------------------------------------------------


@attrs.frozen
class Column:
    name: str
    type: int
    flags: int


@attrs.define
class MysqlPart:
    """One piece of a response: ``ok``, ``err``, ``rows`` (a result set), ``prepare``, ``columns``
    (COM_FIELD_LIST), ``info`` (COM_STATISTICS text) or ``local_infile``."""

    kind: str
    affected_rows: int | None = None
    error_code: int | None = None
    sql_state: str | None = None
    message: str | None = None
    columns: list[Column] = attrs.field(factory=list)
    rows: list[list[str | None]] = attrs.field(factory=list)
    #: prepare: the statement id the server chose, and its parameter and column counts.
    statement_id: int | None = None
    params: int | None = None
    column_count: int | None = None


@attrs.define
class MysqlResponse:
    parts: list[MysqlPart] = attrs.field(factory=list)
    #: False when the recorded bytes ended before the response did.
    complete: bool = True


#: How a command's response is shaped.
SHAPE_RESULT, SHAPE_PREPARE, SHAPE_FIELD_LIST, SHAPE_SINGLE = "result", "prepare", "field_list", "single"


def shape_of(command: int) -> str:
    if command == COM_STMT_PREPARE:
        return SHAPE_PREPARE
    if command == COM_FIELD_LIST:
        return SHAPE_FIELD_LIST
    if command == COM_STATISTICS:
        return SHAPE_SINGLE
    return SHAPE_RESULT


class ResponseParser:
    """Follows the packets of one command's response; ``feed`` says when it is complete."""

    _FIRST, _COLDEFS, _AFTER_COLDEFS, _ROWS, _PREP_DEFS, _PREP_EOF, _DONE = range(7)

    def __init__(self, shape: str, binary: bool = False) -> None:
        self.shape = shape
        self.binary = binary
        self.response = MysqlResponse()
        self._state = self._FIRST
        self._left = 0
        self._sections: list[int] = []  # prepare: definitions still to come, per section
        self._part: MysqlPart | None = None

    @property
    def done(self) -> bool:
        return self._state == self._DONE

    def feed(self, p: bytes) -> bool:
        if self._state == self._DONE:
            raise ProtocolError("mysql: packet after the end of the response")
        if not p:
            raise ProtocolError("mysql: empty response packet")
        first = p[0]
        if first == 0xFF and len(p) >= 3 and _U16.unpack_from(p, 1)[0] == 0xFFFF:
            return False  # MariaDB progress report
        if self.shape == SHAPE_SINGLE:
            if first == 0xFF:
                self.response.parts.append(_error(p))
            else:
                self.response.parts.append(MysqlPart("info", message=_text(p)))
            self._state = self._DONE
            return True
        if self.shape == SHAPE_FIELD_LIST:
            if self._part is None:
                self._part = MysqlPart("columns")
                self.response.parts.append(self._part)
            if first == 0xFF:
                self.response.parts[-1] = _error(p)
                self._state = self._DONE
            elif first == 0xFE and len(p) < 9:
                self._state = self._DONE
            else:
                self._part.columns.append(_column(p))
            return self.done
        if self.shape == SHAPE_PREPARE:
            return self._feed_prepare(p)
        return self._feed_result(p)

    def _finish_or_next(self, flags: int) -> bool:
        if flags & SERVER_MORE_RESULTS_EXISTS:
            self._state = self._FIRST
            return False
        self._state = self._DONE
        return True

    def _feed_result(self, p: bytes) -> bool:
        first = p[0]
        state = self._state
        if state == self._FIRST:
            if first == 0x00:
                affected, flags = _ok(p)
                self.response.parts.append(MysqlPart("ok", affected_rows=affected))
                return self._finish_or_next(flags)
            if first == 0xFF:
                self.response.parts.append(_error(p))
                self._state = self._DONE
                return True
            if first == 0xFE and len(p) < 9:
                self.response.parts.append(MysqlPart("ok", affected_rows=0))
                return self._finish_or_next(_eof_flags(p))
            if first == 0xFB:
                self.response.parts.append(MysqlPart("local_infile", message=_text(p[1:])))
                self._state = self._DONE
                return True
            count, _ = lenenc(p, 0)
            if count == 0 or count > 4096:
                raise ProtocolError(f"mysql: implausible column count {count}")
            self._part = MysqlPart("rows")
            self.response.parts.append(self._part)
            self._left = count
            self._state = self._COLDEFS
            return False
        part = self._part
        assert part is not None
        if state == self._COLDEFS:
            part.columns.append(_column(p))
            self._left -= 1
            if not self._left:
                self._state = self._AFTER_COLDEFS
            return False
        if state == self._AFTER_COLDEFS:
            self._state = self._ROWS
            if first == 0xFE and len(p) < 7:  # the EOF after the column definitions
                return False
            # CLIENT_DEPRECATE_EOF: no EOF, rows (or the closing OK) follow at once.
        if first == 0xFE and len(p) < MAX_PAYLOAD:
            flags = _eof_flags(p) if len(p) < 7 else _ok(p)[1]
            return self._finish_or_next(flags)
        if first == 0xFF:
            self.response.parts.append(_error(p))
            self._state = self._DONE
            return True
        part.rows.append(_binary_row(p, part.columns) if self.binary else _text_row(p, len(part.columns)))
        return False

    def _feed_prepare(self, p: bytes) -> bool:
        first = p[0]
        if self._state == self._FIRST:
            if first == 0xFF:
                self.response.parts.append(_error(p))
                self._state = self._DONE
                return True
            if first != 0x00 or len(p) < 9:
                raise ProtocolError("mysql: malformed STMT_PREPARE response")
            statement_id = _U32.unpack_from(p, 1)[0]
            columns, params = _U16.unpack_from(p, 5)[0], _U16.unpack_from(p, 7)[0]
            self.response.parts.append(MysqlPart("prepare", statement_id=statement_id, params=params,
                                                 column_count=columns))
            self._sections = [n for n in (params, columns) if n]
            return self._next_section()
        if self._state == self._PREP_DEFS:
            self._left -= 1
            if not self._left:
                self._state = self._PREP_EOF
            return False
        # _PREP_EOF: an EOF closes the section (classic), or the next section starts at once (DEPRECATE_EOF).
        if first == 0xFE and len(p) < 7:
            return self._next_section()
        self._next_section()
        if self._state == self._DONE:
            raise ProtocolError("mysql: packet after the end of a STMT_PREPARE response")
        return self._feed_prepare(p)

    def _next_section(self) -> bool:
        if self._sections:
            self._left = self._sections.pop(0)
            self._state = self._PREP_DEFS
            return False
        self._state = self._DONE
        return True


def parse_recorded_response(data: bytes, shape: str, binary: bool) -> MysqlResponse:
    """Everything that can be read from recorded response bytes; ``complete`` False when they end early."""
    packets, whole = split_packets(data)
    parser = ResponseParser(shape, binary)
    for _, payload in packets:
        if parser.done:
            break
        parser.feed(payload)
    response = parser.response
    # A prepare response recorded with DEPRECATE_EOF ends without its last EOF: complete all the same.
    response.complete = whole and (parser.done or (shape == SHAPE_PREPARE and parser._state == parser._PREP_EOF
                                                   and not parser._sections))
    return response


def _ok(p: bytes) -> tuple[int, int]:
    """(affected rows, status flags) of an OK packet."""
    try:
        affected, pos = lenenc(p, 1)
        _, pos = lenenc(p, pos)  # last insert id
        flags = _U16.unpack_from(p, pos)[0] if pos + 2 <= len(p) else 0
    except (IndexError, struct.error):
        raise ProtocolError("mysql: malformed OK packet") from None
    return affected, flags


def _eof_flags(p: bytes) -> int:
    return _U16.unpack_from(p, 3)[0] if len(p) >= 5 else 0


def _error(p: bytes) -> MysqlPart:
    code = _U16.unpack_from(p, 1)[0] if len(p) >= 3 else None
    if len(p) >= 9 and p[3] == 0x23:  # '#' and a 5-character SQLSTATE
        return MysqlPart("err", error_code=code, sql_state=p[4:9].decode("ascii", "replace"), message=_text(p[9:]))
    return MysqlPart("err", error_code=code, message=_text(p[3:]))


def _column(p: bytes) -> Column:
    try:
        pos = 0
        for _ in range(4):  # catalog, schema, table, original table
            _, pos = lenenc_bytes(p, pos)
        name, pos = lenenc_bytes(p, pos)
        _, pos = lenenc_bytes(p, pos)  # original name
        if p[pos] != 0x0C:  # MariaDB extended metadata comes first
            _, pos = lenenc_bytes(p, pos)
        pos += 1 + 2 + 4  # length of fixed fields, character set, column length
        return Column(_text(name) or "", p[pos], _U16.unpack_from(p, pos + 1)[0])
    except (IndexError, struct.error):
        raise ProtocolError("mysql: malformed column definition") from None


def _text_row(p: bytes, count: int) -> list[str | None]:
    row = []
    pos = 0
    try:
        for _ in range(count):
            value, pos = lenenc_bytes(p, pos)
            row.append(_text(value))
    except IndexError:
        raise ProtocolError("mysql: malformed text row") from None
    return row


_INTS = {0x01: (1, "b", "B"), 0x02: (2, "h", "H"), 0x0D: (2, "h", "H"), 0x03: (4, "i", "I"), 0x09: (4, "i", "I"),
         0x08: (8, "q", "Q")}  # fmt: skip


def binary_value(p: bytes, pos: int, field_type: int, unsigned: bool) -> tuple[str | None, int]:
    """One binary-protocol value as the text protocol would show it (dates and numbers), and the position after it."""
    if field_type == 0x06:  # NULL
        return None, pos
    if field_type in _INTS:
        size, signed, unsigned_code = _INTS[field_type]
        value = struct.unpack_from("<" + (unsigned_code if unsigned else signed), p, pos)[0]
        return str(value), pos + size
    if field_type == 0x04:  # FLOAT
        return repr(struct.unpack_from("<f", p, pos)[0]), pos + 4
    if field_type == 0x05:  # DOUBLE
        return repr(struct.unpack_from("<d", p, pos)[0]), pos + 8
    if field_type in (0x07, 0x0A, 0x0C):  # TIMESTAMP, DATE, DATETIME
        size = p[pos]
        raw = p[pos + 1 : pos + 1 + size]
        year, month, day, hour, minute, second, micro = 0, 0, 0, 0, 0, 0, 0
        if size >= 4:
            year, month, day = _U16.unpack_from(raw, 0)[0], raw[2], raw[3]
        if size >= 7:
            hour, minute, second = raw[4], raw[5], raw[6]
        if size >= 11:
            micro = _U32.unpack_from(raw, 7)[0]
        text = f"{year:04d}-{month:02d}-{day:02d}"
        if field_type != 0x0A:
            text += f" {hour:02d}:{minute:02d}:{second:02d}" + (f".{micro:06d}" if micro else "")
        return text, pos + 1 + size
    if field_type == 0x0B:  # TIME
        size = p[pos]
        raw = p[pos + 1 : pos + 1 + size]
        if size == 0:
            return "00:00:00", pos + 1
        negative, days, hour, minute, second = raw[0], _U32.unpack_from(raw, 1)[0], raw[5], raw[6], raw[7]
        micro = _U32.unpack_from(raw, 8)[0] if size >= 12 else 0
        text = f"{'-' if negative else ''}{days * 24 + hour:02d}:{minute:02d}:{second:02d}"
        return text + (f".{micro:06d}" if micro else ""), pos + 1 + size
    value, pos = lenenc_bytes(p, pos)  # strings, DECIMAL, BLOB, JSON, BIT, …
    return _text(value), pos


def _binary_row(p: bytes, columns: list[Column]) -> list[str | None]:
    if p[0] != 0x00:
        raise ProtocolError("mysql: binary row does not start with 0x00")
    bitmap = p[1 : 1 + (len(columns) + 7 + 2) // 8]
    pos = 1 + len(bitmap)
    row = []
    try:
        for index, column in enumerate(columns):
            bit = index + 2
            if bitmap[bit // 8] >> (bit % 8) & 1:
                row.append(None)
                continue
            value, pos = binary_value(p, pos, column.type, bool(column.flags & UNSIGNED_FLAG))
            row.append(value)
    except (IndexError, struct.error):
        raise ProtocolError("mysql: malformed binary row") from None
    return row


# -- recorded requests --------------------------------------------------------------------------


@attrs.frozen
class RecordedLogin:
    """What replay takes from a recorded login: capabilities, character set, database."""

    capabilities: int
    charset: int
    database: str | None


def parse_recorded_login(data: bytes) -> RecordedLogin | None:
    """The handshake response in a recorded LOGIN request; None when it cannot be read (TLS, redaction…)."""
    packets, _ = split_packets(data)
    if not packets:
        return None
    p = packets[0][1]
    try:
        caps = _U32.unpack_from(p, 0)[0]
        if not caps & CLIENT_PROTOCOL_41 or len(p) <= 32 or caps & CLIENT_SSL:
            return None
        charset = p[8]
        _, pos = cstring(p, 32)  # user
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            size, pos = lenenc(p, pos)
            pos += size
        elif caps & CLIENT_SECURE_CONNECTION:
            pos += 1 + p[pos]
        else:
            _, pos = cstring(p, pos)
        database = None
        if caps & CLIENT_CONNECT_WITH_DB and pos < len(p):
            raw, pos = cstring(p, pos)
            database = raw.decode("utf-8", "replace") or None
        return RecordedLogin(caps, charset, database)
    except (IndexError, struct.error, ProtocolError):
        return None


def command_payload(data: bytes) -> bytes:
    """The payload of the (first) command packet in recorded request bytes."""
    packets, whole = split_packets(data)
    if not packets or not whole:
        raise ProtocolError("mysql: recorded request is not a whole packet")
    if len(packets) > 1:
        raise ProtocolError("mysql: recorded request holds more than one packet")
    return packets[0][1]


def query_text(payload: bytes, attributes: bool | None) -> bytes:
    """The statement of a COM_QUERY / COM_STMT_PREPARE payload, without MySQL 8 query attributes.

    ``attributes``: whether the recorded client negotiated query attributes; None when unknown
    (then guessed: the text never starts with a control byte followed by 0x01).
    """
    if payload[0] != COM_QUERY:
        return payload[1:]
    if attributes is None:
        attributes = len(payload) >= 3 and payload[2] == 1 and payload[1] < 0x20 and payload[1] not in (9, 10, 13)
    if not attributes:
        return payload[1:]
    try:
        count, pos = lenenc(payload, 1)
        _, pos = lenenc(payload, pos)  # parameter set count
        if count == 0:
            return payload[pos:]
        null_bitmap = pos
        pos += (count + 7) // 8
        if payload[pos] != 1:
            return payload[pos + 1 :]
        pos += 1
        types = []
        for _ in range(count):
            types.append((payload[pos], payload[pos + 1] & 0x80))
            pos += 2
            size, pos = lenenc(payload, pos)
            pos += size
        for index, (field_type, unsigned) in enumerate(types):
            if not payload[null_bitmap + index // 8] >> (index % 8) & 1:
                _, pos = binary_value(payload, pos, field_type, bool(unsigned))
        return payload[pos:]
    except (IndexError, struct.error):
        raise ProtocolError("mysql: query attributes cut short") from None


PARAMETER_COUNT_AVAILABLE = 0x08  # STMT_EXECUTE flag (MySQL 8 query attributes)


@attrs.frozen
class ExecuteRequest:
    """A recorded COM_STMT_EXECUTE, split so it can be sent with another statement id, in the
    classic layout (without MySQL 8 query attributes)."""

    flags: int
    iterations: int
    params: int
    #: NULL bitmap of the statement's parameters.
    null_bitmap: bytes
    #: Parameter types (2 bytes each) when the packet binds them, else None.
    types: bytes | None
    #: The parameters' values; with ``trailing``, query attribute values follow them.
    values: bytes
    trailing: bool = False
    #: Whether the packet was in the query-attributes layout.
    attributes: bool = False

    def payload(self, statement_id: int, types: bytes | None) -> bytes:
        values = self.values
        if self.trailing and not self.params:
            values = b""
        elif self.trailing:
            if not types:
                raise ProtocolError("mysql: STMT_EXECUTE with query attributes and no parameter types")
            values = values[: _values_end(values, 0, self.null_bitmap, types, self.params)]
        params = b""
        if self.params:
            params = self.null_bitmap + (b"\x01" + types if types else b"\x00")
        flags = self.flags & ~PARAMETER_COUNT_AVAILABLE
        return (bytes([COM_STMT_EXECUTE]) + _U32.pack(statement_id) + bytes([flags])
                + _U32.pack(self.iterations) + params + values)


def _values_end(data: bytes, pos: int, bitmap: bytes, types: bytes, count: int) -> int:
    """Where the binary values of ``count`` parameters starting at ``pos`` end."""
    for index in range(count):
        if not bitmap[index // 8] >> (index % 8) & 1:
            _, pos = binary_value(data, pos, types[2 * index], bool(types[2 * index + 1] & 0x80))
    return pos


def parse_execute(payload: bytes, params: int, attributes: bool | None = None) -> ExecuteRequest:
    """A STMT_EXECUTE payload for a statement with ``params`` parameters.

    ``attributes``: whether the recording client negotiated MySQL 8 query attributes (parameter
    count and names in the packet); None when unknown: the layout whose values fill the packet
    exactly is taken.
    """
    if len(payload) < 10 or payload[0] != COM_STMT_EXECUTE:
        raise ProtocolError("mysql: not a STMT_EXECUTE packet")
    layouts = {None: (False, True), False: (False,), True: (True,)}[attributes]
    problem = "mysql: STMT_EXECUTE parameters in an unknown layout"
    unchecked = []
    for with_attributes in layouts:
        parse = _parse_execute_attributes if with_attributes else _parse_execute_classic
        try:
            request, exact = parse(payload, params)
        except (IndexError, struct.error, ProtocolError) as exc:
            problem = str(exc) if isinstance(exc, ProtocolError) else "mysql: STMT_EXECUTE cut short"
            continue
        if exact or len(layouts) == 1:
            return request
        if request.types is None:  # parameter types not bound here: the values cannot be checked
            unchecked.append(request)
        else:
            problem = "mysql: STMT_EXECUTE values do not fill the packet"
    if unchecked:
        return unchecked[0]
    raise ProtocolError(problem)


def _parse_execute_classic(payload: bytes, params: int) -> tuple[ExecuteRequest, bool]:
    flags, iterations = payload[5], _U32.unpack_from(payload, 6)[0]
    if not params:
        return ExecuteRequest(flags, iterations, 0, b"", None, payload[10:]), len(payload) == 10
    size = (params + 7) // 8
    bitmap = payload[10 : 10 + size]
    pos = 10 + size
    bound = payload[pos]
    pos += 1
    types = None
    if bound == 1:
        types = payload[pos : pos + 2 * params]
        pos += 2 * params
        if len(types) != 2 * params:
            raise ProtocolError("mysql: STMT_EXECUTE cut short")
    elif bound != 0:
        raise ProtocolError("mysql: STMT_EXECUTE parameters in an unknown layout")
    request = ExecuteRequest(flags, iterations, params, bitmap, types, payload[pos:])
    exact = types is not None and _values_end(payload, pos, bitmap, types, params) == len(payload)
    return request, exact


def _parse_execute_attributes(payload: bytes, params: int) -> tuple[ExecuteRequest, bool]:
    flags, iterations = payload[5], _U32.unpack_from(payload, 6)[0]
    pos = 10
    if not params and not flags & PARAMETER_COUNT_AVAILABLE:
        return ExecuteRequest(flags, iterations, 0, b"", None, payload[10:], attributes=True), len(payload) == 10
    count, pos = lenenc(payload, pos)
    if count < params:
        raise ProtocolError(f"mysql: STMT_EXECUTE has {count} values for {params} parameters")
    if not count:
        return ExecuteRequest(flags, iterations, 0, b"", None, b"", attributes=True), pos == len(payload)
    size = (count + 7) // 8
    all_bits = int.from_bytes(payload[pos : pos + size], "little")
    pos += size
    bitmap = (all_bits & ((1 << params) - 1)).to_bytes((params + 7) // 8, "little")
    bound = payload[pos]
    pos += 1
    types = None
    all_types = b""
    if bound == 1:
        for _ in range(count):
            all_types += payload[pos : pos + 2]
            pos += 2
            name_length, pos = lenenc(payload, pos)
            pos += name_length
        types = all_types[: 2 * params]
    elif bound != 0:
        raise ProtocolError("mysql: STMT_EXECUTE parameters in an unknown layout")
    request = ExecuteRequest(flags, iterations, params, bitmap, types, payload[pos:], trailing=count > params,
                             attributes=True)
    exact = bound == 1 and _values_end(payload, pos, all_bits.to_bytes(size, "little"), all_types, count) == len(payload)
    return request, exact


# -- login --------------------------------------------------------------------------------------


def scramble_native(password: bytes, salt: bytes) -> bytes:
    """mysql_native_password: SHA1(pw) XOR SHA1(salt + SHA1(SHA1(pw)))."""
    if not password:
        return b""
    stage1 = hashlib.sha1(password).digest()
    stage2 = hashlib.sha1(stage1).digest()
    mask = hashlib.sha1(salt + stage2).digest()
    return bytes(a ^ b for a, b in zip(stage1, mask))


def scramble_caching_sha2(password: bytes, salt: bytes) -> bytes:
    """caching_sha2_password fast path: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + salt)."""
    if not password:
        return b""
    p1 = hashlib.sha256(password).digest()
    p2 = hashlib.sha256(p1).digest()
    mask = hashlib.sha256(p2 + salt).digest()
    return bytes(a ^ b for a, b in zip(p1, mask))


def _auth_data(plugin: str, password: bytes, salt: bytes) -> bytes:
    if plugin in ("mysql_native_password", ""):
        return scramble_native(password, salt)
    if plugin == "caching_sha2_password":
        return scramble_caching_sha2(password, salt)
    if plugin == "mysql_clear_password":
        raise ReplayError("the server asks for mysql_clear_password, which replay refuses without TLS")
    raise ReplayError(f"authentication plugin {plugin!r} is not supported by replay "
                      "(supported: mysql_native_password, caching_sha2_password fast path)")


@attrs.frozen
class LoginOptions:
    user: str
    password: str = ""
    database: str | None = None
    #: From the recorded login, when there is one.
    recorded: RecordedLogin | None = None


class MysqlConnection:
    """A logged-in connection to the target, with its own prepared statements."""

    def __init__(self, host: str, port: int, login: LoginOptions, timeout: float) -> None:
        self.host, self.port, self.login, self.timeout = host, port, login, timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        #: Statement text → (statement id on the target, parameter count).
        self.statements: dict[bytes, tuple[int, int]] = {}
        self.capabilities = 0

    # - packets

    def _send(self, payload: bytes, seq: int, deadline: Deadline) -> int:
        data, seq = encode_packets(payload, seq)
        send_all(self._sock, data, deadline)
        return seq

    def _packet(self, deadline: Deadline) -> tuple[int, bytes]:
        """The next packet (16 MiB pieces joined)."""
        joined = bytearray()
        while True:
            while len(self._buf) < 4 or len(self._buf) < 4 + (_U32.unpack_from(self._buf, 0)[0] & MAX_PAYLOAD):
                data = recv_some(self._sock, deadline)
                if not data:
                    raise ReplayError("the server closed the connection")
                self._buf += data
            header = _U32.unpack_from(self._buf, 0)[0]
            length, seq = header & MAX_PAYLOAD, header >> 24
            joined += self._buf[4 : 4 + length]
            self._buf = self._buf[4 + length :]
            if length < MAX_PAYLOAD:
                return seq, bytes(joined)

    # - login

    def open(self, deadline: Deadline) -> None:
        self._sock = connect(self.host, self.port, deadline)
        self._buf = b""
        self.statements.clear()
        seq, greeting = self._packet(deadline)
        if greeting[:1] == b"\xff":
            part = _error(greeting)
            raise ReplayError(f"the server refused the connection: {part.error_code} {part.message}")
        if greeting[:1] != b"\x0a":
            raise ReplayError("not a MySQL protocol-10 greeting")
        _, pos = cstring(greeting, 1)  # server version
        pos += 4  # connection id
        salt = greeting[pos : pos + 8]
        pos += 9
        server_caps = _U16.unpack_from(greeting, pos)[0]
        pos += 2
        charset = DEFAULT_CHARSET
        plugin = "mysql_native_password"
        if len(greeting) > pos:
            server_caps |= _U16.unpack_from(greeting, pos + 3)[0] << 16
            salt_length = greeting[pos + 5]
            pos += 16  # character set, status, upper capabilities, salt length, reserved
            if server_caps & CLIENT_SECURE_CONNECTION:
                rest = greeting[pos : pos + max(13, salt_length - 8)]
                salt += rest[:12]  # 20 bytes in all; a NUL ends the field
                pos += max(13, salt_length - 8)
            if server_caps & CLIENT_PLUGIN_AUTH:
                plugin = cstring(greeting, pos)[0].decode("ascii", "replace")
        login = self.login
        recorded = login.recorded
        wanted = BASE_CAPABILITIES
        if recorded is not None:
            wanted |= recorded.capabilities & RECORDED_CAPABILITIES
            charset = recorded.charset
        else:
            wanted |= CLIENT_MULTI_STATEMENTS
        database = login.database if login.database is not None else (recorded.database if recorded else None)
        if database:
            wanted |= CLIENT_CONNECT_WITH_DB
        caps = wanted & server_caps | CLIENT_PROTOCOL_41
        if not server_caps & CLIENT_PROTOCOL_41:
            raise ReplayError("the server does not speak the 4.1 protocol")
        self.capabilities = caps
        password = login.password.encode()
        auth = _auth_data(plugin, password, salt)
        response = _U32.pack(caps) + _U32.pack(MAX_PAYLOAD) + bytes([charset]) + bytes(23)
        response += login.user.encode() + b"\x00"
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            response += encode_lenenc(len(auth)) + auth
        else:
            response += bytes([len(auth)]) + auth
        if caps & CLIENT_CONNECT_WITH_DB:
            response += database.encode() + b"\x00"
        if caps & CLIENT_PLUGIN_AUTH:
            response += plugin.encode() + b"\x00"
        seq = self._send(response, seq + 1, deadline)
        while True:
            seq, packet = self._packet(deadline)
            first = packet[:1]
            if first == b"\x00":
                return
            if first == b"\xff":
                part = _error(packet)
                raise ReplayError(f"login as {login.user!r} failed: {part.error_code} {part.message}")
            if first == b"\xfe":  # authentication switch: another plugin, another salt
                name, pos = cstring(packet, 1)
                plugin = name.decode("ascii", "replace")
                salt = packet[pos:].rstrip(b"\x00")
                seq = self._send(_auth_data(plugin, password, salt), seq + 1, deadline)
            elif first == b"\x01":  # more authentication data
                if plugin == "caching_sha2_password" and packet[1:2] == b"\x03":
                    continue  # fast authentication succeeded: OK follows
                if plugin == "caching_sha2_password" and packet[1:2] == b"\x04":
                    raise ReplayError("caching_sha2_password needs full authentication (the server has not cached "
                                      "this user's password; log in once with the mysql client, or use "
                                      "mysql_native_password)")
                raise ReplayError(f"unexpected authentication data from the server ({plugin})")
            else:
                raise ReplayError(f"unexpected packet 0x{packet[0]:02x} during login")

    # - commands

    def _ensure_open(self, deadline: Deadline) -> None:
        if self._sock is None:
            try:
                self.open(deadline)
            except BaseException:
                self.close(quit=False)
                raise

    def command(self, payload: bytes, binary: bool = False) -> tuple[MysqlResponse, int]:
        """Send one command, read its whole response; (response, latency in ns)."""
        deadline = Deadline(self.timeout)
        try:
            self._ensure_open(deadline)
            return self._command(payload, binary, deadline)
        except BaseException:
            self.close(quit=False)
            raise

    def _command(self, payload: bytes, binary: bool, deadline: Deadline) -> tuple[MysqlResponse, int]:
        parser = ResponseParser(shape_of(payload[0]), binary)
        self._send(payload, 0, deadline)
        sent = time.perf_counter_ns()
        first: int | None = None
        while True:
            _, packet = self._packet(deadline)
            if first is None:
                first = time.perf_counter_ns()
            try:
                if parser.feed(packet):
                    break
            except ProtocolError as exc:
                raise ReplayError(str(exc)) from None
        response = parser.response
        if response.parts and response.parts[0].kind == "local_infile":
            self._send(b"", 2, deadline)  # an empty file: the server answers OK or ERR
            parser = ResponseParser(SHAPE_RESULT)
            while not parser.feed(self._packet(deadline)[1]):
                pass
        return response, first - sent

    def prepare(self, text: bytes) -> tuple[MysqlResponse, int]:
        """STMT_PREPARE on the target; remembers the statement for later executes."""
        response, latency = self.command(bytes([COM_STMT_PREPARE]) + text)
        part = response.parts[0] if response.parts else None
        if part is not None and part.kind == "prepare":
            old = self.statements.get(text)
            if old is not None:  # re-prepared: the earlier one is no longer needed
                deadline = Deadline(self.timeout)
                self._send(bytes([COM_STMT_CLOSE]) + _U32.pack(old[0]), 0, deadline)
            self.statements[text] = (part.statement_id, part.params or 0)
        return response, latency

    def statement(self, text: bytes) -> tuple[int, int]:
        """(statement id, parameter count) of ``text`` on this connection, preparing it if needed."""
        known = self.statements.get(text)
        if known is not None:
            return known
        response, _ = self.prepare(text)
        part = response.parts[0] if response.parts else None
        if part is None or part.kind != "prepare":
            message = f"{part.error_code} {part.message}" if part is not None and part.kind == "err" else "no answer"
            raise ReplayError(f"preparing the statement on the target failed: {message}")
        return self.statements[text]

    def close(self, quit: bool = True) -> None:
        if self._sock is not None and quit:
            try:
                self._sock.settimeout(1.0)
                self._sock.sendall(encode_packets(bytes([COM_QUIT]), 0)[0])
            except OSError:
                pass
        close_quietly(self._sock)
        self._sock = None
        self._buf = b""
        self.statements.clear()


def packets_of(data: bytes) -> Iterable[bytes]:
    return (payload for _, payload in split_packets(data)[0])
