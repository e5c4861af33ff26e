"""Weights of the detail: how many exchanges each decoded one stands for.

Under overload the payload probe copies the calls of 1 connection-period in N, so the decoded
exchanges (the detail: targets, statements, error messages, spans, recordings) are a sample.
The kernel counts every exchange (deetune.accounting), per edge side, method and status.  This
pipeline handler, placed after the L7 handler, holds each decoded exchange of a kernel-counted
protocol until the next read of the kernel's counts, then gives it the weight that makes the
decoded exchanges of its edge side add up to what the kernel counted.  Errors stand for
themselves: the kernel copies the heads of every one (up to a rate: those beyond it are counted,
``error_heads_capped`` on the stop line, not weighed).  A weight is never below 1: an exchange
decoded before the kernel's count of it moved (a read falls between the two) is carried to the
next read.  The weight is ``ExchangeEvent.sampling``.

Exchanges of protocols the kernel does not count keep the weight the probe gave them (the
connection-period sampling, ``DataEvent.sampling``), and pass at once.
"""

from __future__ import annotations

from typing import Iterable

import attrs

from deetune.accounting import EXCHANGE_OUTCOMES, OUTCOME_ERROR
from deetune.events import Event, ExchangeEvent, RequestCounts
from deetune.l7 import KERNEL_COUNTED

#: Exchanges held at most (the oldest are let go with the weight they have).
MAX_HELD = 100_000


def _side(event: ExchangeEvent) -> tuple:
    """The kernel's key of the edge side that saw this exchange (without method and status)."""
    port = event.lport if event.role == "server" else event.rport
    return event.role, event.pid, event.raddr, port, event.protocol


#: Reads of the counts after which an edge side that saw nothing is forgotten.
IDLE_TICKS = 60


@attrs.define
class _Tally:
    """One edge side's counts and decoded exchanges, errors and the rest apart ([0]: not errors)."""

    counted: list[int] = attrs.field(factory=lambda: [0, 0])
    #: Reads since anything happened on this side.
    idle: int = 0
    #: Weight handed out so far, per kind.
    weighed: list[float] = attrs.field(factory=lambda: [0.0, 0.0])
    held: list[list[ExchangeEvent]] = attrs.field(factory=lambda: [[], []])


@attrs.define
class DetailStats:
    weighed: int = 0
    #: Exchanges let go early to stay within MAX_HELD.
    released_early: int = 0


class DetailWeigher:
    """Pipeline handler: weights decoded exchanges by the kernel's exact counts (module doc)."""

    def __init__(self) -> None:
        self._sides: dict[tuple, _Tally] = {}
        self._held = 0
        self.stats = DetailStats()

    def __call__(self, event: Event) -> Iterable[Event]:
        if isinstance(event, RequestCounts):
            if event.outcome in EXCHANGE_OUTCOMES and event.count:
                key = (event.role, event.pid, event.raddr, event.port, event.protocol)
                tally = self._sides.get(key)
                if tally is None:
                    tally = self._sides[key] = _Tally()
                tally.counted[event.outcome == OUTCOME_ERROR] += event.count
                tally.idle = 0
            return (event,)
        if not isinstance(event, ExchangeEvent) or event.protocol not in KERNEL_COUNTED:
            return (event,)
        if event.error:
            return (event,)  # every error is decoded: each stands for itself (L7Handler says 1)
        key = _side(event)
        tally = self._sides.get(key)
        if tally is None:
            tally = self._sides[key] = _Tally()
        tally.held[bool(event.error)].append(event)
        tally.idle = 0
        self._held += 1
        if self._held > MAX_HELD:
            return self._release(early=True)
        return ()

    def tick(self) -> list[Event]:
        """After each read of the kernel's counts (the pipeline ticks handlers right after it)."""
        return self._release()

    def flush(self) -> list[Event]:
        return self._release()

    def _release(self, early: bool = False) -> list[Event]:
        out: list[Event] = []
        set_weight = _weight_setter()
        for key, tally in list(self._sides.items()):
            for kind in (0, 1):
                held = tally.held[kind]
                if not held:
                    continue
                # What the kernel counted and no decoded exchange stood for yet, shared out.
                owed = tally.counted[kind] - tally.weighed[kind]
                weight = max(1.0, owed / len(held))
                if weight == int(weight):
                    weight = int(weight)
                for event in held:
                    set_weight(event, weight)
                tally.weighed[kind] += weight * len(held)
                out.extend(held)
                tally.held[kind] = []
            tally.idle += 1
            if tally.idle > IDLE_TICKS:
                del self._sides[key]  # a side long quiet (a client process gone): its totals go too
        self.stats.weighed += len(out)
        if early:
            self.stats.released_early += len(out)
        self._held = 0
        # Oldest first, as they were decoded.
        out.sort(key=lambda e: e.ts_mono_ns)
        return out


def _weight_setter():
    """Sets ``sampling`` in place: the event is fresh from the L7 handler, not seen by anyone yet
    (as the aggregator sets the service names, see deetune.topology.aggregator._enricher)."""
    descriptor = next((k.__dict__["sampling"] for k in ExchangeEvent.__mro__ if "sampling" in k.__dict__), None)
    if type(descriptor).__name__ == "member_descriptor":
        return descriptor.__set__
    return lambda event, weight: object.__setattr__(event, "sampling", weight)


__all__ = ["DetailWeigher", "DetailStats", "MAX_HELD"]
