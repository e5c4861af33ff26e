"""``python -m deetune.record``: recording tasks through the agent's HTTP API.

::

    python -m deetune.record create --server checkout --client frontend --method POST --path '/api/orders*' \\
                                    --count 500 --duration 10m --sample 0.5 --webhook http://ci/hook
    python -m deetune.record list
    python -m deetune.record status rec-3f2a1b9c0d4e
    python -m deetune.record stop rec-3f2a1b9c0d4e
    python -m deetune.record export rec-3f2a1b9c0d4e --format har --output orders.har
    python -m deetune.record delete rec-3f2a1b9c0d4e

``--api URL`` (default ``$DEETUNE_API``, else http://127.0.0.1:9477, the agent's ``--api``
default), ``--token`` (default ``$DEETUNE_API_TOKEN``, else the token file an agent with the default
store keeps, /var/lib/deetune/deetune.db.api-token) and ``--token-file`` go before or after the command.

Exit codes: 0 done; 1 the agent is unreachable or answered an error (unknown task, …);
2 bad usage (arguments, or a task the agent refused as invalid).  Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

from deetune.api import DEFAULT_API_HOST, DEFAULT_API_PORT, DEFAULT_TOKEN_FILE, default_token
from deetune.cli_types import parse_duration
from deetune.recording.tasks import MAX_LIMIT

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_API = f"http://{DEFAULT_API_HOST}:{DEFAULT_API_PORT}"
PROG = "python -m deetune.record"


class UsageError(Exception):
    """Exit 2."""


class Failure(Exception):
    """Exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def _limit(text: str) -> int:
    multiplier = 1
    if text[-1:].lower() == "k":
        text, multiplier = text[:-1], 1024
    if not text.isdigit() or not 0 < int(text) * multiplier <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_LIMIT} bytes (or 1k to 64k): {text!r}")
    return int(text) * multiplier


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1: {text!r}")
    return value


def _connection_args(parser: argparse.ArgumentParser, top: bool) -> None:
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--api", metavar="URL", default=default,
                        help=f"the agent's API (default $DEETUNE_API, else {DEFAULT_API})")
    parser.add_argument("--token", metavar="TOKEN", default=default,
                        help="bearer token (default $DEETUNE_API_TOKEN, else the one in --token-file)")
    parser.add_argument("--token-file", metavar="PATH", default=default,
                        help=f"file holding the token (default {DEFAULT_TOKEN_FILE}: the agent's with the default "
                             f"store; an agent with --store PATH keeps it in PATH.api-token)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Create, follow and export traffic recording tasks of a deetune agent.")
    _connection_args(parser, True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    create = commands.add_parser("create", help="start a recording task")
    create.add_argument("--server", required=True, metavar="SVC", help="the server service (required)")
    create.add_argument("--client", metavar="SVC", help="only exchanges from this client service")
    create.add_argument("--protocol", metavar="P", help="http, redis, mysql …")
    create.add_argument("--method", metavar="M", help="HTTP method")
    create.add_argument("--path", metavar="GLOB", help="HTTP path glob (without the query)")
    create.add_argument("--command", dest="redis_command", metavar="CMD", help="Redis command")
    create.add_argument("--statement", metavar="REGEX", help="MySQL statement regular expression")
    create.add_argument("--duration", type=parse_duration, metavar="S", help="stop after this long (90, 15m, 2h)")
    create.add_argument("--count", type=_positive_int, metavar="N", help="stop after N exchanges recorded")
    create.add_argument("--limit", type=_limit, metavar="BYTES", help=f"bytes kept per message (default {MAX_LIMIT})")
    create.add_argument("--sample", type=_ratio, metavar="R", help="record this fraction of the matches (0<R<=1)")
    create.add_argument("--webhook", metavar="URL", help="POSTed the task's status when it ends")
    create.add_argument("--no-default-redaction", action="store_true",
                        help="turn the built-in redaction rules off (Authorization, Cookie, auth data …)")
    create.add_argument("--redact-header", action="append", default=[], metavar="NAME",
                        help="also mask this HTTP header (repeatable)")
    create.add_argument("--redact-json", action="append", default=[], metavar="PATH",
                        help="mask this JSON body field: user.password, **.token (repeatable)")
    create.add_argument("--redact-regex", action="append", default=[], metavar="REGEX",
                        help="mask what this regular expression matches in the bytes (repeatable)")
    create.add_argument("--json", action="store_true", help="print the task's status as JSON (default: its id)")
    listing = commands.add_parser("list", help="every task")
    listing.add_argument("--json", action="store_true", help="as JSON")
    status = commands.add_parser("status", help="a task's state and counters")
    status.add_argument("id")
    status.add_argument("--json", action="store_true", help="as JSON")
    stop = commands.add_parser("stop", help="stop a running task")
    stop.add_argument("id")
    delete = commands.add_parser("delete", help="delete a task and its exchanges")
    delete.add_argument("id")
    export = commands.add_parser("export", help="a task's exchanges: JSON Lines (replay's input) or HAR")
    export.add_argument("id")
    export.add_argument("--format", choices=("jsonl", "har"), default="jsonl", help="default jsonl")
    export.add_argument("--output", "-o", metavar="PATH", help="write here (default: stdout)")
    export.add_argument("--limit", type=_positive_int, metavar="N", help="at most N exchanges")
    for sub in (create, listing, status, stop, delete, export):
        _connection_args(sub, False)
    return parser


class Client:
    """The agent's /api/recordings over urllib."""

    def __init__(self, api: str, token: str | None, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(api)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"--api must be an http:// or https:// URL, got {api!r}")
        self.api = api.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, *, raw: bool = False) -> Any:
        url = self.api + path
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read() or b"{}").get("error") or exc.reason
            except (ValueError, OSError, AttributeError):
                message = exc.reason
            if exc.code == 400:
                raise UsageError(str(message)) from None
            raise Failure(f"{message} (HTTP {exc.code})") from None
        except urllib.error.URLError as exc:
            reason = getattr(exc.reason, "strerror", None) or exc.reason
            raise Failure(f"cannot reach the agent at {self.api}: {reason}") from None
        except OSError as exc:
            raise Failure(f"cannot reach the agent at {self.api}: {exc.strerror or exc}") from None
        if raw:
            return response
        with response:
            try:
                return json.loads(response.read())
            except ValueError:
                raise Failure(f"{url}: the answer is not JSON") from None


def _task_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {"server": args.server}
    for key, value in (("client", args.client), ("protocol", args.protocol), ("method", args.method),
                       ("path", args.path), ("command", args.redis_command), ("statement", args.statement),
                       ("duration", args.duration), ("count", args.count), ("limit", args.limit),
                       ("sample", args.sample), ("webhook", args.webhook)):
        if value is not None:
            body[key] = value
    redact: dict[str, Any] = {}
    if args.no_default_redaction:
        redact["defaults"] = False
    if args.redact_header:
        redact["headers"] = args.redact_header
    if args.redact_json:
        redact["json"] = args.redact_json
    if args.redact_regex:
        redact["patterns"] = args.redact_regex
    if redact:
        body["redact"] = redact
    return body


def _ts(ns: int | None) -> str:
    if ns is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def _filters(spec: dict[str, Any]) -> str:
    parts = [f"{k}={spec[k]}" for k in ("client", "protocol", "method", "path", "command", "statement")
             if spec.get(k) is not None]
    return " ".join(parts) or "-"


def _print_status(task: dict[str, Any], out) -> None:
    spec = task["spec"]
    stops = [f"{spec['duration']:g}s" if spec.get("duration") else None,
             f"{spec['count']} exchanges" if spec.get("count") else None]
    lines = [
        ("id", task["id"]), ("state", task["state"]), ("server", spec["server"]), ("filters", _filters(spec)),
        ("stop after", " or ".join(s for s in stops if s) or "stopped by hand"),
        ("limit", f"{spec['limit']} bytes per message"), ("sample", f"{spec['sample']:g}"),
        ("ports", ", ".join(map(str, task["ports"])) or "-"),
        ("created", _ts(task["created"])), ("started", _ts(task["started"])), ("ended", _ts(task["ended"])),
        ("matched", task["matched"]), ("recorded", task["recorded"]),
        ("dropped", f"{task['dropped']} (sampling {task['dropped_by']['sampling']}, capture "
                    f"{task['dropped_by']['capture']}, queue {task['dropped_by']['queue']})"),
        ("bytes", task["bytes"]),
    ]
    if spec.get("webhook"):
        lines.append(("webhook", f"{spec['webhook']} ({task['webhook_status'] or 'not called yet'})"))
    if task.get("error"):
        lines.append(("error", task["error"]))
    for key, value in lines:
        print(f"{key + ':':<12}{value}", file=out)


def _task_path(task_id: str) -> str:
    return "/api/recordings/" + urllib.parse.quote(task_id, safe="")


def run(args: argparse.Namespace, out=sys.stdout) -> int:
    api = args.api or os.environ.get("DEETUNE_API") or DEFAULT_API
    token = args.token
    if token is None:
        try:
            token = default_token(getattr(args, "token_file", None))
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--token-file {args.token_file}: {getattr(exc, 'strerror', None) or exc}") from None
    client = Client(api, token)
    command = args.command
    if command == "create":
        task = client.request("POST", "/api/recordings", _task_body(args))
        if args.json:
            print(json.dumps(task, indent=2), file=out)
        else:
            print(task["id"], file=out)
    elif command == "list":
        tasks = client.request("GET", "/api/recordings")["recordings"]
        if args.json:
            print(json.dumps(tasks, indent=2), file=out)
            return EXIT_OK
        print(f"{'ID':<17} {'STATE':<10} {'SERVER':<20} {'MATCHED':>8} {'RECORDED':>8} {'DROPPED':>8} "
              f"{'BYTES':>10}  FILTERS", file=out)
        for task in tasks:
            print(f"{task['id']:<17} {task['state']:<10} {task['spec']['server'][:20]:<20} {task['matched']:>8} "
                  f"{task['recorded']:>8} {task['dropped']:>8} {task['bytes']:>10}  {_filters(task['spec'])}",
                  file=out)
    elif command == "status":
        task = client.request("GET", _task_path(args.id))
        if args.json:
            print(json.dumps(task, indent=2), file=out)
        else:
            _print_status(task, out)
    elif command == "stop":
        task = client.request("POST", _task_path(args.id) + "/stop")
        print(f"{task['id']} {task['state']}: {task['recorded']} exchanges recorded", file=out)
    elif command == "delete":
        client.request("DELETE", _task_path(args.id))
        print(f"{args.id} deleted", file=out)
    elif command == "export":
        query = {"format": args.format}
        if args.limit:
            query["limit"] = str(args.limit)
        path = _task_path(args.id) + "/exchanges?" + urllib.parse.urlencode(query)
        response = client.request("GET", path, raw=True)
        try:
            target = open(args.output, "wb") if args.output else None
        except OSError as exc:
            response.close()
            raise Failure(f"{args.output}: {exc.strerror or exc}") from None
        sink = target if target is not None else getattr(out, "buffer", None)
        if sink is None:  # a text stream without a buffer (tests)
            with response:
                out.write(response.read().decode("utf-8"))
            return EXIT_OK
        try:
            with response:
                while chunk := response.read(65536):
                    sink.write(chunk)
            sink.flush()
        except OSError as exc:
            raise Failure(f"export interrupted: {exc.strerror or exc}") from None
        finally:
            if target is not None:
                target.close()
    else:
        raise UsageError("a command is needed: create, list, status, stop, delete or export")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        return run(args)
    except UsageError as exc:
        print(f"deetune.record: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Failure as exc:
        print(f"deetune.record: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except BrokenPipeError:
        return EXIT_OK


__all__ = ["main", "build_parser", "run", "Client", "DEFAULT_API"]
