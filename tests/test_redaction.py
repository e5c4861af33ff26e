"""Issue 18, item 5: secrets are redacted wherever exchange text is kept (store, /api/exchanges,
jsonl, OTLP through the event's target) and in recordings, HTTP auth headers in every layout."""

from __future__ import annotations

import json
import pathlib
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from deetune.decoders.base import Exchange
from deetune.events import ExchangeEvent
from deetune.recording.redact import Redactor
from deetune.recording.tasks import Redaction
from deetune.redaction import redact_exchange_text, redact_http_target, redact_sql
from tests.servers import DB_NAME, DB_PASSWORD, DB_USER, HOST, free_port, mariadb_server, need_module  # noqa: F401

M = "[REDACTED]"


@pytest.mark.parametrize("statement,expected", [
    ("CREATE USER 'bob'@'%' IDENTIFIED BY 's3cr3t!'", "CREATE USER 'bob'@'%' IDENTIFIED BY '[REDACTED]'"),
    ("create user bob identified by \"dq-pass\"", "create user bob identified by \"[REDACTED]\""),
    ("SET PASSWORD FOR 'bob'@'localhost' = PASSWORD('hunter2')",
     "SET PASSWORD FOR 'bob'@'localhost' = PASSWORD('[REDACTED]')"),
    ("SET PASSWORD = 'plain'", "SET PASSWORD = '[REDACTED]'"),
    ("ALTER USER u IDENTIFIED WITH caching_sha2_password BY 'new1' REPLACE 'old1' RETAIN CURRENT PASSWORD",
     "ALTER USER u IDENTIFIED WITH caching_sha2_password BY '[REDACTED]' REPLACE '[REDACTED]' RETAIN CURRENT PASSWORD"),
    ("GRANT ALL ON *.* TO 'a'@'%' IDENTIFIED BY 'x''y\\'z' WITH GRANT OPTION",
     "GRANT ALL ON *.* TO 'a'@'%' IDENTIFIED BY '[REDACTED]' WITH GRANT OPTION"),
    ("CREATE USER x IDENTIFIED BY PASSWORD '*94BDCEBE19083CE2A1F959FD02F964C7AF4CFC29'",
     "CREATE USER x IDENTIFIED BY PASSWORD '[REDACTED]'"),
    ("CREATE USER c IDENTIFIED VIA ed25519 USING PASSWORD('ma1')",
     "CREATE USER c IDENTIFIED VIA ed25519 USING PASSWORD('[REDACTED]')"),
    ("CHANGE MASTER TO MASTER_HOST='h', MASTER_PASSWORD='mp1'", "CHANGE MASTER TO MASTER_HOST='h', MASTER_PASSWORD='[REDACTED]'"),
    ("ALTER ROLE r WITH ENCRYPTED PASSWORD 'pg1'", "ALTER ROLE r WITH ENCRYPTED PASSWORD '[REDACTED]'"),
    ("SELECT PASSWORD(0x41424344)", "SELECT PASSWORD('[REDACTED]')"),
    ("CREATE USER d IDENTIFIED BY _utf8mb4'intro'", "CREATE USER d IDENTIFIED BY '[REDACTED]'"),
    ("CREATE USER x IDENTIFIED BY 'cut by the captu", "CREATE USER x IDENTIFIED BY '[REDACTED]'"),
    ("CREATE USER x IDENTIFIED BY RANDOM PASSWORD", "CREATE USER x IDENTIFIED BY RANDOM PASSWORD"),
    ("SELECT password_hash FROM users WHERE id = 'x'", "SELECT password_hash FROM users WHERE id = 'x'"),
    ("SELECT 'IDENTIFIED' FROM t", "SELECT 'IDENTIFIED' FROM t"),
])
def test_sql_password_clauses(statement, expected):
    assert redact_sql(statement)[0] == expected


def test_error_messages_lose_the_statements_secret():
    target, message = redact_exchange_text("mysql", "CREATE USER x IDENTIFIED BY 'hunter22' BOGUS",
                                           "You have an error in your SQL syntax near 'hunter22' BOGUS' at line 1")
    assert (target, message) == ("CREATE USER x IDENTIFIED BY '[REDACTED]' BOGUS",
                                 "You have an error in your SQL syntax near '[REDACTED]' BOGUS' at line 1")


@pytest.mark.parametrize("target,expected", [
    ("/login?user=ann&password=p%20w&token=t1&x=1#frag", "/login?user=ann&password=[REDACTED]&token=[REDACTED]&x=1#frag"),
    ("http://user:pass@h.example/x?q=1", "http://[REDACTED]@h.example/x?q=1"),
    ("/a?key=1&keyboard=2&page_token=zz&client_secret=c&X-Amz-Signature=ab", 
     "/a?key=[REDACTED]&keyboard=2&page_token=[REDACTED]&client_secret=[REDACTED]&X-Amz-Signature=[REDACTED]"),
    ("/plain/path?q=search", "/plain/path?q=search"),
])
def test_http_targets(target, expected):
    assert redact_http_target(target) == expected


def test_every_exchange_event_is_redacted_where_it_is_made():
    """The one place: ExchangeEvent.from_exchange (live and offline decoding both use it)."""
    x = Exchange("mysql", "QUERY", "SET PASSWORD = PASSWORD('abc123')", "ERR", True, 1, 2, 3, 4, 10, 10,
                 "Access denied; you need the SUPER privilege (abc123)", {})
    event = ExchangeEvent.from_exchange(x, clock_offset=0, pid=1, comm="c", role="client", laddr="a", lport=1,
                                        raddr="b", rport=2)
    assert event.target == "SET PASSWORD = PASSWORD('[REDACTED]')"
    assert "abc123" not in json.dumps(event.to_json())


# -- recordings: HTTP auth headers in every layout ------------------------------------------------------


def _redact_http(request: bytes) -> tuple[bytes, tuple[str, ...]]:
    req, _, _, rules = Redactor(Redaction()).apply("http", "GET", request, b"", "/")
    return req, rules


@pytest.mark.parametrize("request_bytes,expected,rules", [
    # bare LF line ends (the HTTP decoder accepts them, as do many servers)
    (b"GET / HTTP/1.1\nHost: x\nAuthorization: Basic dXNlcjpwYXNz\nCookie: sid=abc\n\nbody",
     b"GET / HTTP/1.1\nHost: x\nAuthorization: [REDACTED]\nCookie: [REDACTED]\n\nbody",
     ("http.authorization", "http.cookie")),
    # a space (or a tab) before the colon
    (b"GET / HTTP/1.1\r\nAuthorization : Bearer tok1\r\nProxy-Authorization\t: Basic cHJveHk=\r\n\r\n",
     b"GET / HTTP/1.1\r\nAuthorization : [REDACTED]\r\nProxy-Authorization\t: [REDACTED]\r\n\r\n",
     ("http.authorization", "http.proxy-authorization")),
    # a value folded onto continuation lines (obsolete line folding)
    (b"GET / HTTP/1.1\r\nAuthorization: Basic\r\n  dXNlcjpwYXNz\r\n\tmore\r\nX-Other: 1\r\n\r\n",
     b"GET / HTTP/1.1\r\nAuthorization: [REDACTED]\r\n  [REDACTED]\r\n\t[REDACTED]\r\nX-Other: 1\r\n\r\n",
     ("http.authorization",)),
    # mixed line ends, lower case, and a cut head
    (b"GET / HTTP/1.1\r\ncookie: a=1\nauthorization: Bearer cut-tok",
     b"GET / HTTP/1.1\r\ncookie: [REDACTED]\nauthorization: [REDACTED]", ("http.cookie", "http.authorization")),
    (b"GET / HTTP/1.1\r\nX-Api-Key: k1\r\nX-Auth-Token: t1\r\n\r\n",
     b"GET / HTTP/1.1\r\nX-Api-Key: [REDACTED]\r\nX-Auth-Token: [REDACTED]\r\n\r\n", ("http.x-api-key", "http.x-auth-token")),
])
def test_recorded_http_headers_in_every_layout(request_bytes, expected, rules):
    assert _redact_http(request_bytes) == (expected, rules)


def test_bare_lf_json_body_is_still_found():
    body = b'{"password": "pw1"}'
    request = b"POST /x HTTP/1.1\nContent-Type: application/json\nContent-Length: %d\n\n" % len(body) + body
    req, _, _, rules = Redactor(Redaction(json=("password",))).apply("http", "POST", request, b"", "/x")
    assert req.endswith(b'\n\n{"password":"[REDACTED]"}') and rules == ("json:password",)


# -- live: a real MariaDB, the agent, its store, API and jsonl -------------------------------------------


@pytest.mark.bpf
@pytest.mark.servers
def test_sql_passwords_never_reach_the_store_api_or_jsonl(mariadb_server, tmp_path):
    """The issue's reproduction: these statements were kept verbatim in the store, /api/exchanges and
    the jsonl target.  (They fail for lack of privileges: nothing changes on the server.)"""
    from tests.test_agent import AgentProcess

    pymysql = need_module("pymysql", "pymysql")
    db = mariadb_server
    tag = uuid.uuid4().hex[:8]
    secrets = [f"Sekr1t-{tag}", f"Sekr2t-{tag}", f"Sekr3t-{tag}", f"Sekr4t-{tag}"]
    statements = [
        f"CREATE USER 'h18a{tag}'@'%' IDENTIFIED BY '{secrets[0]}'",
        f"SET PASSWORD FOR 'h18d{tag}'@'localhost' = PASSWORD('{secrets[1]}')",
        f"ALTER USER 'h18b{tag}'@'%' IDENTIFIED BY '{secrets[2]}'",
        f"GRANT SELECT ON *.* TO 'h18c{tag}'@'%' IDENTIFIED BY '{secrets[3]}'",
    ]
    store, events, port, token = tmp_path / "s.db", tmp_path / "e.jsonl", free_port(), f"t-{tag}"
    agent = AgentProcess("--probe", "tcp", "--probe", "payload", "--port", str(db.port), "--store", str(store),
                         "--api", f"{HOST}:{port}", "--api-token", token, "--sink", f"jsonl:{events}")
    conn = pymysql.connect(host=HOST, port=db.port, user=DB_USER, password=DB_PASSWORD, database=DB_NAME)
    with conn.cursor() as cur:
        for statement in statements:
            with pytest.raises(pymysql.err.MySQLError):
                cur.execute(statement)
    conn.close()

    def stored() -> list[dict]:
        request = urllib.request.Request(f"http://{HOST}:{port}/api/exchanges?limit=1000",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            return [e for e in json.load(reply)["exchanges"] if tag in e["target"]]

    deadline = time.monotonic() + 30
    while len(stored()) < len(statements) and time.monotonic() < deadline:
        time.sleep(0.5)
    answered = stored()
    code, _, err = agent.finish()
    assert code == 0, err
    assert sorted(e["target"] for e in answered) == sorted(
        s.replace(secret, M) for s, secret in zip(statements, secrets))
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    targets = {e["target"] for e in lines if e.get("type") == "request" and tag in e.get("target", "")}
    assert targets == {s.replace(secret, M) for s, secret in zip(statements, secrets)}
    for path in (events, *tmp_path.glob("s.db*")):
        data = pathlib.Path(path).read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, (path, secret)
    rows = sqlite3.connect(store).execute("SELECT data FROM exchanges").fetchall()
    assert sum(tag in row[0] for row in rows) == len(statements)
