"""Cost of the Prometheus and OTLP sinks (issue 5), and the Prometheus series cap under 10,000 distinct URLs.

    .venv/bin/python bench/bench_sinks.py [--pairs 5] [--seconds 10] [--rate 10000] [--urls 10000]
                                          [--url-rate 2000] [--max-series N] [--modes A,B] [--skip sinks|cardinality]

**Sinks at a fixed rate.**  nginx (bench_l7's configuration: one worker, a 1 KiB page, keep-alive,
``sendfile off``) is driven by bench/loadgen.c at a fixed ``--rate`` requests/s (default 10,000) over
10 keep-alive connections for ``--seconds`` per run.  Two agent modes, interleaved (A B A B …):

- ``A`` (jsonl): ``--probe tcp --probe payload --port NGINX --sink jsonl:FILE``;
- ``B`` (jsonl+prom+otlp): the same plus ``--sink prometheus:127.0.0.1:PORT --sink otlp:URL``.
  URL is a local OTLP/HTTP receiver started by the benchmark in a process of its own (its CPU is not
  the agent's): it answers 200 to POSTs on /v1/traces and /v1/metrics, keeps the bodies, and decodes
  them (opentelemetry-proto) only after the run, to count the spans and metric data points received.
  /metrics is scraped once a second during the load, as Prometheus would, so the exposition's cost
  is in the agent's CPU.

``--modes A,B,C,D`` adds C (jsonl+prometheus) and D (jsonl+otlp), to tell the two sinks' costs apart.

Per run: agent CPU over the load window in cores, all threads (utime+stime of /proc/PID/stat), and
its main thread alone (/proc/PID/schedstat); RSS and peak RSS; records lost; requests sent; exchanges
seen (``"type":"request"`` events of each side in the jsonl file).  In B also: scrape sizes, times
and series, ``deetune_requests_total`` against the server-side exchanges (taken once the agent has
drained its backlog), OTLP export requests, bytes, spans and data points received, and the sink's
own summary line at close.

**Cardinality.**  The agent runs with the prometheus sink (and jsonl, for exact counts) on the
default cap, or ``--max-series N``; a Python keep-alive client (``http.client``) on the same nginx:

1. ``--urls`` GETs of distinct URLs ``/item/0`` … ``/item/9999`` (files nginx serves, 200): the target is
   not a label, so the series must not grow with them;
2. the same URLs each with a distinct extension method (``XAAA /item/0``, ``XAAB /item/1`` …, nginx
   answers 405): the method *is* a label, so the cap must bite: every family stays within it, the
   ``other`` series appears, and ``deetune_series_overflow_total`` counts exactly the observations
   folded (the expected figures are worked out from the server-side exchanges in the jsonl file, in
   the order the sink saw them).

Raw results go to bench/results/sinks-*.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_l7 import Nginx  # noqa: E402
from common import fmt, median, pair_ratios, table  # noqa: E402

MODES = ["A", "B"]
MODE_NAMES = {"A": "jsonl", "B": "jsonl+prometheus+otlp", "C": "jsonl+prometheus", "D": "jsonl+otlp"}

# -- the OTLP/HTTP receiver (a process of its own) ----------------------------------------------------
RECEIVER = r'''
import gzip, json, sys, threading, zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

bodies = {"/v1/traces": [], "/v1/metrics": []}
counts = {"/v1/traces": [0, 0], "/v1/metrics": [0, 0], "other": [0, 0]}
lock = threading.Lock()


def decode(path):
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    out = {"spans": 0, "span_kinds": {}, "resources": 0, "data_points": 0, "last_data_points": 0,
           "metrics": set(), "bytes_decoded": 0, "errors": 0}
    with lock:
        items = list(bodies[path])
    for encoding, body in items:
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            out["bytes_decoded"] += len(body)
            if path == "/v1/traces":
                req = ExportTraceServiceRequest.FromString(body)
                for rs in req.resource_spans:
                    out["resources"] += 1
                    for ss in rs.scope_spans:
                        out["spans"] += len(ss.spans)
                        for span in ss.spans:
                            out["span_kinds"][span.kind] = out["span_kinds"].get(span.kind, 0) + 1
            else:
                req = ExportMetricsServiceRequest.FromString(body)
                points = 0
                for rm in req.resource_metrics:
                    for sm in rm.scope_metrics:
                        for metric in sm.metrics:
                            out["metrics"].add(metric.name)
                            kind = metric.WhichOneof("data")
                            points += len(getattr(metric, kind).data_points) if kind else 0
                out["data_points"] += points
                out["last_data_points"] = points
        except Exception:
            out["errors"] += 1
    out["metrics"] = sorted(out["metrics"])
    out["span_kinds"] = {str(k): v for k, v in out["span_kinds"].items()}
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self, code, body, ctype):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?")[0]
        with lock:
            key = path if path in bodies else "other"
            counts[key][0] += 1
            counts[key][1] += len(body)
            if key in bodies:
                bodies[key].append((self.headers.get("Content-Encoding", ""), body))
        # An empty Export*ServiceResponse: zero bytes of protobuf.
        self._answer(200, b"", "application/x-protobuf")

    def do_GET(self):
        if self.path == "/stats":
            out = {"requests": {k: v[0] for k, v in counts.items()}, "bytes": {k: v[1] for k, v in counts.items()},
                   "traces": decode("/v1/traces"), "metrics": decode("/v1/metrics")}
            self._answer(200, json.dumps(out).encode(), "application/json")
        else:
            self._answer(404, b"", "text/plain")


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
'''


class Receiver:
    """The OTLP/HTTP receiver, in a subprocess."""

    def __init__(self) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="deetune-otlp-receiver-", suffix=".log")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen([common.PYTHON, "-c", RECEIVER], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=common.source_env())
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"OTLP receiver did not start: {line!r} {self._stderr()[-500:]}")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}"

    def cpu_s(self) -> float:
        return common.cpu_seconds(self.proc.pid)

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=120) as response:
            return json.load(response)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.errors = self._stderr()[-2000:]
        self.log.close()

    def _stderr(self) -> str:
        with open(self.log.name) as f:
            return f.read()


# -- Prometheus exposition -----------------------------------------------------------------------------
def parse_exposition(text: str) -> dict[str, dict]:
    """Per family: label sets (``le`` left out: a histogram's label set is one series of buckets), samples
    (what Prometheus stores as time series), and the label sets themselves with their value (``_count``
    for histograms)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        sets: dict[tuple, float] = {}
        samples = 0
        for sample in family.samples:
            samples += 1
            if family.type == "histogram" and not sample.name.endswith("_count"):
                continue
            if family.type == "counter" and sample.name.endswith("_created"):
                continue
            key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            sets[key] = sample.value
        name = family.name + ("_total" if family.type == "counter" and not family.name.endswith("_total") else "")
        out[name] = {"type": family.type, "label_sets": len(sets), "samples": samples, "values": sets}
    return out


def total_of(families: dict, name: str, **match: str) -> float:
    """Sum of a family's values over the label sets matching ``match``."""
    fam = families.get(name)
    if not fam:
        return 0.0
    return sum(v for labels, v in fam["values"].items() if all(dict(labels).get(k) == x for k, x in match.items()))


class Scraper:
    """GET /metrics every ``interval`` s in a thread, as Prometheus would; sizes and times of each scrape."""

    def __init__(self, url: str, interval: float = 1.0):
        self.url, self.interval = url, interval
        self.sizes: list[int] = []
        self.times_ms: list[float] = []
        self.errors: list[str] = []
        self.last = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scrape(self) -> str:
        t0 = time.perf_counter()
        with urllib.request.urlopen(self.url, timeout=30) as response:
            body = response.read()
        self.times_ms.append((time.perf_counter() - t0) * 1000)
        self.sizes.append(len(body))
        self.last = body.decode()
        return self.last

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.scrape()
            except OSError as exc:
                self.errors.append(str(exc))
            next_at += self.interval
            self._stop.wait(max(next_at - time.monotonic(), 0.0))

    def start(self) -> Scraper:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread:
            self._thread.join(30)
        return {"scrapes": len(self.sizes), "bytes": self.sizes, "ms": [round(x, 1) for x in self.times_ms],
                "errors": self.errors[:5]}


def settled_families(scraper: Scraper, family: str, timeout: float = 30.0) -> dict:
    """Scrape until ``family``'s total stops moving (the agent has drained its backlog); the last parse."""
    deadline = time.monotonic() + timeout
    previous = None
    while True:
        families = parse_exposition(scraper.scrape())
        current = total_of(families, family)
        if current == previous or time.monotonic() > deadline:
            return families
        previous = current
        time.sleep(1.0)


_OTLP_SUMMARY = re.compile(r"otlp sink: (\d+)/(\d+) spans exported, (\d+) dropped \(queue full (\d+), span queue full (\d+), "
                           r"export failed (\d+), abandoned at close (\d+)\); metric exports (\d+) ok, (\d+) failed")


def otlp_summary(stderr: list[str]) -> dict | None:
    for line in reversed(stderr):
        m = _OTLP_SUMMARY.search(line)
        if m:
            keys = ["spans_exported", "spans", "dropped", "queue_dropped", "span_queue_dropped", "spans_failed",
                    "abandoned", "metric_exports", "metric_exports_failed"]
            return dict(zip(keys, map(int, m.groups())))
    return None


# -- sinks at a fixed rate ------------------------------------------------------------------------------
def count_exchanges(path: str, port: int) -> dict[str, int]:
    """Exchanges of nginx's port in the jsonl file: by side, and those without a response (records lost,
    or still open at the end: the L7 handler reports them when the connection closes or the agent stops)."""

    def key(event: dict):
        if event.get("type") != "request" or event.get("protocol") != "http":
            return None
        if event["role"] == "server" and event["lport"] == port:
            side = "server"
        elif event["role"] == "client" and event["rport"] == port:
            side = "client"
        else:
            return None
        return f"{side}_no_response" if event.get("status") is None else f"{side}_answered"

    counts = common.scan_jsonl(path, '"request"', key)
    out = {side: counts.get(f"{side}_answered", 0) + counts.get(f"{side}_no_response", 0) for side in ("server", "client")}
    return {"server_seen": out["server"], "client_seen": out["client"],
            "server_no_response": counts.get("server_no_response", 0),
            "client_no_response": counts.get("client_no_response", 0)}


def sinks_run(mode: str, r: int, nginx: Nginx, tmp: str, args) -> dict:
    prom, otlp = "prometheus" in MODE_NAMES[mode], "otlp" in MODE_NAMES[mode]
    waited = common.wait_quiet()
    jsonl = os.path.join(tmp, f"sinks{r}-{mode}.jsonl")
    extra = ["--port", str(nginx.port)]
    receiver = scraper = None
    if prom:
        prom_port = common.free_port()
        extra += ["--sink", f"prometheus:127.0.0.1:{prom_port}"]
    if otlp:
        receiver = Receiver()
        extra += ["--sink", f"otlp:{receiver.url}"]
    gen = common.loadgen()
    agent = common.Agent(["tcp", "payload"], jsonl, extra)
    out: dict = {"mode": mode, "sinks": MODE_NAMES[mode], "waited_s": waited}
    try:
        agent.start()
        if prom:
            scraper = Scraper(f"http://127.0.0.1:{prom_port}/metrics")
            scraper.scrape()  # waits for the sink's warm-up (naming every process), done before the load
            scraper.start()
        if otlp:
            receiver_cpu0 = receiver.cpu_s()
        agent.begin_window()
        other, busy, t0 = common.OtherCpu(), common.busy_cores_since(), time.monotonic()
        load = common.run_json([gen, "http", str(nginx.port), "10", str(args.seconds), str(args.rate)])
        wall = time.monotonic() - t0
        window = agent.end_window()
        out.update({"load": load, "busy_cores": common.busy_cores_since(busy), **other.stop(wall), "window": window})
        if otlp:
            out["receiver_cores"] = round((receiver.cpu_s() - receiver_cpu0) / wall, 3)
        if prom:
            out["scrapes"] = scraper.stop()
            families = settled_families(scraper, "deetune_requests_total")
            out["final_scrape_bytes"] = len(scraper.last)
            out["series"] = {name: {"label_sets": f["label_sets"], "samples": f["samples"]} for name, f in families.items()}
            out["prom_requests_total"] = total_of(families, "deetune_requests_total")
            out["prom_requests_no_response"] = total_of(families, "deetune_requests_total", status="none")
            out["prom_overflow"] = {dict(k).get("family"): v for k, v in
                                    families.get("deetune_series_overflow_total", {}).get("values", {}).items()}
        window_cpu0 = agent._window["cpu"]
    finally:
        if scraper is not None:
            scraper.stop()
        stopped = agent.stop()
    out["agent"] = {k: v for k, v in stopped.items() if k != "summary"}
    out["summary"] = stopped.get("summary") or {}
    out.update(count_exchanges(jsonl, nginx.port))
    os.unlink(jsonl)
    seen = out["server_seen"] + out["client_seen"]
    if stopped.get("lifetime_cpu_s") is not None and seen:
        # from the start of the load to the agent's exit: the backlog drained after the load, and the
        # spans exported at close, are CPU spent on these exchanges too
        out["cpu_to_exit_s"] = round(stopped["lifetime_cpu_s"] - window_cpu0, 3)
        out["us_per_exchange"] = round(out["cpu_to_exit_s"] / seen * 1e6, 1)
    if receiver is not None:
        try:
            out["otlp_receiver"] = receiver.stats()
        finally:
            receiver.stop()
        if receiver.errors:
            out["otlp_receiver_stderr"] = receiver.errors
        out["otlp_sink"] = otlp_summary(agent.stderr)
    return out


def log_sinks_run(r: int, res: dict) -> None:
    w, load = res["window"], res["load"]
    line = (f"  pair {r + 1} {res['mode']} ({res['sinks']}): {load['done']:,} requests at {load['rate']:,.0f}/s"
            f"  agent {w['cpu_cores']} cores (main thread {w['main_oncpu_cores']})  lost {res['agent'].get('lost')}"
            f"  seen server {res['server_seen']:,} client {res['client_seen']:,}  {res.get('us_per_exchange')} µs/exchange"
            f"  peak RSS {w['hwm_mb']} MB  others {res['other_cores']} cores")
    if "scrapes" in res:
        line += f"  | prom requests_total {res['prom_requests_total']:,.0f}  scrapes {res['scrapes']['scrapes']}"
    if "otlp_receiver" in res:
        rec = res["otlp_receiver"]
        line += (f"  | otlp spans {rec['traces']['spans']:,} in {rec['requests']['/v1/traces']} requests"
                 f"  receiver {res['receiver_cores']} cores")
    common.log(line)


def sinks_tables(runs: dict[str, list[dict]], modes: list[str], args) -> tuple[str, dict]:
    a = runs["A"]
    cores = lambda x: x["window"]["cpu_cores"]
    main = lambda x: x["window"]["main_oncpu_cores"]
    summary: dict = {"A": {"median_cpu_cores": median(cores(x) for x in a), "median_main_thread_cores": median(main(x) for x in a),
                           "median_us_per_exchange": median(x.get("us_per_exchange") for x in a)}}
    others = [m for m in modes if m != "A"]
    for mode in others:
        b = runs[mode]
        ratios = pair_ratios([cores(x) for x in a], [cores(x) for x in b])
        seen_ratios = pair_ratios([x["server_seen"] for x in a], [x["server_seen"] for x in b])
        summary[mode] = {"median_cpu_cores": median(cores(x) for x in b), "cpu_ratios": ratios,
                         "median_cpu_ratio": median(ratios), "median_main_thread_cores": median(main(x) for x in b),
                         "median_us_per_exchange": median(x.get("us_per_exchange") for x in b),
                         "server_seen_ratios": seen_ratios, "median_server_seen_ratio": median(seen_ratios)}
    heads = ["pair", "A cores (main thread)"]
    for mode in others:
        heads += [f"{mode} cores (main thread)", f"{mode} / A"]
    heads += ["µs CPU per exchange seen, " + " / ".join(modes), "server-side exchanges seen, " + " / ".join(modes),
              "others' CPU, cores " + " / ".join(modes)]
    rows = []
    for i in range(len(a)):
        row = [i + 1, f"{fmt(cores(a[i]), 3)} ({fmt(main(a[i]), 3)})"]
        for mode in others:
            x = runs[mode][i]
            ratio = summary[mode]["cpu_ratios"][i]
            row += [f"{fmt(cores(x), 3)} ({fmt(main(x), 3)})", fmt(ratio, 3) if ratio is not None else "–"]
        row += [" / ".join(fmt(runs[m][i].get("us_per_exchange"), 1) for m in modes),
                " / ".join(fmt(runs[m][i]["server_seen"]) for m in modes),
                " / ".join(f"{runs[m][i]['other_cores']:.2f}" for m in modes)
                + (" (disturbed)" if any(runs[m][i].get("disturbed") for m in modes) else "")]
        rows.append(row)
    row = ["median", f"{fmt(summary['A']['median_cpu_cores'], 3)} ({fmt(summary['A']['median_main_thread_cores'], 3)})"]
    for mode in others:
        row += [f"{fmt(summary[mode]['median_cpu_cores'], 3)} ({fmt(summary[mode]['median_main_thread_cores'], 3)})",
                f"**{fmt(summary[mode]['median_cpu_ratio'], 3)}**"]
    row += [" / ".join(fmt(summary[m]["median_us_per_exchange"], 1) for m in modes),
            " / ".join(fmt(median(x["server_seen"] for x in runs[m])) for m in modes), ""]
    rows.append(row)
    text = (f"Agent CPU at a fixed {args.rate:,.0f} requests/s (nginx, loadgen 10 keep-alive connections, {args.seconds:g} s), "
            + ", ".join(f"{m} = {MODE_NAMES[m]}" for m in modes)
            + ". Cores over the load window, all threads (main thread alone in brackets):\n" + table(heads, rows))
    rows = []
    for mode in modes:
        for i, x in enumerate(runs[mode]):
            rows.append([mode, i + 1, fmt(x["load"]["done"]), fmt(x["load"]["rate"], 0), fmt(x["load"]["p99_us"], 0),
                         f"{fmt(x['server_seen'])} ({fmt(x['server_no_response'])})",
                         f"{fmt(x['client_seen'])} ({fmt(x['client_no_response'])})", fmt(x["agent"].get("lost")),
                         fmt(x["summary"].get("records")), fmt(x["window"]["runq_wait_s"], 2), fmt(x["window"]["rss_mb"], 1),
                         fmt(x["window"]["hwm_mb"], 1), fmt(x["agent"].get("stop_s"), 1)])
    text += ("\n\nPer run:\n"
             + table(["mode", "pair", "requests sent", "achieved req/s", "load p99 µs", "server-side seen (no response)",
                      "client-side seen (no response)", "records lost", "records read", "run-queue wait s (all threads)",
                      "RSS MB", "peak RSS MB", "stop s"], rows))
    rows = []
    for mode in others:
        for i, x in enumerate(runs[mode]):
            row = [mode, i + 1]
            if "scrapes" in x:
                sc = x["scrapes"]
                sizes = sc["bytes"]
                row += [f"{fmt(sc['scrapes'])} ({len(sc['errors'])} failed)",
                        f"{fmt(min(sizes) if sizes else None)}–{fmt(max(sizes) if sizes else None)}",
                        f"{fmt(median(sc['ms']), 1)} / {fmt(max(sc['ms']) if sc['ms'] else None, 1)}",
                        fmt(sum(s["samples"] for s in x["series"].values())),
                        fmt(x["series"].get("deetune_requests_total", {}).get("label_sets")),
                        (f"{fmt(x['prom_requests_total'], 0)} ({fmt(x['prom_requests_no_response'], 0)}) / "
                         f"{fmt(x['server_seen'])} ({fmt(x['server_no_response'])})"),
                        fmt(sum(x["prom_overflow"].values()), 0)]
            else:
                row += ["–"] * 7
            if "otlp_receiver" in x:
                rec, sink = x["otlp_receiver"], x.get("otlp_sink") or {}
                row += [f"{fmt(rec['requests']['/v1/traces'])} / {fmt(rec['requests']['/v1/metrics'])}",
                        fmt(rec["bytes"]["/v1/traces"] + rec["bytes"]["/v1/metrics"]),
                        f"{fmt(rec['traces']['spans'])} / {fmt(x['server_seen'] + x['client_seen'])}",
                        f"{fmt(sink.get('spans_exported'))} / {fmt(sink.get('dropped'))}",
                        fmt(rec["metrics"]["last_data_points"]), fmt(x["receiver_cores"], 3)]
            else:
                row += ["–"] * 6
            rows.append(row)
    text += ("\n\nThe sinks' side (requests_total taken once the agent had drained its backlog; in brackets: status "
             "\"none\", exchanges without a response):\n"
             + table(["mode", "pair", "scrapes during load", "scrape bytes", "scrape ms median / max",
                      "samples in final scrape", "deetune_requests_total label sets",
                      "requests_total / server-side exchanges", "series overflow", "OTLP requests traces / metrics",
                      "OTLP bytes (compressed)", "spans received / exchanges seen", "sink: spans exported / dropped",
                      "metric data points (last export)", "receiver cores"], rows))
    return text, summary


# -- cardinality ----------------------------------------------------------------------------------------
def method_name(n: int) -> str:
    """A distinct HTTP extension method per n: XAAA, XAAB, … (the decoder takes A-Z after detection)."""
    letters = ""
    while True:
        n, digit = divmod(n, 26)
        letters = chr(65 + digit) + letters
        if n == 0 and len(letters) >= 3:
            return "X" + letters


class Client:
    """Keep-alive http.client at a paced rate; a new connection starts with a GET (the HTTP decoder
    detects the protocol on a known method, then takes extension methods)."""

    def __init__(self, port: int, rate: float):
        self.port, self.interval = port, 1.0 / rate if rate > 0 else 0.0
        self.conn: http.client.HTTPConnection | None = None
        self.sent: list[tuple[str, int]] = []  # (method, status) in order
        self.connections = 0

    def _request(self, method: str, path: str) -> int:
        assert self.conn
        self.conn.request(method, path)
        response = self.conn.getresponse()
        response.read()
        if response.will_close:
            self.conn.close()
            self.conn = None
        self.sent.append((method, response.status))
        return response.status

    def send(self, method: str, path: str) -> int:
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.connections += 1
            self._request("GET", "/")
        return self._request(method, path)

    def run(self, requests: list[tuple[str, str]]) -> dict:
        statuses: dict[int, int] = {}
        t0 = time.monotonic()
        for i, (method, path) in enumerate(requests):
            due = t0 + i * self.interval
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            status = self.send(method, path)
            statuses[status] = statuses.get(status, 0) + 1
        wall = time.monotonic() - t0
        return {"requests": len(requests), "seconds": round(wall, 2), "rate": round(len(requests) / wall, 1),
                "statuses": {str(k): v for k, v in statuses.items()}}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def server_exchanges(path: str, port: int) -> list[dict]:
    """Server-side exchanges of the port, in the order the sinks saw them (the jsonl file's order)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if '"request"' not in line:
                continue
            event = json.loads(line)
            if event.get("type") == "request" and event.get("role") == "server" and event.get("lport") == port:
                out.append(event)
    return out


def edge_labels(event: dict) -> tuple[str, str]:
    """(client, server) labels of a server-side exchange, as the sink names them (sinks/prometheus.py edge_names)."""
    if event.get("client_service") is not None and event.get("server_service") is not None:
        return event["client_service"], event["server_service"]
    return event["raddr"], event["comm"]


def expected_caps(exchanges: list[dict], cap: int) -> dict[str, dict]:
    """What the sink must show for the request families, worked out from the exchanges it was given:
    the first cap-1 distinct label sets have a series of their own, every later one goes to ``other``."""
    out = {}
    for family, key in (("deetune_requests_total", lambda e: (e["method"] or "none", "none" if e["status"] is None else str(e["status"]))),
                        ("deetune_request_duration_seconds", lambda e: (e["method"] or "none",))):
        own: set = set()
        folded = 0
        for event in exchanges:
            if family == "deetune_request_duration_seconds" and event.get("latency_ns") is None:
                continue
            labels = (*edge_labels(event), *key(event))
            if labels in own:
                continue
            if len(own) < cap - 1:
                own.add(labels)
            else:
                folded += 1
        out[family] = {"own_series": len(own), "other_series": 1 if folded else 0, "folded": folded,
                       "label_sets": len(own) + (1 if folded else 0)}
    out["deetune_request_errors_total"] = dict(out["deetune_requests_total"])
    out["deetune_request_errors_total"]["folded"] = 0  # errors only count in overflow when the exchange is an error
    return out


def family_rows(families: dict, cap: int, names: list[str]) -> list[list]:
    rows = []
    for name in names:
        f = families.get(name)
        if f is None:
            continue
        overflow = total_of(families, "deetune_series_overflow_total", family=name)
        other = [v for labels, v in f["values"].items() if labels and all(val == "other" for _, val in labels)]
        rows.append([name, fmt(f["label_sets"]), fmt(f["samples"]), "yes" if f["label_sets"] <= cap else "NO",
                     fmt(other[0], 0) if other else "–", fmt(overflow, 0)])
    return rows


EVENT_FAMILIES = ["deetune_requests_total", "deetune_request_errors_total", "deetune_request_duration_seconds",
                  "deetune_connections_opened_total", "deetune_connections_failed_total", "deetune_connections_active",
                  "deetune_tcp_retransmits_total", "deetune_tcp_resets_total", "deetune_bytes_sent_total",
                  "deetune_bytes_received_total", "deetune_service_cpu_seconds_total", "deetune_service_memory_bytes",
                  "deetune_container_cpu_seconds_total", "deetune_container_memory_bytes"]


def cardinality(nginx: Nginx, tmp: str, args, cap: int) -> tuple[str, dict]:
    www = os.path.join(nginx.dir, "www", "item")
    os.makedirs(www, exist_ok=True)
    for n in range(args.urls):
        with open(os.path.join(www, str(n)), "w") as f:
            f.write(f"item {n}\n")
    waited = common.wait_quiet()
    jsonl = os.path.join(tmp, "cardinality.jsonl")
    prom_port = common.free_port()
    spec = f"prometheus:127.0.0.1:{prom_port}" + (f"?max_series={args.max_series}" if args.max_series else "")
    agent = common.Agent(["tcp", "payload"], jsonl, ["--port", str(nginx.port), "--sink", spec])
    out: dict = {"cap": cap, "spec": spec, "waited_s": waited}
    phases = [("urls", [("GET", f"/item/{n}") for n in range(args.urls)]),
              ("methods", [(method_name(n), f"/item/{n}") for n in range(args.urls)])]
    texts = []
    try:
        agent.start()
        scraper = Scraper(f"http://127.0.0.1:{prom_port}/metrics")
        scraper.scrape()
        agent.begin_window()
        other, t0 = common.OtherCpu(), time.monotonic()
        client = Client(nginx.port, args.url_rate)
        try:
            for phase, requests in phases:
                load = client.run(requests)
                families = settled_families(scraper, "deetune_requests_total")
                # the jsonl sink flushes about once a second: wait until it holds what the scrape counted
                deadline = time.monotonic() + 30
                while True:
                    exchanges = server_exchanges(jsonl, nginx.port)
                    if len(exchanges) >= total_of(families, "deetune_requests_total") or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                expected = expected_caps(exchanges, cap)
                out[phase] = {
                    "client": load,
                    "scrape_bytes": len(scraper.last),
                    "scrape_ms": round(scraper.times_ms[-1], 1),
                    "families": {name: {"label_sets": f["label_sets"], "samples": f["samples"]} for name, f in families.items()},
                    "over_cap": sorted(name for name, f in families.items() if f["label_sets"] > cap),
                    "overflow": {dict(k).get("family"): v for k, v in
                                 families.get("deetune_series_overflow_total", {}).get("values", {}).items()},
                    "requests_total": total_of(families, "deetune_requests_total"),
                    "requests_other": total_of(families, "deetune_requests_total", method="other"),
                    "expected": expected,
                }
                checks = []
                for family in ("deetune_requests_total", "deetune_request_errors_total", "deetune_request_duration_seconds"):
                    got_sets = families.get(family, {}).get("label_sets")
                    got_folded = out[phase]["overflow"].get(family)
                    exp = expected[family]
                    checks.append([family, fmt(exp["label_sets"]), fmt(got_sets), fmt(exp["folded"]), fmt(got_folded, 0),
                                   "yes" if got_sets == exp["label_sets"] and got_folded == exp["folded"] else "NO"])
                out[phase]["exact"] = all(row[-1] == "yes" for row in checks)
                texts.append(
                    f"Phase {phase!r}: {load['requests']:,} requests ({', '.join(f'{v:,} × {k}' for k, v in load['statuses'].items())}) "
                    f"at {load['rate']:,.0f}/s from http.client; the final scrape: {len(scraper.last):,} bytes in "
                    f"{scraper.times_ms[-1]:.1f} ms, {sum(f['samples'] for f in families.values()):,} samples; "
                    f"deetune_requests_total sums to {out[phase]['requests_total']:,.0f}.\n"
                    + table(["family", "label sets", "samples", f"≤ cap ({cap:,})", "value of the `other` series",
                             "deetune_series_overflow_total"], family_rows(families, cap, EVENT_FAMILIES))
                    + "\n\nExpected from the server-side exchanges the agent reported (jsonl), against the scrape:\n"
                    + table(["family", "label sets expected", "label sets scraped", "folded expected",
                             "overflow counter scraped", "exact"], checks))
            out["client_connections"] = client.connections
        finally:
            client.close()
        wall = time.monotonic() - t0
        out["window"] = agent.end_window()
        out.update(other.stop(wall))
    finally:
        stopped = agent.stop()
    out["agent"] = {k: v for k, v in stopped.items() if k != "summary"}
    out["summary"] = stopped.get("summary") or {}
    out["server_seen"] = len(server_exchanges(jsonl, nginx.port))
    os.unlink(jsonl)
    sent = sum(len(p[1]) for p in phases) + out.get("client_connections", 0)
    texts.insert(0, f"Cardinality: agent `--probe tcp --probe payload --port NGINX --sink {spec.split(':')[0]}"
                    f"{'?' + spec.split('?')[1] if '?' in spec else ''}` (cap {cap:,} per family); {sent:,} requests sent "
                    f"(incl. {out.get('client_connections', 0)} GET / opening each connection), "
                    f"{out['server_seen']:,} server-side exchanges reported, {out['agent'].get('lost')} records lost, "
                    f"agent {out['window']['cpu_cores']} cores, peak RSS {out['window']['hwm_mb']} MB, "
                    f"others {out['other_cores']} cores.")
    return "\n\n".join(texts), out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="load per run")
    parser.add_argument("--rate", type=float, default=10000.0, help="requests/s of the sink runs")
    parser.add_argument("--urls", type=int, default=10000, help="distinct URLs (and methods) of the cardinality part")
    parser.add_argument("--url-rate", type=float, default=2000.0, help="requests/s of the cardinality client")
    parser.add_argument("--max-series", type=int, default=None, help="prometheus ?max_series=N (default: the sink's)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="agent modes interleaved, A first: A jsonl, B jsonl+prometheus+otlp, C jsonl+prometheus, "
                             "D jsonl+otlp (default A,B)")
    parser.add_argument("--skip", action="append", default=[], choices=["sinks", "cardinality"])
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if modes[0] != "A" or any(m not in MODE_NAMES for m in modes) or len(set(modes)) != len(modes):
        parser.error(f"--modes: A first, then some of B, C, D, got {args.modes!r}")
    common.require_root()
    sys.path.insert(0, common.source_snapshot())
    from deetune.sinks.prometheus import DEFAULT_MAX_SERIES

    cap = args.max_series or DEFAULT_MAX_SERIES
    info = common.machine()
    common.log(f"machine: {info}")
    out: dict = {"benchmark": "sinks", "machine": info, "args": vars(args), "modes": MODE_NAMES,
                 "versions": {"nginx": common.tool_version(["nginx", "-v"])}}
    texts = []
    with tempfile.TemporaryDirectory(prefix="deetune-bench-") as tmp:
        nginx = Nginx(tmp)
        try:
            if "sinks" not in args.skip:
                common.log(f"nginx :{nginx.port}, loadgen {args.rate:,.0f} req/s × {args.seconds:g} s, {args.pairs} pairs of "
                           f"{modes}")

                def run(mode, r):
                    res = sinks_run(mode, r, nginx, tmp, args)
                    log_sinks_run(r, res)
                    return res

                runs, discarded = common.interleave(modes, args.pairs, run)
                text, summary = sinks_tables(runs, modes, args)
                texts.append(text)
                out["sinks"] = {"runs": runs, "summary": summary, "discarded_rounds": discarded}
            if "cardinality" not in args.skip:
                common.log(f"cardinality: {args.urls:,} distinct URLs, then {args.urls:,} distinct methods, cap {cap}")
                text, result = cardinality(nginx, tmp, args, cap)
                texts.append(text)
                out["cardinality"] = result
        finally:
            nginx.stop()
    return common.report("sinks", out, texts)


if __name__ == "__main__":
    main()
