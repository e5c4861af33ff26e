"""The agent's HTTP API and web UI: a WSGI application served by waitress.

::

    server = ApiServer(store, port=8080)      # store: anything implementing TopologyQueries
    server.start()                            # serves from background threads
    print(server.url, server.token)           # http://127.0.0.1:8080, the bearer token
    server.stop()

Rules (docs/api.md):

- **A token always.**  Without one given, the server makes its own (:attr:`ApiServer.token`).
  ``/api/exchanges`` and ``/api/recordings…`` (payload content, and what changes state) need
  ``Authorization: Bearer <token>`` (401 otherwise).  The topology reads (``/api/topology``,
  ``/api/services…``, ``/api/edges``: names and counters) go without it when the server is bound
  to loopback (``open_reads``, on by default there), and need it elsewhere.  ``/``,
  ``/static/*``, ``/openapi.json`` and ``/healthz`` hold no data and stay public.  Binding
  beyond loopback needs a token given explicitly (:class:`ValueError` otherwise).
- **The Host header names this server**: its bound address, ``localhost`` on loopback, the
  host's own names and IP literals when bound to every address, and ``allowed_hosts``; any other
  name is refused (403) before anything else, so a web page cannot reach the API by DNS
  rebinding.  A request without a Host header (HTTP/1.0) passes.
- **Bounded**: ``threads`` workers (default 4) answer requests; waitress reads and writes on
  one I/O thread, so slow clients hold no worker; at most ``connection_limit`` connections are
  open (then new ones wait in the listen backlog of ``backlog``); a connection idle for
  ``channel_timeout`` seconds is closed; request heads are at most 64 KiB, bodies 64 KiB.
- every error is JSON ``{"error": "one line"}``: 400 bad parameters (numbers of more than 19
  digits, JSON bodies nested more than 64 deep or with numbers of more than 30 digits), 401,
  403, 404, 405, 413, 415, and 500 when the store fails (logged with its traceback here; the
  client gets no internal text);
- recording tasks (``/api/recordings``, given a
  :class:`~deetune.recording.recorder.RecordingManager`) also take ``POST`` and ``DELETE``;
  those need a JSON body where they take one, and are refused (403) when a browser sends
  them from another origin.

Endpoints and parameters: :mod:`deetune.api.openapi` and docs/api.md.
"""

from __future__ import annotations

import base64
import datetime
import hmac
import ipaddress
import json
import logging
import os
import pathlib
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, Iterable, Iterator, Self

from deetune import __version__
from deetune.api import DEFAULT_API_HOST, DEFAULT_API_PORT  # noqa: F401 (the agent's and recording CLI's default)
from deetune.topology.model import TopologyQueries

log = logging.getLogger("deetune.api")

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
STATIC_DIR = pathlib.Path(__file__).resolve().parent / "static"

NS_PER_S = 1_000_000_000
_UNITS_NS = {"s": NS_PER_S, "m": 60 * NS_PER_S, "h": 3600 * NS_PER_S, "d": 86400 * NS_PER_S}
DEFAULT_WINDOW = "15m"
#: Times are signed 64-bit ns (what SQLite and the kernel hold).
MAX_TIME_NS = 2**63 - 1
MAX_DEPTH = 10
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
DIRECTIONS = ("downstream", "upstream", "both")
#: Largest request body read (a recording task's description), and request head.
MAX_BODY = 64 * 1024
MAX_HEAD = 64 * 1024
#: A JSON body nested deeper, or with a number of more digits, is refused (400).
MAX_JSON_DEPTH = 64
MAX_JSON_DIGITS = 30
#: Query parameters that are integers: at most this many digits (int64 has 19).
MAX_PARAM_DIGITS = 19
#: Paths whose answers hold payload content or change state: a token always.
PAYLOAD_PATHS = ("/api/exchanges", "/api/recordings")
#: Exchanges per request of a streamed export (jsonl, har) at most; a page of JSON at most MAX_LIMIT.
MAX_EXPORT = 10_000_000
EXPORT_FORMATS = ("json", "jsonl", "har")

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
#: The UI loads nothing from elsewhere.  The one inline style is the rule cytoscape injects
#: (``.__________cytoscape_container { position: relative; }``), allowed by its hash.
_CYTOSCAPE_STYLE_HASH = "'sha256-pgvDUBa4IjFA2yuSJ2cqcyxmNYJMborsd0ORcRv9vw8='"
_CSP = (f"default-src 'self'; img-src 'self' data:; style-src 'self' {_CYTOSCAPE_STYLE_HASH}; "
        "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")
#: Up to 4 digits: at most 9999d (27 years), so ``until - window`` stays within int64.
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})([smhd])$")
_FRACTION = re.compile(r"(\.[0-9]{6})[0-9]+")


class HttpError(Exception):
    """An error answered to the client as ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


def _bad(message: str) -> HttpError:
    return HttpError(HTTPStatus.BAD_REQUEST, message)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def parse_window(text: str, name: str = "window") -> int:
    """``30s``, ``5m``, ``1h``, ``1d`` (1 to 4 digits) → nanoseconds."""
    match = _WINDOW.match(text)
    if not match:
        raise _bad(f"{name} must be 1 to 4 digits followed by s, m, h or d (e.g. 5m), got {text!r}")
    return int(match.group(1)) * _UNITS_NS[match.group(2)]


def parse_time(text: str, name: str) -> int:
    """Integer nanoseconds since the epoch, or an RFC 3339 time with its UTC offset."""
    if text.isascii() and text.isdigit():
        if len(text.lstrip("0")) > MAX_PARAM_DIGITS:
            raise _bad(f"{name} is out of range: {_one_line(text, 40)!r}")
        value = int(text)
        if value > MAX_TIME_NS:
            raise _bad(f"{name} is out of range: {text!r}")
        return value
    try:
        # RFC 3339 allows t/z in lower case and any number of fraction digits.
        moment = datetime.datetime.fromisoformat(_FRACTION.sub(r"\1", text.upper()))
    except ValueError:
        raise _bad(f"{name} must be nanoseconds since the epoch or an RFC 3339 time, got {text!r}") from None
    if moment.tzinfo is None:
        raise _bad(f"{name} needs a UTC offset (e.g. 2025-01-31T12:00:00Z), got {text!r}")
    delta = moment - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    value = (delta.days * 86400 + delta.seconds) * NS_PER_S + delta.microseconds * 1000
    if not 0 <= value <= MAX_TIME_NS:
        raise _bad(f"{name} is out of range: {text!r}")
    return value


def _parse_int(text: str, name: str, low: int, high: int) -> int:
    if (not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > MAX_PARAM_DIGITS
            or not low <= int(text) <= high):
        raise _bad(f"{name} must be an integer from {low} to {high}, got {_one_line(text, 40)!r}")
    return int(text)


def _json_depth(data: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings not counted)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-").lstrip("0")) > MAX_JSON_DIGITS:
        raise _bad(f"the body has a number of more than {MAX_JSON_DIGITS} digits")
    return int(text)


def _bounded_float(text: str) -> float:
    if len(text) > 2 * MAX_JSON_DIGITS:
        raise _bad(f"the body has a number of more than {MAX_JSON_DIGITS} digits")
    return float(text)


def _no_constant(name: str) -> Any:
    raise _bad(f"the body is not JSON: {name} is not a JSON value")


def parse_json_body(body: bytes | None) -> Any:
    """A request's JSON body, or a 400 HttpError (not JSON, nested too deep, numbers too long)."""
    data = body or b"null"
    if _json_depth(data) > MAX_JSON_DEPTH:
        raise _bad(f"the body nests arrays and objects more than {MAX_JSON_DEPTH} deep")
    try:
        return json.loads(data, parse_int=_bounded_int, parse_float=_bounded_float, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the body is not JSON: {exc}") from None


def _parse_bool(text: str, name: str) -> bool:
    value = {"true": True, "1": True, "false": False, "0": False}.get(text.lower())
    if value is None:
        raise _bad(f"{name} must be true or false, got {text!r}")
    return value


class _Params:
    """Query parameters: only the ones an endpoint knows, each at most once."""

    def __init__(self, query: str, allowed: tuple[str, ...]) -> None:
        try:
            pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, max_num_fields=32)
        except ValueError:
            raise _bad("too many query parameters") from None
        self.values: dict[str, str] = {}
        for key, value in pairs:
            if key not in allowed:
                known = ", ".join(allowed) if allowed else "none"
                raise _bad(f"unknown parameter {key!r} (this endpoint takes: {known})")
            if key in self.values:
                raise _bad(f"parameter {key!r} given more than once")
            self.values[key] = value

    def get(self, name: str, default: str | None = None) -> str | None:
        """The value as given (an empty value is not a missing one), else ``default``."""
        return self.values.get(name, default)

    def service(self) -> str | None:
        value = self.values.get("service")
        if value is not None and not value.strip():
            raise _bad("service must not be empty")
        return value

    def time_range(self, now_ns: int) -> tuple[int, int]:
        """``until`` (default now); ``since``, or ``until - window`` (default 15 minutes)."""
        until = parse_time(self.values["until"], "until") if "until" in self.values else now_ns
        if "since" in self.values and "window" in self.values:
            raise _bad("give since or window, not both")
        if "since" in self.values:
            since = parse_time(self.values["since"], "since")
        else:
            since = max(0, until - parse_window(self.values.get("window", DEFAULT_WINDOW)))
        if since >= until:
            raise _bad("since must be before until")
        return since, until


_TIME_PARAMS = ("since", "until", "window")


class Stream:
    """An answer streamed to the client (no Content-Length; the connection closes after it)."""

    def __init__(self, content_type: str, chunks: Iterator[bytes], status: int = HTTPStatus.OK,
                 headers: dict[str, str] | None = None) -> None:
        self.content_type = content_type
        self.chunks = chunks
        self.status = status
        self.headers = headers or {}


class Created:
    """A 201 answer with its JSON and the new resource's address."""

    def __init__(self, data: Any, location: str) -> None:
        self.data = data
        self.location = location


def _methods_text(methods: tuple[str, ...]) -> str:
    return methods[0] if len(methods) == 1 else ", ".join(methods[:-1]) + " and " + methods[-1]


def new_token() -> str:
    """A random bearer token: 32 bytes, URL-safe base64 (43 characters)."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _host_name(header: str) -> tuple[str, int | None] | None:
    """(name in lower case, port or None) of a Host header; None when malformed."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        if end < 0:
            return None
        name, rest = header[1:end], header[end + 1:]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text = header.partition(":")
        if not sep:
            port_text = None
    if port_text is not None and not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        return None
    return name.rstrip("."), int(port_text) if port_text is not None else None


class ApiServer:
    """Serves ``queries`` over HTTP from background threads (see the module doc)."""

    def __init__(
        self,
        queries: TopologyQueries,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        clock: Callable[[], int] = time.time_ns,
        recordings: Any = None,
        open_reads: bool | None = None,
        allowed_hosts: Iterable[str] = (),
        health: Callable[[], dict[str, Any]] | None = None,
        threads: int = 4,
        connection_limit: int = 100,
        backlog: int = 128,
        channel_timeout: float = 30.0,
        extensions: Any = (),
        nice: int | None = None,
    ) -> None:
        if token is not None and (not token or not token.isascii() or not token.isprintable() or " " in token):
            raise ValueError("the API token must be non-empty printable ASCII without spaces")
        loopback = _is_loopback(host)
        if token is None and not loopback:
            raise ValueError(
                f"binding the API to {host!r} needs a bearer token (only 127.0.0.1, ::1 and localhost go without)"
            )
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"not a TCP port: {port!r}")
        self.queries = queries
        self.host = host
        self.port = port
        #: The bearer token (made here when none was given).
        self.token = token if token is not None else new_token()
        #: Topology reads without the token (only ever on loopback).
        self.open_reads = loopback if open_reads is None else bool(open_reads and loopback)
        self.allowed_hosts = {h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()}
        self.clock = clock
        #: The recording tasks' manager (deetune.recording.recorder.RecordingManager), or None.
        self.recordings = recordings
        #: More to say in /healthz ({"status": "degraded", …} when the store cannot write).
        self.health = health
        self.threads = threads
        self.connection_limit = connection_limit
        self.backlog = backlog
        self.channel_timeout = channel_timeout
        #: The nice value of the server's threads (None: the one they inherit).  The agent lowers
        #: its own priority (--nice); its API keeps the one the agent started with, see _set_nice.
        self.nice = nice
        #: More /api/* endpoints (deetune.api.routes): RED over time, hosts; the fleet server's.
        from deetune.api.routes import SharedRoutes

        self.extensions = [*extensions, SharedRoutes(queries)]
        self._socket: socket.socket | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._names: frozenset[str] = frozenset()

    # -- lifecycle ---------------------------------------------------------------------

    def bind(self) -> Self:
        """Open the listening socket (an OSError with a one-line message when it cannot)."""
        if self._socket is not None:
            return self
        try:
            info = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM,
                                      flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as exc:
            raise ValueError(f"cannot resolve {self.host!r}: {exc.strerror}") from None
        family, _, _, _, address = info
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and self.host == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
            sock.listen(self.backlog)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {self.host} port {self.port}: {exc.strerror}") from None
        self._socket = sock
        self._names = self._own_names()
        return self

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("the API server is already started")
        self.bind()
        from waitress.server import create_server

        # Requests waiting for one of the workers are the bound at work, not a problem to warn of
        # (waitress warns of every one).
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)

        self._stopping = False
        self._server = create_server(
            _App(self), sockets=[self._socket], _dispatcher=_dispatcher(self.nice, self.threads), threads=self.threads,
            connection_limit=self.connection_limit,
            backlog=self.backlog, channel_timeout=self.channel_timeout, cleanup_interval=min(10, self.channel_timeout),
            max_request_header_size=MAX_HEAD, max_request_body_size=MAX_BODY, asyncore_use_poll=True,
            ident=f"deetune/{__version__}", expose_tracebacks=False, clear_untrusted_proxy_headers=True,
        )
        self._server.channel_class = _channel()
        self._thread = threading.Thread(target=self._loop, name="deetune-api", daemon=True)
        self._thread.start()
        log.info("API and UI on %s", self.url)
        return self

    def _loop(self) -> None:
        from waitress import wasyncore

        _set_nice(self.nice)
        server = self._server
        while not self._stopping:
            try:
                wasyncore.loop(timeout=0.2, map=server._map, use_poll=True, count=1)
            except Exception:  # one connection's failure must not end the loop
                log.exception("API I/O loop")

    def stop(self) -> None:
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = self._socket = None
        if server is None:
            if sock is not None:
                sock.close()
            return
        self._stopping = True
        server.pull_trigger()
        if thread is not None:
            thread.join(timeout=5)
        # The loop has stopped: its connections and the listening socket are ours to close.
        for channel in list(server._map.values()):
            try:
                channel.close()
            except OSError:
                pass
        server.task_dispatcher.shutdown(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the port is the real one when 0 was asked."""
        if self._socket is None or self._server is None:
            raise RuntimeError("the API server is not started")
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # -- requests ----------------------------------------------------------------------

    def _own_names(self) -> frozenset[str]:
        """Host names (lower case) that mean this server."""
        host = self.host.lower()
        names = {host, *self.allowed_hosts}
        if _is_loopback(host):
            names |= {"localhost", "127.0.0.1", "::1"}
        if _is_wildcard(host):
            names |= {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
        return frozenset(n.rstrip(".") for n in names if n)

    def host_allowed(self, header: str | None) -> bool:
        """Whether a Host header names this server (see the module doc)."""
        if header is None:
            return True
        parsed = _host_name(header)
        if parsed is None:
            return False
        name, port = parsed
        if name in self.allowed_hosts:
            return True  # a proxy's name: any port
        if port is not None and self._socket is not None and port != self._socket.getsockname()[1]:
            return False
        if name in self._names:
            return True
        if _is_wildcard(self.host):
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode("utf-8", "replace"), self.token.encode("ascii"))

    def needs_token(self, path: str) -> bool:
        """Whether a path under /api needs the token (see the module doc)."""
        if not self.open_reads:
            return True
        return any(path == p or path.startswith(p + "/") for p in PAYLOAD_PATHS) or path.rstrip("/") == "/api"

    def health_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"status": "ok", "version": __version__}
        if self.health is not None:
            extra = self.health()
            status.update(extra)
            if extra.get("status") not in (None, "ok"):
                status["status"] = extra["status"]
        return status

    def handle_api(self, path: str, query: str) -> Any:
        """The JSON for an /api/* path, or raises HttpError."""
        parts = [urllib.parse.unquote(p) for p in path.split("/")[2:]]  # after "", "api"
        q = self.queries
        if parts == ["topology"]:
            params = _Params(query, (*_TIME_PARAMS, "service"))
            since, until = params.time_range(self.clock())
            return q.graph(since, until, params.service())
        if parts == ["services"]:
            params = _Params(query, _TIME_PARAMS)
            since, until = params.time_range(self.clock())
            return {"since": since, "until": until, "services": q.services(since, until)}
        if len(parts) == 2 and parts[0] == "services" and parts[1]:
            params = _Params(query, _TIME_PARAMS)
            since, until = params.time_range(self.clock())
            return self._service(parts[1], since, until)
        if len(parts) == 3 and parts[0] == "services" and parts[1] and parts[2] == "dependencies":
            params = _Params(query, (*_TIME_PARAMS, "depth", "direction"))
            since, until = params.time_range(self.clock())
            depth = _parse_int(params.get("depth", "1") or "", "depth", 1, MAX_DEPTH)
            direction = params.get("direction", "downstream")
            if direction not in DIRECTIONS:
                raise _bad(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
            self._service(parts[1], since, until)  # 404 when unknown
            return q.dependencies(parts[1], depth, direction, since, until)
        if parts == ["edges"]:
            params = _Params(query, (*_TIME_PARAMS, "errors", "service"))
            since, until = params.time_range(self.clock())
            errors = _parse_bool(params.get("errors", "false") or "", "errors")
            edges = q.edges(since, until, errors_only=errors, service=params.service())
            return {"since": since, "until": until, "edges": edges}
        if parts == ["exchanges"]:
            params = _Params(query, ("since", "window", "service", "limit"))
            limit = _parse_int(params.get("limit", str(DEFAULT_LIMIT)) or "", "limit", 1, MAX_LIMIT)
            since = None
            if params.get("since") is not None and params.get("window") is not None:
                raise _bad("give since or window, not both")
            if params.get("since") is not None:
                since = parse_time(params.get("since") or "", "since")
            elif params.get("window") is not None:
                since = max(0, self.clock() - parse_window(params.get("window") or ""))
            return {"exchanges": q.exchanges(service=params.service(), limit=limit, since=since)}
        for extension in self.extensions:
            answer = extension.handle_api(parts, query, self.clock())
            if answer is not None:
                return answer
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")

    # -- recording tasks ---------------------------------------------------------------------

    @staticmethod
    def recording_methods(path: str) -> tuple[str, ...] | None:
        """The methods a /api/recordings path takes; None when the path is not one of them."""
        parts = path.split("/")[3:]  # after "", "api", "recordings"
        if path.split("/")[:3] != ["", "api", "recordings"]:
            return None
        if parts in ([], [""]):
            return ("GET", "HEAD", "POST")
        if len(parts) == 1 and parts[0]:
            return ("GET", "HEAD", "DELETE")
        if len(parts) == 2 and parts[0] and parts[1] == "stop":
            return ("POST",)
        if len(parts) == 2 and parts[0] and parts[1] == "exchanges":
            return ("GET", "HEAD")
        return None

    def handle_recordings(self, method: str, path: str, query: str, body: bytes | None) -> Any:
        """The answer (JSON data, :class:`Created` or :class:`Stream`) for a /api/recordings request."""
        from deetune.recording.recorder import RecordingUnavailable, TaskConflict, TaskNotFound
        from deetune.recording.tasks import TaskError, valid_task_id

        manager = self.recordings
        if manager is None:
            raise HttpError(HTTPStatus.NOT_FOUND,
                            "recording is not available: the agent runs without the payload probe or the store")
        parts = [urllib.parse.unquote(p) for p in path.split("/")[3:]]
        if parts == [""]:
            parts = []
        if parts:
            task_id = parts[0]
            if not valid_task_id(task_id):
                raise HttpError(HTTPStatus.NOT_FOUND, f"no recording task {task_id!r}")
        try:
            if not parts:
                if method == "POST":
                    _Params(query, ())
                    data = parse_json_body(body)
                    status = manager.create(data)
                    return Created(status, f"/api/recordings/{status['id']}")
                _Params(query, ())
                return {"recordings": manager.list()}
            if len(parts) == 1:
                _Params(query, ())
                if method == "DELETE":
                    manager.delete(task_id)
                    return {"deleted": task_id}
                return manager.status(task_id)
            if parts[1] == "stop":
                _Params(query, ())
                return manager.stop_task(task_id)
            return self._recorded_exchanges(manager, task_id, query)
        except TaskError as exc:
            raise _bad(str(exc)) from None
        except TaskNotFound:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no recording task {task_id!r}") from None
        except TaskConflict as exc:
            raise HttpError(HTTPStatus.CONFLICT, str(exc)) from None
        except RecordingUnavailable as exc:
            raise HttpError(HTTPStatus.NOT_FOUND, str(exc)) from None

    def _recorded_exchanges(self, manager: Any, task_id: str, query: str) -> Any:
        from deetune.recording import export

        params = _Params(query, ("format", "limit", "offset"))
        fmt = params.get("format", "json")
        if fmt not in EXPORT_FORMATS:
            raise _bad(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        offset = _parse_int(params.get("offset", "0") or "", "offset", 0, MAX_TIME_NS)
        task = manager.get(task_id)
        if fmt == "json":
            limit = _parse_int(params.get("limit", str(DEFAULT_LIMIT)) or "", "limit", 1, MAX_LIMIT)
            total = manager.count_exchanges(task_id)
            exchanges = [x.to_json() for x in manager.exchanges(task_id, limit=limit, offset=offset)]
            return {"task": task_id, "state": task.state, "total": total, "offset": offset, "limit": limit,
                    "exchanges": exchanges}
        limit = None
        if params.get("limit") is not None:
            limit = _parse_int(params.get("limit") or "", "limit", 1, MAX_EXPORT)
        if fmt == "jsonl":
            return Stream("application/x-ndjson",
                          export.jsonl_lines(manager.exchanges(task_id, limit=limit, offset=offset)))
        protocol = task.spec.effective_protocol
        if protocol not in (None, "http"):
            raise _bad(f"HAR is for HTTP exchanges; task {task_id} records {protocol}")
        exchanges = manager.exchanges(task_id, limit=limit, offset=offset, protocol="http")
        document = export.har_document(exchanges, comment=f"deetune recording task {task_id} ({task.spec.server})")
        return Stream("application/json", iter([json.dumps(document, ensure_ascii=False).encode("utf-8")]),
                      headers={"Content-Disposition": f'attachment; filename="{task_id}.har"'})

    def _service(self, name: str, since: int, until: int) -> dict[str, Any]:
        for entry in self.queries.services(since, until):
            if entry.get("name") == name:
                return entry
        raise HttpError(HTTPStatus.NOT_FOUND, f"no service {name!r} seen in the time range")


# -- the WSGI application -------------------------------------------------------------------------

_JSON_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store"),
                 ("X-Content-Type-Options", "nosniff")]


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Error"


def _json_body(data: Any) -> bytes:
    return json.dumps(data, allow_nan=False).encode("utf-8")


def _error_body(message: str) -> bytes:
    return _json_body({"error": _one_line(message)})


class _App:
    """The WSGI application: one call per request, on one of waitress's worker threads."""

    def __init__(self, api: ApiServer) -> None:
        self.api = api

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        # The raw target: PATH_INFO comes percent-decoded, and a name may hold an encoded "/".
        split = urllib.parse.urlsplit(environ.get("REQUEST_URI") or environ.get("PATH_INFO") or "/")
        path = split.path or "/"
        try:
            return self._dispatch(environ, start_response, method, path, split.query)
        except HttpError as exc:
            return self._error(start_response, exc.status, exc.message, exc_headers(exc))
        except Exception:
            log.exception("%s %s failed", method, path)
            return self._error(start_response, HTTPStatus.INTERNAL_SERVER_ERROR,
                               "internal error: the request failed (the agent's log says why)")

    @staticmethod
    def _error(start_response: Callable, status: int, message: str,
               headers: list[tuple[str, str]] | None = None) -> list[bytes]:
        body = _error_body(message)
        start_response(_status_line(status), [*_JSON_HEADERS, ("Content-Length", str(len(body))), *(headers or [])])
        return [body]

    @staticmethod
    def _json(start_response: Callable, status: int, data: Any, headers: list[tuple[str, str]] | None = None
              ) -> list[bytes]:
        body = _json_body(data)
        start_response(_status_line(status), [*_JSON_HEADERS, ("Content-Length", str(len(body))), *(headers or [])])
        return [body]

    def _dispatch(self, environ: dict[str, Any], start_response: Callable, method: str, path: str,
                  query: str) -> Iterable[bytes]:
        api = self.api
        if not api.host_allowed(environ.get("HTTP_HOST")):
            raise HttpError(HTTPStatus.FORBIDDEN,
                            f"Host {environ.get('HTTP_HOST')!r} does not name this server (see --api-hostname)")
        recording = ApiServer.recording_methods(path)
        if method not in ("GET", "HEAD") and (recording is None or method not in recording):
            methods = recording or ("GET", "HEAD")
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED,
                            f"method {method} not allowed ({_methods_text(methods)} only)",
                            [("Allow", ", ".join(methods))])
        if path == "/api" or path.startswith("/api/"):
            if api.needs_token(path) and not api.authorized(environ.get("HTTP_AUTHORIZATION")):
                raise HttpError(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token",
                                [("WWW-Authenticate", 'Bearer realm="deetune"')])
            if recording is not None:
                return self._recording(environ, start_response, method, recording, path, query)
            return self._json(start_response, HTTPStatus.OK, api.handle_api(path, query))
        if path == "/healthz":
            return self._json(start_response, HTTPStatus.OK, api.health_status())
        if path == "/openapi.json":
            from deetune.api.openapi import openapi_document

            return self._json(start_response, HTTPStatus.OK, openapi_document())
        if path in ("/", "/index.html"):
            return self._static(start_response, "index.html")
        if path.startswith("/static/"):
            return self._static(start_response, urllib.parse.unquote(path[len("/static/"):]))
        raise HttpError(HTTPStatus.NOT_FOUND, f"not found: {path}")

    def _recording(self, environ: dict[str, Any], start_response: Callable, method: str,
                   methods: tuple[str, ...], path: str, query: str) -> Iterable[bytes]:
        if method not in methods:
            raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"method {method} not allowed ({_methods_text(methods)} only)",
                            [("Allow", ", ".join(methods))])
        body = None
        if method in ("POST", "DELETE"):
            origin = environ.get("HTTP_ORIGIN")
            if origin is not None and urllib.parse.urlsplit(origin).netloc != environ.get("HTTP_HOST"):
                raise HttpError(HTTPStatus.FORBIDDEN, f"cross-origin {method} refused (Origin {_one_line(origin, 100)})")
            body = environ["wsgi.input"].read(MAX_BODY + 1)
            if body and method == "POST" and path.rstrip("/") == "/api/recordings":  # a task: JSON only
                content_type = (environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
                if content_type != "application/json":
                    raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the body must be application/json")
        answer = self.api.handle_recordings(method, path, query, body)
        if isinstance(answer, Created):
            return self._json(start_response, HTTPStatus.CREATED, answer.data, [("Location", answer.location)])
        if isinstance(answer, Stream):
            chunks = iter(answer.chunks)
            first = next(chunks, b"")  # errors before anything is sent still get a JSON error
            start_response(_status_line(answer.status),
                           [("Content-Type", answer.content_type), ("Cache-Control", "no-store"),
                            ("X-Content-Type-Options", "nosniff"), *answer.headers.items()])
            return _streamed(first, chunks, method, path)
        return self._json(start_response, HTTPStatus.OK, answer)

    @staticmethod
    def _static(start_response: Callable, relative: str) -> list[bytes]:
        parts = relative.split("/")
        if not relative or not all(_STATIC_NAME.match(p) for p in parts):
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such file: /static/{relative}")
        file = STATIC_DIR.joinpath(*parts)
        content_type = _CONTENT_TYPES.get(file.suffix)
        if content_type is None or not file.is_file():
            hint = " (run `make ui`)" if parts[0] == "vendor" else ""
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such file: /static/{relative}{hint}")
        body = file.read_bytes()
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-cache"),
                   ("X-Content-Type-Options", "nosniff")]
        if file.suffix == ".html":
            headers += [("Content-Security-Policy", _CSP), ("Referrer-Policy", "no-referrer")]
        start_response("200 OK", headers)
        return [body]


def exc_headers(exc: HttpError) -> list[tuple[str, str]]:
    return list(getattr(exc, "headers", None) or [])


def _streamed(first: bytes, chunks: Iterator[bytes], method: str, path: str) -> Iterator[bytes]:
    try:
        yield first
        yield from chunks
    except Exception:  # the head is sent: the client sees the body end early
        log.exception("%s %s failed while streaming", method, path)
        raise


def _make_channel_class() -> type:
    """waitress's connection class with errors of its own (bad request line, head or body too
    large) answered as JSON like the API's."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class _JsonErrorTask(ErrorTask):
        def execute(self) -> None:
            error = self.request.error
            message = {413: f"the body is larger than {MAX_BODY} bytes",
                       431: f"the request head is larger than {MAX_HEAD} bytes"}.get(error.code)
            body = _error_body(message or (f"{error.reason}: {error.body}" if error.body else error.reason))
            self.status = f"{error.code} {error.reason}"
            self.response_headers.extend([("Content-Type", "application/json"), ("Cache-Control", "no-store")])
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    return type("_Channel", (HTTPChannel,), {"error_task_class": _JsonErrorTask})


_channel_class: type | None = None


def _set_nice(nice: int | None) -> None:
    """This thread's nice value (Linux keeps one per thread; threads inherit their creator's).

    The agent lowers its priority (--nice 10) so that on a busy host the applications keep their
    CPU.  A request wakes two of the API's threads (waitress's I/O thread, then a worker), each
    waiting its turn on the run queue: at nice 10 beside busy applications the agent's threads
    waited up to 90 ms there (bench/soak.py), and /healthz, with nothing to compute, took up to
    237 ms.  The API uses a few milliseconds a request: its threads keep the agent's original
    priority."""
    if nice is None:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:  # not allowed to raise its priority (no CAP_SYS_NICE): it stays as it is
        log.debug("API thread keeps its priority: %s", exc)


def _dispatcher(nice: int | None, threads: int) -> Any:
    """waitress's ``threads`` worker threads, at ``nice`` (see _set_nice)."""
    from waitress.task import ThreadedTaskDispatcher

    class Dispatcher(ThreadedTaskDispatcher):
        def handler_thread(self, thread_no: int) -> None:
            _set_nice(nice)
            super().handler_thread(thread_no)

    dispatcher = Dispatcher()
    dispatcher.set_thread_count(threads)  # (waitress starts them only for a dispatcher of its own)
    return dispatcher


def _channel() -> type:
    """Built at first use: waitress is imported only by an agent that serves the API."""
    global _channel_class
    if _channel_class is None:
        _channel_class = _make_channel_class()
    return _channel_class
