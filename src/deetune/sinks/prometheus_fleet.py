"""What the Prometheus sink adds for the fleet server (docs/fleet.md): the agent's place on
every series, and the endpoints that let a server join two hosts' halves of an edge.

- :class:`PlaceRegistry`: a ``CollectorRegistry`` that adds the agent's host name and labels
  (``host="web-3", idc="bj1"``) to every sample it serves.  They are constant for one agent,
  so they add no series.
- :class:`FleetCollector` (read at scrape time):

  ``deetune_agent_info{version, api_port}``  1 — this agent, and the port of its API (the fleet
  server fetches per-request detail there);
  ``deetune_agent_start_time_seconds`` — when this agent started (counters restart then);
  ``deetune_agent_time_seconds`` — its clock at the scrape (when a host last reported);
  ``deetune_host_address{address}``  1 — the host's addresses (not loopback or link-local);
  ``deetune_listen_endpoint{service, pid, address, port}``  1 — the TCP endpoints its services
  listen on (``0.0.0.0``/``::`` as such: the host's addresses complete them; loopback
  listeners are left out, no other host reaches them).
- :class:`RemoteEndpoints`: ``deetune_remote_endpoint{client, server, address, port}``  1 —
  per client edge counted on this host (its server is not a listener here), the remote
  endpoints it called, under the same ``client``/``server`` names as the RED families.

Each family holds at most ``max_series`` label sets (the sink's cap); label sets beyond are
not exported and are counted in ``deetune_endpoint_series_overflow_total{family}``.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from deetune import __version__, procnet
from deetune.events import ConnectionEvent, CountedEvent, ExchangeEvent

log = logging.getLogger("deetune.sinks.prometheus")

#: Seconds between two readings of the listening sockets and the host's addresses.
LISTENERS_TTL = 5.0


class PlaceRegistry(CollectorRegistry):
    """A registry whose every sample also carries the agent's place labels (``host``, …)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.place_labels: dict[str, str] = {}

    def collect(self) -> Iterable[Metric]:
        extra = self.place_labels
        for metric in super().collect():
            if extra:
                metric.samples = [s._replace(labels={**extra, **s.labels}) for s in metric.samples]
            yield metric


class _Capped:
    """Label sets kept up to a cap; the ones refused are counted."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.overflow = 0

    def room(self, size: int) -> bool:
        return size < self.cap


def _reachable(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_link_local)


class RemoteEndpoints:
    """Per client edge counted on this host, the remote endpoints it called (see the module doc).

    ``observe`` runs on the pipeline's thread: one dict lookup per event once an endpoint is known.
    """

    def __init__(self, is_local: Callable[[str, int, int | None], bool],
                 names: Callable[[Any], tuple[str, str]], max_series: int,
                 counted_names: Callable[[Any], tuple[str, str]] | None = None) -> None:
        self._is_local = is_local
        self._names = names
        self._counted_names = counted_names
        self._cap = _Capped(max_series)
        self._lock = threading.Lock()
        #: (client, server, address, port) of counted client edges.
        self.endpoints: dict[tuple[str, str, str, int], None] = {}
        #: (address, port) → whether a local listener answers it (bounded: cleared when full).
        self._local: dict[tuple[str, int], bool] = {}

    def observe(self, event: Any) -> None:
        if isinstance(event, CountedEvent):  # the kernel's counts: the edges the RED families count
            if event.role != "client" or not event.port or event.counted is False or self._counted_names is None:
                return
            client, server = self._counted_names(event)
            address, port, counted = event.raddr, event.port, event.counted
        elif isinstance(event, (ExchangeEvent, ConnectionEvent)):
            if event.role != "client" or not event.rport:
                return
            client, server = self._names(event)
            address, port, counted = event.raddr, event.rport, None
        else:
            return
        key = (client, server, address, port)
        if key in self.endpoints:
            return
        if not counted:
            where = (address, port)
            local = self._local.get(where)
            if local is None:
                local = self._is_local(address, port, event.ts)
                if len(self._local) >= 4096:
                    self._local.clear()
                self._local[where] = local
            if local:
                return  # the server's own side is seen here and counts: nothing to join
        with self._lock:
            if self._cap.room(len(self.endpoints)):
                self.endpoints[key] = None
            else:
                self._cap.overflow += 1

    def metrics(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("deetune_remote_endpoint", "Remote endpoints (address, port) a client edge "
                                   "counted on this host called (client/server as in the RED families).",
                                   labels=("client", "server", "address", "port"))
        with self._lock:
            keys = list(self.endpoints)
        for client, server, address, port in keys:
            family.add_metric([client, server, address, str(port)], 1)
        yield family

    @property
    def overflow(self) -> int:
        return self._cap.overflow


class FleetCollector:
    """The agent's info, its host's addresses and its services' listening endpoints, read at
    scrape time (at most every :data:`LISTENERS_TTL` seconds), plus :class:`RemoteEndpoints`."""

    def __init__(self, remote: RemoteEndpoints, *, max_series: int,
                 service_of: Callable[[int, str], str] | None = None, proc: str = "/proc") -> None:
        self.remote = remote
        self.service_of = service_of
        self.proc = proc
        self.api_port: int | None = None
        self.started = time.time()
        self._cap = _Capped(max_series)
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._addresses: list[str] = []
        self._listeners: list[tuple[str, str, str, str]] = []
        #: listening socket inode → (pid, service): an owner is looked up once per socket.
        self._owners: dict[int, tuple[int, str]] = {}

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("deetune_agent_info", "This agent: its version and the port of its API (0: none).",
                                 labels=("version", "api_port"))
        info.add_metric([__version__, str(self.api_port or 0)], 1)
        yield info
        yield GaugeMetricFamily("deetune_agent_start_time_seconds", "When this agent started (Unix time).",
                                value=self.started)
        yield GaugeMetricFamily("deetune_agent_time_seconds", "This agent's clock at the scrape (Unix time): "
                                "the last one Prometheus holds says when the host last reported.", value=time.time())
        with self._lock:
            if time.monotonic() - self._read_at >= LISTENERS_TTL:
                self._read()
            addresses, listeners, overflow = self._addresses, self._listeners, self._cap.overflow
        family = GaugeMetricFamily("deetune_host_address", "This host's addresses (loopback and link-local left out).",
                                   labels=("address",))
        for address in addresses:
            family.add_metric([address], 1)
        yield family
        family = GaugeMetricFamily("deetune_listen_endpoint", "TCP endpoints this host's services listen on.",
                                   labels=("service", "pid", "address", "port"))
        for labels in listeners:
            family.add_metric(list(labels), 1)
        yield family
        yield from self.remote.metrics()
        counted = CounterMetricFamily("deetune_endpoint_series_overflow_total",
                                      "Label sets of the endpoint families left out by the series cap.",
                                      labels=("family",))
        counted.add_metric(["deetune_listen_endpoint"], overflow)
        counted.add_metric(["deetune_remote_endpoint"], self.remote.overflow)
        yield counted

    def _read(self) -> None:
        from deetune.services import local_addresses

        self._read_at = time.monotonic()
        try:
            found, _networks = local_addresses(self.proc)
            self._addresses = sorted(str(a) for a in found if _reachable(str(a)))[: self._cap.cap]
            sockets = [s for s in procnet.read_listening_sockets(self.proc)
                       if s.laddr in ("0.0.0.0", "::") or _reachable(s.laddr)]
        except OSError as exc:
            log.debug("cannot read listening sockets: %s", exc)
            return
        inodes = {s.inode for s in sockets}
        self._owners = {inode: owner for inode, owner in self._owners.items() if inode in inodes}
        missing = inodes - self._owners.keys()
        if missing:
            for inode, pid in procnet.socket_inode_owners(missing, self.proc).items():
                self._owners[inode] = (pid, self._service(pid))
        listeners: dict[tuple[str, str, str, str], None] = {}
        overflow = 0
        for s in sorted(sockets, key=lambda s: (s.lport, s.laddr)):
            owner = self._owners.get(s.inode)
            if owner is None:
                continue  # no process holds it (closing) or it is not ours to see
            labels = (owner[1], str(owner[0]), s.laddr, str(s.lport))
            if labels in listeners:
                continue
            if self._cap.room(len(listeners)):
                listeners[labels] = None
            else:
                overflow += 1
        self._listeners = list(listeners)
        self._cap.overflow += overflow

    def _service(self, pid: int) -> str:
        comm = ""
        try:
            with open(f"{self.proc}/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            pass
        if self.service_of is not None:
            try:
                return self.service_of(pid, comm)
            except Exception as exc:  # a name is a refinement: comm stands in
                log.debug("cannot name pid %d: %s", pid, exc)
        return comm or f"pid-{pid}"
