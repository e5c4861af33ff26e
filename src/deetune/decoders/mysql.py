"""MySQL / MariaDB client-server protocol decoder.

Wire format: every packet is a 3-byte little-endian payload length, a 1-byte
sequence id and the payload; a payload of exactly 0xFFFFFF bytes continues in
the next packet.  A connection opens with the server greeting, the client's
handshake response and zero or more authentication round trips, then carries
commands (sequence id 0) each answered by OK, ERR, a result set or nothing.

The decoder follows packet boundaries from the declared lengths, so a capture
gap inside a payload is stepped over; a gap that swallows a packet header loses
the framing.  In the response direction it then waits for the client's next
command (the classic protocol is strictly request/response) and resynchronises
on the next response chunk; responses that answer nothing seen, or cannot be
read, are skipped the same way (counted).  In the request direction it raises
:class:`Undecodable` and the session starts a fresh decoder at the next command.
At most MAX_PENDING commands wait for a response.

Compressed (CLIENT_COMPRESS / zstd) and TLS connections are not decoded
(``reason="unsupported"``: the connection is given up).
"""

from __future__ import annotations

import collections
import struct
from typing import Any, Iterable

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable

__all__ = ["MysqlDecoder"]

# Capability flags (https://dev.mysql.com/doc/dev/mysql-server/latest/group__group__cs__capabilities__flags.html).
CLIENT_CONNECT_WITH_DB = 0x00000008
CLIENT_COMPRESS = 0x00000020
CLIENT_PROTOCOL_41 = 0x00000200
CLIENT_SSL = 0x00000800
CLIENT_SECURE_CONNECTION = 0x00008000
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 0x00200000
CLIENT_DEPRECATE_EOF = 0x01000000
CLIENT_ZSTD_COMPRESSION = 0x04000000
CLIENT_QUERY_ATTRIBUTES = 0x08000000

# Server status flags carried by OK and EOF packets.
SERVER_MORE_RESULTS_EXISTS = 0x0008
SERVER_STATUS_CURSOR_EXISTS = 0x0040

MAX_PAYLOAD = 0xFFFFFF
#: Statement text kept for ``target`` (bytes); longer statements are cut and flagged.
MAX_STATEMENT_BYTES = 16 * 1024
#: Error message / LOCAL INFILE file name bytes kept.
MAX_MESSAGE_BYTES = 1024
#: Payload prefix buffered per packet while it is split across chunks.
REQUEST_PREFIX_CAP = MAX_STATEMENT_BYTES + 1024
RESPONSE_PREFIX_CAP = 4096
#: Prepared statement texts remembered per connection (oldest forgotten first).
MAX_STATEMENTS = 1024
#: MySQL's own limit on columns in a table / result set.
MAX_COLUMNS = 4096
#: Commands waiting for a response; beyond, the oldest are reported unanswered (counted as
#: ``pending_limit``) and their responses, when they come, skipped by their framing.
MAX_PENDING = 1024
#: Runs of (command, kind) a stand-in for such commands keeps at most.
_MAX_SKIP_RUNS = 64
_MAX_U64 = (1 << 64) - 1

_HEADER = struct.Struct("<I")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

# How a command's response is shaped.
_NO_RESPONSE = 0  # QUIT, STMT_CLOSE, STMT_SEND_LONG_DATA
_RESULT = 1  # OK | ERR | result set(s) | LOCAL INFILE
_PREPARE = 2  # STMT_PREPARE_OK + parameter and column definitions
_FIELD_LIST = 3  # column definitions up to EOF
_FETCH = 4  # rows up to EOF
_SINGLE = 5  # one packet of text (COM_STATISTICS)
_AUTH = 6  # login / COM_CHANGE_USER: auth switch / more data until OK or ERR

COM_INIT_DB = 0x02
COM_QUERY = 0x03
COM_FIELD_LIST = 0x04
COM_CHANGE_USER = 0x11
COM_STMT_PREPARE = 0x16
COM_STMT_EXECUTE = 0x17
COM_STMT_SEND_LONG_DATA = 0x18
COM_STMT_CLOSE = 0x19
COM_STMT_RESET = 0x1A
COM_STMT_FETCH = 0x1C
COM_RESET_CONNECTION = 0x1F
COM_STMT_BULK_EXECUTE = 0xFA  # MariaDB

_COMMANDS: dict[int, tuple[str, int]] = {
    0x01: ("QUIT", _NO_RESPONSE),
    0x02: ("INIT_DB", _RESULT),
    0x03: ("QUERY", _RESULT),
    0x04: ("FIELD_LIST", _FIELD_LIST),
    0x05: ("CREATE_DB", _RESULT),
    0x06: ("DROP_DB", _RESULT),
    0x07: ("REFRESH", _RESULT),
    0x08: ("SHUTDOWN", _RESULT),
    0x09: ("STATISTICS", _SINGLE),
    0x0A: ("PROCESS_INFO", _RESULT),
    0x0C: ("PROCESS_KILL", _RESULT),
    0x0D: ("DEBUG", _RESULT),
    0x0E: ("PING", _RESULT),
    0x11: ("CHANGE_USER", _AUTH),
    0x13: ("TABLE_DUMP", _RESULT),
    0x15: ("REGISTER_SLAVE", _RESULT),
    0x16: ("STMT_PREPARE", _PREPARE),
    0x17: ("STMT_EXECUTE", _RESULT),
    0x18: ("STMT_SEND_LONG_DATA", _NO_RESPONSE),
    0x19: ("STMT_CLOSE", _NO_RESPONSE),
    0x1A: ("STMT_RESET", _RESULT),
    0x1B: ("SET_OPTION", _RESULT),
    0x1C: ("STMT_FETCH", _FETCH),
    0x1F: ("RESET_CONNECTION", _RESULT),
    0xFA: ("STMT_BULK_EXECUTE", _RESULT),
}
# Server-internal command codes a client may still send (the server answers ERR).
for _code in (0x00, 0x0B, 0x0F, 0x10, 0x14, 0x1D):
    _COMMANDS[_code] = (f"COM_0x{_code:02x}", _RESULT)
# Replication streams never end in a response: not followed.
_STREAMING_COMMANDS = {0x12: "binlog dump", 0x1E: "binlog dump", 0x20: "clone protocol"}

# Response-parsing stages.
_FIRST = 0  # first packet of a (next) result
_COLDEFS = 1
_AFTER_COLDEFS = 2  # EOF marker, or (DEPRECATE_EOF) straight to rows
_ROWS = 3
_INFILE = 4  # server asked for a LOCAL INFILE: client data until an empty packet
_PREP_PARAMS = 5
_PREP_PARAMS_EOF = 6
_PREP_COLS = 7
_PREP_COLS_EOF = 8
_TAIL_EOF = 9  # DEPRECATE_EOF unknown: an EOF may or may not close the prepare response

# Connection phases.
_INITIAL = 0  # nothing seen yet
_GREETED = 1  # server greeting seen, waiting for the handshake response
_COMMANDS_PHASE = 2  # login sent (or missed): commands follow

# Bytes detect() accepts in SQL text and names: printable ASCII, tab, CR, LF, UTF-8.
_TEXT_BYTES = bytes([9, 10, 13, *range(0x20, 0x7F), *range(0x80, 0x100)])
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F))
_STATEMENT_START = b"(/-#{ \t\r\n"


class _Lost(Exception):
    """A response packet cannot be interpreted because its bytes were not captured."""


class _Continued:
    """A logical packet being joined from 0xFFFFFF-byte pieces."""

    __slots__ = ("seq", "prefix", "length", "wire", "ts0", "intact")

    def __init__(self, seq: int, prefix: bytearray, length: int, ts0: int, intact: bool) -> None:
        self.seq = seq
        self.prefix = prefix
        self.length = length
        self.wire = length + 4
        self.ts0 = ts0
        self.intact = intact  # every byte so far captured: later pieces may extend the prefix


class _Stream:
    """Packet framing state of one direction."""

    __slots__ = ("cap", "header", "length", "seq", "need", "prefix", "holed", "ts0", "carried", "lost", "cont")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.lost = False
        self.cont: _Continued | None = None
        self.reset()

    def reset(self) -> None:
        self.header = b""  # bytes of a header split across chunks (< 4)
        self.length = -1  # payload length of the packet in progress; -1 at a packet boundary
        self.seq = 0
        self.need = 0  # its payload bytes not yet seen
        self.prefix = bytearray()  # its captured, contiguous payload prefix (up to cap)
        self.holed = False  # a gap cut its payload: later bytes no longer extend the prefix
        self.ts0 = 0  # timestamp of the chunk holding its first byte
        self.carried = 0  # its bytes (incl. gaps) seen in chunks so far

    def resync(self) -> None:
        self.reset()
        self.lost = False
        self.cont = None


class _Command:
    """A request and the response assembled for it so far."""

    __slots__ = (
        "code", "method", "target", "kind", "stage", "left", "attrs",
        "req_start", "req_end", "req_bytes", "resp_start", "resp_end", "resp_bytes",
        "status", "error_message", "columns", "rows", "results", "affected", "last_id",
        "prep_params", "prep_cols", "text", "runs",
    )

    def __init__(self, code: int, method: str, kind: int, target: str, ts0: int, ts1: int, wire: int) -> None:
        self.code = code
        self.method = method
        self.kind = kind
        self.target = target
        self.stage = _FIRST
        self.left = 0
        self.attrs: dict[str, Any] = {}
        self.req_start = ts0
        self.req_end = ts1
        self.req_bytes = wire
        self.resp_start: int | None = None
        self.resp_end: int | None = None
        self.resp_bytes = 0
        self.status: str | None = None
        self.error_message: str | None = None
        self.columns: int | None = None
        self.rows = 0
        self.results = 0
        self.affected: int | None = None
        self.last_id: int | None = None
        self.prep_params = 0
        self.prep_cols = 0
        self.text = ""  # STMT_PREPARE: the statement, remembered once the server accepts it
        #: A stand-in for commands reported already whose responses are still to come (see
        #: MAX_PENDING): [code, kind, count] runs, in order; None for a real command.
        self.runs: collections.deque[list[int]] | None = None


def _lenenc(p, pos: int) -> tuple[int, int]:
    """A length-encoded integer at ``pos``: (value, position after it)."""
    b = p[pos]
    if b < 0xFB:
        return b, pos + 1
    if b == 0xFC:
        return p[pos + 1] | p[pos + 2] << 8, pos + 3
    if b == 0xFD:
        return p[pos + 1] | p[pos + 2] << 8 | p[pos + 3] << 16, pos + 4
    if b == 0xFE:
        return struct.unpack_from("<Q", p, pos + 1)[0], pos + 9
    raise Undecodable(f"bad length-encoded integer 0x{b:02x}")


def _cstring(p, pos: int, limit: int = 1024) -> tuple[bytes, int]:
    """A NUL-terminated string at ``pos``: (bytes, position after the NUL)."""
    raw = bytes(p[pos : pos + limit])
    end = raw.find(b"\x00")
    if end < 0:
        raise Undecodable("unterminated string")
    return raw[:end], pos + end + 1


def _text(raw) -> str:
    return str(bytes(raw), "utf-8", "replace")


def _status_flags(p, length: int) -> int:
    """Server status flags of an OK (0x00 / 0xFE) or EOF packet; 0 when not captured."""
    try:
        if p[0] == 0xFE and length < 7:  # EOF: header, warnings, status
            return _U16.unpack_from(p, 3)[0] if length >= 5 else 0
        _, pos = _lenenc(p, 1)
        _, pos = _lenenc(p, pos)
        return _U16.unpack_from(p, pos)[0]
    except (IndexError, struct.error):
        if len(p) < length or length < 5:  # prefix only, or a pre-4.1 packet without flags
            return 0
        raise Undecodable("malformed OK packet") from None


def _looks_compressed(p, length: int) -> bool:
    """Whether a packet read with the plain header is really a compressed-protocol packet.

    The compressed header is 7 bytes (compressed length, sequence id, uncompressed
    length), so the plain reading's payload begins with the 3-byte uncompressed length.
    """
    if len(p) < 5:
        return False
    uncompressed = p[0] | p[1] << 8 | p[2] << 16
    if uncompressed == 0:  # stored uncompressed: a whole plain packet follows
        if len(p) < 8:
            return False
        inner = _HEADER.unpack_from(p, 3)[0]
        return (inner & MAX_PAYLOAD) == length - 4 and inner >> 24 == 0 and p[7] in _COMMANDS
    # zlib stream header; MySQL only sends compressed data that came out smaller.
    return uncompressed > length and p[3] == 0x78 and (p[3] << 8 | p[4]) % 31 == 0


def _is_greeting(p, length: int) -> bool:
    """A protocol-10 greeting: 0x0A, a printable version string starting with a digit, then fields."""
    if p[0] != 0x0A or length > 1024:
        return False
    version = bytes(p[1:80])
    end = version.find(b"\x00")
    return (
        end > 0 and length >= end + 16
        and version[:1].isdigit() and not version[:end].translate(None, _PRINTABLE_ASCII)
    )


def _is_text(raw) -> bool:
    return len(raw) > 0 and not bytes(raw).translate(None, _TEXT_BYTES)


def _plausible_command(p, length: int) -> bool:
    """detect(): a command packet (possibly only a prefix ``p`` of it) a client would send."""
    code = p[0]
    if code in (0x01, 0x09, 0x0A, 0x0E, 0x1F):  # QUIT, STATISTICS, PROCESS_INFO, PING, RESET_CONNECTION
        return length == 1
    if code in (COM_QUERY, COM_STMT_PREPARE):
        body = p[1:65]
        if len(body) >= 2 and body[0] == 0 and body[1] == 1:  # query attributes, none set
            body = p[3:67]
        # Statements start with a keyword, a comment, a parenthesis or blank space.
        return length < MAX_PAYLOAD and _is_text(body) and (bytes(body[:1]).isalpha() or body[0] in _STATEMENT_START)
    if code == COM_INIT_DB:
        return length <= 256 and _is_text(p[1:])
    if code == COM_STMT_EXECUTE:
        return length >= 10 and (len(p) < 10 or (p[5] < 0x10 and _U32.unpack_from(p, 6)[0] == 1))
    if code in (COM_STMT_CLOSE, COM_STMT_RESET, 0x0C):  # 0x0C: PROCESS_KILL
        return length == 5
    if code == COM_STMT_FETCH:
        return length == 9
    if code == 0x1B:  # SET_OPTION
        return length == 3 and (len(p) < 3 or p[1] in (0, 1) and p[2] == 0)
    return False


def _plausible_handshake_response(p, length: int) -> bool:
    """detect(): a 4.1 handshake response (or SSL request): flags, max packet, charset, 23 zero bytes."""
    if length < 32 or len(p) < 32 or length > 64 * 1024:
        return False
    flags = _U32.unpack_from(p, 0)[0]
    if not flags & CLIENT_PROTOCOL_41 or any(p[9:32]):
        return False
    if length == 32:
        return bool(flags & CLIENT_SSL)
    user = bytes(p[32:96])
    end = user.find(b"\x00")
    return end >= 0 and not user[:end].translate(None, _TEXT_BYTES)


class MysqlDecoder(Decoder):
    """Decodes one MySQL / MariaDB connection into exchanges."""

    protocol = "mysql"
    default_ports = (3306,)

    def __init__(self) -> None:
        self._req = _Stream(REQUEST_PREFIX_CAP)
        self._resp = _Stream(RESPONSE_PREFIX_CAP)
        self._phase = _INITIAL
        self._pending: collections.deque[_Command] = collections.deque()
        self._out: list[Exchange] = []
        self._failed: str | None = None
        self._server_caps: int | None = None
        self._server_version: str | None = None
        # Negotiated features; None while unknown (decoder started mid-connection).
        self._deprecate_eof: bool | None = None
        self._query_attributes: bool | None = None
        self._secure_connection = True
        self._statements: dict[int, str] = {}
        self._last_prepared: str | None = None  # MariaDB: STMT_EXECUTE id -1 means "the last prepared"
        self._ignore_rest = False  # the server refused the login and hangs up

    # ------------------------------------------------------------------ detect

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        try:
            return cls._detect(direction, data)
        except Exception:  # detect() must never raise, whatever the bytes
            return False

    @classmethod
    def _detect(cls, direction: Direction, data: bytes) -> bool:
        if len(data) < 5:
            return False
        header = _HEADER.unpack_from(data, 0)[0]
        length, seq = header & MAX_PAYLOAD, header >> 24
        if length == 0:
            return False
        p = memoryview(data)[4 : 4 + length]
        complete = len(data) >= 4 + length
        if direction is Direction.RESPONSE:
            if seq != 0 or length > 1024 or (complete and len(data) != 4 + length):
                return False  # the server sends its first packet and waits
            if p[0] == 0x0A:
                return _is_greeting(p, length)
            if p[0] == 0xFF and len(p) >= 4:  # refused at connect ("Too many connections")
                code = _U16.unpack_from(p, 1)[0]
                message = p[9:] if p[3] == ord("#") else p[3:]
                return 1000 <= code < 0xFFFF and (not message or _is_text(message))
            return False
        if seq == 1:
            return _plausible_handshake_response(p, length)
        if seq != 0:
            return False
        if _looks_compressed(p, length):
            return True
        # Every complete packet in the chunk must be a command; the last may be a prefix.
        pos = 0
        for _ in range(16):
            if not _plausible_command(p, length):
                return False
            pos += 4 + length
            if pos >= len(data):
                return True
            if len(data) - pos < 5:
                return False
            header = _HEADER.unpack_from(data, pos)[0]
            length = header & MAX_PAYLOAD
            if header >> 24 != 0 or length == 0:
                return False
            p = memoryview(data)[pos + 4 : pos + 4 + length]
        return True

    # ------------------------------------------------------------------ feed

    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        if self._failed is not None:
            raise Undecodable(self._failed, reason="unsupported")
        if self._ignore_rest:
            return ()
        self._out = []
        request = chunk.direction is Direction.REQUEST
        try:
            if request:
                self._frame(self._req, chunk.data, chunk.size, chunk.ts_ns, self._on_request, self._on_request_lost)
            else:
                self._frame(self._resp, chunk.data, chunk.size, chunk.ts_ns, self._on_response, self._on_response_lost)
        except Undecodable as exc:
            if exc.reason == "unsupported":
                self._failed = str(exc) or "undecodable"
            elif not request and exc.reason != "gap":
                self._response_garbage()
                return self._out
            exc.exchanges[:0] = self._out
            raise
        except (IndexError, struct.error, ValueError, OverflowError, UnicodeError) as exc:
            if not request:
                self._response_garbage()
                return self._out
            raise Undecodable(f"malformed packet ({type(exc).__name__})", exchanges=self._out,
                              reason="garbage") from None  # fmt: skip
        except Exception as exc:  # a decoder bug must not take the caller down
            raise Undecodable(f"internal error: {type(exc).__name__}: {exc}", exchanges=self._out,
                              reason="decoder_error") from None  # fmt: skip
        return self._out

    def _response_garbage(self) -> None:
        """A response that cannot be read: what is waiting keeps what was seen of its response and
        is reported when the client sends its next command (the responses start afresh then)."""
        self.count("resync:garbage")
        self._resp.reset()
        self._resp.lost = True
        self._resp.cont = None

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        if self._failed is not None:
            return ()
        self._out = []
        pending, self._pending = self._pending, collections.deque()
        if pending and not self._resp.lost:
            # Bytes of a response packet still in flight moved on the wire too.
            in_flight = self._resp.carried if self._resp.length >= 0 or self._resp.header else 0
            if self._resp.cont is not None:
                in_flight += self._resp.cont.wire
            pending[0].resp_bytes += in_flight
        for cmd in pending:
            if cmd.runs is not None:
                continue
            if cmd.stage == _TAIL_EOF:
                cmd.status = "OK"
            else:
                self._mark_unfinished(cmd)
            self._emit(cmd)
        return self._out

    # ------------------------------------------------------------------ framing

    def _frame(self, st: _Stream, data: bytes, size: int, ts: int, on_packet, on_lost) -> None:
        """Cut one chunk into packets and hand each complete one to ``on_packet``."""
        if st.lost:
            on_lost(ts, size, ts)
            return
        n = len(data)
        pos = 0
        view = memoryview(data)
        unpack = _HEADER.unpack_from
        while True:
            if st.length < 0 and not st.header:
                # At a packet boundary: whole packets straight from the chunk.
                while pos + 4 <= n:
                    header = unpack(data, pos)[0]
                    length = header & MAX_PAYLOAD
                    end = pos + 4 + length
                    if end > n:
                        break
                    if length == MAX_PAYLOAD or st.cont is not None:
                        self._deliver_piece(st, header >> 24, view[pos + 4 : end], length, ts, ts, on_packet)
                        pos = end
                    elif on_packet(header >> 24, view[pos + 4 : end], length, length + 4, ts, ts):
                        pos = self._skim(data, end, n, ts)
                    else:
                        pos = end
                    if st.lost:
                        on_lost(ts, size - pos, ts)
                        return
                if pos == n:
                    break
                # A packet that continues in the next chunk.
                st.ts0 = ts
                st.carried = n - pos
                if n - pos < 4:
                    st.header = bytes(data[pos:])
                else:
                    header = unpack(data, pos)[0]
                    st.length = header & MAX_PAYLOAD
                    st.seq = header >> 24
                    st.need = st.length - (n - pos - 4)
                    st.prefix = bytearray(view[pos + 4 : pos + 4 + min(st.cap, n - pos - 4)])
                    st.holed = False
                pos = n
                break
            # Continue the packet begun in an earlier chunk.
            if st.length < 0:
                take = min(4 - len(st.header), n - pos)
                st.header += data[pos : pos + take]
                pos += take
                st.carried += take
                if len(st.header) < 4:
                    break
                header = _HEADER.unpack(st.header)[0]
                st.header = b""
                st.length = header & MAX_PAYLOAD
                st.seq = header >> 24
                st.need = st.length
                st.prefix = bytearray()
                st.holed = False
            take = min(st.need, n - pos)
            if not st.holed and len(st.prefix) < st.cap:
                st.prefix += view[pos : pos + min(take, st.cap - len(st.prefix))]
            pos += take
            st.need -= take
            st.carried += take
            if st.need:
                break
            if self._finish_partial(st, ts, on_packet):
                pos = self._skim(data, pos, n, ts)
            if st.lost:
                on_lost(ts, size - pos, ts)
                return
        gap = size - n
        if gap <= 0:
            return
        if st.length >= 0 and gap <= st.need:
            # The gap lies inside a payload whose length is known: framing holds.
            st.need -= gap
            st.carried += gap
            st.holed = True
            if st.need == 0:
                self._finish_partial(st, ts, on_packet)
                if st.lost:
                    on_lost(ts, 0, ts)
            return
        # The gap swallows a packet header: packet boundaries are lost.
        partial = st.length >= 0 or bool(st.header)
        lost_from = st.ts0 if partial else ts
        lost_bytes = (st.carried if partial else 0) + gap
        st.reset()
        st.lost = True
        st.cont = None
        on_lost(lost_from, lost_bytes, ts)

    def _finish_partial(self, st: _Stream, ts: int, on_packet) -> bool:
        seq, length, payload, ts0 = st.seq, st.length, bytes(st.prefix), st.ts0
        st.reset()
        if length == MAX_PAYLOAD or st.cont is not None:
            self._deliver_piece(st, seq, payload, length, ts0, ts, on_packet)
            return False
        return bool(on_packet(seq, payload, length, length + 4, ts0, ts))

    def _skim(self, data: bytes, pos: int, n: int, ts: int) -> int:
        """Count whole row / column-definition packets of the head command's result set
        without dispatching each; stop before any packet that needs a closer look."""
        cmd = self._pending[0]
        stage, left = cmd.stage, cmd.left
        rows = wire = 0
        unpack = _HEADER.unpack_from
        while pos + 4 <= n:
            length = unpack(data, pos)[0] & MAX_PAYLOAD
            end = pos + 4 + length
            if end > n or length == 0 or length == MAX_PAYLOAD:
                break
            if stage == _ROWS:
                first = data[pos + 4]
                if first == 0xFE or first == 0xFF:  # end of rows, or an error
                    break
                rows += 1
            elif left == 1:  # the last definition changes the stage: leave it to _advance
                break
            else:
                left -= 1
            wire += length + 4
            pos = end
        if wire:
            cmd.rows += rows
            cmd.left = left
            cmd.resp_bytes += wire
            cmd.resp_end = ts
        return pos

    @staticmethod
    def _deliver_piece(st: _Stream, seq: int, payload, length: int, ts0: int, ts1: int, on_packet) -> None:
        """Join 0xFFFFFF-byte packets into one logical packet."""
        cont = st.cont
        if cont is None:
            cont = st.cont = _Continued(seq, bytearray(payload[: st.cap]), length, ts0, len(payload) == length)
        else:
            if cont.intact and len(cont.prefix) < st.cap:
                cont.prefix += payload[: st.cap - len(cont.prefix)]
            cont.intact = cont.intact and len(payload) == length
            cont.length += length
            cont.wire += length + 4
        if length < MAX_PAYLOAD:
            st.cont = None
            on_packet(cont.seq, bytes(cont.prefix), cont.length, cont.wire, cont.ts0, ts1)

    # ------------------------------------------------------------------ requests

    def _on_request_lost(self, ts0: int, nbytes: int, ts1: int) -> None:
        raise Undecodable("request framing lost in a capture gap", reason="gap")

    def _on_request(self, seq: int, p, length: int, wire: int, ts0: int, ts1: int) -> None:
        pending = self._pending
        if pending:
            head = pending[0]
            if head.stage == _INFILE or (head.kind == _AUTH and head.status is None and seq != 0):
                # LOCAL INFILE data, or an authentication round trip: part of that command.
                head.req_bytes += wire
                if head.stage == _INFILE and length == 0:
                    head.stage = _FIRST  # end of file: the server answers OK / ERR
                return
        phase = self._phase
        if phase == _COMMANDS_PHASE:
            if seq != 0:
                raise Undecodable(f"request packet with sequence id {seq} outside a command", reason="garbage")
            self._on_command(p, length, wire, ts0, ts1)
        elif phase == _GREETED:
            self._on_handshake_response(p, length, wire, ts0, ts1)
        elif seq == 1 and length >= 32 and len(p) >= 32:  # greeting missed: the login itself
            self._on_handshake_response(p, length, wire, ts0, ts1)
        elif seq == 0:  # started mid-connection, at a command
            if _looks_compressed(p, length):  # the handshake that negotiated it was missed
                raise Undecodable("compressed protocol", reason="unsupported")
            self._phase = _COMMANDS_PHASE
            self._on_command(p, length, wire, ts0, ts1)
        else:
            raise Undecodable(f"stream does not start at a packet boundary (sequence id {seq})", reason="garbage")

    def _on_command(self, p, length: int, wire: int, ts0: int, ts1: int) -> None:
        if length == 0 or not p:
            raise Undecodable("empty command packet", reason="garbage")
        pending = self._pending
        if self._resp.lost:
            # The response to what is pending lost its framing; the client has moved
            # on, so that response is over and the next one starts a fresh chunk.
            while pending:
                self._emit_unfinished(pending.popleft())
            self._resp.resync()
        elif len(pending) >= MAX_PENDING:
            self._too_many_pending()
        elif pending and pending[0].stage == _TAIL_EOF:
            # No EOF came after the prepare metadata before the client went on.
            cmd = pending.popleft()
            self._deprecate_eof = True
            cmd.status = "OK"
            self._emit(cmd)
        code = p[0]
        entry = _COMMANDS.get(code)
        if code == 0 or entry is None:
            if _looks_compressed(p, length):
                raise Undecodable("compressed protocol", reason="unsupported")
            if code in _STREAMING_COMMANDS:
                raise Undecodable(f"{_STREAMING_COMMANDS[code]} is not decoded", reason="unsupported")
            if entry is None:
                raise Undecodable(f"unknown command byte 0x{code:02x}", reason="garbage")
        method, kind = entry
        cmd = _Command(code, method, kind, "", ts0, ts1, wire)
        if code == COM_QUERY or code == COM_STMT_PREPARE:
            self._set_statement_target(cmd, p, length)
        elif code == COM_STMT_EXECUTE or code == COM_STMT_FETCH or code == COM_STMT_RESET \
                or code == COM_STMT_CLOSE or code == COM_STMT_SEND_LONG_DATA or code == COM_STMT_BULK_EXECUTE:
            statement_id = _U32.unpack_from(p, 1)[0]
            if statement_id == 0xFFFFFFFF and self._last_prepared is not None:
                cmd.target = self._last_prepared
            else:
                cmd.target = self._statements.get(statement_id, "")
            cmd.attrs["statement_id"] = statement_id
            if code == COM_STMT_CLOSE:
                self._statements.pop(statement_id, None)
        elif code in (COM_INIT_DB, COM_FIELD_LIST, 0x05, 0x06):  # a database or table name
            name = bytes(p[1 : 1 + 1024])
            cmd.target = _text(name.split(b"\x00", 1)[0])
        elif code == COM_CHANGE_USER:
            self._parse_change_user(cmd, p)
        if kind == _FETCH:
            cmd.stage = _ROWS
        if kind == _NO_RESPONSE:
            self._emit(cmd)
        else:
            pending.append(cmd)

    def _set_statement_target(self, cmd: _Command, p, length: int) -> None:
        start = 1
        if cmd.code == COM_QUERY and self._query_attributes is not False:
            start = self._query_text_start(p)
        raw = p[start : start + MAX_STATEMENT_BYTES]
        cmd.target = _text(raw)
        if length - start > len(raw):
            cmd.attrs["target_truncated"] = True
        if cmd.code == COM_STMT_PREPARE:
            cmd.text = cmd.target
            self._last_prepared = cmd.target

    def _query_text_start(self, p) -> int:
        """Where the statement begins in a COM_QUERY payload (after any query attributes)."""
        attributes = self._query_attributes
        if attributes is None:
            # Unknown: parameter count then parameter set count (always 1); SQL text
            # never starts with a control byte followed by 0x01.
            attributes = len(p) >= 3 and p[2] == 1 and p[1] < 0x20 and p[1] not in (9, 10, 13)
        if not attributes:
            return 1
        try:
            count, pos = _lenenc(p, 1)
            _, pos = _lenenc(p, pos)  # parameter set count
            if count == 0:
                return pos
            null_bitmap = pos
            pos += (count + 7) // 8
            if p[pos] != 1:  # new_params_bind_flag: types and names follow
                return pos + 1
            pos += 1
            types = []
            for _ in range(count):
                types.append(p[pos])
                pos += 2
                name_len, pos = _lenenc(p, pos)
                pos += name_len
            for i, field_type in enumerate(types):
                if not p[null_bitmap + i // 8] >> (i % 8) & 1:
                    pos = _skip_binary_value(p, pos, field_type)
            return pos
        except (IndexError, struct.error, Undecodable):
            return len(p)  # attributes cut by the capture: no statement text seen

    def _on_handshake_response(self, p, length: int, wire: int, ts0: int, ts1: int) -> None:
        if self._resp.lost:
            self._resp.resync()
        cmd = _Command(-1, "LOGIN", _AUTH, "", ts0, ts1, wire)
        flags16 = _U16.unpack_from(p, 0)[0]
        if flags16 & CLIENT_PROTOCOL_41:
            flags = _U32.unpack_from(p, 0)[0]
            if length == 32 and flags & CLIENT_SSL:
                raise Undecodable("switched to TLS", reason="unsupported")
            pos = 32
        else:  # HandshakeResponse320: 2-byte flags, 3-byte max packet size
            flags = flags16
            pos = 5
        caps = flags if self._server_caps is None else flags & self._server_caps
        self._set_capabilities(caps)
        user, pos = _cstring(p, pos)
        cmd.attrs["user"] = _text(user)
        try:  # the auth response is skipped, never kept; the database follows it
            if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
                auth_len, pos = _lenenc(p, pos)
                pos += auth_len
            elif caps & CLIENT_SECURE_CONNECTION:
                pos += 1 + p[pos]
            else:
                _, pos = _cstring(p, pos)
            if flags & CLIENT_CONNECT_WITH_DB:
                database, pos = _cstring(p, pos)
                cmd.attrs["database"] = _text(database)
        except (IndexError, Undecodable):
            if len(p) >= length:
                raise Undecodable("malformed handshake response") from None
            # The rest was not captured: report the login without the database.
        if self._server_version is not None:
            cmd.attrs["server_version"] = self._server_version
        if caps & (CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION):
            cmd.attrs["compressed"] = True
        self._phase = _COMMANDS_PHASE
        self._pending.append(cmd)

    def _parse_change_user(self, cmd: _Command, p) -> None:
        user, pos = _cstring(p, 1)
        cmd.attrs["user"] = _text(user)
        try:
            if self._secure_connection:
                pos += 1 + p[pos]
            else:
                _, pos = _cstring(p, pos)
            database, pos = _cstring(p, pos)
            cmd.attrs["database"] = _text(database)
        except (IndexError, Undecodable):
            pass  # cut by the capture: no database

    def _set_capabilities(self, caps: int) -> None:
        self._deprecate_eof = bool(caps & CLIENT_DEPRECATE_EOF)
        self._query_attributes = bool(caps & CLIENT_QUERY_ATTRIBUTES)
        self._secure_connection = bool(caps & CLIENT_SECURE_CONNECTION)

    # ------------------------------------------------------------------ responses

    def _on_response_lost(self, ts0: int, nbytes: int, ts1: int) -> None:
        if not self._pending:
            return  # nothing asked (or started mid-response): these bytes belong to no exchange
        cmd = self._pending[0]
        if cmd.kind == _AUTH and cmd.code == -1:
            raise Undecodable("response framing lost during login", reason="gap")
        if cmd.resp_start is None:
            cmd.resp_start = ts0
        cmd.resp_end = ts1
        cmd.resp_bytes += nbytes

    def _on_response(self, seq: int, p, length: int, wire: int, ts0: int, ts1: int) -> bool:
        """Handle one response packet; True when the packets that follow may be skimmed."""
        pending = self._pending
        if not pending:
            self._on_unsolicited_response(seq, p, length, wire, ts0, ts1)
            return False
        cmd = pending[0]
        if cmd.stage == _TAIL_EOF and not (p and p[0] == 0xFE and length < 7):
            # No EOF closes the prepare metadata (DEPRECATE_EOF): this packet answers the next command.
            self._deprecate_eof = True
            cmd.status = "OK"
            pending.popleft()
            self._emit(cmd)
            if not pending:
                self._on_unsolicited_response(seq, p, length, wire, ts0, ts1)
                return False
            cmd = pending[0]
        if not p:
            if length:  # its first byte was not captured: cannot tell what it is
                self._lose_response(cmd, wire, ts0, ts1)
                return False
            raise Undecodable("empty response packet")
        if cmd.resp_start is None:
            cmd.resp_start = ts0
        cmd.resp_end = ts1
        cmd.resp_bytes += wire
        try:
            done = self._advance(cmd, p, length)
        except _Lost:
            self._resp.lost = True
            return False
        if done:
            pending.popleft()
            self._emit(cmd)
            return False
        return cmd.kind == _RESULT and (cmd.stage == _ROWS or cmd.stage == _COLDEFS) or cmd.kind == _FETCH

    def _lose_response(self, cmd: _Command, wire: int, ts0: int, ts1: int) -> None:
        if cmd.kind == _AUTH and cmd.code == -1:
            raise Undecodable("response framing lost during login", reason="gap")
        if cmd.resp_start is None:
            cmd.resp_start = ts0
        cmd.resp_end = ts1
        cmd.resp_bytes += wire
        self._resp.lost = True

    def _on_unsolicited_response(self, seq: int, p, length: int, wire: int, ts0: int, ts1: int) -> None:
        first = p[0] if p else -1
        if self._phase == _INITIAL:
            if seq == 0 and first == 0x0A and _is_greeting(p, length):
                self._on_greeting(p)
                return
            if seq == 0 and first == 0xFF:
                # Refused before the greeting ("Too many connections", "Host is blocked").
                cmd = _Command(-1, "LOGIN", _AUTH, "", ts0, ts0, 0)
                cmd.resp_start, cmd.resp_end, cmd.resp_bytes = ts0, ts1, wire
                self._set_error(cmd, p, length)
                self._emit(cmd)
                self._ignore_rest = True
                return
            # Started mid-response: skip until the client's next command.
            self._resp.lost = True
            return
        if seq == 0 and first == 0xFF:
            return  # the server's farewell before closing (e.g. idle timeout): no request
        # Answers a request not seen (or sent while the request was still arriving): skipped, with
        # whatever follows it, until the client's next command.
        self.count("unsolicited_response")
        self._resp.lost = True

    def _on_greeting(self, p) -> None:
        version, pos = _cstring(p, 1, 256)
        self._server_version = _text(version)
        pos += 4 + 8 + 1  # connection id, auth-plugin-data part 1, filler
        caps = _U16.unpack_from(p, pos)[0]
        pos += 2
        if len(p) >= pos + 5:  # character set, status flags, upper capability flags
            caps |= _U16.unpack_from(p, pos + 3)[0] << 16
        self._server_caps = caps
        self._phase = _GREETED

    def _advance(self, cmd: _Command, p, length: int) -> bool:
        """Consume one response packet for ``cmd``; True when its response is complete."""
        first = p[0]
        kind = cmd.kind
        stage = cmd.stage
        if kind == _RESULT:
            if stage == _ROWS:
                # Text rows never start with 0xFE unless 16 MiB long; binary rows start with 0x00.
                if first == 0xFE and length < MAX_PAYLOAD:
                    return self._end_of_result(cmd, p, length)
                if first == 0xFF:
                    return self._error_or_progress(cmd, p, length)
                cmd.rows += 1
                return False
            if stage == _COLDEFS:
                cmd.left -= 1
                if cmd.left == 0:
                    cmd.stage = _AFTER_COLDEFS
                return False
            if stage == _AFTER_COLDEFS:
                if first == 0xFE and length < 7:  # EOF after the metadata
                    self._deprecate_eof = False
                    cmd.stage = _ROWS
                    if cmd.code == COM_STMT_EXECUTE and _status_flags(p, length) & SERVER_STATUS_CURSOR_EXISTS:
                        cmd.attrs["cursor"] = True  # rows come with COM_STMT_FETCH
                        return self._end_of_result(cmd, p, length)
                    return False
                self._deprecate_eof = True
                cmd.stage = _ROWS
                return self._advance(cmd, p, length)
            if stage == _FIRST:
                return self._first_of_result(cmd, p, length)
            if stage == _INFILE:
                if first == 0xFF:
                    return self._error_or_progress(cmd, p, length)
                raise Undecodable("server packet while the client sends a LOCAL INFILE")
        elif kind == _PREPARE:
            return self._advance_prepare(cmd, p, length)
        elif kind == _AUTH:
            if first == 0x00:
                cmd.status = "OK"
                self._after_auth_ok(cmd)
                return True
            if first == 0xFF:
                self._set_error(cmd, p, length)
                if cmd.code == -1:
                    self._ignore_rest = True
                return True
            if first == 0xFE or first == 0x01:  # auth switch request / auth more data
                return False
            raise Undecodable(f"unexpected packet 0x{first:02x} during authentication")
        elif kind == _FIELD_LIST or kind == _FETCH:
            if first == 0xFE and length < MAX_PAYLOAD:
                if kind == _FIELD_LIST:
                    cmd.columns = cmd.rows
                    cmd.rows = 0
                cmd.status = "OK"
                return True
            if first == 0xFF:
                return self._error_or_progress(cmd, p, length)
            cmd.rows += 1
            return False
        elif kind == _SINGLE:
            if first == 0xFF:
                return self._error_or_progress(cmd, p, length)
            cmd.status = "OK"
            return True
        raise Undecodable("response parser in an impossible state")

    def _first_of_result(self, cmd: _Command, p, length: int) -> bool:
        first = p[0]
        if first == 0x00:
            cmd.results += 1
            if len(p) >= 5 and p[1] < 0xFB and p[2] < 0xFB:  # the usual small OK packet
                affected, cmd.last_id, flags = p[1], p[2], p[3] | p[4] << 8
            else:
                try:
                    affected, pos = _lenenc(p, 1)
                    cmd.last_id, _ = _lenenc(p, pos)
                except IndexError:
                    if len(p) >= length:
                        raise Undecodable("malformed OK packet") from None
                    affected = 0
                flags = _status_flags(p, length)
            total = affected + (cmd.affected or 0)
            if total > _MAX_U64:  # several results' counts added up past what the protocol can say
                cmd.attrs["anomalies"] = ["affected_rows_overflow"]
                total = _MAX_U64
            cmd.affected = total
            if flags & SERVER_MORE_RESULTS_EXISTS:
                return False  # stage stays _FIRST: the next result follows
            cmd.status = "OK"
            return True
        if first == 0xFE and length < MAX_PAYLOAD:  # EOF (or DEPRECATE_EOF's OK) as the whole answer
            cmd.results += 1
            return self._end_of_result(cmd, p, length)
        if first == 0xFF:
            return self._error_or_progress(cmd, p, length)
        if first == 0xFB:  # LOCAL INFILE request: the client now streams the file
            cmd.attrs["local_infile"] = _text(p[1 : 1 + MAX_MESSAGE_BYTES])
            cmd.stage = _INFILE
            return False
        try:
            count, pos = _lenenc(p, 0)
        except IndexError:
            raise _Lost() from None
        if count == 0 or count > MAX_COLUMNS:
            raise Undecodable(f"implausible column count {count}")
        cmd.results += 1
        if cmd.columns is None:
            cmd.columns = count
        if length == pos + 1 and len(p) > pos and p[pos] == 0:
            cmd.stage = _AFTER_COLDEFS  # CLIENT_OPTIONAL_RESULTSET_METADATA: no column definitions
        else:
            cmd.stage = _COLDEFS
            cmd.left = count
        return False

    def _end_of_result(self, cmd: _Command, p, length: int) -> bool:
        """An OK / EOF ends one result: more may follow."""
        if _status_flags(p, length) & SERVER_MORE_RESULTS_EXISTS:
            cmd.stage = _FIRST
            return False
        cmd.status = "OK"
        return True

    def _advance_prepare(self, cmd: _Command, p, length: int) -> bool:
        first = p[0]
        stage = cmd.stage
        if stage == _FIRST:
            if first == 0xFF:
                return self._error_or_progress(cmd, p, length)
            if first != 0x00 or length < 12:
                raise Undecodable("malformed STMT_PREPARE response")
            statement_id = _U32.unpack_from(p, 1)[0]
            cmd.prep_cols, cmd.prep_params = _U16.unpack_from(p, 5)[0], _U16.unpack_from(p, 7)[0]
            cmd.attrs.update(statement_id=statement_id, params=cmd.prep_params, columns=cmd.prep_cols)
            self._remember_statement(statement_id, cmd.text)
            return self._prepare_next_section(cmd, after=_FIRST)
        if stage == _PREP_PARAMS or stage == _PREP_COLS:
            cmd.left -= 1
            if cmd.left:
                return False
            if self._deprecate_eof:
                return self._prepare_next_section(cmd, after=stage)
            if self._deprecate_eof is None and (stage == _PREP_COLS or cmd.prep_cols == 0):
                cmd.stage = _TAIL_EOF  # an EOF may close the response, or nothing more comes
                return False
            cmd.stage = _PREP_PARAMS_EOF if stage == _PREP_PARAMS else _PREP_COLS_EOF
            return False
        if first == 0xFE and length < 7:  # the EOF after a definition block
            self._deprecate_eof = False
            if stage == _TAIL_EOF:
                cmd.status = "OK"
                return True
            return self._prepare_next_section(cmd, after=_PREP_PARAMS if stage == _PREP_PARAMS_EOF else _PREP_COLS)
        if stage == _PREP_PARAMS_EOF and self._deprecate_eof is None:
            # No EOF after the parameters: DEPRECATE_EOF is on; this is a column definition.
            self._deprecate_eof = True
            self._prepare_next_section(cmd, after=_PREP_PARAMS)
            return self._advance_prepare(cmd, p, length)
        raise Undecodable("expected EOF after prepared statement metadata")

    def _prepare_next_section(self, cmd: _Command, after: int) -> bool:
        if after == _FIRST and cmd.prep_params:
            cmd.stage, cmd.left = _PREP_PARAMS, cmd.prep_params
            return False
        if after in (_FIRST, _PREP_PARAMS) and cmd.prep_cols:
            cmd.stage, cmd.left = _PREP_COLS, cmd.prep_cols
            return False
        cmd.status = "OK"
        return True

    def _remember_statement(self, statement_id: int, text: str) -> None:
        statements = self._statements
        statements.pop(statement_id, None)
        statements[statement_id] = text
        if len(statements) > MAX_STATEMENTS:
            del statements[next(iter(statements))]

    def _after_auth_ok(self, cmd: _Command) -> None:
        if cmd.attrs.pop("compressed", False):
            # Every later packet is compressed: report the login, then stop.
            self._failed = "compressed protocol"

    def _error_or_progress(self, cmd: _Command, p, length: int) -> bool:
        if len(p) >= 3 and _U16.unpack_from(p, 1)[0] == 0xFFFF:
            return False  # MariaDB progress report, not an error
        self._set_error(cmd, p, length)
        return True

    @staticmethod
    def _set_error(cmd: _Command, p, length: int) -> None:
        cmd.status = "ERR"
        if len(p) >= 3:
            cmd.attrs["error_code"] = _U16.unpack_from(p, 1)[0]
        if len(p) >= 9 and p[3] == 0x23:  # '#' + 5-character SQLSTATE
            cmd.attrs["sql_state"] = _text(p[4:9])
            cmd.error_message = _text(p[9 : 9 + MAX_MESSAGE_BYTES])
        else:
            cmd.error_message = _text(p[3 : 3 + MAX_MESSAGE_BYTES])

    # ------------------------------------------------------------------ exchanges

    def _mark_unfinished(self, cmd: _Command) -> None:
        """The response's end was never seen: report what is known of it."""
        if cmd.resp_start is None:
            return  # no response at all: status None
        cmd.attrs["response_truncated"] = True
        if cmd.status is None and cmd.columns is not None:
            cmd.status = "OK"  # a result set had begun
            cmd.attrs["rows_truncated"] = True
        elif cmd.status is None and cmd.kind == _PREPARE and "statement_id" in cmd.attrs:
            cmd.status = "OK"

    def _emit_unfinished(self, cmd: _Command) -> None:
        if cmd.runs is not None:  # responses of commands reported already: nothing more to say
            return
        self._mark_unfinished(cmd)
        self._emit(cmd)

    def _too_many_pending(self) -> None:
        """Report the commands waiting (but the first, whose response may be under way) as
        unanswered, and put in their place a stand-in that follows and skips their responses."""
        pending = self._pending
        self.count("pending_limit")
        head = pending.popleft()
        runs: collections.deque[list[int]] = collections.deque()
        for cmd in pending:
            for code, kind, n in cmd.runs if cmd.runs is not None else ((cmd.code, cmd.kind, 1),):
                if runs and runs[-1][0] == code and runs[-1][1] == kind:
                    runs[-1][2] += n
                else:
                    runs.append([code, kind, n])
            if cmd.runs is None:
                self._emit(cmd)  # status None: no response seen (yet)
        pending.clear()
        pending.append(head)
        if len(runs) <= _MAX_SKIP_RUNS:
            stand_in = _Command(-2, "", _RESULT, "", 0, 0, 0)
            stand_in.runs = runs
            _restart(stand_in)
            pending.append(stand_in)
        else:  # too mixed to follow: the responses start afresh at the next command
            self._resp.lost = True

    def _emit(self, cmd: _Command) -> None:
        runs = cmd.runs
        if runs is not None:
            # One response of the commands it stands for is over: on to the next, if any.
            runs[0][2] -= 1
            if not runs[0][2]:
                runs.popleft()
            if runs:
                _restart(cmd)
                self._pending.appendleft(cmd)
            return
        attrs = cmd.attrs
        if cmd.columns is not None:
            attrs["columns"] = cmd.columns
            attrs["rows"] = cmd.rows
        elif cmd.kind == _FETCH:
            attrs["rows"] = cmd.rows
        elif cmd.affected is not None:
            attrs["affected_rows"] = cmd.affected
            attrs["last_insert_id"] = cmd.last_id
        if cmd.results > 1:
            attrs["result_sets"] = cmd.results
        status = cmd.status
        if status == "OK" and cmd.code in (COM_RESET_CONNECTION, COM_CHANGE_USER):
            self._statements.clear()
        self._out.append(
            Exchange(
                protocol="mysql",
                method=cmd.method,
                target=cmd.target,
                status=status,
                error=status == "ERR",
                request_start_ns=cmd.req_start,
                request_end_ns=cmd.req_end,
                response_start_ns=cmd.resp_start,
                response_end_ns=cmd.resp_end,
                request_bytes=cmd.req_bytes,
                response_bytes=cmd.resp_bytes,
                error_message=cmd.error_message,
                attributes=attrs,
            )
        )


def _restart(stand_in: _Command) -> None:
    """Make a stand-in (see MysqlDecoder._too_many_pending) read the response of its next command."""
    code, kind, _ = stand_in.runs[0]
    stand_in.code, stand_in.kind = code, kind
    stand_in.stage = _ROWS if kind == _FETCH else _FIRST
    stand_in.left = 0
    stand_in.columns = stand_in.affected = stand_in.last_id = stand_in.status = None
    stand_in.rows = stand_in.results = 0
    stand_in.attrs = {}


def _skip_binary_value(p, pos: int, field_type: int) -> int:
    """Position after one binary-protocol value of ``field_type``."""
    if field_type == 0x06:  # NULL
        return pos
    if field_type == 0x01:  # TINY
        return pos + 1
    if field_type in (0x02, 0x0D):  # SHORT, YEAR
        return pos + 2
    if field_type in (0x03, 0x09, 0x04):  # LONG, INT24, FLOAT
        return pos + 4
    if field_type in (0x08, 0x05):  # LONGLONG, DOUBLE
        return pos + 8
    if field_type in (0x07, 0x0A, 0x0B, 0x0C):  # TIMESTAMP, DATE, TIME, DATETIME
        return pos + 1 + p[pos]
    size, pos = _lenenc(p, pos)  # strings, decimals, blobs, JSON …
    return pos + size
