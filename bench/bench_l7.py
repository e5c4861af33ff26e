"""Overhead of L7 decoding (issue 3): nginx + wrk and redis-server + redis-benchmark, with and without the agent.

    .venv/bin/python bench/bench_l7.py [--rounds 5] [--wrk-seconds 10] [--warmup 5] [--requests 200000] [--rate 10000]

Servers, each in its own temporary directory: nginx (``worker_processes 1``, a 1 KiB static page,
keep-alive, ``sendfile off`` so that the body goes through write(2)/writev(2), access log off) and
redis-server (``--save '' --appendonly no``).  Four modes, interleaved round by round
(none, tcp, decode-port, decode-all, none, tcp, …):

- ``none``: no agent;
- ``tcp``: ``--probe tcp`` (connection events only);
- ``decode-port``: ``--probe tcp --probe payload --port PORT`` (payload captured for the server's port only);
- ``decode-all``: ``--probe tcp --probe payload`` (every TCP socket of the host is captured and decoded).

Loads: ``wrk -t1 -c10 -d10s --latency`` (throughput, p99) and ``redis-benchmark -t get,set -n 200000
-c 10 --csv`` (throughput and p99 of GET and SET), each after an unmeasured warm-up with the same
load in every mode (``--warmup``: 5 s of wrk, one redis-benchmark): an agent that has been running
when the load arrives adapts its overload sampling within 1-2 s, and the figures are those of the
agent afterwards; ``--warmup 0`` measures from a cold start.  With the agent: BPF run time of its programs per
request (fixed-rate runs only), agent CPU and RSS, records lost, and requests observed: ``"type":"request"`` events of the
server side (and of the client side) vs the requests the load generator completed.  wrk stops
counting at its deadline while up to 10 requests (one per connection) are still in flight, which
the server answers and the agent sees: observed − reported is expected in [0, 10].  redis-benchmark
sends exactly -n commands of each type: counts must match exactly.

Every-request check at a fixed rate: bench/loadgen.c sends ``--rate`` requests/s (default 10,000)
over 10 keep-alive connections for 10 s, to nginx (GET /) and to redis (GET), with the agent in
decode-port mode; it counts completed requests, which must equal the exchanges the agent reports on
the server side and on the client side.

Decoders alone: bench/bench_http_decoder.py and bench/bench_redis_decoder.py (one core, CPU time).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import fmt, median, pair_ratios, table  # noqa: E402

MODES = ["none", "tcp", "decode-port", "decode-all"]
PAGE = (b"<html><body>" + b"deetune benchmark page " * 43 + b"</body></html>\n")[:1024]


# -- servers ---------------------------------------------------------------------------------------------
class Nginx:
    def __init__(self, tmp: str):
        self.dir = os.path.join(tmp, "nginx")
        os.makedirs(os.path.join(self.dir, "www"))
        with open(os.path.join(self.dir, "www", "index.html"), "wb") as f:
            f.write(PAGE)
        self.port = common.free_port()
        conf = textwrap.dedent(f"""\
            daemon off;
            master_process on;
            worker_processes 1;
            user root;
            pid {self.dir}/nginx.pid;
            error_log {self.dir}/error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                sendfile off;
                keepalive_timeout 65;
                keepalive_requests 10000000;
                client_body_temp_path {self.dir}/body;
                proxy_temp_path {self.dir}/proxy;
                fastcgi_temp_path {self.dir}/fastcgi;
                uwsgi_temp_path {self.dir}/uwsgi;
                scgi_temp_path {self.dir}/scgi;
                default_type text/html;
                server {{
                    listen 127.0.0.1:{self.port};
                    root {self.dir}/www;
                    location / {{ }}
                }}
            }}
        """)
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen(["nginx", "-c", self.conf, "-p", self.dir], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        common.wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()  # the master stops its worker
        self.proc.wait(20)


class Redis:
    def __init__(self, tmp: str):
        self.dir = os.path.join(tmp, "redis")
        os.makedirs(self.dir)
        self.port = common.free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--daemonize", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        common.wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


# -- loads -----------------------------------------------------------------------------------------------
_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def run_wrk(port: int, seconds: int) -> dict:
    out = subprocess.run(["wrk", "-t1", "-c10", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/index.html"],
                         capture_output=True, text=True, timeout=seconds + 60)
    text = out.stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+),", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    errors = re.search(r"Socket errors: (.*)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if not (m and rps and p99):
        raise RuntimeError(f"cannot parse wrk output:\n{text}\n{out.stderr}")
    return {
        "requests": int(m.group(1)),
        "rps": float(rps.group(1)),
        "p99_us": float(p99.group(1)) * _UNITS[p99.group(2)],
        "p50_us": float(p50.group(1)) * _UNITS[p50.group(2)] if p50 else None,
        "socket_errors": errors.group(1) if errors else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def run_redis_benchmark(port: int, requests: int) -> dict:
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "get,set", "-n", str(requests),
                          "-c", "10", "--csv"], capture_output=True, text=True, timeout=600)
    rows = {}
    for line in out.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells[0] in ("GET", "SET"):
            rows[cells[0]] = {"rps": float(cells[1]), "p50_ms": float(cells[4]), "p99_ms": float(cells[6])}
    if set(rows) != {"GET", "SET"}:
        raise RuntimeError(f"cannot parse redis-benchmark output:\n{out.stdout}\n{out.stderr}")
    total_time = sum(requests / r["rps"] for r in rows.values())
    return {
        "requests": 2 * requests,
        "rps": 2 * requests / total_time,  # both tests together
        "get_rps": rows["GET"]["rps"], "set_rps": rows["SET"]["rps"],
        "p99_us": max(rows["GET"]["p99_ms"], rows["SET"]["p99_ms"]) * 1000,
        "get_p99_us": rows["GET"]["p99_ms"] * 1000, "set_p99_us": rows["SET"]["p99_ms"] * 1000,
    }


def agent_args(mode: str, port: int) -> tuple[list[str], list[str]]:
    if mode == "tcp":
        return ["tcp"], []
    if mode == "decode-port":
        return ["tcp", "payload"], ["--port", str(port)]
    if mode == "decode-all":
        return ["tcp", "payload"], []
    raise ValueError(mode)


def count_requests(path: str, port: int, protocol: str, since_mono_ns: int = 0) -> dict[str, int]:
    """Exchanges of the benchmark's server since a CLOCK_MONOTONIC instant (the warm-up's are
    not counted), by side and method: server_GET, client_SET …"""

    def key(event: dict):
        if event.get("type") != "request" or event.get("protocol") != protocol:
            return None
        if event["ts_mono_ns"] < since_mono_ns:
            return None
        if event["role"] == "server" and event["lport"] == port:
            return f"server_{event['method']}"
        if event["role"] == "client" and event["rport"] == port:
            return f"client_{event['method']}"
        return None

    return common.scan_jsonl(path, '"request"', key)


def with_agent(mode: str, port: int, tmp: str, label: str, load, protocol: str, *, bpf_stats: bool = False,
               warmup=None) -> dict:
    """Run ``load()`` (returns a dict with "requests") under the agent in ``mode``.  ``bpf_stats``:
    measure the programs' run time (fixed-rate runs only: the statistics cost two clock reads
    per program run, which a throughput run would charge to the agent).  ``warmup()``, when
    given, loads the server first, unmeasured, in every mode (with the agent: until its overload
    sampling has settled, as it would have on a host it has been running on)."""
    waited = common.wait_quiet()
    if mode == "none":
        if warmup:
            warmup()
        other, busy, t0 = common.OtherCpu(), common.busy_cores_since(), time.monotonic()
        result = load()
        wall = time.monotonic() - t0
        return {"mode": mode, **result, "waited_s": waited, "busy_cores": common.busy_cores_since(busy), **other.stop(wall)}
    probes, extra = agent_args(mode, port)
    jsonl = os.path.join(tmp, f"{label}-{mode}.jsonl")
    with common.bpf_stats() if bpf_stats else contextlib.nullcontext():
        agent = common.Agent(probes, jsonl, extra).start()
        try:
            if warmup:
                warmup()
            measured_from_ns = time.monotonic_ns()
            before = common.prog_stats(agent.prog_ids)
            agent.begin_window()
            other, busy, t0 = common.OtherCpu(), common.busy_cores_since(), time.monotonic()
            result = load()
            wall = time.monotonic() - t0
            window = agent.end_window()
            busy = common.busy_cores_since(busy)
            others = other.stop(wall)
            after = common.prog_stats(agent.prog_ids)
        finally:
            stopped = agent.stop()
    bpf = common.stats_between(before, after)
    observed = count_requests(jsonl, port, protocol, measured_from_ns)
    os.unlink(jsonl)
    requests = result["requests"]
    summary = stopped.get("summary") or {}
    return {
        "mode": mode, **result, "waited_s": waited, "busy_cores": busy, **others,
        "agent": {k: v for k, v in stopped.items() if k != "summary"},
        "summary": summary,
        "window": window,
        "bpf": bpf,
        "bpf_ns_per_request": round(bpf["run_time_ns"] / requests, 1) if requests and bpf["run_time_ns"] else None,
        "bpf_ns_per_run": round(bpf["run_time_ns"] / bpf["run_cnt"], 1) if bpf["run_time_ns"] else None,
        "observed": observed,
        "server_observed": sum(v for k, v in observed.items() if k.startswith("server_")),
        "client_observed": sum(v for k, v in observed.items() if k.startswith("client_")),
    }


def log_run(label: str, r: dict) -> None:
    line = f"  {label:<14} {r['mode']:<12} {r['rps']:>10,.0f} req/s  p99 {r['p99_us']:>7,.0f} us  others {r['other_cores']} cores"
    if r["mode"] != "none":
        line += (f"  lost {r['agent'].get('lost')}  sampled 1/{r['agent'].get('sparsest_sampling')}  seen server {r['server_observed']:,} client {r['client_observed']:,}"
                 f" / {r['requests']:,}  cpu {r['window']['oncpu_cores']}  rss {r['window']['rss_mb']} MB"
                 f"  bpf {r['bpf_ns_per_request']} ns/req  stop {r['agent'].get('stop_s')} s")
    common.log(line)


def series_tables(title: str, runs: dict[str, list[dict]], completeness_note: str) -> tuple[str, dict]:
    base_rps = [r["rps"] for r in runs["none"]]
    base_p99 = [r["p99_us"] for r in runs["none"]]
    rows_rps, rows_p99, summary = [], [], {}
    for i in range(len(base_rps)):
        row = [i + 1, fmt(base_rps[i], 0)]
        row_p = [i + 1, fmt(base_p99[i], 0)]
        for mode in MODES[1:]:
            r = runs[mode][i]
            row.append(f"{fmt(r['rps'], 0)} ({r['rps'] / base_rps[i]:.3f})")
            row_p.append(f"{fmt(r['p99_us'], 0)} ({r['p99_us'] / base_p99[i]:.2f})")
        row.append(" / ".join(f"{runs[m][i]['other_cores']:.2f}" for m in MODES)
                   + (" (disturbed)" if any(runs[m][i].get("disturbed") for m in MODES) else ""))
        rows_rps.append(row)
        rows_p99.append(row_p)
    med_row, med_p = ["median", fmt(median(base_rps), 0)], ["median", fmt(median(base_p99), 0)]
    for mode in MODES[1:]:
        rps_ratios = pair_ratios(base_rps, [r["rps"] for r in runs[mode]])
        p99_ratios = pair_ratios(base_p99, [r["p99_us"] for r in runs[mode]])
        summary[mode] = {
            "median_rps": median(r["rps"] for r in runs[mode]),
            "rps_ratios": rps_ratios, "median_rps_ratio": median(rps_ratios),
            "median_p99_us": median(r["p99_us"] for r in runs[mode]),
            "p99_ratios": p99_ratios, "median_p99_ratio": median(p99_ratios),
        }
        med_row.append(f"{fmt(summary[mode]['median_rps'], 0)} ({summary[mode]['median_rps_ratio']:.3f})")
        med_p.append(f"{fmt(summary[mode]['median_p99_us'], 0)} ({summary[mode]['median_p99_ratio']:.2f})")
    summary["none"] = {"median_rps": median(base_rps), "median_p99_us": median(base_p99)}
    med_row.append("")
    rows_rps.append(med_row)
    rows_p99.append(med_p)
    heads = ["round", "none"] + [f"{m} (ratio)" for m in MODES[1:]]
    text = (f"{title}: requests/s (ratio to the same round's no-agent run)\n"
            + table(heads + ["others' CPU, cores (" + " / ".join(MODES) + ")"], rows_rps)
            + f"\n\n{title}: p99 latency µs (ratio)\n" + table(heads, rows_p99))
    rows = []
    for mode in MODES[1:]:
        for i, r in enumerate(runs[mode]):
            rows.append([mode, i + 1, fmt(r["requests"]), fmt(r["server_observed"]), fmt(r["client_observed"]),
                         fmt(r["agent"].get("lost")), fmt(r["summary"].get("records")), fmt(r["window"]["oncpu_cores"], 2),
                         fmt(r["window"]["runq_wait_s"], 2), fmt(r["window"]["rss_mb"], 1), fmt(r["window"]["hwm_mb"], 1),
                         fmt(r["bpf_ns_per_request"], 0), fmt(r["bpf_ns_per_run"], 0), fmt(r["agent"].get("stop_s"), 1)])
    text += (f"\n\n{title}, with the agent ({completeness_note}):\n"
             + table(["mode", "round", "requests (load generator)", "server-side seen", "client-side seen", "lost",
                      "records", "agent CPU (cores)", "agent run-queue wait s", "RSS MB", "peak RSS MB", "BPF ns/request",
                      "BPF ns/run", "stop s"], rows))
    return text, summary


def decoder_benchmarks() -> dict:
    out = {}
    http = subprocess.run([common.PYTHON, str(common.BENCH / "bench_http_decoder.py")], capture_output=True, text=True,
                          cwd=common.REPO, timeout=900, env=common.source_env())
    m = re.search(r"best: ([\d,]+) exchanges/s", http.stdout)
    out["http_exchanges_per_s"] = int(m.group(1).replace(",", "")) if m else None
    out["http_output"] = http.stdout.strip()
    redis = subprocess.run([common.PYTHON, str(common.BENCH / "bench_redis_decoder.py")], capture_output=True,
                           text=True, cwd=common.REPO, timeout=900, env=common.source_env())
    rates = re.findall(r": ([\d,]+) commands/s", redis.stdout)
    out["redis_commands_per_s"] = [int(r.replace(",", "")) for r in rates]
    out["redis_output"] = redis.stdout.strip()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--wrk-seconds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=200000, help="redis-benchmark -n")
    parser.add_argument("--warmup", type=int, default=5, metavar="SECONDS",
                        help="load before each measured throughput run, unmeasured, in every mode (wrk seconds; "
                             "redis: one unmeasured redis-benchmark of the same size); 0: none, the agent starts cold")
    parser.add_argument("--rate", type=float, default=10000.0, help="requests/s of the every-request check")
    parser.add_argument("--rate-seconds", type=float, default=10.0)
    parser.add_argument("--rate-runs", type=int, default=3)
    parser.add_argument("--skip", action="append", default=[], choices=["nginx", "redis", "rate", "decoders"])
    args = parser.parse_args(argv)
    common.require_root()
    info = common.machine()
    common.log(f"machine: {info}")
    out: dict = {"benchmark": "l7", "machine": info, "args": vars(args), "modes": MODES,
                 "versions": {"nginx": common.tool_version(["nginx", "-v"]),
                              "redis": common.tool_version(["redis-server", "--version"]),
                              "wrk": common.tool_version(["wrk", "--version"])}}
    texts = []
    with tempfile.TemporaryDirectory(prefix="deetune-bench-") as tmp:
        nginx = Nginx(tmp)
        redis = Redis(tmp)
        try:
            subprocess.run(["redis-cli", "-p", str(redis.port), "SET", "bench:k", "v" * 16], capture_output=True)
            if "nginx" not in args.skip:
                common.log(f"nginx :{nginx.port} + wrk -t1 -c10 -d{args.wrk_seconds}s, {args.rounds} rounds of {MODES}")

                def nginx_run(mode, r):
                    res = with_agent(mode, nginx.port, tmp, f"nginx{r}", lambda: run_wrk(nginx.port, args.wrk_seconds), "http",
                                     warmup=(lambda: run_wrk(nginx.port, args.warmup)) if args.warmup else None)
                    log_run(f"nginx#{r + 1}", res)
                    return res

                runs, discarded = common.interleave(MODES, args.rounds, nginx_run)
                text, summary = series_tables("nginx + wrk", runs, "wrk stops counting with ≤ 10 requests in flight")
                texts.append(text)
                out["nginx"] = {"runs": runs, "summary": summary, "discarded_rounds": discarded}
            if "redis" not in args.skip:
                common.log(f"redis :{redis.port} + redis-benchmark -t get,set -n {args.requests} -c 10, {args.rounds} rounds")

                def redis_run(mode, r):
                    res = with_agent(mode, redis.port, tmp, f"redis{r}", lambda: run_redis_benchmark(redis.port, args.requests), "redis",
                                     warmup=(lambda: run_redis_benchmark(redis.port, args.requests)) if args.warmup else None)
                    log_run(f"redis#{r + 1}", res)
                    return res

                runs, discarded = common.interleave(MODES, args.rounds, redis_run)
                text, summary = series_tables("redis + redis-benchmark (GET and SET)", runs,
                                              f"exactly {args.requests:,} GET + {args.requests:,} SET sent")
                texts.append(text)
                out["redis"] = {"runs": runs, "summary": summary, "discarded_rounds": discarded}
            if "rate" not in args.skip:
                gen = common.loadgen()
                rows, rate_runs = [], []
                for target, server, proto in (("http", nginx, "http"), ("redis", redis, "redis")):
                    for i in range(args.rate_runs):
                        def load(target=target, server=server):
                            res = common.run_json([gen, target, str(server.port), "10", str(args.rate_seconds), str(args.rate)])
                            return {**res, "requests": res["done"], "rps": res["rate"], "p99_us": res["p99_us"]}

                        res = with_agent("decode-port", server.port, tmp, f"rate-{target}{i}", load, proto, bpf_stats=True)
                        res["target"] = target
                        log_run(f"rate-{target}#{i + 1}", res)
                        rate_runs.append(res)
                        ok = res["server_observed"] == res["done"] and res["client_observed"] == res["done"] and res["agent"].get("lost") == 0
                        rows.append([target, i + 1, fmt(res["rate"], 0), fmt(res["done"]), fmt(res["errors"]),
                                     fmt(res["server_observed"]), fmt(res["client_observed"]), fmt(res["agent"].get("lost")),
                                     fmt(res["window"]["oncpu_cores"], 2), fmt(res["window"]["hwm_mb"], 1),
                                     fmt(res["bpf_ns_per_request"], 0), "yes" if ok else "NO"])
                texts.append(f"Every request observed at a fixed {args.rate:,.0f} requests/s (loadgen, 10 keep-alive "
                             f"connections, {args.rate_seconds:g} s, agent --probe tcp --probe payload --port PORT):\n"
                             + table(["server", "run", "achieved req/s", "requests done", "errors", "server-side seen",
                                      "client-side seen", "lost", "agent CPU (cores)", "peak RSS MB", "BPF ns/request",
                                      "all seen"], rows))
                out["fixed_rate"] = rate_runs
        finally:
            nginx.stop()
            redis.stop()
    if "decoders" not in args.skip:
        common.log("decoder micro-benchmarks")
        out["decoders"] = decoder_benchmarks()
        texts.append("Decoders alone (one core, CPU time, best round):\n" + out["decoders"]["http_output"] + "\n"
                     + out["decoders"]["redis_output"])

    targets = []
    if "nginx" in out:
        ratio = out["nginx"]["summary"]["decode-port"]["median_rps_ratio"]
        targets.append(["decoding on (--port): ≥ 90 % of no-agent throughput, nginx + wrk",
                        f"median ratio {ratio:.3f}", "met" if ratio >= 0.90 else "MISSED"])
        ratio_all = out["nginx"]["summary"]["decode-all"]["median_rps_ratio"]
        targets.append(["(same, without --port: everything captured)", f"median ratio {ratio_all:.3f}",
                        "met" if ratio_all >= 0.90 else "MISSED"])
    if "fixed_rate" in out:
        good = [r for r in out["fixed_rate"] if r["server_observed"] == r["done"] and r["client_observed"] == r["done"]
                and r["agent"].get("lost") == 0]
        reached = min(r["rate"] for r in out["fixed_rate"])
        targets.append([f"every request observed at {args.rate:,.0f} req/s", f"{len(good)}/{len(out['fixed_rate'])} runs "
                        f"exact (lowest achieved rate {reached:,.0f}/s)",
                        "met" if len(good) == len(out["fixed_rate"]) and reached >= 0.99 * args.rate else "MISSED"])
    if "redis" in out:
        shares = [r["server_observed"] / r["requests"] for m in MODES[2:] for r in out["redis"]["runs"][m]]
        targets.append(["redis-benchmark at full speed, decoding modes: commands observed (a sample, by design)",
                        f"{min(shares):.1%}–{max(shares):.1%} of them", "no target"])
    if "decoders" in out and out["decoders"]["http_exchanges_per_s"]:
        rate = out["decoders"]["http_exchanges_per_s"]
        targets.append(["HTTP decoder alone ≥ 100,000 exchanges/s on one core", f"{rate:,}/s",
                        "met" if rate >= 100000 else "MISSED"])
    return common.report("l7", out, texts, targets)


if __name__ == "__main__":
    main()
