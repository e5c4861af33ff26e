"""One connection's byte streams through detection and a decoder.

Shared by live capture (:mod:`deetune.l7`) and offline pcap decoding
(:mod:`deetune.offline`), so both produce the same exchanges.

Chunks arrive as *egress* (this side wrote) or *ingress* (this side read).
Which of them is the request direction depends on the side's role: a client
writes requests, a server reads them.  When the role is not known (the
connection predates the agent, or its open was not seen yet), detection by
content settles it: bytes that look like a request were sent by the client.

Detection looks for the first message it recognises, not only at the first
byte: a connection older than the capture starts in the middle of something.
Every chunk with data may start a message; its bytes are joined with the
chunks that follow it in the same direction (a MySQL server reads a packet's
header and its body in two calls) and shown to the decoders' ``detect`` until
one says yes, or the join is long enough to tell.  Decoding starts at that
chunk; what came before it is skipped.

When a decoder gives up (:class:`~deetune.decoders.base.Undecodable`: a gap
that hid its framing, bytes it cannot follow), the session reports what the
decoder completed and what it still held, and resynchronises: a fresh decoder
of the same protocol starts at the next chunk it recognises as a request, and
responses before that chunk are skipped (they answer requests that were not
seen).  Each resync is counted by its reason.  A connection that keeps failing
is given up.
"""

from __future__ import annotations

import enum
import logging
from typing import Iterable, Mapping, Sequence

import attrs

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable
from deetune.events import positional_builder

log = logging.getLogger("deetune.decoders")

#: Chunks with data seen without recognising a protocol before giving up (when the role is
#: known, only chunks in the request direction count: a response body under way is no reason).
DETECTION_CHUNKS = 16
#: Bytes seen without recognising a protocol before giving up, whatever the chunks.
DETECTION_BYTES = 1 << 20
#: Bytes of one candidate start shown to ``detect`` at most.
DETECT_WINDOW = 1024
#: Candidate starts per direction tried at once (the latest are kept).
MAX_CANDIDATES = 8
#: Request chunks a resynchronising session lets by without recognising a request.
RESYNC_CHUNKS = 64
#: Resyncs in a row without an exchange in between before the connection is given up.
MAX_RESYNCS = 8


class State(enum.Enum):
    DETECTING = "detecting"
    DECODING = "decoding"
    #: No decoder recognised the bytes: not a protocol we decode.
    UNKNOWN = "unknown"
    #: A decoder gave up for good (TLS, compressed, kept failing …).
    UNDECODABLE = "undecodable"
    #: A decoder gave up; the next request starts a fresh one.
    RESYNCING = "resyncing"


class _Candidate:
    """A chunk where a message may start, and the bytes from it on in its direction."""

    __slots__ = ("index", "joined", "open")

    def __init__(self, index: int, data: bytes, complete: bool) -> None:
        self.index = index  # position in the session's held chunks
        self.joined = bytearray(data[:DETECT_WINDOW])
        #: Whether the next chunk of the direction continues these bytes (no gap in between).
        self.open = complete and len(self.joined) < DETECT_WINDOW


class StreamSession:
    """Detection then decoding for one connection, from one side's point of view."""

    def __init__(
        self,
        decoders: Sequence[type[Decoder]],
        role: str | None = None,
        *,
        ports: Sequence[int] = (),
        options: Mapping[str, Mapping[str, object]] | None = None,
    ):
        #: ``"client"``, ``"server"`` or None until known.
        self.role = role
        self.state = State.DETECTING
        self.decoder: Decoder | None = None
        self.protocol: str | None = None
        #: One line: why the session stopped decoding (or last resynchronised).
        self.reason: str | None = None
        #: Resyncs so far (see the module's docstring).
        self.resyncs = 0
        #: What was skipped or repaired, by name (see :meth:`take_counts`).
        self.counts: dict[str, int] = {}
        self._candidates = _order_by_port(decoders, ports)
        #: Protocol → keyword arguments for that decoder's constructor.
        self._options = options or {}
        self._undetected_chunks = 0
        self._undetected_bytes = 0
        self._resyncs_in_a_row = 0
        # Chunks seen since the oldest candidate start, replayed into the decoder once one is
        # recognised: (egress, data, size, ts, peer).
        self._held: list[tuple[bool, bytes, int, int, object]] = []
        self._starts: dict[bool, list[_Candidate]] = {True: [], False: []}
        #: The recognised protocol's decoder class (a fresh instance after each resync).
        self._decoder_cls: type[Decoder] | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    def set_role(self, role: str) -> None:
        if self.role is None:
            self.role = role

    def take_counts(self) -> dict[str, int]:
        """What was skipped or repaired since the last call, by name (``resync:gap``,
        ``unsolicited_response``, ``skipped_bytes`` …), and start again from none."""
        counts, self.counts = self.counts, {}
        return counts

    def feed(self, egress: bool, data: bytes, size: int, ts_ns: int, peer: object = None) -> list[Exchange]:
        """Bytes this side wrote (``egress``) or read; ``size`` >= len(data) moved.  A chunk
        with no data and a ``size`` is a gap: bytes that moved but were not seen.  ``peer``: on a
        datagram socket, the datagram's other end (see :attr:`Chunk.peer`)."""
        if size < len(data):
            size = len(data)
        if not size:
            return []
        state = self.state
        if state is _DECODING:
            return self._decode(egress, data, size, ts_ns, peer)
        if state is _DETECTING or state is _RESYNCING:
            return self._look(egress, data, size, ts_ns, peer)
        return []

    def close(self, ts_ns: int) -> list[Exchange]:
        """The connection ended: what the decoder still holds that is worth reporting."""
        if self.state is not State.DECODING or self.decoder is None:
            return []
        try:
            return list(self.decoder.close(ts_ns))
        except Exception as exc:  # a plugin's bug must not take the agent down
            self._give_up(State.UNDECODABLE, f"{type(exc).__name__} in {self.protocol} decoder at close: {exc}")
        return []

    # -- detection ------------------------------------------------------------------------
    def _look(self, egress: bool, data: bytes, size: int, ts: int, peer: object = None) -> list[Exchange]:
        """Hold the chunk and look for a message start in it or in the chunks joined to it."""
        resyncing = self.state is State.RESYNCING
        request_side = self.role is not None and egress == (self.role == "client")
        if resyncing and not request_side:
            if not self._held:  # no request start in sight: this answers a request not seen
                self._count("skipped_bytes", size)
                return []
        self._held.append((egress, data, size, ts, peer))
        starts = self._starts[egress]
        found = None
        # Earlier starts in this direction, continued by this chunk.
        for candidate in starts:
            if not candidate.open:
                continue
            if not data:
                candidate.open = False
                continue
            candidate.joined += data[: DETECT_WINDOW - len(candidate.joined)]
            candidate.open = size == len(data) and len(candidate.joined) < DETECT_WINDOW
            if found is None and self._detect(egress, bytes(candidate.joined)):
                found = candidate.index
        if found is None and data and (not resyncing or request_side):
            candidate = _Candidate(len(self._held) - 1, data, size == len(data))
            if self._detect(egress, bytes(candidate.joined)):
                found = candidate.index
            else:
                starts.append(candidate)
        if found is not None:
            return self._start_at(found)
        # Not recognised (yet).  With the role known, a response body under way counts no chunks.
        if data and (request_side or self.role is None):
            self._undetected_chunks += 1
        self._undetected_bytes += size
        if resyncing:
            if self._undetected_chunks >= RESYNC_CHUNKS:
                self._give_up(State.UNDECODABLE, f"no {self.protocol} request recognised after a resync")
        elif self._undetected_chunks >= DETECTION_CHUNKS or self._undetected_bytes >= DETECTION_BYTES:
            self._give_up(State.UNKNOWN, "no decoder recognised the bytes")
        if self.active:
            self._forget_dead_starts()
        return []

    def _forget_dead_starts(self) -> None:
        """Drop candidates that can no longer be recognised, and the chunks held only for them."""
        for egress in (True, False):
            live = [c for c in self._starts[egress] if c.open]
            self._starts[egress] = live[-MAX_CANDIDATES:]
        first = min((c.index for s in self._starts.values() for c in s), default=len(self._held))
        if first:
            self._count("skipped_bytes", sum(item[2] for item in self._held[:first]))
            del self._held[:first]
            for starts in self._starts.values():
                for candidate in starts:
                    candidate.index -= first

    def _detect(self, egress: bool, data: bytes) -> bool:
        if self.state is State.RESYNCING:
            return _safe_detect(self._decoder_cls, Direction.REQUEST, data)  # type: ignore[arg-type]
        for cls in self._candidates:
            if self.role is not None:
                if _safe_detect(cls, self._direction(egress), data):
                    return self._start(cls)
                continue
            # Role unknown: whichever way the bytes make sense tells the role.
            if _safe_detect(cls, Direction.REQUEST, data):
                self.role = "client" if egress else "server"
                return self._start(cls)
            if _safe_detect(cls, Direction.RESPONSE, data):
                self.role = "server" if egress else "client"
                return self._start(cls)
        return False

    def _start(self, cls: type[Decoder]) -> bool:
        self._decoder_cls = cls
        self.protocol = cls.protocol
        return True

    def _start_at(self, index: int) -> list[Exchange]:
        """Decode from the held chunk ``index`` on; what came before it is skipped."""
        held, self._held = self._held, []
        self._starts = {True: [], False: []}
        skipped = sum(item[2] for item in held[:index])
        if skipped:
            self._count("skipped_bytes", skipped)
        cls = self._decoder_cls
        assert cls is not None
        self.decoder = cls(**self._options.get(cls.protocol, {}))
        self.state = State.DECODING
        self._undetected_chunks = self._undetected_bytes = 0
        out: list[Exchange] = []
        for position, item in enumerate(held[index:]):
            if self.state is State.DECODING:
                out.extend(self._decode(*item))
            elif self.state is State.RESYNCING:
                # Failed again during the replay: the rest is looked at afresh.
                for later in held[index + position:]:
                    out.extend(self._look(*later))
                break
            else:
                break
        return out

    # -- decoding -------------------------------------------------------------------------
    def _direction(self, egress: bool) -> Direction:
        client = self.role == "client"
        return Direction.REQUEST if egress == client else Direction.RESPONSE

    def _decode(self, egress: bool, data: bytes, size: int, ts_ns: int, peer: object = None) -> list[Exchange]:
        decoder = self.decoder
        assert decoder is not None
        # As _direction says, inlined (this runs once per chunk); Chunk positionally (see
        # deetune.events.positional_builder).
        chunk = _build_chunk(_REQUEST if egress == (self.role == "client") else _RESPONSE, data, size, ts_ns, peer)
        try:
            out = decoder.feed(chunk)
            out = list(out) if out else []
        except Undecodable as exc:
            return self._resync(exc.exchanges, exc.reason, str(exc), ts_ns)
        except Exception as exc:
            return self._resync([], "decoder_error", f"{type(exc).__name__} in {self.protocol} decoder: {exc}",
                                ts_ns)  # fmt: skip
        if getattr(decoder, "counts", None):
            self._take_decoder_counts()
        if out:
            self._resyncs_in_a_row = 0
        return out

    def _resync(self, completed: list[Exchange], reason: str, message: str, ts_ns: int) -> list[Exchange]:
        """The decoder gave up: report what it completed and holds, then wait for a request."""
        decoder = self.decoder
        out = list(completed)
        try:
            held = list(decoder.close(ts_ns)) if decoder is not None else []
        except Exception:  # its state is what made it fail: what it held is lost
            held = []
        for exchange in held:
            exchange.attributes["gap"] = True
        out.extend(held)
        if decoder is not None and getattr(decoder, "counts", None):
            self._take_decoder_counts()
        self._resyncs_in_a_row = 0 if completed else self._resyncs_in_a_row + 1
        self.reason = message
        self.decoder = None
        if (self.role is None or self.protocol is None or reason == "unsupported"
                or self._resyncs_in_a_row > MAX_RESYNCS):
            self._give_up(State.UNDECODABLE, message)
        else:
            self._count(f"resync:{reason}")
            self.resyncs += 1
            log.debug("stream %s resynchronising: %s", self.protocol, message)
            self.state = State.RESYNCING
            self._held = []
            self._starts = {True: [], False: []}
            self._undetected_chunks = self._undetected_bytes = 0
        return out

    def _take_decoder_counts(self) -> None:
        take = getattr(self.decoder, "take_counts", None)
        if take is None:
            return
        try:
            for name, n in take().items():
                self._count(name, n)
        except Exception:  # a plugin's counts are a courtesy
            pass

    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def _give_up(self, state: State, reason: str) -> None:
        self.state = state
        self.reason = reason
        self.decoder = None
        self._held = []
        self._starts = {True: [], False: []}
        log.debug("stream %s: %s", state.value, reason)


_DECODING = State.DECODING
_DETECTING = State.DETECTING
_RESYNCING = State.RESYNCING
#: The states of a session that decodes (:attr:`StreamSession.active`), the usual one first.
ACTIVE_STATES = (State.DECODING, State.DETECTING, State.RESYNCING)
_REQUEST = Direction.REQUEST
_RESPONSE = Direction.RESPONSE
_build_chunk = positional_builder(Chunk)
assert [f.name for f in attrs.fields(Chunk)] == ["direction", "data", "size", "ts_ns", "peer"]


def _safe_detect(cls: type[Decoder], direction: Direction, data: bytes) -> bool:
    try:
        return bool(cls.detect(direction, data))
    except Exception as exc:  # detect must not raise; a plugin that does is skipped
        log.debug("%s.detect raised %s", cls.__name__, exc)
        return False


def _order_by_port(decoders: Iterable[type[Decoder]], ports: Sequence[int]) -> list[type[Decoder]]:
    """Decoders whose usual port is one of ``ports`` first, then by ``detect_order``: a hint for
    ambiguous bytes, never a filter (the sort is stable)."""
    return sorted(decoders, key=lambda cls: (not any(p in getattr(cls, "default_ports", ()) for p in ports),
                                             getattr(cls, "detect_order", 0)))
