"""Overhead of the tls probe (issue 20): nginx with TLS + wrk (HTTP/1.1) and + h2load (HTTP/2 by
ALPN), with and without the agent's TLS plaintext probe.

    .venv/bin/python bench/bench_tls.py [--rounds 5] [--seconds 10] [--warmup 3] [--skip h1|h2|stats]

nginx (``worker_processes 1``, ``master_process off``, a 1 KiB page, keep-alive, access log off,
a self-signed certificate made for the run) on a free port.  Three modes, interleaved round by
round (none, tls, decode, none, …):

- ``none``: no agent;
- ``floor``: the tls probe's uprobes and uretprobes at the same places, in nginx and the load
  generator, with programs that return at once and no tracepoints (``TlsProbe(floor=True)``, in
  this process): what the traps alone cost on this machine;
- ``tls``: ``--probe tls --port PORT`` (uprobes on libssl's ssl_read_internal/ssl_write_internal and
  SSL_do_handshake in nginx and the load generator, records for the port's connections; nothing
  decoded but the records);
- ``tls-nginx``: the same with ``--pid`` nginx: the breakpoints are written into nginx only, the load
  generator takes no trap (a server whose clients are on other hosts);
- ``decode``: ``--probe tcp --probe payload --probe tls --port PORT`` (the ciphertext muted, the
  plaintext decoded: what an agent does by default, for one port).

Loads: ``wrk -t1 -c10 -dSs --latency https://…`` and ``h2load -c10 -m10 -D S https://…`` (HTTP/2,
10 streams per connection), both linking the system libssl, so both ends of every request pay the
probes (a uprobe and a uretprobe per SSL_read and SSL_write call, on both sides).  Per run:
requests/s and p99, and the CPU time nginx and the load generator used per request (from their
/proc stat and rusage): the difference to the same round's ``none`` run is what the probes cost
the applications per request (the uprobe traps, the BPF programs, the ring buffer copies).

BPF run time per request, and the program runs (traps) per request: a separate ``tls`` run per load
with the kernel's BPF statistics on (``--skip stats`` to leave out; not a throughput run: the
statistics cost two clock reads per program run).  The traps' cost per request is the ``floor``
run's CPU difference; ``tls`` minus ``floor`` is the probe's own work (BPF programs, tracepoints,
ring buffer).

The traps alone (``--skip traps`` to leave out): a C loop calling a function whose first instruction
a uprobe single-steps (``sub $8,%rsp``, as SSL_read; ``endbr64``) or the kernel emulates (``push``, as
ssl_read_internal), with the floor programs attached as uprobe, and as uprobe and uretprobe: ns per
call.

The figure the issue sets: throughput ratio ``tls`` / ``none`` ≥ 0.95 (median of the pairs).
``--modes`` picks a subset (``none`` always runs).
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

MODES = ["none", "floor", "tls", "tls-nginx", "decode"]
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


def agent_args(mode: str, nginx: NginxTls) -> tuple[list[str], list[str]]:
    port = nginx.port
    if mode == "tls":
        return ["tls"], ["--port", str(port)]
    if mode == "tls-nginx":
        return ["tls"], ["--pid", str(nginx.proc.pid), "--port", str(port)]
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
    if mode == "floor":
        return with_floor(kind, nginx, seconds, warmup, waited)
    probes, extra = agent_args(mode, nginx)
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


def with_floor(kind: str, nginx: NginxTls, seconds: int, warmup: int, waited: float) -> dict:
    """The tls probe's uprobes with programs that return at once, in this process."""
    from deetune.probes import ProbeOptions
    from deetune.probes.tls import TlsProbe

    probe = TlsProbe(ProbeOptions(port=nginx.port), floor=True, overload_sampling=False)
    probe.start()
    try:
        probes = sum(len(links) for _target, links in probe.attached.values())
        if warmup:
            run_load(kind, nginx, warmup)
        other, t0 = common.OtherCpu(), time.monotonic()
        result = run_load(kind, nginx, seconds)
        others = other.stop(time.monotonic() - t0)
    finally:
        probe.stop()
    return {"mode": "floor", **result, "waited_s": waited, **others, "probes_attached": probes}


TRAPS_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
/* First instruction single-stepped by a uprobe (as SSL_read's sub $N,%rsp), emulated (as
 * ssl_read_internal's push), and endbr64 (CET builds' entries: single-stepped). */
__attribute__((naked, noinline)) int t_sub(int x) { __asm__ volatile("sub $8,%rsp\n add $8,%rsp\n lea 1(%rdi),%eax\n ret"); }
__attribute__((naked, noinline)) int t_push(int x) { __asm__ volatile("push %rbx\n lea 1(%rdi),%eax\n pop %rbx\n ret"); }
__attribute__((naked, noinline)) int t_endbr(int x) { __asm__ volatile("endbr64\n push %rbx\n lea 1(%rdi),%eax\n pop %rbx\n ret"); }
int main(int argc, char **argv) {
    int (*f)(int) = !strcmp(argv[1], "t_sub") ? t_sub : !strcmp(argv[1], "t_push") ? t_push : t_endbr;
    long n = atol(argv[2]), i; int s = 0; struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (i = 0; i < n; i++) s = f(s);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
    return s != n;
}
"""
TRAP_FUNCTIONS = {"t_sub": "sub $8,%rsp (single-stepped; as SSL_read)", "t_push": "push %rbx (emulated; as ssl_read_internal)",
                  "t_endbr": "endbr64 (single-stepped; CET builds)"}


def trap_floor(calls: int = 100_000) -> dict:
    """ns per call of a function whose first instruction the uprobe single-steps or the kernel
    emulates, with the tls object's floor programs (return at once) as uprobe, and as uprobe and
    uretprobe; the loop's own cost subtracted."""
    from deetune.libbpf import BpfObject
    from deetune.probes.tls import TlsProbe

    probe = TlsProbe(floor=True)
    out: dict = {"calls": calls}
    with tempfile.TemporaryDirectory(prefix="deetune-traps-") as tmp:
        source, binary = os.path.join(tmp, "traps.c"), os.path.join(tmp, "traps")
        with open(source, "w") as f:
            f.write(TRAPS_C)
        subprocess.run(["gcc", "-O2", "-fcf-protection=none", "-o", binary, source], check=True, capture_output=True)
        obj = BpfObject.open(probe.object_file())
        try:
            probe.configure(obj)
            obj.load()
            for function, what in TRAP_FUNCTIONS.items():
                row = {"first_instruction": what}
                for mode in ("none", "uprobe", "uprobe+uretprobe"):
                    links = []
                    if mode != "none":
                        links.append(obj.programs["tls_floor_enter"].attach_uprobe(binary, function))
                    if mode == "uprobe+uretprobe":
                        links.append(obj.programs["tls_floor_exit"].attach_uprobe(binary, function, retprobe=True))
                    try:
                        n = calls if mode != "none" else calls * 100
                        ns = float(subprocess.run([binary, function, str(n)], capture_output=True, text=True,
                                                  check=True).stdout)
                    finally:
                        for link in links:
                            link.close()
                    row[mode] = ns if mode == "none" else round(ns - row["none"], 1)
                out[function] = row
        finally:
            obj.close()
    return out


def log_run(label: str, r: dict) -> None:
    line = (f"  {label:<8} {r['mode']:<7} {r['rps']:>10,.0f} req/s  app CPU {r['app_cpu_us_per_request']} µs/req"
            f"  others {r['other_cores']} cores")
    if r["mode"] not in ("none", "floor"):
        line += f"  lost {r['agent'].get('lost')}  agent cpu {r['window']['oncpu_cores']}"
        if r["observed"]:
            line += f"  seen server {r['observed'].get('server', 0):,} client {r['observed'].get('client', 0):,} / {r['requests']:,}"
        if r["bpf_ns_per_request"]:
            line += f"  bpf {r['bpf_ns_per_request']} ns/req"
    common.log(line)


def series(title: str, runs: dict[str, list[dict]], modes: list[str]) -> tuple[str, dict]:
    base = runs["none"]
    rows, summary = [], {}
    for i, b in enumerate(base):
        row = [i + 1, fmt(b["rps"], 0), fmt(b["app_cpu_us_per_request"], 2)]
        for mode in modes[1:]:
            r = runs[mode][i]
            row.append(f"{fmt(r['rps'], 0)} ({r['rps'] / b['rps']:.3f})")
            row.append(fmt(r["app_cpu_us_per_request"] - b["app_cpu_us_per_request"], 2))
        row.append(" / ".join(f"{runs[m][i]['other_cores']:.2f}" for m in modes))
        rows.append(row)
    med = ["median", fmt(median(r["rps"] for r in base), 0), fmt(median(r["app_cpu_us_per_request"] for r in base), 2)]
    for mode in modes[1:]:
        ratios = pair_ratios([r["rps"] for r in base], [r["rps"] for r in runs[mode]])
        extra = [r["app_cpu_us_per_request"] - b["app_cpu_us_per_request"] for r, b in zip(runs[mode], base)]
        summary[mode] = {"rps_ratios": ratios, "median_rps_ratio": median(ratios),
                         "app_cpu_us_per_request_added": extra, "median_app_cpu_us_added": median(extra)}
        med += [f"{fmt(median(r['rps'] for r in runs[mode]), 0)} ({summary[mode]['median_rps_ratio']:.3f})",
                fmt(summary[mode]["median_app_cpu_us_added"], 2)]
    rows.append(med + [""])
    heads = ["round", "none req/s", "none app CPU µs/req"]
    for mode in modes[1:]:
        heads += [f"{mode} req/s (ratio)", f"{mode}: app CPU µs/req added"]
    text = (f"{title}: requests/s (ratio to the same round's no-agent run) and the CPU nginx and the load generator "
            f"used per request\n" + table(heads + ["others' CPU, cores (" + " / ".join(modes) + ")"], rows))
    return text, summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, metavar="SECONDS")
    parser.add_argument("--skip", action="append", default=[], choices=["h1", "h2", "stats", "traps"])
    parser.add_argument("--modes", default=",".join(MODES[1:]), help="comma-separated, of " + ", ".join(MODES[1:]))
    args = parser.parse_args(argv)
    modes = ["none"] + [m for m in MODES[1:] if m in args.modes.split(",")]
    common.require_root()
    info = common.machine()
    common.log(f"machine: {info}")
    out: dict = {"benchmark": "tls", "machine": info, "args": vars(args), "modes": modes,
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
                common.log(f"{title} :{nginx.port}, {args.rounds} rounds of {modes}")

                def one(mode, r, kind=kind):
                    res = with_agent(mode, kind, nginx, tmp, f"{kind}{r}", args.seconds, args.warmup)
                    log_run(f"{kind}#{r + 1}", res)
                    return res

                runs, discarded = common.interleave(modes, args.rounds, one)
                text, summary = series(title, runs, modes)
                entry = {"runs": runs, "summary": summary, "discarded_rounds": discarded}
                if "stats" not in args.skip:
                    stats = with_agent("tls", kind, nginx, tmp, f"{kind}-stats", args.seconds, args.warmup, bpf_stats=True)
                    log_run(f"{kind}-stats", stats)
                    entry["bpf_stats_run"] = stats
                    bpf_ns = stats["bpf_ns_per_request"] or 0
                    added_ns = summary["tls"]["median_app_cpu_us_added"] * 1000
                    floor_ns = summary["floor"]["median_app_cpu_us_added"] * 1000 if "floor" in summary else None
                    requests = stats["requests"]
                    programs = {name: p for name, p in stats["bpf"]["programs"].items() if p["run_cnt"]}
                    entry["uprobe_cost"] = {"bpf_ns_per_request": bpf_ns, "app_cpu_ns_added_per_request": added_ns,
                                            "floor_ns_per_request": floor_ns,
                                            "runs_per_request": {n: round(p["run_cnt"] / requests, 2) for n, p in programs.items()},
                                            "programs": stats["bpf"]["programs"]}
                    text += (f"\n\n{title}, tls probe cost per request (both ends): application CPU added "
                             f"{added_ns:,.0f} ns (median), of which BPF run time {bpf_ns:,.0f} ns (bpf_stats run); "
                             + (f"the traps alone (floor: empty programs) {floor_ns:,.0f} ns" if floor_ns is not None else "")
                             + "\n" + table(["program", "runs", "runs/request", "ns/run"],
                                            [[name, fmt(p["run_cnt"]), f"{p['run_cnt'] / requests:.2f}", fmt(p["ns_per_run"], 0)]
                                             for name, p in programs.items()]))
                texts.append(text)
                out[kind] = entry
                for mode, who in (("tls", "both ends probed"), ("tls-nginx", "nginx only")):
                    if mode in summary:
                        ratio = summary[mode]["median_rps_ratio"]
                        targets.append([f"{title}: throughput with the tls probe ({who}) ≥ 0.95 of none",
                                        f"median ratio {ratio:.3f}", "met" if ratio >= 0.95 else "MISSED"])
        finally:
            nginx.stop()
    if "traps" not in args.skip:
        common.log("uprobe traps alone")
        try:
            traps = out["traps"] = trap_floor()
            texts.append(f"uprobe traps on this machine (ns per call, {traps['calls']:,} calls, empty programs):\n"
                         + table(["first instruction", "uprobe", "uprobe + uretprobe"],
                                 [[row["first_instruction"], fmt(row["uprobe"], 0), fmt(row["uprobe+uretprobe"], 0)]
                                  for name, row in traps.items() if name != "calls"]))
        except Exception as exc:  # the loads' figures stand without it
            common.log(f"uprobe traps: failed: {exc!r}")
    common.log("HTTP/2 decoder micro-benchmark")
    decoder = subprocess.run([common.PYTHON, str(common.BENCH / "bench_http2_decoder.py")], capture_output=True, text=True,
                             cwd=common.REPO, timeout=1800, env=common.source_env())
    out["http2_decoder"] = decoder.stdout.strip()
    texts.append("HTTP/2 decoder alone (one core, CPU time, best round):\n"
                 + "\n".join(line for line in decoder.stdout.splitlines() if line.startswith(("http2", "grpc"))))
    return common.report("tls", out, texts, targets)


if __name__ == "__main__":
    main()
