"""Overhead of traffic recording: nginx + wrk, decoding on without a task vs with a recording task.

    .venv/bin/python bench/bench_recording.py [--rounds 5] [--wrk-seconds 10]

nginx as in bench_l7.py (one worker, a 1 KiB static page, keep-alive, ``sendfile off``, access log
off); ``wrk -t1 -c10 -d10s --latency``.  Three modes, interleaved round by round (none, decode,
record, none, decode, record, …):

- ``none``: no agent;
- ``decode``: ``--probe tcp --probe payload --port PORT --api 127.0.0.1:P`` (bench_l7.py's
  decode-port mode, plus the API), no recording task;
- ``record``: the same agent with a recording task on nginx created through the API before wrk
  starts (``{"server": "nginx", "client": "wrk"}``: every exchange, 64 KiB limit, redaction on);
  the kernel copies up to 64 KiB per syscall on nginx's port, the L7 handler keeps the bytes, the
  recorder redacts and the store writes every exchange.

Reported per round: throughput and its ratio to the round's no-agent run, throughput lost
(1 − ratio), p99; with the agent: its CPU, RSS, BPF time per request; with the task: exchanges
recorded (the task's counter and the rows in the store), recorded per second of load, dropped.
Target: recording loses at most 10 percentage points more throughput than decoding alone
(median of the per-round differences).

Then at fixed rates (``--rate``, default 1000 and 3000 requests/s; bench/loadgen.c over 10
keep-alive connections for ``--rate-seconds``), where the agent keeps up, decode and record
alternately (``--rate-runs`` pairs): every request recorded and stored, and the agent's CPU with
and without the task — the extra CPU per recorded exchange, a figure the machine's other load
disturbs less than throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_l7 import Nginx, run_wrk  # noqa: E402
from common import fmt, median, pair_ratios, table  # noqa: E402

MODES = ["none", "decode", "record"]


#: The agents' API token (--api-token): recording tasks need one.
TOKEN = f"bench-{os.getpid()}"


def api(port: int, method: str, path: str, body=None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data else {}
    headers["Authorization"] = f"Bearer {TOKEN}"
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def wait_api(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the agent's API did not answer")


def stored_rows(store: str, task_id: str) -> int:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM recorded_exchanges WHERE task_id = ?", (task_id,)).fetchone()[0]
    finally:
        conn.close()


def server_requests(path: str, port: int) -> int:
    counts = common.scan_jsonl(path, '"request"', lambda e: "server" if e.get("type") == "request"
                               and e.get("role") == "server" and e.get("lport") == port else None)
    return counts.get("server", 0)


def run(mode: str, nginx: Nginx, tmp: str, label: str, seconds: int) -> dict:
    waited = common.wait_quiet()
    if mode == "none":
        other, busy, t0 = common.OtherCpu(), common.busy_cores_since(), time.monotonic()
        result = run_wrk(nginx.port, seconds)
        wall = time.monotonic() - t0
        return {"mode": mode, **result, "waited_s": waited, "busy_cores": common.busy_cores_since(busy),
                **other.stop(wall)}
    api_port = common.free_port()
    jsonl = os.path.join(tmp, f"{label}-{mode}.jsonl")
    agent = common.Agent(["tcp", "payload"], jsonl, ["--port", str(nginx.port), "--api", f"127.0.0.1:{api_port}",
                                                       "--api-token", TOKEN])
    agent.start()
    task = None
    try:
        wait_api(api_port)
        if mode == "record":
            task = api(api_port, "POST", "/api/recordings", {"server": "nginx", "client": "wrk"})
            if nginx.port not in task["ports"]:
                raise RuntimeError(f"the task does not record nginx's port: {task}")
        before = common.prog_stats(agent.prog_ids)
        agent.begin_window()
        other, busy, t0 = common.OtherCpu(), common.busy_cores_since(), time.monotonic()
        result = run_wrk(nginx.port, seconds)
        wall = time.monotonic() - t0
        window = agent.end_window()
        busy = common.busy_cores_since(busy)
        others = other.stop(wall)
        after = common.prog_stats(agent.prog_ids)
        status = None
        if task is not None:
            time.sleep(1.0)  # the last exchanges reach the recorder
            status = api(api_port, "POST", f"/api/recordings/{task['id']}/stop")
        store = agent.store
        rows = None
        if task is not None:
            time.sleep(1.5)  # the store sink commits about every second
            rows = stored_rows(store, task["id"])
    finally:
        stopped = agent.stop()
    bpf = common.stats_between(before, after)
    observed = server_requests(jsonl, nginx.port)
    os.unlink(jsonl)
    requests = result["requests"]
    out = {
        "mode": mode, **result, "waited_s": waited, "busy_cores": busy, **others,
        "agent": {k: v for k, v in stopped.items() if k != "summary"}, "summary": stopped.get("summary") or {},
        "window": window, "bpf": bpf,
        # None: BPF statistics stay off in throughput runs (their clock reads would count as overhead).
        "bpf_ns_per_request": round(bpf["run_time_ns"] / requests, 1) if requests and bpf["run_time_ns"] else None,
        "server_observed": observed,
    }
    if status is not None:
        out["task"] = status
        out["stored"] = rows
        out["recorded_per_s"] = round(status["recorded"] / wall, 1)
    return out


def fixed_rate(mode: str, nginx: Nginx, tmp: str, rate: float, seconds: float) -> dict:
    """loadgen at ``rate`` requests/s; in ``record`` mode a task records them all (client ``loadgen``)."""
    gen = common.loadgen()
    api_port = common.free_port()
    jsonl = os.path.join(tmp, f"rate-{rate:g}-{mode}.jsonl")
    agent = common.Agent(["tcp", "payload"], jsonl, ["--port", str(nginx.port), "--api", f"127.0.0.1:{api_port}",
                                                       "--api-token", TOKEN])
    agent.start()
    status, rows = None, None
    try:
        wait_api(api_port)
        task = api(api_port, "POST", "/api/recordings", {"server": "nginx", "client": "loadgen"}) \
            if mode == "record" else None
        agent.begin_window()
        result = common.run_json([gen, "http", str(nginx.port), "10", str(seconds), str(rate)])
        window = agent.end_window()
        if task is not None:
            time.sleep(1.0)
            status = api(api_port, "POST", f"/api/recordings/{task['id']}/stop")
            time.sleep(1.5)
            rows = stored_rows(agent.store, task["id"])
    finally:
        stopped = agent.stop()
    observed = server_requests(jsonl, nginx.port)
    os.unlink(jsonl)
    out = {"mode": mode, "rate": rate, "achieved": result["rate"], "done": result["done"], "errors": result["errors"],
           "p99_us": result["p99_us"], "server_observed": observed, "lost": stopped.get("lost"),
           "oncpu_cores": window["oncpu_cores"], "hwm_mb": window["hwm_mb"]}
    if status is not None:
        out.update(recorded=status["recorded"], stored=rows, dropped=status["dropped_by"])
    common.log(f"  rate {rate:,.0f}/s {mode:<7}: done {out['done']:,} seen {observed:,} lost {out['lost']}"
               f" cpu {out['oncpu_cores']} cores" + (f" recorded {out['recorded']:,} stored {rows:,} dropped "
                                                      f"{out['dropped']}" if status is not None else ""))
    return out


def log_run(label: str, r: dict) -> None:
    line = f"  {label:<10} {r['mode']:<7} {r['rps']:>9,.0f} req/s  p99 {r['p99_us']:>7,.0f} us  others {r['other_cores']} cores"
    if r["mode"] != "none":
        line += (f"  seen {r['server_observed']:,}/{r['requests']:,}  lost {r['agent'].get('lost')}"
                 f"  cpu {r['window']['oncpu_cores']}  rss {r['window']['rss_mb']} MB  bpf {r['bpf_ns_per_request']} ns/req")
    if "task" in r:
        t = r["task"]
        line += f"  recorded {t['recorded']:,} ({r['recorded_per_s']:,.0f}/s) stored {r['stored']:,} dropped {t['dropped_by']}"
    common.log(line)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--rate", type=float, action="append", help="fixed rates (requests/s; default 1000, 3000)")
    parser.add_argument("--rate-seconds", type=float, default=10.0)
    parser.add_argument("--rate-runs", type=int, default=3, help="decode/record pairs per rate")
    args = parser.parse_args(argv)
    args.rate = args.rate or [1000.0, 3000.0]
    common.require_root()
    info = common.machine()
    common.log(f"machine: {info}")
    out: dict = {"benchmark": "recording", "machine": info, "args": vars(args), "modes": MODES,
                 "versions": {"nginx": common.tool_version(["nginx", "-v"]),
                              "wrk": common.tool_version(["wrk", "--version"])}}
    with tempfile.TemporaryDirectory(prefix="deetune-bench-") as tmp:
        nginx = Nginx(tmp)
        try:
            common.log(f"nginx :{nginx.port} + wrk -t1 -c10 -d{args.wrk_seconds}s, {args.rounds} rounds of {MODES}")

            def one(mode: str, r: int) -> dict:
                res = run(mode, nginx, tmp, f"r{r}", args.wrk_seconds)
                log_run(f"round {r + 1}", res)
                return res

            runs, discarded = common.interleave(MODES, args.rounds, one)
            rates = []
            for rate in args.rate:
                for _ in range(args.rate_runs):
                    for mode in ("decode", "record"):
                        common.wait_quiet()
                        rates.append(fixed_rate(mode, nginx, tmp, rate, args.rate_seconds))
        finally:
            nginx.stop()
    out["runs"], out["discarded_rounds"], out["fixed_rate"] = runs, discarded, rates

    base = [r["rps"] for r in runs["none"]]
    decode_ratio = pair_ratios(base, [r["rps"] for r in runs["decode"]])
    record_ratio = pair_ratios(base, [r["rps"] for r in runs["record"]])
    extra_loss = [None if d is None or c is None else d - c for d, c in zip(decode_ratio, record_ratio)]
    rows = []
    for i in range(len(base)):
        d, c = runs["decode"][i], runs["record"][i]
        rows.append([i + 1, fmt(base[i], 0),
                     f"{fmt(d['rps'], 0)} ({1 - decode_ratio[i]:.1%})" if decode_ratio[i] else "",
                     f"{fmt(c['rps'], 0)} ({1 - record_ratio[i]:.1%})" if record_ratio[i] else "",
                     f"{extra_loss[i]:.1%}" if extra_loss[i] is not None else "",
                     fmt(c["task"]["recorded"]), fmt(c["stored"]), fmt(c["recorded_per_s"], 0),
                     fmt(c["task"]["dropped"]), f"{fmt(d['window']['oncpu_cores'], 2)} / {fmt(c['window']['oncpu_cores'], 2)}",
                     f"{fmt(d['window']['hwm_mb'], 0)} / {fmt(c['window']['hwm_mb'], 0)}",
                     f"{fmt(d['bpf_ns_per_request'], 0)} / {fmt(c['bpf_ns_per_request'], 0)}",
                     " / ".join(f"{runs[m][i]['other_cores']:.2f}" for m in MODES)])
    summary = {
        "median_rps": {m: median(r["rps"] for r in runs[m]) for m in MODES},
        "median_decode_loss": 1 - median(decode_ratio), "median_record_loss": 1 - median(record_ratio),
        "median_extra_loss": median(extra_loss),
        "median_recorded_per_s": median(r["recorded_per_s"] for r in runs["record"]),
        "median_p99_us": {m: median(r["p99_us"] for r in runs[m]) for m in MODES},
    }
    out["summary"] = summary
    rows.append(["median", fmt(summary["median_rps"]["none"], 0),
                 f"{fmt(summary['median_rps']['decode'], 0)} ({summary['median_decode_loss']:.1%})",
                 f"{fmt(summary['median_rps']['record'], 0)} ({summary['median_record_loss']:.1%})",
                 f"{summary['median_extra_loss']:.1%}", "", "", fmt(summary["median_recorded_per_s"], 0), "", "", "",
                 "", ""])
    text = ("nginx + wrk: requests/s (throughput lost vs the same round's no-agent run)\n"
            + table(["round", "none", "decode", "record", "extra loss (record − decode)", "recorded (task)",
                     "rows stored", "recorded/s", "dropped", "agent CPU cores (decode / record)",
                     "peak RSS MB (d / r)", "BPF ns/req (d / r)", "others' CPU cores (none / decode / record)"], rows))
    text += "\n\np99 latency µs (median): " + ", ".join(f"{m} {fmt(summary['median_p99_us'][m], 0)}" for m in MODES)
    met = summary["median_extra_loss"] is not None and summary["median_extra_loss"] <= 0.10
    targets = [["recording loses ≤ 10 points more throughput than decoding alone",
                f"median extra loss {summary['median_extra_loss']:.1%}", "met" if met else "MISSED"]]
    complete = all(r["stored"] == r["task"]["recorded"] for r in runs["record"])
    targets.append(["every recorded exchange stored", "yes" if complete else "no", "met" if complete else "MISSED"])
    text += (f"\n\nFixed rates (loadgen, 10 keep-alive connections, {args.rate_seconds:g} s each):\n"
             + table(["rate", "mode", "achieved req/s", "requests done", "server-side seen", "recorded", "stored",
                      "dropped", "lost (kernel)", "agent CPU (cores)", "peak RSS MB"],
                     [[fmt(r["rate"], 0), r["mode"], fmt(r["achieved"], 0), fmt(r["done"]), fmt(r["server_observed"]),
                       fmt(r.get("recorded")), fmt(r.get("stored")),
                       fmt(sum(r["dropped"].values())) if "dropped" in r else "–", fmt(r["lost"]),
                       fmt(r["oncpu_cores"], 2), fmt(r["hwm_mb"], 0)] for r in rates]))
    cpu_rows = []
    for rate in args.rate:
        dec = median(r["oncpu_cores"] for r in rates if r["rate"] == rate and r["mode"] == "decode")
        rec = median(r["oncpu_cores"] for r in rates if r["rate"] == rate and r["mode"] == "record")
        per = (rec - dec) / rate * 1e6 if dec is not None and rec is not None else None
        cpu_rows.append([fmt(rate, 0), fmt(dec, 3), fmt(rec, 3), fmt(per, 1)])
        summary.setdefault("fixed_rate", {})[str(int(rate))] = {"decode_cores": dec, "record_cores": rec,
                                                                "extra_us_per_exchange": per}
    text += "\n\nAgent CPU at fixed rates (median):\n" + table(
        ["rate", "decode (cores)", "record (cores)", "extra µs of agent CPU per recorded exchange"], cpu_rows)
    all_recorded = all(r["recorded"] == r["stored"] == r["done"] for r in rates if r["mode"] == "record")
    targets.append(["every request recorded at the fixed rates", "yes" if all_recorded else "no",
                    "met" if all_recorded else "MISSED"])
    return common.report("recording", out, [text], targets)


if __name__ == "__main__":
    main()
