"""The fleet's topology, from the series every agent exports, asked of Prometheus (docs/fleet.md).

:class:`FleetQueries` implements :class:`deetune.topology.model.TopologyQueries` (what the
agent's API serves from its store) over a whole fleet: the server's API is the agent's API
with this as its data source.  It keeps nothing between requests; each answer is a handful of
PromQL queries run side by side, joined here.

How a range's numbers are read
    A counter's increase over ``[since, until]`` is its value at ``until`` minus its value at
    ``since`` (0 for a series that did not exist yet, and for a host whose agent started
    after ``since``: its counters began at 0 then): the family's sums at ``until`` and at
    ``since`` (one range query of those two steps: the series selected once), subtracted here.
    Exact: no extrapolation, unlike ``increase()``.  A host whose agent no longer reports (its series went stale) is read at
    its last sample in the range instead of at ``until``.  Where the server's recording rules
    (:data:`RECORDED`) cover the range, the sums and endpoints a whole fleet's shape needs are
    read as they recorded them (one series per row, its labels packed in one, nothing to
    aggregate), else from the raw families.

How the halves of an edge are joined
    Each agent counts an exchange once on its host: on the server's side, and on the
    client's side only when the server is not on that host.  So a call from host A to host
    B is counted twice, once by each: A's series name the server by address (``ip:port``, or
    a mapping file's name), B's name the client by address.  A's series for that edge are
    told apart by ``deetune_remote_endpoint`` (the endpoints a client edge counted on A
    called), and each endpoint is matched to the host with that address
    (``deetune_host_address``) and a listener on that port (``deetune_listen_endpoint``,
    ``0.0.0.0``/``::`` included): the edge becomes ``client → the listener's service``.
    B's series for clients at A's addresses are that edge's server side: its latency beside
    the client's is the network and queueing time between them.  An endpoint no agent's host
    owns stays an external endpoint; a client address no agent's host owns, an external
    client.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import ipaddress
import operator
import threading
import time
from typing import Any, Iterable

import attrs

from deetune.server.prom import Prometheus, Sample, quote, quote_regex

NS = 1_000_000_000
DIRECTIONS = ("downstream", "upstream", "both")
WILDCARDS = ("0.0.0.0", "::")
#: The RED families (docs/metrics.md) and the label sets the fleet reads them by.
ROW = ("host", "protocol", "client", "server")
PAIR = ("host", "client", "server")
QUANTILES = {"latency_p50_ns": 0.5, "latency_p90_ns": 0.9, "latency_p99_ns": 0.99}
CONNECTION_COUNTERS = {
    "connections_opened": "deetune_connections_opened_total",
    "connections_failed": "deetune_connections_failed_total",
    "bytes_sent": "deetune_bytes_sent_total",
    "bytes_received": "deetune_bytes_received_total",
    "retransmits": "deetune_tcp_retransmits_total",
    "resets": "deetune_tcp_resets_total",
}
#: Above this many edges, a graph comes without latency (quantiles and averages) and without the
#: byte, retransmit and reset counters: a whole-fleet answer should not wait for them; a service's
#: graph and its dependencies ask for theirs.
QUANTILE_EDGES = 1000
#: Read even without detail: an edge of connections only (nothing decoded) is part of the shape.
SHAPE_COUNTERS = ("connections_opened", "connections_failed")
#: Recording rules (:func:`recording_rules`, written by the server's Prometheus set-up, docs/fleet.md):
#: the families a whole fleet's shape reads (and its remote endpoints), summed by the labels it reads
#: them by, those labels packed into one, ``key`` (joined by :data:`KEY_SEPARATOR`): Prometheus reads
#: one series of two labels per row instead of one per status and method, each of five or more labels.
#: Read instead of the raw families by a whole fleet's answers when :data:`RULES_MARKER` (recorded by
#: the same rules) shows them evaluated over the whole range; (record, raw family, labels packed).
ENDPOINT = (*PAIR, "address", "port")
RECORDED = {"requests": ("rowkey:deetune_requests_total:sum", "deetune_requests_total", ROW),
            "errors": ("rowkey:deetune_request_errors_total:sum", "deetune_request_errors_total", ROW),
            "connections_opened": ("pairkey:deetune_connections_opened_total:sum", "deetune_connections_opened_total",
                                   PAIR),
            "connections_failed": ("pairkey:deetune_connections_failed_total:sum", "deetune_connections_failed_total",
                                   PAIR),
            "remote": ("endpointkey:deetune_remote_endpoint:max", "deetune_remote_endpoint", ENDPOINT)}
RULES_MARKER = "deetune:recording_rules"
RULES_VERSION = "2"
KEY_LABEL = "key"
#: ASCII's unit separator.  A label value holding it makes its key split into more parts than the
#: labels packed: such a key (the only kind two rows could share) sends the answer to the raw families.
KEY_SEPARATOR = "\x1f"
EDGE_FIELDS = ("requests", "errors", "latency_p50_ns", "latency_p90_ns", "latency_p99_ns", "latency_avg_ns",
               *CONNECTION_COUNTERS)


_gc_lock = threading.Lock()
_gc_holders = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _no_gc_pauses():
    """The cyclic garbage collector off while a large answer is built: its hundreds of thousands
    of new dicts and tuples (no cycles among them) otherwise trigger collection after collection,
    a third of the time.  Back on when the last request building one ends, if it was on; the
    objects made meanwhile (the answer, alive still) moved to the oldest generation first, as
    ``gc.freeze()`` then ``gc.unfreeze()`` do, instead of all traversed by the next young
    collection (a tenth of a second on a large fleet): a full collection frees any cycle among them."""
    global _gc_holders, _gc_was_enabled
    with _gc_lock:
        if _gc_holders == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_holders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0 and _gc_was_enabled:
                if not gc.get_freeze_count():  # nothing frozen on purpose: unfreeze() thaws only ours
                    gc.freeze()
                    gc.unfreeze()
                gc.enable()


def recording_rules() -> list[dict[str, Any]]:
    """The recording rules the server reads (see :data:`RECORDED`), as a rule group's ``rules``."""
    rules: list[dict[str, Any]] = [{"record": RULES_MARKER, "expr": "vector(1)", "labels": {"version": RULES_VERSION}}]
    for record, metric, by in RECORDED.values():
        op = "max" if by == ENDPOINT else "sum"  # an endpoint's series is 1 while it is called
        labels = ", ".join(by)
        packed = ", ".join(f'"{label}"' for label in by)
        rules.append({"record": record, "expr": f'{op} by ({KEY_LABEL}) (label_join({op} by ({labels}) ({metric}), '
                                                f'"{KEY_LABEL}", "\\u001f", {packed}))'})
    return rules


class _Ambiguous(Exception):
    """A recorded key split into more parts than the labels it packs (a label value holds the separator)."""


def _split_key(labels: dict, count: int) -> list[str]:
    """The ``count`` label values packed in a recorded series' ``key`` (:class:`_Ambiguous` if it
    splits into more or fewer)."""
    parts = labels.get(KEY_LABEL, "").split(KEY_SEPARATOR)
    if len(parts) != count:
        raise _Ambiguous(labels.get(KEY_LABEL))
    return parts


def _unpack(answer: list, by: tuple[str, ...]) -> list:
    """A recorded family's samples with their labels unpacked from ``key`` (as the raw family's sums'
    would be: the labels ``by``, an empty one as absent)."""
    count = len(by)
    return [({k: v for k, v in zip(by, _split_key(labels, count)) if v}, *values) for labels, *values in answer]


def _key_regex(first: Iterable[str]) -> str:
    """A ``key`` regex (inside a PromQL string) matching the keys whose first packed label is one of ``first``."""
    return f"(?:{quote_regex(first)})\\\\x1f(?s:.*)"


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
        return True
    except ValueError:
        return False


def _duration(seconds: float) -> str:
    return f"{max(1, int(seconds + 0.999))}s"


@attrs.define
class Host:
    name: str
    labels: dict[str, str]
    target: str
    api_port: int
    version: str
    reporting: bool
    started: float | None = None
    last_seen: float | None = None
    addresses: set[str] = attrs.field(factory=set)
    #: (service, pid, address, port)
    listeners: list[tuple[str, int, str, int]] = attrs.field(factory=list)

    def to_json(self, idc_label: str, services: Iterable[str] = ()) -> dict[str, Any]:
        return {"name": self.name, "labels": dict(self.labels), "idc": self.labels.get(idc_label),
                "reporting": self.reporting,
                "last_seen": int(self.last_seen * NS) if self.last_seen is not None else None,
                "started": int(self.started * NS) if self.started is not None else None,
                "addresses": sorted(self.addresses), "target": self.target, "api_port": self.api_port,
                "version": self.version, "services": sorted(services)}


@attrs.define
class Side:
    """One agent's counts of one edge (a row of the RED families, and its connections)."""

    host: str
    protocol: str
    client: str
    server: str
    metrics: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class Edge:
    client: str
    server: str
    protocol: str
    port: int
    client_sides: list[Side] = attrs.field(factory=list)
    server_sides: list[Side] = attrs.field(factory=list)
    client_hosts: set[str] = attrs.field(factory=set)
    server_hosts: set[str] = attrs.field(factory=set)

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.client, self.server, self.protocol, self.port)


COUNTED = ("requests", "errors", *CONNECTION_COUNTERS)
_SERVER_SIDE_FIELDS = ("requests", "errors", *QUANTILES, "latency_avg_ns")
_edge_fields = operator.itemgetter(*EDGE_FIELDS)
#: A series' ROW and PAIR labels (KeyError when one is absent, as a label with an empty value is).
_row_key = operator.itemgetter(*ROW)
_pair_key = operator.itemgetter(*PAIR)
_server_side_fields = operator.itemgetter(*_SERVER_SIDE_FIELDS)
#: Edge.key, without a property call per edge.
_edge_key = operator.attrgetter("client", "server", "protocol", "port")
#: The counters of an edge a graph without detail did not read.
_NOT_READ = {name: None for name in CONNECTION_COUNTERS if name not in SHAPE_COUNTERS}


_ZEROS: dict[str, Any] = {name: 0 for name in COUNTED}
_NO_LATENCY: dict[str, Any] = {"latency_avg_ns": None, **{name: None for name in QUANTILES}}
_NO_SERVER_LATENCY: dict[str, Any] = {name: None for name in _SERVER_SIDE_FIELDS[2:]}


def _sum_sides(sides: list[Side]) -> dict[str, Any]:
    """The counts of several rows added up; a latency quantile only when one row has them all."""
    if len(sides) == 1:  # most edges: the same numbers without the sums
        metrics = sides[0].metrics
        one: dict[str, Any] = _ZEROS.copy()  # the counters a row lacks: 0
        for name, value in metrics.items():  # a handful: cheaper than a lookup per counter
            if name in one:
                one[name] = round(value)  # round(): an int
        count = metrics.get("latency_count")
        cumulative = metrics.get("latency_buckets")
        if not count and not cumulative:  # a graph without latency: most rows of a large one
            one.update(_NO_LATENCY)
            return one
        one["latency_avg_ns"] = int(metrics.get("latency_sum", 0.0) / count * NS) if count else None
        for name, q in QUANTILES.items():
            one[name] = _bucket_quantile(q, cumulative) if cumulative else None
        return one
    out: dict[str, Any] = {}
    for name in ("requests", "errors", *CONNECTION_COUNTERS):
        out[name] = int(round(sum(s.metrics.get(name, 0) for s in sides)))
    with_latency = [s for s in sides if s.metrics.get("latency_count")]
    count = sum(s.metrics["latency_count"] for s in with_latency)
    total = sum(s.metrics.get("latency_sum", 0.0) for s in with_latency)
    out["latency_avg_ns"] = int(total / count * NS) if count else None
    buckets: dict[float, float] = collections.defaultdict(float)
    for side in sides:
        for bound, value in side.metrics.get("latency_buckets", {}).items():
            buckets[bound] += value
    for name, q in QUANTILES.items():
        out[name] = _bucket_quantile(q, buckets)
    return out


class FleetQueries:
    """The fleet topology from Prometheus (see the module doc); every method is one round of queries."""

    def __init__(self, prometheus: Prometheus, *, idc_label: str = "idc", selector: str = "",
                 agents: Any = None, clock: Any = time.time, use_rules: bool = True) -> None:
        self.prom = prometheus
        #: Read the recording rules' series (:data:`RECORDED`) where they cover the range.
        self.use_rules = use_rules
        #: deetune.server.agents.Agents: asks the agents for per-request detail.
        self.agents = agents
        self.idc_label = idc_label
        #: Extra label matchers for every series (e.g. ``job="deetune"``), without braces.
        self.selector = selector
        self.clock = clock

    # -- PromQL ----------------------------------------------------------------------------------

    def _sel(self, metric: str, extra: str = "") -> str:
        matchers = ",".join(m for m in (self.selector, extra) if m)
        return f"{metric}{{{matchers}}}" if matchers else metric

    @staticmethod
    def _and(*matchers: str) -> str:
        return ",".join(m for m in matchers if m)

    # -- the fleet's state -----------------------------------------------------------------------

    def hosts(self, since: float, until: float) -> dict[str, Host]:
        return self._state(since, until)[0]

    def _state(self, since: float, until: float) -> tuple[dict[str, Host], bool]:
        """The hosts, and whether the recording rules' series cover [since, until] (their marker
        has a value at both ends; never with a selector: the recorded series keep no job label)."""
        rng = _duration(until - since)
        rules = {}
        if self.use_rules and not self.selector:
            rules["rules"] = (f'{RULES_MARKER}{{version="{RULES_VERSION}"}}', since, until)
        got = self.prom.many({
            **rules,
            "seen": (f"max_over_time({self._sel('deetune_agent_info')}[{rng}])", until),
            "now": (self._sel("deetune_agent_info"), until),
            "last": (f"max_over_time({self._sel('deetune_agent_time_seconds')}[{rng}])", until),
            "started": (f"last_over_time({self._sel('deetune_agent_start_time_seconds')}[{rng}])", until),
            "addresses": (f"max_over_time({self._sel('deetune_host_address')}[{rng}])", until),
            "listeners": (f"max_over_time({self._sel('deetune_listen_endpoint')}[{rng}])", until),
        })
        reporting = {labels.get("host") for labels, _ in got["now"]}
        hosts: dict[str, Host] = {}
        for labels, _ in got["seen"]:
            name = labels.get("host")
            if not name:
                continue
            extra = {k: v for k, v in labels.items()
                     if k not in ("__name__", "host", "instance", "job", "version", "api_port")}
            port = labels.get("api_port", "0")
            hosts[name] = Host(name, extra, labels.get("instance", ""), int(port) if port.isdigit() else 0,
                               labels.get("version", ""), name in reporting)
        for key, attribute in (("last", "last_seen"), ("started", "started")):
            for labels, value in got[key]:
                if labels.get("host") in hosts:
                    setattr(hosts[labels["host"]], attribute, value)
        for labels, _ in got["addresses"]:
            if labels.get("host") in hosts:
                hosts[labels["host"]].addresses.add(labels.get("address", ""))
        for labels, _ in got["listeners"]:
            host = hosts.get(labels.get("host", ""))
            port = labels.get("port", "")
            if host is not None and port.isdigit():
                pid = labels.get("pid", "")
                host.listeners.append((labels.get("service", ""), int(pid) if pid.isdigit() else 0,
                                       labels.get("address", ""), int(port)))
        recorded = any(before is not None and after is not None for _labels, before, after in got.get("rules", ()))
        return hosts, recorded

    def _queries(self, since: float, until: float, hosts: dict[str, Host], names: Iterable[str],
                 extra: str = "", recorded: bool = False, each: Any = None,
                 each_pair: Any = None) -> dict[str, list[Sample]]:
        """The named row values over [since, until] (requests, errors, latency_sum, latency_count,
        the quantiles, the connection counters; remote: the endpoint rows), as (labels, value).
        With ``recorded`` and no ``extra`` matchers, the families of :data:`RECORDED` are read from
        the rules' series (their labels unpacked; :class:`_Ambiguous` raised for a key that splits
        into more parts than it packs).

        Each counter family is one query evaluated at ``since`` and at ``until`` (a range query of
        those two steps: its series selected once), its sums at both subtracted here (hosts not
        reporting: their last sample in the range instead of ``until``); the quantiles come from
        the buckets' increases, all three from one such query.  With ``each``, ``each(name, rows)``
        as each family's rows are ready (its answers arrived), while Prometheus evaluates the rest,
        instead of returning them;
        with ``each_pair`` too, a counter family that needs no other answer and no restarted host's
        care goes to ``each_pair(name, [(labels, value at since or None, at until or None), …], packed)``
        as it arrives instead (and not into the returned rows; ``packed``: its labels still packed
        in ``key``): see :meth:`_read_increases`."""
        stale = {name for name, host in hosts.items() if not host.reporting}
        rng = _duration(until - since)
        red = {"requests": "deetune_requests_total", "errors": "deetune_request_errors_total",
               "latency_sum": "deetune_request_duration_seconds_sum",
               "latency_count": "deetune_request_duration_seconds_count", **CONNECTION_COUNTERS}
        names = list(names)
        counters = [(n, red[n], PAIR if n in CONNECTION_COUNTERS else ROW) for n in names if n in red]
        if any(n in QUANTILES for n in names):
            counters.append(("buckets", "deetune_request_duration_seconds_bucket", (*ROW, "le")))
        queries: dict[str, tuple] = {}
        # The recorded series have only their key to match: read for the whole fleet only.
        packed = {name for name in names if name in RECORDED} if recorded and not extra else set()
        stale_keys = f'{{{KEY_LABEL}=~"{_key_regex(stale)}"}}'
        for name, metric, by in counters:
            if name in packed:  # already summed by these labels
                queries[name] = (RECORDED[name][0], since, until)
                if stale:
                    queries[f"{name}@stale"] = (f"last_over_time({RECORDED[name][0]}{stale_keys}[{rng}])", until)
                continue
            labels = ", ".join(by)
            queries[name] = (f"sum by ({labels}) ({self._sel(metric, extra)})", since, until)
            if stale:
                stale_series = self._sel(metric, self._and(extra, f'host=~"{quote_regex(stale)}"'))
                queries[f"{name}@stale"] = (f"sum by ({labels}) (last_over_time({stale_series}[{rng}]))", until)
        if "remote" in packed:
            queries["remote"] = (RECORDED["remote"][0], until)
            if stale:
                queries["remote@stale"] = (f"last_over_time({RECORDED['remote'][0]}{stale_keys}[{rng}])", until)
        elif "remote" in names:
            queries["remote"] = (self._sel("deetune_remote_endpoint", extra), until)
            if stale:
                stale_series = self._sel("deetune_remote_endpoint", self._and(extra, f'host=~"{quote_regex(stale)}"'))
                queries["remote@stale"] = (f"last_over_time({stale_series}[{rng}])", until)
        # A host whose agent started after `since` counted from 0 then: nothing to subtract.
        restarted = {name for name, host in hosts.items() if host.started is not None and host.started > since}
        by_name = {name: by for name, _metric, by in counters}
        out: dict[str, list[Sample]] = {}
        got: dict[str, list] = {}

        def finish(name: str) -> None:
            if name == "remote":
                if each is not None:  # handed over, not kept: freed once read
                    each(name, got.pop("remote") + got.pop("remote@stale", []))
                    return
                out["remote"] = got["remote"] + got.get("remote@stale", [])
                return
            by = by_name[name]
            rows = []
            gone: dict[tuple, float] = {}  # rows absent at `until`: their value at `since`
            for labels, before, value in got[name]:
                if before is None or (restarted and labels.get("host") in restarted):
                    before = 0.0
                if value is None:
                    gone[tuple(labels.get(k, "") for k in by)] = before
                    continue
                rows.append((labels, value - before if value >= before else value))  # lower: a restart
            if got.get(f"{name}@stale"):
                # Each row once (at `until` if it has a value there, else its last sample in the range).
                present = {tuple(labels.get(k, "") for k in by) for labels, _ in rows}
                for labels, value in got[f"{name}@stale"]:
                    key = tuple(labels.get(k, "") for k in by)
                    if key in present:
                        continue
                    present.add(key)
                    before = gone.get(key, 0.0)
                    rows.append((labels, value - before if value >= before else value))
            if name == "buckets":
                by_row: dict[tuple, tuple[dict[str, str], dict[float, float]]] = {}
                for labels, value in rows:
                    key = tuple(labels.get(k, "") for k in ROW)
                    entry = by_row.setdefault(key, (labels, {}))
                    le = labels.get("le", "+Inf")
                    entry[1][float("inf") if le == "+Inf" else float(le)] = value
                rows = list(by_row.values())
            if each is not None:  # handed over, not kept: freed once read
                got.pop(name)
                got.pop(f"{name}@stale", None)
            name = "latency_buckets" if name == "buckets" else name
            if each is not None:
                each(name, rows)
                return
            out[name] = rows

        def arrived(name: str, answer: list) -> None:
            family = name.partition("@")[0]
            if each_pair is not None and name in by_name and name != "buckets" and not restarted \
                    and f"{name}@stale" not in queries:
                each_pair(name, answer, name in packed)  # read as it is, in one pass: nothing to set apart first
                return
            if family in packed:
                answer = _unpack(answer, RECORDED[family][2])
            got[name] = answer
            if family in got and (f"{family}@stale" not in queries or f"{family}@stale" in got):
                finish(family)

        self.prom.many(queries, arrived)
        return out

    @staticmethod
    def _read_rows(got: dict[str, list[Sample]], hosts: dict[str, Host], rows: dict[tuple, Side],
                   only: set[tuple] | None = None) -> None:
        for name in ("requests", "errors", "latency_sum", "latency_count", "latency_buckets"):
            for labels, value in got.get(name, ()):
                try:
                    key = _row_key(labels)
                except KeyError:  # a label with an empty value: absent
                    key = tuple(labels.get(k, "") for k in ROW)
                if key[0] not in hosts or (only is not None and key not in only):
                    continue
                side = rows.get(key)
                if side is None:
                    side = rows[key] = Side(*key)
                if value == value:  # NaN: no observation in the range
                    side.metrics[name] = value

    @staticmethod
    def _read_pairs(got: dict[str, list[Sample]], hosts: dict[str, Host],
                    pairs: dict[tuple, dict[str, float]] | None = None) -> dict[tuple, dict[str, float]]:
        if pairs is None:
            pairs = collections.defaultdict(dict)
        for name in CONNECTION_COUNTERS:
            for labels, value in got.get(name, ()):
                try:
                    key = _pair_key(labels)
                except KeyError:  # a label with an empty value: absent
                    key = tuple(labels.get(k, "") for k in PAIR)
                if key[0] in hosts:
                    pairs[key][name] = value
        return pairs

    # -- the join --------------------------------------------------------------------------------

    def fleet(self, since_ns: int, until_ns: int, *, detail: bool = True, latency: bool | None = None) -> "Fleet":
        """The joined fleet.  Its shape (requests, errors, endpoints, connections opened and
        failed), with ``latency`` averages (default: with ``detail``) and with ``detail`` the
        other connection counters."""
        since, until = since_ns / NS, until_ns / NS
        hosts, recorded = self._state(since, until)
        if not hosts:
            return Fleet(self.idc_label, hosts, {}, since_ns, until_ns)
        names = ["requests", "errors", "remote", *SHAPE_COUNTERS]
        if detail if latency is None else latency:
            names += ["latency_sum", "latency_count"]
        if detail:
            names += [c for c in CONNECTION_COUNTERS if c not in SHAPE_COUNTERS]
        rows: dict[tuple, Side] = {}
        pairs: dict[tuple, dict[str, float]] = collections.defaultdict(dict)
        remote: dict[tuple, set[tuple[str, int]]] = collections.defaultdict(set)

        def read(name: str, samples: list[Sample]) -> None:  # each family as it arrives
            if name == "remote":
                self._read_remote({name: samples}, hosts, remote)
            elif name in CONNECTION_COUNTERS:
                self._read_pairs({name: samples}, hosts, pairs)
            else:
                self._read_rows({name: samples}, hosts, rows)

        def read_pairs(name: str, answer: list, packed: bool) -> None:
            self._read_increases(name, answer, hosts, pairs if name in CONNECTION_COUNTERS else rows,
                                 name in CONNECTION_COUNTERS, packed)

        try:
            self._queries(since, until, hosts, names, recorded=recorded, each=read, each_pair=read_pairs)
        except _Ambiguous:  # a label value holds the keys' separator: the raw families, read again
            rows.clear()
            pairs.clear()
            remote.clear()
            self._queries(since, until, hosts, names, each=read, each_pair=read_pairs)
        return Fleet.join(self.idc_label, hosts, rows, pairs, remote, since_ns, until_ns)

    @staticmethod
    def _read_increases(name: str, answer: list, hosts: dict[str, Host], into: dict, pair: bool,
                        packed: bool = False) -> None:
        """A counter family's increases (value at until minus at since, as ``_queries`` reads them
        for a range with no host stale or restarted) read into rows (:meth:`_read_rows`) or pairs
        (:meth:`_read_pairs`) in one pass: the family's largest cost here on a whole fleet.
        ``packed``: a recorded family's, its labels in ``key`` (:class:`_Ambiguous` if one splits
        into more parts)."""
        key_of, labels_of = (_pair_key, PAIR) if pair else (_row_key, ROW)
        count = len(labels_of)
        get = into.get
        for labels, before, value in answer:
            if value is None:  # absent at `until`: not in the range's rows
                continue
            if before is None:
                before = 0.0
            value = value - before if value >= before else value  # lower: a restart
            if packed:
                key = tuple(_split_key(labels, count))
            else:
                try:
                    key = key_of(labels)
                except KeyError:  # a label with an empty value: absent
                    key = tuple(labels.get(k, "") for k in labels_of)
            if key[0] not in hosts:
                continue
            if pair:
                into[key][name] = value
                continue
            side = get(key)
            if side is None:
                side = into[key] = Side(*key)
            if value == value:  # NaN: no observation in the range
                side.metrics[name] = value

    @staticmethod
    def _read_remote(got: dict[str, list[Sample]], hosts: dict[str, Host],
                     remote: dict[tuple, set[tuple[str, int]]], only: Any = None) -> None:
        for labels, _ in got.get("remote", ()):
            get = labels.get
            port = get("port", "")
            try:
                key = _pair_key(labels)
            except KeyError:  # a label with an empty value: absent
                key = tuple(get(k, "") for k in PAIR)
            if key[0] in hosts and port.isdigit() and (only is None or only(key, labels)):
                remote[key].add((get("address", ""), int(port)))

    def neighbourhood(self, service: str, depth: int, direction: str, since_ns: int, until_ns: int) -> "Fleet":
        """The part of the fleet within ``depth`` hops of ``service``, asked of Prometheus hop by hop
        for those services' rows only (label matchers), joined like the whole fleet."""
        since, until = since_ns / NS, until_ns / NS
        hosts, recorded = self._state(since, until)
        names = ["requests", "errors", "remote", *SHAPE_COUNTERS]
        rows: dict[tuple, Side] = {}
        pairs: dict[tuple, dict[str, float]] = {}
        remote: dict[tuple, set[tuple[str, int]]] = collections.defaultdict(set)
        owner, listening = Fleet.address_book(hosts)

        def fetch(extra: str, keep: Any = None) -> None:
            got = self._queries(since, until, hosts, names, extra=extra, recorded=recorded)
            for name in ("requests", "errors"):
                got[name] = [(labels, v) for labels, v in got[name]
                             if keep is None or keep(tuple(labels.get(k, "") for k in PAIR))]
            self._read_rows(got, hosts, rows)
            for key, counters in self._read_pairs(got, hosts).items():
                if keep is None or keep(key):
                    pairs[key] = counters
            self._read_remote(got, hosts, remote, None if keep is None else lambda key, _l: keep(key))

        def join() -> Fleet:
            return Fleet.join(self.idc_label, hosts, dict(rows), {k: dict(v) for k, v in pairs.items()},
                              remote, since_ns, until_ns)

        frontier = {service}
        seen = {service}
        walks = {"downstream": ("downstream",), "upstream": ("upstream",), "both": ("downstream", "upstream")}[direction]
        for way in walks:
            frontier, seen = {service}, {service}
            for _hop in range(depth):
                names_re = quote_regex(frontier)
                if way == "downstream":
                    fetch(f'client=~"{names_re}"')
                    fleet = join()
                    # The server side of the joined edges: the callee hosts' rows for the caller hosts.
                    joined = [e for e in fleet.edges.values() if e.client in frontier and e.client_sides]
                    callers = {a for e in joined for h in e.client_hosts for a in hosts[h].addresses}
                    callees = {e.server for e in joined}
                    if callers and callees:
                        fetch(f'client=~"{quote_regex(callers)}",server=~"{quote_regex(callees)}"')
                        fleet = join()
                    following = {e.server for e in fleet.edges.values() if e.client in frontier}
                else:
                    fetch(f'server=~"{names_re}"')
                    # Client edges whose remote endpoints are these services' listeners.
                    ports = {port for (h, a, port), svc in listening.items() if svc in frontier}
                    if ports:
                        got = self._queries(since, until, hosts, ["remote"],
                                            extra=f'port=~"{quote_regex(str(p) for p in ports)}"')
                        calling = set()
                        for labels, _ in got["remote"]:
                            port = labels.get("port", "")
                            target = Fleet.resolve(owner, listening, labels.get("address", ""),
                                                   int(port) if port.isdigit() else 0)
                            if target is not None and target[1] in frontier:
                                calling.add(tuple(labels.get(k, "") for k in PAIR))
                        if calling:
                            clients = quote_regex({c for _h, c, _s in calling})
                            servers = quote_regex({s for _h, _c, s in calling})
                            fetch(f'client=~"{clients}",server=~"{servers}"', keep=lambda key: key in calling)
                    fleet = join()
                    following = {e.client for e in fleet.edges.values() if e.server in frontier}
                frontier = following - seen
                seen |= following
                if not frontier:
                    break
        return join()

    def add_detail(self, fleet: "Fleet", edges: Iterable["Edge"], *, latency: bool = True,
                   connections: bool = True) -> None:
        """Latency quantiles (and, for a fleet read without detail, latency averages and connection
        counters) of these edges' rows, asked of Prometheus for those rows only."""
        sides = {(s.host, s.protocol, s.client, s.server): s for e in edges for s in (*e.client_sides, *e.server_sides)}
        if not sides:
            return
        matchers = self._and(*(f'{k}=~"{quote_regex({key[i] for key in sides})}"' for i, k in enumerate(ROW)))
        names = list(QUANTILES)
        if latency:
            names += ["latency_sum", "latency_count"]
        if connections:  # those a fleet without detail lacks
            names += [c for c in CONNECTION_COUNTERS if c not in SHAPE_COUNTERS]
        got = self._queries(fleet.since / NS, fleet.until / NS, fleet.hosts, names, extra=matchers)
        self._read_rows(got, fleet.hosts, fleet.rows, only=set(sides))
        if connections:
            fleet.assign_connections(self._read_pairs(got, fleet.hosts), only={k[0:1] + k[2:] for k in sides})

    # -- TopologyQueries -------------------------------------------------------------------------

    def graph(self, since: int, until: int, service: str | None = None) -> dict[str, Any]:
        """The shape first; then, for at most QUANTILE_EDGES edges (a service's, or a small
        fleet's), their latency (averages and quantiles) and other connection counters.  Above,
        those are null and the answer says ``"detail": false``."""
        with _no_gc_pauses():
            fleet = self.fleet(since, until, detail=False, latency=False)
            edges = [e for e in fleet.edges.values() if service is None or service in (e.client, e.server)]
            detail = len(edges) <= QUANTILE_EDGES
            if detail:
                self.add_detail(fleet, edges, latency=True, connections=True)
            else:
                fleet.partial = True
            answer = fleet.graph(service)
            answer["detail"] = detail
            return answer

    def services(self, since: int, until: int) -> list[dict[str, Any]]:
        with _no_gc_pauses():
            return self.fleet(since, until, detail=False).services()

    def dependencies(self, service: str, depth: int, direction: str, since: int, until: int) -> dict[str, Any]:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}")
        fleet = self.neighbourhood(service, depth, direction, since, until)
        used = fleet.walk(service, depth, direction)[1]
        self.add_detail(fleet, used)
        return fleet.dependencies(service, depth, direction)

    def edges(self, since: int, until: int, *, errors_only: bool = False,
              service: str | None = None) -> list[dict[str, Any]]:
        edges = self.graph(since, until, service)["edges"]
        if errors_only:
            edges = [e for e in edges if e["errors"] or e["connections_failed"]]
        return edges

    def exchanges(self, *, service: str | None = None, limit: int = 100, since: int | None = None) -> list[dict[str, Any]]:
        """Asked of every reporting agent with an API (per-request detail stays on the agents)."""
        if self.agents is None:
            return []
        now_ns = int(self.clock() * NS)
        fleet = self.fleet(now_ns - 3600 * NS, now_ns, detail=False)
        # Each agent names the other host's end by address: ask each for its own names of the
        # service, and name both ends of what it answers as the fleet does.
        fleet_names: dict[tuple[str, str, str], tuple[str, str]] = {}
        local_names: dict[str, set[str]] = collections.defaultdict(set)
        for e in fleet.edges.values():
            for side in (*e.client_sides, *e.server_sides):
                fleet_names[(side.host, side.client, side.server)] = (e.client, e.server)
                if service is not None and service == e.server:
                    local_names[side.host].add(side.server)
                if service is not None and service == e.client:
                    local_names[side.host].add(side.client)
        reporting = [h for h in fleet.hosts.values() if h.reporting]
        asks: dict[str | None, list[Host]] = collections.defaultdict(list)
        for host in reporting:
            for name in (sorted(local_names[host.name] | {service}) if service is not None else [None]):
                asks[name].append(host)
        merged = []
        for name, hosts in asks.items():
            for exchange in self.agents.exchanges(hosts, service=name, limit=limit, since=since):
                key = (exchange["host"], exchange.get("client"), exchange.get("server"))
                if key in fleet_names:
                    exchange["agent_client"], exchange["agent_server"] = key[1], key[2]
                    exchange["client"], exchange["server"] = fleet_names[key]
                merged.append(exchange)
        merged.sort(key=lambda x: x.get("ts") or 0, reverse=True)
        return merged[:limit]

    # -- fleet-only answers ----------------------------------------------------------------------

    def reporting_hosts(self) -> list[Host]:
        """The hosts reporting now (over the last hour's agents)."""
        now = self.clock()
        return [h for h in self.hosts(now - 3600, now).values() if h.reporting]

    def host_list(self, since: int, until: int) -> dict[str, Any]:
        fleet = self.fleet(since, until, detail=False)
        hosts = fleet.hosts_json()
        errors = dict(self.agents.errors) if self.agents is not None else {}
        for host in hosts:
            host["agent_error"] = errors.get(host["name"])
        return {"since": since, "until": until, "idc_label": self.idc_label, "hosts": hosts}

    def cross_idc(self, since: int, until: int) -> dict[str, Any]:
        edges = [e for e in self.graph(since, until)["edges"] if e["cross_idc"]]
        return {"since": since, "until": until, "idc_label": self.idc_label, "edges": edges}

    def series(self, since: int, until: int, step: int, *, service: str | None = None,
               edge: tuple[str, str, str, int] | None = None) -> dict[str, Any]:
        """RED over time of a service (what it serves) or an edge: requests and errors per step,
        latency p50/p99, from the rows the join assigns them."""
        fleet = self.fleet(since, until, detail=False)
        if edge is not None:
            found = fleet.edges.get(edge)
            sides = (found.client_sides or found.server_sides) if found else []
        else:
            sides = [s for e in fleet.edges.values() if e.server == service
                     for s in (e.client_sides if e.client_sides and not e.server_sides else e.server_sides)]
            sides = list({(s.host, s.protocol, s.client, s.server): s for s in sides}.values())
        return self._series(sides, since, until, step)

    def _series(self, sides: list[Side], since: int, until: int, step_ns: int) -> dict[str, Any]:
        """Per step, each series' increase (its value at the step's end minus at its start; a series
        that did not exist yet started at 0, one that went stale stays at its last value, one that
        went down restarted), added up; latency quantiles from the buckets' increases."""
        count = (until - since) // step_ns
        end = until - until % 1_000_000  # Prometheus's times are in milliseconds
        start = end - count * step_ns
        times = [start + k * step_ns for k in range(count + 1)]
        points = [{"t": t, "requests": 0, "errors": 0, "latency_p50_ns": None, "latency_p99_ns": None}
                  for t in times[1:]]
        if not sides or not points:
            return {"since": since, "until": until, "step": step_ns, "points": points}
        names = "deetune_requests_total|deetune_request_errors_total|deetune_request_duration_seconds_bucket"
        selectors = []
        for side in sides:
            matchers = [f'__name__=~"{names}"'] + [f'{k}="{quote(getattr(side, k))}"' for k in ROW]
            selectors.append("{" + ",".join(matchers + ([self.selector] if self.selector else [])) + "}")
        got = self.prom.query_range(" or ".join(selectors), start / NS, end / NS, step_ns / NS)
        buckets: list[dict[float, float]] = [collections.defaultdict(float) for _ in points]
        for labels, values in got:
            at = {int(round(t * 1000)): v for t, v in values}
            previous = at.get(times[0] // 1_000_000, 0.0)
            name = labels.get("__name__", "")
            for index, t in enumerate(times[1:]):
                current = at.get(t // 1_000_000, previous)
                delta = current - previous if current >= previous else current
                previous = current
                if not delta:
                    continue
                if name == "deetune_requests_total":
                    points[index]["requests"] += int(round(delta))
                elif name == "deetune_request_errors_total":
                    points[index]["errors"] += int(round(delta))
                else:
                    le = labels.get("le", "+Inf")
                    buckets[index][float("inf") if le == "+Inf" else float(le)] += delta
        for point, cumulative in zip(points, buckets):
            point["latency_p50_ns"] = _bucket_quantile(0.5, cumulative)
            point["latency_p99_ns"] = _bucket_quantile(0.99, cumulative)
        return {"since": since, "until": until, "step": step_ns, "points": points}


def _bucket_quantile(q: float, cumulative: dict[float, float]) -> int | None:
    """A quantile (ns) from cumulative bucket counts by upper bound (seconds), interpolated linearly
    inside a bucket as Prometheus's histogram_quantile does; None without observations."""
    bounds = sorted(cumulative)
    if not bounds or cumulative[bounds[-1]] <= 0:
        return None
    total = cumulative[bounds[-1]]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if bound == float("inf"):
                return int(lower * NS)  # beyond the last finite bound: that bound
            inside = count - below
            fraction = (rank - below) / inside if inside else 1.0
            return int((lower + (bound - lower) * fraction) * NS)
        lower, below = bound, count
    return int(lower * NS)


@attrs.define
class Fleet:
    """One joined picture of the fleet over a range."""

    idc_label: str
    hosts: dict[str, Host]
    edges: dict[tuple, Edge]
    since: int
    until: int
    #: service → hosts it runs on
    placed: dict[str, set[str]] = attrs.field(factory=dict)
    #: every agent's rows, by (host, protocol, client, server)
    rows: dict[tuple, Side] = attrs.field(factory=dict)
    #: read without quantiles and the connection counters beyond opened/failed (null in answers)
    partial: bool = False
    #: host → its IDC, made once per answer (edge_json asks twice per edge)
    _idc_of: dict[str, str | None] | None = attrs.field(default=None, init=False, repr=False, eq=False)

    def assign_connections(self, pairs: dict[tuple, dict[str, float]], only: set[tuple] | None = None) -> None:
        """Connection counters (by host, client, server) go to that pair's row with the most
        requests; a pair with no row becomes a "tcp" row (traffic nothing decoded)."""
        rows = self.rows
        # Most pairs have one row (one protocol): a pair's rows are looked for among all only when
        # some pair has several (the first one's length tells).
        one = {(host, client, server): side for (host, _protocol, client, server), side in rows.items()}
        several: dict[tuple, list[Side]] = {}
        if len(one) < len(rows):
            for (host, _protocol, client, server), side in rows.items():
                several.setdefault((host, client, server), []).append(side)
            several = {pair: sides for pair, sides in several.items() if len(sides) > 1}
        get = one.get
        for pair, counters in pairs.items():
            if only is not None and pair not in only:
                continue
            target = get(pair)
            if target is None:
                target = rows[(pair[0], "tcp", pair[1], pair[2])] = Side(pair[0], "tcp", pair[1], pair[2])
            elif several and pair in several:
                target = max(several[pair], key=lambda s: (s.metrics.get("requests", 0), s.protocol))
            target.metrics.update(counters)  # a row is the target of its own pair only

    @staticmethod
    def address_book(hosts: dict[str, Host]) -> tuple[dict[str, str], dict[tuple[str, str, int], str]]:
        """address → host (the first by name when two claim one), (host, address, port) → service."""
        owner: dict[str, str] = {}
        for host in sorted(hosts.values(), key=lambda h: h.name):
            for address in host.addresses:
                owner.setdefault(address, host.name)
        listening: dict[tuple[str, str, int], str] = {}
        for host in hosts.values():
            for service, _pid, address, port in host.listeners:
                listening.setdefault((host.name, address, port), service)
        return owner, listening

    @staticmethod
    def resolve(owner: dict[str, str], listening: dict[tuple[str, str, int], str], address: str,
                port: int) -> tuple[str, str] | None:
        """(host, service) listening on ``address:port``, wildcard listeners included; None when no
        agent's host owns the address or nothing of it listens there."""
        host = owner.get(address.strip("[]"))
        if host is None:
            return None
        for candidate in (address.strip("[]"), *WILDCARDS):
            service = listening.get((host, candidate, port))
            if service is not None:
                return host, service
        return None

    @classmethod
    def join(cls, idc_label: str, hosts: dict[str, Host], rows: dict[tuple, Side],
             pairs: dict[tuple, dict[str, float]], remote: dict[tuple, set[tuple[str, int]]],
             since: int, until: int) -> "Fleet":
        owner, listening = cls.address_book(hosts)
        ports: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
        placed: dict[str, set[str]] = collections.defaultdict(set)
        for host in hosts.values():
            for service, _pid, address, port in host.listeners:
                ports[(host.name, service)].add(port)
                placed[service].add(host.name)

        resolved: dict[tuple[str, int], tuple[str, str] | None] = {}

        def resolve(address: str, port: int) -> tuple[str, str] | None:
            key = (address, port)
            if key not in resolved:
                resolved[key] = cls.resolve(owner, listening, address, port)
            return resolved[key]

        addresses: dict[str, str | None] = {}

        def address_owner(client: str) -> str | None:
            if client not in addresses:
                addresses[client] = owner.get(client.strip("[]")) if _is_address(client) else None
            return addresses[client]

        fleet = cls(idc_label, hosts, {}, since, until, rows=rows)
        fleet.assign_connections(pairs)
        edges: dict[tuple, Edge] = {}

        def edge(client: str, server: str, protocol: str, port: int) -> Edge:
            key = (client, server, protocol, port)
            found = edges.get(key)
            if found is None:
                found = edges[key] = Edge(client, server, protocol, port)
            return found

        # Client sides first: they name both services once joined.
        # (client host, server, protocol) → the joined edge, or its edges when several (few): no
        # list made for each of a large fleet's edges.
        joined: dict[tuple[str, str, str], Edge | list[Edge]] = {}

        def add_half(key: tuple[str, str, str], found: Edge) -> None:
            halves = joined.get(key)
            if halves is None:
                joined[key] = found
            elif isinstance(halves, list):
                if found not in halves:
                    halves.append(found)
            elif halves is not found:
                joined[key] = [halves, found]
        server_rows: list[Side] = []
        for key, side in sorted(rows.items()):  # keys are unique: sides are never compared
            host, protocol, client, server = key
            endpoints = remote.get((host, client, server))
            if endpoints is None:
                server_rows.append(side)
                continue
            placed[client].add(host)
            if len(endpoints) == 1:  # most client rows: one endpoint called, an agent's listener
                (endpoint,) = endpoints
                target = resolved.get(endpoint, False)
                if target is False:
                    target = resolve(*endpoint)
                port = endpoint[1]
                if target is None:  # an external endpoint
                    found = edge(client, server, protocol, port)
                else:  # as below, without the sets of targets and services
                    edge_key = (client, target[1], protocol, port)
                    found = edges.get(edge_key)
                    if found is None:
                        found = edges[edge_key] = Edge(client, target[1], protocol, port)
                    found.server_hosts.add(target[0])
                    jkey = (host, found.server, protocol)
                    if jkey in joined:
                        add_half(jkey, found)
                    else:
                        joined[jkey] = found
                found.client_sides.append(side)
                found.client_hosts.add(host)
                continue
            targets = {resolve(address, port) for address, port in endpoints}
            port_set = {port for _, port in endpoints}
            port = port_set.pop() if len(port_set) == 1 else 0
            services = {t[1] for t in targets if t is not None}
            if None not in targets and len(services) == 1:
                found = edge(client, services.pop(), protocol, port)
                for target in targets:
                    found.server_hosts.add(target[0])
                add_half((host, found.server, protocol), found)
            else:
                found = edge(client, server, protocol, port)
            found.client_sides.append(side)
            found.client_hosts.add(host)
        # Server sides: a local client, a client on another agent's host (the joined edge's
        # other half), or an external client.
        for side in server_rows:
            placed[side.server].add(side.host)
        for side in server_rows:
            client_host = addresses.get(side.client, False)
            if client_host is False:
                client_host = address_owner(side.client)
            if client_host:
                halves = joined.get((client_host, side.server, side.protocol))
                if halves is not None:
                    if not isinstance(halves, list):
                        halves = (halves,)
                    matched = False
                    for found in halves:
                        if side.host in found.server_hosts:
                            found.server_sides.append(side)
                            matched = True
                    if matched:
                        continue
            service_ports = ports.get((side.host, side.server), set())
            port = next(iter(service_ports)) if len(service_ports) == 1 else 0
            found = edge(side.client, side.server, side.protocol, port)
            found.server_sides.append(side)
            found.server_hosts.add(side.host)
            if side.client in placed and side.host in placed[side.client]:
                found.client_hosts.add(side.host)  # a local client
            elif client_host is not None:
                found.client_hosts.add(client_host)
        fleet.edges, fleet.placed = edges, dict(placed)
        return fleet

    # -- answers ---------------------------------------------------------------------------------

    def _idcs(self) -> dict[str, str | None]:
        if self._idc_of is None:
            self._idc_of = {name: found.labels.get(self.idc_label) for name, found in self.hosts.items()}
        return self._idc_of

    def edge_json(self, e: Edge) -> dict[str, Any]:
        client_sides, server_sides = e.client_sides, e.server_sides
        out: dict[str, Any] = {"client": e.client, "server": e.server, "protocol": e.protocol, "port": e.port}
        out.update(_sum_sides(client_sides or server_sides))
        if self.partial:
            out.update(_NOT_READ)
        client_hosts, server_hosts = e.client_hosts, e.server_hosts
        out["client_hosts"] = sorted(client_hosts)
        out["server_hosts"] = sorted(server_hosts)
        joined = out["joined"] = bool(client_sides and server_sides)
        if joined:
            out["client_side"] = dict(zip(EDGE_FIELDS, _edge_fields(out)))
            metrics = server_sides[0].metrics
            if len(server_sides) == 1 and not metrics.get("latency_count") and not metrics.get("latency_buckets"):
                # One row without latency (most of a large graph's): its two counts, as _sum_sides has them.
                server = out["server_side"] = {"requests": round(metrics.get("requests", 0)),
                                               "errors": round(metrics.get("errors", 0)), **_NO_SERVER_LATENCY}
            else:
                server = out["server_side"] = dict(zip(_SERVER_SIDE_FIELDS,
                                                       _server_side_fields(_sum_sides(server_sides))))
            # True when several client services of one host call this server: its rows name the
            # client host's address, not the service, and are shared by their edges (graph() says).
            server["shared"] = False
            if out["latency_avg_ns"] is not None and server["latency_avg_ns"] is not None:
                out["network_latency_avg_ns"] = out["latency_avg_ns"] - server["latency_avg_ns"]
            else:
                out["network_latency_avg_ns"] = None
        idc = self._idcs().get
        if len(client_hosts) == 1 and len(server_hosts) == 1:  # most edges
            for client_host in client_hosts:
                for server_host in server_hosts:
                    c, s = idc(client_host), idc(server_host)
            out["idcs"] = [{"client": c, "server": s}]
            out["cross_idc"] = c is not None and s is not None and c != s
            return out
        idc_pairs = sorted({(idc(c), idc(s)) for c in e.client_hosts for s in e.server_hosts},
                           key=lambda p: (str(p[0]), str(p[1])))
        out["idcs"] = [{"client": c, "server": s} for c, s in idc_pairs]
        out["cross_idc"] = any(c is not None and s is not None and c != s for c, s in idc_pairs)
        return out

    def _node(self, name: str) -> dict[str, Any]:
        hosts = sorted(self.placed.get(name, ()))
        instances = []
        for host_name in hosts:
            host = self.hosts[host_name]
            pids = sorted({pid for service, pid, _a, _p in host.listeners if service == name and pid})
            instances.append({"id": f"{host_name}/{name}", "service": name, "host": host_name, "pids": pids,
                              "idc": host.labels.get(self.idc_label), "reporting": host.reporting})
        return {"name": name, "instances": instances, "external": not hosts, "hosts": hosts}

    def _names(self) -> set[str]:
        names = {e.client for e in self.edges.values()} | {e.server for e in self.edges.values()}
        return names

    def graph(self, service: str | None) -> dict[str, Any]:
        if service is None:  # by their keys, made already (an edge's key is _edge_key of it)
            edges = [e for _key, e in sorted(self.edges.items())]
        else:
            edges = [e for e in self.edges.values() if service in (e.client, e.server)]
            edges.sort(key=_edge_key)
        answer = [self.edge_json(e) for e in edges]
        counts: dict[int, int] = {}
        for e in edges:
            if e.client_sides:
                for s in e.server_sides:
                    counts[id(s)] = counts.get(id(s), 0) + 1
        for e, data in zip(edges, answer):
            if data["joined"]:
                sides = e.server_sides
                data["server_side"]["shared"] = (counts[id(sides[0])] > 1 if len(sides) == 1
                                                 else any(counts[id(s)] > 1 for s in sides))
        names = {e.client for e in edges} | {e.server for e in edges}
        if service is not None and service in self.placed:
            names.add(service)
        return {"nodes": [self._node(n) for n in sorted(names)], "edges": answer, "since": self.since,
                "until": self.until, "idc_label": self.idc_label, "hosts": self.hosts_json()}

    def hosts_json(self) -> list[dict[str, Any]]:
        services: dict[str, set[str]] = collections.defaultdict(set)
        for name, hosts in self.placed.items():
            for host in hosts:
                services[host].add(name)
        return [self.hosts[h].to_json(self.idc_label, services.get(h, ())) for h in sorted(self.hosts)]

    def services(self) -> list[dict[str, Any]]:
        requests_in: collections.Counter[str] = collections.Counter()
        requests_out: collections.Counter[str] = collections.Counter()
        for e in self.edges.values():
            count = _sum_sides(e.client_sides or e.server_sides)["requests"]
            requests_out[e.client] += count
            requests_in[e.server] += count
        names = self._names() | set(self.placed)
        return [{**self._node(n), "first_seen": None, "last_seen": None, "requests_in": requests_in[n],
                 "requests_out": requests_out[n]} for n in sorted(names)]

    def walk(self, service: str, depth: int, direction: str) -> tuple[dict[str, int], list[Edge]]:
        """Breadth-first from ``service``: each service reached with its hop distance, and the
        edges walked.  ``both`` is the union of the downstream and the upstream walks."""
        walks = [("client", "server"), ("server", "client")]
        if direction == "downstream":
            walks = walks[:1]
        elif direction == "upstream":
            walks = walks[1:]
        hops: dict[str, int] = {service: 0}
        used: dict[tuple, Edge] = {}
        for near, far in walks:
            distance = {service: 0}
            frontier = {service}
            for hop in range(1, depth + 1):
                following = set()
                for e in self.edges.values():
                    if getattr(e, near) in frontier:
                        used[e.key] = e
                        other = getattr(e, far)
                        if other not in distance:
                            distance[other] = hop
                            following.add(other)
                frontier = following
                if not frontier:
                    break
            for name, hop in distance.items():
                hops[name] = min(hop, hops.get(name, hop))
        return hops, [used[k] for k in sorted(used)]

    def dependencies(self, service: str, depth: int, direction: str) -> dict[str, Any]:
        hops, used = self.walk(service, depth, direction)
        nodes = [{"name": n, "hops": h, "external": n not in self.placed, "hosts": sorted(self.placed.get(n, ()))}
                 for n, h in sorted(hops.items(), key=lambda item: (item[1], item[0]))]
        return {"service": service, "depth": depth, "direction": direction, "nodes": nodes,
                "edges": [self.edge_json(e) for e in used]}
