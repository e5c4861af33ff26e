"""Where pgbench's throughput goes under the agent: one pgbench run per configuration, in turn.

Run (root): .venv/bin/python bench/pgbench_breakdown.py [--stats] [--rounds N] [--seconds S] CONFIG...

CONFIG is ``none`` (no agent) or ``agent`` followed by extra agent arguments joined by commas
(``agent,--busy-cpu,off``; ``agent,--protocol,http`` decodes nothing of PostgreSQL: its sockets
are muted after their first calls, which leaves the probes' entry cost and the agent's fixed
cost).  The agent runs as bench_pgbench.py runs it (tcp and payload probes, ``--protocol
postgres --port PORT --no-store``).  Printed per run, one JSON line: transactions/s, the host's
idle share, others' CPU, the agent's CPU, records, sampling; with ``--stats`` the BPF run time
per program (BPF_ENABLE_STATS: it costs every program run two clock reads, so compare
throughputs only between runs with the same setting).  Not interleaved pairs and not a target:
bench_pgbench.py is the figure.  ``agent@DIR`` (``agent@DIR,--flag,…``) runs the agent with the BPF
objects in DIR (DEETUNE_BPF_DIR): builds of bpf/ with a part changed or left out, in turn with
the shipped ones (``agent``), against the same PostgreSQL."""
import sys, os, time, json, pathlib, argparse
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
import common
from bench_pgbench import pgbench, load
from tests.protocol_servers import Postgres

def idle_share(snap=None):
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    if snap is None: return v
    d = [b - a for a, b in zip(snap, v)]
    return round((d[3] + d[4]) / sum(d), 3)

p = argparse.ArgumentParser()
p.add_argument("--seconds", type=int, default=15)
p.add_argument("--rounds", type=int, default=1)
p.add_argument("--stats", action="store_true")
p.add_argument("configs", nargs="+", help="'none' or agent extra args separated by commas, e.g. '--busy-cpu,off'")
a = p.parse_args()
pg = Postgres.start()
out = []
try:
    pgbench(pg, ["-i", "-s", "5", "-q"], 600)
    pgbench(pg, ["-T", "5", "-c", "4", "-j", "1", "-M", "extended", "-n"], 100)  # warm
    import contextlib
    ctx = common.bpf_stats() if a.stats else contextlib.nullcontext()
    with ctx:
        for rnd in range(a.rounds):
            for cfg in a.configs:
                common.wait_quiet(max_wait=20)
                r = {"cfg": cfg}
                agent = None
                if cfg != "none":
                    objects = cfg.split(",")[0].partition("@")[2]
                    if objects:
                        os.environ["DEETUNE_BPF_DIR"] = objects
                    else:
                        os.environ.pop("DEETUNE_BPF_DIR", None)
                    more = [x for x in cfg.split(",")[1:] if x]
                    extra = ([] if "--protocol" in more else ["--protocol", "postgres"]) + ["--port", str(pg.port), "--no-store"] + more
                    agent = common.Agent(["tcp", "payload"], os.path.join(str(pg.dir), "breakdown.jsonl"), extra).start()
                    agent.begin_window()
                    before = common.prog_stats(agent.prog_ids)
                snap = idle_share(); other = common.OtherCpu(); t0 = time.monotonic()
                res = load(pg, a.seconds, 4, "extended")
                r.update(res); r["idle"] = idle_share(snap); r.update(other.stop(time.monotonic() - t0))
                if agent:
                    r["window"] = agent.end_window()
                    if a.stats:
                        st = common.stats_between(before, common.prog_stats(agent.prog_ids))
                        r["bpf"] = {"ns_per_txn": round(st["run_time_ns"] / res["transactions"]), "progs": st["programs"],
                                    "bpf_cores": round(st["run_time_ns"] / 1e9 / a.seconds, 3)}
                    s = agent.stop()
                    r["agent"] = {k: s.get(k) for k in ("lost", "sampled_out", "sparsest_sampling", "cpu_us_per_record")}
                    r["records"] = (s.get("summary") or {}).get("records")
                print(json.dumps(r), flush=True)
                out.append(r)
finally:
    pg.stop()
