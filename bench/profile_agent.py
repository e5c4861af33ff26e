"""Where the agent's user-space time goes, under a fixed-rate loopback load.

    .venv/bin/python bench/profile_agent.py SCENARIO [--rate 10000] [--seconds 8] [--profiler py-spy|cprofile]

Scenarios (bench/loadgen.c at a fixed rate):
  conn   connect / write 64 B / close to a C server; agent --probe process --probe tcp
  http   GET / on 10 keep-alive connections to nginx (1 KiB page); agent --probe tcp --probe payload --port PORT
  redis  GET on 10 keep-alive connections to redis-server; agent --probe tcp --probe payload --port PORT

Profilers: py-spy (sampling, little overhead; found on PATH, or in $PYSPY, or installed with
``pip install --target /tmp/pyspy py-spy`` and PYSPY=/tmp/pyspy/bin/py-spy) or cProfile
(``python -m cProfile -o FILE -m deetune.agent …``: exact call counts, but it slows the agent down
several times).  Prints the functions with the largest inclusive and self share of the samples (or
of the time), and the agent's CPU per record; the raw profile is kept in bench/results/.
"""

from __future__ import annotations

import argparse
import collections
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_l7 import Nginx, Redis  # noqa: E402


def pyspy_path() -> str | None:
    return os.environ.get("PYSPY") or shutil.which("py-spy") or (
        "/tmp/pyspy/bin/py-spy" if os.path.exists("/tmp/pyspy/bin/py-spy") else None)


def short(frame: str) -> str:
    return re.sub(r"\(/.*?/(?:site-packages|src|lib/python3\.\d+)/", "(", frame)


def fold_report(path: str, top: int = 25) -> str:
    inclusive: collections.Counter = collections.Counter()
    own: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            n = int(count)
            total += n
            # group by function (drop line numbers) so that a function counts once per stack
            frames = [re.sub(r":\d+\)$", ")", short(fr)) for fr in stack.split(";")]
            for fr in set(frames):
                inclusive[fr] += n
            own[frames[-1]] += n
    lines = [f"{total} samples (agent busy); inclusive share by function:"]
    lines += [f"  {100 * n / total:5.1f}%  {fr}" for fr, n in inclusive.most_common(top)]
    lines.append("self share (the function's own code, builtins it calls included):")
    lines += [f"  {100 * n / total:5.1f}%  {fr}" for fr, n in own.most_common(top)]
    return "\n".join(lines)


def cprofile_report(path: str, top: int = 25) -> str:
    import io

    buf = io.StringIO()
    stats = pstats.Stats(path, stream=buf)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return re.sub(r"/\S*/(site-packages|src|lib/python3\.\d+)/", "", buf.getvalue())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["conn", "http", "redis"])
    parser.add_argument("--rate", type=float, default=10000)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--profiler", choices=["py-spy", "cprofile", "none"], default="py-spy",
                        help="none: no profile, only the agent's CPU per record (to compare two builds, "
                             "DEETUNE_BENCH_SOURCE=DIR for the other)")
    args = parser.parse_args(argv)
    common.require_root()
    gen = common.loadgen()
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_file = str(common.RESULTS / f"profile-{args.scenario}-{args.profiler}-{stamp}.{'txt' if args.profiler == 'py-spy' else 'pstats'}")
    if args.profiler == "none":
        out_file = ""
    with tempfile.TemporaryDirectory(prefix="deetune-prof-") as tmp:
        server = None
        if args.scenario == "conn":
            base = common.free_port_range(8)
            server = subprocess.Popen([gen, "serve", str(base), "8"], stdout=subprocess.PIPE, text=True)
            assert server.stdout and server.stdout.readline().strip() == "listening"
            probes, extra = ["process", "tcp"], []
            load = [gen, "conn", str(base), "8", "4", str(args.seconds), str(args.rate), "64"]
        else:
            server = Nginx(tmp) if args.scenario == "http" else Redis(tmp)
            probes, extra = ["tcp", "payload"], ["--port", str(server.port)]
            load = [gen, args.scenario, str(server.port), "10", str(args.seconds), str(args.rate)]
        python_args = ["-m", "cProfile", "-o", out_file] if args.profiler == "cprofile" else []
        spy = None
        try:
            agent = common.Agent(probes, os.path.join(tmp, "events.jsonl"), extra, python_args=python_args).start()
            if args.profiler == "py-spy":
                binary = pyspy_path()
                if not binary:
                    sys.exit("py-spy not found: pip install --target /tmp/pyspy py-spy (or use --profiler cprofile)")
                spy = subprocess.Popen([binary, "record", "-p", str(agent.pid), "-r", "100", "-f", "raw", "-o", out_file,
                                        "-d", str(int(args.seconds) + 30)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)
            agent.begin_window()
            result = common.run_json(load)
            window = agent.end_window()
            memory = common.smaps_breakdown(agent.pid)
            if spy is not None:  # profile the load only, not the drain and the teardown
                spy.send_signal(2)  # py-spy writes its output on SIGINT
                spy.wait(60)
                spy = None
            stopped = agent.stop()
        finally:
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)
            if args.scenario == "conn":
                server.terminate()
                server.wait(10)
            else:
                server.stop()
    print(f"scenario {args.scenario}: {result}")
    print(f"agent: cpu {window['oncpu_cores']} cores over the load, run-queue wait {window['runq_wait_s']} s, "
          f"summary {stopped.get('summary')}, CPU per record {stopped.get('cpu_us_per_record')} µs "
          + ("" if args.profiler == "none" else f"(under {args.profiler}: "
             f"{'sampling adds a little' if args.profiler == 'py-spy' else 'cProfile inflates it several times'})"))
    print(f"agent resident memory at the end of the load, MiB by mapping: {memory}")
    if args.profiler == "none":
        return
    print(fold_report(out_file) if args.profiler == "py-spy" else cprofile_report(out_file))
    print(f"raw profile: {out_file}")


if __name__ == "__main__":
    main()
