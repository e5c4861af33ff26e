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
from deetune.accounting import KERNEL_COUNTED  # whose errors the kernel always copies
from deetune.decoders.base import Decoder, Direction, Exchange
from deetune.decoders.session import State, StreamSession
from deetune.events import ConnectionEvent, DataEvent, Event, ExchangeEvent
from deetune.recording.capture import ConnLog, RecordingPorts

log = logging.getLogger("deetune.l7")

#: Connections tracked at once; the least recently active is dropped beyond.
MAX_CONNECTIONS = 65536
#: How long (ns) a handled close waits for data from before it when no later data comes:
#: the data comes through another ring buffer, which the pipeline may drain after the one
#: carrying the close.
CLOSE_GRACE_NS = 1_000_000_000

#: Live chunks are whole syscalls: a write usually ends where a message ends,
#: so when a capture gap hides HTTP framing the decoder may assume just that.
LIVE_DECODER_OPTIONS = {"http": {"trust_syscall_boundaries": True}, "http2": {"trust_syscall_boundaries": True}}


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
    #: Recorded connections whose byte log stopped matching the decoder's exchanges (restarted
    #: at the next message boundary; the exchanges in between carry no payload).
    payload_misaligned: int = 0
    #: Recorded connections decoded again from a request after their decoder gave up (e.g. when
    #: the kernel lost a record of theirs).
    resynced: int = 0
    #: Errors whose heads the kernel copied from connections it was not copying (overload sampling).
    error_heads: int = 0


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
    #: Stream positions: bytes this side wrote and read, and the request and response bytes of
    #: the exchanges reported so far (where a recording may start: see deetune.recording.capture).
    fed_out: int = 0
    fed_in: int = 0
    rep_req: int = 0
    rep_resp: int = 0
    #: The raw bytes, while a recording task records this connection's port.
    log: ConnLog | None = None
    #: The socket's cookie (unique per connection; 0 when the source has none).
    conn_id: int = 0
    #: The overload sampling the latest data was copied under (see ExchangeEvent.sampling).
    sampling: int = 1
    #: The bytes decoded are the TLS plaintext of the connection (the tls probe's), not its own.
    tls: bool = False


def _resyncable(session: StreamSession) -> bool:
    """Whether a session that stopped decoding may start again at a later request: its
    protocol and role were known before a decoder gave up (not a stream of no protocol)."""
    return session.state is State.UNDECODABLE and session.protocol is not None and session.role is not None


def _same_ports(conn: _Conn, event: DataEvent | ConnectionEvent) -> bool:
    return conn.lport == event.lport and conn.rport == event.rport and conn.raddr == event.raddr


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
        recording: RecordingPorts | None = None,
    ):
        self.decoders = list(decoders)
        #: Ports recording tasks record (their connections' bytes are kept for the exchanges).
        self.recording = recording
        self.mute = mute
        self.emit_data = emit_data
        self.listening = listening if listening is not None else ListeningPorts()
        self.stats = L7Stats()
        self._conns: collections.OrderedDict[int, _Conn] = collections.OrderedDict()
        #: Roles from open events not followed by data yet: sock_id → (role, lport, rport).
        self._roles: dict[int, tuple[str, int, int]] = {}
        #: Closed connections whose last data may still be on its way:
        #: sock_id → (close time, when the close was handled), both monotonic ns.
        self._closing: collections.OrderedDict[int, tuple[int, int]] = collections.OrderedDict()
        #: Latest data event time seen (monotonic ns).
        self._data_ns = 0
        #: The request heads of error heads waiting for their response heads, by connection.
        self._error_requests: collections.OrderedDict[int, DataEvent] = collections.OrderedDict()

    def __call__(self, event: Event) -> Iterable[Event]:
        if isinstance(event, DataEvent):
            out = self._on_data(event)
        elif isinstance(event, ConnectionEvent):
            out = self._on_connection(event)
        else:
            return (event,)
        if self._closing:
            out.extend(self._finish_closes())
        return out

    # -- connection lifecycle ---------------------------------------------------------------
    # A sock_id is the kernel's socket address: a new socket may reuse it as soon as the old one
    # is freed.  Connection events come through another ring buffer than data events, so a close
    # may be handled after the data of a newer socket at the same address, or be lost when that
    # ring overflows.  The ports tell the connections apart: state found under a sock_id belongs
    # to the event only when the ports match.  For the same reason a close may be handled before
    # the connection's last data: the session is finished only once data events from after the
    # close have been seen (the data ring is in time order), or CLOSE_GRACE_NS later.
    def _on_connection(self, event: ConnectionEvent) -> list[Event]:
        if event.phase == "open":
            out: list[Event] = []
            if event.role in ("client", "server"):
                conn = self._conns.get(event.sock_id)
                if conn is not None and not _same_ports(conn, event):
                    out = self._end_conn(event.sock_id, event.ts_mono_ns)
                    conn = None
                if conn is not None:
                    conn.session.set_role(event.role)
                else:
                    self._roles[event.sock_id] = (event.role, event.lport, event.rport)
                    if len(self._roles) > MAX_CONNECTIONS:
                        self._roles.pop(next(iter(self._roles)))
            out.append(event)
            return out
        role = self._roles.get(event.sock_id)
        if role is not None and role[1:] == (event.lport, event.rport):
            del self._roles[event.sock_id]
        conn = self._conns.get(event.sock_id)
        if conn is None or not _same_ports(conn, event):
            return [event]  # never decoded, or a newer connection already reuses the sock_id
        self._closing[event.sock_id] = (event.ts_mono_ns, time.monotonic_ns())
        return [event]

    def _finish_closes(self) -> list[Event]:
        """Finish the sessions of closed connections whose data has all been seen."""
        out: list[Event] = []
        expired = time.monotonic_ns() - CLOSE_GRACE_NS
        while self._closing:
            sock_id, (closed_ns, handled_ns) = next(iter(self._closing.items()))
            if closed_ns > self._data_ns and handled_ns > expired:
                break
            del self._closing[sock_id]
            out.extend(self._end_conn(sock_id, closed_ns))
        return out

    def _end_conn(self, sock_id: int, ts_ns: int) -> list[Event]:
        """Finish the session of the connection under ``sock_id``: it closed, or ended unseen
        (its close lost, or not handled yet when a new connection reused the sock_id)."""
        self._closing.pop(sock_id, None)
        conn = self._conns.pop(sock_id, None)
        if conn is None:  # evicted meanwhile
            return []
        out: list[Event] = [self._exchange_event(conn, x, sock_id) for x in conn.session.close(ts_ns)]
        self.stats.exchanges += len(out)
        return out

    # -- payload ----------------------------------------------------------------------------
    def _on_data(self, event: DataEvent) -> list[Event]:
        self.stats.data_events += 1
        if event.error_head:
            return self._on_error_head(event)
        out: list[Event] = []
        if event.ts_mono_ns > self._data_ns:
            self._data_ns = event.ts_mono_ns
        conn = self._conns.get(event.sock_id)
        closing = self._closing.get(event.sock_id)
        if conn is not None and (not _same_ports(conn, event)
                                 or (closing is not None and closing[0] < event.start_mono_ns)):
            out = self._end_conn(event.sock_id, event.start_mono_ns)
            conn = None
        if conn is not None and conn.tls != event.tls:
            if not event.tls:
                return out  # the ciphertext of a connection whose plaintext is decoded
            # The first plaintext of a TLS connection: what its ciphertext made is dropped, and the
            # payload probe stops copying the ciphertext.
            role = conn.session.role
            del self._conns[event.sock_id]
            conn = self._new_conn(event, role)
            if self.mute is not None:
                self.mute(event.sock_id)
        elif conn is None:
            conn = self._new_conn(event)
            if event.tls and self.mute is not None:
                self.mute(event.sock_id)
        else:
            self._conns.move_to_end(event.sock_id)
        session = conn.session
        conn.sampling = event.sampling
        if self.emit_data:
            out.append(event)
        if not session.active:
            if not self._resync(conn, event):
                return out
            session = conn.session
        egress = event.direction == "egress"
        recording = self.recording
        if recording is not None and (recording.ports or conn.log is not None):
            self._record(conn, egress, event, recording.ports)
        if egress:
            conn.fed_out += event.size
        else:
            conn.fed_in += event.size
        # A write starts when the call does; a read completes when the call returns.
        ts = event.start_mono_ns if egress else event.ts_mono_ns
        exchanges = session.feed(egress, event.data, event.size, ts)
        for exchange in exchanges:
            out.append(self._exchange_event(conn, exchange, event.sock_id))
        self.stats.exchanges += len(exchanges)
        if not session.active:
            conn.log = None
            self._on_gave_up(session, event.sock_id)
        return out

    def _on_error_head(self, event: DataEvent) -> list[Event]:
        """An error the kernel's accounting saw on a connection whose calls were not copied comes as
        two records: the request's head, then the response's.  Decoded on their own (the
        connection's session, if any, never sees them): every error has its detail."""
        key = event.conn_id or event.sock_id
        request = self._error_requests.pop(key, None)
        if request is None:
            self._error_requests[key] = event
            if len(self._error_requests) > MAX_CONNECTIONS:
                self._error_requests.pop(next(iter(self._error_requests)))
            return []
        # The request's side says the role: a client writes its requests, a server reads them.
        role = "client" if request.direction == "egress" else "server"
        session = StreamSession(self.decoders, role, ports=(event.rport, event.lport), options=LIVE_DECODER_OPTIONS)
        exchanges = session.feed(request.direction == "egress", request.data, len(request.data), request.ts_mono_ns)
        exchanges += session.feed(event.direction == "egress", event.data, event.size, event.ts_mono_ns)
        exchanges += session.close(event.ts_mono_ns)
        conn = _Conn(session, event.pid, event.comm, event.laddr, event.lport, event.raddr, event.rport,
                     event.cgroup_id, event.ts - event.ts_mono_ns, conn_id=event.conn_id)
        out: list[Event] = [self._exchange_event(conn, x, event.sock_id) for x in exchanges if x.error]
        self.stats.error_heads += 1
        self.stats.exchanges += len(out)
        return out

    def _resync(self, conn: _Conn, event: DataEvent) -> bool:
        """A connection whose decoder gave up (a lost record broke its framing: one record lost on
        a keep-alive connection would otherwise hide every later request on it) starts again with
        a fresh session at its next chunk that its protocol's decoder recognises as the start of a
        request.  The kernel keeps copying such a connection (see _on_gave_up)."""
        session = conn.session
        if not _resyncable(session):
            return False
        client = session.role == "client"
        if (event.direction == "egress") != client or not event.data:
            return False
        cls = next((d for d in self.decoders if d.protocol == session.protocol), None)
        try:
            if cls is None or not cls.detect(Direction.REQUEST, event.data):
                return False
        except Exception:  # detect must not raise; a plugin's that does is not resynced
            return False
        conn.session = StreamSession([cls], session.role, ports=(conn.rport, conn.lport), options=LIVE_DECODER_OPTIONS)
        # Everything before this chunk is behind us: a recording starts here (see _record).
        conn.rep_req = conn.fed_out if client else conn.fed_in
        conn.rep_resp = conn.fed_in if client else conn.fed_out
        conn.log = None
        self.stats.resynced += 1
        return True

    def _record(self, conn: _Conn, egress: bool, event: DataEvent, ports) -> None:
        """Keep the bytes of a connection on a recorded port (see deetune.recording.capture)."""
        if getattr(conn.session.decoder, "multiplexed", False):
            # Exchanges that interleave on the connection (HTTP/2 streams) do not own a contiguous
            # run of its bytes: recorded without payload.
            conn.log = None
            return
        limit = ports.get(conn.lport) or ports.get(conn.rport)
        log = conn.log
        if log is None:
            if limit is None:
                return
            if conn.lport not in ports and conn.rport in self.listening:
                return  # the client side of a local server: the server's side is the one recorded
            if conn.fed_out or conn.fed_in:
                # Already open: start at a request chunk with no request in flight.
                session = conn.session
                if not session.active or session.role is None:
                    return
                client = session.role == "client"
                if egress != client or (conn.fed_out if client else conn.fed_in) != conn.rep_req:
                    return
            log = conn.log = ConnLog(conn.fed_out, conn.fed_in, limit)
        elif limit is None:
            conn.log = None  # no task records this port any more
            return
        elif limit != log.limit:
            log.set_limit(limit)
        log.feed(egress, event.data, event.size)

    def _new_conn(self, event: DataEvent, role: str | None = None) -> _Conn:
        known = self._roles.pop(event.sock_id, None)
        if role is None and known is not None and known[1:] == (event.lport, event.rport):
            role = known[0]
        if role is None and event.lport in self.listening:
            role = "server"
        session = StreamSession(self.decoders, role, ports=(event.rport, event.lport), options=LIVE_DECODER_OPTIONS)
        conn = _Conn(session, event.pid, event.comm, event.laddr, event.lport, event.raddr, event.rport,
                     event.cgroup_id, event.ts - event.ts_mono_ns, conn_id=event.conn_id, tls=event.tls)
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
        # Muted in the kernel only when it can never be decoded again: a stream that was
        # decodable until a gap is resynced at its next request (see _resync).
        if self.mute is not None and not _resyncable(session):
            self.mute(sock_id)

    def _exchange_event(self, conn: _Conn, x: Exchange, sock_id: int) -> ExchangeEvent:
        conn.rep_req += x.request_bytes
        conn.rep_resp += x.response_bytes
        request_payload = response_payload = None
        log = conn.log
        if log is not None:
            taken = log.take(conn.session.role == "client", x.protocol, x.method, x.request_bytes,
                             x.response_bytes)
            if taken is None:
                conn.log = None
                self.stats.payload_misaligned += 1
            else:
                request_payload, response_payload = taken
        event = ExchangeEvent.from_exchange(
            x,
            clock_offset=conn.clock_offset,
            pid=conn.pid,
            comm=conn.comm,
            role=conn.session.role or "unknown",
            laddr=conn.laddr,
            lport=conn.lport,
            raddr=conn.raddr,
            rport=conn.rport,
            sock_id=sock_id,
            cgroup_id=conn.cgroup_id,
            conn_id=conn.conn_id,
            # Errors of the kernel-counted protocols are all decoded (the kernel copies the heads of
            # those on connections it does not copy): each stands for itself.
            sampling=1 if x.error and x.protocol in KERNEL_COUNTED else conn.sampling,
            request_payload=request_payload,
            response_payload=response_payload,
        )
        if conn.tls:
            event.attributes["tls"] = True
        return event

    def flush(self) -> list[Event]:
        """At stop: exchanges still pending in open connections (e.g. requests without a response yet)."""
        out: list[Event] = []
        now = time.monotonic_ns()
        for sock_id, conn in self._conns.items():
            closing = self._closing.get(sock_id)
            for x in conn.session.close(now if closing is None else closing[0]):
                out.append(self._exchange_event(conn, x, sock_id))
        self._conns.clear()
        self._closing.clear()
        self.stats.exchanges += len(out)
        return out
