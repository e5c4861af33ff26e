"""The agent's HTTP API and web UI, on the standard library's ``ThreadingHTTPServer``.

::

    server = ApiServer(store, port=8080)      # store: anything implementing TopologyQueries
    server.start()                            # serves from a background thread
    print(server.url)                         # http://127.0.0.1:8080
    server.stop()

Rules:

- it binds to loopback (``127.0.0.1``, ``::1``, ``localhost``) unless given a bearer token:
  any other address without one raises :class:`ValueError`;
- with a token, every ``/api/*`` request needs ``Authorization: Bearer <token>`` (401 otherwise);
  ``/``, ``/static/*``, ``/openapi.json`` and ``/healthz`` stay public (they hold no data);
- every error is JSON ``{"error": "one line"}``: 400 bad parameters, 401, 404, 405, and 500
  when the store fails (logged with its traceback here, never sent to the client);
- recording tasks (``/api/recordings``, given a
  :class:`~deetune.recording.recorder.RecordingManager`) also take ``POST`` and ``DELETE``;
  those need a JSON body where they take one, and are refused (403) when a browser sends
  them from another origin.

Endpoints and parameters: :mod:`deetune.api.openapi` and docs/api.md.
"""

from __future__ import annotations

import datetime
import hmac
import json
import logging
import pathlib
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Self

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
#: Largest request body read (a recording task's description).
MAX_BODY = 64 * 1024
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

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
        raise _bad(f"{name} must be an integer from {low} to {high}, got {text!r}")
    return int(text)


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


class ApiServer:
    """Serves ``queries`` over HTTP from a background thread (see the module doc)."""

    def __init__(
        self,
        queries: TopologyQueries,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        *,
        clock: Callable[[], int] = time.time_ns,
        recordings: Any = None,
    ) -> None:
        if token is not None and (not token or not token.isascii() or not token.isprintable() or " " in token):
            raise ValueError("the API token must be non-empty printable ASCII without spaces")
        if token is None and host not in LOOPBACK_HOSTS:
            raise ValueError(
                f"binding the API to {host!r} needs a bearer token (only 127.0.0.1, ::1 and localhost go without)"
            )
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"not a TCP port: {port!r}")
        self.queries = queries
        self.host = host
        self.port = port
        self.token = token
        self.clock = clock
        #: The recording tasks' manager (deetune.recording.recorder.RecordingManager), or None.
        self.recordings = recordings
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        if self._httpd is not None:
            raise RuntimeError("the API server is already started")
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
        except socket.gaierror as exc:
            raise ValueError(f"cannot resolve {self.host!r}: {exc.strerror}") from None
        server_class = type("_Server", (_HttpServer,), {"address_family": family})
        try:
            self._httpd = server_class((self.host, self.port), _Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self.host} port {self.port}: {exc.strerror}") from None
        self._httpd.api = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="deetune-api", daemon=True
        )
        self._thread.start()
        log.info("API and UI on %s", self.url)
        return self

    def stop(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the port is the real one when 0 was asked."""
        if self._httpd is None:
            raise RuntimeError("the API server is not started")
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    # -- requests ----------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode("utf-8", "replace"), self.token.encode("ascii"))

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
                    try:
                        data = json.loads(body or b"null")
                    except (ValueError, UnicodeDecodeError) as exc:
                        raise _bad(f"the body is not JSON: {exc}") from None
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


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    api: ApiServer


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    server_version = f"deetune/{__version__}"
    sys_version = ""
    #: Seconds a connection may sit idle or half-sent before it is dropped.
    timeout = 30

    # -- plumbing ----------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json", {"Cache-Control": "no-store", **(headers or {})})

    def _send_error_json(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send_json(status, {"error": _one_line(message)}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own errors (malformed request line, header too long, …) as JSON."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        if not hasattr(self, "command") or self.command is None:
            self.command = ""
        self._send_error_json(code, message or phrase, {"Connection": "close"})

    # -- methods -----------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch_write()

    def do_DELETE(self) -> None:
        self._dispatch_write()

    def _dispatch_write(self) -> None:
        """POST and DELETE: only recording paths take them."""
        path = urllib.parse.urlsplit(self.path).path or "/"
        if ApiServer.recording_methods(path) is None:
            try:
                self._drain_body()
            except HttpError:
                pass  # too large or malformed: the connection closes after the 405
            self._not_allowed()
            return
        self._dispatch()

    def _drain_body(self) -> bytes | None:
        """The request body (at most MAX_BODY; a longer one is an HttpError)."""
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        if not length.isdigit():
            self.close_connection = True
            raise HttpError(HTTPStatus.BAD_REQUEST, "Content-Length is not a number")
        size = int(length)
        if size > MAX_BODY:
            self.close_connection = True
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is larger than {MAX_BODY} bytes")
        return self.rfile.read(size) if size else b""

    def _not_allowed(self) -> None:
        methods = ApiServer.recording_methods(urllib.parse.urlsplit(self.path).path or "/") or ("GET", "HEAD")
        self._send_error_json(HTTPStatus.METHOD_NOT_ALLOWED,
                              f"method {self.command} not allowed ({_methods_text(methods)} only)",
                              {"Allow": ", ".join(methods)})

    def __getattr__(self, name: str) -> Any:
        # Every other method, standard or not (POST, TRACE, QUERY …): 405 rather than the stdlib's 501.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _dispatch(self) -> None:
        api = self.server.api
        split = urllib.parse.urlsplit(self.path)
        path = split.path or "/"
        try:
            recording = ApiServer.recording_methods(path)
            body = self._drain_body() if self.command in ("POST", "DELETE") else None
            if path == "/api" or path.startswith("/api/"):
                if not api.authorized(self.headers.get("Authorization")):
                    self._send_error_json(HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token",
                                          {"WWW-Authenticate": 'Bearer realm="deetune"'})
                    return
                if recording is not None:
                    self._recording(api, recording, path, split.query, body)
                    return
                self._send_json(HTTPStatus.OK, api.handle_api(path, split.query))
            elif path == "/healthz":
                self._send_json(HTTPStatus.OK, {"status": "ok", "version": __version__})
            elif path == "/openapi.json":
                from deetune.api.openapi import openapi_document

                self._send_json(HTTPStatus.OK, openapi_document())
            elif path in ("/", "/index.html"):
                self._static("index.html")
            elif path.startswith("/static/"):
                self._static(urllib.parse.unquote(path[len("/static/"):]))
            else:
                raise HttpError(HTTPStatus.NOT_FOUND, f"not found: {path}")
        except HttpError as exc:
            self._send_error_json(exc.status, exc.message)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            log.exception("%s %s failed", self.command, path)
            self._send_error_json(HTTPStatus.INTERNAL_SERVER_ERROR,
                                  f"internal error: {type(exc).__name__}: {exc}")

    def _recording(self, api: ApiServer, methods: tuple[str, ...], path: str, query: str, body: bytes | None) -> None:
        if self.command not in methods:
            self._send_error_json(HTTPStatus.METHOD_NOT_ALLOWED,
                                  f"method {self.command} not allowed ({_methods_text(methods)} only)",
                                  {"Allow": ", ".join(methods)})
            return
        if self.command in ("POST", "DELETE"):
            origin = self.headers.get("Origin")
            if origin is not None and urllib.parse.urlsplit(origin).netloc != self.headers.get("Host"):
                raise HttpError(HTTPStatus.FORBIDDEN, f"cross-origin {self.command} refused (Origin {origin})")
            if body and self.command == "POST" and path.rstrip("/") == "/api/recordings":  # a task: JSON only
                content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if content_type != "application/json":
                    raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "the body must be application/json")
        answer = api.handle_recordings(self.command, path, query, body)
        if isinstance(answer, Created):
            self._send_json(HTTPStatus.CREATED, answer.data, {"Location": answer.location})
        elif isinstance(answer, Stream):
            self._send_stream(answer)
        else:
            self._send_json(HTTPStatus.OK, answer)

    def _send_stream(self, answer: Stream) -> None:
        chunks = iter(answer.chunks)
        first = next(chunks, b"")  # errors before anything is sent still get a JSON error
        self.close_connection = True
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Connection", "close")
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            self.wfile.write(first)
            for chunk in chunks:
                self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception:
            log.exception("%s %s failed while streaming", self.command, self.path)

    def _static(self, relative: str) -> None:
        parts = relative.split("/")
        if not relative or not all(_STATIC_NAME.match(p) for p in parts):
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such file: /static/{relative}")
        file = STATIC_DIR.joinpath(*parts)
        content_type = _CONTENT_TYPES.get(file.suffix)
        if content_type is None or not file.is_file():
            hint = " (run `make ui`)" if parts[0] == "vendor" else ""
            raise HttpError(HTTPStatus.NOT_FOUND, f"no such file: /static/{relative}{hint}")
        headers = {"Cache-Control": "no-cache"}
        if file.suffix == ".html":
            headers.update({"Content-Security-Policy": _CSP, "Referrer-Policy": "no-referrer"})
        self._send(HTTPStatus.OK, file.read_bytes(), content_type, headers)
