"""Does the topology store slow the agent's event rate? (issue 4)

    .venv/bin/python bench/bench_store_agent.py [--pairs 5] [--seconds 5] [--rate 10000] [--rate-seconds 10]

The connection benchmark's load (bench/loadgen.c: connect / write 64 B / close over 8 loopback
ports) with the agent in two modes, interleaved (store, no store, store, no store, …):

- ``store``: ``--probe process --probe tcp --sink jsonl:FILE --store FILE`` (the store on, as by default);
- ``no-store``: the same with ``--no-store``.

Two series: at a fixed ``--rate`` (the agent must keep up: records read per second and lost, and
its CPU), and with the load as fast as it goes (the agent cannot keep up: how many records per
second it handles, which is its event rate when saturated).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_connections import NPORTS, one_run  # noqa: E402
from common import fmt, median, pair_ratios, table  # noqa: E402

MODES = {"store": "", "no-store": "--no-store"}


def run(mode: str, label: str, **kw) -> dict:
    saved = os.environ.get("DEETUNE_BENCH_AGENT_ARGS", "")
    os.environ["DEETUNE_BENCH_AGENT_ARGS"] = f"{saved} {MODES[mode]}".strip()
    try:
        result = one_run("agent", label=f"{label} {mode}", **kw)
    finally:
        os.environ["DEETUNE_BENCH_AGENT_ARGS"] = saved
    records = (result.get("summary") or {}).get("records") or 0
    result["mode"] = mode
    result["records_per_s"] = records / result["seconds"] if result.get("seconds") else None
    return result


def report(title: str, runs: dict[str, list[dict]]) -> tuple[str, dict]:
    rows = []
    store, plain = runs["store"], runs["no-store"]
    ratios = pair_ratios([r["records_per_s"] for r in plain], [r["records_per_s"] for r in store])
    for i, (a, b, q) in enumerate(zip(store, plain, ratios)):
        rows.append([i + 1, fmt(a["rate"]), fmt(b["rate"]), fmt(a["records_per_s"]), fmt(b["records_per_s"]), fmt(q, 3),
                     f"{fmt(a['agent'].get('lost'))} / {fmt(b['agent'].get('lost'))}",
                     f"{a['window']['oncpu_cores']} / {b['window']['oncpu_cores']}",
                     f"{a['other_cores']:.2f} / {b['other_cores']:.2f}"])
    rows.append(["median", fmt(median(r["rate"] for r in store)), fmt(median(r["rate"] for r in plain)),
                 fmt(median(r["records_per_s"] for r in store)), fmt(median(r["records_per_s"] for r in plain)),
                 fmt(median(ratios), 3), "", "", ""])
    text = f"{title}\n" + table(
        ["pair", "conn/s (store)", "conn/s (no store)", "records read/s (store)", "records read/s (no store)",
         "store / no store", "lost (store / no store)", "agent CPU, cores (store / no store)",
         "others' CPU (store / no store)"], rows)
    return text, {"median_ratio": median(ratios), "ratios": ratios}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=10000.0)
    parser.add_argument("--rate-seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    common.require_root()
    info = common.machine()
    common.log(f"machine: {info}")
    base = common.free_port_range(NPORTS)
    server = subprocess.Popen([common.loadgen(), "serve", str(base), str(NPORTS)], stdout=subprocess.PIPE, text=True)
    out: dict = {"benchmark": "store_agent", "machine": info, "args": vars(args)}
    texts = []
    try:
        assert server.stdout and server.stdout.readline().strip() == "listening"
        with tempfile.TemporaryDirectory(prefix="deetune-bench-") as tmp:
            for name, kw in (("rate", dict(workers=4, seconds=args.rate_seconds, rate=args.rate)),
                             ("max", dict(workers=2, seconds=args.seconds, rate=0))):
                runs, discarded = common.interleave(
                    list(MODES), args.pairs, lambda mode, r: run(mode, f"{name}#{r + 1}", base=base, tmp=tmp, **kw))
                title = (f"Fixed rate {args.rate:,.0f} connections/s" if name == "rate" else "As fast as the load goes")
                text, summary = report(title, runs)
                texts.append(text)
                out[name] = {"runs": runs, "summary": summary, "discarded_pairs": discarded}
    finally:
        server.terminate()
        server.communicate(timeout=10)
    return common.report("store-agent", out, texts)


if __name__ == "__main__":
    main()
