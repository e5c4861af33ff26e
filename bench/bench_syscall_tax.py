"""What the agent's probes add to every syscall on the host, whether or not it touches a socket.

    sudo .venv/bin/python bench/bench_syscall_tax.py [--rounds 5] [--calls 2000000]

A loop of ``getppid(2)`` calls (bench/loadgen.c ``syscalls``), pinned to the last CPU, with no
agent and with the agent at its default probes, interleaved; ns per call, the median of three
loops per run, and the pairs' differences.  Any syscall tracepoint attached sends every syscall of
every process through the kernel's slow path, so this shows whether one is.
``DEETUNE_BENCH_SOURCE=DIR`` measures another build (e.g. an older checkout's ``src``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import median  # noqa: E402


def loop_ns(gen: str, calls: int) -> float:
    cpu = str((os.cpu_count() or 1) - 1)
    runs = [common.run_json(["taskset", "-c", cpu, gen, "syscalls", str(calls)])["ns_per_call"] for _ in range(3)]
    return median(runs)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    common.require_root()
    gen = common.loadgen()
    out: dict = {"benchmark": "syscall_tax", "machine": common.machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="deetune-bench-") as tmp:
        def run(mode: str, r: int) -> dict:
            common.wait_quiet(max_wait=20)
            if mode == "none":
                ns = loop_ns(gen, args.calls)
            else:
                agent = common.Agent(["process", "tcp", "payload"], os.path.join(tmp, "events.jsonl")).start()
                try:
                    time.sleep(1.0)
                    ns = loop_ns(gen, args.calls)
                finally:
                    agent.stop()
            common.log(f"  #{r + 1} {mode:5} {ns:6.1f} ns per syscall")
            return {"mode": mode, "ns_per_call": ns}

        runs, discarded = common.interleave(["none", "agent"], args.rounds, run)
    added = [a["ns_per_call"] - n["ns_per_call"] for n, a in zip(runs["none"], runs["agent"])]
    out.update(runs=runs, discarded_rounds=discarded, added_ns=added, median_added_ns=median(added))
    text = (f"getppid: none {median(r['ns_per_call'] for r in runs['none']):.1f} ns, "
            f"agent {median(r['ns_per_call'] for r in runs['agent']):.1f} ns; added per syscall, median of pairs: "
            f"{median(added):.1f} ns ({', '.join(f'{x:.1f}' for x in added)})")
    return common.report("syscall_tax", out, [text])


if __name__ == "__main__":
    main()
