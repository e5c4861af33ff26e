"""Where the payload probe's kernel time goes (issue 16): the capture program stopped after each
stage of a call's work, BPF run time per program run at a fixed rate.

    sudo .venv/bin/python bench/bench_kernel_stages.py [--rounds 3] [--seconds 5] [--rate 10000]

bpf/payload.bpf.c is built once per stage with ``-DDT_STAGE_STOP=N`` (the shipped object is
N=0) into a copy of src/deetune; the agent runs with its default probes against nginx
(bench_l7.Nginx) driven by bench/loadgen.c at ``--rate`` requests/s on 10 keep-alive
connections; ``bpf_stats`` gives run time and runs of capture_send and capture_recv.  Stages
are run in turn, ``--rounds`` times (medians).  With bpf_stats on, each run also pays two clock
reads; stage "entry" shows that floor.  Stages "account" and before copy nothing for detail, so
the agent decodes nothing and its Python leaves the caches alone; "shipped" also copies what
the overload sampling lets through (its sampling is printed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_l7 import Nginx  # noqa: E402
from common import median  # noqa: E402

# (name, DT_STAGE_STOP, what the program does up to there): see bpf/payload.bpf.c.
STAGES = [
    ("entry", 1, "the first checks (ret, flags)"),
    ("verdict", 2, "+ process filter, socket checks, controls, the socket's storage"),
    ("call", 3, "+ which syscall, where its buffer is"),
    ("bytes", 4, "+ copying the bytes the accounting needs from user memory"),
    ("account", 5, "+ the clock, classification, parsing, counting (no detail copies)"),
    ("shipped", 0, "+ detail copies as the overload sampling lets them through"),
]
PROGRAMS = ("capture_send", "capture_recv")


def build(stage: int, root: str) -> str:
    """A copy of src/deetune whose payload.bpf.o is built with DT_STAGE_STOP=stage."""
    snap = os.path.join(root, f"stage{stage}")
    shutil.copytree(common.REPO / "src" / "deetune", os.path.join(snap, "deetune"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    obj = os.path.join(snap, "deetune", "_bpf", "x86", "payload.bpf.o")
    subprocess.run([os.environ.get("CLANG", "clang"), "-g", "-O2", "-Wall", "-Werror", "-target", "bpf",
                    f"-I{common.REPO / 'bpf'}", "-D__TARGET_ARCH_x86", f"-DDT_STAGE_STOP={stage}", "-c",
                    str(common.REPO / "bpf" / "payload.bpf.c"), "-o", obj], check=True)
    subprocess.run(["llvm-strip", "-g", obj], check=True)
    return snap


def run(snap: str, nginx: Nginx, tmp: str, rate: float, seconds: float) -> dict:
    common._SNAPSHOT = snap  # the agent imports this copy
    gen = common.loadgen()
    jsonl = os.path.join(tmp, "stage.jsonl")
    common.wait_quiet(max_wait=20)
    with common.bpf_stats():
        agent = common.Agent(["process", "tcp", "payload"], jsonl).start()
        try:
            before = common.prog_stats(agent.prog_ids)
            res = common.run_json([gen, "http", str(nginx.port), "10", str(seconds), str(rate)])
            after = common.prog_stats(agent.prog_ids)
        finally:
            stopped = agent.stop()
    os.unlink(jsonl)
    out: dict = {"done": res["done"], "sampling": stopped.get("sparsest_sampling")}
    for pid, a in after.items():
        if a["name"] not in PROGRAMS:
            continue
        b = before.get(pid, {"run_time_ns": 0, "run_cnt": 0})
        runs = a["run_cnt"] - b["run_cnt"]
        out[a["name"]] = round((a["run_time_ns"] - b["run_time_ns"]) / runs, 1) if runs else None
        out[a["name"] + "_runs_per_request"] = round(runs / res["done"], 2) if res["done"] else None
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=10000.0)
    args = parser.parse_args(argv)
    common.require_root()
    tmp = tempfile.mkdtemp(prefix="deetune-stages-")
    try:
        snaps = {name: build(stop, tmp) for name, stop, _ in STAGES}
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in STAGES}
        nginx = Nginx(tmp)
        try:
            for r in range(args.rounds):
                for name, _, _ in STAGES:
                    got = run(snaps[name], nginx, tmp, args.rate, args.seconds)
                    runs[name].append(got)
                    common.log(f"  #{r + 1} {name:8s} send {got.get('capture_send')} ns/run  recv "
                               f"{got.get('capture_recv')} ns/run  sampled 1/{got['sampling']}")
        finally:
            nginx.stop()
        rows = []
        for name, stop, what in STAGES:
            send = median(x.get("capture_send") for x in runs[name])
            recv = median(x.get("capture_recv") for x in runs[name])
            rows.append([name, what, common.fmt(send), common.fmt(recv)])
        out = {"machine": common.machine(), "args": vars(args), "runs": runs}
        return common.report("kernel-stages", out, [
            f"payload probe, BPF run time per run at {args.rate:,.0f} requests/s (medians of {args.rounds}; "
            "bpf_stats on)",
            common.table(["stage", "the program up to", "capture_send ns", "capture_recv ns"], rows)])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
