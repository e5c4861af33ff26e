"""Acceptance against third-party captures with known transactions (not shipped: see tests/conftest.py).

    .venv/bin/python bench/vectors_acceptance.py [VECTORS_DIR] [--json PATH] [-v]

Expected transactions: DeepFlow's per-packet result files for HTTP/1, Redis and MySQL (every request
line; a login is a transaction), DeepFlow's request count for 171-mysql.pcap (it has no result file),
and Kindling's syscall traces with their expected records.  A transaction matches when the decoders
report an exchange with the same method and target (Redis: the command and its key, DeepFlow's
arguments starting with it; MySQL: the command and the statement, the login by its user, a prepared
statement's execution by the command alone: DeepFlow shows its parameters) in the same capture;
each reported exchange matches one transaction at most.  HTTP/2 and gRPC captures are left out: no HTTP/2 decoder here.

Prints one line per file that misses something, then ``N of M transactions match``; ``--json``
writes the figures.  Runs the decoders of whatever ``deetune`` is importable: point PYTHONPATH at
another tree's src/ to compare two versions.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import string
import sys

import yaml

from deetune.decoders.base import Chunk, Direction
from deetune.decoders.session import StreamSession
from deetune.offline import decode_file
from deetune.plugins import default_plugins

FLOW = "deepflow/agent/resources/test/flow_generator"
KINDLING = "kindling/collector/pkg/component/analyzer/network/protocol/testdata"
MYSQL_COMMANDS = {0: "LOGIN", 1: "QUIT", 2: "INIT_DB", 3: "QUERY", 4: "FIELD_LIST", 14: "PING", 22: "STMT_PREPARE",
                  23: "STMT_EXECUTE", 25: "STMT_CLOSE"}
#: DeepFlow's request count where a capture has no result file (INDEX.md's perf column).
COUNTS_ONLY = {"mysql/171-mysql.pcap": 390}
HTTP2 = ("grpc", "h2c", "http2", "httpv2")


def deepflow_expected(result: pathlib.Path) -> list[tuple[str, str]]:
    out = []
    for line in result.read_text().splitlines():
        if line.startswith("{"):
            info = json.loads(line.rsplit("} is_", 1)[0] + "}")
            if info.get("msg_type") == "Request":
                method = MYSQL_COMMANDS.get(info["request_type"], str(info["request_type"]))
                resource = info.get("request_resource") or ""
                if method == "LOGIN":
                    resource = re.sub(r"^Login username: (\S+).*", r"\1", resource)
                out.append((method, resource))
        elif line.startswith("RedisInfo"):
            request = re.search(r'request: "((?:[^"\\]|\\.)*)"', line).group(1)
            if request:
                command, _, rest = request.partition(" ")
                out.append((command.upper(), rest))
        elif line.startswith("HttpInfo") and "msg_type: Request" in line:
            method = re.search(r"method: (\w+)", line).group(1).upper()
            path = re.search(r'path: "([^"]*)"', line).group(1)
            out.append((method, path))
    return out


def ours(exchanges) -> list[tuple[str, str]]:
    out = []
    for e in exchanges:
        target = e.target
        if e.protocol == "mysql" and e.method == "LOGIN":
            target = e.attributes.get("user", "")
        out.append((e.method, target))
    return out


def same(expected: tuple[str, str], reported: tuple[str, str]) -> bool:
    """DeepFlow shows a prepared statement's execution by its parameters (we show the statement) and a
    Redis command by its arguments (we show the key, its first): the method then says enough."""
    if expected[0] != reported[0]:
        return False
    if expected[0] in ("STMT_EXECUTE", "FIELD_LIST"):
        return True
    return expected[1] == reported[1] or (bool(reported[1]) and expected[1].startswith(reported[1]))


def matched(expected, reported) -> int:
    available = list(reported)
    count = 0
    for item in expected:
        for index, candidate in enumerate(available):
            if same(item, candidate):
                del available[index]
                count += 1
                break
    return count


def kindling_data(items) -> bytes:
    out = b""
    for item in items:
        prefix, bar, rest = item.partition("|")
        if bar and prefix == "hex":
            out += bytes.fromhex(rest)
        elif bar and prefix == "string":
            out += rest.encode()
        elif bar and prefix and all(c in string.hexdigits for c in prefix):
            out += bytes.fromhex(prefix) + rest.encode()
        else:
            out += item.encode()
    return out


def kindling(path: pathlib.Path, decoders) -> tuple[list, list]:
    trace = yaml.safe_load(path.read_text()).get("trace") or {}
    events = []
    for key, inbound in (("requests", True), ("responses", False)):
        for event in trace.get(key) or []:
            attrs = event["user_attributes"]
            events.append((event["timestamp"], inbound, kindling_data(attrs["data"]), attrs["res"]))
    events.sort()
    session = StreamSession(decoders, "server", options={"http": {"trust_syscall_boundaries": True}})
    got = []
    for ts, inbound, data, size in events:
        got += session.feed(not inbound, data, size, ts)
    got += session.close(10**18)
    expected = []
    for expect in trace.get("expects") or []:
        labels = expect["Labels"]
        if "http_method" in labels:
            expected.append((labels["http_method"], labels["http_url"]))
        elif "sql" in labels:
            expected.append(("sql", labels["sql"]))
        elif "redis_command" in labels:
            expected.append(("redis", labels["redis_command"].upper()))
    reported = []
    for e in got:
        if e.protocol == "http":
            reported.append((e.method, e.target))
        elif e.protocol == "mysql":
            reported.append(("sql", e.target))
        else:
            reported.append(("redis", e.method))
    return expected, reported


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vectors", nargs="?", default=str(pathlib.Path(__file__).resolve().parents[2]
                                                          / "shared" / "protocol-vectors"))
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    root = pathlib.Path(args.vectors)
    if not (root / FLOW).is_dir():
        print(f"no vectors at {root}", file=sys.stderr)
        return 2
    decoders = default_plugins().decoders.classes()
    rows = []
    for pcap in sorted((root / FLOW).rglob("*.pcap")):
        name = str(pcap.relative_to(root / FLOW))
        if any(word in pcap.name for word in HTTP2):
            continue
        reported = ours(list(decode_file(str(pcap), decoders)))
        result = pcap.with_suffix(".result")
        if result.exists():
            expected = deepflow_expected(result)
            rows.append((name, len(expected), matched(expected, reported)))
        elif name in COUNTS_ONLY:
            rows.append((name, COUNTS_ONLY[name], min(COUNTS_ONLY[name], len(reported))))
    for trace in sorted((root / KINDLING).rglob("server-trace-*.yml")):
        expected, reported = kindling(trace, decoders)
        rows.append((str(trace.relative_to(root / KINDLING)), len(expected), matched(expected, reported)))
    total = sum(r[1] for r in rows)
    good = sum(r[2] for r in rows)
    for name, expected, hit in rows:
        if hit < expected or args.verbose:
            print(f"{name}: {hit} of {expected}")
    print(f"{good} of {total} transactions match")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"matched": good, "expected": total,
                                                       "files": [list(r) for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
