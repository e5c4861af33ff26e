"""Comparing a recorded response with the replayed one.

Every difference is a :class:`Diff`: where (``path``), what was recorded and
what came back, and for text bodies a unified diff.  Noise rules
(:class:`Rules`) say what is not compared: headers that change on every
response (``Date``, ``ETag`` …), JSON paths (``--ignore-json``) and a numeric
tolerance for JSON numbers.

JSON paths use a JSONPath subset: ``$`` is the document, ``.name`` or
``['name']`` a member, ``[3]`` an array element, ``.*`` / ``[*]`` any member or
element, and ``..name`` a member at any depth.  A path that matches a node
ignores the whole subtree under it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from deetune.replay.mysql import MysqlPart, MysqlResponse
from deetune.replay.protocols import HttpMessage, Resp

#: Response headers not compared unless asked: they differ between any two responses.
DEFAULT_IGNORED_HEADERS: tuple[str, ...] = (
    "Date", "Expires", "Last-Modified", "ETag", "Age", "Set-Cookie", "Keep-Alive",
    "X-Request-Id", "X-Correlation-Id", "Traceparent", "Tracestate", "Server-Timing",
)  # fmt: skip
#: Framing: the body is compared after the chunked coding is removed.
FRAMING_HEADERS = frozenset({"transfer-encoding"})

#: Redis commands whose replies hold elements in no particular order: compared as multisets.
UNORDERED_REDIS = frozenset({"SMEMBERS", "SINTER", "SUNION", "SDIFF", "KEYS", "HKEYS", "HVALS", "SRANDMEMBER"})
#: Redis commands whose replies are flat field/value lists: compared as mappings.
PAIRED_REDIS = frozenset({"HGETALL", "CONFIG"})
#: Redis commands whose reply values describe the moment or the server: only the reply type is compared.
VOLATILE_REDIS = frozenset({"TIME", "INFO", "LASTSAVE", "CLIENT", "HELLO", "MEMORY", "SLOWLOG", "LATENCY",
                            "DEBUG", "RANDOMKEY", "ROLE", "COMMAND", "LOLWUT", "DBSIZE"})  # fmt: skip


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


#: A value that one side does not have (a missing header, member, row …).
ABSENT: Any = _Absent()
_MAX_SHOWN = 200


def show(value: Any) -> str:
    """A value as one short line: JSON where possible."""
    if value is ABSENT:
        return "(absent)"
    if isinstance(value, str) and value.startswith("\x00raw:"):
        text = value[5:]
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 1] + "…"


def _raw(text: str) -> str:
    """Mark a description so :func:`show` prints it without JSON quotes."""
    return "\x00raw:" + text


@attrs.frozen
class Diff:
    """One difference between the recorded and the replayed response."""

    path: str
    recorded: Any = ABSENT
    replayed: Any = ABSENT
    #: Multi-line detail (a unified diff of a text body), or None.
    text: str | None = None

    def lines(self) -> list[str]:
        if self.recorded is ABSENT and self.replayed is ABSENT:
            head = f"{self.path}:"
        else:
            head = f"{self.path}: {show(self.recorded)} → {show(self.replayed)}"
        if self.text is None:
            return [head]
        return [head, *self.text.splitlines()]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path}
        for name in ("recorded", "replayed"):
            value = getattr(self, name)
            if value is not ABSENT:
                out[name] = value[5:] if isinstance(value, str) and value.startswith("\x00raw:") else value
        if self.text is not None:
            out["diff"] = self.text
        return out


# -- JSON paths -------------------------------------------------------------------------------


_NAME = re.compile(r"[^.\[\]]+")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


@attrs.frozen
class JsonPath:
    """A JSONPath subset: ``$``, ``.name``, ``['name']``, ``[N]``, ``.*``, ``[*]``, ``..name``, ``..*``."""

    text: str
    segments: tuple[tuple, ...]

    @classmethod
    def parse(cls, text: str) -> JsonPath:
        if not text.startswith("$"):
            raise ValueError(f"JSON path must start with '$': {text!r}")
        segments: list[tuple] = []
        pos = 1
        while pos < len(text):
            descend = text.startswith("..", pos)
            if descend:
                pos += 2
                if pos < len(text) and text[pos] == "[":
                    selector, pos = cls._bracket(text, pos)
                else:
                    selector, pos = cls._member(text, pos)
                segments.append(("desc", selector))
            elif text[pos] == ".":
                selector, pos = cls._member(text, pos + 1)
                segments.append(selector)
            elif text[pos] == "[":
                selector, pos = cls._bracket(text, pos)
                segments.append(selector)
            else:
                raise ValueError(f"bad JSON path {text!r} at {text[pos:]!r}")
        return cls(text, tuple(segments))

    @staticmethod
    def _member(text: str, pos: int) -> tuple[tuple, int]:
        if text.startswith("*", pos):
            return ("any",), pos + 1
        match = _NAME.match(text, pos)
        if not match:
            raise ValueError(f"bad JSON path {text!r}: a member name is missing at {text[pos:]!r}")
        return ("key", match.group()), match.end()

    @staticmethod
    def _bracket(text: str, pos: int) -> tuple[tuple, int]:
        end = text.find("]", pos)
        if end < 0:
            raise ValueError(f"bad JSON path {text!r}: unclosed '['")
        inner = text[pos + 1 : end].strip()
        if inner == "*":
            return ("any",), end + 1
        if inner.isdigit():
            return ("index", int(inner)), end + 1
        if len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
            return ("key", inner[1:-1]), end + 1
        raise ValueError(f"bad JSON path {text!r}: [{inner}] is not [N], [*] or ['name']")

    def matches(self, path: Sequence[str | int]) -> bool:
        return _match(self.segments, 0, path, 0)


def _select(selector: tuple, key: str | int) -> bool:
    kind = selector[0]
    if kind == "any":
        return True
    if kind == "key":
        return isinstance(key, str) and key == selector[1]
    return isinstance(key, int) and key == selector[1]


def _match(segments: tuple, i: int, path: Sequence[str | int], j: int) -> bool:
    if i == len(segments):
        return j == len(path)
    segment = segments[i]
    if segment[0] == "desc":
        return any(_select(segment[1], path[k]) and _match(segments, i + 1, path, k + 1) for k in range(j, len(path)))
    return j < len(path) and _select(segment, path[j]) and _match(segments, i + 1, path, j + 1)


def format_path(path: Sequence[str | int]) -> str:
    out = ["$"]
    for key in path:
        if isinstance(key, int):
            out.append(f"[{key}]")
        elif _IDENTIFIER.fullmatch(key):
            out.append("." + key)
        else:
            out.append("[" + json.dumps(key, ensure_ascii=False) + "]")
    return "".join(out)


# -- rules ------------------------------------------------------------------------------------


@attrs.frozen
class Rules:
    """What is not compared, and how closely numbers must agree."""

    #: Lower-case names of response headers not compared.
    ignore_headers: frozenset[str] = frozenset(name.lower() for name in DEFAULT_IGNORED_HEADERS)
    ignore_json: tuple[JsonPath, ...] = ()
    #: JSON numbers a and b are equal when math.isclose(a, b, rel_tol=t, abs_tol=t).
    tolerance: float = 0.0
    #: Differences listed per exchange; the rest are counted.
    max_diffs: int = 50

    @classmethod
    def build(cls, ignore_headers: Iterable[str] = (), ignore_json: Iterable[str] = (), tolerance: float = 0.0,
              default_headers: bool = True) -> Rules:
        names = {name.strip().lower() for name in ignore_headers}
        if default_headers:
            names |= {name.lower() for name in DEFAULT_IGNORED_HEADERS}
        return cls(frozenset(names), tuple(JsonPath.parse(p) for p in ignore_json), tolerance)

    def json_ignored(self, path: Sequence[str | int]) -> bool:
        return any(p.matches(path) for p in self.ignore_json)

    def numbers_equal(self, a: float, b: float) -> bool:
        if a == b:
            return True
        if self.tolerance <= 0 or not (math.isfinite(a) and math.isfinite(b)):
            return False
        return math.isclose(a, b, rel_tol=self.tolerance, abs_tol=self.tolerance)


def limit(diffs: list[Diff], rules: Rules) -> list[Diff]:
    if len(diffs) <= rules.max_diffs:
        return diffs
    more = len(diffs) - rules.max_diffs
    return diffs[: rules.max_diffs] + [Diff(f"… {more} more difference{'s' if more > 1 else ''} not shown")]


# -- JSON -------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compare_json(recorded: Any, replayed: Any, rules: Rules, prefix: str = "",
                 path: tuple[str | int, ...] = ()) -> list[Diff]:
    """Differences between two JSON documents, noise rules applied."""
    out: list[Diff] = []
    _compare_json(recorded, replayed, rules, prefix, path, out)
    return out


def _compare_json(a: Any, b: Any, rules: Rules, prefix: str, path: tuple, out: list[Diff]) -> None:
    if rules.ignore_json and rules.json_ignored(path):
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            _compare_json(a.get(key, ABSENT), b.get(key, ABSENT), rules, prefix, path + (key,), out)
        return
    if isinstance(a, list) and isinstance(b, list):
        for index in range(max(len(a), len(b))):
            _compare_json(a[index] if index < len(a) else ABSENT, b[index] if index < len(b) else ABSENT,
                          rules, prefix, path + (index,), out)
        return
    if _is_number(a) and _is_number(b):
        if not rules.numbers_equal(a, b):
            out.append(Diff(prefix + format_path(path), a, b))
        return
    if type(a) is not type(b) or a != b:
        out.append(Diff(prefix + format_path(path), a, b))


# -- HTTP -------------------------------------------------------------------------------------


def _is_json(message: HttpMessage) -> bool:
    content_type = (message.header("content-type") or "").split(";")[0].strip().lower()
    return content_type.endswith(("/json", "+json"))


def _text_of(body: bytes) -> str | None:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ch in text for ch in "\x00\x01\x02\x03\x04\x05\x06\x07\x08\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18"):
        return None
    return text


def _describe_bytes(body: bytes) -> str:
    return _raw(f"{len(body)} bytes, sha256 {hashlib.sha256(body).hexdigest()[:12]}")


def compare_bodies(recorded: bytes, replayed: bytes, path: str = "body") -> list[Diff]:
    """Byte comparison; a unified diff when both are text."""
    if recorded == replayed:
        return []
    text_a, text_b = _text_of(recorded), _text_of(replayed)
    if text_a is not None and text_b is not None:
        lines = list(difflib.unified_diff(text_a.splitlines(), text_b.splitlines(), "recorded", "replayed",
                                          lineterm="", n=2))
        if len(lines) > 60:
            lines = lines[:60] + [f"… {len(lines) - 60} more diff lines"]
        if not lines or all(line.startswith(("---", "+++", "@@")) for line in lines):
            lines = ["(the bodies differ only in line endings or a final newline)"]
        return [Diff(path, _raw(f"{len(recorded)} bytes"), _raw(f"{len(replayed)} bytes"), "\n".join(lines))]
    first = next((i for i, (x, y) in enumerate(zip(recorded, replayed)) if x != y), min(len(recorded), len(replayed)))
    return [Diff(path, _describe_bytes(recorded), _describe_bytes(replayed), f"first difference at byte {first}")]


def compare_http(recorded: HttpMessage, replayed: HttpMessage, rules: Rules, method: str = "GET") -> list[Diff]:
    """Status, headers (minus the ignored ones, names case-insensitive) and body (JSON-aware)."""
    diffs: list[Diff] = []
    if recorded.status != replayed.status:
        diffs.append(Diff("status", recorded.status, replayed.status))
    has_body = not (method == "HEAD" or recorded.status in (204, 304) or (recorded.status or 0) < 200)
    rec_body, rep_body = recorded.decoded_body(), replayed.decoded_body()
    documents = None
    if has_body and recorded.complete and _is_json(recorded) and _is_json(replayed):
        try:
            documents = json.loads(rec_body), json.loads(rep_body)
        except ValueError:
            documents = None
    ignored = rules.ignore_headers | FRAMING_HEADERS
    if documents is not None or not recorded.complete or (not has_body and _is_json(recorded) and _is_json(replayed)):
        # The body is (or, for HEAD, would be) compared for its meaning, or only a prefix of it was
        # recorded: its length is not compared.
        ignored = ignored | {"content-length"}
    if recorded.head_length or recorded.headers:
        diffs += _compare_headers(recorded.headers, replayed.headers, ignored)
    if not has_body:
        return limit(diffs, rules)
    if not recorded.complete:
        shown = rep_body[: len(rec_body)]
        diffs += compare_bodies(rec_body, shown, f"body (first {len(rec_body)} bytes, as recorded)")
    elif documents is not None:
        diffs += compare_json(documents[0], documents[1], rules, prefix="body ")
    else:
        diffs += compare_bodies(rec_body, rep_body)
    return limit(diffs, rules)


def _compare_headers(recorded: list[tuple[str, str]], replayed: list[tuple[str, str]],
                     ignored: frozenset[str] | set[str]) -> list[Diff]:
    names: dict[str, str] = {}
    values_a: dict[str, list[str]] = {}
    values_b: dict[str, list[str]] = {}
    for headers, values in ((recorded, values_a), (replayed, values_b)):
        for name, value in headers:
            key = name.lower()
            if key in ignored:
                continue
            names.setdefault(key, name)
            values.setdefault(key, []).append(value)
    diffs = []
    for key, name in names.items():
        a, b = values_a.get(key), values_b.get(key)
        if a != b:
            diffs.append(Diff(f"header {name}", ABSENT if a is None else ", ".join(a),
                              ABSENT if b is None else ", ".join(b)))
    return diffs


# -- Redis ------------------------------------------------------------------------------------


def describe_resp(value: Resp) -> str:
    kind = value.kind
    if kind in ("array", "set", "push"):
        return f"({kind} of {len(value.value)})"
    if kind == "map":
        return f"(map of {len(value.value) // 2})"
    if kind == "null":
        return "(nil)"
    if kind in ("bulk", "verbatim"):
        return json.dumps(value.value.decode("utf-8", "backslashreplace"), ensure_ascii=False)
    if kind == "simple":
        return "+" + value.value.decode("utf-8", "backslashreplace")
    if kind == "error":
        return "(error) " + value.value.decode("utf-8", "backslashreplace")
    if kind == "boolean":
        return "(boolean) " + ("true" if value.value else "false")
    return f"({kind}) {value.value}"


def _resp_key(value: Resp) -> str:
    return describe_resp(value) if value.kind not in ("array", "set", "map", "push") else repr(value)


def compare_redis(recorded: Resp, replayed: Resp, rules: Rules, command: str = "") -> list[Diff]:
    """Reply type and value, nested; order-insensitive for set-like replies, type only for volatile commands."""
    command = command.upper()
    if command in VOLATILE_REDIS:
        if recorded.kind != replayed.kind:
            return [Diff("reply type", recorded.kind, replayed.kind)]
        return []
    diffs: list[Diff] = []
    _compare_resp(recorded, replayed, "reply", diffs, command)
    return limit(diffs, rules)


def _compare_resp(a: Resp, b: Resp, path: str, out: list[Diff], command: str) -> None:
    if a.kind != b.kind:
        out.append(Diff(path, _raw(describe_resp(a)), _raw(describe_resp(b))))
        return
    if a.kind == "map" or (command in PAIRED_REDIS and path == "reply" and a.kind == "array"):
        pairs_a = {_resp_key(k): v for k, v in zip(a.value[::2], a.value[1::2])}
        pairs_b = {_resp_key(k): v for k, v in zip(b.value[::2], b.value[1::2])}
        for key in list(pairs_a) + [k for k in pairs_b if k not in pairs_a]:
            item_path = f"{path}[{key}]"
            if key not in pairs_a:
                out.append(Diff(item_path, ABSENT, _raw(describe_resp(pairs_b[key]))))
            elif key not in pairs_b:
                out.append(Diff(item_path, _raw(describe_resp(pairs_a[key])), ABSENT))
            else:
                _compare_resp(pairs_a[key], pairs_b[key], item_path, out, command)
        return
    if isinstance(a.value, list):
        items_a, items_b = a.value, b.value
        if a.kind == "set" or (command in UNORDERED_REDIS and path == "reply"):
            items_a = sorted(items_a, key=_resp_key)
            items_b = sorted(items_b, key=_resp_key)
            missing = _multiset_minus(items_a, items_b)
            extra = _multiset_minus(items_b, items_a)
            if missing or extra:
                out.append(Diff(path + " (unordered)", _raw(describe_resp(a)), _raw(describe_resp(b)),
                                "\n".join([*(f"- {describe_resp(v)}" for v in missing),
                                           *(f"+ {describe_resp(v)}" for v in extra)])))
            return
        if len(items_a) != len(items_b):
            out.append(Diff(path, _raw(describe_resp(a)), _raw(describe_resp(b))))
        for index in range(max(len(items_a), len(items_b))):
            item_path = f"{path}[{index}]"
            if index >= len(items_a):
                out.append(Diff(item_path, ABSENT, _raw(describe_resp(items_b[index]))))
            elif index >= len(items_b):
                out.append(Diff(item_path, _raw(describe_resp(items_a[index])), ABSENT))
            else:
                _compare_resp(items_a[index], items_b[index], item_path, out, command)
        return
    if a.value != b.value:
        out.append(Diff(path, _raw(describe_resp(a)), _raw(describe_resp(b))))


def _multiset_minus(a: list[Resp], b: list[Resp]) -> list[Resp]:
    left = list(b)
    out = []
    for item in a:
        if item in left:
            left.remove(item)
        else:
            out.append(item)
    return out


# -- MySQL ------------------------------------------------------------------------------------


def describe_mysql(part: MysqlPart) -> str:
    if part.kind == "ok":
        return f"OK, {part.affected_rows} affected rows"
    if part.kind == "err":
        state = f" ({part.sql_state})" if part.sql_state else ""
        return f"ERR {part.error_code}{state}: {part.message}"
    if part.kind == "rows":
        return f"result set: {len(part.columns)} columns, {len(part.rows)} rows"
    if part.kind == "prepare":
        return f"prepared: {part.params} parameters, {part.column_count} columns"
    if part.kind == "columns":
        return f"{len(part.columns)} column definitions"
    return part.kind


def compare_mysql(recorded: MysqlResponse, replayed: MysqlResponse, rules: Rules) -> list[Diff]:
    """OK/ERR and error code, affected rows, column count and names, row count and row data."""
    diffs: list[Diff] = []
    rec_parts, rep_parts = recorded.parts, replayed.parts
    if recorded.complete and len(rec_parts) != len(rep_parts):
        diffs.append(Diff("results", len(rec_parts), len(rep_parts)))
    for index, (a, b) in enumerate(zip(rec_parts, rep_parts)):
        prefix = f"result[{index}] " if len(rec_parts) > 1 or len(rep_parts) > 1 else ""
        complete = recorded.complete or index < len(rec_parts) - 1
        _compare_part(a, b, prefix, complete, diffs)
    return limit(diffs, rules)


def _compare_part(a: MysqlPart, b: MysqlPart, prefix: str, complete: bool, out: list[Diff]) -> None:
    if a.kind != b.kind:
        out.append(Diff(prefix + "status", _raw(describe_mysql(a)), _raw(describe_mysql(b))))
        return
    if a.kind == "ok" and a.affected_rows != b.affected_rows:
        out.append(Diff(prefix + "affected_rows", a.affected_rows, b.affected_rows))
    elif a.kind == "err":
        if a.error_code != b.error_code:
            out.append(Diff(prefix + "error", _raw(describe_mysql(a)), _raw(describe_mysql(b))))
        elif a.sql_state != b.sql_state:
            out.append(Diff(prefix + "sql_state", a.sql_state, b.sql_state))
    elif a.kind == "prepare":
        if a.params != b.params:
            out.append(Diff(prefix + "parameters", a.params, b.params))
        if a.column_count != b.column_count:
            out.append(Diff(prefix + "columns", a.column_count, b.column_count))
    elif a.kind in ("rows", "columns"):
        names_a = [c.name for c in a.columns]
        names_b = [c.name for c in b.columns]
        if len(names_a) != len(names_b):
            out.append(Diff(prefix + "column count", len(names_a), len(names_b)))
        if names_a != names_b:
            out.append(Diff(prefix + "column names", names_a, names_b))
        if a.kind == "columns":
            return
        if complete and len(a.rows) != len(b.rows):
            out.append(Diff(prefix + "row count", len(a.rows), len(b.rows)))
        for r in range(len(a.rows) if not complete else max(len(a.rows), len(b.rows))):
            row_a = a.rows[r] if r < len(a.rows) else ABSENT
            row_b = b.rows[r] if r < len(b.rows) else ABSENT
            if row_a is ABSENT or row_b is ABSENT:
                out.append(Diff(f"{prefix}rows[{r}]", row_a, row_b))
                continue
            for c in range(max(len(row_a), len(row_b))):
                x = row_a[c] if c < len(row_a) else ABSENT
                y = row_b[c] if c < len(row_b) else ABSENT
                if x != y:
                    name = names_a[c] if c < len(names_a) else str(c)
                    column = f".{name}" if _IDENTIFIER.fullmatch(name) else f"[{json.dumps(name)}]"
                    out.append(Diff(f"{prefix}rows[{r}]{column}", x, y))
