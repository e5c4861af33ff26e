"""Every overhead benchmark in sequence (``make bench``); raw results as JSON in bench/results/.

    .venv/bin/python bench/run_all.py [--quick] [--profile]

1. bench_connections.py: connect/send/close loop, no agent vs process+tcp probes (issue 2);
2. bench_l7.py: nginx + wrk and redis + redis-benchmark in four modes, the every-request check at
   10,000 requests/s, and the decoder micro-benchmarks (issue 3);
3. bench_store.py and bench_store_agent.py: the topology store's writes and queries, and whether it
   slows the agent (issue 4);
4. bench_sinks.py: agent CPU with the Prometheus and OTLP sinks, and the series cap (issue 5);
5. bench_recording.py: nginx + wrk with a recording task against decoding alone (issue 6);
6. bench_protocol_decoders.py and bench_pgbench.py: each protocol decoder's exchanges/s on one core,
   and pgbench against PostgreSQL with and without the agent (issue 21);
7. bench_accounting.py: the kernel's exact counting, idle and saturated, and bench_syscall_tax.py
   (issue 16); bench_tls.py
   and bench_http2_decoder.py (issue 20); bench_fleet.py (issue 19); bench_capture_size.py (17);
8. with --profile: profile_agent.py for the conn, http and redis scenarios (needs py-spy: see there).

``--quick`` runs 2 pairs/rounds of shorter runs: a smoke test of the benchmarks, not figures to quote.
Figures and their reading: docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 pairs of short runs (smoke test)")
    parser.add_argument("--profile", action="store_true", help="also profile the agent (py-spy)")
    args = parser.parse_args(argv)
    common.require_root()
    began = time.monotonic()
    import bench_connections
    import bench_l7

    conn_args = ["--pairs", "2", "--seconds", "2", "--rate-seconds", "3"] if args.quick else []
    l7_args = (["--rounds", "2", "--wrk-seconds", "3", "--warmup", "2", "--requests", "30000", "--rate-seconds", "3",
                "--rate-runs", "1"]
               if args.quick else [])
    results = {"machine": common.machine(), "quick": args.quick}
    print("=" * 30 + " connections (issue 2) " + "=" * 30, flush=True)
    results["connections"] = bench_connections.main(conn_args)
    print("=" * 30 + " L7 (issue 3) " + "=" * 30, flush=True)
    results["l7"] = bench_l7.main(l7_args)
    here = os.path.dirname(os.path.abspath(__file__))
    others = {
        "store (issue 4)": ["bench_store.py", *(["--edges", "1000", "--services", "200", "--repeat", "5"] if args.quick else [])],
        "store and agent (issue 4)": ["bench_store_agent.py",
                                      *(["--pairs", "2", "--seconds", "2", "--rate-seconds", "3"] if args.quick else [])],
        "sinks (issue 5)": ["bench_sinks.py", *(["--pairs", "2", "--seconds", "3", "--urls", "1000"] if args.quick else [])],
        "recording (issue 6)": ["bench_recording.py", *(["--rounds", "2", "--wrk-seconds", "3", "--rate-runs", "1",
                                                          "--rate-seconds", "3"] if args.quick else [])],
        "protocol decoders (issue 21)": ["bench_protocol_decoders.py",
                                         *(["--exchanges", "20000", "--rounds", "2"] if args.quick else [])],
        "pgbench (issue 21)": ["bench_pgbench.py", *(["--rounds", "2", "--seconds", "5", "--scale", "1"]
                                                     if args.quick else [])],
        "kernel accounting (issue 16)": ["bench_accounting.py", *(["--rounds", "2", "--seconds", "3"] if args.quick else [])],
        "syscall tax (issue 16)": ["bench_syscall_tax.py", *(["--rounds", "2", "--calls", "500000"] if args.quick else [])],
        "tls (issue 20)": ["bench_tls.py", *(["--rounds", "2", "--seconds", "3"] if args.quick else [])],
        "http2 decoder (issue 20)": ["bench_http2_decoder.py"],
        "fleet (issue 19)": ["bench_fleet.py"],
        "capture size (issue 17)": ["bench_capture_size.py"],
    }
    for title, (script, *script_args) in others.items():
        print("=" * 30 + f" {title} " + "=" * 30, flush=True)
        code = subprocess.run([sys.executable, os.path.join(here, script), *script_args]).returncode
        results[script] = {"exit_code": code}
    if args.profile:
        import profile_agent

        for scenario in ("conn", "http", "redis"):
            print("=" * 30 + f" profile: {scenario} " + "=" * 30, flush=True)
            profile_agent.main([scenario, "--seconds", "3" if args.quick else "8"])
    targets = [["connections", *t] for t in results["connections"]["targets"]] + [["L7", *t] for t in results["l7"]["targets"]]
    print("\nAll targets:\n" + common.table(["benchmark", "target", "measured", ""], targets))
    results["seconds"] = round(time.monotonic() - began)
    path = common.save_results("all", results)
    print(f"\n{results['seconds']} s; raw results: {path}")


if __name__ == "__main__":
    main()
