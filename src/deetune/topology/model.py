"""Values shared by the aggregator, the store and the API.

Times are wall-clock nanoseconds since the Unix epoch (like event ``ts``).
"""

from __future__ import annotations

import bisect
from typing import Any, ClassVar, Protocol

import attrs

from deetune.events import Event

#: Upper bounds (ns) of the latency histogram buckets; one more bucket holds the rest.
#: Roughly ×2 steps from 50 µs to 60 s: percentiles come from these, interpolated.
LATENCY_BUCKETS_NS: tuple[int, ...] = tuple(
    int(x * 1_000)
    for x in (
        50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
        250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
    )
)


def _coarse_of_fine() -> tuple[int, ...]:
    """The coarse bucket of each of the kernel's fine ones (every coarse bound is a fine bound)."""
    from deetune.accounting import LATENCY_BOUNDS_NS as FINE

    assert set(LATENCY_BUCKETS_NS) <= set(FINE), "coarse latency bounds must be fine bounds too"
    return tuple(bisect.bisect_left(LATENCY_BUCKETS_NS, bound) for bound in FINE)


_COARSE_OF_FINE = _coarse_of_fine()


def fine_quantile_ns(buckets: dict[int, int], q: float) -> int | None:
    """The q-quantile of a fine histogram (bucket → count), linear inside a bucket."""
    from deetune.accounting import LATENCY_BOUNDS_NS as FINE

    total = sum(buckets.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(buckets):
        count = buckets[bucket]
        if count and seen + count >= rank:
            lower = FINE[bucket - 1] if 0 < bucket <= len(FINE) else 0
            upper = FINE[bucket] if bucket < len(FINE) else FINE[-1] * 2
            return int(lower + (upper - lower) * ((rank - seen) / count))
        seen += count
    return FINE[-1] * 2


@attrs.frozen
class EdgeKey:
    """A directed dependency: ``client`` service calls ``server`` service."""

    client: str
    server: str
    #: ``http``, ``redis``, ``mysql`` …, or ``tcp`` when no protocol was decoded.
    protocol: str
    #: The server's port.
    port: int


@attrs.define
class EdgeStats:
    """Counters of one edge over one window (mergeable)."""

    requests: int = 0
    errors: int = 0
    latency_sum_ns: int = 0
    #: Counts per LATENCY_BUCKETS_NS bucket, plus the overflow bucket.
    latency_buckets: list[int] = attrs.field(factory=lambda: [0] * (len(LATENCY_BUCKETS_NS) + 1))
    #: Client → server bytes.
    bytes_sent: int = 0
    #: Server → client bytes.
    bytes_received: int = 0
    connections_opened: int = 0
    connections_failed: int = 0
    retransmits: int = 0
    resets: int = 0
    #: Exchanges decoded in detail (payload decoding, sampled under load; each once): with
    #: ``requests`` (every exchange, counted in the kernel) the coverage of the detail.  0 when
    #: the requests are counted from the decoded exchanges themselves (no kernel counters).
    decoded: int = 0
    #: Chunks the kernel's accounting could not follow (``requests`` is then a lower bound).
    unparsed: int = 0
    #: Replies no request asked for (pub/sub messages, connections older than the agent).
    unsolicited: int = 0
    #: The kernel's latency histogram (deetune.accounting.LATENCY_BOUNDS_NS buckets → count):
    #: fine enough for p50/p90/p99 within a few percent; empty when the latency came from events.
    latency_fine: dict[int, int] = attrs.field(factory=dict)

    def add_latency(self, latency_ns: int) -> None:
        self.latency_sum_ns += latency_ns
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS_NS, latency_ns)] += 1

    def add_fine_latency(self, buckets: dict[int, int]) -> None:
        """Add the kernel's histogram counts (its sum comes with the request counts)."""
        fine, coarse = self.latency_fine, self.latency_buckets
        for bucket, count in buckets.items():
            fine[bucket] = fine.get(bucket, 0) + count
            coarse[_COARSE_OF_FINE[bucket] if bucket < len(_COARSE_OF_FINE) else -1] += count

    def merge(self, other: "EdgeStats") -> None:
        for field in ("requests", "errors", "latency_sum_ns", "bytes_sent", "bytes_received",
                      "connections_opened", "connections_failed", "retransmits", "resets", "decoded",
                      "unparsed", "unsolicited"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        self.latency_buckets = [a + b for a, b in zip(self.latency_buckets, other.latency_buckets)]
        for bucket, count in other.latency_fine.items():
            self.latency_fine[bucket] = self.latency_fine.get(bucket, 0) + count

    def quantile_ns(self, q: float) -> int | None:
        """The q-quantile of latency (linear inside a bucket; the kernel's fine buckets when there
        are any); None without samples."""
        if self.latency_fine:
            return fine_quantile_ns(self.latency_fine, q)
        total = sum(self.latency_buckets)
        if total == 0:
            return None
        rank = q * total
        seen = 0
        lower = 0
        for index, count in enumerate(self.latency_buckets):
            upper = LATENCY_BUCKETS_NS[index] if index < len(LATENCY_BUCKETS_NS) else LATENCY_BUCKETS_NS[-1] * 2
            if count and seen + count >= rank:
                return int(lower + (upper - lower) * ((rank - seen) / count))
            seen += count
            lower = upper
        return LATENCY_BUCKETS_NS[-1] * 2

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency_p50_ns": self.quantile_ns(0.5),
            "latency_p90_ns": self.quantile_ns(0.9),
            "latency_p99_ns": self.quantile_ns(0.99),
            "latency_avg_ns": self.latency_sum_ns // self.requests if self.requests else None,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "connections_opened": self.connections_opened,
            "connections_failed": self.connections_failed,
            "retransmits": self.retransmits,
            "resets": self.resets,
            "decoded": self.decoded,
            "unparsed": self.unparsed,
            "unsolicited": self.unsolicited,
        }


@attrs.frozen
class Instance:
    """One running copy of a service: host + pid (+ container)."""

    service: str
    host: str
    pid: int
    comm: str = ""
    container_id: str | None = None
    container_name: str | None = None
    pod: str | None = None
    namespace: str | None = None

    @property
    def id(self) -> str:
        base = f"{self.host}:{self.pid}"
        return f"{base}:{self.container_id[:12]}" if self.container_id else base


@attrs.frozen
class EdgeWindowEvent(Event):
    """What the aggregator emits when a window closes: one edge's counters."""

    type: ClassVar[str] = "edge"
    key: EdgeKey = attrs.field(kw_only=True)
    #: Window start (ns since the epoch) and length.
    window_start: int = attrs.field(kw_only=True)
    window_ns: int = attrs.field(kw_only=True)
    stats: EdgeStats = attrs.field(kw_only=True)
    #: Instance ids seen on each end during the window.
    client_instances: tuple[str, ...] = attrs.field(kw_only=True, default=())
    server_instances: tuple[str, ...] = attrs.field(kw_only=True, default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type, "ts": self.ts, "window_start": self.window_start, "window_ns": self.window_ns,
            "client": self.key.client, "server": self.key.server, "protocol": self.key.protocol,
            "port": self.key.port, **self.stats.to_json(),
            "client_instances": list(self.client_instances), "server_instances": list(self.server_instances),
        }


@attrs.frozen
class InstanceEvent(Event):
    """An instance seen (emitted by the aggregator when first seen in a window)."""

    type: ClassVar[str] = "instance"
    instance: Instance = attrs.field(kw_only=True)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "ts": self.ts, "id": self.instance.id, **attrs.asdict(self.instance)}


class TopologyQueries(Protocol):
    """What the API asks the store.  ``since``/``until`` are ns since the epoch;
    results are JSON-ready dicts (the API returns them as they are)."""

    def graph(self, since: int, until: int, service: str | None = None) -> dict[str, Any]:
        """``{"nodes": [{"name", "instances": [...], "external": bool}], "edges": [{"client",
        "server", "protocol", "port", **EdgeStats.to_json()}], "since", "until"}``; with
        ``service``, only that service's edges and their ends."""

    def services(self, since: int, until: int) -> list[dict[str, Any]]:
        """Every service with its instances, first/last seen, requests in and out."""

    def dependencies(self, service: str, depth: int, direction: str, since: int, until: int) -> dict[str, Any]:
        """``direction`` ``downstream`` (what it calls), ``upstream`` (who calls it) or
        ``both``, to ``depth`` hops: ``{"service", "depth", "direction", "nodes", "edges"}``
        where each node has its hop distance."""

    def edges(self, since: int, until: int, *, errors_only: bool = False, service: str | None = None) -> list[dict[str, Any]]:
        """Edges with their metrics over the time range; fan-in/fan-out come from ``graph``."""

    def exchanges(self, *, service: str | None = None, limit: int = 100, since: int | None = None) -> list[dict[str, Any]]:
        """The most recent exchanges (as ExchangeEvent JSON plus ``client``/``server`` service names)."""
