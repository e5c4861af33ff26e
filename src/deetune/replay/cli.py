"""``python -m deetune.replay``: re-send recorded requests to a target and compare the responses.

Usage::

    python -m deetune.replay --from FILE.jsonl --target HOST:PORT [options]
    python -m deetune.replay --task ID --api URL [--token T] --target HOST:PORT [options]

Exit codes: 0 every replayed exchange matched (skips allowed), 1 a mismatch or
an error, 2 bad usage or unreadable input.  Errors are one line on stderr.
See docs/replay.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

from deetune.api import default_token
from deetune.recording.model import RecordedExchange
from deetune.replay.compare import DEFAULT_IGNORED_HEADERS, Rules
from deetune.replay.handlers import Handler, HttpHandler, MysqlHandler, RedisHandler
from deetune.replay.runner import ERROR, MATCH, MISMATCH, SKIPPED, Outcome, plan_all, run

EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE = 0, 1, 2
PROTOCOLS = ("http", "redis", "mysql")


class UsageError(Exception):
    """Bad arguments or unreadable input (exit code 2); the message is one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line with exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or positive: {text!r}")
    return value


def parse_target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--target must be HOST:PORT, got {text!r}")
    return host, int(port)


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or any(c in name for c in " \t\r\n") or "\n" in value or "\r" in value:
        raise argparse.ArgumentTypeError(f"must be 'Name: value': {text!r}")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m deetune.replay",
        description="Re-send recorded requests (a JSONL export of recorded exchanges, or a recording task of the "
                    "agent's API) to a target and compare its responses with the recorded ones.",
        epilog="Exit codes: 0 all matched (skips allowed), 1 a mismatch or an error, 2 bad usage. See docs/replay.md.",
    )  # fmt: skip
    source = parser.add_argument_group("what to replay")
    source.add_argument("--from", dest="source", metavar="FILE", help="JSONL export of recorded exchanges (- for stdin)")
    source.add_argument("--task", metavar="ID", help="a recording task of the agent's API (with --api)")
    source.add_argument("--api", metavar="URL", help="the agent's API, e.g. http://127.0.0.1:9180")
    source.add_argument("--token", metavar="T", help="bearer token of the API (default: $DEETUNE_API_TOKEN, else "
                                                     "/var/lib/deetune/deetune.db.api-token when readable)")
    source.add_argument("--protocol", choices=PROTOCOLS,
                        help="replay only the exchanges of this protocol (default: the records' one protocol)")
    target = parser.add_argument_group("where and how")
    target.add_argument("--target", metavar="HOST:PORT", help="server to send the requests to (required)")
    target.add_argument("--concurrency", type=_positive_int, default=1, metavar="N",
                        help="parallel connections (default 1: strictly in recorded order)")
    target.add_argument("--rate", type=_positive_float, metavar="R", help="at most R requests per second")
    target.add_argument("--timeout", type=_positive_float, default=10.0, metavar="S",
                        help="seconds for each exchange: connect, send and the whole response (default 10)")
    compare = parser.add_argument_group("comparison")
    compare.add_argument("--ignore-header", action="append", default=[], metavar="NAME",
                         help="HTTP response header not compared (repeatable; added to the defaults: "
                              + ", ".join(DEFAULT_IGNORED_HEADERS) + ")")
    compare.add_argument("--no-default-ignores", action="store_true",
                         help="compare the headers ignored by default too")
    compare.add_argument("--ignore-json", action="append", default=[], metavar="PATH",
                         help="JSON path not compared in JSON bodies, e.g. '$.meta.generated_at', '$.items[*].id', "
                              "'$..timestamp' (repeatable)")
    compare.add_argument("--tolerance", type=_tolerance, default=0.0, metavar="T",
                         help="JSON numbers a, b match when |a-b| <= T or |a-b| <= T*max(|a|,|b|) (default 0: exact)")
    compare.add_argument("--report", metavar="PATH", help="write the JSON report here")
    compare.add_argument("-v", "--verbose", action="store_true", help="also list skipped exchanges and errors' details")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--rewrite-host", action="store_true", help="set the Host header to the target")
    http.add_argument("--http-header", action="append", default=[], type=_header, metavar="'NAME: VALUE'",
                      help="set this request header on every request, e.g. a real Authorization for redacted "
                           "ones (repeatable)")
    redis = parser.add_argument_group("Redis")
    redis.add_argument("--redis-password", metavar="P",
                       help="replace the redacted password of AUTH (and HELLO … AUTH); without it AUTH is skipped")
    mysql = parser.add_argument_group("MySQL / MariaDB (recorded logins are redacted: replay logs in itself)")
    mysql.add_argument("--mysql-user", metavar="USER", help="user to log in as (required for MySQL)")
    mysql.add_argument("--mysql-password", default="", metavar="P", help="its password (default: none)")
    mysql.add_argument("--mysql-database", metavar="DB", help="default database (default: the recorded login's)")
    return parser


# -- input ------------------------------------------------------------------------------------


def parse_jsonl(lines, where: str) -> list[RecordedExchange]:
    exchanges = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            exchanges.append(RecordedExchange.from_json(json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{where}:{number}: not JSON: {exc.msg}") from None
        except (ValueError, TypeError, AttributeError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"{where}:{number}: not a recorded exchange: {message}") from None
    return exchanges


def load_file(path: str) -> list[RecordedExchange]:
    if path == "-":
        return parse_jsonl(sys.stdin, "stdin")
    try:
        with open(path, encoding="utf-8") as handle:
            return parse_jsonl(handle, path)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None


def exchanges_url(api: str, task: str) -> str:
    return f"{api.rstrip('/')}/api/recordings/{urllib.parse.quote(task, safe='')}/exchanges?format=jsonl"


def load_task(api: str, task: str, token: str | None, timeout: float) -> list[RecordedExchange]:
    if not api.startswith(("http://", "https://")):
        raise UsageError(f"--api must be an http:// or https:// URL, got {api!r}")
    url = exchanges_url(api, task)
    request = urllib.request.Request(url, headers={"Accept": "application/x-ndjson, application/jsonl"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        detail = ""
        try:
            error = json.loads(exc.read() or b"{}")
            detail = error.get("error") or error.get("message") or "" if isinstance(error, dict) else ""
        except (ValueError, OSError):
            pass
        if isinstance(detail, dict):
            detail = detail.get("message", "")
        raise UsageError(f"{url}: HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")) from None
    except urllib.error.URLError as exc:
        raise UsageError(f"cannot reach the API at {api}: {getattr(exc.reason, 'strerror', None) or exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot reach the API at {api}: {exc}") from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{url}: the answer is not UTF-8") from None
    return parse_jsonl(text.splitlines(), f"task {task}")


# -- output -----------------------------------------------------------------------------------


def _ms(ns: int | None) -> str:
    if ns is None:
        return "?"
    return f"{ns / 1e3:.0f} µs" if ns < 1_000_000 else f"{ns / 1e6:.1f} ms"


def _title(outcome: Outcome) -> str:
    target = outcome.target if len(outcome.target) <= 100 else outcome.target[:99] + "…"
    return f"#{outcome.seq} {outcome.method} {target}".rstrip()


def print_outcome(outcome: Outcome, verbose: bool, out=None) -> None:
    out = sys.stdout if out is None else out
    if outcome.result == MISMATCH:
        print(f"MISMATCH {_title(outcome)} (latency {_ms(outcome.latency_recorded_ns)} recorded, "
              f"{_ms(outcome.latency_replayed_ns)} replayed)", file=out)  # fmt: skip
        for diff in outcome.diffs:
            for line in diff.lines():
                print("    " + line, file=out)
    elif outcome.result == ERROR:
        print(f"ERROR    {_title(outcome)}: {outcome.reason}", file=out)
    elif outcome.result == SKIPPED and verbose:
        print(f"SKIPPED  {_title(outcome)}: {outcome.reason}", file=out)


def summarize(outcomes: list[Outcome]) -> dict[str, int]:
    counts = {MATCH: 0, MISMATCH: 0, SKIPPED: 0, ERROR: 0}
    for outcome in outcomes:
        counts[outcome.result] += 1
    return {"total": len(outcomes), "matched": counts[MATCH], "mismatched": counts[MISMATCH],
            "skipped": counts[SKIPPED], "errors": counts[ERROR]}  # fmt: skip


def build_report(target: str, protocol: str, source: str, outcomes: list[Outcome]) -> dict:
    return {"target": target, "protocol": protocol, "source": source, "summary": summarize(outcomes),
            "exchanges": [o.to_json() for o in outcomes]}  # fmt: skip


def open_report(path: str):
    """Opened before anything is sent: a report that cannot be written is found out first."""
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None


def write_report(handle, report: dict) -> None:
    with handle:
        json.dump(report, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


# -- main -------------------------------------------------------------------------------------


def _choose_protocol(exchanges: list[RecordedExchange], wanted: str | None) -> str:
    present = sorted({e.protocol for e in exchanges})
    if wanted is not None:
        if wanted not in present:
            raise UsageError(f"no {wanted} exchanges to replay (the records hold {', '.join(present)})")
        return wanted
    if len(present) > 1:
        raise UsageError(f"the records mix protocols ({', '.join(present)}): pick one with --protocol")
    if present[0] not in PROTOCOLS:
        raise UsageError(f"cannot replay {present[0]} exchanges (replay knows {', '.join(PROTOCOLS)})")
    return present[0]


def make_handler(args: argparse.Namespace, protocol: str, host: str, port: int, rules: Rules) -> Handler:
    if protocol == "http":
        return HttpHandler(host, port, rules, args.timeout, args.rewrite_host, args.http_header)
    if protocol == "redis":
        return RedisHandler(host, port, rules, args.timeout, args.redis_password)
    if not args.mysql_user:
        raise UsageError("replaying MySQL needs --mysql-user (and --mysql-password): recorded logins are redacted")
    return MysqlHandler(host, port, rules, args.timeout, args.mysql_user, args.mysql_password, args.mysql_database)


def cmd_replay(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.target is None:
        raise UsageError("--target HOST:PORT is required")
    host, port = parse_target(args.target)
    if (args.source is None) == (args.task is None):
        raise UsageError("give either --from FILE or --task ID (with --api URL)")
    if args.task is not None and not args.api:
        raise UsageError("--task needs --api URL")
    if args.source is not None and (args.api or args.token):
        raise UsageError("--api and --token go with --task, not --from")
    try:
        rules = Rules.build(args.ignore_header, args.ignore_json, args.tolerance,
                            default_headers=not args.no_default_ignores)
    except ValueError as exc:
        raise UsageError(f"--ignore-json: {exc}") from None
    if args.source is not None:
        exchanges = load_file(args.source)
        source = args.source
    else:
        token = args.token if args.token is not None else default_token()  # $DEETUNE_API_TOKEN, the agent's file
        exchanges = load_task(args.api, args.task, token, args.timeout)
        source = exchanges_url(args.api, args.task)
    if not exchanges:
        raise UsageError(f"nothing to replay: {source} holds no recorded exchanges")
    exchanges.sort(key=lambda e: e.seq)
    protocol = _choose_protocol(exchanges, args.protocol)
    handler = make_handler(args, protocol, host, port, rules)

    def selected(exchange: RecordedExchange) -> str | None:
        if exchange.protocol != protocol:
            return f"a {exchange.protocol} exchange (replaying {protocol})"
        return None

    report_file = open_report(args.report) if args.report else None
    try:
        plans = plan_all(exchanges, handler, selected)
        outcomes = run(plans, handler, args.concurrency, args.rate)
    except BaseException:
        if report_file is not None:
            report_file.close()
        raise
    target = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    report = build_report(target, protocol, source, outcomes)
    if report_file is not None:
        write_report(report_file, report)
    for outcome in outcomes:
        print_outcome(outcome, args.verbose)
    summary = report["summary"]
    print(f"replay: {summary['total']} exchanges against {target}: {summary['matched']} matched, "
          f"{summary['mismatched']} mismatched, {summary['skipped']} skipped, {summary['errors']} errors")  # fmt: skip
    sys.stdout.flush()
    return EXIT_DIFFERENT if summary["mismatched"] or summary["errors"] else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return cmd_replay(argv)
    except UsageError as exc:
        print(f"deetune: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_DIFFERENT
    except KeyboardInterrupt:
        return 130
