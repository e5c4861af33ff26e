"""The Prometheus sink: exact samples from synthetic events, the one-count rule, the series cap,
host/service/container resources from a fake /proc, the pipeline's stats hook; then a real
pipeline scraped by a real Prometheus, with every expression of the Grafana dashboard evaluated."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deetune.events import ConnectionEvent, ExchangeEvent
from deetune.pipeline import Pipeline
from deetune.sinks.base import SinkError
from deetune.sinks.prometheus import (
    DEFAULT_MAX_SERIES,
    LocalListeners,
    PrometheusSink,
    ResourceCollector,
    container_of,
    parse_spec,
    read_listeners,
    resolver_service_of,
)
from tests.servers import free_port, require_binary, stop_process, wait_for_port

ROOT = pathlib.Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "examples" / "grafana" / "deetune-dashboard.json"


# -- helpers ---------------------------------------------------------------------------------------


def scrape(sink: PrometheusSink) -> dict[tuple[str, frozenset], float]:
    """Every sample of the sink's /metrics, as (sample name, labels) → value."""
    with urllib.request.urlopen(sink.url, timeout=10) as resp:
        body = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def series(samples, name: str) -> dict[frozenset, float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


def labels(**kw) -> frozenset:
    return frozenset(kw.items())


NOW = time.time_ns()


def exchange(role="server", comm="api", laddr="127.0.0.1", lport=8080, raddr="127.0.0.1", rport=40000,
             protocol="http", method="GET", target="/", status=200, error=False, latency_ns=2_000_000, sock_id=0, **kw):
    return ExchangeEvent(ts=NOW, protocol=protocol, pid=10, comm=comm, role=role, laddr=laddr, lport=lport, raddr=raddr,
                         rport=rport, method=method, target=target, status=status, error=error, latency_ns=latency_ns,
                         request_bytes=100, response_bytes=200, sock_id=sock_id, **kw)


def connection(phase, role="server", comm="api", laddr="127.0.0.1", lport=8080, raddr="127.0.0.1", rport=40000,
               sock_id=1, **kw):
    family = 6 if ":" in laddr else 4
    return ConnectionEvent(ts=NOW, phase=phase, role=role, pid=10, comm=comm, laddr=laddr, lport=lport, raddr=raddr,
                           rport=rport, family=family, sock_id=sock_id, **kw)


def local_8080(addr, port, ts=None):
    return (addr, port) == ("127.0.0.1", 8080) or (addr, port) == ("::1", 8080)


@pytest.fixture
def sink():
    s = PrometheusSink("127.0.0.1", 0, is_local_listener=local_8080)
    yield s
    s.close()


# -- spec ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arg, expected", [
    (None, ("127.0.0.1", 9464, DEFAULT_MAX_SERIES)),
    ("", ("127.0.0.1", 9464, DEFAULT_MAX_SERIES)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100, DEFAULT_MAX_SERIES)),
    ("[::1]:9100", ("::1", 9100, DEFAULT_MAX_SERIES)),
    ("127.0.0.1:9100?max_series=50", ("127.0.0.1", 9100, 50)),
    ("9100", ("127.0.0.1", 9100, DEFAULT_MAX_SERIES)),
    ("?max_series=7", ("127.0.0.1", 9464, 7)),
    ("localhost", ("localhost", 9464, DEFAULT_MAX_SERIES)),
])
def test_spec(arg, expected):
    assert parse_spec(arg) == expected


@pytest.mark.parametrize("arg", ["host:port", "::1:9100", "127.0.0.1:70000", "x?foo=1", "?max_series=0", "?max_series=x",
                                 "[::1"])
def test_bad_spec_is_one_line_sink_error(arg):
    with pytest.raises(SinkError) as info:
        PrometheusSink.from_arg(arg)
    assert "\n" not in str(info.value) and str(info.value).startswith("prometheus sink")


def test_port_in_use_is_one_line_sink_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SinkError) as info:
            PrometheusSink.from_arg(f"127.0.0.1:{port}")
    message = str(info.value)
    assert message == f"prometheus sink cannot listen on 127.0.0.1:{port}: Address already in use"


def test_agent_reports_port_in_use_in_one_line():
    """Before any privilege check: the spec is resolved first, so this runs unprivileged too."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "deetune.agent", "--probe", "tcp", "--sink", f"prometheus:127.0.0.1:{port}",
                              "--duration", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr == f"deetune: prometheus sink cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_registered_as_builtin_sink():
    from deetune.plugins import Plugins

    assert Plugins().sinks.get("prometheus") is PrometheusSink


def test_own_registry_and_close_frees_the_port():
    import prometheus_client

    s = PrometheusSink("127.0.0.1", 0)
    port = s.port
    assert s.registry is not prometheus_client.REGISTRY
    assert "deetune_requests_total" not in {m.name for m in prometheus_client.REGISTRY.collect()}
    s.close()
    s.close()  # idempotent
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


# -- requests --------------------------------------------------------------------------------------


def test_exchanges_exact_samples_and_one_count_rule(sink):
    # Both sides of one local exchange: only the server's counts.
    sink.handle(exchange(role="server", comm="api", latency_ns=2_000_000))
    sink.handle(exchange(role="client", comm="curl", laddr="127.0.0.1", lport=40000, raddr="127.0.0.1", rport=8080))
    # IPv6, both sides again, a 503.
    sink.handle(exchange(role="server", comm="api", laddr="::1", raddr="::1", status=503, error=True, latency_ns=40_000_000))
    sink.handle(exchange(role="client", comm="curl", laddr="::1", lport=40000, raddr="::1", rport=8080, status=503, error=True))
    # A client calling a server elsewhere: its side is the only one, it counts.
    for _ in range(3):
        sink.handle(exchange(role="client", comm="api", laddr="127.0.0.1", lport=50000, raddr="10.1.2.3", rport=6379,
                             protocol="redis", method="GET", target="user:1", status="OK", latency_ns=300_000))
    sink.handle(exchange(role="client", comm="api", lport=50000, raddr="10.1.2.3", rport=6379, protocol="redis",
                         method="INCR", target="user:1", status="ERR", error=True, latency_ns=None))
    # Names from the topology aggregator win over the fallback.
    sink.handle(exchange(role="server", comm="python3", client_service="frontend", server_service="catalog", method="POST",
                         status=201))

    got = scrape(sink)
    http = dict(protocol="http", method="GET")
    assert series(got, "deetune_requests_total") == {
        labels(client="127.0.0.1", server="api", status="200", **http): 1,
        labels(client="::1", server="api", status="503", **http): 1,
        labels(protocol="redis", client="api", server="10.1.2.3:6379", method="GET", status="OK"): 3,
        labels(protocol="redis", client="api", server="10.1.2.3:6379", method="INCR", status="ERR"): 1,
        labels(protocol="http", client="frontend", server="catalog", method="POST", status="201"): 1,
    }
    assert series(got, "deetune_request_errors_total") == {
        labels(client="127.0.0.1", server="api", status="200", **http): 0,
        labels(client="::1", server="api", status="503", **http): 1,
        labels(protocol="redis", client="api", server="10.1.2.3:6379", method="GET", status="OK"): 0,
        labels(protocol="redis", client="api", server="10.1.2.3:6379", method="INCR", status="ERR"): 1,
        labels(protocol="http", client="frontend", server="catalog", method="POST", status="201"): 0,
    }
    counts = series(got, "deetune_request_duration_seconds_count")
    assert counts == {
        labels(client="127.0.0.1", server="api", **http): 1,
        labels(client="::1", server="api", **http): 1,
        labels(protocol="redis", client="api", server="10.1.2.3:6379", method="GET"): 3,  # INCR had no latency
        labels(protocol="http", client="frontend", server="catalog", method="POST"): 1,
    }
    assert series(got, "deetune_request_duration_seconds_sum")[labels(client="::1", server="api", **http)] == pytest.approx(0.04)
    buckets = {dict(k)["le"]: v for k, v in series(got, "deetune_request_duration_seconds_bucket").items()
               if dict(k)["client"] == "127.0.0.1"}
    assert (buckets["0.001"], buckets["0.0025"], buckets["+Inf"]) == (0, 1, 1)  # 2 ms
    redis_buckets = {dict(k)["le"]: v for k, v in series(got, "deetune_request_duration_seconds_bucket").items()
                     if dict(k)["protocol"] == "redis"}
    assert (redis_buckets["0.00025"], redis_buckets["0.0005"]) == (0, 3)  # 300 µs


def test_target_is_not_a_label_10000_distinct_urls(sink):
    for i in range(10_000):
        sink.handle(exchange(target=f"/items/{i}?page={i * 7}", status=200 if i % 10 else 500, error=not i % 10))
    got = scrape(sink)
    assert series(got, "deetune_requests_total") == {
        labels(protocol="http", client="127.0.0.1", server="api", method="GET", status="200"): 9_000,
        labels(protocol="http", client="127.0.0.1", server="api", method="GET", status="500"): 1_000,
    }
    assert all("target" not in dict(k) for (_, k) in got)
    assert series(got, "deetune_series_overflow_total")[labels(family="deetune_requests_total")] == 0


def test_series_cap_folds_into_other():
    cap = 100
    s = PrometheusSink(serve=False, max_series=cap, is_local_listener=local_8080)
    # 10,000 distinct clients (and URLs) calling one server: one label set each, far beyond the cap.
    for i in range(10_000):
        raddr = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        s.handle(exchange(raddr=raddr, target=f"/u/{i}", status=503 if i % 2 else 200, error=bool(i % 2)))
        s.handle(connection("open", raddr=raddr, sock_id=i + 1))
        s.handle(connection("close", raddr=raddr, sock_id=i + 1, bytes_sent=10, bytes_received=5, retransmits=0))
    s.handle(connection("failed", role="client", comm="api", raddr="10.9.9.9", rport=1, error="refused"))
    metrics = {m.name: m for m in s.registry.collect()}
    for name in ("deetune_requests", "deetune_request_errors", "deetune_connections_opened", "deetune_connections_active",
                 "deetune_bytes_sent", "deetune_tcp_resets", "deetune_connections_failed"):
        label_sets = {tuple(sorted(x.labels.items())) for x in metrics[name].samples}
        assert len(label_sets) <= cap, name
    durations = {tuple(sorted((k, v) for k, v in x.labels.items() if k != "le")) for x in metrics["deetune_request_duration_seconds"].samples}
    assert len(durations) == cap

    requests = {tuple(x.labels[k] for k in ("client", "status")): x.value for x in metrics["deetune_requests"].samples}
    other = requests.pop(("other", "other"))
    assert len(requests) == cap - 1
    assert sum(requests.values()) + other == 10_000
    assert other == 10_000 - (cap - 1)
    errors = {tuple(x.labels[k] for k in ("client", "status")): x.value for x in metrics["deetune_request_errors"].samples}
    assert sum(errors.values()) == 5_000
    assert set(errors) == set(requests) | {("other", "other")}  # errors follow the requests' series

    opened = {x.labels["client"]: x.value for x in metrics["deetune_connections_opened"].samples}
    assert sum(opened.values()) == 10_000 and opened["other"] == 10_000 - (cap - 1)
    active = {x.labels["client"]: x.value for x in metrics["deetune_connections_active"].samples}
    assert set(active.values()) == {0}
    sent = {x.labels["client"]: x.value for x in metrics["deetune_bytes_received"].samples}
    assert sum(sent.values()) == 10 * 10_000  # the server sent 10 per connection: server → client
    overflow = {x.labels["family"]: x.value for x in metrics["deetune_series_overflow"].samples}
    assert overflow["deetune_requests_total"] == 10_000 - (cap - 1)
    assert overflow["deetune_request_errors_total"] == sum(1 for i in range(cap - 1, 10_000) if i % 2)
    assert overflow["deetune_connections_opened_total"] == 10_000 - (cap - 1)
    assert overflow["deetune_connections_failed_total"] == 1  # the cap was full: the failed edge is folded
    s.close()


def test_cap_of_one_folds_everything():
    s = PrometheusSink(serve=False, max_series=1, is_local_listener=local_8080)
    s.handle(exchange())
    s.handle(exchange(raddr="10.0.0.1"))
    (sample,) = [x for m in s.registry.collect() if m.name == "deetune_requests" for x in m.samples]
    assert set(sample.labels.values()) == {"other"} and sample.value == 2


# -- connections -----------------------------------------------------------------------------------


def test_connections_exact_samples_and_one_count_rule(sink):
    # A local connection, both sides: the server's side counts.
    sink.handle(connection("open", role="server", comm="api", sock_id=1))
    sink.handle(connection("open", role="client", comm="curl", lport=40000, rport=8080, sock_id=2))
    # A connection to a server elsewhere, still open at scrape.
    sink.handle(connection("open", role="client", comm="api", lport=50000, raddr="10.1.2.3", rport=5432, sock_id=3))
    got = scrape(sink)
    assert series(got, "deetune_connections_active") == {
        labels(client="127.0.0.1", server="api"): 1, labels(client="api", server="10.1.2.3:5432"): 1}
    # Every family of a counted edge exists from its first connection, at zero.
    for name in ("deetune_connections_failed_total", "deetune_tcp_retransmits_total", "deetune_tcp_resets_total",
                 "deetune_bytes_sent_total", "deetune_bytes_received_total"):
        assert set(series(got, name).values()) == {0}, name

    sink.handle(connection("close", role="client", comm="curl", lport=40000, rport=8080, sock_id=2,
                           bytes_sent=300, bytes_received=700, retransmits=0, duration_ns=1))
    sink.handle(connection("close", role="server", comm="api", sock_id=1, bytes_sent=700, bytes_received=300,
                           retransmits=2, reset="received", duration_ns=1))
    sink.handle(connection("close", role="client", comm="api", lport=50000, raddr="10.1.2.3", rport=5432, sock_id=3,
                           bytes_sent=1_000, bytes_received=20_000, retransmits=5, duration_ns=1))
    # Opened before the agent: no open seen; one side only counts still.
    sink.handle(connection("close", role="client", comm="curl", lport=41000, rport=8080, sock_id=4, bytes_sent=1,
                           bytes_received=1, retransmits=0, preexisting=True))
    sink.handle(connection("close", role="server", comm="api", rport=41000, sock_id=5, bytes_sent=11, bytes_received=22,
                           retransmits=0, preexisting=True))
    # Failed connects: no server saw them, so always counted, even to a local port.
    sink.handle(connection("failed", role="client", comm="curl", lport=42000, rport=8080, sock_id=6, error="refused"))
    sink.handle(connection("failed", role="client", comm="curl", lport=42001, raddr="::1", laddr="::1", rport=9, sock_id=7,
                           error="refused"))

    got = scrape(sink)
    local, remote, refused6 = (labels(client="127.0.0.1", server="api"), labels(client="api", server="10.1.2.3:5432"),
                               labels(client="curl", server="[::1]:9"))
    refused = labels(client="curl", server="127.0.0.1:8080")
    assert series(got, "deetune_connections_opened_total") == {local: 1, remote: 1, refused: 0, refused6: 0}
    assert series(got, "deetune_connections_active") == {local: 0, remote: 0, refused: 0, refused6: 0}
    assert series(got, "deetune_connections_failed_total") == {local: 0, remote: 0, refused: 1, refused6: 1}
    assert series(got, "deetune_tcp_retransmits_total") == {local: 2, remote: 5, refused: 0, refused6: 0}
    assert series(got, "deetune_tcp_resets_total") == {local: 1, remote: 0, refused: 0, refused6: 0}
    # client → server: what the server received; server → client: what it sent.
    assert series(got, "deetune_bytes_sent_total") == {local: 300 + 22, remote: 1_000, refused: 0, refused6: 0}
    assert series(got, "deetune_bytes_received_total") == {local: 700 + 11, remote: 20_000, refused: 0, refused6: 0}


def test_close_follows_the_decision_taken_at_open():
    """A client connection to a local server stays uncounted at close even if the server is gone by then."""
    listening = {("127.0.0.1", 8080)}
    s = PrometheusSink(serve=False, is_local_listener=lambda a, p, ts=None: (a, p) in listening)
    s.handle(connection("open", role="client", comm="curl", lport=40000, rport=8080, sock_id=9))
    listening.clear()
    s.handle(exchange(role="client", comm="curl", lport=40000, rport=8080, sock_id=9))
    s.handle(connection("close", role="client", comm="curl", lport=40000, rport=8080, sock_id=9, bytes_sent=5,
                        bytes_received=5, retransmits=0))
    samples = [x for m in s.registry.collect() for x in m.samples
               if m.name in ("deetune_connections_opened", "deetune_bytes_sent", "deetune_requests")]
    assert samples == []
    s.close()


# -- local listeners -------------------------------------------------------------------------------


def test_local_listeners_with_real_sockets():
    check = LocalListeners()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert ("127.0.0.1", port) in read_listeners()
        assert check("127.0.0.1", port, time.time_ns())
        assert not check("192.0.2.1", port, time.time_ns())  # TEST-NET: not this host
    with socket.socket(socket.AF_INET6) as wildcard:
        wildcard.bind(("::", 0))
        wildcard.listen()
        wport = wildcard.getsockname()[1]
        assert check("127.0.0.1", wport, time.time_ns())  # dual-stack wildcard
        assert check("::1", wport, time.time_ns())
        assert not check("192.0.2.1", wport, time.time_ns())
    closed = free_port()
    assert not check("127.0.0.1", closed, time.time_ns())


def test_local_listeners_never_trust_a_reading_older_than_the_event():
    reads = []
    now = [1_000]
    table: set = set()

    def reader():
        reads.append(now[0])
        return set(table)

    check = LocalListeners(reader=reader, clock=lambda: now[0])
    assert not check("127.0.0.1", 80, ts_ns=900) and reads == [1_000]
    assert not check("127.0.0.1", 80, ts_ns=950) and reads == [1_000]  # the reading postdates the event
    table.add(("127.0.0.1", 80))  # a server starts …
    now[0] = 2_000
    assert check("127.0.0.1", 80, ts_ns=1_500) and reads == [1_000, 2_000]  # … an event after the reading: read again
    table.clear()
    assert check("127.0.0.1", 80, ts_ns=2_500)  # known listening: no reading needed
    check.note_server("10.0.0.1", 443)
    assert check("10.0.0.1", 443, ts_ns=0)  # a server side seen (e.g. in a container's network namespace)
    now[0] = 9_000
    assert not check("192.0.2.1", 80, ts_ns=8_000) and reads == [1_000, 2_000]  # not this host: nothing to read


# -- resources -------------------------------------------------------------------------------------

ID1 = "a" * 64
ID2 = "0123456789abcdef" * 4
ID3 = "f" * 64
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _proc(root: pathlib.Path, pid: int, comm: str, utime: int, stime: int, rss_pages: int, cgroup: str = "0::/\n",
          flags: int = 0x400100, start: int = 1000) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    fields = ["S", "1", str(pid), str(pid), "0", "-1", str(flags), "0", "0", "0", "0", str(utime), str(stime), "0", "0",
              "20", "0", "1", "0", str(start), "1000000", str(rss_pages)] + ["0"] * 30
    (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields) + "\n")
    (d / "cgroup").write_text(cgroup)


def _host_files(proc: pathlib.Path) -> None:
    proc.mkdir(exist_ok=True)
    (proc / "stat").write_text("cpu  100 5 50 1000 20 1 2 3 0 0\ncpu0 100 5 50 1000 20 1 2 3 0 0\nintr 0\n")
    (proc / "meminfo").write_text("MemTotal:       1000 kB\nMemFree:         200 kB\nMemAvailable:    600 kB\n"
                                  "Buffers:          50 kB\nCached:          250 kB\nSwapTotal:         0 kB\n")


def by_comm(pid: int, comm: str) -> str:
    return comm


def _collect(collector) -> dict[tuple[str, frozenset], float]:
    return {(x.name, frozenset(x.labels.items())): x.value for m in collector.collect() for x in m.samples}


def test_container_patterns():
    assert container_of(f"12:memory:/docker/{ID1}\n11:cpu,cpuacct:/docker/{ID1}\n0::/docker/{ID1}\n") == (
        ID1, {"memory": f"/docker/{ID1}", "cpu": f"/docker/{ID1}", "cpuacct": f"/docker/{ID1}", "": f"/docker/{ID1}"})
    assert container_of(f"0::/system.slice/docker-{ID1}.scope\n")[0] == ID1
    assert container_of(f"0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-{ID2}.scope/init\n") == (
        ID2, {"": f"/kubepods.slice/kubepods-pod1.slice/cri-containerd-{ID2}.scope"})
    assert container_of(f"0::/kubepods/burstable/pod1234/{ID2}\n")[0] == ID2
    assert container_of(f"0::/machine.slice/crio-{ID3}.scope\n")[0] == ID3
    assert container_of(f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID3}.scope/container\n")[0] == ID3
    assert container_of(f"0::/machine.slice/libpod-conmon-{ID3}.scope\n") is None  # podman's monitor, not the container
    assert container_of("0::/user.slice/user-0.slice/session-1.scope\n") is None
    assert container_of("0::/\n") is None


def test_resources_cgroup_v2_and_services(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    _host_files(proc)
    _proc(proc, 1, "systemd", 300, 200, 1000)
    _proc(proc, 2, "kthreadd", 5000, 5000, 0, flags=0x00208040)  # kernel thread: no service
    _proc(proc, 10, "nginx", 100, 100, 500, cgroup=f"0::/system.slice/docker-{ID1}.scope\n")
    _proc(proc, 11, "nginx", 50, 50, 300, cgroup=f"0::/system.slice/docker-{ID1}.scope\n")
    _proc(proc, 20, "web server", 10, 0, 100, cgroup=f"0::/kubepods/pod1/cri-containerd-{ID2}.scope\n")
    (cg / f"system.slice/docker-{ID1}.scope").mkdir(parents=True)
    (cg / "cgroup.controllers").write_text("cpu memory\n")
    (cg / f"system.slice/docker-{ID1}.scope/cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\n")
    (cg / f"system.slice/docker-{ID1}.scope/memory.current").write_text("4096000\n")
    # ID2 has no cgroup files here: its processes' sums stand in.

    got = _collect(ResourceCollector(proc=str(proc), cgroup_root=str(cg), service_of=by_comm))
    assert got[("deetune_processes", frozenset())] == 5
    assert got[("deetune_containers", frozenset())] == 2
    cpu = series(got, "deetune_service_cpu_seconds_total")
    assert cpu == {labels(service="systemd"): pytest.approx(500 / TICKS), labels(service="nginx"): pytest.approx(300 / TICKS),
                   labels(service="web server"): pytest.approx(10 / TICKS)}
    assert series(got, "deetune_service_memory_bytes") == {
        labels(service="systemd"): 1000 * PAGE, labels(service="nginx"): 800 * PAGE, labels(service="web server"): 100 * PAGE}
    assert series(got, "deetune_container_cpu_seconds_total") == {
        labels(container=ID1[:12]): 2.5, labels(container=ID2[:12]): pytest.approx(10 / TICKS)}
    assert series(got, "deetune_container_memory_bytes") == {
        labels(container=ID1[:12]): 4096000, labels(container=ID2[:12]): 100 * PAGE}
    assert series(got, "deetune_host_cpu_seconds_total") == {
        labels(mode=m): pytest.approx(v / TICKS) for m, v in
        {"user": 100, "nice": 5, "system": 50, "idle": 1000, "iowait": 20, "irq": 1, "softirq": 2, "steal": 3}.items()}
    assert series(got, "deetune_host_memory_bytes") == {
        labels(state=s): v * 1024 for s, v in
        {"total": 1000, "free": 200, "available": 600, "used": 400, "buffers": 50, "cached": 250}.items()}


def test_resources_cgroup_v1_and_exited_processes_keep_their_cpu(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cgroup"
    _host_files(proc)
    v1 = f"12:memory:/docker/{ID1}\n4:cpu,cpuacct:/docker/{ID1}\n0::/docker/{ID1}\n"
    _proc(proc, 10, "redis-server", 100, 0, 10, cgroup=v1)
    _proc(proc, 11, "redis-server", 200, 0, 10, cgroup=v1)
    (cg / f"cpu,cpuacct/docker/{ID1}").mkdir(parents=True)
    (cg / f"memory/docker/{ID1}").mkdir(parents=True)
    (cg / f"cpu,cpuacct/docker/{ID1}/cpuacct.usage").write_text("7000000000\n")
    (cg / f"memory/docker/{ID1}/memory.usage_in_bytes").write_text("123456\n")
    collector = ResourceCollector(proc=str(proc), cgroup_root=str(cg), service_of=None)  # None: comm
    got = _collect(collector)
    assert series(got, "deetune_container_cpu_seconds_total") == {labels(container=ID1[:12]): 7.0}
    assert series(got, "deetune_container_memory_bytes") == {labels(container=ID1[:12]): 123456}
    assert series(got, "deetune_service_cpu_seconds_total") == {labels(service="redis-server"): pytest.approx(300 / TICKS)}

    # pid 11 exits, pid 10 uses more: the counter never goes back.
    import shutil

    shutil.rmtree(proc / "11")
    shutil.rmtree(proc / "10")
    _proc(proc, 10, "redis-server", 150, 0, 10, cgroup=v1)
    got = _collect(collector)
    assert series(got, "deetune_service_cpu_seconds_total") == {labels(service="redis-server"): pytest.approx(350 / TICKS)}
    assert series(got, "deetune_service_memory_bytes") == {labels(service="redis-server"): 10 * PAGE}
    # pid reused by another program: a new process, the old one's CPU stays counted.
    shutil.rmtree(proc / "10")
    _proc(proc, 10, "redis-server", 1, 0, 10, cgroup=v1, start=5000)
    got = _collect(collector)
    assert series(got, "deetune_service_cpu_seconds_total") == {labels(service="redis-server"): pytest.approx(351 / TICKS)}


def test_resources_service_names_from_a_resolver_and_capped(tmp_path):
    proc = tmp_path / "proc"
    _host_files(proc)
    for pid, comm in ((10, "a"), (11, "b"), (12, "c"), (13, "c")):
        _proc(proc, pid, comm, 100, 0, 1)
    collector = ResourceCollector(proc=str(proc), cgroup_root=str(tmp_path / "none"), max_series=3,
                                  service_of=lambda pid, comm: f"svc-{comm}")
    got = _collect(collector)
    cpu = series(got, "deetune_service_cpu_seconds_total")
    assert len(cpu) == 3 and cpu[labels(service="other")] == pytest.approx(200 / TICKS)
    assert sum(cpu.values()) == pytest.approx(400 / TICKS)
    assert {dict(k)["service"] for k in cpu} <= {"svc-a", "svc-b", "svc-c", "other"}


def test_resources_a_failing_resolver_falls_back_to_comm(tmp_path):
    proc = tmp_path / "proc"
    _host_files(proc)
    _proc(proc, 10, "worker", 100, 0, 1)

    def broken(pid, comm):
        raise RuntimeError("resolver down")

    got = _collect(ResourceCollector(proc=str(proc), cgroup_root=str(tmp_path), service_of=broken))
    assert series(got, "deetune_service_cpu_seconds_total") == {labels(service="worker"): pytest.approx(100 / TICKS)}


def test_resources_of_this_host_are_plausible(sink):
    got = scrape(sink)
    assert got[("deetune_processes", frozenset())] >= 1
    assert got[("deetune_containers", frozenset())] >= 0
    mem = series(got, "deetune_host_memory_bytes")
    assert mem[labels(state="total")] > mem[labels(state="available")] > 0
    assert series(got, "deetune_host_cpu_seconds_total")[labels(mode="idle")] > 0
    # Named like the topology names it (the service resolver), not just by comm.
    me = resolver_service_of()(os.getpid(), pathlib.Path("/proc/self/comm").read_text().strip())
    assert series(got, "deetune_service_memory_bytes")[labels(service=me)] > 0
    assert got[("deetune_agent_cpu_seconds_total", frozenset())] > 0
    assert got[("deetune_agent_memory_bytes", frozenset())] > 10_000_000


# -- the pipeline's stats hook ---------------------------------------------------------------------


class _FakeProbe:
    """Enough of a probe for the pipeline's loop: no rings, counters that grow."""

    name = "fake"

    def __init__(self):
        self.reads = 0

    def start(self):
        pass

    def ring_buffers(self):
        return []

    def counters(self):
        self.reads += 1
        return {"emitted": 10 * self.reads, "lost": self.reads - 1}

    def stop(self):
        pass


def test_pipeline_hands_stats_to_observing_sinks():
    seen = []

    class Observer:
        name = "observer"

        def handle(self, event):
            pass

        def observe_stats(self, stats):
            seen.append((stats.probes["fake"].emitted, stats.probes["fake"].lost))

        def close(self):
            seen.append("closed")

    class Plain:
        name = "plain"
        closed = False

        def handle(self, event):
            pass

        def close(self):
            self.closed = True

    probe, plain = _FakeProbe(), Plain()
    stats = Pipeline([probe], [Observer(), plain], poll_interval=0.01, stats_interval=0.05).run(duration=0.32)
    assert plain.closed
    assert seen[-1] == "closed"
    periodic, final = seen[:-2], seen[-2]
    assert 3 <= len(periodic) <= 7
    assert periodic == [(10 * n, n - 1) for n in range(1, len(periodic) + 1)]  # read afresh each time
    assert final == (stats.probes["fake"].emitted, stats.probes["fake"].lost) == (10 * probe.reads, probe.reads - 1)


def test_pipeline_without_observers_reads_counters_only_at_stop():
    probe = _FakeProbe()

    class Plain:
        name = "plain"

        def handle(self, event):
            pass

        def close(self):
            pass

    Pipeline([probe], [Plain()], poll_interval=0.01, stats_interval=0.02).run(duration=0.2)
    assert probe.reads == 1


def test_observe_stats_becomes_kernel_event_families(sink):
    from deetune.pipeline import ProbeStats, RunStats

    sink.observe_stats(RunStats(probes={"tcp": ProbeStats("tcp", records=5, emitted=7, lost=2),
                                        "payload": ProbeStats("payload", emitted=100, sampled_out=40)}))
    got = scrape(sink)
    assert series(got, "deetune_kernel_events_total") == {labels(probe="tcp"): 7, labels(probe="payload"): 100}
    assert series(got, "deetune_kernel_events_lost_total") == {labels(probe="tcp"): 2, labels(probe="payload"): 0}
    assert series(got, "deetune_kernel_calls_sampled_out_total") == {labels(probe="tcp"): 0, labels(probe="payload"): 40}


# -- against the kernel and a real Prometheus ------------------------------------------------------


class PrometheusServer:
    """Prometheus from the Debian package, on a free loopback port, with its own config and storage."""

    def __init__(self, directory: pathlib.Path, target: str):
        binary = require_binary("prometheus", "prometheus")
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: deetune\n    static_configs:\n      - targets: ['{target}']\n"
        )
        for attempt in range(3):
            self.port = free_port()
            log = directory / "prometheus.log"
            with open(log, "ab") as out:
                self.proc = subprocess.Popen(
                    [binary, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                wait_for_port(self.port, self.proc, log=log)
                break
            except RuntimeError:
                stop_process(self.proc)
                if attempt == 2:
                    raise
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("prometheus did not become ready")
            time.sleep(0.1)

    def api(self, path: str, **params) -> object:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, expr: str, expected: float, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (got := self.value(expr)) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} = {got}, expected {expected} within {timeout}s")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.proc)


HTTPD = r"""
import http.server, sys
with open("/proc/self/comm", "w") as f:  # before any thread: they inherit it
    f.write("deetune-httpd")

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        status = int(self.path.split("/")[2]) if self.path.startswith("/status/") else 200
        body = b"%d %s\n" % (status, self.path.encode())
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
print("ready", flush=True)
server.serve_forever()
"""


class HttpClient:
    """Raw HTTP/1.1 over one keep-alive connection, counting the bytes each way."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sent = self.received = 0

    def get(self, path: str) -> int:
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        self.sock.sendall(request)
        self.sent += len(request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            assert chunk, "server closed"
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        while len(body) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "server closed"
            body += chunk
            buf += chunk
        assert len(body) == length
        self.received += len(buf)
        return int(head.split()[1])

    def close(self, reset: bool = False) -> None:
        if reset:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class RedisClient:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")

    def command(self, *args: str) -> bytes:
        parts = [a.encode() for a in args]
        self.sock.sendall(b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts))
        line = self.file.readline()
        if line.startswith(b"$") and int(line[1:]) >= 0:
            line += self.file.read(int(line[1:]) + 2)
        return line

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def dashboard_expressions() -> tuple[list[str], list[str]]:
    """(every target expression, every template-variable query) of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dash.get("panels", []))
    variables = [v["query"]["query"] if isinstance(v.get("query"), dict) else v["query"]
                 for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs, variables


#: Concrete values for the dashboard's variables (the "All" choice) and Grafana's interval.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "$instance": ".*", "$client": ".*",
                 "$server": ".*", "$service": ".*"}


def concrete(expr: str) -> str:
    for name in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(name, SUBSTITUTIONS[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def test_dashboard_is_valid_and_uses_only_our_families():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and dash["panels"]
    exprs, variables = dashboard_expressions()
    assert len(exprs) >= 20 and variables
    used = set()
    for expr in exprs:
        used |= set(re.findall(r"\b(deetune_[a-z_]+)", expr))
    families = {"deetune_requests_total", "deetune_request_errors_total", "deetune_request_duration_seconds_bucket",
                "deetune_request_duration_seconds_sum", "deetune_request_duration_seconds_count",
                "deetune_connections_opened_total", "deetune_connections_active", "deetune_connections_failed_total",
                "deetune_tcp_retransmits_total", "deetune_tcp_resets_total", "deetune_bytes_sent_total",
                "deetune_bytes_received_total", "deetune_host_cpu_seconds_total", "deetune_host_memory_bytes",
                "deetune_service_cpu_seconds_total", "deetune_service_memory_bytes", "deetune_processes",
                "deetune_containers", "deetune_agent_cpu_seconds_total", "deetune_agent_memory_bytes",
                "deetune_kernel_events_total", "deetune_kernel_events_lost_total", "deetune_kernel_calls_sampled_out_total",
                "deetune_series_overflow_total"}
    assert used <= families, used - families
    assert {"deetune_requests_total", "deetune_request_errors_total", "deetune_request_duration_seconds_bucket",
            "deetune_connections_opened_total", "deetune_connections_active", "deetune_connections_failed_total",
            "deetune_tcp_retransmits_total", "deetune_tcp_resets_total", "deetune_host_cpu_seconds_total",
            "deetune_host_memory_bytes", "deetune_service_cpu_seconds_total", "deetune_service_memory_bytes"} <= used
    assert any("histogram_quantile(0.5," in e for e in exprs) and any("histogram_quantile(0.99," in e for e in exprs)


@pytest.mark.bpf
def test_real_pipeline_scraped_by_prometheus(tmp_path):
    from deetune.decoders.http import HttpDecoder
    from deetune.decoders.redis import RedisDecoder
    from deetune.l7 import L7Handler
    from deetune.probes import ProbeOptions
    from deetune.probes.payload import PayloadProbe
    from deetune.probes.tcp import TcpProbe
    from tests.harness import running_pipeline
    from tests.servers import Redis

    redis = Redis.start(tmp_path / "redis")
    me = pathlib.Path("/proc/self/comm").read_text().strip()
    http_port = free_port()
    sink = PrometheusSink("127.0.0.1", 0, kernel_counts=True)  # counts from the kernel, as the agent's
    prom = httpd = None
    try:
        prom = PrometheusServer(tmp_path / "prometheus", f"127.0.0.1:{sink.port}")
        prom.wait_value('sum(up{job="deetune"})', 1)
        probes = [TcpProbe(ProbeOptions(port=http_port)),
                  PayloadProbe(ProbeOptions(port=http_port), ports=[redis.port], exclude_self=False)]
        handler = L7Handler([HttpDecoder, RedisDecoder])
        with running_pipeline(probes, handlers=[handler], sinks=[sink]) as collector:
            # Nothing listens yet: one refused connect.
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", http_port)).close()
            httpd = subprocess.Popen([sys.executable, "-c", HTTPD, str(http_port)], stdout=subprocess.PIPE, text=True)
            assert httpd.stdout.readline().strip() == "ready"
            sent = received = 0
            statuses = {200: 0, 404: 0, 503: 0}
            redis_total = redis_errors = 0

            def http_connection(mix: dict[int, int], reset: bool = False) -> None:
                nonlocal sent, received
                client = HttpClient(http_port)
                for status, count in mix.items():
                    for i in range(count):
                        assert client.get(f"/status/{status}/{i}?n={time.monotonic_ns()}") == status
                        statuses[status] += 1
                client.close(reset=reset)
                sent, received = sent + client.sent, received + client.received

            def redis_commands(commands: list[tuple[str, ...]]) -> None:
                nonlocal redis_total, redis_errors
                client = RedisClient(redis.port)
                for command in commands:
                    reply = client.command(*command)
                    redis_total += 1
                    redis_errors += reply.startswith(b"-")
                client.close()

            def settled(connections: int) -> None:
                """Prometheus has every exchange and every server-side close of the traffic so far (the
                kernel counts them all, whatever the overload sampling leaves out of the detail)."""
                total = sum(statuses.values())
                prom.wait_value('sum(deetune_requests_total{protocol="http"})', total)
                prom.wait_value('sum(deetune_requests_total{protocol="redis"})', redis_total)
                prom.wait_value('sum(deetune_connections_opened_total{server="deetune-httpd"})', connections)
                prom.wait_value('sum(deetune_connections_active{server="deetune-httpd"})', 0)

            # Phase 1 creates the series; phase 2, scraped after, makes every rate() move.
            http_connection({200: 3, 404: 1, 503: 1})
            redis_commands([("SET", "k1", "v1"), ("GET", "k1"), ("SET", "s", "text"), ("INCR", "s")])
            settled(1)
            time.sleep(2.5)  # a few scrapes of phase 1 alone
            http_connection({200: 4, 404: 2, 503: 2})
            http_connection({200: 4, 404: 2, 503: 2})
            http_connection({200: 1}, reset=True)
            redis_commands([("SET", "k2", "v2"), ("GET", "k2"), ("GET", "k1"), ("INCR", "s"), ("INCR", "n")])
            settled(4)
            prom.wait_value('count(count_over_time(deetune_requests_total{protocol="http"}[1m]) >= 3)', 3)

            assert statuses == {200: 12, 404: 5, 503: 5} and (redis_total, redis_errors) == (9, 2)
            q = prom.value
            assert q('sum(deetune_requests_total{protocol="http"})') == 22
            assert q('sum(deetune_request_errors_total{protocol="http"})') == 5
            by_status = {r["metric"]["status"]: float(r["value"][1]) for r in
                         prom.query('sum by (status) (deetune_requests_total{protocol="http"})')}
            assert by_status == {"200": 12, "404": 5, "503": 5}
            edges = {(r["metric"]["client"], r["metric"]["server"], r["metric"]["method"]) for r in
                     prom.query('deetune_requests_total{protocol="http"}')}
            assert edges == {("127.0.0.1", "deetune-httpd", "GET")}  # the server side only, once
            assert q('sum(deetune_request_duration_seconds_count{protocol="http"})') == 22
            assert q('sum(deetune_requests_total{protocol="redis", server="redis-server", client="127.0.0.1"})') == 9
            assert q('sum(deetune_request_errors_total{protocol="redis"})') == 2
            assert q('sum(deetune_request_errors_total{protocol="redis", method="INCR", status="ERR"})') == 2
            # Connections: the three keep-alive ones and the reset one, each once, all closed now.
            assert q('sum(deetune_connections_opened_total)') == 4
            assert q('sum(deetune_connections_opened_total{client="127.0.0.1", server="deetune-httpd"})') == 4
            assert q('sum(deetune_connections_active{server="deetune-httpd"})') == 0
            assert q('sum(deetune_tcp_resets_total{server="deetune-httpd"})') == 1
            assert q('sum(deetune_tcp_retransmits_total{server="deetune-httpd"})') == 0
            assert q(f'sum(deetune_connections_failed_total{{client="{me}", server="127.0.0.1:{http_port}"}})') == 1
            assert q('sum(deetune_connections_failed_total)') == 1
            assert q('sum(deetune_bytes_sent_total{server="deetune-httpd"})') == sent
            assert q('sum(deetune_bytes_received_total{server="deetune-httpd"})') == received
            # The pipeline's stats hook: kernel records of both probes, none lost.
            # opens and closes of both sides; every call on both sides (copied, or left out by the sampling)
            assert (q('deetune_kernel_events_total{probe="tcp"}')
                    + q('deetune_kernel_calls_sampled_out_total{probe="tcp"}')) >= 16
            assert (q('deetune_kernel_events_total{probe="payload"}')
                    + q('deetune_kernel_calls_sampled_out_total{probe="payload"}')) >= 2 * (22 + 9)
            assert q('sum(deetune_kernel_events_lost_total)') == 0
            assert q('deetune_processes') > 3
            assert q('deetune_containers') is not None
            assert q('sum(deetune_series_overflow_total)') == 0

            # Every expression of the dashboard, as Grafana would send it with "All" selected.
            exprs, variables = dashboard_expressions()
            for expr in exprs:
                result = prom.query(concrete(expr))
                assert result, f"empty result for dashboard expression: {expr}"
                values = [float(r["value"][1]) for r in result]
                assert any(math.isfinite(v) for v in values), f"no finite value for {expr}: {result}"
            for variable in variables:
                match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable)
                assert match, f"unexpected variable query {variable}"
                values = prom.api(f"label/{match.group(2)}/values", **{"match[]": match.group(1)})
                assert values, f"no values for dashboard variable {variable}"
            # The RED panels show this edge's numbers.
            ratio = next(e for e in exprs if "deetune_request_errors_total" in e)
            red = {r["metric"]["server"]: float(r["value"][1]) for r in prom.query(concrete(ratio))}
            assert 0 < red["deetune-httpd"] < 1
            p99_expr = next(e for e in exprs if e.startswith("histogram_quantile(0.99,"))
            p99 = {r["metric"]["server"]: float(r["value"][1]) for r in prom.query(concrete(p99_expr))}
            assert 0 < p99["deetune-httpd"] < 5
    finally:
        if httpd is not None:
            stop_process(httpd)
        if prom is not None:
            prom.stop()
        sink.close()
        redis.stop()


@pytest.mark.bpf
def test_agent_serves_metrics():
    """``python -m deetune.agent --sink prometheus:HOST:PORT`` end to end, scraped directly."""
    from tests.test_agent import AgentProcess

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        metrics_port = free_port()
        agent = AgentProcess("--probe", "tcp", "--port", str(port), "--sink", f"prometheus:127.0.0.1:{metrics_port}",
                             "--host-name", "web-7", "--label", "idc=lab1")
        place = {"host": "web-7", "idc": "lab1"}  # on every series the agent exports
        try:
            for _ in range(3):
                client = socket.create_connection(("127.0.0.1", port))
                server, _ = listener.accept()
                client.sendall(b"x" * 100)
                assert server.recv(1000) == b"x" * 100
                client.close()
                server.close()
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            deadline = time.monotonic() + 20
            while True:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    got = {(s.name, frozenset(s.labels.items())): s.value
                           for f in text_string_to_metric_families(resp.read().decode()) for s in f.samples}
                opened = sum(series(got, "deetune_connections_opened_total").values())
                sent = sum(series(got, "deetune_bytes_sent_total").values())
                kernel = series(got, "deetune_kernel_events_total").get(labels(probe="tcp", **place), 0)
                if (opened, sent) == (3, 300) and kernel >= 12 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert (opened, sent) == (3, 300)
            # The agent's topology aggregator names both ends: this process, on both sides.
            from deetune.services import ServiceResolver

            me = ServiceResolver().instance(os.getpid()).service
            assert series(got, "deetune_connections_opened_total") == {labels(client=me, server=me, **place): 3}
            assert kernel == 12  # 3 connections × 2 sides × open and close
            assert series(got, "deetune_kernel_events_lost_total") == {labels(probe="tcp", **place): 0}
            assert all(dict(key[1]).items() >= place.items() for key in got), "a series without the place labels"
        finally:
            rc, _, err = agent.finish(signal.SIGTERM)
        assert rc == 0, err
