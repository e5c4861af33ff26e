"""Per-protocol replay: what to send for a recorded exchange, how, and how to compare.

A handler ``plan``s every exchange once, in recorded order, before anything is
sent (deciding what is skipped and parsing the recorded response), then each
worker ``open``s its own connection and ``execute``s plans on it.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs

from deetune.recording.model import RecordedExchange
from deetune.replay import mysql as my
from deetune.replay.compare import Diff, Rules, compare_http, compare_mysql, compare_redis
from deetune.replay.protocols import (
    HttpConnection,
    HttpMessage,
    NeedMore,
    ProtocolError,
    RedisConnection,
    ReplayError,
    Resp,
    encode_command,
    parse_command,
    parse_http_request,
    parse_http_response,
    parse_resp,
    rewrite_http_request,
)  # fmt: skip


@attrs.frozen
class Skip:
    """The exchange is not sent; ``reason`` says why."""

    reason: str


@attrs.frozen
class Plan:
    """What to send for one exchange, and the recorded response to compare with."""

    exchange: RecordedExchange
    #: Protocol-specific: what ``execute`` needs.
    request: Any
    recorded: Any
    #: False when the recorded response bytes end early: only what they hold is compared.
    recorded_complete: bool = True


def _no_response(exchange: RecordedExchange) -> Skip | None:
    if not exchange.response and exchange.status is None:
        return Skip("no response was recorded")
    return None


class Handler:
    protocol = ""

    def plan(self, exchange: RecordedExchange) -> Plan | Skip:
        raise NotImplementedError

    def open(self) -> Any:
        raise NotImplementedError

    def execute(self, connection: Any, plan: Plan) -> tuple[Any, int]:
        """Send the plan's request; (replayed response, latency in ns)."""
        raise NotImplementedError

    def compare(self, plan: Plan, replayed: Any) -> list[Diff]:
        raise NotImplementedError

    def close(self, connection: Any) -> None:
        connection.close()


# -- HTTP -------------------------------------------------------------------------------------


@attrs.frozen
class _HttpRequest:
    data: bytes
    method: str
    close_after: bool


class HttpHandler(Handler):
    protocol = "http"

    def __init__(self, host: str, port: int, rules: Rules, timeout: float, rewrite_host: bool = False,
                 set_headers: list[tuple[str, str]] | None = None) -> None:
        self.host, self.port, self.rules, self.timeout = host, port, rules, timeout
        self.host_header = (f"[{host}]" if ":" in host else host) + f":{port}" if rewrite_host else None
        self.set_headers = set_headers or []

    def plan(self, exchange: RecordedExchange) -> Plan | Skip:
        skip = _no_response(exchange)
        if skip:
            return skip
        request = parse_http_request(exchange.request)
        if not request.complete:
            return Skip("request bytes end before the request does")
        data = rewrite_http_request(exchange.request, self.host_header, self.set_headers)
        connection = (request.header("connection") or "").lower()
        close_after = "close" in connection or (request.version == "1.0" and "keep-alive" not in connection)
        method = request.method
        parsed = parse_http_response(exchange.response, method, at_eof=True)
        assert parsed is not None
        recorded: HttpMessage = parsed[0]
        complete = recorded.complete and not exchange.response_truncated
        recorded.complete = complete
        return Plan(exchange, _HttpRequest(data, method, close_after), recorded, complete)

    def open(self) -> HttpConnection:
        return HttpConnection(self.host, self.port, self.timeout)

    def execute(self, connection: HttpConnection, plan: Plan) -> tuple[HttpMessage, int]:
        request: _HttpRequest = plan.request
        return connection.roundtrip(request.data, request.method, request.close_after)

    def compare(self, plan: Plan, replayed: HttpMessage) -> list[Diff]:
        return compare_http(plan.recorded, replayed, self.rules, plan.request.method)


# -- Redis ------------------------------------------------------------------------------------


@attrs.frozen
class _RedisRequest:
    data: bytes
    command: str
    close_after: bool


class RedisHandler(Handler):
    protocol = "redis"

    def __init__(self, host: str, port: int, rules: Rules, timeout: float, password: str | None = None) -> None:
        self.host, self.port, self.rules, self.timeout = host, port, rules, timeout
        self.password = password

    def plan(self, exchange: RecordedExchange) -> Plan | Skip:
        args = parse_command(exchange.request)
        if not args:
            return Skip("empty command")
        command = args[0].decode("utf-8", "replace").upper()
        data = exchange.request
        if command == "AUTH":
            if self.password is None:
                return Skip("AUTH carries a redacted password: give --redis-password to replay it")
            args = [args[0], *args[1:-1], self.password.encode()]
            data = encode_command(args)
        elif command == "HELLO" and any(a.upper() == b"AUTH" for a in args[1:]):
            data = encode_command(self._hello(args))
        skip = _no_response(exchange)
        if skip:
            return skip
        complete = not exchange.response_truncated
        try:
            recorded, _ = parse_resp(exchange.response)
        except NeedMore:
            if not exchange.response:
                raise ProtocolError("resp: empty recorded reply") from None
            # Only the first bytes were recorded: the reply type is all that can be compared.
            recorded = Resp(_KINDS.get(exchange.response[:1], "unknown"))
            complete = False
        return Plan(exchange, _RedisRequest(data, command, command == "QUIT"), recorded, complete)

    def _hello(self, args: list[bytes]) -> list[bytes]:
        """HELLO with its AUTH clause given --redis-password, or without the clause."""
        out = [args[0]]
        index = 1
        while index < len(args):
            if args[index].upper() == b"AUTH" and index + 2 < len(args):
                if self.password is not None:
                    out += [args[index], args[index + 1], self.password.encode()]
                index += 3
                continue
            out.append(args[index])
            index += 1
        return out

    def open(self) -> RedisConnection:
        return RedisConnection(self.host, self.port, self.timeout)

    def execute(self, connection: RedisConnection, plan: Plan) -> tuple[Resp, int]:
        request: _RedisRequest = plan.request
        return connection.roundtrip(request.data, request.close_after)

    def compare(self, plan: Plan, replayed: Resp) -> list[Diff]:
        if not plan.recorded_complete:
            if plan.recorded.kind != replayed.kind:
                return [Diff("reply type (recorded reply truncated)", plan.recorded.kind, replayed.kind)]
            return []
        return compare_redis(plan.recorded, replayed, self.rules, plan.request.command)


_KINDS = {b"+": "simple", b"-": "error", b":": "integer", b"$": "bulk", b"*": "array", b"_": "null",
          b",": "double", b"#": "boolean", b"!": "error", b"=": "verbatim", b"(": "bignum", b"%": "map",
          b"~": "set", b">": "push"}  # fmt: skip


# -- MySQL ------------------------------------------------------------------------------------

_NOT_REPLAYED = {
    "LOGIN": "login is not replayed: replay logs in itself with --mysql-user",
    "QUIT": "QUIT is not replayed",
    "CHANGE_USER": "CHANGE_USER carries redacted credentials and is not replayed",
    "STMT_CLOSE": "prepared statement: STMT_CLOSE is not replayed (replay manages its statements)",
    "STMT_SEND_LONG_DATA": "prepared statement: STMT_SEND_LONG_DATA is not replayed",
    "STMT_FETCH": "prepared statement: cursor fetches are not replayed",
    "STMT_BULK_EXECUTE": "prepared statement: STMT_BULK_EXECUTE is not replayed",
    "SHUTDOWN": "SHUTDOWN is never replayed",
}


@attrs.frozen
class _MysqlRequest:
    kind: str  # "command", "prepare", "execute", "reset"
    payload: bytes
    text: bytes = b""
    execute: my.ExecuteRequest | None = None


class MysqlHandler(Handler):
    protocol = "mysql"

    def __init__(self, host: str, port: int, rules: Rules, timeout: float, user: str, password: str = "",
                 database: str | None = None) -> None:
        self.host, self.port, self.rules, self.timeout = host, port, rules, timeout
        self.user, self.password, self.database = user, password, database
        self.recorded_login: my.RecordedLogin | None = None
        #: (client, recorded statement id) → statement text, from the recorded STMT_PREPAREs.
        self._recorded_statements: dict[tuple[str, int], bytes] = {}
        self._last_prepared: dict[str, bytes] = {}
        #: Statement text → parameter types last bound by a replayed STMT_EXECUTE.
        self._types: dict[bytes, bytes] = {}
        #: Statement text → whether its executions carry MySQL 8 query attributes.
        self._layouts: dict[bytes, bool] = {}
        self._lock = threading.Lock()

    def plan(self, exchange: RecordedExchange) -> Plan | Skip:
        method = exchange.method.upper()
        if method == "LOGIN":
            login = my.parse_recorded_login(exchange.request)
            if login is not None and self.recorded_login is None:
                self.recorded_login = login
            return Skip(_NOT_REPLAYED[method])
        if method in _NOT_REPLAYED:
            return Skip(_NOT_REPLAYED[method])
        payload = my.command_payload(exchange.request)
        code = payload[0]
        if code == my.COM_STMT_PREPARE:
            text = payload[1:]
            self._remember_prepare(exchange, text)
            request = _MysqlRequest("prepare", payload, text)
        elif code == my.COM_QUERY:
            # Asked for by the client is not granted by the server: only their absence is certain.
            attributes = None
            if self.recorded_login is not None and not self.recorded_login.capabilities & my.CLIENT_QUERY_ATTRIBUTES:
                attributes = False
            request = _MysqlRequest("command", bytes([my.COM_QUERY]) + my.query_text(payload, attributes))
        elif code in (my.COM_STMT_EXECUTE, my.COM_STMT_RESET):
            text = self._statement_text(exchange, payload)
            if text is None:
                return Skip("prepared statement: its STMT_PREPARE was not recorded")
            if code == my.COM_STMT_RESET:
                request = _MysqlRequest("reset", payload, text)
            else:
                if len(payload) > 5 and payload[5] & my.CURSOR_TYPE_MASK:
                    return Skip("prepared statement: executions that open a cursor are not replayed")
                request = _MysqlRequest("execute", payload, text)
        else:
            request = _MysqlRequest("command", payload)
        skip = _no_response(exchange)
        if skip:
            return skip
        recorded = my.parse_recorded_response(exchange.response, my.shape_of(code), code == my.COM_STMT_EXECUTE)
        complete = recorded.complete and not exchange.response_truncated
        recorded.complete = complete
        return Plan(exchange, request, recorded, complete)

    def _remember_prepare(self, exchange: RecordedExchange, text: bytes) -> None:
        self._last_prepared[exchange.client] = text
        try:
            packets = list(my.packets_of(exchange.response))
        except ProtocolError:
            return
        if packets and packets[0][:1] == b"\x00" and len(packets[0]) >= 5:
            statement_id = int.from_bytes(packets[0][1:5], "little")
            self._recorded_statements[(exchange.client, statement_id)] = text

    def _statement_text(self, exchange: RecordedExchange, payload: bytes) -> bytes | None:
        if len(payload) < 5:
            raise ProtocolError("mysql: statement command cut short")
        statement_id = int.from_bytes(payload[1:5], "little")
        if statement_id == 0xFFFFFFFF and exchange.client in self._last_prepared:  # MariaDB: the last prepared
            return self._last_prepared[exchange.client]
        text = self._recorded_statements.get((exchange.client, statement_id))
        if text is None and exchange.target and not exchange.attributes.get("target_truncated"):
            text = exchange.target.encode()  # the statement as the recording decoded it
        return text

    def open(self) -> my.MysqlConnection:
        login = my.LoginOptions(self.user, self.password, self.database, self.recorded_login)
        return my.MysqlConnection(self.host, self.port, login, self.timeout)

    def execute(self, connection: my.MysqlConnection, plan: Plan) -> tuple[my.MysqlResponse, int]:
        request: _MysqlRequest = plan.request
        if request.kind == "command":
            return connection.command(request.payload)
        if request.kind == "prepare":
            return connection.prepare(request.text)
        statement_id, params = connection.statement(request.text)
        if request.kind == "reset":
            return connection.command(bytes([my.COM_STMT_RESET]) + statement_id.to_bytes(4, "little"))
        if self.recorded_login is not None and not self.recorded_login.capabilities & my.CLIENT_QUERY_ATTRIBUTES:
            attributes: bool | None = False
        else:
            attributes = self._layouts.get(request.text)  # as an earlier, checkable execution showed
        try:
            parsed = my.parse_execute(request.payload, params, attributes)
        except ProtocolError as exc:
            raise ReplayError(f"prepared statement: recorded STMT_EXECUTE not understood ({exc})") from None
        types = parsed.types
        with self._lock:
            if types:
                self._types[request.text] = types
                self._layouts[request.text] = parsed.attributes
            elif params:
                types = self._types.get(request.text)
        if params and not types:
            raise ReplayError("prepared statement: the parameter types were bound by an execution not replayed "
                              "before this one")
        return connection.command(parsed.payload(statement_id, types), binary=True)

    def compare(self, plan: Plan, replayed: my.MysqlResponse) -> list[Diff]:
        return compare_mysql(plan.recorded, replayed, self.rules)

    def close(self, connection: my.MysqlConnection) -> None:
        connection.close()
