"""Overhead of the connection probes (issue 2): a loopback connect / send / close loop with and without the agent.

    .venv/bin/python bench/bench_connections.py [--pairs 5] [--seconds 5] [--rate 10000] [--rate-seconds 10] [--saturate] [--warmup 0]

Load: bench/loadgen.c (compiled with gcc at first use).  A C epoll server listens on 8 loopback ports;
client processes loop connect / write 64 bytes / close, round-robin over the ports (8 ports spread
the 4-tuples so that TIME_WAIT never runs out of them; net.ipv4.tcp_tw_reuse=2 reuses them on loopback).
A Python loop reaches only a fraction of this rate on 2 cores, hence C.

At max rate each client waits for the server's close before its next connection (``loadgen
conn-wait``: write, shutdown, read to EOF, close; the same TCP states as a plain close).  Without
the wait (``--open-loop``) the clients outrun the server now and then, its accept queues fill
(4,096 connections each) and the SYNs that overflow are retried a second later: a few such
stalls per run (counted as ``listen_overflows`` and ``over_100ms``) then move the rate by more
than the agent does.

``--saturate`` runs one busy loop per CPU at nice 19 beside the load, with and without the agent:
no CPU is ever idle.  On this VM an idle CPU is slow to wake (the load alone ran 13-22 % faster
beside such loops), and the agent's own activity keeps CPUs awake, so without it the agent can
make the load faster; saturated, the ratio says what the agent costs a host whose CPUs are all
in use (the host's CPU per connection is then not measured: the loops take whatever is left).

``--warmup SECONDS`` runs the same max-rate load that long just before each measured run, in both
modes (beside the busy loops too): the measured run then sees the agent as it runs under that load
for good, its overload sampling settled, rather than its first second (at full speed it decodes flat
out and loses records until its sampling has stepped down, about a second).

Agent: ``python -m deetune.agent -v --probe process --probe tcp --sink jsonl:FILE``.

Two interleaved series, each of ``--pairs`` pairs (no agent, agent, no agent, agent, …):

1. max rate: 2 client processes as fast as they can for ``--seconds``: connections/s ratio
   (target: at most 5 % fewer with the agent), and the host's CPU per connection;
2. fixed rate: ``--rate`` connections/s (default 10,000) for ``--rate-seconds``: p99 connection
   time ratio, and with the agent: records lost (target 0) and close events in the jsonl file vs
   connections made (each connection must be seen closing on both sides).

With the agent it also reports: BPF run time of the agent's programs per program run and per
connection (fixed-rate runs only: the statistics cost two clock reads per program run, which would
count against the agent at max rate); the agent's CPU
(cores, over the load window) and memory (RSS and peak RSS, target ≤ 60 MB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import fmt, median, pair_ratios, table  # noqa: E402

PROBES = ["process", "tcp"]
NPORTS = 8
PAYLOAD = 64


def count_closes(path: str, base: int) -> dict[str, int]:
    """Close events of the benchmark's connections, by side (client: rport in range, server: lport in range)."""
    ports = range(base, base + NPORTS)

    def side(event: dict) -> str | None:
        if event.get("type") != "connection":
            return None
        if event["role"] == "client" and event["rport"] in ports:
            return "client_" + event["phase"]
        if event["role"] == "server" and event["lport"] in ports:
            return "server_" + event["phase"]
        return None

    return common.scan_jsonl(path, '"connection"', side)


def host_cpu_per_conn(busy_cores: float | None, load: dict) -> float | None:
    """The whole host's CPU (load, agent, BPF, softirq) per connection, in µs: the cost the
    throughput shows only while the load has no idle CPU to grow into."""
    return round(busy_cores / load["rate"] * 1e6, 2) if load["rate"] and busy_cores is not None else None


def run_load(argv: Sequence[str], saturate: bool = False, warmup: Sequence[str] | None = None,
             measuring: Callable[[], Any] = lambda: None) -> tuple[dict, float | None, Any]:
    """The load generator's result, with the accept-queue overflows during it; the host's busy
    cores (None beside busy loops, which take whatever the load leaves); and what ``measuring()``,
    called as the measured load begins, returned.  With ``warmup``, that load runs first, not
    measured."""
    with common.busy_loops(saturate, settle=0):
        if warmup:
            common.run_json(warmup)
        measured = measuring()
        overflows, busy = common.listen_overflows(), common.busy_cores_since()
        load = common.run_json(argv)
        busy = common.busy_cores_since(busy)
        load["listen_overflows"] = common.listen_overflows() - overflows
    return load, None if saturate else busy, measured


def one_run(mode: str, *, base: int, workers: int, seconds: float, rate: float, tmp: str, label: str,
            agent_args: Sequence[str] = (), loop: str = "conn", saturate: bool = False, warmup: float = 0.0) -> dict:
    gen = common.loadgen()

    def load_argv(length: float) -> list[str]:
        return [gen, loop, str(base), str(NPORTS), str(workers), str(length), str(rate), str(PAYLOAD)]

    argv, warmup_argv = load_argv(seconds), load_argv(warmup) if warmup else None
    waited = common.wait_quiet()
    if mode == "none":
        load, busy, other = run_load(argv, saturate, warmup_argv, common.OtherCpu)
        result = {"mode": mode, **load, "waited_s": waited, "busy_cores": busy,
                  "host_cpu_us_per_conn": host_cpu_per_conn(busy, load), **other.stop(load["seconds"])}
        common.log(f"  {label} none : {load['rate']:>9,.0f} conn/s  p99 {load['p99_us']} us  errors {load['errors']}  "
                   f"SYN retried {load['listen_overflows']}  others {result['other_cores']} cores")
        return result
    jsonl = os.path.join(tmp, f"conn-{label}.jsonl")
    # BPF run time only at a fixed rate: the statistics' own cost would count against max-rate runs.
    with common.bpf_stats() if rate else contextlib.nullcontext():
        agent = common.Agent(PROBES, jsonl, agent_args).start()
        try:
            foreign = common.foreign_programs(agent.prog_ids)

            def measuring() -> tuple[dict, common.OtherCpu]:
                before = common.prog_stats(agent.prog_ids)
                agent.begin_window()
                return before, common.OtherCpu()

            load, busy, (before, other) = run_load(argv, saturate, warmup_argv, measuring)
            window = agent.end_window()
            others = other.stop(load["seconds"])
            after = common.prog_stats(agent.prog_ids)
        finally:
            stopped = agent.stop()
    bpf = common.stats_between(before, after)
    closes = count_closes(jsonl, base)
    os.unlink(jsonl)
    done = load["done"]
    result = {
        "mode": mode,
        **load,
        "waited_s": waited,
        "busy_cores": busy,
        "host_cpu_us_per_conn": host_cpu_per_conn(busy, load),
        **others,
        "agent": {k: v for k, v in stopped.items() if k != "summary"},
        "summary": stopped.get("summary"),
        "window": window,
        "bpf": bpf,
        "bpf_ns_per_run": round(bpf["run_time_ns"] / bpf["run_cnt"], 1) if bpf["run_time_ns"] else None,
        "bpf_ns_per_conn": round(bpf["run_time_ns"] / done, 1) if done and bpf["run_time_ns"] else None,
        "events": closes,
        "client_closes_seen": closes.get("client_close", 0),
        "server_closes_seen": closes.get("server_close", 0),
        "foreign_programs": len(foreign),
    }
    common.log(
        f"  {label} agent: {load['rate']:>9,.0f} conn/s  p99 {load['p99_us']} us  errors {load['errors']}  "
        f"SYN retried {load['listen_overflows']}  lost {stopped.get('lost')}  closes seen client {result['client_closes_seen']:,} server "
        f"{result['server_closes_seen']:,} / {done:,}  cpu {window['cpu_cores']} cores  hwm {window['hwm_mb']} MB  "
        f"bpf {result['bpf_ns_per_conn']} ns/conn  stop {stopped.get('stop_s')} s  "
        f"startup {stopped.get('startup_s')} s (tcp table {stopped.get('tcp_table_at_start')})  others {others['other_cores']} cores"
    )
    return result


def series(name: str, pairs: int, **kw) -> tuple[dict[str, list[dict]], list]:
    return common.interleave(["none", "agent"], pairs, lambda mode, r: one_run(mode, label=f"{name}#{r + 1}", **kw))


def report_series(title: str, runs: dict[str, list[dict]], metric: str, unit: str, digits: int = 0) -> tuple[str, dict]:
    a = [r[metric] for r in runs["none"]]
    b = [r[metric] for r in runs["agent"]]
    ratios = pair_ratios(a, b)
    others = [f"{x['other_cores']:.2f} / {y['other_cores']:.2f}" + (" (disturbed)" if x.get("disturbed") or y.get("disturbed") else "")
              for x, y in zip(runs["none"], runs["agent"])]
    rows = [[i + 1, fmt(float(x), digits), fmt(float(y), digits), fmt(q, 3), o]
            for i, (x, y, q, o) in enumerate(zip(a, b, ratios, others))]
    rows.append(["median", fmt(float(median(a)), digits), fmt(float(median(b)), digits), fmt(median(ratios), 3), ""])
    text = f"{title}\n" + table(["pair", f"no agent ({unit})", f"agent ({unit})", "agent / no agent",
                                  "others' CPU, cores (no agent / agent)"], rows)
    return text, {"none": a, "agent": b, "ratios": ratios, "median_none": median(a), "median_agent": median(b),
                  "median_ratio": median(ratios)}


def agent_table(runs: list[dict]) -> str:
    rows = []
    for i, r in enumerate(runs):
        rows.append([
            i + 1, fmt(r["done"]), fmt(r["client_closes_seen"]), fmt(r["server_closes_seen"]),
            fmt(r["agent"].get("lost")), fmt(r["summary"]["records"] if r.get("summary") else None),
            fmt(r["window"]["oncpu_cores"], 2), fmt(r["window"]["runq_wait_s"], 2), fmt(r["window"]["rss_mb"], 1),
            fmt(r["window"]["hwm_mb"], 1), fmt(r["agent"].get("tcp_table_at_start")),
            fmt(r["bpf"]["run_cnt"]), fmt(r["bpf_ns_per_run"], 0), fmt(r["bpf_ns_per_conn"], 0),
            fmt(r["agent"].get("stop_s"), 1), fmt(r["other_cores"], 2),
        ])
    return table(["run", "connections", "client closes seen", "server closes seen", "lost", "records", "agent CPU (cores)",
                  "agent run-queue wait s", "RSS MB", "peak RSS MB", "/proc/net/tcp lines at start", "BPF runs",
                  "BPF ns/run", "BPF ns/conn", "stop s", "others' CPU (cores)"], rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a max-rate run")
    parser.add_argument("--workers", type=int, default=2, help="client processes of a max-rate run")
    parser.add_argument("--rate", type=float, default=10000.0, help="connections/s of the fixed-rate series")
    parser.add_argument("--rate-seconds", type=float, default=10.0)
    parser.add_argument("--rate-workers", type=int, default=4)
    parser.add_argument("--open-loop", action="store_true",
                        help="max rate: clients close without waiting for the server (see above)")
    parser.add_argument("--saturate", action="store_true",
                        help="max rate: one busy loop per CPU at nice 19 beside the load, in both modes (see above)")
    parser.add_argument("--warmup", type=float, default=0.0, metavar="SECONDS",
                        help="max rate: run the same load this long before each measured run, in both modes (see above)")
    parser.add_argument("--skip-max", action="store_true")
    parser.add_argument("--skip-rate", action="store_true")
    parser.add_argument("--agent-arg", action="append", default=[], metavar="ARG",
                        help="pass ARG to the agent (repeatable), e.g. --agent-arg=--nice --agent-arg=idle")
    args = parser.parse_args(argv)
    common.require_root()
    info = common.machine()
    common.log(f"machine: {info}")
    base = common.free_port_range(NPORTS)
    gen = common.loadgen()
    server = subprocess.Popen([gen, "serve", str(base), str(NPORTS)], stdout=subprocess.PIPE, text=True)
    out: dict = {"benchmark": "connections", "machine": info, "args": vars(args), "probes": PROBES, "ports": [base, base + NPORTS - 1]}
    texts = []
    try:
        assert server.stdout and server.stdout.readline().strip() == "listening"
        with tempfile.TemporaryDirectory(prefix="deetune-bench-") as tmp:
            if not args.skip_max:
                common.log(f"max rate: {args.workers} client processes, {args.seconds} s per run, {args.pairs} pairs")
                loop = "conn" if args.open_loop else "conn-wait"
                runs, discarded = series("max", args.pairs, base=base, workers=args.workers, seconds=args.seconds, rate=0, tmp=tmp,
                                         agent_args=args.agent_arg, loop=loop, saturate=args.saturate, warmup=args.warmup)
                beside = ", beside a busy loop per CPU" if args.saturate else ""
                beside += f", after {args.warmup:g} s of the same load" if args.warmup else ""
                text, summary = report_series(
                    f"Max rate, {args.workers} client processes ({loop}{beside}), {args.seconds:g} s per run: connections/s",
                    runs, "rate", "conn/s")
                overflow_text, _ = report_series(
                    "Same runs: SYNs retried a second later because an accept queue was full", runs, "listen_overflows", "")
                cpu_text, cpu_summary = report_series(
                    "Same runs: the host's CPU per connection (µs; load, agent, BPF and softirq together)",
                    runs, "host_cpu_us_per_conn", "µs", 1) if not args.saturate else ("", None)
                texts += [t for t in (text, cpu_text, overflow_text) if t]
                texts.append("With the agent (max rate):\n" + agent_table(runs["agent"]))
                out["max_rate"] = {"runs": runs, "summary": summary, "host_cpu": cpu_summary, "discarded_pairs": discarded}
            if not args.skip_rate:
                common.log(f"fixed rate: {args.rate:g} conn/s, {args.rate_seconds} s per run, {args.pairs} pairs")
                runs, discarded = series("rate", args.pairs, base=base, workers=args.rate_workers, seconds=args.rate_seconds,
                              rate=args.rate, tmp=tmp, agent_args=args.agent_arg)
                text, summary = report_series(
                    f"Fixed rate {args.rate:,.0f} connections/s, {args.rate_seconds:g} s per run: achieved connections/s",
                    runs, "rate", "conn/s")
                text2, summary2 = report_series("Same runs: p99 time of one connect/write/close (µs)", runs, "p99_us", "µs")
                texts += [text, text2, f"With the agent (fixed rate {args.rate:,.0f}/s):\n" + agent_table(runs["agent"])]
                out["fixed_rate"] = {"runs": runs, "summary": summary, "p99": summary2, "discarded_pairs": discarded}
    finally:
        server.terminate()
        accepted = server.communicate(timeout=10)[0].strip().splitlines()
        out["server"] = json.loads(accepted[-1]) if accepted and accepted[-1].startswith("{") else None

    targets = []
    if "max_rate" in out:
        ratio = out["max_rate"]["summary"]["median_ratio"]
        hwm = max(r["window"]["hwm_mb"] for r in out["max_rate"]["runs"]["agent"])
        when = "max rate, CPUs saturated" if args.saturate else "max rate"
        targets.append([f"≤ 5 % fewer connections/s with the agent ({when})", f"median ratio {ratio:.3f}",
                        "met" if ratio >= 0.95 else "MISSED"])
    if "fixed_rate" in out:
        agent_runs = out["fixed_rate"]["runs"]["agent"]
        lost = [r["agent"].get("lost") for r in agent_runs]
        complete = [r["client_closes_seen"] == r["done"] and r["server_closes_seen"] == r["done"] for r in agent_runs]
        targets.append([f"no event lost at {args.rate:,.0f} connections/s", f"lost per run: {lost}",
                        "met" if all(l == 0 for l in lost) else "MISSED"])
        targets.append(["every connection seen closing (client and server side)",
                        f"{sum(complete)}/{len(complete)} runs complete",
                        "met" if all(complete) else "MISSED"])
        hwm_rate = max(r["window"]["hwm_mb"] for r in agent_runs)
        hwm = max(hwm, hwm_rate) if "max_rate" in out else hwm_rate
    if "max_rate" in out or "fixed_rate" in out:
        targets.append(["agent peak RSS ≤ 60 MB", f"max {hwm:.1f} MB", "met" if hwm <= 60 else "MISSED"])
    return common.report("connections", out, texts, targets)


if __name__ == "__main__":
    main()
