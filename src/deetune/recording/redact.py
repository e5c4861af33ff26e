"""Redaction of recorded bytes, before anything is stored.

Built-in rules (on unless a task sets ``redact.defaults`` to false):

``http.authorization``, ``http.proxy-authorization``, ``http.cookie``, ``http.set-cookie``, ``http.x-api-key``, ``http.x-auth-token``
    The header's value becomes ``[REDACTED]`` (the name and the line stay; the head gets
    shorter or longer, the body and its Content-Length are unchanged), in every layout a
    server may accept: CRLF or bare LF line ends, spaces before the colon
    (``Authorization :``), and values folded onto continuation lines (each masked too).
``mysql.auth``
    The handshake response of a login keeps its capabilities, user, database and
    attributes; its authentication data becomes empty (the packet length is fixed).
    Further packets the client sends during the login (auth switch responses, …) and the
    authentication data of ``COM_CHANGE_USER`` are emptied the same way.
``mysql.password``
    Password literals in statements become ``[REDACTED]`` (packet length fixed; the exchange's
    target too): the SQL rule of :mod:`deetune.redaction` (``IDENTIFIED BY '…'``,
    ``PASSWORD('…')``, ``SET PASSWORD = '…'``, ``MASTER_PASSWORD='…'`` …).
``redis.auth``
    The arguments of ``AUTH``, those after ``AUTH`` in ``HELLO`` (user and password),
    after ``AUTH``/``AUTH2`` in ``MIGRATE``: ``[REDACTED]`` (the RESP lengths are fixed).
``redis.secrets``
    ``CONFIG SET requirepass|masterauth|masteruser …`` values and ``ACL SETUSER`` password
    rules (``>pass``, ``<pass``, ``#hash``, ``!hash``).

A message too short to parse (cut by the limit or a capture gap) loses everything after
the point where a secret may begin.

User rules (a task's ``redact``):

``header:NAME``
    More HTTP headers masked like the built-in ones.
``json:PATH``
    A field of JSON HTTP bodies (either direction): its value becomes ``"[REDACTED]"`` and the
    body is re-serialised (compact), Content-Length fixed (a chunked body becomes one chunk).
    A body that is not complete JSON (truncated) gets the path's last key masked wherever
    ``"key": value`` appears.
``regex:PATTERN``
    Every match in the bytes (or, when the pattern has groups, each group) is replaced by as
    many ``*``: the length is kept, so no framing (Content-Length, RESP, MySQL packets) breaks.
    Applied last, to both directions and to the exchange's target.

Each rule that masked something is listed in the recorded exchange's ``redactions``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

from deetune.recording.patterns import compile_pattern
from deetune.redaction import redact_sql, redact_sql_bytes
from deetune.recording.tasks import Redaction

MASK = b"[REDACTED]"
MASK_TEXT = "[REDACTED]"

_DEFAULT_HEADERS = {
    b"authorization": "http.authorization",
    b"proxy-authorization": "http.proxy-authorization",
    b"cookie": "http.cookie",
    b"set-cookie": "http.set-cookie",
    b"x-api-key": "http.x-api-key",
    b"x-auth-token": "http.x-auth-token",
}

# MySQL capability flags.
_CLIENT_PROTOCOL_41 = 0x00000200
_CLIENT_SSL = 0x00000800
_CLIENT_SECURE_CONNECTION = 0x00008000
_CLIENT_PLUGIN_AUTH_LENENC = 0x00200000
_COM_QUERY, _COM_CHANGE_USER, _COM_STMT_PREPARE = 0x03, 0x11, 0x16
_REDIS_SECRET_CONFIG = {b"requirepass", b"masterauth", b"masteruser"}
#: The blank line ending an HTTP head: CRLF CRLF, LF LF, or a mix.
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")


class Redactor:
    """A task's redaction rules, compiled: :meth:`apply` masks one exchange."""

    def __init__(self, rules: Redaction) -> None:
        self.defaults = rules.defaults
        self.headers: dict[bytes, str] = dict(_DEFAULT_HEADERS) if rules.defaults else {}
        for name in rules.headers:
            self.headers.setdefault(name.lower().encode("ascii"), f"header:{name.lower()}")
        self.json_paths = [(path, _parse_path(path)) for path in rules.json]
        # RE2 (linear time): these run on the pipeline thread, over every recorded byte.
        self.patterns = [(pattern, compile_pattern(pattern.encode("utf-8"))) for pattern in rules.patterns]

    def apply(self, protocol: str, method: str, request: bytes, response: bytes,
              target: str) -> tuple[bytes, bytes, str, tuple[str, ...]]:
        """(request, response, target, names of the rules that masked something)."""
        applied: list[str] = []
        if protocol == "http":
            request = self._http(request, applied)
            response = self._http(response, applied)
        elif self.defaults and protocol == "redis":
            request = _redis(request, applied)
        elif self.defaults and protocol == "mysql":
            request, target = _mysql(method, request, target, applied)
        if self.patterns:
            for name, pattern in self.patterns:
                masked = False
                for which in range(3):
                    if which == 2:
                        raw = target.encode("utf-8", "surrogateescape")
                        new, hit = _mask_regex(pattern, raw)
                        if hit:
                            target = new.decode("utf-8", "replace")
                    else:
                        new, hit = _mask_regex(pattern, request if which == 0 else response)
                        if hit:
                            if which == 0:
                                request = new
                            else:
                                response = new
                    masked = masked or hit
                if masked:
                    applied.append(f"regex:{name}")
        return request, response, target, tuple(dict.fromkeys(applied))

    # -- HTTP ------------------------------------------------------------------------------------
    def _http(self, message: bytes, applied: list[str]) -> bytes:
        if not message:
            return message
        # The head ends at the first blank line, however its lines end (CRLF, or bare LF, which
        # the HTTP decoder and many servers accept).
        blank = _BLANK_LINE.search(message)
        head = message if blank is None else message[:blank.start()]
        separator = b"" if blank is None else blank.group()
        body = b"" if blank is None else message[blank.end():]
        if self.headers:
            head = self._mask_headers(head, applied)
        if blank is None:
            return head
        if self.json_paths and body:
            head, body = self._json_body(head, body, applied)
        return head + separator + body

    def _mask_headers(self, head: bytes, applied: list[str]) -> bytes:
        """Mask the values of the rules' headers in every layout a server may accept: CRLF or bare
        LF line ends, spaces or tabs before the colon (``Authorization :``), values folded onto
        continuation lines (obsolete line folding: a line starting with a space or a tab)."""
        lowered = head.lower()
        for name in self.headers:
            if name in lowered:
                break
        else:
            return head  # the common case, without splitting the head
        lines = head.split(b"\n")
        changed = False
        masking = False  # the previous header was masked: its continuation lines are its value
        for i in range(1, len(lines)):
            line = lines[i]
            cr = b"\r" if line.endswith(b"\r") else b""
            text = line[:-1] if cr else line
            if text[:1] in (b" ", b"\t"):
                if masking and text.strip():
                    lines[i] = text[:len(text) - len(text.lstrip(b" \t"))] + MASK + cr
                    changed = True
                continue
            masking = False
            colon = text.find(b":")
            if colon <= 0:
                continue
            rule = self.headers.get(text[:colon].strip(b" \t").lower())
            if rule is None:
                continue
            rest = text[colon + 1:]
            space = rest[:len(rest) - len(rest.lstrip(b" \t"))]
            lines[i] = text[:colon + 1] + (space or b" ") + MASK + cr
            applied.append(rule)
            changed = masking = True
        return b"\n".join(lines) if changed else head

    def _json_body(self, head: bytes, body: bytes, applied: list[str]) -> tuple[bytes, bytes]:
        lowered = head.lower()
        if b"\ncontent-encoding:" in lowered and not re.search(rb"\ncontent-encoding:\s*identity", lowered):
            return head, body  # compressed: not readable
        chunked = re.search(rb"\ntransfer-encoding:[^\r\n]*chunked", lowered) is not None
        content = _dechunk(body) if chunked else body
        complete = content is not None
        if chunked and content is None:
            content = body
        length = _content_length(lowered)
        if not chunked and length is not None and len(content) < length:
            complete = False
        hits: list[str] = []
        new_content = None
        if complete:
            try:
                document = json.loads(content.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                document = None
                complete = False
            else:
                for name, path in self.json_paths:
                    if _mask_json(document, path):
                        hits.append(f"json:{name}")
                if hits:
                    new_content = json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if not complete:
            # Not (complete) JSON: mask `"key": value` of each path's last key wherever it appears.
            text = content
            for name, path in self.json_paths:
                key = path[-1]
                if key in ("*", "**"):
                    continue
                pattern = re.compile(rb'("' + re.escape(key.encode("utf-8")) + rb'"\s*:\s*)'
                                     rb'("(?:[^"\\]|\\.)*"?|[^,}\]\s]+)')
                text, count = pattern.subn(lambda m: m.group(1) + b'"' + MASK + b'"', text)
                if count:
                    hits.append(f"json:{name}")
            if hits:
                new_content = text
        if new_content is None:
            return head, body
        applied.extend(hits)
        if chunked:
            if complete:
                body = b"%x\r\n" % len(new_content) + new_content + b"\r\n0\r\n\r\n"
            else:
                body = new_content  # a cut chunked body stays cut; sizes inside it are not fixed
        else:
            if complete and length is not None:
                head = _set_content_length(head, len(new_content))
            body = new_content
        return head, body


# -- HTTP helpers ----------------------------------------------------------------------------------


def _content_length(lowered_head: bytes) -> int | None:
    match = re.search(rb"\ncontent-length:\s*([0-9]{1,18})", lowered_head)
    return int(match.group(1)) if match else None


def _set_content_length(head: bytes, value: int) -> bytes:
    return re.sub(rb"(?i)(\r\ncontent-length:[ \t]*)[0-9]+", lambda m: m.group(1) + str(value).encode(), head, count=1)


def _dechunk(body: bytes) -> bytes | None:
    """The content of a complete chunked body; None when it is cut or malformed."""
    out = []
    pos = 0
    while True:
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size_text = body[pos:line_end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return None
        pos = line_end + 2
        if size == 0:
            return b"".join(out)
        if pos + size + 2 > len(body):
            return None
        out.append(body[pos:pos + size])
        pos += size + 2


def _parse_path(path: str) -> list[str]:
    return path.split(".")


def _mask_json(node: Any, path: list[str]) -> bool:
    """Mask the values at ``path`` (``*``: any key/index; a leading ``**``: any depth); True if any."""
    if not path:
        return False
    head, rest = path[0], path[1:]
    if head == "**":
        hit = _mask_json(node, rest)
        for child in _children(node):
            hit = _mask_json(child, path) or hit
        return hit
    if isinstance(node, list):
        if head == "*" or head.isdigit():
            keys: Iterable[Any] = range(len(node)) if head == "*" else [int(head)] if int(head) < len(node) else []
        else:  # arrays along the way are walked through
            hit = False
            for child in node:
                hit = _mask_json(child, path) or hit
            return hit
    elif isinstance(node, dict):
        keys = list(node) if head == "*" else [head] if head in node else []
    else:
        return False
    hit = False
    for key in keys:
        if not rest:
            node[key] = MASK_TEXT
            hit = True
        else:
            hit = _mask_json(node[key], rest) or hit
    return hit


def _children(node: Any) -> Iterable[Any]:
    if isinstance(node, dict):
        return list(node.values())
    if isinstance(node, list):
        return list(node)
    return ()


def _mask_regex(pattern: Any, data: bytes) -> tuple[bytes, bool]:
    if not data:
        return data, False
    spans: list[tuple[int, int]] = []
    for match in pattern.finditer(data):
        if pattern.groups:
            spans.extend(match.span(g) for g in range(1, pattern.groups + 1) if match.start(g) >= 0)
        else:
            spans.append(match.span())
    spans = [s for s in spans if s[1] > s[0]]
    if not spans:
        return data, False
    out = bytearray(data)
    for start, end in spans:
        out[start:end] = b"*" * (end - start)
    return bytes(out), True


# -- Redis -----------------------------------------------------------------------------------------


def _parse_resp_command(data: bytes) -> tuple[list[bytes], bool] | None:
    """A RESP array of bulk strings: (arguments, complete); None when not one."""
    if not data.startswith(b"*"):
        return None
    end = data.find(b"\r\n")
    if end < 0:
        return [], False
    try:
        count = int(data[1:end])
    except ValueError:
        return None
    pos = end + 2
    args: list[bytes] = []
    for _ in range(count):
        end = data.find(b"\r\n", pos)
        if end < 0 or data[pos:pos + 1] != b"$":
            return args, False
        try:
            size = int(data[pos + 1:end])
        except ValueError:
            return None
        pos = end + 2
        if pos + size + 2 > len(data):
            return args, False
        args.append(data[pos:pos + size])
        pos += size + 2
    return args, pos == len(data)


def _resp(args: list[bytes]) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def _redis_secret_indexes(args: list[bytes]) -> tuple[set[int], int | None, str]:
    """Indexes of secret arguments, the first index from which anything may be secret (for cut
    commands), and the rule's name."""
    name = args[0].upper() if args else b""
    upper = [a.upper() for a in args]
    if name == b"AUTH":
        return set(range(1, len(args))), 1, "redis.auth"
    if name == b"HELLO":
        for i, a in enumerate(upper):
            if a == b"AUTH":
                return {i + 1, i + 2}, i + 1, "redis.auth"
        return set(), None, "redis.auth"
    if name == b"MIGRATE":
        for i, a in enumerate(upper):
            if a == b"AUTH":
                return {i + 1}, i + 1, "redis.auth"
            if a == b"AUTH2":
                return {i + 1, i + 2}, i + 1, "redis.auth"
        return set(), None, "redis.auth"
    if name == b"CONFIG" and len(upper) > 1 and upper[1] == b"SET":
        secret = {i + 1 for i in range(2, len(args), 2) if args[i].lower() in _REDIS_SECRET_CONFIG}
        return secret, 2 if secret or len(args) <= 2 else None, "redis.secrets"
    if name == b"ACL" and len(upper) > 1 and upper[1] == b"SETUSER":
        secret = {i for i in range(3, len(args)) if args[i][:1] in (b">", b"<", b"#", b"!")}
        return secret, 3, "redis.secrets"
    return set(), None, ""


def _redis(request: bytes, applied: list[str]) -> bytes:
    parsed = _parse_resp_command(request)
    if parsed is None:
        return _redis_inline(request, applied)
    args, complete = parsed
    if not args:
        return request
    secret, from_index, rule = _redis_secret_indexes(args)
    if complete:
        if not secret:
            return request
        applied.append(rule)
        return _resp([MASK if i in secret else a for i, a in enumerate(args)])
    if from_index is None:
        name = args[0].upper()
        if name not in (b"HELLO", b"MIGRATE", b"CONFIG", b"ACL"):
            return request
        from_index = 1  # cut before the secret could be located: keep the command name only
    # Cut: keep the arguments before the first possibly secret one.
    applied.append(rule or "redis.auth")
    kept = [MASK if i in secret else a for i, a in enumerate(args[:from_index])]
    data = _resp(kept)
    return b"*%d" % int(request[1:request.find(b"\r\n")]) + data[data.find(b"\r\n"):]


def _redis_inline(request: bytes, applied: list[str]) -> bytes:
    line_end = request.find(b"\r\n")
    line = request if line_end < 0 else request[:line_end]
    words = line.split()
    if not words:
        return request
    secret, from_index, rule = _redis_secret_indexes(list(words))
    if not secret and from_index is None:
        return request
    applied.append(rule)
    if line_end < 0:  # cut: drop what may be secret
        return b" ".join(words[:from_index or 1])
    return b" ".join(MASK if i in secret else w for i, w in enumerate(words)) + request[line_end:]


# -- MySQL -----------------------------------------------------------------------------------------


def _packets(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """(sequence id, payload) of whole packets, and the bytes after them (a cut packet)."""
    out = []
    pos = 0
    while pos + 4 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "little")
        if pos + 4 + length > len(data):
            break
        out.append((data[pos + 3], data[pos + 4:pos + 4 + length]))
        pos += 4 + length
    return out, data[pos:]


def _packet(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq & 0xFF]) + payload


def _cstring_end(p: bytes, pos: int) -> int:
    end = p.find(b"\0", pos)
    if end < 0:
        raise ValueError("cut")
    return end + 1


def _lenenc(p: bytes, pos: int) -> tuple[int, int]:
    first = p[pos]
    if first < 0xFB:
        return first, pos + 1
    width = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if width is None or pos + 1 + width > len(p):
        raise ValueError("bad length")
    return int.from_bytes(p[pos + 1:pos + 1 + width], "little"), pos + 1 + width


def _redact_login(p: bytes) -> tuple[bytes, bool]:
    """A handshake response payload without its auth data; (payload, whole) — not whole when cut
    (everything after the user is then dropped)."""
    flags16 = int.from_bytes(p[:2], "little") if len(p) >= 2 else 0
    if flags16 & _CLIENT_PROTOCOL_41:
        if len(p) < 32:
            return p, True  # an SSL request (or cut before the user): no secret in it
        caps = int.from_bytes(p[:4], "little")
        pos = 32
    else:
        caps = flags16
        pos = 5
    try:
        user_end = _cstring_end(p, pos)
    except ValueError:
        return p, False
    try:
        if caps & _CLIENT_PROTOCOL_41 and caps & _CLIENT_PLUGIN_AUTH_LENENC:
            size, start = _lenenc(p, user_end)
            after = start + size
            empty = b"\0"
        elif caps & _CLIENT_PROTOCOL_41 and caps & _CLIENT_SECURE_CONNECTION:
            size = p[user_end]
            after = user_end + 1 + size
            empty = b"\0"
        else:
            after = _cstring_end(p, user_end) if caps & _CLIENT_PROTOCOL_41 else len(p)
            empty = b"\0" if caps & _CLIENT_PROTOCOL_41 else b""
        if after > len(p):
            raise ValueError("cut")
    except (IndexError, ValueError):
        return p[:user_end], False
    return p[:user_end] + empty + p[after:], True


def _redact_change_user(p: bytes) -> tuple[bytes, bool]:
    """COM_CHANGE_USER: 0x11, user, auth (1-byte length + data), database, …"""
    try:
        user_end = _cstring_end(p, 1)
        size = p[user_end]
        after = user_end + 1 + size
        if after > len(p):
            raise ValueError("cut")
    except (IndexError, ValueError):
        return p[:1], False
    return p[:user_end] + b"\0" + p[after:], True


def _mysql(method: str, request: bytes, target: str, applied: list[str]) -> tuple[bytes, str]:
    packets, rest = _packets(request)
    if not packets and not rest:
        return request, target
    out: list[bytes] = []
    if method in ("LOGIN", "CHANGE_USER"):
        redact = _redact_login if method == "LOGIN" else _redact_change_user
        masked = False
        for index, (seq, payload) in enumerate(packets):
            if index == 0:
                new, _ = redact(payload)
                masked = masked or new != payload
                out.append(_packet(seq, new))
            else:
                masked = masked or bool(payload)
                out.append(_packet(seq, b""))  # auth switch responses and other auth data
        if rest:
            masked = True
            if not packets and len(rest) > 4:
                new, _ = redact(rest[4:])
                out.append(rest[:4] + new)  # cut: the stored bytes stay a prefix of a packet
            # a cut packet after the first one is auth data: dropped
        if masked:
            applied.append("mysql.auth")
        return b"".join(out), target
    # Statements: password literals.
    changed = False
    for seq, payload in packets:
        if payload[:1] in (bytes([_COM_QUERY]), bytes([_COM_STMT_PREPARE])):
            new = redact_sql_bytes(payload)
            changed = changed or new != payload
            out.append(_packet(seq, new))
        else:
            out.append(_packet(seq, payload))
    if rest:
        cut = rest[4:]
        new = redact_sql_bytes(cut)
        if new == cut and re.search(rb"(?i)IDENTIFIED|PASSWORD", cut):
            # A cut statement naming a password: drop from the keyword on.
            new = cut[:re.search(rb"(?i)IDENTIFIED|PASSWORD", cut).start()]
        changed = changed or new != cut
        out.append(rest[:4] + new)
    if not changed:
        return request, target
    applied.append("mysql.password")
    target = redact_sql(target)[0]
    return b"".join(out), target


__all__ = ["MASK", "Redactor"]
