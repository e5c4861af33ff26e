"""MySQL decoder: exact results on constructed byte streams, properties, third-party vectors."""

from __future__ import annotations

import importlib.util
import json
import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deetune.decoders.base import Chunk, Direction, Exchange, Undecodable
from deetune.decoders.mysql import MAX_STATEMENT_BYTES, MysqlDecoder

REQ, RESP = Direction.REQUEST, Direction.RESPONSE

# ---------------------------------------------------------------- packet builders

PROTOCOL_41 = 0x200
CONNECT_WITH_DB = 0x8
COMPRESS = 0x20
SSL = 0x800
TRANSACTIONS = 0x2000
SECURE_CONNECTION = 0x8000
MULTI_STATEMENTS = 0x10000
MULTI_RESULTS = 0x20000
PLUGIN_AUTH = 0x80000
PLUGIN_AUTH_LENENC = 0x200000
DEPRECATE_EOF = 0x1000000
QUERY_ATTRIBUTES = 0x8000000

SERVER_CAPS = (
    PROTOCOL_41 | CONNECT_WITH_DB | COMPRESS | SSL | TRANSACTIONS | SECURE_CONNECTION | MULTI_STATEMENTS
    | MULTI_RESULTS | PLUGIN_AUTH | PLUGIN_AUTH_LENENC | DEPRECATE_EOF | QUERY_ATTRIBUTES
)
CLIENT_CAPS = PROTOCOL_41 | TRANSACTIONS | SECURE_CONNECTION | MULTI_STATEMENTS | MULTI_RESULTS | PLUGIN_AUTH
MORE_RESULTS = 0x0008
AUTOCOMMIT = 0x0002

#: What a client sends as auth response; it must never surface in an exchange.
PASSWORD_PROOF = b"TOPSECRET-scramble-1"
SECOND_PROOF = b"SECONDSECRET-cleartext-password"


def pkt(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload) | (seq & 0xFF) << 24) + payload


def lenenc(n: int) -> bytes:
    if n < 0xFB:
        return bytes([n])
    if n < 1 << 16:
        return b"\xfc" + struct.pack("<H", n)
    if n < 1 << 24:
        return b"\xfd" + struct.pack("<I", n)[:3]
    return b"\xfe" + struct.pack("<Q", n)


def lstr(value: bytes) -> bytes:
    return lenenc(len(value)) + value


def greeting(version: bytes = b"8.0.36", caps: int = SERVER_CAPS) -> bytes:
    return (
        b"\x0a" + version + b"\x00" + struct.pack("<I", 42) + b"abcdefgh" + b"\x00"
        + struct.pack("<H", caps & 0xFFFF) + b"\xff" + struct.pack("<H", AUTOCOMMIT)
        + struct.pack("<H", caps >> 16) + bytes([21]) + b"\x00" * 10 + b"ijklmnopqrst\x00"
        + b"mysql_native_password\x00"
    )


def handshake_response(user: bytes, database: bytes | None = None, caps: int = CLIENT_CAPS,
                       proof: bytes = PASSWORD_PROOF) -> bytes:
    flags = caps | (CONNECT_WITH_DB if database is not None else 0)
    body = struct.pack("<IIB", flags, 16 << 20, 45) + b"\x00" * 23 + user + b"\x00"
    body += lstr(proof) if flags & PLUGIN_AUTH_LENENC else bytes([len(proof)]) + proof
    if database is not None:
        body += database + b"\x00"
    return body + b"mysql_native_password\x00"


def ssl_request(caps: int = CLIENT_CAPS) -> bytes:
    return struct.pack("<IIB", caps | SSL, 16 << 20, 45) + b"\x00" * 23


def ok(affected: int = 0, last_id: int = 0, status: int = AUTOCOMMIT, header: int = 0x00) -> bytes:
    return bytes([header]) + lenenc(affected) + lenenc(last_id) + struct.pack("<HH", status, 0)


def err(code: int, state: bytes, message: bytes) -> bytes:
    return b"\xff" + struct.pack("<H", code) + b"#" + state + message


def eof(status: int = AUTOCOMMIT) -> bytes:
    return b"\xfe\x00\x00" + struct.pack("<H", status)


def coldef(name: bytes) -> bytes:
    return (
        lstr(b"def") + lstr(b"shop") + lstr(b"users") + lstr(b"users") + lstr(name) + lstr(name)
        + b"\x0c\x21\x00\x00\x01\x00\x00\xfd\x00\x00\x00\x00\x00"
    )


def text_row(*values: bytes | None) -> bytes:
    return b"".join(b"\xfb" if v is None else lstr(v) for v in values)


def result_set(names: list[bytes], rows: list[tuple], first_seq: int = 1, deprecate_eof: bool = False,
               status: int = AUTOCOMMIT, binary: bool = False) -> tuple[list[bytes], int]:
    """Packets of one result set, and the sequence id that follows it."""
    seq = first_seq
    out = [pkt(seq, lenenc(len(names)))]
    for name in names:
        seq += 1
        out.append(pkt(seq, coldef(name)))
    if not deprecate_eof:
        seq += 1
        out.append(pkt(seq, eof()))
    for row in rows:
        seq += 1
        if binary:  # header, NULL bitmap (2 reserved bits), then length-encoded strings
            out.append(pkt(seq, b"\x00" + b"\x00" * ((len(row) + 9) // 8) + b"".join(lstr(v) for v in row)))
        else:
            out.append(pkt(seq, text_row(*row)))
    seq += 1
    out.append(pkt(seq, ok(status=status, header=0xFE) if deprecate_eof else eof(status)))
    return out, seq + 1


def query(text: bytes) -> bytes:
    return pkt(0, b"\x03" + text)


def prepare_ok(statement_id: int, columns: int, params: int) -> bytes:
    return b"\x00" + struct.pack("<IHHBH", statement_id, columns, params, 0, 0)


def execute(statement_id: int, *params: bytes) -> bytes:
    body = b"\x17" + struct.pack("<IBI", statement_id, 0, 1)
    if params:
        body += b"\x00" * ((len(params) + 7) // 8) + b"\x01" + b"\xfe\x00" * len(params)
        body += b"".join(lstr(p) for p in params)
    return pkt(0, body)


def login(user: bytes = b"alice", database: bytes | None = b"shop", caps: int = CLIENT_CAPS) -> list:
    return [
        (RESP, pkt(0, greeting())),
        (REQ, pkt(1, handshake_response(user, database, caps))),
        (RESP, pkt(2, ok())),
    ]


# ---------------------------------------------------------------- feeding helpers

def chunks_of(messages: list, step: int = 1000) -> list[Chunk]:
    """One chunk per message, timestamps 1000, 2000, … unless a message gives its own."""
    out = []
    for i, message in enumerate(messages):
        direction, data = message[0], message[1]
        ts = message[2] if len(message) > 2 else (i + 1) * step
        out.append(Chunk(direction, data, len(data), ts))
    return out


def run(chunks: list[Chunk], decoder: MysqlDecoder | None = None) -> list[Exchange]:
    decoder = decoder or MysqlDecoder()
    exchanges = []
    for chunk in chunks:
        exchanges.extend(decoder.feed(chunk))
    exchanges.extend(decoder.close(10**12))
    return exchanges


def decode(messages: list, step: int = 1000) -> list[Exchange]:
    return run(chunks_of(messages, step))


def mysql_exchange(method: str, target: str, status, req: tuple[int, int], resp: tuple | None,
                   request_bytes: int, response_bytes: int, error_message: str | None = None,
                   **attributes) -> Exchange:
    return Exchange(
        protocol="mysql", method=method, target=target, status=status, error=status == "ERR",
        request_start_ns=req[0], request_end_ns=req[1],
        response_start_ns=resp[0] if resp else None, response_end_ns=resp[1] if resp else None,
        request_bytes=request_bytes, response_bytes=response_bytes, error_message=error_message,
        attributes=attributes,
    )


def login_exchange(user="alice", database="shop", caps: int = CLIENT_CAPS) -> Exchange:
    hs = len(pkt(1, handshake_response(user.encode(), database and database.encode(), caps)))
    attrs = {"user": user, **({"database": database} if database else {}), "server_version": "8.0.36"}
    return mysql_exchange("LOGIN", "", "OK", (2000, 2000), (3000, 3000), hs, 11, **attrs)


def assert_no_secret(exchanges: list[Exchange]) -> None:
    text = repr(exchanges)
    for secret in (PASSWORD_PROOF, SECOND_PROOF):
        assert secret.decode() not in text
        assert secret[:8].decode() not in text


# ---------------------------------------------------------------- login

def test_login_reports_user_database_and_server_version_never_the_password():
    exchanges = decode(login())
    assert exchanges == [login_exchange()]
    assert_no_secret(exchanges)


def test_login_without_database():
    assert decode(login(database=None)) == [login_exchange(database=None)]


def test_login_with_auth_switch_and_more_data_is_one_exchange():
    hs = pkt(1, handshake_response(b"bob", b"shop", CLIENT_CAPS | PLUGIN_AUTH_LENENC))
    switch = pkt(2, b"\xfecaching_sha2_password\x00" + b"0123456789abcdefghij\x00")
    proof = pkt(3, SECOND_PROOF)
    more = pkt(4, b"\x01\x04")  # full authentication required
    cleartext = pkt(5, SECOND_PROOF + b"\x00")
    final = pkt(6, ok())
    exchanges = decode([
        (RESP, pkt(0, greeting()), 1000), (REQ, hs, 2000), (RESP, switch, 3000), (REQ, proof, 4000),
        (RESP, more, 5000), (REQ, cleartext, 6000), (RESP, final, 7000),
        (REQ, query(b"SELECT 1"), 8000), (RESP, pkt(1, ok()), 9000),
    ])
    assert exchanges == [
        # latency: handshake response → the server's first answer; the login ends at the final OK.
        mysql_exchange("LOGIN", "", "OK", (2000, 2000), (3000, 7000),
                       len(hs) + len(proof) + len(cleartext), len(switch) + len(more) + len(final),
                       user="bob", database="shop", server_version="8.0.36"),
        mysql_exchange("QUERY", "SELECT 1", "OK", (8000, 8000), (9000, 9000), 13, 11,
                       affected_rows=0, last_insert_id=0),
    ]
    assert_no_secret(exchanges)


def test_failed_login_reports_the_error_and_ignores_the_rest():
    message = b"Access denied for user 'x'@'localhost' (using password: YES)"
    hs = pkt(1, handshake_response(b"x"))
    decoder = MysqlDecoder()
    exchanges = run(chunks_of([
        (RESP, pkt(0, greeting())), (REQ, hs), (RESP, pkt(2, err(1045, b"28000", message))),
        (REQ, b"\x00\x01garbage after the server hung up"),
    ]), decoder)
    assert exchanges == [
        mysql_exchange("LOGIN", "", "ERR", (2000, 2000), (3000, 3000), len(hs), 4 + 9 + len(message),
                       message.decode(), user="x", server_version="8.0.36", error_code=1045, sql_state="28000"),
    ]
    assert_no_secret(exchanges)


def test_connection_refused_before_the_greeting():
    refusal = pkt(0, err(1040, b"08004", b"Too many connections"))
    assert MysqlDecoder.detect(RESP, refusal)
    assert decode([(RESP, refusal)]) == [
        mysql_exchange("LOGIN", "", "ERR", (1000, 1000), (1000, 1000), 0, len(refusal),
                       "Too many connections", error_code=1040, sql_state="08004"),
    ]


def test_ssl_request_stops_decoding():
    decoder = MysqlDecoder()
    assert list(decoder.feed(Chunk(RESP, pkt(0, greeting()), 78, 1000))) == []
    request = pkt(1, ssl_request())
    with pytest.raises(Undecodable, match="TLS"):
        decoder.feed(Chunk(REQ, request, len(request), 2000))
    with pytest.raises(Undecodable):
        decoder.feed(Chunk(REQ, b"\x16\x03\x01\x02\x00", 5, 3000))
    assert list(decoder.close(4000)) == []


def test_compressed_protocol_reports_the_login_then_stops():
    decoder = MysqlDecoder()
    chunks = chunks_of(login(caps=CLIENT_CAPS | COMPRESS))
    exchanges = [e for c in chunks for e in decoder.feed(c)]
    assert exchanges == [login_exchange(caps=CLIENT_CAPS | COMPRESS)]
    compressed_query = b"\x0d\x00\x00\x00\x00\x00\x00" + query(b"SELECT 1")
    with pytest.raises(Undecodable, match="compressed protocol"):
        decoder.feed(Chunk(REQ, compressed_query, len(compressed_query), 4000))


def test_compressed_protocol_mid_connection():
    compressed_query = b"\x0d\x00\x00\x00\x00\x00\x00" + query(b"SELECT 1")
    assert MysqlDecoder.detect(REQ, compressed_query)
    with pytest.raises(Undecodable, match="compressed protocol"):
        decode([(REQ, compressed_query)])


# ---------------------------------------------------------------- commands

def test_sql_error():
    message = b"You have an error in your SQL syntax; check the manual near 'SELEC 1' at line 1"
    exchanges = decode(login() + [(REQ, query(b"SELEC 1")), (RESP, pkt(1, err(1064, b"42000", message)))])
    assert exchanges[1:] == [
        mysql_exchange("QUERY", "SELEC 1", "ERR", (4000, 4000), (5000, 5000), 12, 4 + 9 + len(message),
                       message.decode(), error_code=1064, sql_state="42000"),
    ]


@pytest.mark.parametrize("deprecate_eof", [False, True])
@pytest.mark.parametrize("with_handshake", [True, False])
def test_query_with_result_set(deprecate_eof, with_handshake):
    rows = [(b"1", b"ann"), (b"2", None), (b"3", b"cy")]
    packets, _ = result_set([b"id", b"name"], rows, deprecate_eof=deprecate_eof)
    caps = CLIENT_CAPS | (DEPRECATE_EOF if deprecate_eof else 0)
    prefix = login(caps=caps) if with_handshake else []
    exchanges = decode(prefix + [(REQ, query(b"SELECT id, name FROM users")), (RESP, b"".join(packets))])
    ts = len(prefix) * 1000
    assert exchanges[-1] == mysql_exchange(
        "QUERY", "SELECT id, name FROM users", "OK", (ts + 1000, ts + 1000), (ts + 2000, ts + 2000),
        31, sum(map(len, packets)), columns=2, rows=3,
    )
    assert len(exchanges) == (2 if with_handshake else 1)


@pytest.mark.parametrize("with_handshake", [True, False])
def test_empty_result_set_with_deprecate_eof(with_handshake):
    packets, _ = result_set([b"id"], [], deprecate_eof=True)
    prefix = login(caps=CLIENT_CAPS | DEPRECATE_EOF) if with_handshake else []
    exchanges = decode(prefix + [(REQ, query(b"SELECT id FROM users WHERE 0")), (RESP, b"".join(packets))])
    assert exchanges[-1].status == "OK"
    assert exchanges[-1].attributes == {"columns": 1, "rows": 0}
    assert exchanges[-1].response_bytes == sum(map(len, packets))


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_multiple_result_sets_are_one_exchange(deprecate_eof):
    first, seq = result_set([b"a"], [(b"1",), (b"2",)], deprecate_eof=deprecate_eof, status=MORE_RESULTS)
    second, seq = result_set([b"b", b"c"], [(b"3", b"4")], first_seq=seq, deprecate_eof=deprecate_eof,
                             status=MORE_RESULTS)
    final = pkt(seq, ok())
    response = b"".join(first + second) + final
    caps = CLIENT_CAPS | (DEPRECATE_EOF if deprecate_eof else 0)
    exchanges = decode(login(caps=caps) + [(REQ, query(b"CALL report()")), (RESP, response)])
    assert exchanges[1] == mysql_exchange(
        "QUERY", "CALL report()", "OK", (4000, 4000), (5000, 5000), 18, len(response),
        columns=1, rows=3, result_sets=3,
    )


def test_multi_statement_ok_then_result_set():
    packets, _ = result_set([b"n"], [(b"7",)], first_seq=2)
    response = pkt(1, ok(affected=2, status=MORE_RESULTS)) + b"".join(packets)
    exchanges = decode(login() + [(REQ, query(b"UPDATE t SET x=1; SELECT 7 AS n")), (RESP, response)])
    assert exchanges[1].status == "OK"
    assert exchanges[1].attributes == {"columns": 1, "rows": 1, "result_sets": 2}


def test_ok_packet_attributes():
    exchanges = decode(login() + [(REQ, query(b"INSERT INTO t VALUES (NULL)")),
                                  (RESP, pkt(1, ok(affected=1, last_id=70000)))])
    assert exchanges[1].attributes == {"affected_rows": 1, "last_insert_id": 70000}


def test_init_db_ping_and_quit():
    exchanges = decode(login() + [
        (REQ, pkt(0, b"\x02inventory")), (RESP, pkt(1, ok())),
        (REQ, pkt(0, b"\x0e")), (RESP, pkt(1, ok())),
        (REQ, pkt(0, b"\x01")),
    ])
    assert exchanges[1:] == [
        mysql_exchange("INIT_DB", "inventory", "OK", (4000, 4000), (5000, 5000), 14, 11,
                       affected_rows=0, last_insert_id=0),
        mysql_exchange("PING", "", "OK", (6000, 6000), (7000, 7000), 5, 11, affected_rows=0, last_insert_id=0),
        mysql_exchange("QUIT", "", None, (8000, 8000), None, 5, 0),
    ]


def test_quit_is_reported_when_sent():
    decoder = MysqlDecoder()
    for chunk in chunks_of(login()):
        decoder.feed(chunk)
    assert [e.method for e in decoder.feed(Chunk(REQ, pkt(0, b"\x01"), 5, 9000))] == ["QUIT"]


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_prepared_statement_lifecycle(deprecate_eof):
    text = b"SELECT name FROM users WHERE id = ?"
    metadata = [pkt(1, prepare_ok(7, columns=1, params=1)), pkt(2, coldef(b"?"))]
    if not deprecate_eof:
        metadata.append(pkt(3, eof()))
    metadata += [pkt(len(metadata) + 1, coldef(b"name"))]
    if not deprecate_eof:
        metadata.append(pkt(len(metadata) + 1, eof()))
    rows, _ = result_set([b"name"], [(b"ann",)], deprecate_eof=deprecate_eof, binary=True)
    unknown = err(1243, b"HY000", b"Unknown prepared statement handler (7) given to mysqld_stmt_execute")
    caps = CLIENT_CAPS | (DEPRECATE_EOF if deprecate_eof else 0)
    exchanges = decode(login(caps=caps) + [
        (REQ, pkt(0, b"\x16" + text)), (RESP, b"".join(metadata)),
        (REQ, execute(7, b"1")), (RESP, b"".join(rows)),
        (REQ, pkt(0, b"\x19" + struct.pack("<I", 7))),
        (REQ, execute(7, b"2")), (RESP, pkt(1, unknown)),
    ])
    assert exchanges[1:] == [
        mysql_exchange("STMT_PREPARE", text.decode(), "OK", (4000, 4000), (5000, 5000), 40,
                       sum(map(len, metadata)), statement_id=7, params=1, columns=1),
        mysql_exchange("STMT_EXECUTE", text.decode(), "OK", (6000, 6000), (7000, 7000), len(execute(7, b"1")),
                       sum(map(len, rows)), statement_id=7, columns=1, rows=1),
        mysql_exchange("STMT_CLOSE", text.decode(), None, (8000, 8000), None, 9, 0, statement_id=7),
        # Closed: the statement id no longer names anything.
        mysql_exchange("STMT_EXECUTE", "", "ERR", (9000, 9000), (10000, 10000), len(execute(7, b"2")),
                       len(unknown) + 4, unknown[9:].decode(), statement_id=7, error_code=1243,
                       sql_state="HY000"),
    ]


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_prepare_mid_connection_without_knowing_deprecate_eof(deprecate_eof):
    """No parameters: only the response's shape can tell whether an EOF closes it."""
    metadata = [pkt(1, prepare_ok(3, columns=1, params=0)), pkt(2, coldef(b"n"))]
    if not deprecate_eof:
        metadata.append(pkt(3, eof()))
    exchanges = decode([
        (REQ, pkt(0, b"\x16SELECT 1 AS n")), (RESP, b"".join(metadata)),
        (REQ, query(b"SELECT 2")), (RESP, pkt(1, ok())),
        (REQ, execute(3)), (RESP, pkt(1, ok())),
    ])
    assert [(e.method, e.target, e.status, e.response_bytes) for e in exchanges] == [
        ("STMT_PREPARE", "SELECT 1 AS n", "OK", sum(map(len, metadata))),
        ("QUERY", "SELECT 2", "OK", 11),
        ("STMT_EXECUTE", "SELECT 1 AS n", "OK", 11),
    ]


def test_prepare_error():
    exchanges = decode(login() + [(REQ, pkt(0, b"\x16SELEC ?")),
                                  (RESP, pkt(1, err(1064, b"42000", b"syntax error")))])
    assert (exchanges[1].method, exchanges[1].status, exchanges[1].error_message) == ("STMT_PREPARE", "ERR",
                                                                                       "syntax error")


def test_cursor_execute_and_fetch():
    text = b"SELECT id FROM big"
    metadata = [pkt(1, prepare_ok(9, columns=1, params=0)), pkt(2, coldef(b"id")), pkt(3, eof())]
    cursor_open = [pkt(1, b"\x01"), pkt(2, coldef(b"id")), pkt(3, eof(AUTOCOMMIT | 0x0040))]
    fetched = [pkt(1, b"\x00\x00" + lstr(b"1")), pkt(2, b"\x00\x00" + lstr(b"2")), pkt(3, eof(AUTOCOMMIT | 0x80))]
    exchanges = decode(login() + [
        (REQ, pkt(0, b"\x16" + text)), (RESP, b"".join(metadata)),
        (REQ, pkt(0, b"\x17" + struct.pack("<IBI", 9, 1, 1))), (RESP, b"".join(cursor_open)),
        (REQ, pkt(0, b"\x1c" + struct.pack("<II", 9, 100))), (RESP, b"".join(fetched)),
    ])
    assert [(e.method, e.target, e.status, e.attributes) for e in exchanges[2:]] == [
        ("STMT_EXECUTE", text.decode(), "OK", {"statement_id": 9, "cursor": True, "columns": 1, "rows": 0}),
        ("STMT_FETCH", text.decode(), "OK", {"statement_id": 9, "rows": 2}),
    ]


def test_other_commands():
    fields = [pkt(1, coldef(b"id")), pkt(2, coldef(b"name")), pkt(3, eof())]
    change_user = pkt(0, b"\x11carol\x00" + bytes([len(PASSWORD_PROOF)]) + PASSWORD_PROOF + b"archive\x00")
    exchanges = decode(login() + [
        (REQ, pkt(0, b"\x09")), (RESP, pkt(1, b"Uptime: 5  Threads: 1  Questions: 9")),
        (REQ, pkt(0, b"\x04users\x00")), (RESP, b"".join(fields)),
        (REQ, pkt(0, b"\x1b\x01\x00")), (RESP, pkt(1, eof())),
        (REQ, change_user), (RESP, pkt(1, b"\xfemysql_native_password\x00" + b"x" * 20 + b"\x00")),
        (REQ, pkt(2, SECOND_PROOF)), (RESP, pkt(3, ok())),
        (REQ, pkt(0, b"\x1f")), (RESP, pkt(1, ok())),
        (REQ, pkt(0, b"\x1a" + struct.pack("<I", 1))), (RESP, pkt(1, ok())),
    ])
    assert [(e.method, e.target, e.status, e.attributes) for e in exchanges[1:]] == [
        ("STATISTICS", "", "OK", {}),
        ("FIELD_LIST", "users", "OK", {"columns": 2, "rows": 0}),
        ("SET_OPTION", "", "OK", {}),
        ("CHANGE_USER", "", "OK", {"user": "carol", "database": "archive"}),
        ("RESET_CONNECTION", "", "OK", {"affected_rows": 0, "last_insert_id": 0}),
        ("STMT_RESET", "", "OK", {"statement_id": 1, "affected_rows": 0, "last_insert_id": 0}),
    ]
    assert exchanges[4].request_bytes == len(change_user) + 4 + len(SECOND_PROOF)
    assert_no_secret(exchanges)


def test_local_infile():
    response = pkt(1, b"\xfb/tmp/users.csv")
    data = [pkt(2, b"1,ann\n2,bob\n"), pkt(3, b"")]
    exchanges = decode(login() + [
        (REQ, query(b"LOAD DATA LOCAL INFILE '/tmp/users.csv' INTO TABLE users")), (RESP, response),
        (REQ, b"".join(data)), (RESP, pkt(4, ok(affected=2))),
    ])
    request = query(b"LOAD DATA LOCAL INFILE '/tmp/users.csv' INTO TABLE users")
    assert exchanges[1] == mysql_exchange(
        "QUERY", "LOAD DATA LOCAL INFILE '/tmp/users.csv' INTO TABLE users", "OK", (4000, 4000), (5000, 7000),
        len(request) + sum(map(len, data)), len(response) + 11,
        local_infile="/tmp/users.csv", affected_rows=2, last_insert_id=0,
    )


def test_query_attributes():
    caps = CLIENT_CAPS | QUERY_ATTRIBUTES
    with_attribute = (
        b"\x03" + b"\x01\x01" + b"\x00" + b"\x01" + b"\xfe\x00" + lstr(b"traceparent")
        + lstr(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01") + b"SELECT 2"
    )
    exchanges = decode(login(caps=caps) + [
        (REQ, pkt(0, b"\x03\x00\x01SELECT 1")), (RESP, pkt(1, ok())),
        (REQ, pkt(0, with_attribute)), (RESP, pkt(1, ok())),
    ])
    assert [e.target for e in exchanges[1:]] == ["SELECT 1", "SELECT 2"]


def test_query_attributes_guessed_mid_connection():
    assert [e.target for e in decode([(REQ, pkt(0, b"\x03\x00\x01SELECT 1")), (RESP, pkt(1, ok()))])] == [
        "SELECT 1"
    ]


def test_statement_longer_than_the_kept_text_spans_max_size_packets():
    statement = b"INSERT INTO blobs VALUES ('" + b"x" * (0xFFFFFF + 100) + b"')"
    payload = b"\x03" + statement
    wire = pkt(0, payload[:0xFFFFFF]) + pkt(1, payload[0xFFFFFF:])
    chunks = [Chunk(REQ, wire[i:i + 65536], len(wire[i:i + 65536]), 1000) for i in range(0, len(wire), 65536)]
    exchanges = run(chunks + [Chunk(RESP, pkt(2, ok(affected=1)), 11, 2000)])
    assert len(exchanges) == 1
    assert exchanges[0].target == statement[:MAX_STATEMENT_BYTES].decode()
    assert exchanges[0].attributes == {"target_truncated": True, "affected_rows": 1, "last_insert_id": 0}
    assert exchanges[0].request_bytes == len(wire)


def test_close_reports_a_request_without_response():
    exchanges = decode(login() + [(REQ, query(b"SELECT SLEEP(100)"))])
    assert exchanges[1] == mysql_exchange("QUERY", "SELECT SLEEP(100)", None, (4000, 4000), None, 22, 0)


def test_server_farewell_error_is_not_an_exchange():
    farewell = pkt(0, err(4031, b"HY000", b"The client was disconnected by the server because of inactivity."))
    assert decode(login() + [(RESP, farewell)]) == [login_exchange()]


def test_mid_connection_start_skips_a_partial_response():
    tail, _ = result_set([b"id"], [(b"9",)] * 3)
    exchanges = decode([(RESP, b"".join(tail[2:])), (REQ, query(b"SELECT 1")), (RESP, pkt(1, ok()))])
    assert [(e.method, e.target, e.status) for e in exchanges] == [("QUERY", "SELECT 1", "OK")]


def test_pipelined_commands_in_one_chunk():
    exchanges = decode([(REQ, pkt(0, b"\x0e") + pkt(0, b"\x0e")), (RESP, pkt(1, ok()) + pkt(1, ok()))])
    assert [(e.method, e.status, e.request_bytes, e.response_bytes) for e in exchanges] == [
        ("PING", "OK", 5, 11), ("PING", "OK", 5, 11),
    ]


# ---------------------------------------------------------------- truncated captures

def test_gap_inside_a_row_keeps_packet_sync():
    big = b"z" * 10_000
    packets, _ = result_set([b"id", b"doc"], [(b"1", b"small"), (b"2", big), (b"3", b"tail")])
    response = b"".join(packets)
    cut = response.index(big) + 100  # the capture kept 100 bytes of the big value
    second_part = b"".join(packets[-2:])  # third row + EOF, captured whole
    first_size = len(response) - len(second_part)
    chunks = chunks_of(login() + [(REQ, query(b"SELECT id, doc FROM docs"))]) + [
        Chunk(RESP, response[:cut], first_size, 5000),
        Chunk(RESP, second_part, len(second_part), 6000),
        Chunk(REQ, query(b"SELECT 1"), 13, 7000),
        Chunk(RESP, pkt(1, ok()), 11, 8000),
    ]
    exchanges = run(chunks)
    assert exchanges[1:] == [
        mysql_exchange("QUERY", "SELECT id, doc FROM docs", "OK", (4000, 4000), (5000, 6000), 29,
                       len(response), columns=2, rows=3),
        mysql_exchange("QUERY", "SELECT 1", "OK", (7000, 7000), (8000, 8000), 13, 11,
                       affected_rows=0, last_insert_id=0),
    ]


def test_gap_ending_exactly_at_a_packet_end():
    packets, _ = result_set([b"v"], [(b"a" * 300,), (b"b",)])
    response = b"".join(packets)
    row_end = response.index(b"a" * 300) + 300
    chunks = chunks_of(login() + [(REQ, query(b"SELECT v FROM t"))]) + [
        Chunk(RESP, response[:row_end - 250], row_end, 5000),
        Chunk(RESP, response[row_end:], len(response) - row_end, 6000),
    ]
    assert run(chunks)[1].attributes == {"columns": 1, "rows": 2}


def test_gap_over_packet_headers_resyncs_at_the_next_command():
    packets, _ = result_set([b"id"], [(str(i).encode(),) for i in range(100)])
    response = b"".join(packets)
    chunks = chunks_of(login() + [(REQ, query(b"SELECT id FROM t"))]) + [
        Chunk(RESP, response[:40], 300, 5000),  # headers beyond byte 40 were not captured
        Chunk(RESP, response[300:400], len(response) - 300, 6000),
        Chunk(REQ, query(b"SELECT 2"), 13, 7000),
        Chunk(RESP, pkt(1, ok()), 11, 8000),
    ]
    exchanges = run(chunks)
    seen_rows = sum(1 for p in packets[3:] if response.index(p) + len(p) <= 40)
    assert exchanges[1] == mysql_exchange(
        "QUERY", "SELECT id FROM t", "OK", (4000, 4000), (5000, 6000), 21, len(response),
        response_truncated=True, rows_truncated=True, columns=1, rows=seen_rows,
    )
    assert exchanges[2] == mysql_exchange("QUERY", "SELECT 2", "OK", (7000, 7000), (8000, 8000), 13, 11,
                                          affected_rows=0, last_insert_id=0)


def test_truncated_statement_text_keeps_sync():
    statement = b"SELECT '" + b"q" * 5000 + b"'"
    request = query(statement)
    chunks = chunks_of(login()) + [Chunk(REQ, request[:200], len(request), 4000),
                                   Chunk(RESP, pkt(1, ok()), 11, 5000)]
    exchanges = run(chunks)
    assert exchanges[1].target == statement[:195].decode()
    assert exchanges[1].attributes["target_truncated"] is True
    assert exchanges[1].request_bytes == len(request)


def test_gap_over_a_request_header_is_undecodable():
    two = query(b"SELECT 1") + query(b"SELECT 2")
    decoder = MysqlDecoder()
    for chunk in chunks_of(login()):
        decoder.feed(chunk)
    with pytest.raises(Undecodable, match="request framing"):
        decoder.feed(Chunk(REQ, two[:15], len(two), 4000))


# ---------------------------------------------------------------- chunking

def conversation(deprecate_eof: bool = False) -> list:
    caps = CLIENT_CAPS | (DEPRECATE_EOF if deprecate_eof else 0)
    rows, _ = result_set([b"id", b"name"], [(b"1", b"ann"), (b"2", None)], deprecate_eof=deprecate_eof)
    meta = [pkt(1, prepare_ok(5, columns=0, params=1)), pkt(2, coldef(b"?"))]
    if not deprecate_eof:
        meta.append(pkt(3, eof()))
    return login(caps=caps) + [
        (REQ, query(b"SELECT id, name FROM users")), (RESP, b"".join(rows)),
        (REQ, query(b"SELEC")), (RESP, pkt(1, err(1064, b"42000", b"syntax"))),
        (REQ, pkt(0, b"\x16DELETE FROM users WHERE id = ?")), (RESP, b"".join(meta)),
        (REQ, execute(5, b"1")), (RESP, pkt(1, ok(affected=1))),
        (REQ, pkt(0, b"\x01")),
    ]


EXPECTED_METHODS = ["LOGIN", "QUERY", "QUERY", "STMT_PREPARE", "STMT_EXECUTE", "QUIT"]


@pytest.mark.parametrize("deprecate_eof", [False, True])
def test_splitting_at_every_byte_boundary_gives_identical_exchanges(deprecate_eof):
    messages = conversation(deprecate_eof)
    whole = decode(messages)
    assert [e.method for e in whole] == EXPECTED_METHODS
    base = chunks_of(messages)
    for index, chunk in enumerate(base):
        for cut in range(1, len(chunk.data)):
            pieces = [Chunk(chunk.direction, chunk.data[:cut], cut, chunk.ts_ns),
                      Chunk(chunk.direction, chunk.data[cut:], len(chunk.data) - cut, chunk.ts_ns)]
            assert run(base[:index] + pieces + base[index + 1:]) == whole, (index, cut)


def test_one_byte_chunks_give_identical_exchanges():
    base = chunks_of(conversation())
    bytewise = [Chunk(c.direction, c.data[i:i + 1], 1, c.ts_ns) for c in base for i in range(len(c.data))]
    assert run(bytewise) == run(base)


# ---------------------------------------------------------------- malformed input

def after_login(*messages) -> None:
    decode(login() + list(messages))


@pytest.mark.parametrize("messages, reason", [
    ([(REQ, pkt(3, b"\x03SELECT 1"))], "garbage"),  # not a command boundary
    ([(REQ, pkt(0, b"\x42whatever"))], "garbage"),  # unknown command
    ([(REQ, pkt(0, b""))], "garbage"),  # empty command
    ([(REQ, pkt(0, b"\x12" + b"\x00" * 10))], "unsupported"),  # binlog dump: a stream, not request/response
])
def test_requests_that_cannot_be_followed_are_undecodable(messages, reason):
    """The session starts a fresh decoder at the next command (or, unsupported, gives the connection up)."""
    with pytest.raises(Undecodable) as raised:
        after_login(*messages)
    assert raised.value.reason == reason


@pytest.mark.parametrize("messages, first", [
    ([(RESP, pkt(1, ok()))], None),  # response without request
    ([(REQ, query(b"SELECT 1")), (RESP, pkt(1, b"\xfc\x00\x20"))], ("QUERY", "SELECT 1")),  # 8192 columns
    ([(REQ, pkt(0, b"\x16SELECT ?")), (RESP, pkt(1, b"\x00\x01\x00"))], ("STMT_PREPARE", "SELECT ?")),  # short OK
])
def test_responses_that_cannot_be_read_are_skipped_to_the_next_command(messages, first):
    decoder = MysqlDecoder()
    chunks = chunks_of(login() + messages + [(REQ, query(b"SELECT 2")), (RESP, pkt(1, ok(affected=3)))])
    got = run(chunks, decoder)
    assert got[0].method == "LOGIN"
    reported = [(e.method, e.target, e.status, e.attributes.get("response_truncated")) for e in got[1:]]
    assert reported == ([] if first is None else [(*first, None, True)]) + [("QUERY", "SELECT 2", "OK", None)]
    assert got[-1].attributes["affected_rows"] == 3
    counts = decoder.take_counts()
    assert counts == ({"unsolicited_response": 1} if first is None else {"resync:garbage": 1})


def test_greeting_then_another_server_packet_is_skipped():
    decoder = MysqlDecoder()
    got = run(chunks_of([(RESP, pkt(0, greeting())), (RESP, pkt(1, ok()))] + login()[1:]), decoder)
    assert [(e.method, e.status) for e in got] == [("LOGIN", "OK")]
    assert decoder.take_counts() == {"unsolicited_response": 1}


def test_unsupported_is_sticky():
    decoder = MysqlDecoder()
    for chunk in chunks_of(login()):
        decoder.feed(chunk)
    with pytest.raises(Undecodable):
        decoder.feed(Chunk(REQ, pkt(0, b"\x12" + b"\x00" * 10), 15, 5000))
    with pytest.raises(Undecodable, match="binlog"):
        decoder.feed(Chunk(REQ, query(b"SELECT 1"), 13, 6000))
    assert list(decoder.close(7000)) == []


def test_commands_never_answered_are_bounded_and_late_responses_skipped():
    """5.2 MB of COM_PING to a server that does not answer queued a million commands; now at most
    MAX_PENDING wait, the others are reported unanswered, and responses that do come later are
    matched to the commands they answer (by count) and skipped."""
    from deetune.decoders.mysql import MAX_PENDING

    decoder = MysqlDecoder()
    ping = pkt(0, b"\x0e")
    for chunk in chunks_of(login()):
        decoder.feed(chunk)
    got = list(decoder.feed(Chunk(REQ, ping * (3 * MAX_PENDING), 15 * MAX_PENDING, 5000)))
    assert len(decoder._pending) <= MAX_PENDING + 1
    assert {(e.method, e.status) for e in got} == {("PING", None)}
    assert decoder.take_counts() == {"pending_limit": 3}  # each time MAX_PENDING were waiting again
    waiting = len(got)
    # The server answers every ping after all: the first still waiting pairs with the first answer...
    answers = list(decoder.feed(Chunk(RESP, pkt(1, ok()) * (3 * MAX_PENDING), 11 * 3 * MAX_PENDING, 6000)))
    assert len(answers) == 3 * MAX_PENDING - waiting
    assert all((e.method, e.status) == ("PING", "OK") for e in answers)
    # ... and a query after them pairs with its own response.
    got = list(decoder.feed(Chunk(REQ, query(b"SELECT 1"), 13, 7000)))
    got += decoder.feed(Chunk(RESP, pkt(1, ok(affected=4)), 11, 8000))
    assert [(e.method, e.attributes.get("affected_rows")) for e in got] == [("QUERY", 4)]


def test_affected_rows_adding_past_two_to_the_64th_saturate():
    """Two OK packets of one multi-statement query, each saying 2^64-1 rows: their sum is no u64."""
    huge = (1 << 64) - 1
    more = 0x0008 | AUTOCOMMIT  # SERVER_MORE_RESULTS_EXISTS
    got = decode(login() + [(REQ, query(b"UPDATE a; UPDATE b")),
                            (RESP, pkt(1, ok(affected=huge, status=more)) + pkt(2, ok(affected=huge)))])
    update = got[1]
    assert (update.status, update.attributes["affected_rows"]) == ("OK", huge)
    assert update.attributes["anomalies"] == ["affected_rows_overflow"]
    import orjson

    orjson.dumps(update.attributes)  # a sink can write it


# ---------------------------------------------------------------- detect

@pytest.mark.parametrize("direction, data", [
    (RESP, pkt(0, greeting())),
    (RESP, pkt(0, greeting(b"5.5.5-10.11.6-MariaDB-0+deb12u1"))),
    (RESP, pkt(0, err(1040, b"08004", b"Too many connections"))),
    (RESP, pkt(0, b"\xff\x69\x04Host '10.0.0.9' is blocked because of many connection errors")),
    (REQ, query(b"SELECT 1")),
    (REQ, query(b"select * from t where name = 'caf\xc3\xa9'")),
    (REQ, query(b"  /* comment */ UPDATE t SET a = 1")),
    (REQ, pkt(0, b"\x03\x00\x01SELECT 1")),
    (REQ, pkt(0, b"\x16SELECT * FROM t WHERE id = ?")),
    (REQ, pkt(0, b"\x0e") + pkt(0, b"\x0e")),
    (REQ, pkt(0, b"\x02shop")),
    (REQ, pkt(0, b"\x01")),
    (REQ, execute(7, b"1")),
    (REQ, pkt(0, b"\x19\x07\x00\x00\x00")),
    (REQ, pkt(1, handshake_response(b"alice", b"shop"))),
    (REQ, pkt(1, ssl_request())),
    (REQ, query(b"SELECT 1")[:7]),  # a prefix: the rest was not captured
])
def test_detect_accepts(direction, data):
    assert MysqlDecoder.detect(direction, data)


@pytest.mark.parametrize("direction, data", [
    (REQ, b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"),
    (REQ, b"*1\r\n$4\r\nPING\r\n"),
    (RESP, b"+PONG\r\n"),
    (RESP, b"HTTP/1.1 200 OK\r\n\r\n"),
    (REQ, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40),  # TLS ClientHello
    (REQ, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    (REQ, b""),
    (REQ, b"\x01\x00"),
    (REQ, pkt(1, b"\x03SELECT 1")),  # wrong sequence id for a command
    (REQ, query(b"SELECT 1") + b"junk"),  # trailing bytes that are no packet
    (REQ, query(b"SELECT\x00\x01\x02 1")),  # control bytes in SQL text
    (REQ, pkt(0, b"\x0e\x00")),  # PING with a body
    (REQ, pkt(0, b"\x7fhello")),  # unknown command
    (RESP, pkt(1, greeting())),  # greeting with sequence id 1
    (RESP, pkt(0, b"\x0a\x01\x02\x03\x00")),  # greeting with binary "version"
    (RESP, pkt(1, ok())),  # a response from mid-connection
    (RESP, pkt(0, greeting()) + b"extra"),
])
def test_detect_rejects(direction, data):
    assert not MysqlDecoder.detect(direction, data)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([REQ, RESP]), st.binary(max_size=64))
def test_detect_never_raises(direction, data):
    assert MysqlDecoder.detect(direction, data) in (True, False)


# ---------------------------------------------------------------- properties

def feed_all_or_undecodable(chunks: list[Chunk]) -> list[Exchange] | None:
    """Exchanges, or None when the decoder gave up: nothing else may escape."""
    decoder = MysqlDecoder()
    out = []
    try:
        for chunk in chunks:
            out.extend(decoder.feed(chunk))
        out.extend(decoder.close(10**12))
    except Undecodable as exc:
        assert "internal error" not in str(exc), str(exc)
        assert "\n" not in str(exc)
        return None
    return out


chunk_strategy = st.builds(
    lambda direction, data, extra, ts: Chunk(direction, data, len(data) + extra, ts),
    st.sampled_from([REQ, RESP]),
    st.binary(max_size=80),
    st.sampled_from([0, 0, 0, 1, 7, 300]),
    st.integers(0, 10**6),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(chunk_strategy, max_size=12))
def test_random_bytes_only_ever_raise_undecodable(chunks):
    feed_all_or_undecodable(chunks)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=8), st.booleans())
def test_random_packets_after_login_only_raise_undecodable(payloads, as_response):
    direction = RESP if as_response else REQ
    chunks = chunks_of(login()) + [Chunk(direction, pkt(i % 3, p), len(p) + 4, 9000 + i)
                                   for i, p in enumerate(payloads)]
    feed_all_or_undecodable(chunks)


# Building blocks of valid conversations: (request, response or None).
def block_strategy(deprecate_eof: bool):
    def query_ok(affected):
        return [(REQ, query(b"UPDATE t SET a = a + 1")), (RESP, pkt(1, ok(affected=affected)))]

    def query_rows(columns, rows):
        names = [b"c%d" % i for i in range(columns)]
        packets, _ = result_set(names, [tuple(b"v%d" % j for j in range(columns))] * rows,
                                deprecate_eof=deprecate_eof)
        return [(REQ, query(b"SELECT * FROM t")), (RESP, b"".join(packets))]

    def query_err(code):
        return [(REQ, query(b"SELEC")), (RESP, pkt(1, err(code, b"42000", b"bad")))]

    ping = [(REQ, pkt(0, b"\x0e")), (RESP, pkt(1, ok()))]
    return st.one_of(
        st.integers(0, 300).map(query_ok),
        st.tuples(st.integers(1, 4), st.integers(0, 6)).map(lambda a: query_rows(*a)),
        st.integers(1000, 2000).map(query_err),
        st.just(ping),
    )


@st.composite
def conversations(draw):
    deprecate_eof = draw(st.booleans())
    caps = CLIENT_CAPS | (DEPRECATE_EOF if deprecate_eof else 0)
    messages = login(caps=caps) if draw(st.booleans()) else []
    for block in draw(st.lists(block_strategy(deprecate_eof), min_size=1, max_size=6)):
        messages += block
    return chunks_of(messages)


def resplit(chunks: list[Chunk], cuts: list[int]) -> list[Chunk]:
    out = []
    for i, chunk in enumerate(chunks):
        data, start = chunk.data, 0
        for cut in sorted({c % len(data) for c in cuts[i::len(chunks)] if c % len(data)}):
            out.append(Chunk(chunk.direction, data[start:cut], cut - start, chunk.ts_ns))
            start = cut
        out.append(Chunk(chunk.direction, data[start:], len(data) - start, chunk.ts_ns))
    return out


@settings(max_examples=200, deadline=None)
@given(conversations(), st.lists(st.integers(0, 10_000), max_size=40))
def test_valid_streams_split_anywhere_decode_the_same(chunks, cuts):
    whole = run(chunks)
    assert len(whole) == sum(1 for c in chunks if c.direction is REQ)
    assert run(resplit(chunks, cuts)) == whole


@settings(max_examples=300, deadline=None)
@given(conversations(), st.data())
def test_truncated_captures_only_raise_undecodable(chunks, data):
    truncated = []
    for chunk in chunks:
        keep = data.draw(st.integers(0, len(chunk.data))) if data.draw(st.booleans()) else len(chunk.data)
        truncated.append(Chunk(chunk.direction, chunk.data[:keep], chunk.size, chunk.ts_ns))
    exchanges = feed_all_or_undecodable(truncated)
    if exchanges is not None:  # still following: every request is reported once
        assert len(exchanges) == sum(1 for c in chunks if c.direction is REQ)


@settings(max_examples=300, deadline=None)
@given(conversations(), st.randoms(use_true_random=False))
def test_reordered_chunks_only_raise_undecodable(chunks, rnd):
    rnd.shuffle(chunks)
    feed_all_or_undecodable(chunks)


# ---------------------------------------------------------------- third-party vectors

DEEPFLOW_MYSQL = "deepflow/agent/resources/test/flow_generator/mysql"
KINDLING_MYSQL = "kindling/collector/pkg/component/analyzer/network/protocol/testdata/mysql"
#: DeepFlow request_type (the COM_ byte; 0 = login) → our method.
DEEPFLOW_METHODS = {0: "LOGIN", 2: "INIT_DB", 3: "QUERY", 4: "FIELD_LIST", 22: "STMT_PREPARE", 23: "STMT_EXECUTE"}
COMPRESSED_PCAPS = {"mysql-use", "mysql-compressed-response", "partial-packet-compressed"}
DEEPFLOW_RESULTS = [
    "binary-in-sql", "large-response", "mysql-compressed-response", "mysql-database", "mysql-error",
    "mysql-exec", "mysql-login-error", "mysql-statement-id", "mysql-statement", "mysql-table-alter",
    "mysql-table-create", "mysql-table-delete", "mysql-table-desc", "mysql-table-destroy", "mysql-table-insert",
    "mysql-table-select", "mysql-table-update", "mysql-use", "mysql", "partial-packet-compressed",
    "truncate-1024",
]


def read_streams(vectors, pcap):
    spec = importlib.util.spec_from_file_location("pcap_to_streams", vectors / "pcap_to_streams.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_streams(str(pcap))[3]


def connection_chunks(conn) -> list[Chunk]:
    """Both directions' segments as chunks, in capture order (µs timestamps as ns)."""
    chunks = []
    for name, direction in (("c2s", REQ), ("s2c", RESP)):
        pos = 0
        for ts, length in conn[name + "_events"]:
            ts_ns = round(ts * 1e6) * 1000
            chunks.append((ts_ns, direction is RESP, Chunk(direction, conn[name][pos:pos + length], length, ts_ns)))
            pos += length
    chunks.sort(key=lambda item: item[:2])
    return [chunk for *_, chunk in chunks]


def decode_pcap(vectors, pcap) -> tuple[list[Exchange], list[str]]:
    """All connections' exchanges by request time, and the Undecodable messages."""
    exchanges, failures = [], []
    for conn in read_streams(vectors, pcap):
        chunks = connection_chunks(conn)
        first = chunks[0]
        assert MysqlDecoder.detect(first.direction, first.data), pcap.name
        try:
            exchanges.extend(run(chunks))
        except Undecodable as exc:
            failures.append(str(exc))
    exchanges.sort(key=lambda e: e.request_start_ns)
    return exchanges, failures


def parse_result_lines(path) -> list[dict]:
    """The JSON objects of a DeepFlow .result file (one per line, before ``is_mysql: …``)."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        match = re.match(r"\s*(\{.*\})\s*is_mysql:\s*(true|false)\s*$", line)
        if not match:
            continue
        try:
            records.append(json.loads(match.group(1)))
        except json.JSONDecodeError:  # tolerate a line we cannot read: pick the fields by hand
            fields = dict(re.findall(r'"(msg_type|request_type|request_resource)":"?([^",]*)"?', line))
            if "request_type" in fields:
                fields["request_type"] = int(fields["request_type"])
            records.append(fields)
    return records


def deepflow_rrt_us(exchange: Exchange) -> int:
    """DeepFlow times a login from the handshake response to the server's final OK / ERR."""
    if exchange.method == "LOGIN":
        return (exchange.response_end_ns - exchange.request_start_ns) // 1000
    return exchange.latency_ns // 1000


@pytest.mark.parametrize("name", DEEPFLOW_RESULTS)
def test_deepflow_request_sequence(vectors, name):
    pcap = vectors / DEEPFLOW_MYSQL / f"{name}.pcap"
    expected = [r for r in parse_result_lines(pcap.with_suffix(".result")) if r.get("msg_type") == "Request"]
    assert expected
    exchanges, failures = decode_pcap(vectors, pcap)
    if name in COMPRESSED_PCAPS:
        assert failures == ["compressed protocol"]
        assert exchanges == []
        return
    assert failures == []
    ours = [e for e in exchanges if e.method in DEEPFLOW_METHODS.values()]
    assert [e.method for e in ours] == [DEEPFLOW_METHODS[r["request_type"]] for r in expected]
    prepared = {e.attributes["statement_id"]: e.target for e in ours
                if e.method == "STMT_PREPARE" and "statement_id" in e.attributes}
    for exchange, record in zip(ours, expected):
        resource = record.get("request_resource")
        if exchange.method == "LOGIN":
            login_text = f"Login username: {exchange.attributes['user']}"
            if "database" in exchange.attributes:
                login_text += f" db: {exchange.attributes['database']}"
            assert login_text == resource
        elif exchange.method == "STMT_EXECUTE":
            # DeepFlow shows the parameter values; we name the prepared statement.
            assert exchange.attributes["statement_id"] == record["statement_id"]
            assert exchange.target == prepared[record["statement_id"]]
        elif resource is not None:
            assert exchange.target == resource


@pytest.mark.parametrize("name, method, code, message", [
    ("mysql-error", "INIT_DB", 1049, "Unknown database 'abcd'"),
    ("mysql-login-error", "LOGIN", 1040, "Too many connections"),
])
def test_deepflow_errors(vectors, name, method, code, message):
    pcap = vectors / DEEPFLOW_MYSQL / f"{name}.pcap"
    expected = [r["response_execption"] for r in parse_result_lines(pcap.with_suffix(".result"))
                if r.get("response_code") == 255]
    exchanges, _ = decode_pcap(vectors, pcap)
    errors = [e for e in exchanges if e.error]
    assert [e.error_message for e in errors] == expected == [message]
    assert (errors[0].method, errors[0].attributes["error_code"]) == (method, code)


@pytest.mark.parametrize("name, count, total_us, max_us", [
    ("mysql-error", 4, 292, 146),
    ("171-mysql", 390, 127090, 5355),
    ("mysql", 6, 598, 225),
])
def test_deepflow_response_times(vectors, name, count, total_us, max_us):
    exchanges, failures = decode_pcap(vectors, vectors / DEEPFLOW_MYSQL / f"{name}.pcap")
    assert failures == []
    timed = [deepflow_rrt_us(e) for e in exchanges if e.response_start_ns is not None]
    assert (len(timed), sum(timed), max(timed)) == (count, total_us, max_us)


def test_deepflow_statement_ids_and_rows(vectors):
    exchanges, _ = decode_pcap(vectors, vectors / DEEPFLOW_MYSQL / "mysql-statement.pcap")
    executes = [(e.attributes["statement_id"], e.attributes["rows"]) for e in exchanges if e.method == "STMT_EXECUTE"]
    assert executes == [(96, 1), (97, 4)]
    # Requests whose responses the capture does not hold are still reported, without status.
    assert sum(1 for e in exchanges if e.status is None and e.method != "STMT_CLOSE") == 3


def kindling_item(item) -> bytes:
    """One ``data`` item: ``hex|…``, ``string|…``, ``<hex>|text`` or literal text."""
    text = str(item)
    if text.startswith("hex|"):
        digits = text[4:]
        return bytes.fromhex(digits[: len(digits) // 2 * 2])  # 1k-trace.yml has an odd digit count
    if text.startswith("string|"):
        return text[7:].encode()
    head, sep, rest = text.partition("|")
    if sep and head and len(head) % 2 == 0 and re.fullmatch(r"[0-9a-fA-F]+", head):
        return bytes.fromhex(head) + rest.encode()
    return text.encode()


def kindling_trace(vectors, name) -> tuple[dict, list[Chunk]]:
    """The YAML document and its syscalls as chunks, in time order."""
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((vectors / KINDLING_MYSQL / name).read_text())
    trace = doc["trace"]
    events = []
    for key, direction in (("requests", REQ), ("responses", RESP)):
        for event in trace.get(key) or []:
            attrs = event["user_attributes"]
            data = b"".join(kindling_item(item) for item in attrs["data"])
            # A syscall never captures more than it moved: keep the first ``res`` bytes.
            events.append(Chunk(direction, data[: attrs["res"]], attrs["res"], event["timestamp"]))
    events.sort(key=lambda c: c.ts_ns)
    return doc, events


@pytest.mark.parametrize("name", ["server-trace-query.yml", "server-trace-query-split.yml"])
def test_kindling_query(vectors, name):
    doc, chunks = kindling_trace(vectors, name)
    expect = doc["trace"]["expects"][0]
    [exchange] = run(chunks)
    assert exchange.method == "QUERY"
    assert exchange.target == expect["Labels"]["sql"] == "SELECT * FROM dummy"
    assert exchange.error is expect["Labels"]["is_error"] is False
    assert exchange.request_bytes == expect["Values"]["request_io"] == sum(c.size for c in chunks if c.direction is REQ)
    assert exchange.response_bytes == expect["Values"]["response_io"] == 160
    # Kindling's ttfb starts when the response syscall was entered; ours when it returned.
    response_syscall = doc["trace"]["responses"][0]["user_attributes"]["latency"]
    assert exchange.latency_ns == expect["Values"]["waiting_ttfb_time"] + response_syscall
    # Only 80 of the 160 response bytes were captured: the result set is known to have begun.
    assert exchange.attributes == {"columns": 2, "rows": 0, "response_truncated": True, "rows_truncated": True}


def test_kindling_query_cmd_payload_longer_than_declared(vectors):
    """The vector's packet declares 20 payload bytes (res=24) but lists 22: the statement is cut."""
    _, chunks = kindling_trace(vectors, "server-trace-query-cmd.yml")
    [exchange] = run(chunks)
    assert (exchange.method, exchange.target) == ("QUERY", "SELECT * FROM dum")
    assert (exchange.request_bytes, exchange.response_bytes) == (24, 160)


def test_kindling_commit_until_the_inconsistent_packet(vectors):
    """The third request declares a 49-byte payload but moves 7 (a copy of the second's header);
    the response that follows cannot belong to an unfinished request: it is skipped, counted."""
    doc, chunks = kindling_trace(vectors, "server-trace-commit.yml")
    decoder = MysqlDecoder()
    exchanges = []
    for chunk in chunks:
        exchanges.extend(decoder.feed(chunk))
    expects = doc["trace"]["expects"]
    assert [(e.target, e.request_bytes, e.response_bytes) for e in exchanges] == [
        (x["Labels"]["sql"], x["Values"]["request_io"], x["Values"]["response_io"]) for x in expects[:2]
    ]
    assert decoder.take_counts() == {"unsolicited_response": 1}


def test_kindling_oneway_quit(vectors):
    """Kindling reports nothing for a lone COM_QUIT; we report the QUIT, without response."""
    _, chunks = kindling_trace(vectors, "server-trace-oneway.yml")
    assert [(e.method, e.status, e.request_bytes) for e in run(chunks)] == [("QUIT", None, 24)]


def test_kindling_1k_trace(vectors):
    _, chunks = kindling_trace(vectors, "1k-trace.yml")
    [exchange] = run(chunks)
    assert exchange.target.startswith("SELECT a.id as id, a.name as name")
    assert (exchange.request_bytes, exchange.response_bytes) == (113, 1000)
