"""Weights of the detail: how many exchanges each decoded one stands for.

Under overload the payload probe copies the calls of 1 connection-period in N, so the decoded
exchanges (the detail: targets, statements, error messages, spans, recordings) are a sample.
The kernel counts every exchange (deetune.accounting), per edge side, method and status, and the
pipeline reads those counts once a second.  This handler, placed after the L7 handler, matches
each read with the decoded exchanges whose response came before it (the counts' own read time)
and after the previous read, once the rings have been read SETTLE_NS past it (the pipeline says
when: ``drained``; a response's last bytes come after the first, which the kernel counted), and
gives each the weight that makes them add up to what the kernel counted over the same time:

- A read whose exchanges were all copied (no overload sampling) weighs 1 each, more only where
  the kernel counted exchanges the agent did not see (records lost, calls left out).
- A batch of sampled exchanges (or one with under half of what its read counted) waits for
  the next read that has decoded exchanges of its edge side (up to HOLD_TICKS reads) and stands
  for the counts of the reads between, in which the sampling copied none: when the traffic
  stops, the last sampled exchanges stand for its end.
- Errors stand for themselves: the kernel copies the heads of every one (up to a rate: those
  beyond it are counted, ``error_heads_capped`` on the stop line, not weighed).
- A weight is never below 1; what a weight takes ahead of the counts is carried to the next.

The weight is ``ExchangeEvent.sampling``.  Exchanges of protocols the kernel does not count keep
the weight the probe gave them (the connection-period sampling, ``DataEvent.sampling``) and pass
at once.
"""

from __future__ import annotations

import collections
import time
from typing import Iterable

import attrs

from deetune.accounting import EXCHANGE_OUTCOMES, OUTCOME_ERROR
from deetune.events import Event, ExchangeEvent, RequestCounts
from deetune.l7 import KERNEL_COUNTED

#: Exchanges held at most (beyond, all those waiting go at once, see _release_early; counted as
#: ``released_early``): about half a kilobyte each.  A flood of sampled exchanges
#: (held HOLD_TICKS reads) reached 89,000 held, 43 MB of the agent's memory (bench/soak.py).
MAX_HELD = 10_000
#: Reads a batch of sampled exchanges waits for the next batch of its edge side.
HOLD_TICKS = 5
#: Reads a read waits for the rings to be read past it (a backlog longer than that: weighed as is).
MAX_WAIT_TICKS = 10
#: Reads of the counts after which an edge side that saw nothing is forgotten.
IDLE_TICKS = 60
#: How far past a read the rings must have been read before it is weighed: the exchanges it
#: counted at their response's first byte are decoded at its last.
SETTLE_NS = 250_000_000


def _answered_at(event: ExchangeEvent) -> int:
    """When the kernel counted it: its response (the end of the exchange), in kernel time."""
    return event.ts_mono_ns + (event.duration_ns or 0)


@attrs.define
class _Read:
    """One read of the counts for one edge side: what it counted and the exchanges answered
    after the previous read and up to ``end_ns``."""

    end_ns: int
    counted: int
    decoded: list[ExchangeEvent]


@attrs.define
class _Tally:
    """One edge side (errors aside: each is decoded and stands for itself)."""

    #: Counted since the last read.
    counting: int = 0
    #: When the kernel's counts were last read (monotonic; 0: not said, the tick's time is).
    read_ns: int = 0
    #: Decoded exchanges answered after the last read.
    fresh: list[ExchangeEvent] = attrs.field(factory=list)
    #: Weight given to exchanges of ``fresh`` let go early: the next read's count is less that.
    prepaid: float = 0.0
    #: Reads waiting for the rings to be read past them, oldest first.
    reads: collections.deque = attrs.field(factory=collections.deque)
    #: Counted and not yet stood for by any decoded exchange (negative: weights took ahead).
    owed: float = 0.0
    #: A batch of sampled exchanges waiting for the next batch (or HOLD_TICKS reads).
    held: list[ExchangeEvent] = attrs.field(factory=list)
    #: The read (DetailWeigher's count of them) that made ``held`` wait.
    held_at: int = 0
    #: Reads since anything happened on this side.
    idle: int = 0
    #: The last weight given here: what an exchange let go before its count is read stands for.
    ratio: float = 1.0

    def waiting(self) -> int:
        return len(self.fresh) + len(self.held) + sum(len(r.decoded) for r in self.reads)


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
        self._reads = 0
        #: The rings were read up to here (kernel time); None: no pipeline says, each read is.
        self._drained_ns: int | None = None
        #: When the kernel's counts were last read (any side's; 0: not since the last tick).
        self._read_ns = 0
        self.stats = DetailStats()
        self._set_weight = _weight_setter()

    def drained(self, through_ns: int) -> None:
        """The pipeline read every record the probes wrote before ``through_ns`` (monotonic)."""
        self._drained_ns = through_ns

    def __call__(self, event: Event) -> Iterable[Event]:
        if isinstance(event, RequestCounts):
            self._read_ns = max(self._read_ns, event.ts_mono_ns)
            if event.outcome in EXCHANGE_OUTCOMES and event.outcome != OUTCOME_ERROR and event.count:
                key = (event.role, event.pid, event.raddr, event.port, event.protocol)
                tally = self._sides.get(key)
                if tally is None:
                    tally = self._sides[key] = _Tally()
                tally.counting += event.count
                tally.read_ns = max(tally.read_ns, event.ts_mono_ns)
            return (event,)
        if not isinstance(event, ExchangeEvent) or event.protocol not in KERNEL_COUNTED:
            return (event,)
        if event.error:
            return (event,)  # every error is decoded: each stands for itself (L7Handler says 1)
        # The kernel's key of the edge side that saw it (without method and status), as the counts'
        # (RequestCounts above); it and _answered_at(event) inlined: this runs once per exchange.
        role = event.role
        key = (role, event.pid, event.raddr, event.lport if role == "server" else event.rport, event.protocol)
        tally = self._sides.get(key)
        if tally is None:
            tally = self._sides[key] = _Tally()
        answered = event.ts_mono_ns + (event.duration_ns or 0)
        for read in tally.reads:  # a read still waiting for the rings: the exchange is its if before its end
            if answered <= read.end_ns:
                read.decoded.append(event)
                break
        else:
            tally.fresh.append(event)
        self._held += 1
        if self._held > MAX_HELD:
            return self._release_early()
        return ()

    def tick(self) -> list[Event]:
        """After each read of the kernel's counts (the pipeline ticks handlers right after it)."""
        now = time.monotonic_ns()
        self._reads += 1
        # Without a pipeline to say how far the rings were read, each read is weighed at once.
        drained = now + SETTLE_NS if self._drained_ns is None else self._drained_ns
        out: list[Event] = []
        for key, tally in list(self._sides.items()):
            busy = bool(tally.counting or tally.fresh)
            if busy:
                # Ends where the kernel's counts were read: exchanges answered after it (decoded
                # while the counts waited for the rings to be read) are the next read's.
                end = tally.read_ns or self._read_ns or now
                decoded = [e for e in tally.fresh if _answered_at(e) <= end]
                later = [e for e in tally.fresh if _answered_at(e) > end] if len(decoded) < len(tally.fresh) else []
                tally.reads.append(_Read(end, tally.counting - tally.prepaid, decoded))
                tally.counting, tally.fresh, tally.prepaid, tally.read_ns = 0, later, 0.0, 0
            while tally.reads and (tally.reads[0].end_ns + SETTLE_NS <= drained or len(tally.reads) > MAX_WAIT_TICKS):
                self._settle(tally, tally.reads.popleft(), out)
            if tally.held and self._reads - tally.held_at >= HOLD_TICKS:
                self._weigh(tally, tally.held, out)
                tally.held = []
            if busy or tally.reads or tally.held or tally.fresh:
                tally.idle = 0
            else:
                tally.idle += 1
                if tally.idle > IDLE_TICKS:
                    del self._sides[key]  # a side long quiet (a client process gone): its totals go too
        self._read_ns = 0
        return self._out(out)

    def flush(self) -> list[Event]:
        return self._release_all()

    def _settle(self, tally: _Tally, read: _Read, out: list[Event]) -> None:
        """A read the rings were read past: its decoded exchanges are all there."""
        if not read.decoded:
            tally.owed += read.counted  # the held batch's, or the next batch's
            return
        if tally.held:  # the counts up to this read were the held batch's to stand for
            self._weigh(tally, tally.held, out)
            tally.held = []
        tally.owed += read.counted
        # A sample (sampled calls, or under half of what was counted: connection-periods the
        # sampling left out) waits: the reads after it may decode nothing, and their counts are
        # then its to stand for, or no exchange would stand for them.  A few short (exchanges
        # counted at their response's first byte, decoded after its last) is no sample: at once.
        if tally.owed > 2 * len(read.decoded) or any(e.sampling != 1 for e in read.decoded):
            tally.held, tally.held_at = read.decoded, self._reads
        else:
            self._weigh(tally, read.decoded, out)

    def _release_early(self) -> list[Event]:
        """Past MAX_HELD (the agent far behind the kernel) every exchange still waiting goes now.
        One whose read's count is known gets its share of that count so far; one answered after
        the last read, the side's last weight.  Neither more than the probe's weight (1 when
        nothing was sampled: exact).  Its read's count, or the next, is then less what it took;
        what a read counted beyond is shared as usual by those decoded after."""
        out: list[Event] = []
        for tally in self._sides.values():
            if tally.held:
                self._weigh(tally, tally.held, out)
                tally.held = []
            for read in tally.reads:
                if read.decoded:
                    share = max(1.0, read.counted / len(read.decoded))
                    for event in read.decoded:
                        read.counted -= self._give(event, min(event.sampling, share))
                    tally.ratio = share
                    out.extend(read.decoded)
                    read.decoded = []
            for event in tally.fresh:
                tally.prepaid += self._give(event, min(event.sampling, tally.ratio))
            out.extend(tally.fresh)
            tally.fresh = []
        self.stats.released_early += len(out)
        return self._out(out)

    def _give(self, event: ExchangeEvent, weight: float) -> float:
        self._set_weight(event, int(weight) if weight == int(weight) else weight)
        return weight

    def _release_all(self) -> list[Event]:
        out: list[Event] = []
        for tally in self._sides.values():
            if tally.counting or tally.fresh:
                tally.reads.append(_Read(time.monotonic_ns(), tally.counting - tally.prepaid, tally.fresh))
                tally.counting, tally.fresh, tally.prepaid = 0, [], 0.0
            while tally.reads:
                self._settle(tally, tally.reads.popleft(), out)
            if tally.held:
                self._weigh(tally, tally.held, out)
                tally.held = []
        return self._out(out)

    def _weigh(self, tally: _Tally, batch: list[ExchangeEvent], out: list[Event]) -> None:
        """Shares out what is owed over ``batch``; a weight is never below 1."""
        weight = max(1.0, tally.owed / len(batch))
        for event in batch:
            self._give(event, weight)
        tally.owed -= weight * len(batch)
        tally.ratio = weight
        out.extend(batch)

    def _out(self, out: list[Event]) -> list[Event]:
        self._held = sum(t.waiting() for t in self._sides.values())
        self.stats.weighed += len(out)
        out.sort(key=lambda e: e.ts_mono_ns)  # oldest first, as they were decoded
        return out


def _weight_setter():
    """Sets ``sampling`` in place: the event is fresh from the L7 handler, not seen by anyone yet
    (as the aggregator sets the service names, see deetune.topology.aggregator._enricher)."""
    descriptor = next((k.__dict__["sampling"] for k in ExchangeEvent.__mro__ if "sampling" in k.__dict__), None)
    if type(descriptor).__name__ == "member_descriptor":
        return descriptor.__set__
    return lambda event, weight: object.__setattr__(event, "sampling", weight)


__all__ = ["DetailWeigher", "DetailStats", "HOLD_TICKS", "MAX_HELD", "MAX_WAIT_TICKS"]
