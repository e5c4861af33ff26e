"""pgbench against PostgreSQL 15 with and without the agent decoding its traffic.

Run (root): .venv/bin/python bench/bench_pgbench.py [--rounds 5] [--seconds 20] [--clients 4]

A PostgreSQL 15 server of its own (a temporary data directory, a free loopback port, fsync off)
is initialised with ``pgbench -i -s SCALE``; then ``pgbench -T SECONDS -c CLIENTS -j 1 -M MODE``
(the default TPC-B-like script, ``-M extended`` by default: Parse/Bind/Execute/Sync per statement)
runs in interleaved pairs, without the agent and with ``python -m deetune.agent --probe tcp
--probe payload --protocol postgres --port PORT --no-store``, so that slow drifts of the shared
machine hit both alike.  Reported: transactions/s and average latency per run, the ratio of each
pair, the medians, and how many of pgbench's statements the agent saw on each side (every
transaction is 7 statements; the agent reports each on the server's and on the client's side; on a
host without idle CPU the agent's overload sampling decodes a share of the connections, and the
table says down to what).
The issue's target: the median ratio of transactions/s >= 0.95.
Saves bench/results/pgbench-STAMP.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import common  # noqa: E402
from tests.protocol_servers import PG_BIN, PG_DB, PG_PASSWORD, PG_USER, Postgres  # noqa: E402

TARGET = 0.95
MODES = ("none", "agent")


def pgbench(pg: Postgres, args: list[str], timeout: float) -> str:
    env = {**os.environ, "PGPASSWORD": PG_PASSWORD}
    out = subprocess.run([str(PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", PG_USER, *args, PG_DB],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench {' '.join(args)} failed: {out.stderr.strip()[-500:]}")
    return out.stdout


def load(pg: Postgres, seconds: int, clients: int, mode: str) -> dict:
    text = pgbench(pg, ["-T", str(seconds), "-c", str(clients), "-j", "1", "-M", mode, "-n"], seconds * 3 + 60)
    tps = float(re.search(r"tps = ([\d.]+)", text).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", text).group(1))
    transactions = int(re.search(r"number of transactions actually processed: (\d+)", text).group(1))
    return {"tps": tps, "latency_ms": latency, "transactions": transactions}


def count_statements(path: str, port: int) -> dict:
    def key(event: dict):
        if event.get("type") != "request" or event.get("protocol") != "postgres":
            return None
        if event["role"] == "server" and event["lport"] == port:
            return "server"
        if event["role"] == "client" and event["rport"] == port:
            return "client"
        return None

    return common.scan_jsonl(path, '"request"', key)


def count_kernel(path: str, port: int) -> dict:
    """pgbench's statements the kernel counted (EXECUTE exchanges, every one: never sampled) per side."""
    out: dict[str, int] = {}
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
        for line in f:
            if '"request_counts"' not in line or '"postgres"' not in line:
                continue
            event = json.loads(line)
            if event.get("method") == "EXECUTE" and event.get("port") == port:
                out[event["role"]] = out.get(event["role"], 0) + event["count"]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=20, help="pgbench -T")
    parser.add_argument("--clients", type=int, default=4, help="pgbench -c")
    parser.add_argument("--scale", type=int, default=5, help="pgbench -i -s")
    parser.add_argument("--protocol", default="extended", choices=["simple", "extended", "prepared"],
                        help="pgbench -M")
    args = parser.parse_args(argv)
    common.require_root()
    pg = Postgres.start()
    tmp = str(pg.dir)
    try:
        pgbench(pg, ["-i", "-s", str(args.scale), "-q"], 600)

        def run(mode: str, index: int) -> dict:
            waited = common.wait_quiet()
            if mode == "none":
                other, t0 = common.OtherCpu(), time.monotonic()
                result = load(pg, args.seconds, args.clients, args.protocol)
                return {"mode": mode, **result, "waited_s": waited, **other.stop(time.monotonic() - t0)}
            jsonl = os.path.join(tmp, f"pgbench-{index}.jsonl")
            agent = common.Agent(["tcp", "payload"], jsonl,
                                 ["--protocol", "postgres", "--port", str(pg.port), "--no-store"]).start()
            try:
                agent.begin_window()
                other, t0 = common.OtherCpu(), time.monotonic()
                result = load(pg, args.seconds, args.clients, args.protocol)
                others = other.stop(time.monotonic() - t0)
                window = agent.end_window()
            finally:
                stopped = agent.stop()
            seen = count_statements(jsonl, pg.port)
            counted = count_kernel(jsonl, pg.port)
            os.unlink(jsonl)
            return {"mode": mode, **result, "waited_s": waited, **others, "window": window,
                    "agent": {k: v for k, v in stopped.items() if k != "summary"},
                    "server_seen": seen.get("server", 0), "client_seen": seen.get("client", 0),
                    "server_counted": counted.get("server", 0), "client_counted": counted.get("client", 0)}

        runs, discarded = common.interleave(MODES, args.rounds, run)
    finally:
        pg.stop()
    base = [r["tps"] for r in runs["none"]]
    with_agent = [r["tps"] for r in runs["agent"]]
    ratios = common.pair_ratios(base, with_agent)
    rows = []
    for i, (a, b) in enumerate(zip(runs["none"], runs["agent"])):
        rows.append([i + 1, common.fmt(a["tps"], 1), common.fmt(b["tps"], 1), f"{ratios[i]:.3f}",
                     common.fmt(a["latency_ms"], 3), common.fmt(b["latency_ms"], 3),
                     f"{common.fmt(b['server_seen'])} / {common.fmt(b['client_seen'])} of "
                     f"{common.fmt(b['transactions'] * 7)}",
                     f"{common.fmt(b.get('server_counted', 0))} / {common.fmt(b.get('client_counted', 0))}",
                     f"1/{b['agent'].get('sparsest_sampling') or 1}",
                     common.fmt(b["window"]["oncpu_cores"], 2),
                     " (disturbed)" if a.get("disturbed") or b.get("disturbed") else ""])
    median_ratio = common.median(ratios)
    rows.append(["median", common.fmt(common.median(base), 1), common.fmt(common.median(with_agent), 1),
                 f"{median_ratio:.3f}", "", "", "", "", "", "", ""])
    text = (f"pgbench -M {args.protocol} -c {args.clients} -T {args.seconds}, scale {args.scale}: transactions/s "
            f"without and with the agent (interleaved pairs)\n"
            + common.table(["round", "tps none", "tps agent", "ratio", "latency ms none", "latency ms agent",
                            "statements seen (server / client)", "counted in the kernel (server / client)",
                            "overload sampling (sparsest)", "agent CPU cores", ""],
                           rows))
    targets = [[f"pgbench tps with the agent / without (median) >= {TARGET}", f"{median_ratio:.3f}",
                "met" if median_ratio >= TARGET else "not met"]]
    out = {"machine": common.machine(), "args": vars(args), "runs": runs, "discarded": discarded,
           "median_ratio": median_ratio}
    return common.report("pgbench", out, [text], targets)


if __name__ == "__main__":
    main()
