"""Cost and fidelity of the kernel's accounting (issue 16), on an idle host and a saturated one.

    sudo .venv/bin/python bench/bench_accounting.py [--rounds 5] [--seconds 10] [--hosts idle,saturated]

The agent runs with its default probes and flags (process, tcp, payload; the store on), against
nginx (``worker_processes 1``, a 1 KiB page, keep-alive; bench_l7.Nginx).  A saturated host has a
busy loop at nice 19 on every CPU, started before and ended after each run, in both modes.

1. Throughput: ``wrk -t1 -c10`` at full speed, no agent and agent interleaved (none, agent, none,
   …, ``--rounds`` pairs, each after a 5 s unmeasured warm-up): the median of the pair ratios, and
   the requests the kernel counted on the server side against what wrk completed (wrk stops
   counting with up to 10 requests in flight per run: counted − completed is in [0, 20]).
2. A fixed rate (bench/loadgen.c, 10 keep-alive connections, ``--rate`` requests/s for
   ``--seconds``): BPF run time of the agent's programs per request and side (``bpf_stats``:
   two clock reads per program run are part of it), the agent's CPU, the exchanges it decoded and
   counted against those the load generator completed.
3. Recovery: a 3 s wrk burst at full speed, then loadgen at 200 requests/s for 8 s: how long
   after the burst until every request is decoded again (each 250 ms from then on has all its
   exchanges decoded; the log shows per 250 ms the exchanges decoded and, in brackets, those
   whose weight is not 1: right after a burst they stand also for its last counts).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_l7 import Nginx, run_wrk  # noqa: E402
from common import fmt, median, pair_ratios  # noqa: E402

PROBES = ["process", "tcp", "payload"]
RECOVERY_RATE = 200
RECOVERY_SECONDS = 8
BUCKET_NS = 250_000_000


def server_side(path: str, port: int, since_mono_ns: int = 0) -> dict[str, float]:
    """What the agent wrote about the server side of ``port``: the kernel's counts (all of them),
    the decoded exchanges since ``since_mono_ns`` and their weights, by 250 ms bucket."""
    counted = decoded = weights = 0
    buckets: dict[int, list[int]] = {}
    with open(path) as lines:
        for line in lines:
            if '"request_counts"' in line:
                e = json.loads(line)
                if e["role"] == "server" and e["port"] == port and e["outcome"] in ("ok", "error"):
                    counted += e["count"]
            elif '"type":"request"' in line:
                e = json.loads(line)
                if e["role"] != "server" or e["lport"] != port or e["ts_mono_ns"] < since_mono_ns:
                    continue
                decoded += 1
                weights += e["sampling"]
                b = buckets.setdefault((e["ts_mono_ns"] - since_mono_ns) // BUCKET_NS, [0, 0])
                b[0] += 1
                b[1] += e["sampling"] != 1
    return {"counted": counted, "decoded": decoded, "weights": weights, "buckets": buckets}


def throughput(nginx: Nginx, tmp: str, rounds: int, seconds: int, saturated: bool) -> dict:
    def run(mode: str, r: int) -> dict:
        common.wait_quiet(max_wait=20)
        with common.busy_loops(saturated):
            if mode == "none":
                run_wrk(nginx.port, 5)
                result = run_wrk(nginx.port, seconds)
                common.log(f"  #{r + 1} none  {result['rps']:>9,.0f} req/s")
                return {"mode": mode, **result}
            jsonl = os.path.join(tmp, f"tp{r}.jsonl")
            agent = common.Agent(PROBES, jsonl).start()
            try:
                warm = run_wrk(nginx.port, 5)
                agent.begin_window()
                result = run_wrk(nginx.port, seconds)
                window = agent.end_window()
                time.sleep(1.5)  # the last read of the counts
            finally:
                stopped = agent.stop()
        seen = server_side(jsonl, nginx.port)
        os.unlink(jsonl)
        completed = warm["requests"] + result["requests"]
        common.log(f"  #{r + 1} agent {result['rps']:>9,.0f} req/s  counted {seen['counted']:,} of {completed:,} "
                   f"completed  cpu {window['oncpu_cores']}  sampled 1/{stopped.get('sparsest_sampling')}")
        return {"mode": mode, **result, "completed": completed, "counted": seen["counted"], "window": window,
                "sparsest_sampling": stopped.get("sparsest_sampling"), "lost": stopped.get("lost")}

    runs, discarded = common.interleave(["none", "agent"], rounds, run)
    ratios = pair_ratios([r["rps"] for r in runs["none"]], [r["rps"] for r in runs["agent"]])
    exact = [0 <= r["counted"] - r["completed"] <= 20 for r in runs["agent"]]
    return {"runs": runs, "discarded_rounds": discarded, "ratios": ratios, "median_ratio": median(ratios),
            "exact_runs": sum(exact), "agent_runs": len(exact)}


def fixed_rate(nginx: Nginx, tmp: str, rate: float, seconds: float, saturated: bool) -> dict:
    gen = common.loadgen()
    jsonl = os.path.join(tmp, "rate.jsonl")
    common.wait_quiet(max_wait=20)
    with common.busy_loops(saturated), common.bpf_stats():
        agent = common.Agent(PROBES, jsonl).start()
        try:
            since = time.monotonic_ns()
            before = common.prog_stats(agent.prog_ids)
            agent.begin_window()
            res = common.run_json([gen, "http", str(nginx.port), "10", str(seconds), str(rate)])
            window = agent.end_window()
            after = common.prog_stats(agent.prog_ids)
            time.sleep(2.5)
        finally:
            stopped = agent.stop()
    bpf = common.stats_between(before, after)
    seen = server_side(jsonl, nginx.port, since)
    os.unlink(jsonl)
    out = {"rate": res["rate"], "done": res["done"], "errors": res["errors"], "window": window,
           "bpf_ns_per_request_side": round(bpf["run_time_ns"] / res["done"] / 2, 1) if res["done"] else None,
           "bpf_programs": bpf["programs"],
           "counted": seen["counted"], "decoded": seen["decoded"], "weights": round(seen["weights"], 1),
           "sparsest_sampling": stopped.get("sparsest_sampling"), "lost": stopped.get("lost")}
    common.log(f"  fixed {out['rate']:,.0f}/s: done {out['done']:,} counted {out['counted']:,} decoded {out['decoded']:,}"
               f"  cpu {window['oncpu_cores']} cores  bpf {out['bpf_ns_per_request_side']} ns/request/side"
               f"  sampled 1/{out['sparsest_sampling']}")
    return out


def recovery(nginx: Nginx, tmp: str, saturated: bool) -> dict:
    gen = common.loadgen()
    jsonl = os.path.join(tmp, "recovery.jsonl")
    common.wait_quiet(max_wait=20)
    with common.busy_loops(saturated):
        agent = common.Agent(PROBES, jsonl).start()
        try:
            run_wrk(nginx.port, 3)
            burst_end = time.monotonic_ns()
            res = common.run_json([gen, "http", str(nginx.port), "10", str(RECOVERY_SECONDS), str(RECOVERY_RATE)])
            time.sleep(2.5)
        finally:
            stopped = agent.stop()
    seen = server_side(jsonl, nginx.port, burst_end)
    os.unlink(jsonl)
    per_bucket = RECOVERY_RATE * BUCKET_NS / 1e9
    last = RECOVERY_SECONDS * 1e9 // BUCKET_NS - 1  # the last whole bucket
    # From the first bucket on which every later one is whole (all decoded, none sampled).
    recovered_at = None
    for b in range(int(last), -1, -1):
        got = seen["buckets"].get(b, [0, 0])
        if got[0] < per_bucket * 0.95:
            break
        recovered_at = b
    seconds = None if recovered_at is None else recovered_at * BUCKET_NS / 1e9
    common.log(f"  recovery: every request decoded again {seconds} s after the burst "
               f"(done {res['done']:,}, decoded {seen['decoded']:,}, sampled 1/{stopped.get('sparsest_sampling')})")
    common.log("  decoded (sampled) per 250 ms after the burst: " + " ".join(
        f"{seen['buckets'].get(b, [0, 0])[0]}({seen['buckets'].get(b, [0, 0])[1]})" for b in range(int(last) + 1)))
    return {"recovered_after_s": seconds, "done": res["done"], "decoded_after_burst": seen["decoded"],
            "buckets": {b: seen["buckets"].get(b, [0, 0]) for b in range(int(last) + 1)},
            "sparsest_sampling": stopped.get("sparsest_sampling")}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved pairs of the throughput runs")
    parser.add_argument("--seconds", type=int, default=10, help="measured seconds of each run")
    parser.add_argument("--rate", type=float, default=10000.0, help="requests/s of the fixed-rate run")
    parser.add_argument("--hosts", default="idle,saturated", help="idle, saturated or both")
    parser.add_argument("--skip", action="append", default=[], choices=["throughput", "rate", "recovery"])
    args = parser.parse_args(argv)
    common.require_root()
    info = common.machine()
    out: dict = {"benchmark": "accounting", "machine": info, "args": vars(args)}
    texts, targets = [], []
    with tempfile.TemporaryDirectory(prefix="deetune-bench-") as tmp:
        nginx = Nginx(tmp)
        try:
            for name in args.hosts.split(","):
                saturated = name == "saturated"
                common.log(f"{name} host")
                part: dict = {}
                if "throughput" not in args.skip:
                    part["throughput"] = t = throughput(nginx, tmp, args.rounds, args.seconds, saturated)
                    targets.append([f"{name}: nginx + wrk throughput with the agent ≥ 0.95 of none",
                                    f"median ratio {fmt(t['median_ratio'], 3)} ({', '.join(fmt(r, 3) for r in t['ratios'])})",
                                    "met" if t["median_ratio"] and t["median_ratio"] >= 0.95 else "MISSED"])
                    targets.append([f"{name}: requests counted exactly at full speed",
                                    f"{t['exact_runs']}/{t['agent_runs']} runs within [0, 20] of wrk's count",
                                    "met" if t["exact_runs"] == t["agent_runs"] else "MISSED"])
                if "rate" not in args.skip:
                    part["fixed_rate"] = f = fixed_rate(nginx, tmp, args.rate, args.seconds, saturated)
                    targets.append([f"{name}: kernel time per request and side ≤ 1 µs (goal 500 ns)",
                                    f"{fmt(f['bpf_ns_per_request_side'])} ns",
                                    "met" if f["bpf_ns_per_request_side"] and f["bpf_ns_per_request_side"] <= 1000 else "MISSED"])
                    full = f["decoded"] >= f["done"] and f["sparsest_sampling"] in (None, 1)
                    targets.append([f"{name}: agent CPU at {args.rate:,.0f} req/s, every exchange decoded ≤ 0.2 cores",
                                    f"{f['window']['oncpu_cores']} cores; decoded {f['decoded']:,} of {f['done']:,}, "
                                    f"counted {f['counted']:,}",
                                    "met" if full and f["window"]["oncpu_cores"] <= 0.2 else "MISSED"])
                if "recovery" not in args.skip:
                    part["recovery"] = r = recovery(nginx, tmp, saturated)
                    targets.append([f"{name}: full detail back after a burst (≤ 2 s when CPU is free)",
                                    f"{fmt(r['recovered_after_s'], 2)} s",
                                    "met" if r["recovered_after_s"] is not None and r["recovered_after_s"] <= 2 else
                                    ("—" if saturated else "MISSED")])
                out[name] = part
        finally:
            nginx.stop()
    return common.report("accounting", out, texts, targets)


if __name__ == "__main__":
    main()
