"""The fleet server on a Prometheus holding a large fleet's series (issue 19).

    .venv/bin/python bench/bench_fleet.py                       # 100 hosts, 2,000 services, 20,000 edges
    .venv/bin/python bench/bench_fleet.py --hosts 4 --services 5 --edges 10 --rounds 3    # a smoke test

1. A recorded exposition replayed: the series 100 agents would export (each host 20 services
   listening, 200 client edges to services on other hosts; each edge counted by both hosts'
   agents, as they do: the client's side with its remote endpoint, the server's side by client
   address; every RED, latency-histogram and connection family), written as OpenMetrics at three
   scrape times and turned into TSDB blocks by ``promtool tsdb create-blocks-from openmetrics``;
   Prometheus (Debian's) started on them; the server's recording rules (the file its set-up
   writes, ``deetune.server.scrape.rules_file``) evaluated over those times into blocks too by
   ``promtool tsdb create-blocks-from rules``, as a Prometheus loading them would have recorded.
2. Timed through :class:`deetune.server.fleet.FleetQueries`, as the server's API asks: the fleet
   topology (``graph``: from the recorded series, and interleaved with it ``graph_without_rules``,
   the raw families read as without the rules), a service's dependencies (depth 1, downstream and
   upstream), in rounds (the first, cold, reported apart); medians.  Targets: topology < 2 s,
   dependencies < 500 ms.
3. Series per agent at a typical host: a real ``PrometheusSink`` fed a host's traffic (50
   services, 500 edges: half this host calling others, half others calling it) and scraped; its
   series counted per family, with the caps that bound them.

Prints a summary and saves JSON in bench/results/.  Needs prometheus and promtool (``make test-deps``).
With ``--keep DIR`` the blocks (raw and recorded) are made once and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
           5.0, 10.0, 30.0, 60.0)
CONNECTION_FAMILIES = ("deetune_connections_opened_total", "deetune_connections_failed_total",
                       "deetune_tcp_retransmits_total", "deetune_tcp_resets_total", "deetune_bytes_sent_total",
                       "deetune_bytes_received_total")


def _labels(**kw: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in kw.items()) + "}"


def synthetic_fleet(hosts: int, services: int, edges: int, seed: int = 19):
    """(host → address, host → [services], [(client host, client service, server host, server service, port)])."""
    rng = random.Random(seed)
    address = {f"h{h:03d}": f"10.{h // 250}.{h % 250}.1" for h in range(hosts)}
    names = {h: [f"svc-{h}-{k:02d}" for k in range(services)] for h in address}
    calls = []
    for h in address:
        others = [o for o in address if o != h] or [h]
        seen = set()
        while len([c for c in calls if c[0] == h]) < edges:
            client = rng.choice(names[h])
            server_host = rng.choice(others)
            k = rng.randrange(services)
            key = (client, server_host, k)
            if key in seen:
                continue
            seen.add(key)
            calls.append((h, client, server_host, names[server_host][k], 8000 + k))
    return address, names, calls


def write_openmetrics(path: pathlib.Path, address, names, calls, times: list[float]) -> int:
    """The exposition of every agent at each of ``times``; returns the number of series."""
    series: dict[str, list[tuple[str, float]]] = {}  # family → [(labels text, value at the last time)]

    def add(family: str, labels: str, value: float) -> None:
        series.setdefault(family, []).append((labels, value))

    for h, addr in address.items():
        base = dict(host=h, idc=f"idc{int(h[1:]) % 4}", instance=f"{addr}:9464", job="deetune")
        add("deetune_agent_info", _labels(**base, version="0.1.0", api_port="9477"), 1)
        add("deetune_agent_start_time_seconds", _labels(**base), times[0] - 3600)
        add("deetune_agent_time_seconds", _labels(**base), -1)  # the scrape time
        add("deetune_host_address", _labels(**base, address=addr), 1)
        for k, service in enumerate(names[h]):
            add("deetune_listen_endpoint", _labels(**base, service=service, pid=str(1000 + k), address="0.0.0.0",
                                                   port=str(8000 + k)), 1)
    rng = random.Random(7)
    server_rows: dict[tuple, float] = {}
    for client_host, client, server_host, server, port in calls:
        requests = rng.randint(100, 10_000)
        server_rows[(server_host, client_host, server)] = server_rows.get((server_host, client_host, server), 0) + requests
        cbase = dict(host=client_host, idc=f"idc{int(client_host[1:]) % 4}", instance=f"{address[client_host]}:9464",
                     job="deetune")
        remote = f"{address[server_host]}:{port}"
        add("deetune_remote_endpoint", _labels(**cbase, client=client, server=remote, address=address[server_host],
                                               port=str(port)), 1)
        _edge_series(add, cbase, client, remote, requests)
    for (server_host, client_host, server), requests in server_rows.items():
        sbase = dict(host=server_host, idc=f"idc{int(server_host[1:]) % 4}", instance=f"{address[server_host]}:9464",
                     job="deetune")
        _edge_series(add, sbase, address[client_host], server, requests)
    # Types matter not to PromQL: counters as counters, every other sample name as a gauge family
    # (the histogram's _bucket, _sum and _count included); cumulative ones grow from 0 to their value.
    cumulative = ("_total", "_bucket", "_sum", "_count")
    count = 0
    with open(path, "w") as out:
        for family, items in series.items():
            kind = "counter" if family.endswith("_total") else "gauge"
            name = family[: -len("_total")] if kind == "counter" else family
            out.write(f"# TYPE {name} {kind}\n")
            for labels, last in items:
                count += 1
                for index, t in enumerate(times):
                    if last == -1:
                        value = t
                    elif family.endswith(cumulative):
                        value = last * index / (len(times) - 1)
                    else:
                        value = last
                    out.write(f"{family}{labels} {value} {t:.3f}\n")
        out.write("# EOF\n")
    return count


def _edge_series(add, base, client: str, server: str, requests: int) -> None:
    red = dict(base, protocol="http", client=client, server=server, method="GET")
    errors = requests // 50
    add("deetune_requests_total", _labels(**red, status="200"), requests - errors)
    add("deetune_requests_total", _labels(**red, status="500"), errors)
    add("deetune_request_errors_total", _labels(**red, status="200"), 0)
    add("deetune_request_errors_total", _labels(**red, status="500"), errors)
    cumulative = 0.0
    for index, bound in enumerate(BUCKETS):
        cumulative += requests * (0.02 if index < 4 else 0.1 if index < 12 else 0.0)
        add("deetune_request_duration_seconds_bucket", _labels(**red, le=repr(bound)), min(cumulative, requests))
    add("deetune_request_duration_seconds_bucket", _labels(**red, le="+Inf"), requests)
    add("deetune_request_duration_seconds_sum", _labels(**red), requests * 0.004)
    add("deetune_request_duration_seconds_count", _labels(**red), requests)
    for family in CONNECTION_FAMILIES:
        add(family, _labels(**base, client=client, server=server), requests // 100)


def start_prometheus(directory: pathlib.Path, data: pathlib.Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = directory / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
    log = open(directory / "prometheus.log", "ab")
    proc = subprocess.Popen([shutil.which("prometheus") or "/usr/bin/prometheus", f"--config.file={config}",
                             f"--storage.tsdb.path={data}", f"--web.listen-address=127.0.0.1:{port}",
                             "--storage.tsdb.retention.time=30d", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"prometheus did not start (see {directory}/prometheus.log)")
        time.sleep(0.5)


def timed(fn, rounds: int) -> dict:
    return timed_interleaved({"x": fn}, rounds)["x"]


def timed_interleaved(fns: dict, rounds: int) -> dict:
    """Each function timed ``rounds`` + 1 times, taking turns (the first round: cold)."""
    times: dict = {name: [] for name in fns}
    results = {}
    for _ in range(rounds + 1):
        for name, fn in fns.items():
            began = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - began)
    return {name: {"cold_s": round(t[0], 4), "median_s": round(statistics.median(t[1:]), 4),
                   "max_s": round(max(t[1:]), 4), "rounds": rounds, "result": results[name]}
            for name, t in times.items()}


def backfill_rules(work: pathlib.Path, data: pathlib.Path, times: list[float]) -> None:
    """The server's recording rules evaluated over the fleet's times, into blocks in ``data``
    (Prometheus, started on the raw blocks, answers promtool's queries; stopped after)."""
    from deetune.server.scrape import rules_file

    rules = work / "deetune-rules.yml"
    rules.write_text(rules_file("15s"))
    blocks = work / "rule-blocks"
    shutil.rmtree(blocks, ignore_errors=True)
    proc, url = start_prometheus(work, data)
    try:
        subprocess.run(["promtool", "tsdb", "create-blocks-from", "rules", "-q", f"--url={url}",
                        f"--start={int(times[0]) - 60}", f"--end={int(times[-1]) + 60}", f"--output-dir={blocks}",
                        str(rules)], check=True)
    finally:
        proc.terminate()
        proc.wait(60)
    for block in blocks.iterdir():
        block.rename(data / block.name)
    blocks.rmdir()


def agent_series(services: int, edges: int) -> dict:
    """Series one agent exports for a host with ``services`` services and ``edges`` edges."""
    from deetune.events import ConnectionEvent, ExchangeEvent
    from deetune.place import Place
    from deetune.sinks.prometheus import DEFAULT_MAX_SERIES, PrometheusSink
    from prometheus_client.parser import text_string_to_metric_families

    sink = PrometheusSink("127.0.0.1", 0, is_local_listener=lambda addr, port, ts=None: addr == "10.9.0.1",
                          service_of=None)
    sink.set_place(Place("h-typical", (("idc", "bj1"), ("zone", "a"))), api_port=9477)
    rng = random.Random(3)
    now = time.time_ns()
    for index in range(edges):
        local = f"svc-{index % services:02d}"
        if index % 2:  # another host calls this one: the server side counts here
            role, laddr, lport, raddr, rport = "server", "10.9.0.1", 8000 + index % services, f"10.9.{1 + index % 200}.2", 40000
            client, server = raddr, local
        else:
            role, laddr, lport, raddr, rport = "client", "10.9.0.1", 40000 + index, f"10.9.{1 + index % 200}.3", 9000 + index
            client, server = local, f"{raddr}:{rport}"
        common = dict(pid=100 + index % services, comm=local, role=role, laddr=laddr, lport=lport, raddr=raddr,
                      rport=rport, ts=now, ts_mono_ns=now, client_service=client, server_service=server, sock_id=index + 1)
        sink.handle(ConnectionEvent(phase="open", family=4, **common))
        for status in (200, 200, 500):
            sink.handle(ExchangeEvent(protocol="http", method="GET", target="/x", status=status, error=status >= 500,
                                      latency_ns=rng.randint(10_000, 50_000_000), duration_ns=None, request_bytes=10,
                                      response_bytes=10, **common))
        sink.handle(ConnectionEvent(phase="close", family=4, bytes_sent=100, bytes_received=100, duration_ns=1,
                                    retransmits=0, **common))
    with urllib.request.urlopen(sink.url) as response:
        text = response.read().decode()
    sink.close()
    per_family: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        per_family[family.name] = len(family.samples)
    return {"services": services, "edges": edges, "series": sum(per_family.values()), "per_family": per_family,
            "cap_per_family": DEFAULT_MAX_SERIES, "exposition_bytes": len(text)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--services", type=int, default=20, help="services per host (default 20: 2,000 in all)")
    parser.add_argument("--edges", type=int, default=200, help="client edges per host (default 200: 20,000 in all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keep", metavar="DIR", help="keep the blocks here (and reuse them when present)")
    args = parser.parse_args(argv)
    from deetune.server.fleet import FleetQueries
    from deetune.server.prom import Prometheus

    work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="deetune-bench-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    meta = work / "meta.json"
    out: dict = {"hosts": args.hosts, "services": args.hosts * args.services, "edges": args.hosts * args.edges}
    if not (meta.exists() and json.loads(meta.read_text())["args"] == [args.hosts, args.services, args.edges]):
        shutil.rmtree(data, ignore_errors=True)
        end = (time.time() // 60) * 60 - 120
        times = [end - 1200, end - 600, end]
        address, names, calls = synthetic_fleet(args.hosts, args.services, args.edges)
        began = time.monotonic()
        exposition = work / "fleet.om"
        out["series"] = write_openmetrics(exposition, address, names, calls, times)
        subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", "-q", str(exposition), str(data)],
                       check=True)
        exposition.unlink()
        out["backfill_s"] = round(time.monotonic() - began, 1)
        meta.write_text(json.dumps({"args": [args.hosts, args.services, args.edges], "times": times,
                                    "series": out["series"]}))
    saved = json.loads(meta.read_text())
    from deetune.server.scrape import rules_file

    if saved.get("rules") != rules_file("15s"):
        began = time.monotonic()
        backfill_rules(work, data, saved["times"])
        out["rules_backfill_s"] = round(time.monotonic() - began, 1)
        saved["rules"] = rules_file("15s")
        meta.write_text(json.dumps(saved))
    times, out["series"] = saved["times"], saved["series"]
    proc, url = start_prometheus(work, data)
    try:
        prom = Prometheus(url, timeout=120)
        queries = FleetQueries(prom)
        # `until` a minute after the last scrape: the rules' first evaluation after it (at their
        # group's offset) lies before it, as every evaluation does at a real scrape interval.
        since, until = int((times[0] + 30) * 1e9), int((times[-1] + 60) * 1e9)
        assert queries._state(since / 1e9, until / 1e9)[1], "the recorded series do not cover the range"
        answers: dict = {}
        prometheus_cpu: dict = {"graph": [], "graph_without_rules": []}

        def cpu_seconds() -> float:  # Prometheus's user + system time
            fields = pathlib.Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        def graph(queries=queries, name="graph"):
            before = cpu_seconds()
            answer = answers[name] = queries.graph(since, until)
            prometheus_cpu[name].append(cpu_seconds() - before)
            return {"nodes": len(answer["nodes"]), "edges": len(answer["edges"]),
                    "joined": sum(e["joined"] for e in answer["edges"])}

        without = FleetQueries(prom, use_rules=False)
        out.update(timed_interleaved({"graph": graph,
                                      "graph_without_rules": lambda: graph(without, "graph_without_rules")},
                                     args.rounds))
        for name, spent in prometheus_cpu.items():
            out[name]["prometheus_cpu_s_median"] = round(statistics.median(spent[1:]), 2)
        out["graph_same_answer"] = answers["graph"] == answers["graph_without_rules"]
        assert out["graph_same_answer"], "the graph from the recorded series differs from the raw one"
        answers.clear()
        # A service with callers and callees: the server of host h000's first call.
        calls = synthetic_fleet(args.hosts, args.services, args.edges)[2]
        service = calls[0][3]
        out["dependencies_of"] = service
        for direction in ("downstream", "upstream"):
            def deps(direction=direction):
                answer = queries.dependencies(service, 1, direction, since, until)
                return {"nodes": len(answer["nodes"]), "edges": len(answer["edges"])}

            out[f"dependencies_{direction}"] = timed(deps, args.rounds)
    finally:
        proc.terminate()
        proc.wait(60)
    out["agent_series"] = agent_series(50, 500)
    out["targets"] = {"graph_s": 2.0, "dependencies_s": 0.5}
    print(json.dumps({k: v for k, v in out.items() if k != "agent_series"}, indent=1))
    print("series per agent at a typical host (50 services, 500 edges):", out["agent_series"]["series"],
          json.dumps(out["agent_series"]["per_family"]))
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"fleet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"saved {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
