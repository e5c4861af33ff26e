"""Topology aggregator: connection and exchange events in, per-window edge statistics out.

A pipeline handler, after the L7 handler.  Every :class:`ConnectionEvent` and
:class:`ExchangeEvent` is passed on enriched with the service names of both
ends (``client_service``/``server_service``) and counted on an edge
``(client service, server service, protocol, server port)``.  When a window
(``window_seconds``, aligned on the wall clock) ends, an
:class:`InstanceEvent` is emitted for every instance seen in it, then an
:class:`EdgeWindowEvent` per edge; ``flush()`` at stop emits the partial window.

Naming the ends
    The local end is ``resolver.instance(pid, comm)``.  Seen from the client,
    the server is ``resolver.endpoint(raddr, rport)``: a local listener's
    service, a mapped name, or ``ip:port`` (the port tells remote services on
    one address apart).  Seen from the server, the peer's port is ephemeral:
    a *local* client is the process owning the client socket (the mirrored
    4-tuple: learned from the client's own connection and exchange events,
    else found in /proc, at most once a second); a *remote* client is named
    by its address alone, ``resolver.endpoint(addr, 0)`` with the ``ip:0``
    fallback shortened to ``ip`` (a mapping file can still name it) — with the
    port, every connection would be a new node.  A local client whose socket
    cannot be found (it exited) is named like a remote one.

Counting once
    When both ends run on this host both report the same connections and
    exchanges.  Each is counted where the server is: on the server side, and
    on the client side only when ``resolver.is_local_listener(raddr, rport)``
    says the server is not local.  Failed connections are always counted on
    the client side (the server never saw them).  Every event is enriched,
    counted or not.  Instances are reported where their traffic counts: the
    counting end's and, on the server side, its local client's (the peer).  A
    client of a local server is not reported from its own uncounted events:
    when that server is the agent itself (whose sockets the probes ignore),
    its API clients and scrapers would otherwise be nodes without edges.

Connections and protocols
    Connection counters (opened, bytes, retransmits, resets) go to the edge of
    the protocol the connection carried: the first protocol decoded on it;
    while none is, the protocol last decoded between the same client, server
    and port; otherwise ``tcp``.  So an HTTP service's connections land on its
    ``http`` edge (health-check connects included), and traffic nothing
    decoded makes a ``tcp`` edge.  To get the protocol in time, an open is
    counted at the first exchange on the connection, at its close, or when the
    window ends, whichever comes first.  Failed connections use the same
    memory.  Bytes: each counted exchange adds its request/response bytes at
    once; the close adds the rest of the connection's bytes (those no exchange
    accounted for).  The close of a connection that predates the agent adds
    only a reset: its byte and retransmit totals span an unknown time.  Under
    the tcp probe's overload sampling an open or close stands for
    ``event.sampling`` connections, and its counters count that many times.

Windows
    Events count in the window in which the aggregator sees them (the wall
    clock, not ``event.ts``): windows close in order and late events are never
    dropped.  A window closes at the first event after its end (the pipeline
    calls handlers only with events; a host without traffic has nothing to
    report anyway).
"""

from __future__ import annotations

import bisect
import collections
import functools
import logging
import time
from collections.abc import Collection
from typing import Any, Callable, Iterable, Protocol

import attrs

from deetune import procnet
from deetune.accounting import EXCHANGE_OUTCOMES, KERNEL_COUNTED, OUTCOME_ERROR, OUTCOME_UNPARSED, OUTCOME_UNSOLICITED
from deetune.events import (
    ConnectionCounts,
    ConnectionEvent,
    CountedEvent,
    Event,
    ExchangeEvent,
    LatencyCounts,
    ProcessEvent,
    RequestCounts,
)
from deetune.topology.model import LATENCY_BUCKETS_NS, EdgeKey, EdgeStats, EdgeWindowEvent, Instance, InstanceEvent

log = logging.getLogger("deetune.topology")

#: (laddr, lport, raddr, rport) of a socket, seen from its own side.
FourTuple = tuple[str, int, str, int]


class Resolver(Protocol):
    """What the aggregator needs of :class:`deetune.services.ServiceResolver`."""

    def instance(self, pid: int, comm: str = "") -> Instance: ...
    def forget(self, pid: int) -> None: ...
    def endpoint(self, addr: str, port: int) -> str: ...
    def is_local_listener(self, addr: str, port: int) -> bool: ...


def _open_sockets(inodes: Collection[int]) -> list[procnet.SocketEntry]:
    return procnet.read_tcp_sockets(states=procnet.OPEN_STATES, inodes=inodes)


class SocketOwners:
    """Which local process owns a TCP socket, by its 4-tuple.

    Learned from client-side events (cheap, and in time: a client's connect
    is reported before the server sees its first request); on a miss, one scan
    of /proc/net/tcp and /proc/*/fd records every socket's owner, at most once
    per ``min_interval`` seconds because a scan costs milliseconds.
    """

    def __init__(
        self,
        *,
        # Open states only: a TIME_WAIT socket has no owner, and a busy host has 100,000s of them.
        # Called with the inodes some process holds: only those sockets are wanted.
        read_sockets: Callable[[Collection[int]], list[procnet.SocketEntry]] = _open_sockets,
        read_owners: Callable[[], dict[int, procnet.Owner]] = procnet.socket_owners,
        min_interval: float = 1.0,
        max_interval: float = 32.0,
        capacity: int = 16384,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._read_sockets = read_sockets
        self._read_owners = read_owners
        self._min_interval = self._interval = min_interval
        self._max_interval = max_interval
        self._capacity = capacity
        self._clock = clock
        self._owners: dict[FourTuple, tuple[int, str]] = {}
        # What the last /proc scan found, replaced by the next: learned from a scan, a socket
        # is never forgotten at its close (only client closes are), and under load the scans
        # would fill the table with the server sides of closed connections.
        self._scanned: dict[FourTuple, tuple[int, str]] = {}
        self._scanned_at = float("-inf")
        self.scans = 0

    def learn(self, key: FourTuple, pid: int, comm: str) -> None:
        owners = self._owners
        if len(owners) >= self._capacity and key not in owners:
            del owners[next(iter(owners))]  # the oldest entry
        owners[key] = (pid, comm)

    def known(self, key: FourTuple) -> tuple[int, str] | None:
        return self._owners.get(key) or self._scanned.get(key)

    def forget(self, key: FourTuple) -> None:
        """The socket closed: its entry would only hold memory (a new connection on the
        same 4-tuple is learned again at its connect)."""
        self._owners.pop(key, None)

    def owner(self, key: FourTuple) -> tuple[int, str] | None:
        """The owner, scanning /proc on a miss when the last scan is old enough.  A scan that
        does not find the socket asked for doubles the wait before the next (up to
        ``max_interval``): under overload, when most misses are connections whose records were
        lost and that are gone by now, a scan of every socket each second helps no one."""
        found = self.known(key)
        if found is not None:
            return found
        now = self._clock()
        if now - self._scanned_at < self._interval:
            return None
        self._scanned_at = now
        self.scans += 1
        try:
            # Owners first: at high churn most open sockets are orphans (FIN_WAIT2, no inode)
            # and need not be read.
            owners = self._read_owners()
            sockets = self._read_sockets(owners.keys())
        except OSError as exc:
            log.debug("cannot read socket owners: %s", exc)
            return None
        scanned = {}
        for s in sockets:
            if s.rport and (owner := owners.get(s.inode)) is not None:
                scanned[(s.laddr, s.lport, s.raddr, s.rport)] = (owner.pid, owner.comm)
                if len(scanned) >= self._capacity:
                    break
        self._scanned = scanned
        found = scanned.get(key)
        self._interval = self._min_interval if found else min(self._interval * 2, self._max_interval)
        return found


class _Sock:
    """What the aggregator keeps of one open connection (seen from one side)."""

    __slots__ = ("laddr", "lport", "raddr", "rport", "inst", "peer", "peer_known", "server_side", "client", "server",
                 "port", "counted", "protocol", "pending", "ex_sent", "ex_recv", "edge", "edge_gen", "edge_protocol",
                 "weight")

    def __init__(self, laddr: str, lport: int, raddr: str, rport: int, inst: Instance):
        self.laddr, self.lport, self.raddr, self.rport = laddr, lport, raddr, rport
        self.inst = inst
        #: The other end's instance, when it is a local process we found.
        self.peer: Instance | None = None
        #: False while a local peer's owner is unknown (looked up again at its next exchange).
        self.peer_known = True
        self.server_side = False
        self.client = self.server = ""
        self.port = 0
        #: This side is the one counting (see "Counting once").
        self.counted = False
        #: First protocol decoded on the connection.
        self.protocol: str | None = None
        #: Opened but not counted yet (waiting for its protocol).
        self.pending = False
        #: Bytes its counted exchanges already added, client → server and back.
        self.ex_sent = self.ex_recv = 0
        #: The edge its exchanges count on in window generation edge_gen (saves a lookup per exchange).
        self.edge: _Edge | None = None
        self.edge_gen = -1
        self.edge_protocol = ""
        #: Connections it stands for: more than 1 under the tcp probe's overload sampling.
        self.weight = 1


class _Edge:
    __slots__ = ("stats", "clients", "servers")

    def __init__(self) -> None:
        self.stats = EdgeStats()
        # id(instance) → instance: cheaper than hashing the frozen Instance per event.
        self.clients: dict[int, Instance] = {}
        self.servers: dict[int, Instance] = {}


@attrs.define
class AggregatorStats:
    exchanges: int = 0
    connections: int = 0
    #: Observations left to the other end of a local connection (it counts them).
    duplicates: int = 0
    #: Connections dropped from the table to stay within max_sockets.
    evicted: int = 0
    windows: int = 0


class TopologyAggregator:
    """Pipeline handler turning connections and exchanges into per-window edges (see the module doc)."""

    #: Open connections tracked; past this many, the oldest is dropped (its close was probably
    #: lost: under overload, opens whose close never comes would otherwise hold about 300 bytes
    #: each for good).
    max_sockets = 16384
    #: Opens waiting for their protocol until the window ends; past this many the oldest counts
    #: at once (under overload most of them are connections whose close was lost).
    max_pending = 4096
    #: Remembered (client, server, port) → protocol and remote client names, each.
    max_memory = 65536

    def __init__(
        self,
        resolver: Resolver,
        *,
        window_seconds: float = 10,
        clock: Callable[[], int] = time.time_ns,
        socket_owners: SocketOwners | None = None,
        kernel_counts: bool = False,
    ):
        self.resolver = resolver
        #: Counts come from the kernel (RequestCounts, LatencyCounts, ConnectionCounts: exact at any
        #: load); exchange and connection events then only name ends and count as detail
        #: (``decoded``).  Off: counted from those events (a pipeline with no kernel counters).
        self.kernel_counts = kernel_counts
        self.window_ns = int(window_seconds * 1_000_000_000)
        if self.window_ns <= 0:
            raise ValueError("window_seconds must be positive")
        self.clock = clock
        self.owners = socket_owners if socket_owners is not None else SocketOwners()
        self.stats = AggregatorStats()
        self._socks: dict[int, _Sock] = {}
        self._protocols: dict[tuple[str, str, int], str] = {}
        self._remote_clients: dict[str, str] = {}
        self._local_addrs: set[str] = set()
        self._window_start = 0
        self._window_end = 0  # the first event opens a window
        self._edges: dict[tuple[str, str, str, int], _Edge] = {}
        self._seen: dict[int, tuple[Instance, int]] = {}
        # Opens not yet counted (waiting to learn their protocol), by id: a socket leaves at its
        # close or first exchange, so that a window of short connections holds none of them.
        self._pending: dict[int, _Sock] = {}
        #: the kernel's connection counts waiting for their edge's protocol (see _on_counts)
        self._held_counts: collections.deque[tuple] = collections.deque()
        #: ports local servers counted exchanges on (their clients' sides here are not counted)
        self._served_ports: set[int] = set()
        #: Bumped whenever the window's edges are handed over (invalidates _Sock.edge).
        self._gen = 0

    # -- the handler ---------------------------------------------------------------------------
    def __call__(self, event: Event) -> Iterable[Event]:
        if isinstance(event, ExchangeEvent):
            return self._on_exchange(event)
        if isinstance(event, ConnectionEvent):
            return self._on_connection(event)
        if isinstance(event, CountedEvent):
            return self._on_counts(event)
        if isinstance(event, ProcessEvent):
            resolver = self.resolver
            if event.phase == "exec":
                note = getattr(resolver, "note_exec", None)
                if note is not None:
                    note(event.pid, event.comm, event.cmdline)
                else:
                    resolver.forget(event.pid)
            elif event.phase == "exit":
                retire = getattr(resolver, "retire", None)
                (retire or resolver.forget)(event.pid)
        return (event,)

    def tick(self) -> list[Event]:
        """Called by the pipeline about once a second: closes a window that has
        ended even when no event arrives to do it (a quiet host)."""
        now = self.clock()
        if not self._window_end or now < self._window_end:
            return []
        return self._roll(now)

    def flush(self) -> list[Event]:
        """At stop: the current window so far (stamped now)."""
        if not self._window_end:
            return []
        now = self.clock()
        self._count_pending()
        return self._emit(now)

    def is_counted(self, event: ExchangeEvent) -> bool:
        """Whether this side's report of an exchange the aggregator just handled is the one it
        counted (see "Counting once"): what a later stage that must count each exchange once
        (the recorder) asks."""
        sock = self._socks.get(event.sock_id)
        if sock is not None and sock.lport == event.lport and sock.rport == event.rport:
            return sock.counted
        if event.role == "server":
            return True
        return not self.resolver.is_local_listener(event.raddr, event.rport)

    # -- exchanges -----------------------------------------------------------------------------
    def _on_exchange(self, event: ExchangeEvent) -> Iterable[Event]:
        now = self.clock()
        out = self._roll(now) if now >= self._window_end else None
        self.stats.exchanges += 1
        inst = self.resolver.instance(event.pid, event.comm)
        sock = self._socks.get(event.sock_id)
        if sock is None or sock.inst is not inst or sock.rport != event.rport or sock.lport != event.lport:
            sock = self._track(event, inst)
        elif not sock.peer_known:
            self._name_client(sock)
        protocol = event.protocol
        if sock.protocol is None:
            sock.protocol = protocol
            self._remember_protocol(sock, protocol)
            if sock.pending:
                self._count_open(sock, protocol)
        if sock.counted:
            seen = self._seen
            if id(inst) not in seen:
                seen[id(inst)] = (inst, now)
            peer = sock.peer
            if peer is not None and id(peer) not in seen:
                seen[id(peer)] = (peer, now)
            edge = sock.edge
            if edge is None or sock.edge_gen != self._gen or sock.edge_protocol != protocol:
                edge = self._bind(sock, protocol)
            stats = edge.stats
            # Counted by the kernel (RequestCounts): here only detail.  Other protocols (HTTP/2,
            # gRPC, dns, kafka, plugins' …) are counted from their exchanges, below.
            if self.kernel_counts and protocol in KERNEL_COUNTED:
                stats.decoded += 1
                enriched = _enricher(type(event))(event, sock.client, sock.server)
                if out:
                    out.append(enriched)
                    return out
                return (enriched,)
            stats.requests += 1
            if event.error:
                stats.errors += 1
            latency = event.latency_ns
            if latency is not None:  # EdgeStats.add_latency, inlined
                stats.latency_sum_ns += latency
                stats.latency_buckets[_bucket(_BOUNDS, latency)] += 1
            stats.bytes_sent += event.request_bytes
            stats.bytes_received += event.response_bytes
            sock.ex_sent += event.request_bytes
            sock.ex_recv += event.response_bytes
        else:
            self.stats.duplicates += 1
        enriched = _enricher(type(event))(event, sock.client, sock.server)
        if out:
            out.append(enriched)
            return out
        return (enriched,)

    # -- the kernel's counts ----------------------------------------------------------------------
    def _on_counts(self, event: CountedEvent) -> Iterable[Event]:
        """Exact counts of one side of an edge (see deetune.accounting): the edge's counters move
        by them on the side that counts (see "Counting once")."""
        now = self.clock()
        out = self._roll(now) if now >= self._window_end else []
        resolver = self.resolver
        inst = resolver.instance(event.pid)
        peer = None
        if event.role == "server":
            server = inst.service
            if event.peer_pid:
                peer = resolver.instance(event.peer_pid)
                client = peer.service
            else:
                client = self._remote_client(event.raddr)
            counted = True
            served = self._served_ports
            if event.port not in served:
                if len(served) >= 65536:
                    served.clear()
                served.add(event.port)
        else:
            client = inst.service
            server = resolver.endpoint(event.raddr, event.port)
            # A local server counts its side; its listener may not be in the /proc snapshot yet
            # (read at most once a second), but its counts came first.
            counted = not resolver.is_local_listener(event.raddr, event.port) and not (
                event.port in self._served_ports and resolver.is_local_address(event.raddr))
        if isinstance(event, ConnectionCounts):
            protocol = self._protocols.get((client, server, event.port))
            if protocol is None and counted:
                # The kernel counted the open before the first exchange's answer (its read fell
                # between them): wait for the edge's protocol until the window ends.
                held = self._held_counts
                if len(held) >= self.max_pending:
                    self._count_held(held.popleft())
                held.append((event, client, server, inst, peer, now))
                out.append(_counts_enricher(type(event))(event, client, server, counted))
                return out
            self._count_on_edge(event, client, server, protocol or "tcp", inst, peer, counted, now)
        else:
            protocol = event.protocol
            if counted:
                memory = self._protocols
                if memory.get((client, server, event.port)) != protocol:
                    if len(memory) >= self.max_memory:
                        memory.clear()
                    memory[(client, server, event.port)] = protocol
            self._count_on_edge(event, client, server, protocol, inst, peer, counted, now)
        out.append(_counts_enricher(type(event))(event, client, server, counted))
        return out

    def _count_held(self, held: tuple) -> None:
        event, client, server, inst, peer, now = held  # (only counted sides are held)
        protocol = self._protocols.get((client, server, event.port), "tcp")
        self._count_on_edge(event, client, server, protocol, inst, peer, True, now)

    def _count_on_edge(self, event: CountedEvent, client: str, server: str, protocol: str,
                       inst: Instance, peer: Instance | None, counted: bool, now: int) -> None:
        if counted or (isinstance(event, ConnectionCounts) and event.failed):
            key = (client, server, protocol, event.port)
            edge = self._edges.get(key) or self._new_edge(key)
            if event.role == "server":
                edge.servers[id(inst)] = inst
                if peer is not None:
                    edge.clients[id(peer)] = peer
            else:
                edge.clients[id(inst)] = inst
            seen = self._seen
            for each in (inst, peer):
                if each is not None and id(each) not in seen:
                    seen[id(each)] = (each, now)
            self._count(edge.stats, event, counted, protocol)
        else:
            self.stats.duplicates += 1

    @staticmethod
    def _count(stats: EdgeStats, event: CountedEvent, counted: bool, protocol: str) -> None:
        if isinstance(event, RequestCounts):
            outcome = event.outcome
            if outcome in EXCHANGE_OUTCOMES:
                stats.requests += event.count
                if outcome == OUTCOME_ERROR:
                    stats.errors += event.count
                stats.latency_sum_ns += event.latency_sum_ns
            elif outcome == OUTCOME_UNPARSED:
                stats.unparsed += event.count
            elif outcome == OUTCOME_UNSOLICITED:
                stats.unsolicited += event.count
            stats.bytes_sent += event.request_bytes
            stats.bytes_received += event.response_bytes
        elif isinstance(event, LatencyCounts):
            stats.add_fine_latency(event.buckets)
        elif isinstance(event, ConnectionCounts):
            stats.connections_failed += event.failed  # the client's side: no server saw them
            if not counted:
                return
            stats.connections_opened += event.opened
            stats.retransmits += event.retransmits
            stats.resets += event.resets
            if protocol == "tcp":  # an L7 edge's bytes are its exchanges' (RequestCounts)
                stats.bytes_sent += event.bytes_sent
                stats.bytes_received += event.bytes_received

    # -- connections ---------------------------------------------------------------------------
    def _on_connection(self, event: ConnectionEvent) -> Iterable[Event]:
        now = self.clock()
        out = self._roll(now) if now >= self._window_end else []
        self.stats.connections += 1
        inst = self.resolver.instance(event.pid, event.comm)
        seen = self._seen
        phase = event.phase
        if phase == "failed":
            if id(inst) not in seen:
                seen[id(inst)] = (inst, now)
            if self.kernel_counts:
                client, server = inst.service, self.resolver.endpoint(event.raddr, event.rport)
            else:
                client, server = self._count_failed(event, inst)
        else:
            if phase == "open":
                sock = self._track(event, inst)
                if sock.counted and not self.kernel_counts:
                    sock.pending = True
                    pending = self._pending
                    if len(pending) >= self.max_pending:  # count the oldest now, as the window's end would
                        self._count_open_as_seen(pending[next(iter(pending))])
                    pending[id(sock)] = sock
                else:
                    self.stats.duplicates += 1
            else:  # close
                sock = self._socks.pop(event.sock_id, None)
                if sock is None or sock.inst is not inst or sock.rport != event.rport or sock.lport != event.lport:
                    sock = self._new_sock(event, inst)
                elif not sock.peer_known:
                    self._name_client(sock)
                if sock.counted:
                    if not self.kernel_counts:
                        self._count_close(sock, event)
                else:
                    self.stats.duplicates += 1
                if event.role == "client":
                    self.owners.forget((event.laddr, event.lport, event.raddr, event.rport))
            if sock.counted:
                if id(inst) not in seen:
                    seen[id(inst)] = (inst, now)
                if sock.peer is not None and id(sock.peer) not in seen:
                    seen[id(sock.peer)] = (sock.peer, now)
            client, server = sock.client, sock.server
        out.append(_enricher(type(event))(event, client, server))
        return out

    def _count_failed(self, event: ConnectionEvent, inst: Instance) -> tuple[str, str]:
        client = inst.service
        server = self.resolver.endpoint(event.raddr, event.rport)
        protocol = self._protocols.get((client, server, event.rport), "tcp")
        key = (client, server, protocol, event.rport)
        edge = self._edges.get(key) or self._new_edge(key)
        edge.stats.connections_failed += event.sampling
        edge.clients[id(inst)] = inst
        return client, server

    def _count_open(self, sock: _Sock, protocol: str) -> None:
        sock.pending = False
        self._pending.pop(id(sock), None)
        self._bind(sock, protocol).stats.connections_opened += sock.weight

    def _count_close(self, sock: _Sock, event: ConnectionEvent) -> None:
        protocol = sock.protocol or self._protocol_seen(sock)
        stats = self._bind(sock, protocol).stats
        weight = sock.weight
        if sock.pending:
            sock.pending = False
            self._pending.pop(id(sock), None)
            stats.connections_opened += weight
        if not event.preexisting:
            sent, received = event.bytes_sent or 0, event.bytes_received or 0
            to_server, to_client = (received, sent) if sock.server_side else (sent, received)
            stats.bytes_sent += weight * max(0, to_server - sock.ex_sent)
            stats.bytes_received += weight * max(0, to_client - sock.ex_recv)
            stats.retransmits += weight * (event.retransmits or 0)
        if event.reset:
            stats.resets += weight

    def _count_pending(self) -> None:
        """Opens still waiting for a protocol count now, in the window they happened in."""
        pending, self._pending = self._pending, {}
        for sock in pending.values():
            self._count_open_as_seen(sock)
        held, self._held_counts = self._held_counts, collections.deque()
        for each in held:
            self._count_held(each)

    def _protocol_seen(self, sock: _Sock) -> str:
        """The protocol this socket's edge has shown so far ("tcp": none yet)."""
        return self._protocols.get((sock.client, sock.server, sock.port), "tcp")

    def _count_open_as_seen(self, sock: _Sock) -> None:
        """An open that learned no protocol of its own counts on what its edge has shown."""
        self._count_open(sock, self._protocol_seen(sock))

    # -- naming --------------------------------------------------------------------------------
    def _track(self, event: ConnectionEvent | ExchangeEvent, inst: Instance) -> _Sock:
        sock = self._new_sock(event, inst)
        socks = self._socks
        if len(socks) >= self.max_sockets and event.sock_id not in socks:
            del socks[next(iter(socks))]  # the oldest: its close was probably lost
            self.stats.evicted += 1
        socks[event.sock_id] = sock
        return sock

    def _new_sock(self, event: ConnectionEvent | ExchangeEvent, inst: Instance) -> _Sock:
        resolver = self.resolver
        sock = _Sock(event.laddr, event.lport, event.raddr, event.rport, inst)
        if isinstance(event, ConnectionEvent):
            sock.weight = event.sampling
        self._local_addrs.add(event.laddr)
        role = event.role
        if role not in ("client", "server"):
            role = "server" if resolver.is_local_listener(event.laddr, event.lport) else "client"
        if role == "client":
            sock.client = inst.service
            sock.server = resolver.endpoint(event.raddr, event.rport)
            sock.port = event.rport
            sock.counted = not resolver.is_local_listener(event.raddr, event.rport)
            # The server side (if local) looks its client up by this socket.
            self.owners.learn((event.laddr, event.lport, event.raddr, event.rport), event.pid, event.comm)
        else:
            sock.server_side = True
            sock.server = inst.service
            sock.port = event.lport
            sock.counted = True
            self._name_client(sock)
        return sock

    def _name_client(self, sock: _Sock) -> None:
        """Name the client of a server-side connection (see "Naming the ends")."""
        key = (sock.raddr, sock.rport, sock.laddr, sock.lport)  # the client's socket, from its side
        owner = self.owners.known(key)
        if owner is None and self._is_local(sock.raddr):
            owner = self.owners.owner(key)
            sock.peer_known = owner is not None
        if owner is not None:
            sock.peer = self.resolver.instance(*owner)
            sock.peer_known = True
            sock.client = sock.peer.service
        else:
            sock.client = self._remote_client(sock.raddr)
        sock.edge = None  # the client may have changed

    def _is_local(self, addr: str) -> bool:
        return addr in self._local_addrs or addr.startswith("127.") or addr == "::1"

    def _remote_client(self, addr: str) -> str:
        name = self._remote_clients.get(addr)
        if name is None:
            name = self.resolver.endpoint(addr, 0)
            if name.endswith(":0"):  # the resolver's "ip:port" fallback: no name for this address
                name = addr
            if len(self._remote_clients) >= self.max_memory:
                self._remote_clients.clear()
            self._remote_clients[addr] = name
        return name

    def _remember_protocol(self, sock: _Sock, protocol: str) -> None:
        memory = self._protocols
        if len(memory) >= self.max_memory:
            memory.clear()
        memory[(sock.client, sock.server, sock.port)] = protocol

    # -- windows -------------------------------------------------------------------------------
    def _new_edge(self, key: tuple[str, str, str, int]) -> _Edge:
        edge = self._edges[key] = _Edge()
        return edge

    def _bind(self, sock: _Sock, protocol: str) -> _Edge:
        """The window's edge for this connection and protocol, with the connection's instances on it."""
        key = (sock.client, sock.server, protocol, sock.port)
        edge = self._edges.get(key) or self._new_edge(key)
        inst, peer = sock.inst, sock.peer
        if sock.server_side:
            edge.servers[id(inst)] = inst
            if peer is not None:
                edge.clients[id(peer)] = peer
        else:
            edge.clients[id(inst)] = inst
        sock.edge, sock.edge_gen, sock.edge_protocol = edge, self._gen, protocol
        return edge

    def _roll(self, now: int) -> list[Event]:
        """Close the current window (if any) and open the one holding ``now``."""
        out: list[Event] = []
        if self._window_end:
            self._count_pending()
            out = self._emit(self._window_end)
        self._window_start = now - now % self.window_ns
        self._window_end = self._window_start + self.window_ns
        return out

    def _emit(self, ts: int) -> list[Event]:
        """Instances seen, then edges, of the current window; resets its counters."""
        out: list[Event] = []
        ids: set[str] = set()
        for inst, first in self._seen.values():
            if inst.id not in ids:  # two equal Instance objects for one process
                ids.add(inst.id)
                out.append(InstanceEvent(first, instance=inst))
        for (client, server, protocol, port), edge in self._edges.items():
            out.append(EdgeWindowEvent(
                ts, key=EdgeKey(client, server, protocol, port), window_start=self._window_start,
                window_ns=self.window_ns, stats=edge.stats,
                client_instances=tuple(sorted({i.id for i in edge.clients.values()})),
                server_instances=tuple(sorted({i.id for i in edge.servers.values()})),
            ))
        self._seen = {}
        self._edges = {}
        self._gen += 1
        if out:
            self.stats.windows += 1
        return out


@functools.cache
def _counts_enricher(cls: type) -> Callable[[Any, str, str, bool], Any]:
    """Like :func:`_enricher`, for the kernel's counts: names and ``counted`` set in place."""
    setters = []
    for name in ("client_service", "server_service", "counted"):
        descriptor = next((k.__dict__[name] for k in cls.__mro__ if name in k.__dict__), None)
        if type(descriptor).__name__ != "member_descriptor":
            return lambda event, client, server, counted: attrs.evolve(
                event, client_service=client, server_service=server, counted=counted)
        setters.append(descriptor.__set__)
    set_client, set_server, set_counted = setters

    def enrich(event: Any, client: str, server: str, counted: bool) -> Any:
        set_client(event, client)
        set_server(event, server)
        set_counted(event, counted)
        return event

    return enrich


_bucket = bisect.bisect_left
_BOUNDS = LATENCY_BUCKETS_NS


@functools.cache
def _enricher(cls: type) -> Callable[[Any, str, str], Any]:
    """``f(event, client, server)``: the event with its ``client_service`` and
    ``server_service`` set.  The aggregator owns these two fields, and the event is
    fresh from a probe or the L7 handler, so they are written in place through the
    slots' descriptors (the events are frozen to everyone else): a copy through
    ``attrs.evolve`` costs ~5 µs, a copy by slots ~2 µs, this ~0.1 µs.  Falls back
    to evolve for a class without those slots."""
    setters = []
    for name in ("client_service", "server_service"):
        descriptor = next((k.__dict__[name] for k in cls.__mro__ if name in k.__dict__), None)
        if type(descriptor).__name__ != "member_descriptor":
            return lambda event, client, server: attrs.evolve(event, client_service=client, server_service=server)
        setters.append(descriptor.__set__)
    set_client, set_server = setters

    def enrich(event: Any, client: str, server: str) -> Any:
        set_client(event, client)
        set_server(event, server)
        return event

    return enrich


__all__ = ["TopologyAggregator", "SocketOwners", "AggregatorStats", "Resolver"]
