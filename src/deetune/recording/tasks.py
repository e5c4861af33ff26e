"""Recording tasks: what to record (:class:`TaskSpec`), and a task's state and counters (:class:`Task`).

A task names a server service (as the topology names it) and optionally a client
service, a protocol and an endpoint filter; it stops after a duration and/or a
count of recorded exchanges; it keeps at most ``limit`` bytes of each message;
it records a deterministic sample of the exchanges it matches (:func:`sampled`).

Its JSON form (``POST /api/recordings``) is flat::

    {"server": "checkout", "client": "frontend", "protocol": "http",
     "method": "POST", "path": "/api/orders/*", "duration": 600, "count": 1000,
     "limit": 65536, "sample": 0.25, "webhook": "http://ci.example/hooks/rec",
     "redact": {"defaults": true, "headers": ["X-Api-Key"], "json": ["**.password"],
                "patterns": ["token=([^&]+)"]}}

Only ``server`` is required.  Unknown fields are refused.  See docs/recording.md.
"""

from __future__ import annotations

import fnmatch
import os
import re
import urllib.parse
from typing import Any

import attrs

from deetune.recording.patterns import PatternError, compile_pattern

#: States: pending (created, not yet picked up by the pipeline), running, then one of the final three.
PENDING, RUNNING, COMPLETED, STOPPED, FAILED = "pending", "running", "completed", "stopped", "failed"
STATES = (PENDING, RUNNING, COMPLETED, STOPPED, FAILED)
ACTIVE_STATES = (PENDING, RUNNING)
FINAL_STATES = (COMPLETED, STOPPED, FAILED)

#: The kernel copies at most this many bytes per syscall (DT_PAYLOAD_MAX).
MAX_LIMIT = 65536
DEFAULT_LIMIT = 64 * 1024
#: A task runs at most 30 days and records at most 10 million exchanges.
MAX_DURATION = 30 * 86400
MAX_COUNT = 10_000_000
#: User redaction rules per kind.
MAX_RULES = 32
HTTP_METHODS = re.compile(r"^[A-Za-z][A-Za-z_-]{0,31}$")
_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
_JSON_PATH = re.compile(r"^(\*\*\.)?[^.\s]+(\.[^.\s]+)*$")
#: Which protocol an endpoint filter implies.
_FILTER_PROTOCOL = {"method": "http", "path": "http", "command": "redis", "statement": "mysql"}


class TaskError(ValueError):
    """A task description that cannot be used (one line, for a 400 or the CLI)."""


@attrs.frozen
class Redaction:
    """Redaction rules of a task (see :mod:`deetune.recording.redact`)."""

    #: The built-in rules: HTTP Authorization/Cookie/Set-Cookie, MySQL authentication, Redis AUTH.
    defaults: bool = True
    #: More HTTP headers whose values are masked (case-insensitive names).
    headers: tuple[str, ...] = ()
    #: JSON body fields masked, by path: ``user.password``; ``*`` is any key or array index at
    #: one level; a leading ``**.`` matches at any depth (``**.token``).
    json: tuple[str, ...] = ()
    #: Regular expressions over the payload bytes: the match (or, with groups, each group) is masked.
    patterns: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"defaults": self.defaults, "headers": list(self.headers), "json": list(self.json),
                "patterns": list(self.patterns)}


@attrs.frozen
class TaskSpec:
    """What a task records (validated: build it with :meth:`from_json`)."""

    server: str
    client: str | None = None
    protocol: str | None = None
    #: HTTP method and path glob (the path without its query; fnmatch: ``*`` crosses ``/``).
    method: str | None = None
    path: str | None = None
    #: Redis command (case-insensitive).
    command: str | None = None
    #: MySQL statement: a regular expression (RE2: linear time; no backreferences or lookaround)
    #: searched in the statement text.
    statement: str | None = None
    #: Stop after this many seconds running and/or this many exchanges recorded.
    duration: float | None = None
    count: int | None = None
    #: Bytes kept per message (request, response); the kernel copies at most 65536 per syscall.
    limit: int = DEFAULT_LIMIT
    #: Fraction of the matching exchanges recorded (a deterministic hash, :func:`sampled`).
    sample: float = 1.0
    #: POSTed the task's status (JSON) when it ends.
    webhook: str | None = None
    redact: Redaction = Redaction()

    @property
    def effective_protocol(self) -> str | None:
        """The protocol given, or the one the endpoint filter implies."""
        if self.protocol:
            return self.protocol
        for name, protocol in _FILTER_PROTOCOL.items():
            if getattr(self, name) is not None:
                return protocol
        return None

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=False)
        data["redact"] = self.redact.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any) -> "TaskSpec":
        """Validate a task description (the API's POST body); raises :class:`TaskError`."""
        if not isinstance(data, dict):
            raise TaskError("a task is a JSON object")
        known = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TaskError(f"unknown field {unknown[0]!r} (a task takes: {', '.join(sorted(known))})")
        values: dict[str, Any] = {}
        server = data.get("server")
        if not isinstance(server, str) or not server.strip() or len(server) > 256:
            raise TaskError("server must be a service name (1 to 256 characters)")
        values["server"] = server
        client = _opt_str(data, "client", 256)
        if client is not None and not client.strip():
            raise TaskError("client must not be empty")
        values["client"] = client
        protocol = _opt_str(data, "protocol", 32)
        if protocol is not None:
            protocol = protocol.lower()
            if not _NAME.match(protocol):
                raise TaskError(f"protocol must be a protocol name (http, redis, mysql …), got {protocol!r}")
        values["protocol"] = protocol
        method = _opt_str(data, "method", 32)
        if method is not None:
            if not HTTP_METHODS.match(method):
                raise TaskError(f"method must be an HTTP method, got {method!r}")
            method = method.upper()
        values["method"] = method
        path = _opt_str(data, "path", 1024)
        if path is not None and not path:
            raise TaskError("path must not be empty")
        values["path"] = path
        command = _opt_str(data, "command", 64)
        if command is not None:
            if not re.match(r"^[A-Za-z][A-Za-z0-9_.|-]{0,63}$", command):
                raise TaskError(f"command must be a Redis command name, got {command!r}")
            command = command.upper()
        values["command"] = command
        statement = _opt_str(data, "statement", 1024)
        if statement is not None:
            try:
                compile_pattern(statement)
            except PatternError as exc:
                raise TaskError(f"statement is not a regular expression: {exc}") from None
        values["statement"] = statement
        implied = {p for n, p in _FILTER_PROTOCOL.items() if values[n] is not None}
        if len(implied) > 1:
            raise TaskError("an endpoint filter is for one protocol: method/path (http), command (redis) "
                            "or statement (mysql)")
        if implied and protocol is not None and protocol not in implied:
            raise TaskError(f"the filter is for {implied.pop()}, not {protocol}")
        duration = data.get("duration")
        if duration is not None:
            if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 < duration <= MAX_DURATION:
                raise TaskError(f"duration must be seconds, more than 0 and at most {MAX_DURATION}")
            duration = float(duration)
        values["duration"] = duration
        values["count"] = _opt_int(data, "count", 1, MAX_COUNT)
        limit = _opt_int(data, "limit", 1, MAX_LIMIT)
        values["limit"] = DEFAULT_LIMIT if limit is None else limit
        sample = data.get("sample", 1.0)
        if isinstance(sample, bool) or not isinstance(sample, (int, float)) or not 0 < sample <= 1:
            raise TaskError("sample must be a ratio, more than 0 and at most 1")
        values["sample"] = float(sample)
        webhook = _opt_str(data, "webhook", 2048)
        if webhook is not None:
            parts = urllib.parse.urlsplit(webhook)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise TaskError(f"webhook must be an http:// or https:// URL, got {webhook!r}")
        values["webhook"] = webhook
        values["redact"] = _redaction(data.get("redact"))
        return cls(**values)


def _opt_str(data: dict[str, Any], name: str, max_len: int) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > max_len or "\0" in value:
        raise TaskError(f"{name} must be a string of at most {max_len} characters")
    return value


def _opt_int(data: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise TaskError(f"{name} must be an integer from {low} to {high}")
    return value


def _redaction(data: Any) -> Redaction:
    if data is None:
        return Redaction()
    if not isinstance(data, dict):
        raise TaskError("redact must be an object: {defaults, headers, json, patterns}")
    unknown = sorted(set(data) - {"defaults", "headers", "json", "patterns"})
    if unknown:
        raise TaskError(f"unknown redaction field {unknown[0]!r} (redact takes: defaults, headers, json, patterns)")
    defaults = data.get("defaults", True)
    if not isinstance(defaults, bool):
        raise TaskError("redact.defaults must be true or false")
    lists = {}
    for name, check, what in (("headers", _HEADER.match, "an HTTP header name"),
                              ("json", _JSON_PATH.match, "a JSON path like user.password or **.token"),
                              ("patterns", _regex_ok, "a regular expression")):
        items = data.get(name, [])
        if not isinstance(items, list) or len(items) > MAX_RULES:
            raise TaskError(f"redact.{name} must be a list of at most {MAX_RULES} strings")
        for item in items:
            if not isinstance(item, str) or not item or len(item) > 512 or not check(item):
                raise TaskError(f"redact.{name}: {item!r} is not {what}")
        lists[name] = tuple(items)
    return Redaction(defaults, lists["headers"], lists["json"], lists["patterns"])


def _regex_ok(pattern: str) -> bool:
    try:
        compiled = compile_pattern(pattern.encode("utf-8"))
    except PatternError:
        return False
    return compiled.search(b"") is None  # a pattern matching nothing at all would mask nothing useful


# -- matching --------------------------------------------------------------------------------------


def path_of(target: str) -> str:
    """An HTTP target without its query (and fragment)."""
    end = len(target)
    for mark in ("?", "#"):
        at = target.find(mark)
        if 0 <= at < end:
            end = at
    return target[:end]


class Matcher:
    """A task's filters, compiled: ``matches(protocol, method, target, client)``."""

    __slots__ = ("client", "protocol", "method", "path", "command", "statement")

    def __init__(self, spec: TaskSpec) -> None:
        self.client = spec.client
        self.protocol = spec.effective_protocol
        self.method = spec.method
        self.path = re.compile(fnmatch.translate(spec.path)) if spec.path is not None else None
        self.command = spec.command
        # RE2: linear in the statement's length, whatever the pattern (deetune.recording.patterns).
        self.statement = compile_pattern(spec.statement) if spec.statement is not None else None

    def matches(self, protocol: str, method: str, target: str, client: str | None) -> bool:
        if self.client is not None and client != self.client:
            return False
        if self.protocol is not None and protocol != self.protocol:
            return False
        if self.method is not None and method.upper() != self.method:
            return False
        if self.path is not None and not self.path.match(path_of(target)):
            return False
        if self.command is not None and method.upper() != self.command:
            return False
        if self.statement is not None and not self.statement.search(target):
            return False
        return True


def sample_point(task_id: str, request: bytes) -> float:
    """Where an exchange falls in [0, 1): a hash of the task id and the request bytes as captured
    (at most the task's limit, before redaction)."""
    import hashlib  # here: importing it loads OpenSSL (~3.5 MB), which an agent that samples nothing never needs

    digest = hashlib.blake2b(request, digest_size=8, key=task_id.encode()[:64]).digest()
    return int.from_bytes(digest, "big") / 2**64


def sampled(task_id: str, request: bytes, ratio: float) -> bool:
    """Whether a task recording ``ratio`` of its exchanges records this one (deterministic)."""
    return ratio >= 1.0 or sample_point(task_id, request) < ratio


def new_task_id() -> str:
    return "rec-" + os.urandom(6).hex()  # what secrets.token_hex(6) does, without its import of OpenSSL


_TASK_ID = re.compile(r"^rec-[0-9a-f]{12}$")


def valid_task_id(text: str) -> bool:
    return bool(_TASK_ID.match(text))


# -- a task's state ----------------------------------------------------------------------------------


@attrs.define
class Task:
    """A task and its progress.  Counters are written by the pipeline thread only."""

    id: str
    spec: TaskSpec
    state: str = PENDING
    created: int = 0
    started: int | None = None
    ended: int | None = None
    #: Exchanges that matched the task (server, client, protocol, filter), counted once each.
    matched: int = 0
    #: Exchanges handed to the store.
    recorded: int = 0
    #: Matched but not recorded: not in the sample, bytes not captured (e.g. a connection
    #: whose start was missed), the store's queue full.
    dropped_sampling: int = 0
    dropped_capture: int = 0
    dropped_queue: int = 0
    #: Payload bytes recorded (requests and responses, after redaction).
    bytes: int = 0
    #: The server ports whose capture the task raised.
    ports: tuple[int, ...] = ()
    error: str | None = None
    #: The webhook's outcome: None (not called yet), "sent: HTTP 200", "failed: …".
    webhook_status: str | None = None
    #: The next exchange's sequence number.
    next_seq: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_sampling + self.dropped_capture + self.dropped_queue

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def deadline(self) -> int | None:
        """Wall-clock ns when the duration ends (None without a duration or before it runs)."""
        if self.spec.duration is None or self.started is None:
            return None
        return self.started + int(self.spec.duration * 1e9)

    def counters(self) -> dict[str, int]:
        return {"matched": self.matched, "recorded": self.recorded, "dropped_sampling": self.dropped_sampling,
                "dropped_capture": self.dropped_capture, "dropped_queue": self.dropped_queue, "bytes": self.bytes}

    def to_json(self) -> dict[str, Any]:
        """The task's status, as the API answers it."""
        return {
            "id": self.id, "state": self.state, "spec": self.spec.to_json(),
            "created": self.created, "started": self.started, "ended": self.ended,
            "matched": self.matched, "recorded": self.recorded, "dropped": self.dropped,
            "dropped_by": {"sampling": self.dropped_sampling, "capture": self.dropped_capture,
                           "queue": self.dropped_queue},
            "bytes": self.bytes, "ports": list(self.ports), "error": self.error,
            "webhook_status": self.webhook_status,
        }


__all__ = [
    "ACTIVE_STATES", "COMPLETED", "DEFAULT_LIMIT", "FAILED", "FINAL_STATES", "MAX_LIMIT", "Matcher", "PENDING",
    "RUNNING", "Redaction", "STATES", "STOPPED", "Task", "TaskError", "TaskSpec", "new_task_id", "path_of",
    "sample_point", "sampled", "valid_task_id",
]
