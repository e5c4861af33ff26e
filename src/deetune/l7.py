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
from deetune.decoders.base import Decoder, Exchange
from deetune.decoders.session import ACTIVE_STATES, State, StreamSession
from deetune.events import ConnectionEvent, DataEvent, Event, ExchangeEvent, exchange_event
from deetune.recording.capture import ConnLog, RecordingPorts

log = logging.getLogger("deetune.l7")

#: Connections tracked at once; the least recently active is dropped beyond.
MAX_CONNECTIONS = 65536
#: How long (ns) a handled close waits for data from before it when no later data comes:
#: the data comes through another ring buffer, which the pipeline may drain after the one
#: carrying the close.
CLOSE_GRACE_NS = 1_000_000_000
#: How long (ns of data events' time) an error decoded from the kernel's heads waits for its
#: connection's own decoding, copied the same call, to report it; ERROR_HEAD_WALL_WAIT_NS of wall
#: time when no data comes.
ERROR_HEAD_WAIT_NS = 1_000_000_000
ERROR_HEAD_WALL_WAIT_NS = 5_000_000_000
#: Errors waiting so, at most; the oldest is reported beyond.
MAX_PARKED_ERRORS = 4096

#: Live chunks are whole syscalls: a write usually ends where a message ends,
#: so when a capture gap hides HTTP framing the decoder may assume just that.
LIVE_DECODER_OPTIONS = {"http": {"trust_syscall_boundaries": True}, "http2": {"trust_syscall_boundaries": True}}
#: The heads of requests sent after an error was answered (DataEvent.after_error): skipped.
AFTER_ERROR_OPTIONS = {**LIVE_DECODER_OPTIONS, "postgres": {"skipping": True}}


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
    #: Times a decoder lost the framing (a gap, bytes it could not follow) and decoding started
    #: again at the connection's next request (see deetune.decoders.session).
    resynced: int = 0
    #: Calls not copied (overload sampling, a lost record), told by a jump in the stream
    #: position, and the bytes they moved: fed to the decoders as gaps.
    gaps: int = 0
    gap_bytes: int = 0
    #: Data events whose bytes had been passed already (out of order behind a later call).
    reordered: int = 0
    #: What the decoders skipped or repaired, per protocol and reason (``resync:gap``,
    #: ``unsolicited_response``, ``skipped_bytes`` …).
    skipped: dict[str, dict[str, int]] = attrs.field(factory=dict)
    #: Errors whose heads the kernel copied (every error, up to a rate).
    error_heads: int = 0
    #: ... of them that the connection's own decoding had reported already.
    error_heads_duplicate: int = 0


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
    #: The kernel's stream position expected next, written and read (-1: not known).
    next_out: int = -1
    next_in: int = -1
    #: The kernel socket (its address, reused once the socket is freed).
    sock_id: int = 0
    #: Whether the last chunk fed was a response that completed exchanges (nothing in flight, as
    #: far as a request/response protocol goes): where a recording may start again after a skip.
    answered_last: bool = False
    #: The bytes decoded are the TLS plaintext of the connection (the tls probe's), not its own.
    tls: bool = False


#: A connection's identity in the table: its socket cookie, or where the source has none (0),
#: the socket's address with both ends' ports (the address alone is reused by later sockets).
ConnKey = int | tuple[int, int, int, str]


def conn_key(event: DataEvent | ConnectionEvent) -> ConnKey:
    if event.conn_id:
        return event.conn_id
    return (event.sock_id, event.lport, event.rport, event.raddr)


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
        self._conns: collections.OrderedDict[ConnKey, _Conn] = collections.OrderedDict()
        #: The connection whose data was seen last on each kernel socket: sock_id → key.
        self._by_sock: dict[int, ConnKey] = {}
        #: Roles from open events not followed by data yet: key → role.
        self._roles: collections.OrderedDict[ConnKey, str] = collections.OrderedDict()
        #: Datagram sockets: cookie → connection state (one session per socket, see _on_datagram).
        self._datagrams: collections.OrderedDict[int, _Conn] = collections.OrderedDict()
        #: Closed connections whose last data may still be on its way:
        #: key → (close time, when the close was handled), both monotonic ns.
        self._closing: collections.OrderedDict[ConnKey, tuple[int, int]] = collections.OrderedDict()
        #: Latest data event time seen (monotonic ns).
        self._data_ns = 0
        #: The request heads of error heads waiting for their response heads, by connection.
        self._error_requests: collections.OrderedDict[int, DataEvent] = collections.OrderedDict()
        #: (connection, response start) of the errors the connections' decoding reported lately.
        #: Errors reported per (connection, time of the response write that answered them).
        self._errors_reported: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()
        #: Errors from the kernel's heads whose connection's own decoding may still report them:
        #: (connection, response start) → [(event-time deadline, wall deadline, conn, exchange)].
        self._parked: collections.OrderedDict[tuple[int, int], list[tuple[int, int, _Conn, Exchange]]] = (
            collections.OrderedDict())
        #: Errors reported from their heads after waiting for the decoding: (connection, response
        #: start) → how many; the decoding's own report of them, should it come, is dropped.
        self._released: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()

    def __call__(self, event: Event) -> Iterable[Event]:
        if isinstance(event, DataEvent):
            out = self._on_data(event)
        elif isinstance(event, ConnectionEvent):
            out = self._on_connection(event)
        else:
            out = [event]
        if self._closing:
            out.extend(self._finish_closes())
        if self._parked:
            out.extend(self._release_parked())
        return out

    # -- connection lifecycle ---------------------------------------------------------------
    # Connections are told apart by their socket cookie (conn_id): a sock_id is the kernel's
    # socket address, which a new socket may reuse as soon as the old one is freed.  Connection
    # events come through another ring buffer than data events, and the pipeline orders the
    # events of one drain round by time; but a round takes a bounded batch from each ring, so a
    # ring that fell behind (a large response copied in many records) delivers older events in
    # later rounds than the other ring's newer ones.  Hence: an open never ends another
    # connection (it may come before the previous connection's last data on the same socket),
    # and a close is finished only once data events from after it have been seen (the data ring
    # is in time order), or CLOSE_GRACE_NS later.  Data of a new connection on a socket does end
    # the previous connection there: both come through the data ring, in order.
    def _on_connection(self, event: ConnectionEvent) -> list[Event]:
        key = conn_key(event)
        if event.phase == "open":
            if event.role in ("client", "server"):
                conn = self._conns.get(key)
                if conn is not None:
                    conn.session.set_role(event.role)
                else:
                    self._roles[key] = event.role
                    if len(self._roles) > MAX_CONNECTIONS:
                        self._roles.popitem(last=False)
            return [event]
        self._roles.pop(key, None)
        if key in self._conns:
            self._closing[key] = (event.ts_mono_ns, time.monotonic_ns())
        return [event]

    def _finish_closes(self) -> list[Event]:
        """Finish the sessions of closed connections whose data has all been seen."""
        out: list[Event] = []
        expired = time.monotonic_ns() - CLOSE_GRACE_NS
        while self._closing:
            key, (closed_ns, handled_ns) = next(iter(self._closing.items()))
            if closed_ns > self._data_ns and handled_ns > expired:
                break
            del self._closing[key]
            out.extend(self._end_conn(key, closed_ns))
        return out

    def _end_conn(self, key: ConnKey, ts_ns: int) -> list[Event]:
        """Finish the session of the connection ``key``: it closed, or ended unseen (its close
        lost, or not handled yet when a new connection's data came on the same socket)."""
        self._closing.pop(key, None)
        conn = self._conns.pop(key, None)
        if conn is None:  # evicted meanwhile
            return []
        if self._by_sock.get(conn.sock_id) == key:
            del self._by_sock[conn.sock_id]
        out = self._own_events(conn, conn.session.close(ts_ns))
        self._take_counts(conn.session)
        if self._parked:  # what its decoding did not report by its end, the heads do
            out.extend(self._release_parked(conn.conn_id or conn.sock_id))
        return out

    # -- payload ----------------------------------------------------------------------------
    def _on_data(self, event: DataEvent) -> list[Event]:
        if event.transport == "udp":
            return self._on_datagram(event)
        self.stats.data_events += 1
        if event.error_head:
            return self._on_error_head(event)
        out: list[Event] = []
        ts_mono = event.ts_mono_ns
        if ts_mono > self._data_ns:
            self._data_ns = ts_mono
        key = event.conn_id or (event.sock_id, event.lport, event.rport, event.raddr)  # conn_key, inlined
        conns = self._conns
        conn = conns.get(key)
        if conn is not None and not event.conn_id:
            closing = self._closing.get(key)
            if closing is not None and closing[0] < event.start_mono_ns:
                # No cookie to tell them apart: data from after the close is a new connection.
                out = self._end_conn(key, event.start_mono_ns)
                conn = None
        if conn is not None and conn.tls != event.tls:
            if not event.tls:
                return out  # the ciphertext of a connection whose plaintext is decoded
            # The first plaintext of a TLS connection: what its ciphertext made is dropped, and the
            # payload probe stops copying the ciphertext.
            role = conn.session.role
            del self._conns[key]
            conn = self._new_conn(event, key, role)
            if self.mute is not None:
                self.mute(event.sock_id)
        elif conn is None:
            previous = self._by_sock.get(event.sock_id)
            if previous is not None and previous != key:
                out.extend(self._end_conn(previous, event.start_mono_ns))
            conn = self._new_conn(event, key)
            if event.tls and self.mute is not None:
                self.mute(event.sock_id)
        else:
            conns.move_to_end(key)
        conn.sampling = event.sampling
        if self.emit_data:
            out.append(event)
        session = conn.session
        if session.state not in ACTIVE_STATES:  # not session.active (the property, inlined here)
            return out
        egress = event.direction == "egress"
        data, size = event.data, event.size
        # A write starts when the call does; a read completes when the call returns.
        ts = event.start_mono_ns if egress else ts_mono
        resyncs = session.resyncs
        exchanges: list[Exchange] = []
        seq = event.seq
        if seq >= 0:
            expected = conn.next_out if egress else conn.next_in
            if expected >= 0 and seq != expected:
                if seq + size <= expected:
                    self.stats.reordered += 1
                    return out
                if seq > expected:
                    # Calls in between were not copied: their bytes are a gap.
                    gap = seq - expected
                    self.stats.gaps += 1
                    self.stats.gap_bytes += gap
                    conn.log = None
                    self._advance(conn, egress, gap)
                    exchanges.extend(session.feed(egress, b"", gap, ts))
                else:  # overlaps bytes already passed: only the rest is new
                    cut = expected - seq
                    data, size = data[cut:], size - cut
            if egress:
                conn.next_out = seq + event.size
            else:
                conn.next_in = seq + event.size
        recording = self.recording
        if recording is not None and (recording.ports or conn.log is not None) and session.state in ACTIVE_STATES:
            self._record(conn, egress, data, size, recording.ports)
        if egress:  # _advance, inlined
            conn.fed_out += size
        else:
            conn.fed_in += size
        if session.state in ACTIVE_STATES:
            if exchanges:
                exchanges.extend(session.feed(egress, data, size, ts))
            else:
                exchanges = session.feed(egress, data, size, ts)
        if session.resyncs != resyncs:
            self.stats.resynced += session.resyncs - resyncs
        if exchanges:
            out.extend(self._own_events(conn, exchanges))
        role = session.role
        request_chunk = role is not None and egress == (role == "client")
        conn.answered_last = not request_chunk and (bool(exchanges) or conn.answered_last)
        if session.counts:
            # Bytes were skipped (an unsolicited response, a resync …): the stream positions of the
            # reported exchanges no longer tell where messages start; a recording starts again at a
            # request that follows an answered one (see _record).
            conn.rep_req = conn.rep_resp = -1
            conn.log = None
            self._take_counts(session)
        if session.state not in ACTIVE_STATES:
            conn.log = None
            self._on_gave_up(session, conn)
        return out

    def _on_error_head(self, event: DataEvent) -> list[Event]:
        """Every error the kernel's accounting saw comes as two records: the request's head, then
        the response's.  Decoded on their own (the connection's session, if any, never sees them):
        every error has its detail, once.  When the answering call was also copied for the
        connection's own decoding (``also_copied``), that decoding reports the error, whole (a
        response in several writes is complete there only): the heads' error is reported only if
        it has not and does not within a second of data (see _release_parked): the decoding lost
        the exchange (a gap, a resync) or its record was lost."""
        key = event.conn_id or event.sock_id
        request = self._error_requests.pop(key, None)
        if request is None:
            self._error_requests[key] = event
            if len(self._error_requests) > MAX_CONNECTIONS:
                self._error_requests.pop(next(iter(self._error_requests)))
            return []
        # The request's side says the role: a client writes its requests, a server reads them.
        role = "client" if request.direction == "egress" else "server"
        session = StreamSession(self.decoders, role, ports=(event.rport, event.lport),
                                options=AFTER_ERROR_OPTIONS if event.after_error else LIVE_DECODER_OPTIONS)
        exchanges = session.feed(request.direction == "egress", request.data, len(request.data), request.ts_mono_ns)
        exchanges += session.feed(event.direction == "egress", event.data, event.size, event.ts_mono_ns)
        exchanges += session.close(event.ts_mono_ns)
        conn = _Conn(session, event.pid, event.comm, event.laddr, event.lport, event.raddr, event.rport,
                     event.cgroup_id, event.ts - event.ts_mono_ns, conn_id=event.conn_id, sock_id=event.sock_id)
        out: list[Event] = []
        # Errors answered by one write (a pipeline's) share its time: the first n of them were
        # reported by the connection's own decoding when it reported n.
        seen: collections.Counter[int | None] = collections.Counter()
        for x in exchanges:
            if not x.error:
                continue
            seen[x.response_start_ns] += 1
            if seen[x.response_start_ns] <= self._errors_reported.get((key, x.response_start_ns), 0):
                self.stats.error_heads_duplicate += 1  # its connection's own decoding reported it
                continue
            if event.also_copied and x.response_start_ns is not None:
                self._park(key, conn, x)
                continue
            out.append(self._exchange_event(conn, x))
        self.stats.error_heads += 1
        self.stats.exchanges += len(out)
        return out

    def _own_events(self, conn: _Conn, exchanges: Sequence[Exchange]) -> list[Event]:
        """Events for the exchanges of a connection's own decoding, but for the errors its kernel
        heads reported already (after waiting for them in vain: the decoding held them longer)."""
        out: list[Event] = []
        for x in exchanges:
            if x.error and self._released:
                key = (conn.conn_id or conn.sock_id, x.response_start_ns)
                left = self._released.get(key, 0)
                if left:
                    self._released[key] = left - 1
                    if left == 1:
                        del self._released[key]
                    self.stats.error_heads_duplicate += 1
                    continue
            out.append(self._exchange_event(conn, x))
        self.stats.exchanges += len(out)
        return out

    def _park(self, key: int, conn: _Conn, x: Exchange) -> None:
        assert x.response_start_ns is not None
        waiting = self._parked.setdefault((key, x.response_start_ns), [])
        waiting.append((x.response_start_ns + ERROR_HEAD_WAIT_NS, time.monotonic_ns() + ERROR_HEAD_WALL_WAIT_NS, conn, x))
        if len(self._parked) > MAX_PARKED_ERRORS:
            self._report_parked(self._parked.popitem(last=False)[1])

    def _report_parked(self, waiting: list[tuple[int, int, _Conn, Exchange]]) -> list[Event]:
        out: list[Event] = []
        for _, _, conn, x in waiting:
            key = (conn.conn_id or conn.sock_id, x.response_start_ns)
            self._released[key] = self._released.get(key, 0) + 1  # its decoding may report it yet
            if len(self._released) > MAX_PARKED_ERRORS:
                self._released.popitem(last=False)
            out.append(self._exchange_event(conn, x))
        self.stats.exchanges += len(out)
        return out

    def _release_parked(self, conn_id: int | None = None) -> list[Event]:
        """Report the parked errors of ``conn_id`` (it ended), else those whose wait is over: data
        from a second after them has been seen, or five seconds passed."""
        out: list[Event] = []
        if conn_id is not None:
            for key in [k for k in self._parked if k[0] == conn_id]:
                out.extend(self._report_parked(self._parked.pop(key)))
            return out
        now = time.monotonic_ns()
        while self._parked:
            key, waiting = next(iter(self._parked.items()))
            data_deadline, wall_deadline, _, _ = waiting[0]
            if self._data_ns < data_deadline and now < wall_deadline:
                break
            del self._parked[key]
            out.extend(self._report_parked(waiting))
        return out

    @staticmethod
    def _advance(conn: _Conn, egress: bool, size: int) -> None:
        if egress:
            conn.fed_out += size
        else:
            conn.fed_in += size

    # -- datagrams (UDP) ---------------------------------------------------------------------
    # One session per socket (by cookie), whatever its peers: a server's socket hears every client,
    # and a decoder pairs a datagram with its answer by content (DNS ids).  Each exchange names its
    # own peer (Exchange.peer); a received datagram's peer is unknown on an unconnected socket
    # (rport 0), and the decoder takes it from the answer.  A UDP socket has no close to end its
    # session: sessions are dropped least recently used first.
    def _on_datagram(self, event: DataEvent) -> list[Event]:
        self.stats.data_events += 1
        out: list[Event] = [event] if self.emit_data else []
        key = event.conn_id or event.sock_id
        conn = self._datagrams.get(key)
        unknown = "::" if event.family == 6 else "0.0.0.0"
        if conn is None:
            decoders = [d for d in self.decoders if getattr(d, "datagrams", False)]
            session = StreamSession(decoders, None, ports=(event.rport, event.lport),
                                    options={d.protocol: {"datagram": True} for d in decoders})
            conn = self._datagrams[key] = _Conn(
                session, event.pid, event.comm, event.laddr, event.lport, unknown, 0, event.cgroup_id,
                event.ts - event.ts_mono_ns, conn_id=event.conn_id, sock_id=event.sock_id)
            if len(self._datagrams) > MAX_CONNECTIONS:
                self._datagrams.popitem(last=False)
                self.stats.evicted += 1
            if not decoders:
                session.state = State.UNKNOWN
                self._on_gave_up(session, conn, datagram=True)
        else:
            self._datagrams.move_to_end(key)
        session = conn.session
        if not session.active:
            return out
        conn.sampling = event.sampling
        egress = event.direction == "egress"
        peer = (event.raddr, event.rport) if event.rport else None
        ts = event.start_mono_ns if egress else event.ts_mono_ns
        exchanges = session.feed(egress, event.data, event.size, ts, peer)
        for x in exchanges:
            conn.raddr, conn.rport = x.peer if x.peer is not None else (unknown, 0)
            out.append(self._exchange_event(conn, x))
        self.stats.exchanges += len(exchanges)
        if not session.active:
            self._on_gave_up(session, conn, datagram=True)
        return out

    def _take_counts(self, session: StreamSession) -> None:
        counts = session.take_counts()
        if counts:
            mine = self.stats.skipped.setdefault(session.protocol or "?", {})
            for name, n in counts.items():
                mine[name] = mine.get(name, 0) + n

    def _record(self, conn: _Conn, egress: bool, data: bytes, size: int, ports) -> None:
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
                if session.state is not State.DECODING or session.role is None:
                    return
                client = session.role == "client"
                if egress != client:
                    return
                if conn.rep_req < 0:  # positions lost: start after an answered request
                    if not conn.answered_last:
                        return
                    conn.rep_req = conn.fed_out if client else conn.fed_in
                    conn.rep_resp = conn.fed_in if client else conn.fed_out
                elif (conn.fed_out if client else conn.fed_in) != conn.rep_req:
                    return
            log = conn.log = ConnLog(conn.fed_out, conn.fed_in, limit)
        elif limit is None:
            conn.log = None  # no task records this port any more
            return
        elif limit != log.limit:
            log.set_limit(limit)
        log.feed(egress, data, size)

    def _new_conn(self, event: DataEvent, key: ConnKey, role: str | None = None) -> _Conn:
        known = self._roles.pop(key, None)
        if role is None:
            role = known
        if role is None and event.lport in self.listening:
            role = "server"
        session = StreamSession(self.decoders, role, ports=(event.rport, event.lport), options=LIVE_DECODER_OPTIONS)
        conn = _Conn(session, event.pid, event.comm, event.laddr, event.lport, event.raddr, event.rport,
                     event.cgroup_id, event.ts - event.ts_mono_ns, conn_id=event.conn_id, sock_id=event.sock_id,
                     tls=event.tls)
        if event.seq >= 0:
            # The kernel counts both directions from the first call it saw on the socket: bytes
            # before a direction's first event here moved unseen (calls left out by sampling).
            conn.next_out = conn.next_in = 0
        self._conns[key] = conn
        self._by_sock[event.sock_id] = key
        if len(self._conns) > MAX_CONNECTIONS:
            old_key, old = self._conns.popitem(last=False)
            self._closing.pop(old_key, None)
            if self._by_sock.get(old.sock_id) == old_key:
                del self._by_sock[old.sock_id]
            self.stats.evicted += 1
        return conn

    def _on_gave_up(self, session: StreamSession, conn: _Conn, datagram: bool = False) -> None:
        if session.state is State.UNKNOWN:
            self.stats.unknown += 1
        else:
            protocol = session.protocol or "?"
            self.stats.undecodable[protocol] = self.stats.undecodable.get(protocol, 0) + 1
            log.info("connection %x: %s stream undecodable: %s", conn.conn_id or conn.sock_id, protocol,
                     session.reason)  # fmt: skip
        # Muted in the kernel: it can never be decoded again (a stream that lost its framing
        # resynchronises at its next request and stays active, see deetune.decoders.session).
        # A datagram socket is muted by its cookie (the kernel never sees it close to forget its
        # address); one without a cookie is not muted.
        if self.mute is not None and not (datagram and not conn.conn_id):
            self.mute(conn.conn_id if datagram else conn.sock_id)

    def _exchange_event(self, conn: _Conn, x: Exchange) -> ExchangeEvent:
        if x.error and x.response_start_ns is not None and x.protocol in KERNEL_COUNTED:
            reported = self._errors_reported
            key = (conn.conn_id or conn.sock_id, x.response_start_ns)
            waiting = self._parked.get(key)
            if waiting and waiting[0][2] is not conn:  # reported by its own decoding: not by the heads
                waiting.pop(0)
                self.stats.error_heads_duplicate += 1
                if not waiting:
                    del self._parked[key]
            reported[key] = reported.get(key, 0) + 1
            if len(reported) > 4096:
                reported.popitem(last=False)
        if conn.rep_req >= 0:
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
        # ExchangeEvent.from_exchange, its arguments in order (this runs once per exchange).
        event = exchange_event(
            x,
            conn.clock_offset,
            conn.pid,
            conn.comm,
            conn.session.role or "unknown",  # role
            conn.laddr,
            conn.lport,
            conn.raddr,
            conn.rport,
            conn.sock_id,
            conn.cgroup_id,
            conn.conn_id,
            # Errors of the kernel-counted protocols are all decoded (the kernel copies the heads of
            # those on connections it does not copy): each stands for itself.
            1 if x.error and x.protocol in KERNEL_COUNTED else conn.sampling,  # sampling
            request_payload,
            response_payload,
        )
        if conn.tls:
            event.attributes["tls"] = True
        return event

    def flush(self) -> list[Event]:
        """At stop: exchanges still pending in open connections (e.g. requests without a response yet)."""
        out: list[Event] = []
        now = time.monotonic_ns()
        for key, conn in self._conns.items():
            closing = self._closing.get(key)
            out.extend(self._own_events(conn, conn.session.close(now if closing is None else closing[0])))
            self._take_counts(conn.session)
        for conn in self._datagrams.values():
            for x in conn.session.close(now):
                conn.raddr, conn.rport = x.peer if x.peer is not None else (conn.raddr, conn.rport)
                out.append(self._exchange_event(conn, x))
                self.stats.exchanges += 1
        self._conns.clear()
        self._by_sock.clear()
        self._datagrams.clear()
        self._closing.clear()
        while self._parked:
            out.extend(self._report_parked(self._parked.popitem(last=False)[1]))
        if self.stats.resynced or self.stats.gaps or self.stats.skipped:
            log.info("L7: %d gaps (%d bytes), %d resyncs; skipped: %s", self.stats.gaps, self.stats.gap_bytes,
                     self.stats.resynced, self.stats.skipped)  # fmt: skip
        return out
