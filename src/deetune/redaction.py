"""Secrets out of the text an exchange keeps: the one place where a decoded exchange's ``target``
and ``error_message`` are redacted, before any sink (store, API, jsonl, console, OTLP) sees them
(:meth:`deetune.events.ExchangeEvent.from_exchange` calls :func:`redact_exchange_text`).

SQL (any protocol whose target is a statement)
    String literals (and hex literals) that are passwords become ``'[REDACTED]'``:
    ``IDENTIFIED [WITH|VIA plugin] BY|AS|USING [PASSWORD] '…'`` (CREATE/ALTER USER, GRANT) and its
    ``REPLACE '…'`` (the current password), ``PASSWORD('…')`` and ``OLD_PASSWORD('…')``,
    ``SET PASSWORD [FOR user] = '…'``, and ``…PASSWORD [=] '…'`` (``MASTER_PASSWORD``,
    ``SOURCE_PASSWORD``, ``START REPLICA … PASSWORD=``, PostgreSQL's ``[ENCRYPTED] PASSWORD '…'``,
    a ``WHERE password = '…'``).  A literal cut by the capture is masked to its end.  Where a
    statement's literal was masked, the same text is masked in the error message too (MySQL
    quotes the statement back in syntax errors).
HTTP
    Credentials in an absolute-form target (``http://user:pass@host/…``, a proxy's request) and
    the values of query parameters whose names say they are secrets (``password``, ``passwd``,
    ``pwd``, ``pass``, ``secret``, ``token``, ``access_token``, ``api_key``/``apikey``, ``key``,
    ``auth``, ``signature``/``sig``, ``credential`` and names containing these words, e.g.
    ``client_secret``, ``X-Amz-Signature``).

Recordings keep whole messages, redacted by their own rules (:mod:`deetune.recording.redact`,
which uses the SQL rule of this module for statements).
"""

from __future__ import annotations

import re

MASK_TEXT = "[REDACTED]"

# A literal: 'single' or "double" quoted (doubled quotes and backslash escapes inside), cut at
# the end of the text, an optional charset introducer (_utf8mb4'…') or prefix (N'…', X'…', B'…'),
# or a hex number.  No nested quantifier can backtrack: each alternative starts on its own byte.
_LITERAL = (r"(?:_[A-Za-z0-9]+\s*)?[NnXxBb]?(?:'(?:[^'\\]|\\.|'')*(?:'|\Z)|\"(?:[^\"\\]|\\.|\"\")*(?:\"|\Z))"
            r"|0[xX][0-9A-Fa-f]+")
_SQL_PASSWORD_TEXT = (
    r"(?i)(?:"
    r"(?P<p1>IDENTIFIED\s+(?:(?:WITH|VIA)\s+[\w'\"`.]+\s+)?(?:BY|AS|USING)\s+(?:PASSWORD\s+)?)(?P<l1>" + _LITERAL + r")"
    r"(?:(?P<p2>\s+REPLACE\s+)(?P<l2>" + _LITERAL + r"))?"
    r"|(?P<p3>\b(?:OLD_)?PASSWORD\s*\(\s*)(?P<l3>" + _LITERAL + r")"
    r"|(?P<p4>\b\w*PASSWORD\s*(?:FOR\s+\S+\s*)?=?\s*(?:PASSWORD\s*\(\s*)?)(?P<l4>" + _LITERAL + r")"
    r")"
)
SQL_PASSWORD = re.compile(_SQL_PASSWORD_TEXT)
SQL_PASSWORD_BYTES = re.compile(_SQL_PASSWORD_TEXT.encode())
#: A cheap test before the full search: every rule names a password or IDENTIFIED.
_SQL_HINT = re.compile(r"(?i)identified|password")
_SQL_HINT_BYTES = re.compile(rb"(?i)identified|password")
_LITERAL_GROUPS = ("l1", "l2", "l3", "l4")


def _literal_content(literal: str) -> str:
    """What a literal holds: between its quotes (a cut one: to its end); a hex number as it is."""
    quotes = [i for i in (literal.find("'"), literal.find('"')) if i >= 0]
    if not quotes:
        return literal
    start = min(quotes)
    inner = literal[start + 1:]
    return inner[:-1] if inner.endswith(literal[start]) else inner


def _masked_literal(literal: str) -> str:
    quote = literal[-1:] if literal[-1:] in ("'", '"') else "'"
    return f"{quote}{MASK_TEXT}{quote}"


#: Statements known to hold no password hint (an application runs few distinct ones, and every
#: exchange of theirs comes here): no search.  Bounded in count and in length.
_PLAIN_SQL: set[str] = set()
_PLAIN_SQL_MAX = 1024
_PLAIN_SQL_LONGEST = 512


def redact_sql(text: str) -> tuple[str, list[str]]:
    """``text`` with password literals masked, and the literals' contents that were masked."""
    if not text or text in _PLAIN_SQL:
        return text, []
    if _SQL_HINT.search(text) is None:
        if len(text) <= _PLAIN_SQL_LONGEST and len(_PLAIN_SQL) < _PLAIN_SQL_MAX:
            _PLAIN_SQL.add(text)
        return text, []
    secrets: list[str] = []

    def mask(match: re.Match[str]) -> str:
        out = []
        last = match.start()
        for name in _LITERAL_GROUPS:
            start = match.start(name)
            if start < 0:
                continue
            literal = match.group(name)
            out.append(text[last:start])
            out.append(_masked_literal(literal))
            inner = _literal_content(literal)
            if len(inner) >= 3:  # shorter would mask unrelated text in the error message
                secrets.append(inner)
            last = match.end(name)
        out.append(text[last:match.end()])
        return "".join(out)

    return SQL_PASSWORD.sub(mask, text), secrets


def redact_sql_bytes(data: bytes) -> bytes:
    """:func:`redact_sql` on bytes (a statement inside a recorded packet)."""
    if not data or _SQL_HINT_BYTES.search(data) is None:
        return data

    def mask(match: re.Match[bytes]) -> bytes:
        out = []
        last = match.start()
        for name in _LITERAL_GROUPS:
            start = match.start(name)
            if start < 0:
                continue
            literal = match.group(name)
            quote = literal[-1:] if literal[-1:] in (b"'", b'"') else b"'"
            out.append(data[last:start])
            out.append(quote + MASK_TEXT.encode() + quote)
            last = match.end(name)
        out.append(data[last:match.end()])
        return b"".join(out)

    return SQL_PASSWORD_BYTES.sub(mask, data)


# -- HTTP targets ------------------------------------------------------------------------------------

_SECRET_WORDS = ("password", "passwd", "secret", "token", "apikey", "api_key", "api-key", "signature", "credential")
_SECRET_NAMES = frozenset({"pwd", "pass", "key", "auth", "sig", "authorization"})
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/?#@]*)@")


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered in _SECRET_NAMES or any(word in lowered for word in _SECRET_WORDS)


def redact_http_target(target: str) -> str:
    """An HTTP target without the credentials of an absolute-form URL and secret query values."""
    if not target:
        return target
    if "@" in target and "://" in target:
        target = _USERINFO.sub(lambda m: f"{m.group(1)}{MASK_TEXT}@", target, count=1)
    question = target.find("?")
    if question < 0:
        return target
    end = target.find("#", question)
    query = target[question + 1:] if end < 0 else target[question + 1:end]
    if "=" not in query:
        return target
    changed = False
    parts = re.split(r"([&;])", query)
    for i in range(0, len(parts), 2):
        name, sep, value = parts[i].partition("=")
        if sep and value and _secret_name(name.replace("%5F", "_").replace("%5f", "_")):
            parts[i] = f"{name}={MASK_TEXT}"
            changed = True
    if not changed:
        return target
    rest = "" if end < 0 else target[end:]
    return target[:question + 1] + "".join(parts) + rest


# -- exchanges ---------------------------------------------------------------------------------------


def redact_exchange_text(protocol: str, target: str, error_message: str | None) -> tuple[str, str | None]:
    """(target, error_message) of a decoded exchange without the secrets this module knows."""
    if protocol in ("http", "http2", "grpc"):
        return redact_http_target(target), error_message
    target, secrets = redact_sql(target)
    if error_message:
        error_message, _ = redact_sql(error_message)
        for secret in secrets:
            if secret in error_message:
                error_message = error_message.replace(secret, MASK_TEXT)
    return target, error_message


__all__ = ["MASK_TEXT", "SQL_PASSWORD", "SQL_PASSWORD_BYTES", "redact_exchange_text", "redact_http_target",
           "redact_sql", "redact_sql_bytes"]
