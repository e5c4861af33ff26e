"""Command-line tools that need no privileges: ``python -m deetune COMMAND``.

Usage::

    python -m deetune decode FILE... [--protocol NAME]... [--output PATH|-] [-v]

Exit codes: 0 done, 2 bad usage or an unreadable input.  Errors are one line
on stderr.  (The live agent is ``python -m deetune.agent``.)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence

from deetune.offline import CaptureError, DecodeStats, decode_capture, open_capture
from deetune.plugins import UnknownPluginError, default_plugins
from deetune.sinks.jsonl import JsonlSink

EXIT_OK, EXIT_USAGE = 0, 2


class UsageError(Exception):
    """Bad arguments or unusable files (exit code 2); the message is one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line with exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def _add_decode(subparsers) -> None:
    parser = subparsers.add_parser(
        "decode", help="decode exchanges from pcap/pcapng captures (optionally .gz) into JSON lines",
        description="Rebuild each TCP connection of the captures and decode its exchanges. Exchanges are "
                    "reported from the client's side; the summary goes to stderr.",
    )  # fmt: skip
    parser.add_argument("files", nargs="+", metavar="FILE", help="pcap or pcapng file, gzipped or not")
    parser.add_argument("--protocol", action="append", metavar="NAME",
                        help="decode only these protocols (repeatable; default: all)")
    parser.add_argument("-o", "--output", default="-", metavar="PATH",
                        help="where the JSON lines go, overwritten (default -: stdout)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log why connections were not decoded")
    parser.set_defaults(run=cmd_decode)


def cmd_decode(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="deetune: %(message)s")  # fmt: skip
    registry = default_plugins().decoders
    try:
        decoders = [registry.get(name) for name in dict.fromkeys(args.protocol or registry.names())]
    except UnknownPluginError as exc:
        raise UsageError(exc.args[0]) from None
    # Every input is opened before anything is written: a typo in the last file costs no output.
    captures = []
    try:
        for path in args.files:
            try:
                captures.append(open_capture(path))
            except CaptureError as exc:
                raise UsageError(f"{path}: {exc}") from None
        sink = _open_output(args.output)
        total = DecodeStats()
        unwritten: list[str] = []
        try:
            with _progress(captures, enabled=sys.stderr.isatty() and not args.verbose) as advance:
                for capture in captures:
                    stats = DecodeStats()
                    for event in decode_capture(capture, decoders, stats):
                        try:
                            sink.handle(event)
                        except (TypeError, ValueError, OverflowError) as exc:  # an event the sink cannot write
                            unwritten.append(f"{type(exc).__name__}: {exc}")
                        advance(capture, stats)
                    advance(capture, stats, done=True)
                    damage = capture.damage.describe()
                    if damage:
                        print(f"deetune: {capture.path}: capture damaged: {damage}", file=sys.stderr)
                    if len(captures) > 1:
                        print(f"deetune: {capture.path}: {stats.summary()}", file=sys.stderr)
                    total.add(stats)
        finally:
            sink.close()
    finally:
        for capture in captures:
            capture.close()
    print(f"deetune: {total.summary()}", file=sys.stderr)
    for line in total.details():
        print(f"deetune:   {line}", file=sys.stderr)
    if unwritten:
        print(f"deetune:   {len(unwritten)} exchanges could not be written ({unwritten[0]})", file=sys.stderr)
    return EXIT_OK


@contextlib.contextmanager
def _progress(captures, enabled: bool):
    """Yields ``advance(capture, stats, done=False)``: a progress bar per file on a terminal (rich),
    nothing otherwise.  Redrawn at most ten times a second, whatever the packet rate."""
    if not enabled:
        yield lambda capture, stats, done=False: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                        TextColumn("{task.fields[exchanges]} exchanges"), console=Console(stderr=True),
                        transient=True, refresh_per_second=10)  # fmt: skip
    tasks = {id(c): progress.add_task(os.path.basename(c.path), total=c.size or None, exchanges=0) for c in captures}
    last = [0.0]

    def advance(capture, stats, done: bool = False) -> None:
        now = time.monotonic()
        if not done and now - last[0] < 0.1:
            return
        last[0] = now
        task = tasks[id(capture)]
        completed = capture.size if done and capture.size else capture.position
        progress.update(task, completed=completed, exchanges=stats.exchanges)

    with progress:
        yield advance


def _open_output(path: str) -> JsonlSink:
    if path == "-":
        return JsonlSink(sys.stdout.buffer, owned=False)
    try:
        # The jsonl sink's format, but a fresh file: a decode is a result, not a log.
        return JsonlSink(open(path, "wb"), owned=True)
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None


#: Subcommand name → function adding its parser (which sets ``run``).
COMMANDS: dict[str, Callable] = {"decode": _add_decode}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m deetune", description="deetune tools that need no privileges. "
                     "The live agent is 'python -m deetune.agent'.")  # fmt: skip
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        if not hasattr(args, "run"):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args.run(args)
    except UsageError as exc:
        print(f"deetune: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # The reader went away (`| head`): not an error; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
