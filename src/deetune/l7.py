"""The connection table for L7: data events in, exchange events out.

One owner for per-connection state: role (from the TCP probe's open event,
else the host's listening ports, else the content), the decoder session, and
the endpoint identity.  A pipeline handler: it passes every event through and
adds an :class:`~deetune.events.ExchangeEvent` for each completed exchange.
Raw data events are swallowed unless ``emit_data`` is set.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Iterable, Sequence

import attrs

from deetune import procnet
from deetune.decoders.base import Decoder, Exchange
from deetune.decoders.session import State, StreamSession
from deetune.events import ConnectionEvent, DataEvent, Event, ExchangeEvent

log = logging.getLogger("deetune.l7")

#: Connections tracked at once; the least recently active is dropped beyond.
MAX_CONNECTIONS = 65536

#: Live chunks are whole syscalls: a write usually ends where a message ends,
#: so when a capture gap hides HTTP framing the decoder may assume just that.
LIVE_DECODER_OPTIONS = {"http": {"trust_syscall_boundaries": True}}


@attrs.define
class L7Stats:
    exchanges: int = 0
    #: Connections whose bytes no decoder recognised.
    unknown: int = 0
    #: Connections a decoder gave up on, by protocol.
    undecodable: dict[str, int] = attrs.field(factory=dict)
    #: Connections dropped from the table to stay within MAX_CONNECTIONS.
    evicted: int = 0
    data_events: int = 0


@attrs.define
class _Conn:
    session: StreamSession
    pid: int
    comm: str
    laddr: str
    lport: int
    raddr: str
    rport: int
    cgroup_id: int
    #: wall clock − monotonic clock, from the data events themselves.
    clock_offset: int


class ListeningPorts:
    """Ports this host listens on, re-read at most once a second when asked about one it does not know."""

    def __init__(self, reader: Callable[[], set[int]] = procnet.listening_ports, min_interval: float = 1.0):
        self._reader = reader
        self._min_interval = min_interval
        self._ports: set[int] = set()
        self._read_at = float("-inf")

    def __contains__(self, port: int) -> bool:
        if port in self._ports:
            return True
        now = time.monotonic()
        if now - self._read_at >= self._min_interval:
            self._read_at = now
            try:
                self._ports = self._reader()
            except OSError:
                return False
        return port in self._ports


class L7Handler:
    """Pipeline handler decoding the payload of every captured connection."""

    def __init__(
        self,
        decoders: Sequence[type[Decoder]],
        *,
        mute: Callable[[int], None] | None = None,
        emit_data: bool = False,
        listening: ListeningPorts | None = None,
    ):
        self.decoders = list(decoders)
        self.mute = mute
        self.emit_data = emit_data
        self.listening = listening if listening is not None else ListeningPorts()
        self.stats = L7Stats()
        self._conns: collections.OrderedDict[int, _Conn] = collections.OrderedDict()
        self._roles: dict[int, str] = {}

    def __call__(self, event: Event) -> Iterable[Event]:
        if isinstance(event, DataEvent):
            return self._on_data(event)
        if isinstance(event, ConnectionEvent):
            return self._on_connection(event)
        return (event,)

    # -- connection lifecycle ---------------------------------------------------------------
    def _on_connection(self, event: ConnectionEvent) -> list[Event]:
        if event.phase == "open":
            if event.role in ("client", "server"):
                conn = self._conns.get(event.sock_id)
                if conn is not None:
                    conn.session.set_role(event.role)
                else:
                    self._roles[event.sock_id] = event.role
                    if len(self._roles) > MAX_CONNECTIONS:
                        self._roles.pop(next(iter(self._roles)))
            return [event]
        self._roles.pop(event.sock_id, None)
        conn = self._conns.pop(event.sock_id, None)
        if conn is None:
            return [event]
        out: list[Event] = [self._exchange_event(conn, x, event.sock_id) for x in conn.session.close(event.ts_mono_ns)]
        self.stats.exchanges += len(out)
        out.append(event)
        return out

    # -- payload ----------------------------------------------------------------------------
    def _on_data(self, event: DataEvent) -> list[Event]:
        self.stats.data_events += 1
        conn = self._conns.get(event.sock_id)
        if conn is None:
            conn = self._new_conn(event)
        else:
            self._conns.move_to_end(event.sock_id)
        session = conn.session
        out: list[Event] = [event] if self.emit_data else []
        if not session.active:
            return out
        egress = event.direction == "egress"
        # A write starts when the call does; a read completes when the call returns.
        ts = event.start_mono_ns if egress else event.ts_mono_ns
        exchanges = session.feed(egress, event.data, event.size, ts)
        for exchange in exchanges:
            out.append(self._exchange_event(conn, exchange, event.sock_id))
        self.stats.exchanges += len(exchanges)
        if not session.active:
            self._on_gave_up(session, event.sock_id)
        return out

    def _new_conn(self, event: DataEvent) -> _Conn:
        role = self._roles.pop(event.sock_id, None)
        if role is None and event.lport in self.listening:
            role = "server"
        session = StreamSession(self.decoders, role, ports=(event.rport, event.lport), options=LIVE_DECODER_OPTIONS)
        conn = _Conn(session, event.pid, event.comm, event.laddr, event.lport, event.raddr, event.rport,
                     event.cgroup_id, event.ts - event.ts_mono_ns)
        self._conns[event.sock_id] = conn
        if len(self._conns) > MAX_CONNECTIONS:
            self._conns.popitem(last=False)
            self.stats.evicted += 1
        return conn

    def _on_gave_up(self, session: StreamSession, sock_id: int) -> None:
        if session.state is State.UNKNOWN:
            self.stats.unknown += 1
        else:
            protocol = session.protocol or "?"
            self.stats.undecodable[protocol] = self.stats.undecodable.get(protocol, 0) + 1
            log.info("connection %x: %s stream undecodable: %s", sock_id, protocol, session.reason)
        if self.mute is not None:
            self.mute(sock_id)

    def _exchange_event(self, conn: _Conn, x: Exchange, sock_id: int) -> ExchangeEvent:
        duration = None if x.response_end_ns is None else x.response_end_ns - x.request_start_ns
        return ExchangeEvent(
            ts=x.request_start_ns + conn.clock_offset,
            ts_mono_ns=x.request_start_ns,
            protocol=x.protocol,
            pid=conn.pid,
            comm=conn.comm,
            role=conn.session.role or "unknown",
            laddr=conn.laddr,
            lport=conn.lport,
            raddr=conn.raddr,
            rport=conn.rport,
            method=x.method,
            target=x.target,
            status=x.status,
            error=x.error,
            error_message=x.error_message,
            latency_ns=x.latency_ns,
            duration_ns=duration,
            request_bytes=x.request_bytes,
            response_bytes=x.response_bytes,
            sock_id=sock_id,
            cgroup_id=conn.cgroup_id,
            attributes=dict(x.attributes),
        )

    def flush(self) -> list[Event]:
        """At stop: exchanges still pending in open connections (e.g. requests without a response yet)."""
        out: list[Event] = []
        now = time.monotonic_ns()
        for sock_id, conn in self._conns.items():
            for x in conn.session.close(now):
                out.append(self._exchange_event(conn, x, sock_id))
        self._conns.clear()
        self.stats.exchanges += len(out)
        return out
