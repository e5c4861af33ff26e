"""The kernel's exact counters, read in user space.

The payload probe's BPF side (``bpf/l7.bpf.h``) counts every HTTP, Redis, MySQL and PostgreSQL exchange
in arrays, a slot per edge, method and status, with a latency histogram; the tcp probe
(``bpf/tcp.bpf.c``) counts connections per edge.  Nothing there is sampled.  User space reads
them on its tick (:class:`L7Counters`, :class:`CounterMap`): the cost is per key and tick, not
per request.  The differences since the last read become events (:class:`deetune.events.RequestCounts`,
:class:`~deetune.events.LatencyCounts`, :class:`~deetune.events.ConnectionCounts`) that the
topology aggregator and the Prometheus sink count.
"""

from __future__ import annotations

import struct
import time
from typing import Callable, Generic, Iterator, TypeVar

from deetune import records
from deetune.libbpf import num_possible_cpus
from deetune.events import format_address

_L = records.lib

#: Latency bucket bounds (ns, ascending): 45 a decade from 1 µs to 100 s, so that no bucket is
#: more than 8.4 % wider than the one below (p50/p90/p99 from them within a few percent), and
#: the round values of the coarser histograms (Prometheus', the store's) are bounds of their own.
_MANTISSAS = (
    1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4, 1.45, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2,
    2.3, 2.4, 2.5, 2.6, 2.7, 2.8, 3.0, 3.2, 3.4, 3.6, 3.8, 4.0, 4.25, 4.5, 4.75, 5.0, 5.25, 5.5,
    5.75, 6.0, 6.5, 7.0, 7.5, 8.0, 8.5, 9.0, 9.5,
)  # fmt: skip
LATENCY_BOUNDS_NS: tuple[int, ...] = tuple(
    int(round(m * 10**e)) for e in range(3, 11) for m in _MANTISSAS
) + (100_000_000_000,)
assert len(LATENCY_BOUNDS_NS) <= _L.DT_LATENCY_BOUNDS
assert len(LATENCY_BOUNDS_NS) < _L.DT_LATENCY_BUCKETS  # the last bucket: above every bound
assert list(LATENCY_BOUNDS_NS) == sorted(set(LATENCY_BOUNDS_NS))


def latency_bounds_image() -> bytes:
    """The bounds as the kernel's ``dt_latency_bounds`` constant (zeros after the last)."""
    return struct.pack(f"<{_L.DT_LATENCY_BOUNDS}Q", *LATENCY_BOUNDS_NS,
                       *([0] * (_L.DT_LATENCY_BOUNDS - len(LATENCY_BOUNDS_NS))))


def latency_octaves_image() -> bytes:
    """The kernel's ``dt_latency_octaves``: for each power of two, how many bounds are below it
    (where its bucket search starts)."""
    below = [sum(1 for b in LATENCY_BOUNDS_NS if b < 1 << k) for k in range(64)]
    return struct.pack("<64H", *below)


#: The kernel steps through at most this many bounds from a power of two (L7_OCTAVE_BOUNDS).
assert max(sum(1 for b in LATENCY_BOUNDS_NS if 1 << k <= b < 2 << k) for k in range(64)) < 32


def bucket_upper_ns(bucket: int) -> int | None:
    """The upper bound of a bucket; None for the last (above every bound)."""
    return LATENCY_BOUNDS_NS[bucket] if bucket < len(LATENCY_BOUNDS_NS) else None


#: MySQL command codes → names (the user-space decoder's, deetune.decoders.mysql).
MYSQL_COMMANDS = {
    0x00: "COM_0x00", 0x01: "QUIT", 0x02: "INIT_DB", 0x03: "QUERY", 0x04: "FIELD_LIST", 0x05: "CREATE_DB",
    0x06: "DROP_DB", 0x07: "REFRESH", 0x08: "SHUTDOWN", 0x09: "STATISTICS", 0x0A: "PROCESS_INFO",
    0x0B: "COM_0x0b", 0x0C: "PROCESS_KILL", 0x0D: "DEBUG", 0x0E: "PING", 0x0F: "COM_0x0f", 0x10: "COM_0x10",
    0x11: "CHANGE_USER", 0x13: "TABLE_DUMP", 0x14: "COM_0x14", 0x15: "REGISTER_SLAVE", 0x16: "STMT_PREPARE",
    0x17: "STMT_EXECUTE", 0x18: "STMT_SEND_LONG_DATA", 0x19: "STMT_CLOSE", 0x1A: "STMT_RESET",
    0x1B: "SET_OPTION", 0x1C: "STMT_FETCH", 0x1D: "COM_0x1d", 0x1F: "RESET_CONNECTION",
    0xFA: "STMT_BULK_EXECUTE",
}  # fmt: skip

PROTOCOLS = {_L.DT_L7_HTTP: "http", _L.DT_L7_REDIS: "redis", _L.DT_L7_MYSQL: "mysql", _L.DT_L7_POSTGRES: "postgres",
             _L.DT_L7_UNKNOWN: "tcp"}
#: Protocols whose exchanges the kernel counts (bpf/l7.bpf.h, in the payload probe's socket calls and in
#: the tls probe's plaintext).  Those of other protocols (HTTP/2, gRPC, the other decoders', plugins')
#: are counted from their decoded exchanges.
KERNEL_COUNTED = frozenset(name for name in PROTOCOLS.values() if name != "tcp")
ROLES = {_L.DT_ROLE_CLIENT: "client", _L.DT_ROLE_SERVER: "server"}

#: What a counted key is (dt_l7_key.flags → the event's ``outcome``).
OUTCOME_OK = "ok"
OUTCOME_ERROR = "error"
#: The connection ended (or the next command came) before a response.
OUTCOME_NO_RESPONSE = "no_response"
#: Answered, but the replies could not be followed: counted without a status.
OUTCOME_STATUS_UNKNOWN = "status_unknown"
#: Not exchanges: chunks the kernel's parser could not follow (the edge's counts are a lower bound).
OUTCOME_UNPARSED = "unparsed"
#: Not exchanges: replies no request asked for (pub/sub messages, a connection older than the agent).
OUTCOME_UNSOLICITED = "unsolicited"
#: Outcomes that are exchanges (the others count something else).
EXCHANGE_OUTCOMES = frozenset({OUTCOME_OK, OUTCOME_ERROR, OUTCOME_NO_RESPONSE, OUTCOME_STATUS_UNKNOWN})


def outcome_of(flags: int) -> str:
    if flags & _L.DT_L7_UNPARSED:
        return OUTCOME_UNPARSED
    if flags & _L.DT_L7_UNSOLICITED:
        return OUTCOME_UNSOLICITED
    if flags & _L.DT_L7_NO_RESPONSE:
        return OUTCOME_NO_RESPONSE
    if flags & _L.DT_L7_STATUS_UNKNOWN:
        return OUTCOME_STATUS_UNKNOWN
    if flags & _L.DT_L7_ERROR:
        return OUTCOME_ERROR
    return OUTCOME_OK


def method_name(protocol: int, raw: bytes) -> str:
    """A key's method as text: HTTP's and PostgreSQL's as they are, Redis commands upper-cased, MySQL
    commands by name."""
    if protocol == _L.DT_L7_MYSQL:
        if raw[:1] == b"\x02":
            return "LOGIN"
        if raw[:1] == b"\x01":
            return MYSQL_COMMANDS.get(raw[1], f"COM_0x{raw[1]:02x}")
        return ""
    text = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return text.upper() if protocol == _L.DT_L7_REDIS else text


def status_of(protocol: int, status: int, outcome: str) -> int | str | None:
    """The status as the decoders report it: HTTP's code, ``"OK"``/``"ERR"`` for the others,
    None without one."""
    if outcome not in (OUTCOME_OK, OUTCOME_ERROR):
        return None
    if protocol == _L.DT_L7_HTTP:
        return status
    return "ERR" if outcome == OUTCOME_ERROR else "OK"


_EDGE, _EDGE_NAMES = records.record_struct("struct dt_edge")
assert _EDGE_NAMES == ("pid", "peer_pid", "cgroup_id", "raddr", "family", "port", "role", "protocol", "_pad"), _EDGE_NAMES
_L7_KEY, _L7_KEY_NAMES = records.record_struct("struct dt_l7_key")
assert _L7_KEY_NAMES[-4:] == ("method", "status", "flags", "_pad"), _L7_KEY_NAMES
_AF_INET6 = 10


class Edge(tuple):
    """The side of an edge a kernel counter was kept by: ``(role, pid, peer_pid, cgroup_id, raddr,
    port, protocol)`` (a tuple: hashable, cheap)."""

    __slots__ = ()

    role = property(lambda self: self[0])
    pid = property(lambda self: self[1])
    peer_pid = property(lambda self: self[2])
    cgroup_id = property(lambda self: self[3])
    raddr = property(lambda self: self[4])
    port = property(lambda self: self[5])
    protocol = property(lambda self: self[6])


def decode_edge(fields: tuple) -> Edge:
    pid, peer_pid, cgroup_id, raddr, family, port, role, protocol, _ = fields
    family = 6 if family == _AF_INET6 else 4
    return Edge((ROLES.get(role, "unknown"), pid, peer_pid, cgroup_id, format_address(family, raddr), port,
                 PROTOCOLS.get(protocol, f"protocol-{protocol}")))


K = TypeVar("K")


class CounterMap(Generic[K]):
    """A per-CPU hash of counters, read as differences since the last read.

    ``decode_key(raw) -> K`` turns a raw key into what the caller wants (cached per key);
    values are ``width`` u64 counters summed over the CPUs.  Keys idle for ``idle_seconds``
    are deleted once the map is more than half full (an edge long gone): a count made between
    the last read and the delete of such a key is the one thing that can be missed.
    """

    def __init__(self, bpf_map, width: int, decode_key: Callable[[bytes], K], *, idle_seconds: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.map = bpf_map
        self.width = width
        self._decode = decode_key
        self._keys: dict[bytes, K] = {}
        self._totals: dict[bytes, tuple[int, ...]] = {}
        self._changed_at: dict[bytes, float] = {}
        self._idle = idle_seconds
        self._clock = clock
        self._value = struct.Struct(f"<{width}Q")
        stride = (bpf_map.value_size + 7) // 8 * 8
        self._stride = stride
        from deetune.libbpf import num_possible_cpus

        self._cpus = num_possible_cpus()
        #: Keys deleted as idle, over the map's life.
        self.deleted = 0

    def __len__(self) -> int:
        return len(self._totals)

    def read(self) -> Iterator[tuple[K, tuple[int, ...]]]:
        """``(key, differences)`` for every key whose counters moved since the last read."""
        keys, values, n = self.map.lookup_all()
        ksize = self.map.key_size
        per_key = self._stride * self._cpus
        unpack = self._value.unpack_from
        width = self.width
        now = self._clock()
        totals = self._totals
        changed_at = self._changed_at
        decoded = self._keys
        out = []
        for i in range(n):
            raw = keys[i * ksize : (i + 1) * ksize]
            base = i * per_key
            if self._cpus == 1:
                total = unpack(values, base)
            else:
                sums = [0] * width
                for cpu in range(self._cpus):
                    for j, v in enumerate(unpack(values, base + cpu * self._stride)):
                        sums[j] += v
                total = tuple(sums)
            before = totals.get(raw)
            if before == total:
                continue
            totals[raw] = total
            changed_at[raw] = now
            key = decoded.get(raw)
            if key is None:
                key = decoded[raw] = self._decode(raw)
            out.append((key, total if before is None else tuple(a - b for a, b in zip(total, before))))
        if len(totals) > self.map.max_entries // 2:
            self._forget_idle(now)
        return iter(out)

    def _forget_idle(self, now: float) -> None:
        for raw, at in list(self._changed_at.items()):
            if now - at >= self._idle:
                self.map.delete(raw)
                del self._changed_at[raw], self._totals[raw]
                self._keys.pop(raw, None)
                self.deleted += 1


def decode_l7_key(raw: bytes) -> tuple[Edge, str, int | str | None, str]:
    """``(edge, method, status, outcome)`` of a dt_l7_key."""
    fields = _L7_KEY.unpack(raw)
    edge = decode_edge(fields[:9])
    method_raw, status, flags = fields[9], fields[10], fields[11]
    protocol = fields[7]
    outcome = outcome_of(flags)
    return edge, method_name(protocol, method_raw), status_of(protocol, status, outcome), outcome


def decode_edge_key(raw: bytes) -> Edge:
    return decode_edge(_EDGE.unpack(raw))


#: The maps of an l7.bpf.h includer's counting, one entry per slot.
SLOT_MAPS = ("dt_l7_slots", "dt_l7_free_slots", "dt_l7_slot_gen", "dt_l7_counts", "dt_l7_latency")


def configure(obj, keys: int = _L.DT_L7_SLOTS) -> None:
    """Before load, an l7.bpf.h includer's object: the latency bounds, and room for ``keys`` keys
    counted at once."""
    obj.set_constant("dt_latency_bounds", latency_bounds_image())
    obj.set_constant("dt_latency_bound_count", len(LATENCY_BOUNDS_NS))
    obj.set_constant("dt_latency_octaves", latency_octaves_image())
    for name in SLOT_MAPS:
        obj.maps[name].max_entries = keys


class L7Counters:
    """The exchanges an ``l7.bpf.h`` includer counts in the kernel, read as differences since the
    last read.

    Each dt_l7_key (edge side, method, status, flags) has a slot (``dt_l7_slots``) in two arrays:
    per-CPU counts (``dt_l7_counts``) and a latency histogram (``dt_l7_latency``, u32 buckets
    that wrap).  :meth:`seed` hands the kernel its free slots before the programs attach.  Keys
    idle for ``idle_seconds`` give their slot back once more than half are taken (an edge long
    gone): their last counts are read after the kernel can no longer find them, so an exchange
    counted between that read and the slot's reuse is the one thing that can be missed.
    """

    def __init__(self, maps, *, idle_seconds: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.slots = maps["dt_l7_slots"]
        self.counts = maps["dt_l7_counts"]
        self.latency = maps["dt_l7_latency"]
        self.generations = maps["dt_l7_slot_gen"]
        self.free = maps["dt_l7_free_slots"]
        self._idle = idle_seconds
        self._clock = clock
        self._counts_value = struct.Struct("<4Q")
        self._histogram = struct.Struct(f"<{_L.DT_LATENCY_BUCKETS}I")
        self._decoded: dict[bytes, tuple] = {}
        self._slot_of: dict[bytes, int] = {}
        self._totals: dict[int, tuple[int, ...]] = {}
        self._histograms: dict[int, tuple[int, ...]] = {}
        self._changed_at: dict[int, float] = {}
        #: Keys whose slots were given back as idle, over the counters' life.
        self.deleted = 0

    def seed(self) -> None:
        """Every slot free (before the programs that count attach)."""
        for slot in range(self.slots.max_entries):
            self.free.push(struct.pack("<I", slot))

    def _counts_of(self, slot: int) -> tuple[int, ...]:
        sums = [0, 0, 0, 0]
        for value in self.counts.lookup(struct.pack("<I", slot)) or ():
            for i, v in enumerate(self._counts_value.unpack_from(value)):
                sums[i] += v
        return tuple(sums)

    def _histogram_of(self, slot: int) -> tuple[int, ...]:
        raw = self.latency.lookup(struct.pack("<I", slot))
        return self._histogram.unpack(raw) if raw else (0,) * _L.DT_LATENCY_BUCKETS

    def _differences(self, raw: bytes, slot: int, now: float, requests: list, latency: list) -> None:
        total = self._counts_of(slot)
        before = self._totals.get(slot, (0, 0, 0, 0))
        if total == before:
            return
        self._totals[slot] = total
        self._changed_at[slot] = now
        key = self._decoded.get(raw)
        if key is None:
            key = self._decoded[raw] = decode_l7_key(raw)
        requests.append((key, tuple(a - b for a, b in zip(total, before))))
        if total[0] == before[0]:
            return  # no exchange since: the histogram did not move
        histogram = self._histogram_of(slot)
        old = self._histograms.get(slot)
        self._histograms[slot] = histogram
        if old is None:
            moved = {b: n for b, n in enumerate(histogram) if n}
        else:
            moved = {b: (n - o) & 0xFFFFFFFF for b, (n, o) in enumerate(zip(histogram, old)) if n != o}
        if moved:
            latency.append((key, moved))

    def read(self) -> tuple[list, list]:
        """``([((edge, method, status, outcome), (count, request bytes, response bytes, latency
        sum)), …], [((edge, method, status, outcome), {bucket: count}), …])``: what moved."""
        keys, values, n = self.slots.lookup_all()
        ksize, vsize = self.slots.key_size, self.slots.value_size
        now = self._clock()
        requests: list = []
        latency: list = []
        for i in range(n):
            raw = keys[i * ksize : (i + 1) * ksize]
            slot = struct.unpack_from("<I", values, i * vsize)[0]
            self._slot_of[raw] = slot
            self._differences(raw, slot, now, requests, latency)
        if len(self._slot_of) > self.slots.max_entries // 2:
            self._free_idle(now, requests, latency)
        return requests, latency

    def _free_idle(self, now: float, requests: list, latency: list) -> None:
        for raw, slot in list(self._slot_of.items()):
            if now - self._changed_at.get(slot, now) < self._idle:
                continue
            # The kernel no longer finds the key, nor (the generation) a socket's memory of it:
            # what it counted until then is read, then the slot starts again from zero.
            self.slots.delete(raw)
            slot_key = struct.pack("<I", slot)
            generation = struct.unpack("<I", self.generations.lookup(slot_key))[0] + 1 & 0xFFFFFFFF
            self.generations.update(slot_key, struct.pack("<I", generation))
            self._differences(raw, slot, now, requests, latency)
            self.counts.update(slot_key, bytes(self.counts.value_size * num_possible_cpus()))
            self.latency.update(slot_key, bytes(self.latency.value_size))
            for table in (self._totals, self._histograms, self._changed_at):
                table.pop(slot, None)
            del self._slot_of[raw]
            self._decoded.pop(raw, None)
            self.free.push(slot_key)
            self.deleted += 1


def count_events(counters: L7Counters) -> list:
    """The exchanges an l7.bpf.h includer's maps counted since the last call (RequestCounts), and
    their latencies (LatencyCounts, per edge side and method)."""
    from deetune.events import LatencyCounts, RequestCounts

    ts, mono = time.time_ns(), time.monotonic_ns()
    out: list = []
    requests, latency = counters.read()
    for (edge, method, status, outcome), (count, req_bytes, resp_bytes, latency_sum) in requests:
        out.append(RequestCounts(
            ts, ts_mono_ns=mono, role=edge.role, pid=edge.pid, peer_pid=edge.peer_pid, cgroup_id=edge.cgroup_id,
            raddr=edge.raddr, port=edge.port, protocol=edge.protocol, method=method, status=status,
            outcome=outcome, count=count, request_bytes=req_bytes, response_bytes=resp_bytes,
            latency_sum_ns=latency_sum,
        ))
    histograms: dict[tuple, dict[int, int]] = {}
    for (edge, method, _status, _outcome), moved in latency:
        buckets = histograms.setdefault((edge, method), {})
        for bucket, count in moved.items():
            buckets[bucket] = buckets.get(bucket, 0) + count
    for (edge, method), buckets in histograms.items():
        out.append(LatencyCounts(
            ts, ts_mono_ns=mono, role=edge.role, pid=edge.pid, peer_pid=edge.peer_pid, cgroup_id=edge.cgroup_id,
            raddr=edge.raddr, port=edge.port, protocol=edge.protocol, method=method, buckets=buckets,
        ))
    # Servers' sides first: a local server's counts tell the topology its clients' sides are not
    # the ones to count, before its listener shows in /proc (deetune.topology.aggregator).
    out.sort(key=lambda event: event.role != "server")
    return out
