"""Prometheus sink: events become metrics, served over HTTP for Prometheus to scrape.

``--sink prometheus`` listens on 127.0.0.1:9464; ``--sink prometheus:HOST:PORT``
elsewhere (``[::1]:PORT`` for IPv6, port 0 for any free port), and
``?max_series=N`` caps the label sets of every family (default 2000).  The
families, the one-count rule and the cap are described in docs/metrics.md.

Everything is kept in plain dictionaries updated on the pipeline's thread and
turned into metric families by custom collectors at scrape time, in a
:class:`prometheus_client.CollectorRegistry` of the sink's own (never the
process-global one).  Host, service and container resources are read from
/proc and the cgroup files at scrape time, not on the event path.
"""

from __future__ import annotations

import bisect
import collections
import ipaddress
import logging
import os
import re
import socket
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from deetune import procnet
from deetune.accounting import EXCHANGE_OUTCOMES, KERNEL_COUNTED, OUTCOME_ERROR
from deetune.events import ConnectionCounts, ConnectionEvent, CountedEvent, Event, ExchangeEvent, LatencyCounts, RequestCounts
from deetune.sinks.base import Sink, SinkError
from deetune.sinks.prometheus_fleet import FleetCollector, PlaceRegistry, RemoteEndpoints
from deetune.topology.model import _COARSE_OF_FINE, LATENCY_BUCKETS_NS

log = logging.getLogger("deetune.sinks.prometheus")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
DEFAULT_MAX_SERIES = 2000
#: Every label of the series that label sets beyond the cap are folded into.
OTHER = "other"
#: Upper bounds of the latency histogram (seconds): the topology model's buckets.
LATENCY_BUCKETS_S: tuple[float, ...] = tuple(ns / 1e9 for ns in LATENCY_BUCKETS_NS)
#: Connections remembered between their open and their close (least recent dropped beyond).
MAX_TRACKED_CONNECTIONS = 65536

REQUEST_LABELS = ("protocol", "client", "server", "method", "status")
DURATION_LABELS = ("protocol", "client", "server", "method")
EDGE_LABELS = ("client", "server")
DECODED_LABELS = ("protocol", "client", "server")
ANOMALY_LABELS = ("protocol", "client", "server", "kind")


# -- spec ------------------------------------------------------------------------------------------


def parse_spec(arg: str | None) -> tuple[str, int, int]:
    """``"HOST:PORT?max_series=N"`` → ``(host, port, max_series)``; every part optional."""
    arg = (arg or "").strip()
    address, _, query = arg.partition("?")
    max_series = DEFAULT_MAX_SERIES
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if key != "max_series" or not sep:
            raise SinkError(f"prometheus sink: unknown option {item!r} (known: max_series=N)")
        if not value.isdigit() or int(value) < 1:
            raise SinkError(f"prometheus sink: max_series must be a positive integer, got {value!r}")
        max_series = int(value)
    host, port_text = DEFAULT_HOST, ""
    if address.startswith("["):  # [v6]:port
        end = address.find("]")
        if end < 0:
            raise SinkError(f"prometheus sink: bad address {address!r}: missing ']'")
        host, rest = address[1:end], address[end + 1:]
        if rest and not rest.startswith(":"):
            raise SinkError(f"prometheus sink: bad address {address!r}: expected [HOST]:PORT")
        port_text = rest[1:]
    elif address.count(":") == 1:
        host, port_text = address.split(":")
        host = host or DEFAULT_HOST
    elif address.count(":") > 1:
        raise SinkError(f"prometheus sink: bad address {address!r}: write IPv6 hosts as [HOST]:PORT")
    elif address.isdigit():
        port_text = address
    elif address:
        host = address
    port = DEFAULT_PORT
    if port_text:
        if not port_text.isdigit() or int(port_text) > 65535:
            raise SinkError(f"prometheus sink: not a TCP port: {port_text!r}")
        port = int(port_text)
    return host, port, max_series


# -- local listeners: the one-count rule -----------------------------------------------------------

def read_listeners() -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of this network namespace (sock_diag:
    the kernel walks only its listening table, however many connections the host has)."""
    return {(s.laddr, s.lport) for s in procnet.read_listening_sockets()}


_WILDCARDS = ("0.0.0.0", "::")


class LocalListeners:
    """Whether ``addr:port`` is a server listening on this host.

    A wrong "no" counts an exchange twice, so the answer never rests on a reading
    older than the event asked about: when a local endpoint is not known as
    listening and the last reading predates the event's timestamp, the listeners
    are read again (one sock_diag dump of the listening table, under a millisecond however
    many connections the host has; at most about once per batch of events).
    Addresses that are not this host's never cause a reading.  Server sides seen
    by the probes are remembered as listeners too, so a server that has already
    gone still counts as local for its last events, and a server in another
    network namespace (a container) is recognised once its side was seen.
    """

    def __init__(self, reader: Callable[[], set[tuple[str, int]]] = read_listeners,
                 clock: Callable[[], int] = time.time_ns):
        self._reader = reader
        self._clock = clock
        self._read: set[tuple[str, int]] = set()
        self._read_at = -1
        self._seen: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self._local_addrs: dict[str, bool] = {}
        self._local_addrs_at = 0.0

    def note_server(self, addr: str, port: int) -> None:
        """A server-side socket of this host was seen on ``addr:port``."""
        key = (addr, port)
        self._seen[key] = None
        self._seen.move_to_end(key)
        if len(self._seen) > 4096:
            self._seen.popitem(last=False)

    def __call__(self, addr: str, port: int, ts_ns: int | None = None) -> bool:
        if self._match(addr, port):
            return True
        if not self.is_local_address(addr):
            return False  # no reading can make another host's address listen here
        if ts_ns is not None and self._read_at >= ts_ns:
            return False  # the last reading already postdates the event
        self._read_at = self._clock()
        try:
            self._read = self._reader()
        except OSError as exc:
            log.debug("cannot read listening sockets: %s", exc)
        return self._match(addr, port)

    def _match(self, addr: str, port: int) -> bool:
        key = (addr, port)
        if key in self._read or key in self._seen:
            return True
        v6 = ":" in addr
        wild = ("::",) if v6 else _WILDCARDS  # a dual-stack "::" listener takes IPv4 too
        return any((w, port) in self._read for w in wild) and self.is_local_address(addr)

    def is_local_address(self, addr: str) -> bool:
        """Whether ``addr`` is one of this host's addresses (binding to it succeeds); cached for a minute."""
        now = time.monotonic()
        if now - self._local_addrs_at > 60 or len(self._local_addrs) > 4096:
            self._local_addrs.clear()
            self._local_addrs_at = now
        known = self._local_addrs.get(addr)
        if known is None:
            try:
                known = ipaddress.ip_address(addr).is_loopback
            except ValueError:
                known = False
            if not known:
                try:
                    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM) as probe:
                        probe.bind((addr, 0))
                    known = True
                except OSError:
                    known = False
            self._local_addrs[addr] = known
        return known


# -- capped families -------------------------------------------------------------------------------


class _Family:
    """One metric family's series, at most ``cap`` label sets of them (the ``other`` one included)."""

    __slots__ = ("name", "doc", "kind", "labelnames", "cap", "series", "other", "overflow")

    def __init__(self, name: str, doc: str, kind: str, labelnames: tuple[str, ...], cap: int):
        self.name = name
        self.doc = doc
        self.kind = kind  # counter, gauge, histogram
        self.labelnames = labelnames
        self.cap = cap
        #: label values → value (counter, gauge) or [bucket counts…, +Inf count, sum] (histogram).
        self.series: dict[tuple[str, ...], Any] = {}
        self.other = (OTHER,) * len(labelnames)
        #: Observations folded into ``other``.
        self.overflow = 0

    def _zero(self) -> Any:
        return [0] * (len(LATENCY_BUCKETS_S) + 1) + [0.0] if self.kind == "histogram" else 0

    def has_room(self) -> bool:
        """Whether one more label set of its own fits (``cap - 1`` of them: one series is kept for ``other``)."""
        return len(self.series) - (self.other in self.series) < self.cap - 1

    def slot(self, labels: tuple[str, ...]) -> tuple[str, ...]:
        """The series ``labels`` go to (created at zero): their own while the cap allows, else ``other``."""
        if labels in self.series:
            return labels
        if self.has_room():
            self.series[labels] = self._zero()
            return labels
        self.overflow += 1
        if self.other not in self.series:
            self.series[self.other] = self._zero()
        return self.other

    def add(self, key: tuple[str, ...], value: float) -> None:
        self.series[key] = self.series.get(key, 0) + value

    def observe_buckets(self, key: tuple[str, ...], fine: dict[int, int], seconds: float) -> None:
        """Add the kernel's fine histogram counts (deetune.accounting buckets) and their sum."""
        state = self.series.get(key)
        if state is None:
            state = self.series[key] = self._zero()
        last = len(LATENCY_BUCKETS_S)
        for bucket, count in fine.items():
            state[_COARSE_OF_FINE[bucket] if bucket < len(_COARSE_OF_FINE) else last] += count
        state[-1] += seconds

    def observe(self, key: tuple[str, ...], seconds: float) -> None:
        state = self.series.get(key)
        if state is None:
            state = self.series[key] = self._zero()
        state[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1  # the first bound >= seconds, else +Inf
        state[-1] += seconds

    def snapshot(self) -> dict[tuple[str, ...], Any]:
        """A copy of the series (taken under the sink's lock; :meth:`metric` works on it outside)."""
        if self.kind == "histogram":
            return {labels: list(state) for labels, state in self.series.items()}
        return dict(self.series)

    def metric(self, series: dict[tuple[str, ...], Any]) -> Metric:
        """The family from a :meth:`snapshot`."""
        if self.kind == "histogram":
            family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
            for labels, state in series.items():
                buckets, running = [], 0
                for bound, count in zip(LATENCY_BUCKETS_S, state):
                    running += count
                    buckets.append((repr(bound), running))
                buckets.append(("+Inf", running + state[len(LATENCY_BUCKETS_S)]))
                family.add_metric(list(labels), buckets, state[-1])
            return family
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        family = cls(self.name, self.doc, labels=self.labelnames)
        for labels, value in series.items():
            family.add_metric(list(labels), value)
        return family


def counted_edge_names(event: CountedEvent, comm_of: Callable[[int], str]) -> tuple[str, str]:
    """(client, server) of the kernel's counts: the topology aggregator's names when it set them,
    else as :func:`edge_names` does (our side's comm, the other's address)."""
    if event.client_service is not None and event.server_service is not None:
        return event.client_service, event.server_service
    here = comm_of(event.pid)
    if event.role == "server":
        return event.raddr, here
    return here, f"[{event.raddr}]:{event.port}" if ":" in event.raddr else f"{event.raddr}:{event.port}"


def edge_names(event: ConnectionEvent | ExchangeEvent) -> tuple[str, str]:
    """(client, server) of an event: the topology aggregator's service names when it set
    them, else from what the event itself knows (comm on our side, the address on the other)."""
    if event.client_service is not None and event.server_service is not None:
        return event.client_service, event.server_service
    if event.role == "server":
        return event.raddr, event.comm
    return event.comm, f"[{event.raddr}]:{event.rport}" if ":" in event.raddr else f"{event.raddr}:{event.rport}"


# -- host, services, containers: read at scrape time -----------------------------------------------

_PF_KTHREAD = 0x00200000
_CONTAINER_SEGMENT = re.compile(r"^(?:docker-|cri-containerd-|crio-|libpod-)?([0-9a-f]{64})(?:\.scope)?$")
_CPU_MODES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
_MEMINFO = {"MemTotal": "total", "MemFree": "free", "MemAvailable": "available", "Buffers": "buffers", "Cached": "cached"}


def container_of(cgroup_text: str) -> tuple[str, dict[str, str]] | None:
    """``(container id, {controller: cgroup path of the container})`` from a /proc/PID/cgroup,
    or None when the process is in no container (docker, containerd, CRI-O, podman patterns)."""
    found: str | None = None
    paths: dict[str, str] = {}
    for line in cgroup_text.splitlines():
        _hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        segments = path.split("/")
        for index, segment in enumerate(segments):
            match = _CONTAINER_SEGMENT.match(segment)
            if match:
                found = found or match.group(1)
                if match.group(1) == found:
                    prefix = "/".join(segments[: index + 1])
                    for controller in controllers.split(",") if controllers else [""]:
                        paths[controller] = prefix
                break
    return (found, paths) if found else None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


#: ``service_of`` default: :class:`deetune.services.ServiceResolver`, made at the first scrape.
DEFAULT_RESOLVER: Any = object()


def resolver_service_of(proc: str = "/proc") -> Callable[[int, str], str] | None:
    """``f(pid, comm)`` naming a process's service the way the topology does
    (:class:`deetune.services.ServiceResolver`), or None when it is unavailable."""
    try:
        from deetune.services import ServiceResolver

        resolver = ServiceResolver(proc=proc)
    except Exception as exc:  # an optional refinement: comm names are the fallback
        log.info("no service resolver (%s): services are named by comm", exc)
        return None

    def service_of(pid: int, comm: str) -> str:
        resolver.forget(pid)  # asked once per new process: never a previous owner's name for a reused pid
        return resolver.instance(pid, comm).service

    return service_of


class ResourceCollector:
    """Processes, containers, host/service/container CPU and memory, read at scrape time.

    Per process it reads /proc/PID/stat (CPU time, and the resident set in pages: the
    VmRSS of /proc/PID/status, without parsing it) and, once per process, /proc/PID/cgroup.
    Service CPU counters stay monotonic: a process that exits leaves its CPU time in
    its service's total.
    """

    def __init__(self, *, proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup", max_series: int = DEFAULT_MAX_SERIES,
                 service_of: Callable[[int, str], str] | None = DEFAULT_RESOLVER):
        self.proc = proc
        self.cgroup_root = cgroup_root
        self.service_of = service_of
        self.services = _Family("deetune_service_cpu_seconds_total", "", "counter", ("service",), max_series)
        self.containers = _Family("deetune_container_cpu_seconds_total", "", "counter", ("container",), max_series)
        self._lock = threading.Lock()
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")
        #: (pid, start time, comm) → (service, container id or None, container cgroup paths)
        self._identity: dict[tuple[int, int, str], tuple[str, str | None, dict[str, str]]] = {}
        #: (pid, start time, comm) → CPU seconds at the last scrape
        self._cpu: dict[tuple[int, int, str], float] = {}
        #: CPU seconds of exited processes, by service
        self._exited_cpu: dict[str, float] = collections.defaultdict(float)

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._collect()

    def warm_up(self) -> None:
        """Do the first scan's work (loading the resolver, naming every process) ahead of the
        first scrape, which would otherwise take the longest."""
        try:
            for _ in self.collect():
                pass
        except Exception as exc:  # only an optimisation
            log.debug("resource warm-up failed: %s", exc)

    def _collect(self) -> Iterator[Metric]:
        if self.service_of is DEFAULT_RESOLVER:
            self.service_of = resolver_service_of(self.proc)
        processes = 0
        service_cpu: dict[str, float] = collections.defaultdict(float)
        service_mem: dict[str, float] = collections.defaultdict(float)
        container_procs: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
        container_paths: dict[str, dict[str, str]] = {}
        cpu_now: dict[tuple[int, int, str], float] = {}
        identity_now = {}
        try:
            # In pid order: which services get a series of their own under the cap does not vary.
            entries = sorted((e.name for e in os.scandir(self.proc) if e.name.isdigit()), key=int)
        except OSError:
            entries = []
        for name in entries:
            processes += 1
            stat = _read(f"{self.proc}/{name}/stat")
            if stat is None:
                continue
            comm_end = stat.rfind(")")
            comm = stat[stat.find("(") + 1: comm_end]
            fields = stat[comm_end + 2:].split()
            try:
                flags = int(fields[6])
                cpu = (int(fields[11]) + int(fields[12])) / self._ticks
                start = int(fields[19])
                rss = int(fields[21]) * self._page
            except (IndexError, ValueError):
                continue
            if flags & _PF_KTHREAD:
                continue  # kernel threads: no service, no container
            key = (int(name), start, comm)  # exec keeps pid and start time, not comm
            ident = self._identity.get(key)
            if ident is None:
                service = comm
                if self.service_of is not None:
                    try:
                        service = self.service_of(int(name), comm) or comm
                    except Exception as exc:  # a resolver problem must not break the scrape
                        log.debug("service of pid %s: %s", name, exc)
                cgroup = _read(f"{self.proc}/{name}/cgroup") or ""
                found = container_of(cgroup)
                ident = (service, found[0] if found else None, found[1] if found else {})
            identity_now[key] = ident
            service, container, paths = ident
            if container:
                container_procs[container].append((cpu, rss))
                container_paths.setdefault(container, paths)
            slot = self.services.slot((service,))[0]
            cpu_now[key] = cpu
            service_cpu[slot] += cpu
            service_mem[slot] += rss
        for key, cpu in self._cpu.items():
            if key not in cpu_now and key in self._identity:
                self._exited_cpu[self.services.slot((self._identity[key][0],))[0]] += cpu
        self._cpu = cpu_now
        self._identity = identity_now
        for service, cpu in self._exited_cpu.items():
            service_cpu[service] += cpu

        yield GaugeMetricFamily("deetune_processes", "Processes on the host (/proc/[0-9]*).", value=processes)
        yield GaugeMetricFamily("deetune_containers", "Distinct containers with a process on the host.",
                                value=len(container_procs))
        yield from self._host()
        cpu_family = CounterMetricFamily("deetune_service_cpu_seconds_total",
                                         "CPU time (user+system) of the service's processes.", labels=("service",))
        mem_family = GaugeMetricFamily("deetune_service_memory_bytes",
                                       "Resident memory (VmRSS) summed over the service's processes.", labels=("service",))
        for service in sorted(service_cpu):
            cpu_family.add_metric([service], service_cpu[service])
            if service in service_mem:
                mem_family.add_metric([service], service_mem[service])
        yield cpu_family
        yield mem_family
        ccpu = CounterMetricFamily("deetune_container_cpu_seconds_total", "CPU time of the container's cgroup.",
                                   labels=("container",))
        cmem = GaugeMetricFamily("deetune_container_memory_bytes", "Memory charged to the container's cgroup.",
                                 labels=("container",))
        totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        for container, procs in container_procs.items():
            cpu, mem = self._cgroup_usage(container_paths[container])
            if cpu is None:
                cpu = sum(p[0] for p in procs)
            if mem is None:
                mem = sum(p[1] for p in procs)
            slot = self.containers.slot((container[:12],))[0]
            totals[slot][0] += cpu
            totals[slot][1] += mem
        for label in sorted(totals):
            ccpu.add_metric([label], totals[label][0])
            cmem.add_metric([label], totals[label][1])
        yield ccpu
        yield cmem

    def _host(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily("deetune_host_cpu_seconds_total", "Host CPU time by mode (/proc/stat).", labels=("mode",))
        stat = _read(f"{self.proc}/stat") or ""
        for line in stat.splitlines():
            if line.startswith("cpu "):
                values = line.split()[1:]
                for mode, value in zip(_CPU_MODES, values):
                    cpu.add_metric([mode], int(value) / self._ticks)
                break
        yield cpu
        mem = GaugeMetricFamily("deetune_host_memory_bytes", "Host memory by state (/proc/meminfo); used = total - available.",
                                labels=("state",))
        values: dict[str, int] = {}
        for line in (_read(f"{self.proc}/meminfo") or "").splitlines():
            key, _, rest = line.partition(":")
            if key in _MEMINFO:
                values[_MEMINFO[key]] = int(rest.split()[0]) * 1024
        if "total" in values and "available" in values:
            values["used"] = values["total"] - values["available"]
        for state in ("total", "free", "available", "used", "buffers", "cached"):
            if state in values:
                mem.add_metric([state], values[state])
        yield mem

    def _cgroup_usage(self, paths: dict[str, str]) -> tuple[float | None, float | None]:
        """(CPU seconds, memory bytes) of a container's cgroup: v2 cpu.stat and memory.current,
        or v1 cpuacct.usage and memory.usage_in_bytes; None for what is not there."""
        root = self.cgroup_root
        cpu = mem = None
        if "" in paths and os.path.exists(f"{root}/cgroup.controllers"):  # unified hierarchy
            base = f"{root}{paths['']}"
            for line in (_read(f"{base}/cpu.stat") or "").splitlines():
                if line.startswith("usage_usec "):
                    cpu = int(line.split()[1]) / 1e6
            text = _read(f"{base}/memory.current")
            if text and text.strip().isdigit():
                mem = float(text)
            return cpu, mem
        for controller in ("cpuacct", "cpu"):
            if controller in paths:
                for mount in ("cpuacct", "cpu,cpuacct", "cpuacct,cpu", "cpu"):
                    text = _read(f"{root}/{mount}{paths[controller]}/cpuacct.usage")
                    if text and text.strip().isdigit():
                        cpu = int(text) / 1e9
                        break
                break
        if "memory" in paths:
            text = _read(f"{root}/memory{paths['memory']}/memory.usage_in_bytes")
            if text and text.strip().isdigit():
                mem = float(text)
        return cpu, mem


# -- the sink --------------------------------------------------------------------------------------


class _EventCollector:
    def __init__(self, sink: "PrometheusSink"):
        self._sink = sink

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        return iter(self._sink._event_metrics())


class PrometheusSink(Sink):
    name = "prometheus"
    description = "metrics for Prometheus on http://HOST:PORT/metrics; prometheus[:HOST:PORT][?max_series=N] (default 127.0.0.1:9464)"

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, max_series: int = DEFAULT_MAX_SERIES,
                 is_local_listener: Callable[[str, int, int | None], bool] | None = None,
                 service_of: Callable[[int, str], str] | None = DEFAULT_RESOLVER,
                 proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup", serve: bool = True,
                 kernel_counts: bool = False):
        #: Requests and connections are counted from the kernel's counters (RequestCounts,
        #: LatencyCounts, ConnectionCounts): exact at any load.  Exchange events then count only
        #: as decoded detail (deetune_requests_decoded_total).  Off: counted from the events.
        self.kernel_counts = kernel_counts
        if max_series < 1:
            raise SinkError(f"prometheus sink: max_series must be at least 1, got {max_series}")
        self.max_series = max_series
        self._lock = threading.Lock()
        self._listeners = LocalListeners() if is_local_listener is None else None
        self._is_local = is_local_listener or self._listeners
        fam = lambda *a: _Family(*a, max_series)
        self.requests = fam("deetune_requests_total", "Requests (exchanges), counted once per exchange.", "counter", REQUEST_LABELS)
        self.errors = fam("deetune_request_errors_total", "Requests that failed (HTTP 5xx, Redis/MySQL errors).", "counter", REQUEST_LABELS)
        self.durations = fam("deetune_request_duration_seconds", "Latency: last request byte to first response byte.",
                             "histogram", DURATION_LABELS)
        self.opened = fam("deetune_connections_opened_total", "TCP connections opened.", "counter", EDGE_LABELS)
        self.failed = fam("deetune_connections_failed_total", "TCP connects that failed (refused, timeout …).", "counter", EDGE_LABELS)
        self.active = fam("deetune_connections_active", "TCP connections open now (opened - closed).", "gauge", EDGE_LABELS)
        self.retransmits = fam("deetune_tcp_retransmits_total", "TCP segments retransmitted, at connection close.", "counter", EDGE_LABELS)
        self.resets = fam("deetune_tcp_resets_total", "TCP connections that ended by a reset.", "counter", EDGE_LABELS)
        self.bytes_sent = fam("deetune_bytes_sent_total", "Bytes from client to server, at connection close.", "counter", EDGE_LABELS)
        self.bytes_received = fam("deetune_bytes_received_total", "Bytes from server to client, at connection close.", "counter",
                                  EDGE_LABELS)
        self.decoded = fam("deetune_requests_decoded_total",
                           "Requests decoded in detail (targets, statements, errors: sampled under load; "
                           "with deetune_requests_total, the coverage of the detail).", "counter", DECODED_LABELS)
        self.anomalies = fam("deetune_accounting_anomalies_total",
                             "What the kernel's counting met besides exchanges: chunks it could not follow "
                             "(kind=unparsed: the edge's counts are then a lower bound) and replies no request "
                             "asked for (kind=unsolicited).", "counter", ANOMALY_LABELS)
        self._families = [self.requests, self.errors, self.durations, self.opened, self.failed, self.active,
                          self.retransmits, self.resets, self.bytes_sent, self.bytes_received, self.decoded,
                          self.anomalies]
        self._edge_families = [self.opened, self.failed, self.active, self.retransmits, self.resets,
                               self.bytes_sent, self.bytes_received]
        #: sock_id → (counted, edge labels, active series) of connections seen opening.
        self._conns: collections.OrderedDict[int, tuple[bool, tuple[str, str], tuple[str, str]]] = collections.OrderedDict()
        self._kernel: dict[str, tuple[int, int]] = {}
        self._comms: dict[int, str] = {}
        self.resources = ResourceCollector(proc=proc, cgroup_root=cgroup_root, max_series=max_series, service_of=service_of)
        self.registry = PlaceRegistry(auto_describe=False)
        self.registry.register(_EventCollector(self))
        self.registry.register(self.resources)
        # For the fleet server (docs/fleet.md): the agent's place on every series, its endpoints.
        self.remote_endpoints = RemoteEndpoints(self._is_local, edge_names, max_series,
                                                counted_names=lambda e: counted_edge_names(e, self._comm_of))
        self.fleet = FleetCollector(self.remote_endpoints, max_series=max_series, proc=proc,
                                    service_of=lambda pid, comm: self._service_of(pid, comm))
        self.registry.register(self.fleet)
        self.host, self.port = host, port
        self._server = self._thread = None
        if serve:
            try:
                self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise SinkError(f"prometheus sink cannot listen on {host}:{port}: {reason}") from None
            self.port = self._server.server_address[1]
            threading.Thread(target=self.resources.warm_up, name="deetune-prometheus-warm-up", daemon=True).start()

    @classmethod
    def from_arg(cls, arg: str | None) -> "PrometheusSink":
        host, port, max_series = parse_spec(arg)
        return cls(host, port, max_series=max_series)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def set_place(self, place: Any, api_port: int | None = None) -> None:
        """The agent's host name and labels (:class:`deetune.place.Place`), added to every series,
        and the port of its API (``deetune_agent_info``)."""
        self.registry.place_labels = {"host": place.host, **place.label_dict}
        self.fleet.api_port = api_port

    def _service_of(self, pid: int, comm: str) -> str:
        service_of = self.resources.service_of
        return service_of(pid, comm) if callable(service_of) else comm

    # -- events ----------------------------------------------------------------------------------
    def handle(self, event: Event) -> None:
        self.remote_endpoints.observe(event)
        if isinstance(event, CountedEvent):
            with self._lock:
                self._on_counts(event)
        elif isinstance(event, ExchangeEvent):
            with self._lock:
                # The kernel counts these protocols' exchanges; others' (HTTP/2, gRPC, kafka,
                # dns, plugins' …) count here, from their decoding.
                if self.kernel_counts and event.protocol in KERNEL_COUNTED:
                    self._on_decoded(event)
                else:
                    self._on_exchange(event)
        elif isinstance(event, ConnectionEvent) and not self.kernel_counts:
            with self._lock:
                self._on_connection(event)

    def _on_counts(self, event: CountedEvent) -> None:
        """The kernel's exact counts of one edge side (deetune.accounting)."""
        counted = event.counted
        if counted is None:  # no topology aggregator in the pipeline: the one-count rule here
            counted = event.role == "server" or not self._is_local(event.raddr, event.port, event.ts)
        client, server = counted_edge_names(event, self._comm_of)
        if isinstance(event, ConnectionCounts):
            labels = (client, server)
            if event.failed:  # no server ever saw them: counted on the client's side
                self._edge_slots(labels)
                self.failed.add(self.failed.slot(labels), event.failed)
            if not counted:
                return
            self._edge_slots(labels)
            if event.opened:
                self.opened.add(self.opened.slot(labels), event.opened)
            if event.opened or event.closed:
                self.active.add(self.active.slot(labels), event.opened - event.closed)
            self.retransmits.add(self.retransmits.slot(labels), event.retransmits)
            self.resets.add(self.resets.slot(labels), event.resets)
            self.bytes_sent.add(self.bytes_sent.slot(labels), event.bytes_sent)
            self.bytes_received.add(self.bytes_received.slot(labels), event.bytes_received)
            return
        if not counted:
            return
        method = event.method or "none"
        if isinstance(event, LatencyCounts):
            self.durations.observe_buckets(self.durations.slot((event.protocol, client, server, method)),
                                           event.buckets, 0.0)
            return
        if not isinstance(event, RequestCounts):
            return
        if event.outcome not in EXCHANGE_OUTCOMES:
            self.anomalies.add(self.anomalies.slot((event.protocol, client, server, event.outcome)), event.count)
            return
        status = "none" if event.status is None else str(event.status)
        key = self.requests.slot((event.protocol, client, server, method, status))
        self.requests.add(key, event.count)
        error = event.count if event.outcome == OUTCOME_ERROR else 0
        self.errors.add(key, error)  # the requests' series: ratios always line up
        if error and key == self.requests.other:
            self.errors.overflow += error
        if event.latency_sum_ns:
            self.durations.observe_buckets(self.durations.slot((event.protocol, client, server, method)), {},
                                           event.latency_sum_ns / 1e9)

    def _comm_of(self, pid: int) -> str:
        """A process's comm (cached; ``pid-N`` once it is gone): names for counts without an aggregator."""
        comm = self._comms.get(pid)
        if comm is None:
            comm = (_read(f"/proc/{pid}/comm") or f"pid-{pid}").strip()
            if len(self._comms) >= 4096:
                self._comms.clear()
            self._comms[pid] = comm
        return comm

    def _on_decoded(self, event: ExchangeEvent) -> None:
        """An exchange decoded in detail (kernel counts on): the coverage of the detail."""
        if not self._counted(event):
            return
        client, server = edge_names(event)
        self.decoded.add(self.decoded.slot((event.protocol, client, server)), 1)

    def _counted(self, event: ConnectionEvent | ExchangeEvent) -> bool:
        """The one-count rule: the server side always; the client side only when the
        server is not a listener of this host (whose own side is then seen and counted)."""
        if event.role == "server":
            if self._listeners is not None:
                self._listeners.note_server(event.laddr, event.lport)
            return True
        return not self._is_local(event.raddr, event.rport, event.ts)

    def _on_exchange(self, event: ExchangeEvent) -> None:
        known = self._conns.get(event.sock_id) if event.sock_id else None
        counted = known[0] if known is not None and event.role != "server" else self._counted(event)
        if not counted:
            return
        client, server = edge_names(event)
        status = "none" if event.status is None else str(event.status)
        method = event.method or "none"
        key = self.requests.slot((event.protocol, client, server, method, status))
        self.requests.add(key, 1)
        self.errors.add(key, 1 if event.error else 0)  # the requests' series: ratios always line up
        if event.error and key == self.requests.other:
            self.errors.overflow += 1
        if event.latency_ns is not None:
            self.durations.observe(self.durations.slot((event.protocol, client, server, method)), event.latency_ns / 1e9)

    def _edge_slots(self, labels: tuple[str, str]) -> None:
        """Give every connection family a series for a counted edge (zero until it happens),
        so rates and ratios exist for it."""
        for family in self._edge_families:
            if labels not in family.series and family.has_room():
                family.slot(labels)

    def _on_connection(self, event: ConnectionEvent) -> None:
        labels = edge_names(event)
        if event.phase == "failed":  # no server ever saw it: nothing to count twice
            self._edge_slots(labels)
            self.failed.add(self.failed.slot(labels), 1)
            return
        if event.phase == "open":
            counted = self._counted(event)
            active = self.active.slot(labels) if counted else labels
            self._conns[event.sock_id] = (counted, labels, active)
            self._conns.move_to_end(event.sock_id)
            if len(self._conns) > MAX_TRACKED_CONNECTIONS:
                self._conns.popitem(last=False)
            if counted:
                self._edge_slots(labels)
                self.opened.add(self.opened.slot(labels), 1)
                self.active.add(active, 1)
            return
        if event.phase != "close":
            return
        known = self._conns.pop(event.sock_id, None)
        if known is not None:
            counted, labels, active = known
            if counted:
                self.active.add(active, -1)
        else:
            counted = self._counted(event)
        if not counted:
            return
        self._edge_slots(labels)
        self.retransmits.add(self.retransmits.slot(labels), event.retransmits or 0)
        self.resets.add(self.resets.slot(labels), 1 if event.reset else 0)
        sent, received = event.bytes_sent or 0, event.bytes_received or 0
        if event.role == "server":
            sent, received = received, sent  # client → server is what the server received
        self.bytes_sent.add(self.bytes_sent.slot(labels), sent)
        self.bytes_received.add(self.bytes_received.slot(labels), received)

    def observe_stats(self, stats: Any) -> None:
        """Pipeline hook: the kernel's per-probe emitted/lost record counts and records left out by
        overload sampling."""
        kernel = {name: (p.emitted, p.lost, p.sampled_out) for name, p in stats.probes.items()}
        with self._lock:
            self._kernel = kernel

    # -- scrape ----------------------------------------------------------------------------------
    def _event_metrics(self) -> list[Metric]:
        with self._lock:  # copies only: the pipeline's thread waits as little as possible
            snapshots = [(family, family.snapshot()) for family in self._families]
            overflows = [(family.name, family.overflow) for family in self._families]
            kernel = dict(self._kernel)
        metrics = [family.metric(snapshot) for family, snapshot in snapshots]
        overflow = CounterMetricFamily("deetune_series_overflow_total",
                                       "Observations folded into the 'other' series by the series cap.", labels=("family",))
        resources = [self.resources.services, self.resources.containers]
        for name, count in overflows + [(family.name, family.overflow) for family in resources]:
            overflow.add_metric([name], count)
        metrics.append(overflow)
        events = CounterMetricFamily("deetune_kernel_events_total", "Records the probe's BPF programs wrote.",
                                     labels=("probe",))
        lost = CounterMetricFamily("deetune_kernel_events_lost_total", "Records lost in the kernel (ring buffer full).",
                                   labels=("probe",))
        sampled_out = CounterMetricFamily(
            "deetune_kernel_calls_sampled_out_total",
            "Records the kernel left out because of overload sampling (payload: calls not copied; tcp: opens "
            "and closes not reported), because the agent could not keep up or kept within its CPU budget "
            "on a busy host.",
            labels=("probe",))
        for probe, (emitted, dropped, left_out) in sorted(kernel.items()):
            events.add_metric([probe], emitted)
            lost.add_metric([probe], dropped)
            sampled_out.add_metric([probe], left_out)
        metrics += [events, lost, sampled_out]
        times = os.times()
        metrics.append(CounterMetricFamily("deetune_agent_cpu_seconds_total", "CPU time of this agent (user+system).",
                                           value=times.user + times.system))
        statm = _read("/proc/self/statm")
        if statm:
            metrics.append(GaugeMetricFamily("deetune_agent_memory_bytes", "Resident memory of this agent.",
                                             value=int(statm.split()[1]) * os.sysconf("SC_PAGE_SIZE")))
        return metrics

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = self._thread = None
