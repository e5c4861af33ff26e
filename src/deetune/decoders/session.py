"""One connection's byte streams through detection and a decoder.

Shared by live capture (:mod:`deetune.l7`) and offline pcap decoding
(:mod:`deetune.offline`), so both produce the same exchanges.

Chunks arrive as *egress* (this side wrote) or *ingress* (this side read).
Which of them is the request direction depends on the side's role: a client
writes requests, a server reads them.  When the role is not known (the
connection predates the agent, or its open was not seen yet), detection by
content settles it: bytes that look like a request were sent by the client.
"""

from __future__ import annotations

import enum
import logging
from typing import Iterable, Mapping, Sequence

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable

log = logging.getLogger("deetune.decoders")

#: Chunks with data seen without recognising a protocol before giving up.
DETECTION_CHUNKS = 4


class State(enum.Enum):
    DETECTING = "detecting"
    DECODING = "decoding"
    #: No decoder recognised the bytes: not a protocol we decode.
    UNKNOWN = "unknown"
    #: A decoder gave up (malformed, out of sync, TLS …).
    UNDECODABLE = "undecodable"


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
        #: One line: why the session stopped decoding.
        self.reason: str | None = None
        self._candidates = _order_by_port(decoders, ports)
        #: Protocol → keyword arguments for that decoder's constructor.
        self._options = options or {}
        self._undetected_chunks = 0
        # Chunks seen before the protocol was known are replayed into the decoder.
        self._held: list[tuple[bool, bytes, int, int]] = []

    @property
    def active(self) -> bool:
        return self.state in (State.DETECTING, State.DECODING)

    def set_role(self, role: str) -> None:
        if self.role is None:
            self.role = role

    def feed(self, egress: bool, data: bytes, size: int, ts_ns: int) -> list[Exchange]:
        """Bytes this side wrote (``egress``) or read; ``size`` >= len(data) moved."""
        if self.state is State.DETECTING:
            self._held.append((egress, data, size, ts_ns))
            if not self._detect(egress, data):
                if data:
                    self._undetected_chunks += 1
                if self._undetected_chunks >= DETECTION_CHUNKS:
                    self._give_up(State.UNKNOWN, "no decoder recognised the bytes")
                return []
            held, self._held = self._held, []
            out: list[Exchange] = []
            for item in held:
                out.extend(self._decode(*item))
                if not self.active:
                    break
            return out
        if self.state is State.DECODING:
            return self._decode(egress, data, size, ts_ns)
        return []

    def close(self, ts_ns: int) -> list[Exchange]:
        """The connection ended: what the decoder still holds that is worth reporting."""
        if self.state is not State.DECODING or self.decoder is None:
            return []
        try:
            return list(self.decoder.close(ts_ns))
        except Undecodable as exc:
            self._give_up(State.UNDECODABLE, str(exc))
        except Exception as exc:  # a plugin's bug must not take the agent down
            self._give_up(State.UNDECODABLE, f"{type(exc).__name__} in {self.protocol} decoder: {exc}")
        return []

    # -- internals ----------------------------------------------------------------------
    def _direction(self, egress: bool) -> Direction:
        client = self.role == "client"
        return Direction.REQUEST if egress == client else Direction.RESPONSE

    def _detect(self, egress: bool, data: bytes) -> bool:
        if not data:
            return False
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
        self.decoder = cls(**self._options.get(cls.protocol, {}))
        self.protocol = cls.protocol
        self.state = State.DECODING
        return True

    def _decode(self, egress: bool, data: bytes, size: int, ts_ns: int) -> list[Exchange]:
        assert self.decoder is not None
        chunk = Chunk(self._direction(egress), data, max(size, len(data)), ts_ns)
        try:
            return list(self.decoder.feed(chunk))
        except Undecodable as exc:
            self._give_up(State.UNDECODABLE, str(exc))
        except Exception as exc:
            self._give_up(State.UNDECODABLE, f"{type(exc).__name__} in {self.protocol} decoder: {exc}")
        return []

    def _give_up(self, state: State, reason: str) -> None:
        self.state = state
        self.reason = reason
        self.decoder = None
        self._held = []
        log.debug("stream %s: %s", state.value, reason)


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
