"""Topology store: edges, instances and recent exchanges in SQLite, and the queries the API asks.

- :class:`TopologyStore` opens (creating and migrating) a database file, writes
  batches of aggregator events (:meth:`~TopologyStore.write`), expires old data
  (:meth:`~TopologyStore.maintain`) and implements
  :class:`~deetune.topology.model.TopologyQueries`.
- :class:`StoreSink` (``--sink store:PATH``) feeds it from the pipeline without
  slowing it: ``handle()`` only queues; a writer thread commits a batch about
  every second; ``close()`` drains the queue and commits everything.

Layout
    WAL journal, so readers (pooled read-only connections, one per query) never
    wait for the writer.  ``PRAGMA user_version`` is the schema version;
    :data:`MIGRATIONS` are applied in order on open.

Edge windows as running totals
    ``edge_windows`` has one row per edge and aggregator window holding the
    edge's counters (and latency histogram, a cumulative ``le`` column per bucket) summed over
    all its windows up to this one, in (window_start, rowid) order.  A range's
    metrics are then one subtraction per edge, ``total(last window starting
    before until) − total(last window ending by since)``: the same cost for five
    minutes as for a week.  (Summing the range's windows instead costs ~5 µs per
    edge and window: a 15-minute graph of 10,000 edges would take seconds.)
    Windows overlapping [since, until) count whole.  A window arriving out of
    order adds itself to the later totals.  Retention deletes an edge's expired
    windows but keeps the last one as a *floor* at window 0..0, so that the
    totals after it still subtract to the right numbers.  The subtraction,
    the percentiles and the average are computed in the query (see
    :func:`_metric_sql`): an edge crosses into Python as 13 numbers, all the
    edges as one JSON text (see _EDGES_SQL).

Answers (beyond the shapes :class:`~deetune.topology.model.TopologyQueries` fixes)
    Instances are :class:`~deetune.topology.model.Instance` fields plus ``id``,
    ``first_seen`` and ``last_seen``; a node is ``external`` when its service
    never had an instance here.  Edges come sorted by (client, server, protocol,
    port).  ``dependencies`` nodes are ``{"name", "hops", "external"}``, nearest
    first; ``both`` is the union of the downstream and the upstream walks.
    ``errors_only`` keeps edges with failed requests or failed connections.

Exchanges
    The most recent exchanges, at most ``max_exchanges`` and none older than
    the retention.  When both ends run on the host each reports the exchange;
    the client's copy is held ``exchange_hold_seconds`` and dropped if the
    server's copy of it (same connection, method and target) arrives: the same
    rule as the aggregator's, the server side counts.  Then, per edge (client,
    server, protocol, server port) and window of ``exchange_window_seconds``
    (aligned on multiples of it since the epoch), every exchange with an error
    is kept, and of the others the ``max_exchanges_per_edge_window`` most recent
    (in the order they reach the store; None: all): a busy edge keeps a sample
    rather than flooding the table, and the writer thread does not insert (and
    later prune) a row per exchange.  The others are counted, never silently
    lost: ``stats.exchanges_not_kept`` and ``exchange_counts()["not_kept"]``
    (kept in ``meta`` across restarts).  The bound lives in memory for the
    newest two windows seen (up to the clock's): an exchange arriving later than
    that starts a count of its own, and after a restart the current window may
    keep up to twice as many.  :class:`StoreSink` applies the same bound before queueing (per
    side as well: the client's and the server's copies apart), counting what it lets go with the
    store's ``not_kept``.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from typing import Any, Callable, ClassVar, Iterable, Sequence

import attrs
import orjson

from deetune.events import Event, ExchangeEvent
from deetune.recording import storage as recording_storage
from deetune.recording.events import RecordedEvent, RecordingStatusEvent
from deetune.sinks.base import Sink, SinkError
from deetune.topology.model import LATENCY_BUCKETS_NS, EdgeKey, EdgeWindowEvent, InstanceEvent

log = logging.getLogger("deetune.topology.store")

SEC = 1_000_000_000
#: Latency histogram, cumulative like Prometheus's ``le`` buckets: column ``le{i}`` counts the
#: samples up to LATENCY_BUCKETS_NS[i] (the last one: all of them), so readers need no running sum.
BUCKET_COLUMNS: tuple[str, ...] = tuple(f"le{i}" for i in range(len(LATENCY_BUCKETS_NS) + 1))
#: EdgeStats counters in their order in the table (and in EdgeStats.to_json).
STAT_COLUMNS: tuple[str, ...] = (
    "requests", "errors", "latency_sum_ns", "bytes_sent", "bytes_received",
    "connections_opened", "connections_failed", "retransmits", "resets", "decoded", "unparsed", "unsolicited",
)
#: The running totals of edge_windows: the number of windows, the counters, the histogram.
TOTAL_COLUMNS: tuple[str, ...] = ("windows", *STAT_COLUMNS, *BUCKET_COLUMNS)
INSTANCE_FIELDS = ("id", "service", "host", "pid", "comm", "container_id", "container_name", "pod", "namespace")
DIRECTIONS = ("downstream", "upstream", "both")

#: The counters of edge_windows as version 1 made them (later versions add columns).
_COUNTERS_V1 = ("windows", *STAT_COLUMNS[:9], *BUCKET_COLUMNS)
_TOTALS_DDL = ", ".join(f"{c} INTEGER NOT NULL" for c in _COUNTERS_V1)

#: Schema migrations: version N+1 is MIGRATIONS[N] applied to version N.
MIGRATIONS: list[tuple[str, ...]] = [
    # 1: services, instances, edges and their windows.
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE services (name TEXT PRIMARY KEY, first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL)",
        "CREATE TABLE instances (id TEXT PRIMARY KEY, service TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,"
        " comm TEXT NOT NULL, container_id TEXT, container_name TEXT, pod TEXT, namespace TEXT,"
        " first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL)",
        "CREATE INDEX instances_last_seen ON instances (last_seen)",
        "CREATE TABLE edges (id INTEGER PRIMARY KEY AUTOINCREMENT, client TEXT NOT NULL, server TEXT NOT NULL,"
        " protocol TEXT NOT NULL, port INTEGER NOT NULL, first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL,"
        " UNIQUE (client, server, protocol, port))",
        f"CREATE TABLE edge_windows (edge_id INTEGER NOT NULL, window_start INTEGER NOT NULL,"
        f" window_end INTEGER NOT NULL, {_TOTALS_DDL})",
        "CREATE INDEX edges_server ON edges (server)",
        "CREATE INDEX edge_windows_start ON edge_windows (edge_id, window_start)",
        "CREATE INDEX edge_windows_end ON edge_windows (edge_id, window_end)",
    ),
    # 2: recent exchanges.
    (
        "CREATE TABLE exchanges (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, client TEXT, server TEXT,"
        " data TEXT NOT NULL)",
        "CREATE INDEX exchanges_ts ON exchanges (ts)",
        "CREATE INDEX exchanges_client ON exchanges (client, ts)",
        "CREATE INDEX exchanges_server ON exchanges (server, ts)",
    ),
    # 3: recording tasks and their exchanges (deetune.recording.storage).
    recording_storage.MIGRATION,
    # 4: the detail's coverage and what the kernel's counting could not follow (EdgeStats).
    tuple(f"ALTER TABLE edge_windows ADD COLUMN {c} INTEGER NOT NULL DEFAULT 0"
          for c in ("decoded", "unparsed", "unsolicited")),
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The database cannot be used (one-line message)."""


class StoreInUse(StoreError):
    """Another process (agent) writes this store."""


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any.  SQLite rolls back by itself on some errors (a
    full disk, SQLITE_FULL): a ROLLBACK then fails ("no transaction is active"), and that error
    must not replace the one that matters, nor skip what the caller does after."""
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.debug("rollback: %s", exc)


def lock_path(path: str | os.PathLike) -> str:
    """The lock file of a store: one writing process per store."""
    return os.fspath(path) + ".lock"


def _take_lock(path: str) -> int:
    """An exclusive lock on the store's lock file (fd), or StoreInUse naming the holder."""
    import fcntl

    name = lock_path(path)
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise StoreInUse(f"{path} is in use by {who} (another agent?): one agent per store") from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring a database to schema ``target``, one transaction per version; returns the version found."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise StoreError(f"database schema version {found} is newer than this deetune's ({SCHEMA_VERSION})")
    for version in range(found, target):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            if version == 0:
                conn.execute("INSERT INTO meta VALUES ('latency_buckets_ns', ?)", (json.dumps(LATENCY_BUCKETS_NS),))
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
    return found


# -- metrics from running totals ---------------------------------------------------------------
_UPPER = (*LATENCY_BUCKETS_NS, LATENCY_BUCKETS_NS[-1] * 2)
_LOWER = (0, *LATENCY_BUCKETS_NS)
#: The quantiles of an edge, bound as parameters (Python's doubles, not SQLite's reading of a literal).
_QUANTILES = {"q50": 0.5, "q90": 0.9, "q99": 0.99}
#: What each edge row of a query holds after its id, in this order (the keys of EdgeStats.to_json).
METRIC_KEYS: tuple[str, ...] = (
    "requests", "errors", "latency_p50_ns", "latency_p90_ns", "latency_p99_ns", "latency_avg_ns",
    "bytes_sent", "bytes_received", "connections_opened", "connections_failed", "retransmits", "resets",
    "decoded", "unparsed", "unsolicited",
)


def _metric_sql(total: Callable[[str], str]) -> str:
    """The SELECT list of METRIC_KEYS, where ``total(column)`` is the SQL of a column's total over
    the range.  The arithmetic is EdgeStats.quantile_ns's, operation for operation in doubles
    (a binary search as ``bisect_left``'s, then linear inside the bucket), and Python's floor
    division for the average: the same numbers as computing them in Python, which cost half of a
    graph's time (20 values per edge crossing into Python, then the loops)."""
    cumulative = [total(c) for c in BUCKET_COLUMNS]
    count = cumulative[-1]

    def quantile(param: str) -> str:
        rank = f"(:{param} * {count})"

        def leaf(i: int) -> str:
            if i == len(cumulative):  # past the last bucket: impossible, the last one holds every sample
                return "NULL"
            seen = cumulative[i - 1] if i else "0"
            return (f"CAST({_LOWER[i]} + {_UPPER[i] - _LOWER[i]} * (({rank} - {seen}) / ({cumulative[i]} - {seen}))"
                    " AS INTEGER)")

        def search(lo: int, hi: int) -> str:  # bisect_left(cumulative, rank, lo, hi), unrolled
            if lo == hi:
                return leaf(lo)
            mid = (lo + hi) // 2
            return f"CASE WHEN {cumulative[mid]} < {rank} THEN {search(mid + 1, hi)} ELSE {search(lo, mid)} END"

        return f"CASE WHEN {count} THEN {search(0, len(cumulative))} END"

    requests, latency_sum = total("requests"), total("latency_sum_ns")
    python_mod = f"((({latency_sum} % {requests}) + {requests}) % {requests})"  # SQLite's % truncates
    columns = {
        "latency_p50_ns": quantile("q50"), "latency_p90_ns": quantile("q90"), "latency_p99_ns": quantile("q99"),
        "latency_avg_ns": f"CASE WHEN {requests} THEN ({latency_sum} - {python_mod}) / {requests} END",
    }
    return ", ".join(columns.get(key) or total(key) for key in METRIC_KEYS)


_TOTAL_ROW_SQL = ("SELECT 0, " + _metric_sql(lambda c: f"t.{c}")
                  + " FROM (SELECT " + ", ".join(f":{c} AS {c}" for c in TOTAL_COLUMNS) + ") t")


def _edge_json(client: str, server: str, protocol: str, port: int, totals: Sequence[int]) -> dict[str, Any]:
    """``{"client", "server", "protocol", "port", **EdgeStats.to_json()}`` from the STAT and (cumulative)
    BUCKET columns, through the SQL the queries run."""
    conn = sqlite3.connect(":memory:")
    try:
        rows = conn.execute(_TOTAL_ROW_SQL, {**dict(zip(TOTAL_COLUMNS, (1, *totals))), **_QUANTILES}).fetchall()
    finally:
        conn.close()
    return _edges_json(rows, {0: (client, server, protocol, port)})[0]


def _edges_json(rows: Iterable[Sequence[Any]], names: dict[int, tuple[str, str, str, int]]) -> list[dict[str, Any]]:
    """Edge dicts from rows (edge id, METRIC_KEYS…), sorted by (client, server, protocol, port).
    The rows come in that order (an aggregate takes its subquery's rows in their order, though
    SQL does not promise it): checked as they go, sorted only if not."""
    out = []
    append = out.append
    last: tuple = ()
    ordered = True
    for (edge_id, requests, errors, p50, p90, p99, avg, sent, received, opened, failed, retransmits, resets,
         decoded, unparsed, unsolicited) in rows:
        name = names[edge_id]
        if name < last:
            ordered = False
        last = name
        client, server, protocol, port = name
        append({
            "client": client, "server": server, "protocol": protocol, "port": port,
            "requests": requests, "errors": errors,
            "latency_p50_ns": p50, "latency_p90_ns": p90, "latency_p99_ns": p99, "latency_avg_ns": avg,
            "bytes_sent": sent, "bytes_received": received, "connections_opened": opened,
            "connections_failed": failed, "retransmits": retransmits, "resets": resets,
            "decoded": decoded, "unparsed": unparsed, "unsolicited": unsolicited,
        })
    if not ordered:
        out.sort(key=_edge_sort_key)
    return out


def _edge_sort_key(edge: dict[str, Any]) -> tuple:
    return edge["client"], edge["server"], edge["protocol"], edge["port"]


# -- holding client copies of exchanges ---------------------------------------------------------
#: A server's copy waiting for its client's.
_SERVER = "server"

class _ExchangePairs:
    """Drops the client's copy of an exchange whose server also reported it.

    Key: the connection seen from the client, method and target; copies pair
    first-in first-out.  A client copy waits ``hold_ns`` for its server copy; a
    server copy is remembered as long for a client copy arriving after it.

    Copies wait in parallel lists in arrival order (a position each), and each side's table
    maps a key to the position, or the positions in order, of its unmatched copies: no
    container per exchange, so that the writer thread (which shares the GIL with the pipeline)
    leaves the garbage collector little to do.  It cost more than the rest of the pairing.
    """

    def __init__(self, hold_ns: int):
        self.hold_ns = hold_ns
        #: Key → position (or positions, oldest first) of the unmatched copies of each side.
        self._clients: dict[tuple, int | list[int]] = {}
        self._servers: dict[tuple, int | list[int]] = {}
        #: The copies from position ``_base`` on, in arrival order: arrival time, key, and the
        #: event of a client copy or SERVER for a server copy (whose event is not kept alive:
        #: it was stored already), None once matched or expired; those before index ``_head``
        #: have expired.
        self._arrivals: list[int] = []
        self._keys: list[tuple] = []
        self._events: list[ExchangeEvent | str | None] = []
        self._base = 0
        self._head = 0
        self.duplicates = 0

    @property
    def holding(self) -> bool:
        """Copies wait for their expiry."""
        return self._head < len(self._arrivals)

    @property
    def held_count(self) -> int:
        """Client copies held now."""
        return self.held_count_except(set())

    def held_count_except(self, ids: set[int]) -> int:
        """Client copies held now, but for the events whose id() is in ``ids``."""
        return sum(1 for copy in self._events[self._head:]
                   if copy is not None and copy is not _SERVER and id(copy) not in ids)

    def add(self, event: ExchangeEvent, now: int) -> bool:
        """True: store the event now; False: it was held or dropped."""
        return bool(self.add_all((event,), now))

    def add_all(self, events: Iterable[ExchangeEvent], now: int) -> list[ExchangeEvent]:
        """The events to store now, in order (the others were held or dropped)."""
        keep = []
        append = keep.append
        clients, servers = self._clients, self._servers
        arrivals, keys, held = self._arrivals, self._keys, self._events
        base = self._base
        duplicates = 0
        for e in events:
            role = e.role
            if role == "server":
                key = (e.raddr, e.rport, e.laddr, e.lport, e.method, e.target)
                mine, theirs, copy = servers, clients, _SERVER
                append(e)  # the server's copy is the one kept
            elif role == "client":
                key = (e.laddr, e.lport, e.raddr, e.rport, e.method, e.target)
                mine, theirs, copy = clients, servers, e
            else:
                append(e)
                continue
            waiting = theirs.get(key) if theirs else None
            if waiting is not None:  # the other side's oldest unmatched copy: a pair
                if type(waiting) is int:
                    position = waiting
                    del theirs[key]
                else:
                    position = waiting.pop(0)
                    if not waiting:
                        del theirs[key]
                held[position - base] = None  # a held client copy is simply forgotten
                duplicates += 1
                continue
            position = base + len(arrivals)
            arrivals.append(now)
            keys.append(key)
            held.append(copy)
            waiting = mine.get(key)
            if waiting is None:
                mine[key] = position
            elif type(waiting) is int:
                mine[key] = [waiting, position]
            else:
                waiting.append(position)
        self.duplicates += duplicates
        return keep

    def release(self, now: int | None = None) -> list[ExchangeEvent]:
        """Client copies held long enough (all of them with None), in arrival order."""
        ready = []
        arrivals, keys, held = self._arrivals, self._keys, self._events
        head, base, end = self._head, self._base, len(arrivals)
        limit = None if now is None else now - self.hold_ns
        while head < end and (limit is None or arrivals[head] <= limit):
            copy = held[head]
            if copy is not None:
                held[head] = None
                key = keys[head]
                table = self._servers if copy is _SERVER else self._clients
                waiting = table.get(key)
                if waiting == base + head:
                    del table[key]
                elif type(waiting) is list and waiting[0] == base + head:
                    waiting.pop(0)
                    if not waiting:
                        del table[key]
                if copy is not _SERVER:
                    ready.append(copy)
            head += 1
        if head == end or head > 4096 and head * 2 > end:  # drop the expired part of the lists
            del arrivals[:head], keys[:head], held[:head]
            base += head
            head = 0
        self._head, self._base = head, base
        return ready


# -- the store ----------------------------------------------------------------------------------
@attrs.define
class WriteStats:
    windows: int = 0
    #: Windows older than the retention when they arrived (not stored).
    expired_windows: int = 0
    #: Windows that arrived after a later one of the same edge (stored, later totals updated).
    late_windows: int = 0
    instances: int = 0
    #: Exchanges stored (those replaced since, see exchanges_not_kept, not counted).
    exchanges: int = 0
    #: Exchanges of recording tasks stored (those of tasks deleted meanwhile are not).
    recorded: int = 0
    #: Client copies of exchanges dropped because the server reported them too.
    duplicate_exchanges: int = 0
    #: Exchanges not kept (not stored, or stored and then replaced) because their edge had
    #: ``max_exchanges_per_edge_window`` more recent ones without errors in the same window.
    exchanges_not_kept: int = 0
    #: Client copies of exchanges held for pairing when a write failed (or at a close that
    #: failed): forgotten, never written.
    unwritten: int = 0


class TopologyStore:
    """The topology in one SQLite file (see the module doc).  Thread-safe: writes are
    serialised; each query runs on a pooled read-only connection, on one snapshot.  One writing
    store per file: the latest totals of each edge are cached.

    ``retention_seconds``: data older than this is deleted by :meth:`maintain`;
    ``max_exchanges``: exchanges kept at most, the most recent; ``max_exchanges_per_edge_window``
    (default 100, None: no bound) and ``exchange_window_seconds`` (default 10): exchanges without
    errors kept per edge and window, the most recent (see "Exchanges" in the module doc);
    ``exchange_hold_seconds``: how long a client's copy of an exchange waits for the server's;
    ``lock``: take the store's lock file (``PATH.lock``) for as long as it is open, so that a
    second writer (another agent) is refused with :class:`StoreInUse` (False: for a second
    handle in the same process that only reads).

    A write that fails (a full disk, an I/O error) leaves nothing behind: the transaction is
    rolled back and what the store had cached about it (edge ids, latest totals, exchanges
    counted per window, held client copies) is forgotten, so the same batch may be written again
    (:class:`StoreSink` does) and later batches add to the totals on disk."""

    #: A floor's latency sum above this is subtracted from all of its edge's totals (int64 headroom).
    REBASE_ABOVE = 1 << 61

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        retention_seconds: float = 7 * 86400,
        max_exchanges: int = 100_000,
        max_exchanges_per_edge_window: int | None = 100,
        exchange_window_seconds: float = 10.0,
        exchange_hold_seconds: float = 2.0,
        clock: Callable[[], int] = time.time_ns,
        lock: bool = True,
    ):
        self.path = os.fspath(path)
        # Percent-encoded: a path may hold '#', '?' or '%', which a URI would take for its own.
        self._read_uri = "file:" + urllib.parse.quote(os.path.abspath(self.path)) + "?mode=ro"
        self.retention_ns = int(retention_seconds * SEC)
        self.max_exchanges = max_exchanges
        self.clock = clock
        self.stats = WriteStats()
        #: Idle read connections (a pool, not one per thread: the API may start a thread per request).
        self._idle_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._reader_slots = threading.BoundedSemaphore(self.MAX_READERS)
        #: Edge id → (client, server, protocol, port) for readers; ids are never reused.
        self._names: dict[int, tuple[str, str, str, int]] = {}
        self._pairs = _ExchangePairs(int(exchange_hold_seconds * SEC))
        #: (client, server, protocol, port, window index) → ids of the exchanges without errors
        #: kept in that edge's window, oldest first; only for the newest two windows seen.
        self._kept: dict[tuple, collections.deque[int]] = {}
        self._newest_window = -(1 << 63)
        #: Ids are never reused in a session, even when the newest rows were deleted.
        self._next_exchange_id = 1
        #: Exchanges without errors kept per edge and window (the most recent ones); None: all.
        self.max_exchanges_per_edge_window: int | None = None
        self.exchange_window_ns = 0
        self._write_lock = threading.Lock()
        self.bound_exchanges(max_exchanges_per_edge_window, exchange_window_seconds)
        #: EdgeKey fields → edges.id, and edge id → (window_start, totals) of its latest window.
        self._edge_ids: dict[tuple[str, str, str, int], int] = {}
        self._latest: dict[int, tuple[int, list[int]]] = {}
        self._since_prune = 0
        self._released_in_write = 0
        self._closed = False
        #: One writing process per store (two would each add to totals they cached: double counts).
        self._lock_fd: int | None = None
        if lock:
            try:
                self._lock_fd = _take_lock(self.path)
            except StoreInUse:
                raise
            except OSError as exc:
                raise StoreError(f"{lock_path(self.path)}: {exc.strerror}") from None
        try:
            self._writer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            self._writer.execute("PRAGMA journal_mode = WAL")
            # WAL + NORMAL never corrupts; a power cut may lose the last second of telemetry.
            self._writer.execute("PRAGMA synchronous = NORMAL")
            migrate(self._writer)
            self._check_buckets()
        except (sqlite3.Error, StoreError) as exc:
            self._release_lock()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"{self.path}: {exc}") from None

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def bound_exchanges(self, per_edge_window: int | None, window_seconds: float | None = None) -> None:
        """Keep at most ``per_edge_window`` exchanges without errors per edge and window of
        ``window_seconds`` (unchanged when None), the most recent ones; None: keep them all."""
        if per_edge_window is not None and (not isinstance(per_edge_window, int) or per_edge_window < 0):
            raise ValueError(f"exchanges per edge and window must be None or an integer >= 0, got {per_edge_window!r}")
        if window_seconds is not None and not int(window_seconds * SEC) > 0:
            raise ValueError(f"the exchange window must be positive, got {window_seconds!r} s")
        with self._write_lock:
            self.max_exchanges_per_edge_window = per_edge_window
            if window_seconds is not None and int(window_seconds * SEC) != self.exchange_window_ns:
                self.exchange_window_ns = int(window_seconds * SEC)
                self._kept = {}  # counted in other windows
                self._newest_window = -(1 << 63)

    def _check_buckets(self) -> None:
        row = self._writer.execute("SELECT value FROM meta WHERE key = 'latency_buckets_ns'").fetchone()
        if row is None or tuple(json.loads(row[0])) != LATENCY_BUCKETS_NS:
            raise StoreError(f"{self.path}: latency buckets differ from this deetune's; the schema needs a migration")

    def close(self) -> None:
        """Store the exchanges still held, close every connection (idempotent).  Raises
        StoreError when the held exchanges could not be written (the store is closed all the same)."""
        failure = None
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._write([], self.clock(), final=True)
            except (sqlite3.Error, OSError) as exc:
                failure = exc
                self.stats.unwritten += self._pairs.held_count
            finally:
                self._writer.close()
                self._release_lock()
        with self._readers_lock:
            for conn in self._idle_readers:
                conn.close()
            self._idle_readers.clear()
        if failure is not None:
            raise StoreError(f"{self.path}: the exchanges held at close could not be written: {failure}")

    # -- writing -----------------------------------------------------------------------------
    def write(self, events: Iterable[Event], *, not_kept: int = 0) -> None:
        """Store a batch of EdgeWindowEvent, InstanceEvent and ExchangeEvent (others are
        ignored) in one transaction; ``not_kept``: exchanges the caller left out by the same
        bound per edge and window (:class:`StoreSink` does, before queueing), counted with the
        store's own."""
        with self._write_lock:
            if self._closed:
                raise StoreError(f"{self.path}: store is closed")
            now = self.clock()
            batch = [*events]
            self._write(batch, now, not_kept=not_kept)

    @property
    def holding(self) -> bool:
        """Client copies of exchanges wait for their server copy (a later write stores them)."""
        return self._pairs.holding

    def _forget(self, stats: WriteStats, since_prune: int, batch: list[Event]) -> None:
        """After a rollback: what memory says about the store goes back to what is on disk."""
        # The caches may describe rows that were just rolled back (an edge id SQLite gives
        # again to another edge, totals that never reached the disk).
        self._edge_ids.clear()
        self._latest.clear()
        self._kept.clear()
        self._newest_window = -(1 << 63)
        self._names = {}
        # The pairing starts afresh: the batch, written again, pairs its copies again; client
        # copies held from earlier batches, and those released by the failed write, are lost
        # (counted).
        mine = {id(e) for e in batch}
        stats.unwritten += self._pairs.held_count_except(mine) + self._released_in_write
        self._pairs = _ExchangePairs(self._pairs.hold_ns)
        for field in attrs.fields(WriteStats):
            setattr(self.stats, field.name, getattr(stats, field.name))
        self._since_prune = since_prune

    def _write(self, events: list[Event], now: int, final: bool = False, not_kept: int = 0) -> None:
        conn = self._writer
        stats, since_prune = attrs.evolve(self.stats), self._since_prune
        self._released_in_write = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not_kept:
                self._count_not_kept(not_kept)
            instances, windows, exchanges, recorded, statuses = [], [], [], [], []
            for event in events:
                if isinstance(event, ExchangeEvent):  # the most frequent first
                    exchanges.append(event)
                elif isinstance(event, EdgeWindowEvent):
                    windows.append(event)
                elif isinstance(event, InstanceEvent):
                    instances.append(event)
                elif isinstance(event, RecordedEvent):
                    recorded.append(event)
                elif isinstance(event, RecordingStatusEvent):
                    statuses.append(event)
            if recorded or statuses:
                self.stats.recorded += recording_storage.write_events(conn, recorded, statuses)
            services: dict[str, list[int]] = {}
            self._write_instances(instances, services)
            self._write_windows(windows, services, now)
            self._write_exchanges(exchanges, now, final)
            conn.executemany(
                "INSERT INTO services VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                " first_seen = min(first_seen, excluded.first_seen), last_seen = max(last_seen, excluded.last_seen)",
                [(name, first, last) for name, (first, last) in services.items()],
            )
            if self._since_prune > self.max_exchanges // 10:
                self._prune_exchanges()
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            self._forget(stats, since_prune, events)
            raise

    @staticmethod
    def _seen(services: dict[str, list[int]], name: str, first: int, last: int) -> None:
        span = services.get(name)
        if span is None:
            services[name] = [first, last]
        else:
            span[0] = min(span[0], first)
            span[1] = max(span[1], last)

    def _write_instances(self, events: list[InstanceEvent], services: dict[str, list[int]]) -> None:
        rows = []
        for event in events:
            inst = event.instance
            rows.append((inst.id, inst.service, inst.host, inst.pid, inst.comm, inst.container_id, inst.container_name,
                         inst.pod, inst.namespace, event.ts, event.ts))
            self._seen(services, inst.service, event.ts, event.ts)
        self._writer.executemany(
            "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
            " service = excluded.service, host = excluded.host, pid = excluded.pid, comm = excluded.comm,"
            " container_id = excluded.container_id, container_name = excluded.container_name, pod = excluded.pod,"
            " namespace = excluded.namespace, first_seen = min(first_seen, excluded.first_seen),"
            " last_seen = max(last_seen, excluded.last_seen)",
            rows,
        )
        self.stats.instances += len(rows)

    def _write_windows(self, events: list[EdgeWindowEvent], services: dict[str, list[int]], now: int) -> None:
        conn = self._writer
        cutoff = now - self.retention_ns
        rows: list[tuple] = []
        spans: dict[int, list[int]] = {}
        instance_seen: dict[str, int] = {}
        for event in sorted(events, key=lambda e: e.window_start):
            start, end = event.window_start, event.window_start + event.window_ns
            if end <= cutoff:
                self.stats.expired_windows += 1
                continue
            key = event.key
            edge_id = self._edge_id(key, start, end)
            s = event.stats
            delta = (1, s.requests, s.errors, s.latency_sum_ns, s.bytes_sent, s.bytes_received, s.connections_opened,
                     s.connections_failed, s.retransmits, s.resets, s.decoded, s.unparsed, s.unsolicited,
                     *itertools.accumulate(s.latency_buckets))
            if len(delta) != len(TOTAL_COLUMNS):
                raise StoreError(f"edge window with {len(s.latency_buckets)} latency buckets")
            latest = self._latest.get(edge_id) or self._load_latest(edge_id)
            if latest is None or start >= latest[0]:
                totals = [a + b for a, b in zip(latest[1], delta)] if latest else list(delta)
                rows.append((edge_id, start, end, *totals))
                self._latest[edge_id] = (start, totals)
            else:
                # Late: rows queued so far must be in the table before it is read and updated.
                conn.executemany(_INSERT_WINDOW, rows)
                rows = []
                self._insert_late(edge_id, start, end, delta, latest)
            span = spans.get(edge_id)
            spans[edge_id] = [min(span[0], start), max(span[1], end)] if span else [start, end]
            self._seen(services, key.client, start, end)
            self._seen(services, key.server, start, end)
            for instance_id in itertools.chain(event.client_instances, event.server_instances):
                instance_seen[instance_id] = max(end, instance_seen.get(instance_id, end))
            self.stats.windows += 1
        conn.executemany(_INSERT_WINDOW, rows)
        conn.executemany("UPDATE edges SET first_seen = min(first_seen, ?), last_seen = max(last_seen, ?) WHERE id = ?",
                         [(first, last, edge_id) for edge_id, (first, last) in spans.items()])
        conn.executemany("UPDATE instances SET last_seen = max(last_seen, ?) WHERE id = ?",
                         [(last, instance_id) for instance_id, last in instance_seen.items()])

    def _edge_id(self, key: EdgeKey, start: int, end: int) -> int:
        fields = (key.client, key.server, key.protocol, key.port)
        edge_id = self._edge_ids.get(fields)
        if edge_id is None:
            conn = self._writer
            row = conn.execute("SELECT id FROM edges WHERE client = ? AND server = ? AND protocol = ? AND port = ?",
                               fields).fetchone()
            if row is None:
                edge_id = conn.execute("INSERT INTO edges (client, server, protocol, port, first_seen, last_seen)"
                                       " VALUES (?, ?, ?, ?, ?, ?)", (*fields, start, end)).lastrowid
            else:
                edge_id = row[0]
            self._edge_ids[fields] = edge_id
        return edge_id

    def _load_latest(self, edge_id: int) -> tuple[int, list[int]] | None:
        row = self._writer.execute(
            f"SELECT window_start, {', '.join(TOTAL_COLUMNS)} FROM edge_windows WHERE edge_id = ?"
            " ORDER BY window_start DESC, rowid DESC LIMIT 1", (edge_id,)).fetchone()
        if row is None:
            return None
        latest = self._latest[edge_id] = (row[0], list(row[1:]))
        return latest

    def _insert_late(self, edge_id: int, start: int, end: int, delta: tuple[int, ...],
                     latest: tuple[int, list[int]]) -> None:
        conn = self._writer
        base = conn.execute(
            f"SELECT {', '.join(TOTAL_COLUMNS)} FROM edge_windows WHERE edge_id = ? AND window_start <= ?"
            " ORDER BY window_start DESC, rowid DESC LIMIT 1", (edge_id, start)).fetchone()
        totals = [a + b for a, b in zip(base, delta)] if base else list(delta)
        conn.execute(_INSERT_WINDOW, (edge_id, start, end, *totals))
        conn.execute(f"UPDATE edge_windows SET {', '.join(f'{c} = {c} + ?' for c in TOTAL_COLUMNS)}"
                     " WHERE edge_id = ? AND window_start > ?", (*delta, edge_id, start))
        self._latest[edge_id] = (latest[0], [a + b for a, b in zip(latest[1], delta)])
        self.stats.late_windows += 1

    def _write_exchanges(self, events: list[ExchangeEvent], now: int, final: bool) -> None:
        pairs = self._pairs
        duplicates = pairs.duplicates
        keep = pairs.add_all(events, now)
        released = pairs.release(None if final else now)
        self._released_in_write = len(released)
        keep.extend(released)
        self.stats.duplicate_exchanges += pairs.duplicates - duplicates
        if not keep:
            return
        conn = self._writer
        # Ids given here (one writer): the bound below knows which rows it replaces.
        first_id = max(self._next_exchange_id,
                       conn.execute("SELECT coalesce(max(id), 0) + 1 FROM exchanges").fetchone()[0])
        self._next_exchange_id = first_id + len(keep)
        ids = range(first_id, first_id + len(keep))
        replaced: set[int] = set()
        stored_before: list[tuple[int]] = []
        if self.max_exchanges_per_edge_window is not None:
            for old in self._bound(zip(ids, keep), now):
                if old >= first_id:
                    replaced.add(old)
                else:
                    stored_before.append((old,))
        encode = _encode
        conn.executemany(
            "INSERT INTO exchanges (id, ts, client, server, data) VALUES (?, ?, ?, ?, ?)",
            [(i, e.ts, e.client_service, e.server_service, encode(e.to_json()))
             for i, e in zip(ids, keep) if i not in replaced],
        )
        conn.executemany("DELETE FROM exchanges WHERE id = ?", stored_before)
        not_kept = len(replaced) + len(stored_before)
        if not_kept:
            self._count_not_kept(not_kept)
        self.stats.exchanges += len(keep) - not_kept
        self._since_prune += len(keep) - not_kept

    def _count_not_kept(self, count: int) -> None:
        """In the write's transaction: ``count`` more exchanges not kept (kept in ``meta``)."""
        self._writer.execute("INSERT INTO meta VALUES ('exchanges_not_kept', ?) ON CONFLICT (key) DO UPDATE SET"
                             " value = CAST(value AS INTEGER) + CAST(excluded.value AS INTEGER)", (str(count),))
        self.stats.exchanges_not_kept += count

    def _bound(self, exchanges: Iterable[tuple[int, ExchangeEvent]], now: int) -> list[int]:
        """Count (id, exchange) in their edge's window; returns the ids past the bound (the
        oldest of their edge and window), of these exchanges or of earlier ones."""
        limit, window_ns, kept = self.max_exchanges_per_edge_window, self.exchange_window_ns, self._kept
        newest, current = self._newest_window, now // window_ns
        over = []
        for exchange_id, e in exchanges:
            if e.error:
                continue
            window = e.ts // window_ns
            if newest < window <= current:  # (a time ahead of the clock moves nothing)
                newest = self._newest_window = window
                # Older windows are done: forget them (a straggler starts a count of its own).
                for key in [k for k in kept if k[4] < window - 1]:
                    del kept[key]
            key = (e.client_service, e.server_service, e.protocol, e.lport if e.role == "server" else e.rport,
                   window)
            ids = kept.get(key)
            if ids is None:
                kept[key] = ids = collections.deque()
            ids.append(exchange_id)
            if len(ids) > limit:
                over.append(ids.popleft())
                while len(ids) > limit:  # the limit was lowered
                    over.append(ids.popleft())
        return over

    def _prune_exchanges(self) -> None:
        # ids grow with insertion: the newest max_exchanges rows are the highest ids.
        self._writer.execute("DELETE FROM exchanges WHERE id <= (SELECT max(id) FROM exchanges) - ?",
                             (self.max_exchanges,))
        self._since_prune = 0

    # -- retention -----------------------------------------------------------------------------
    def maintain(self) -> None:
        """Delete what is older than the retention (run it periodically: it costs an indexed
        lookup per edge).  An edge's expired windows fold into its floor row."""
        with self._write_lock:
            now = self.clock()
            cutoff = now - self.retention_ns
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                gone = [row[0] for row in conn.execute("SELECT id FROM edges WHERE last_seen <= ?", (cutoff,))]
                conn.executemany("DELETE FROM edge_windows WHERE edge_id = ?", [(i,) for i in gone])
                conn.executemany("DELETE FROM edges WHERE id = ?", [(i,) for i in gone])
                old = [row[0] for row in conn.execute("SELECT id FROM edges WHERE first_seen <= ?", (cutoff,))]
                for edge_id in old:
                    self._fold_expired(edge_id, cutoff)
                conn.execute("DELETE FROM instances WHERE last_seen <= ?", (cutoff,))
                conn.execute("DELETE FROM services WHERE last_seen <= ?", (cutoff,))
                conn.execute("DELETE FROM exchanges WHERE ts < ?", (cutoff,))
                self._prune_exchanges()
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                self._edge_ids.clear()
                self._latest.clear()
                self._names = {}
                raise
            if gone:
                gone_ids = set(gone)
                self._edge_ids = {k: v for k, v in self._edge_ids.items() if v not in gone_ids}
                for edge_id in gone_ids:
                    self._latest.pop(edge_id, None)

    def _fold_expired(self, edge_id: int, cutoff: int) -> None:
        conn = self._writer
        newest = conn.execute(
            f"SELECT rowid, {', '.join(TOTAL_COLUMNS)} FROM edge_windows WHERE edge_id = ? AND window_end > 0"
            " AND window_end <= ? ORDER BY window_end DESC, rowid DESC LIMIT 1", (edge_id, cutoff)).fetchone()
        if newest is None:
            return
        conn.execute("DELETE FROM edge_windows WHERE edge_id = ? AND window_end <= ? AND rowid != ?",
                     (edge_id, cutoff, newest[0]))
        conn.execute("UPDATE edge_windows SET window_start = 0, window_end = 0 WHERE rowid = ?", (newest[0],))
        floor = newest[1:]
        if floor[TOTAL_COLUMNS.index("latency_sum_ns")] > self.REBASE_ABOVE:
            conn.execute(f"UPDATE edge_windows SET {', '.join(f'{c} = {c} - ?' for c in TOTAL_COLUMNS)}"
                         " WHERE edge_id = ?", (*floor, edge_id))
            self._latest.pop(edge_id, None)
        # The floor is older than any window: the cached latest (its start) stays right.

    def transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work(connection)`` in a write transaction of its own (between the sink's
        batches); returns what it returns.  For rare writes outside the pipeline (the API's)."""
        with self._write_lock:
            if self._closed:
                raise StoreError(f"{self.path}: store is closed")
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
            return result

    def read(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work(connection)`` on a read-only snapshot (pooled connection)."""
        return self._read(work)

    # -- reading -------------------------------------------------------------------------------
    #: Idle read connections kept open; more may be open during a burst of concurrent queries.
    MAX_IDLE_READERS = 4

    #: Read connections open at once at most: a burst of queries waits for one rather than
    #: opening a connection (three descriptors: database, WAL, shared memory) each.
    MAX_READERS = 8

    def _read(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run several SELECTs on one snapshot, on a pooled read-only connection."""
        if not self._reader_slots.acquire(timeout=30):
            raise StoreError(f"{self.path}: every read connection is busy")
        try:
            return self._read_in_slot(work)
        finally:
            self._reader_slots.release()

    def _read_in_slot(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        with self._readers_lock:
            if self._closed:
                raise StoreError(f"{self.path}: store is closed")
            conn = self._idle_readers.pop() if self._idle_readers else None
        if conn is None:
            conn = sqlite3.connect(self._read_uri, uri=True, isolation_level=None, check_same_thread=False,
                                   timeout=10)
        try:
            conn.execute("BEGIN")
            try:
                return work(conn)
            finally:
                conn.execute("COMMIT")
        finally:
            with self._readers_lock:
                keep = not self._closed and len(self._idle_readers) < self.MAX_IDLE_READERS
                if keep:
                    self._idle_readers.append(conn)
            if not keep:
                conn.close()

    def _edges(self, conn: sqlite3.Connection, since: int, until: int, *, service: str | None = None,
               clients: Iterable[str] | None = None, servers: Iterable[str] | None = None,
               errors_only: bool = False) -> list[dict]:
        """Edges with windows in the range, ordered; only those of ``service``, from ``clients``,
        to ``servers``, with errors: filters run in SQL, so only the edges returned cost a conversion."""
        if since >= until:
            return []
        where = ["e.first_seen < :until", "e.last_seen > :since"]
        params: dict[str, Any] = {"since": since, "until": until}
        if service is not None:
            where.append("(e.client = :service OR e.server = :service)")
            params["service"] = service
        for end, names in (("client", clients), ("server", servers)):
            if names is not None:
                where.append(f"e.{end} IN (SELECT value FROM json_each(:{end}s))")
                params[f"{end}s"] = json.dumps(sorted(names))
        if errors_only:
            # The first test needs only this edge's last window (totals never decrease): the
            # other edges cost no lookup of their window at :since.
            where.append("(a.errors > 0 OR a.connections_failed > 0)")
            where.append("(a.errors > coalesce(b.errors, 0)"
                         " OR a.connections_failed > coalesce(b.connections_failed, 0))")
        params.update(_QUANTILES)
        values = orjson.loads(conn.execute(_EDGES_SQL.format(where=" AND ".join(where)), params).fetchone()[0])
        names = self._edge_names(conn, values[::_EDGE_COLUMNS])
        return _edges_json(zip(*[iter(values)] * _EDGE_COLUMNS), names)

    def _edge_names(self, conn: sqlite3.Connection, ids: list[int]) -> dict[int, tuple[str, str, str, int]]:
        """Edge id → (client, server, protocol, port), cached: decoding three strings per edge per
        query is a tenth of a graph's cost.  Reloaded whole when a new id shows up (replaced, never
        changed in place, so concurrent readers need no lock)."""
        names = self._names
        if not names.keys() >= set(ids):
            names = self._names = {
                row[0]: row[1:] for row in conn.execute("SELECT id, client, server, protocol, port FROM edges")}
        return names

    def _instances(self, conn: sqlite3.Connection, since: int, until: int) -> dict[str, list[dict[str, Any]]]:
        """Service → its instances seen in the range, by host and pid (one JSON text, as _EDGES_SQL).
        Not by id: "host:32727" sorts before "host:442" as text."""
        found: dict[str, list[dict[str, Any]]] = {}
        instances = orjson.loads(conn.execute(_INSTANCES_SQL, (until, since)).fetchone()[0])
        instances.sort(key=lambda data: (data["host"], data["pid"], data["id"]))
        for data in instances:
            found.setdefault(data["service"], []).append(data)
        return found

    @staticmethod
    def _local_services(conn: sqlite3.Connection) -> set[str]:
        """Services with an instance on a watched host (the others are external)."""
        return set(orjson.loads(conn.execute("SELECT json_group_array(DISTINCT service) FROM instances").fetchone()[0]))

    def graph(self, since: int, until: int, service: str | None = None) -> dict[str, Any]:
        def work(conn: sqlite3.Connection) -> dict[str, Any]:
            edges = self._edges(conn, since, until, service=service)
            instances = self._instances(conn, since, until)
            local = self._local_services(conn)
            names = {e["client"] for e in edges} | {e["server"] for e in edges}
            if service is None:
                names |= instances.keys()
            elif edges or service in instances:
                names.add(service)
            nodes = [{"name": n, "instances": instances.get(n, []), "external": n not in local} for n in sorted(names)]
            return {"nodes": nodes, "edges": edges, "since": since, "until": until}

        return self._read(work)

    def services(self, since: int, until: int) -> list[dict[str, Any]]:
        def work(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            edges = self._edges(conn, since, until)
            instances = self._instances(conn, since, until)
            local = self._local_services(conn)
            requests_in: collections.Counter[str] = collections.Counter()
            requests_out: collections.Counter[str] = collections.Counter()
            for edge in edges:
                requests_out[edge["client"]] += edge["requests"]
                requests_in[edge["server"]] += edge["requests"]
            names = set(requests_in) | set(requests_out) | instances.keys()
            seen = {row[0]: row[1:] for row in conn.execute("SELECT name, first_seen, last_seen FROM services")}
            return [
                {"name": name, "external": name not in local, "instances": instances.get(name, []),
                 "first_seen": seen.get(name, (None, None))[0], "last_seen": seen.get(name, (None, None))[1],
                 "requests_in": requests_in[name], "requests_out": requests_out[name]}
                for name in sorted(names)
            ]

        return self._read(work)

    def dependencies(self, service: str, depth: int, direction: str, since: int, until: int) -> dict[str, Any]:
        """Breadth-first from ``service``.  ``both`` is the union of the downstream and
        the upstream walks (callers' callers and callees' callees, not callers of callees)."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}")

        walks = [("client", "server"), ("server", "client")]
        if direction == "downstream":
            walks = walks[:1]
        elif direction == "upstream":
            walks = walks[1:]
        hops: dict[str, int] = {service: 0}
        used: dict[tuple, dict[str, Any]] = {}

        def work(conn: sqlite3.Connection) -> set[str]:
            # One query per hop for the frontier's edges: a neighbourhood costs what it holds,
            # not what the whole graph does.
            for near, far in walks:
                distance = {service: 0}
                frontier = {service}
                for hop in range(1, depth + 1):
                    if not frontier:
                        break
                    following = set()
                    for edge in self._edges(conn, since, until, **{f"{near}s": frontier}):
                        used[_edge_sort_key(edge)] = edge
                        other = edge[far]
                        if other not in distance:
                            distance[other] = hop
                            following.add(other)
                    frontier = following
                for name, hop in distance.items():
                    hops[name] = min(hop, hops.get(name, hop))
            return self._local_services(conn)

        local = self._read(work)
        nodes = [{"name": n, "hops": h, "external": n not in local}
                 for n, h in sorted(hops.items(), key=lambda item: (item[1], item[0]))]
        return {"service": service, "depth": depth, "direction": direction, "nodes": nodes,
                "edges": [used[k] for k in sorted(used)]}

    def edges(self, since: int, until: int, *, errors_only: bool = False,
              service: str | None = None) -> list[dict[str, Any]]:
        """``errors_only``: edges with failed requests or failed connections."""
        return self._read(lambda conn: self._edges(conn, since, until, service=service, errors_only=errors_only))

    def exchanges(self, *, service: str | None = None, limit: int = 100,
                  since: int | None = None) -> list[dict[str, Any]]:
        """Most recent first."""
        since = since if since is not None else -(1 << 63)

        def work(conn: sqlite3.Connection) -> list[tuple]:
            if service is None:
                return conn.execute("SELECT id, ts, client, server, data FROM exchanges WHERE ts >= ?"
                                    " ORDER BY ts DESC, id DESC LIMIT ?", (since, limit)).fetchall()
            # One indexed walk per end, merged: an OR would read all the service's rows to sort them.
            sides = [conn.execute(f"SELECT id, ts, client, server, data FROM exchanges WHERE {end} = ? AND ts >= ?"
                                  " ORDER BY ts DESC, id DESC LIMIT ?", (service, since, limit)).fetchall()
                     for end in ("client", "server")]
            merged, ids = [], set()
            for row in heapq.merge(*sides, key=lambda r: (r[1], r[0]), reverse=True):
                if row[0] not in ids:
                    ids.add(row[0])
                    merged.append(row)
            return merged[:limit]

        return [{**json.loads(data), "client": client, "server": server}
                for _, _, client, server, data in self._read(work)]

    def exchange_counts(self) -> dict[str, int]:
        """``{"stored": exchanges in the store now, "not_kept": exchanges not kept (never stored, or
        replaced) because of ``max_exchanges_per_edge_window``, since the database was created}``."""

        def work(conn: sqlite3.Connection) -> dict[str, int]:
            stored = conn.execute("SELECT count(*) FROM exchanges").fetchone()[0]
            row = conn.execute("SELECT value FROM meta WHERE key = 'exchanges_not_kept'").fetchone()
            return {"stored": stored, "not_kept": int(row[0]) if row else 0}

        return self._read(work)


_INSERT_WINDOW = (f"INSERT INTO edge_windows (edge_id, window_start, window_end, {', '.join(TOTAL_COLUMNS)})"
                  f" VALUES ({', '.join('?' * (3 + len(TOTAL_COLUMNS)))})")
# For each edge: totals of its last window starting before :until minus those of its last
# window ending by :since (none: zero), as edge id, METRIC_KEYS…; only edges with a window
# overlapping the range.  Terms of ``{where}`` naming only ``e`` and ``a`` are tested before ``b``
# is looked up.  All the edges come as one flat JSON array of numbers, in one step of the
# statement, for less CPU time than 10,000 rows: the sqlite3 module releases the GIL around
# every step, and each time the query's thread must take it back from a busy thread (the
# pipeline), which can take up to the switch interval (5 ms).  Flat: a list per edge would
# live through the conversion and feed the garbage collector's oldest generation.
_EDGE_COLUMNS = 1 + len(METRIC_KEYS)
_EDGES_SQL = (
    "SELECT '[' || coalesce(group_concat(substr(edge, 2, length(edge) - 2), ','), '') || ']'"
    " FROM (SELECT json_array(e.id, " + _metric_sql(lambda c: f"(a.{c} - coalesce(b.{c}, 0))") + ") AS edge"
    " FROM edges e"
    " JOIN edge_windows a ON a.rowid = (SELECT rowid FROM edge_windows WHERE edge_id = e.id"
    " AND window_start < :until ORDER BY window_start DESC, rowid DESC LIMIT 1)"
    " LEFT JOIN edge_windows b ON b.rowid = (SELECT rowid FROM edge_windows WHERE edge_id = e.id"
    " AND window_end <= :since ORDER BY window_end DESC, rowid DESC LIMIT 1)"
    " WHERE {where} AND a.windows > coalesce(b.windows, 0)"
    " ORDER BY e.client, e.server, e.protocol, e.port)"  # the UNIQUE index's order: no sort
)
_INSTANCES_SQL = ("SELECT json_group_array(json_object("
                  + ", ".join(f"'{c}', {c}" for c in (*INSTANCE_FIELDS, "first_seen", "last_seen"))
                  + ")) FROM instances WHERE first_seen < ? AND last_seen >= ?")
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def _encode(data: dict[str, Any]) -> str:
    """An exchange's JSON: orjson (a quarter of json's cost), json for what orjson refuses
    (integers beyond 64 bits, strings that are not UTF-8)."""
    try:
        return orjson.dumps(data, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError included
        return _JSON.encode(data)


# -- the sink -----------------------------------------------------------------------------------
#: A StoreSink option left to the store.
_STORE_DEFAULT: Any = object()


@attrs.define
class StoreSinkStats:
    queued: int = 0
    #: Events not queued because the queue was full (the writer fell behind, or the store failed).
    dropped: int = 0
    written: int = 0
    batches: int = 0
    #: Commits that failed (a full disk, an I/O error): their batch is written again later.
    failed_batches: int = 0
    #: Events never written: still failing at close (the batch, and what was queued behind it).
    lost: int = 0
    #: Exchanges without errors left out before queueing: their edge and window (and side) had
    #: ``max_exchanges_per_edge_window`` more recent ones waiting (counted by the store too, as
    #: not kept: the store would not have kept them either).
    not_kept: int = 0

    @property
    def not_persisted(self) -> int:
        """Events handed to the sink that the store does not have."""
        return self.dropped + self.lost


#: What a full queue drops first (see StoreSink.handle).
_DETAIL = (ExchangeEvent,)


def _event_ts(event: Event) -> int:
    return event.ts


class StoreSink(Sink):
    """Queues topology events for a writer thread committing them to a :class:`TopologyStore`."""

    name: ClassVar[str] = "store"
    description: ClassVar[str] = "service topology (edges, instances, recent exchanges) into SQLite; store:PATH"
    #: The events stored; the others are ignored.
    STORED = (EdgeWindowEvent, InstanceEvent, ExchangeEvent, RecordedEvent, RecordingStatusEvent)

    def __init__(
        self,
        store: TopologyStore | str | os.PathLike,
        *,
        max_queue: int = 20_000,
        batch_size: int = 2_000,
        interval: float = 1.0,
        maintenance_interval: float = 60.0,
        retry_interval: float = 1.0,
        max_exchanges_per_edge_window: int | None | object = _STORE_DEFAULT,
        exchange_window_seconds: float | object = _STORE_DEFAULT,
    ):
        """``max_queue``: events queued at most (exchanges: half of it); ``batch_size``: events
        per transaction, taken off the queue by the writer (a batch being written is memory beside
        the queue: 10,000 exchanges took 5 MB more); ``max_exchanges_per_edge_window``,
        ``exchange_window_seconds``: see :class:`TopologyStore` (left out: the store's own
        settings, 100 per 10 s by default).

        The bound per edge and window applies here already, before an exchange without an error
        is queued: of those of an edge (and side: client or server copies) and window, only the
        most recent ``max_exchanges_per_edge_window`` wait for the writer, the older ones are let
        go and counted (``stats.not_kept``, and the store's ``not_kept``).  A flood on one edge
        (a client pipelining requests nobody answers: 10,000 exchanges a second in
        bench/soak.py) then neither fills the queue, pushing out other edges' exchanges and
        errors, nor holds megabytes and the writer's time for rows the store would not keep."""
        self.store = store if isinstance(store, TopologyStore) else TopologyStore(store)
        if max_exchanges_per_edge_window is not _STORE_DEFAULT or exchange_window_seconds is not _STORE_DEFAULT:
            self.store.bound_exchanges(
                self.store.max_exchanges_per_edge_window if max_exchanges_per_edge_window is _STORE_DEFAULT
                else max_exchanges_per_edge_window,  # type: ignore[arg-type]
                None if exchange_window_seconds is _STORE_DEFAULT else exchange_window_seconds)  # type: ignore[arg-type]
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.interval = interval
        self.maintenance_interval = maintenance_interval
        #: A failed batch is written again this often (meanwhile one more batch may queue; the
        #: events beyond are dropped, counted).
        self.retry_interval = retry_interval
        self.attempts_at_stop = 3
        self.stats = StoreSinkStats()
        #: The batch whose commit failed, written again before anything else; the last error.
        self._retry: list[Event] | None = None
        self.last_error: str | None = None
        # deque append/popleft are atomic: handle() takes no lock for the queue.
        self._queue: collections.deque[Event] = collections.deque()
        #: Exchanges without errors waiting for the writer, the most recent of each
        #: (client, server, protocol, server port, role, window); the writer takes them all at
        #: once (under ``_recent_lock``), into ``_taken``; ``_buffered`` counts them.
        self._recent: dict[tuple, collections.deque[ExchangeEvent]] = {}
        self._recent_lock = threading.Lock()
        self._buffered = 0
        self._taken: list[ExchangeEvent] = []
        #: stats.not_kept as far as the store counted it (the writer's).
        self._not_kept_written = 0
        self._wake = threading.Event()
        self._done = threading.Condition()
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="deetune-store-writer", daemon=True)
        self._thread.start()

    @classmethod
    def from_arg(cls, arg: str | None) -> "StoreSink":
        if not arg:
            raise SinkError("store sink needs a database path: --sink store:PATH")
        try:
            return cls(arg)
        except StoreError as exc:
            raise SinkError(str(exc)) from None

    def handle(self, event: Event) -> None:
        if not isinstance(event, self.STORED):
            return
        queue = self._queue
        # While the store fails, one batch waits behind the failed one, no more: a full disk may
        # last hours, and queued events are memory.  Detail (exchanges) may fill half the queue:
        # a flood of it must not push out the edges' counts, which are few and exact.
        if self.last_error is not None:
            limit = self.batch_size
        elif isinstance(event, _DETAIL):
            if not event.error and self.store.max_exchanges_per_edge_window is not None and not self._stopping:
                self._handle_recent(event)  # type: ignore[arg-type]
                return
            limit = self.max_queue // 2
        else:
            limit = self.max_queue
        if len(queue) + self._buffered >= limit or self._stopping:
            self._drop(event)
            return
        queue.append(event)
        self.stats.queued += 1
        if len(queue) >= self.batch_size:
            self._wake.set()

    def _drop(self, event: Event) -> None:
        self.stats.dropped += 1
        on_drop = getattr(event, "on_drop", None)
        if on_drop is not None:
            on_drop(event)  # a recorded exchange: its task counts it as dropped

    def _handle_recent(self, event: ExchangeEvent) -> None:
        """An exchange without an error: it waits among the most recent of its edge, side and
        window (the bound per edge and window, see __init__); the oldest waiting goes, counted."""
        store = self.store
        limit = store.max_exchanges_per_edge_window
        stats = self.stats
        if not limit:  # 0: errors only
            stats.queued += 1
            stats.not_kept += 1
            return
        role = event.role
        key = (event.client_service, event.server_service, event.protocol,
               event.lport if role == "server" else event.rport, role, event.ts // store.exchange_window_ns)
        with self._recent_lock:
            recent = self._recent.get(key)
            if recent is not None and len(recent) >= limit:
                stats.not_kept += 1  # the oldest waiting, pushed out by this one
            elif len(self._queue) + self._buffered >= self.max_queue // 2:
                self._drop(event)  # exchanges fill half the queue at most
                return
            else:
                if recent is None:
                    recent = self._recent[key] = collections.deque(maxlen=limit)
                self._buffered += 1
            recent.append(event)
            stats.queued += 1

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until everything queued so far is committed (or let go by the bound, counted)."""
        target, not_kept = self.stats.queued, self.stats.not_kept
        self._wake.set()
        with self._done:
            self._done.wait_for(lambda: (self.stats.written + self._not_kept_written >= target
                                         and self._not_kept_written >= not_kept)
                                or not self._thread.is_alive(), timeout)

    def close(self) -> None:
        """Commit everything queued, the held exchanges too, and close the store (a store that
        still fails is tried ``attempts_at_stop`` times, ``retry_interval`` apart; the rest is
        counted as lost)."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        self._thread.join()
        try:
            self.store.close()
        except StoreError as exc:
            self.last_error = " ".join(str(exc).split())
            log.error("topology store: %s", exc)

    def _run(self) -> None:
        next_maintenance = time.monotonic()
        attempts_at_stop = 0
        while True:
            self._wake.wait(self.retry_interval if self._retry is not None else self.interval)
            self._wake.clear()
            stopping = self._stopping
            if not self._taken and self._buffered:
                self._take_recent()  # once a round: what waits is batched, not trickled
            committed = False
            while self._retry is not None or self._queue or self._taken:
                if not self._commit_next():
                    break  # failing: try again after retry_interval
                committed = True
            healthy = self._retry is None
            if healthy and not committed and self.stats.not_kept != self._not_kept_written:
                self._commit([])  # the count of the exchanges let go (a commit carries it)
            if healthy and time.monotonic() >= next_maintenance and not stopping:
                next_maintenance = time.monotonic() + self.maintenance_interval
                try:
                    self.store.maintain()
                except Exception:
                    log.exception("topology store maintenance failed")
            elif healthy and not stopping and self.store.holding:
                self._commit([])  # releases exchanges held past their time
            if stopping:
                if healthy and not self._queue and not self._pending_detail():
                    return
                attempts_at_stop += 1
                if attempts_at_stop >= self.attempts_at_stop:
                    self._give_up()
                    return

    def _pending_detail(self) -> bool:
        """Exchanges without errors wait, or a count of those let go is not in the store yet."""
        return bool(self._buffered or self._taken or self.stats.not_kept != self._not_kept_written)

    def _take_recent(self) -> None:
        """The exchanges waiting in ``_recent``, oldest first, into ``_taken`` (the writer's)."""
        with self._recent_lock:
            recent, self._recent = self._recent, {}
            self._buffered = 0
        taken = [event for waiting in recent.values() for event in waiting]
        taken.sort(key=_event_ts)
        self._taken = taken

    def _commit_next(self) -> bool:
        """Commit the batch that failed last, else the next batch of the queue and of the
        exchanges taken from ``_recent``; False if it failed."""
        batch = self._retry
        if batch is None:
            queue = self._queue
            batch = [queue.popleft() for _ in range(min(len(queue), self.batch_size))]
            room = self.batch_size - len(batch)
            if room > 0 and self._taken:
                batch.extend(self._taken[:room])
                del self._taken[:room]
        return self._commit(batch)

    def _commit(self, batch: list[Event]) -> bool:
        not_kept = self.stats.not_kept - self._not_kept_written
        try:
            if not_kept:
                self.store.write(batch, not_kept=not_kept)
            else:
                self.store.write(batch)
        except Exception as exc:
            self.stats.failed_batches += 1
            self._retry = batch
            message = " ".join(str(exc).split()) or type(exc).__name__
            if self.last_error is None:
                log.error("topology store: a batch of %d events could not be written (%s); writing it again "
                          "every %g s, meanwhile queueing at most %d events", len(batch), message,
                          self.retry_interval, self.max_queue)
            self.last_error = message
            return False
        if self.last_error is not None:
            log.warning("topology store: writing again after %d failed commits", self.stats.failed_batches)
            self.last_error = None
        self._retry = None
        if batch:
            self.stats.batches += 1
        with self._done:
            self._not_kept_written += not_kept
            self.stats.written += len(batch)
            self._done.notify_all()
        return True

    def _give_up(self) -> None:
        """At stop, the store still failing: what is left is lost, counted."""
        left = list(self._retry or ())
        self._retry = None
        while self._queue:
            left.append(self._queue.popleft())
        self._take_recent()
        left.extend(self._taken)
        self._taken = []
        self.stats.lost += len(left)
        log.error("topology store: %d events could not be written (%s)", len(left), self.last_error)
        for event in left:
            on_drop = getattr(event, "on_drop", None)
            if on_drop is not None:
                on_drop(event)
        with self._done:
            self._done.notify_all()

    def health(self) -> dict[str, Any]:
        """For /healthz: ``{"status": "ok" | "degraded", "store": {…}}``; degraded while writes
        fail and once anything was not persisted."""
        stats, store_stats = self.stats, self.store.stats
        failing = self.last_error is not None
        store = {
            "writing": not failing, "failed_commits": stats.failed_batches,
            "pending_events": len(self._queue) + len(self._retry or ()) + self._buffered + len(self._taken),
            "dropped_events": stats.dropped, "lost_events": stats.lost, "unwritten_exchanges": store_stats.unwritten,
            "last_error": self.last_error,
        }
        degraded = failing or stats.not_persisted or store_stats.unwritten
        return {"status": "degraded" if degraded else "ok", "store": store}

    def summary(self) -> str | None:
        """What was not persisted, for the agent's stop line (None: everything was)."""
        stats = self.stats
        unwritten = self.store.stats.unwritten
        if not (stats.not_persisted or stats.failed_batches or unwritten):
            return None
        parts = [f"{stats.failed_batches} failed commits"]
        if stats.dropped:
            parts.append(f"{stats.dropped} events dropped (queue full or store failing)")
        if stats.lost:
            parts.append(f"{stats.lost} events never written")
        if unwritten:
            parts.append(f"{unwritten} exchanges lost")
        if self.last_error:
            parts.append(f"last error: {self.last_error}")
        return "store: " + ", ".join(parts)

    @property
    def persisted_all(self) -> bool:
        return not (self.stats.not_persisted or self.store.stats.unwritten)


__all__ = ["TopologyStore", "StoreSink", "StoreError", "migrate", "MIGRATIONS", "SCHEMA_VERSION"]
