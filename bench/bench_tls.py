"""Overhead of the tls probe (issue 20): nginx with TLS + wrk (HTTP/1.1) and + h2load (HTTP/2 by
ALPN), with and without the agent's TLS plaintext probe.

    .venv/bin/python bench/bench_tls.py [--rounds 5] [--seconds 10] [--warmup 3] [--skip h1|h2|stats]

nginx (``worker_processes 1``, ``master_process off``, a 1 KiB page, keep-alive, access log off,
a self-signed certificate made for the run) on a free port.  Three modes, interleaved round by
round (none, tls, decode, none, …):

- ``none``: no agent;
- ``tls``: ``--probe tls --port PORT`` (uprobes on libssl's SSL_read/SSL_write and SSL_do_handshake in
  nginx and the load generator, records for the port's connections; nothing decoded but the records);
- ``decode``: ``--probe tcp --probe payload --probe tls --port PORT`` (the ciphertext muted, the
  plaintext decoded: what an agent does by default, for one port).

Loads: ``wrk -t1 -c10 -dSs --latency https://…`` and ``h2load -c10 -m10 -D S https://…`` (HTTP/2,
10 streams per connection), both linking the system libssl, so both ends of every request pay the
probes: 4 uprobe hits per side per request (SSL_read and SSL_write, entry and return).  Per run:
requests/s and p99, and the CPU time nginx and the load generator used per request (from their
/proc stat and rusage): the difference to the same round's ``none`` run is what the probes cost
the applications per request (the uprobe traps, the BPF programs, the ring buffer copies).

BPF run time per request: a separate ``tls`` run per load with the kernel's BPF statistics on
(``--skip stats`` to leave out; not a throughput run: the statistics cost two clock reads per
program run).  The trap's own cost per request is the CPU difference above minus that run time.

The figure the issue sets: throughput ratio ``tls`` / ``none`` ≥ 0.95 (median of the pairs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import subprocess
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import fmt, median, pair_ratios, table  # noqa: E402

MODES = ["none", "tls", "decode"]
PAGE = (b"<html><body>" + b"deetune tls benchmark " * 47 + b"</body></html>\n")[:1024]
_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


class NginxTls:
    def __init__(self, tmp: str):
        self.dir = os.path.join(tmp, "nginx")
        os.makedirs(os.path.join(self.dir, "www"))
        with open(os.path.join(self.dir, "www", "index.html"), "wb") as f:
            f.write(PAGE)
        cert, key = os.path.join(self.dir, "cert.pem"), os.path.join(self.dir, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "2", "-subj", "/CN=localhost"], check=True, capture_output=True)
        self.port = common.free_port()
        conf = textwrap.dedent(f"""\
            daemon off;
            master_process off;
            worker_processes 1;
            pid {self.dir}/nginx.pid;
            error_log {self.dir}/error.log warn;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                keepalive_timeout 65;
                keepalive_requests 10000000;
                http2_max_requests 10000000;
                client_body_temp_path {self.dir}/body;
                proxy_temp_path {self.dir}/proxy;
                fastcgi_temp_path {self.dir}/fastcgi;
                uwsgi_temp_path {self.dir}/uwsgi;
                scgi_temp_path {self.dir}/scgi;
                default_type text/html;
                server {{
                    listen 127.0.0.1:{self.port} ssl http2;
                    ssl_certificate {cert};
                    ssl_certificate_key {key};
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

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/index.html"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def run_load(kind: str, nginx: NginxTls, seconds: int) -> dict:
    """One measured load: requests, requests/s, p99, and CPU seconds of nginx and of the client."""
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    nginx_cpu = common.cpu_seconds(nginx.proc.pid)
    if kind == "h1":
        argv = ["wrk", "-t1", "-c10", f"-d{seconds}s", "--latency", nginx.url]
    else:
        argv = ["h2load", "-c10", "-m10", "-D", str(seconds), "--warm-up-time=0", nginx.url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({out.returncode}): {out.stderr.strip()[-300:]}")
    client_cpu = (after_children.ru_utime + after_children.ru_stime) - (before_children.ru_utime + before_children.ru_stime)
    result = parse_wrk(out.stdout) if kind == "h1" else parse_h2load(out.stdout)
    result["nginx_cpu_s"] = round(common.cpu_seconds(nginx.proc.pid) - nginx_cpu, 3)
    result["client_cpu_s"] = round(client_cpu, 3)
    requests = result["requests"]
    result["app_cpu_us_per_request"] = round((result["nginx_cpu_s"] + client_cpu) / requests * 1e6, 3) if requests else None
    return result


def parse_wrk(text: str) -> dict:
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+),", text)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not (m and rps and p99):
        raise RuntimeError(f"cannot parse wrk output:\n{text}")
    return {"requests": int(m.group(1)), "rps": float(rps.group(1)),
            "p99_us": float(p99.group(1)) * _UNITS[p99.group(2)]}


def parse_h2load(text: str) -> dict:
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", text)
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    if not (done and rps):
        raise RuntimeError(f"cannot parse h2load output:\n{text}")
    return {"requests": int(done.group(2)), "rps": float(rps.group(1)), "p99_us": None}


def agent_args(mode: str, port: int) -> tuple[list[str], list[str]]:
    if mode == "tls":
        return ["tls"], ["--port", str(port)]
    if mode == "decode":
        return ["tcp", "payload", "tls"], ["--port", str(port)]
    raise ValueError(mode)


def count_requests(path: str, port: int) -> dict[str, int]:
    def key(event: dict):
        if event.get("type") != "request" or not event.get("attributes", {}).get("tls"):
            return None
        if event["role"] == "server" and event["lport"] == port:
            return "server"
        if event["role"] == "client" and event["rport"] == port:
            return "client"
        return None

    return common.scan_jsonl(path, '"request"', key)


def with_agent(mode: str, kind: str, nginx: NginxTls, tmp: str, label: str, seconds: int, warmup: int, *,
               bpf_stats: bool = False) -> dict:
    waited = common.wait_quiet()
    if mode == "none":
        if warmup:
            run_load(kind, nginx, warmup)
        other, t0 = common.OtherCpu(), time.monotonic()
        result = run_load(kind, nginx, seconds)
        return {"mode": mode, **result, "waited_s": waited, **other.stop(time.monotonic() - t0)}
    probes, extra = agent_args(mode, nginx.port)
    jsonl = os.path.join(tmp, f"{label}-{mode}.jsonl")
    with common.bpf_stats() if bpf_stats else contextlib.nullcontext():
        agent = common.Agent(probes, jsonl, extra).start()
        try:
            if warmup:
                run_load(kind, nginx, warmup)
            before = common.prog_stats(agent.prog_ids)
            agent.begin_window()
            other, t0 = common.OtherCpu(), time.monotonic()
            result = run_load(kind, nginx, seconds)
            wall = time.monotonic() - t0
            window = agent.end_window()
            others = other.stop(wall)
            after = common.prog_stats(agent.prog_ids)
        finally:
            stopped = agent.stop()
    bpf = common.stats_between(before, after)
    observed = count_requests(jsonl, nginx.port) if mode == "decode" else {}
    os.unlink(jsonl)
    requests = result["requests"]
    return {
        "mode": mode, **result, "waited_s": waited, **others,
        "agent": {k: v for k, v in stopped.items() if k != "summary"}, "summary": stopped.get("summary") or {},
        "window": window, "bpf": bpf,
        "bpf_ns_per_request": round(bpf["run_time_ns"] / requests, 1) if requests and bpf["run_time_ns"] else None,
        "observed": observed,
    }


def log_run(label: str, r: dict) -> None:
    line = (f"  {label:<8} {r['mode']:<7} {r['rps']:>10,.0f} req/s  app CPU {r['app_cpu_us_per_request']} µs/req"
            f"  others {r['other_cores']} cores")
    if r["mode"] != "none":
        line += f"  lost {r['agent'].get('lost')}  agent cpu {r['window']['oncpu_cores']}"
        if r["observed"]:
            line += f"  seen server {r['observed'].get('server', 0):,} client {r['observed'].get('client', 0):,} / {r['requests']:,}"
        if r["bpf_ns_per_request"]:
            line += f"  bpf {r['bpf_ns_per_request']} ns/req"
    common.log(line)


def series(title: str, runs: dict[str, list[dict]]) -> tuple[str, dict]:
    base = runs["none"]
    rows, summary = [], {}
    for i, b in enumerate(base):
        row = [i + 1, fmt(b["rps"], 0), fmt(b["app_cpu_us_per_request"], 2)]
        for mode in MODES[1:]:
            r = runs[mode][i]
            row.append(f"{fmt(r['rps'], 0)} ({r['rps'] / b['rps']:.3f})")
            row.append(fmt(r["app_cpu_us_per_request"] - b["app_cpu_us_per_request"], 2))
        row.append(" / ".join(f"{runs[m][i]['other_cores']:.2f}" for m in MODES))
        rows.append(row)
    med = ["median", fmt(median(r["rps"] for r in base), 0), fmt(median(r["app_cpu_us_per_request"] for r in base), 2)]
    for mode in MODES[1:]:
        ratios = pair_ratios([r["rps"] for r in base], [r["rps"] for r in runs[mode]])
        extra = [r["app_cpu_us_per_request"] - b["app_cpu_us_per_request"] for r, b in zip(runs[mode], base)]
        summary[mode] = {"rps_ratios": ratios, "median_rps_ratio": median(ratios),
                         "app_cpu_us_per_request_added": extra, "median_app_cpu_us_added": median(extra)}
        med += [f"{fmt(median(r['rps'] for r in runs[mode]), 0)} ({summary[mode]['median_rps_ratio']:.3f})",
                fmt(summary[mode]["median_app_cpu_us_added"], 2)]
    rows.append(med + [""])
    heads = ["round", "none req/s", "none app CPU µs/req"]
    for mode in MODES[1:]:
        heads += [f"{mode} req/s (ratio)", f"{mode}: app CPU µs/req added"]
    text = (f"{title}: requests/s (ratio to the same round's no-agent run) and the CPU nginx and the load generator "
            f"used per request\n" + table(heads + ["others' CPU, cores (" + " / ".join(MODES) + ")"], rows))
    return text, summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, metavar="SECONDS")
    parser.add_argument("--skip", action="append", default=[], choices=["h1", "h2", "stats"])
    args = parser.parse_args(argv)
    common.require_root()
    info = common.machine()
    common.log(f"machine: {info}")
    out: dict = {"benchmark": "tls", "machine": info, "args": vars(args), "modes": MODES,
                 "versions": {"nginx": common.tool_version(["nginx", "-v"]), "wrk": common.tool_version(["wrk", "--version"]),
                              "h2load": common.tool_version(["h2load", "--version"]),
                              "openssl": common.tool_version(["openssl", "version"])}}
    texts = []
    targets = []
    with tempfile.TemporaryDirectory(prefix="deetune-bench-tls-") as tmp:
        nginx = NginxTls(tmp)
        try:
            for kind, title in (("h1", "nginx TLS + wrk (HTTP/1.1)"), ("h2", "nginx TLS + h2load (HTTP/2)")):
                if kind in args.skip:
                    continue
                common.log(f"{title} :{nginx.port}, {args.rounds} rounds of {MODES}")

                def one(mode, r, kind=kind):
                    res = with_agent(mode, kind, nginx, tmp, f"{kind}{r}", args.seconds, args.warmup)
                    log_run(f"{kind}#{r + 1}", res)
                    return res

                runs, discarded = common.interleave(MODES, args.rounds, one)
                text, summary = series(title, runs)
                entry = {"runs": runs, "summary": summary, "discarded_rounds": discarded}
                if "stats" not in args.skip:
                    stats = with_agent("tls", kind, nginx, tmp, f"{kind}-stats", args.seconds, args.warmup, bpf_stats=True)
                    log_run(f"{kind}-stats", stats)
                    entry["bpf_stats_run"] = stats
                    bpf_ns = stats["bpf_ns_per_request"] or 0
                    added_us = summary["tls"]["median_app_cpu_us_added"]
                    entry["uprobe_cost"] = {"bpf_ns_per_request": bpf_ns, "app_cpu_ns_added_per_request": added_us * 1000,
                                            "trap_ns_per_request": added_us * 1000 - bpf_ns,
                                            "programs": stats["bpf"]["programs"]}
                    text += (f"\n\n{title}, tls probe cost per request (both ends): application CPU added "
                             f"{added_us * 1000:,.0f} ns (median), of which BPF run time {bpf_ns:,.0f} ns "
                             f"(bpf_stats run), so the uprobe traps and the rest ≈ {added_us * 1000 - bpf_ns:,.0f} ns\n"
                             + table(["program", "runs", "ns/run"], [[name, fmt(p["run_cnt"]), fmt(p["ns_per_run"], 0)]
                                                                     for name, p in stats["bpf"]["programs"].items()]))
                texts.append(text)
                out[kind] = entry
                ratio = summary["tls"]["median_rps_ratio"]
                targets.append([f"{title}: throughput with the tls probe ≥ 0.95 of none", f"median ratio {ratio:.3f}",
                                "met" if ratio >= 0.95 else "MISSED"])
        finally:
            nginx.stop()
    common.log("HTTP/2 decoder micro-benchmark")
    decoder = subprocess.run([common.PYTHON, str(common.BENCH / "bench_http2_decoder.py")], capture_output=True, text=True,
                             cwd=common.REPO, timeout=1800, env=common.source_env())
    out["http2_decoder"] = decoder.stdout.strip()
    texts.append("HTTP/2 decoder alone (one core, CPU time, best round):\n"
                 + "\n".join(line for line in decoder.stdout.splitlines() if line.startswith(("http2", "grpc"))))
    return common.report("tls", out, texts, targets)


if __name__ == "__main__":
    main()
