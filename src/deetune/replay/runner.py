"""Sending the planned exchanges: workers, rate limit, outcomes in recorded order."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from deetune.recording.model import RecordedExchange
from deetune.replay.compare import Diff
from deetune.replay.handlers import Handler, Plan, Skip
from deetune.replay.protocols import ProtocolError, ReplayError

MATCH, MISMATCH, SKIPPED, ERROR = "match", "mismatch", "skipped", "error"


@attrs.define
class Outcome:
    """What became of one recorded exchange."""

    seq: int
    protocol: str
    method: str
    target: str
    result: str
    diffs: list[Diff] = attrs.field(factory=list)
    #: Why it was skipped, or what went wrong.
    reason: str | None = None
    latency_recorded_ns: int | None = None
    latency_replayed_ns: int | None = None

    @classmethod
    def of(cls, exchange: RecordedExchange, result: str, **kwargs: Any) -> Outcome:
        return cls(exchange.seq, exchange.protocol, exchange.method, exchange.target, result,
                   latency_recorded_ns=exchange.latency_ns, **kwargs)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seq": self.seq, "protocol": self.protocol, "method": self.method, "target": self.target,
            "result": self.result, "diffs": [d.to_json() for d in self.diffs],
            "latency_recorded_ns": self.latency_recorded_ns, "latency_replayed_ns": self.latency_replayed_ns,
        }  # fmt: skip
        if self.reason is not None:
            out["reason"] = self.reason
        return out


class RateLimiter:
    """At most ``rate`` starts per second, over all workers."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next: float | None = None
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            slot = now if self._next is None else max(self._next, now)
            self._next = slot + self._interval
        if slot > now:
            time.sleep(slot - now)


def plan_all(exchanges: Iterable[RecordedExchange], handler: Handler,
             selected: Callable[[RecordedExchange], str | None] = lambda e: None) -> list[Plan | Outcome]:
    """A plan per exchange, or its outcome when it is not sent (skipped, or its recording unreadable)."""
    out: list[Plan | Outcome] = []
    for exchange in exchanges:
        reason = selected(exchange)
        if reason is not None:
            out.append(Outcome.of(exchange, SKIPPED, reason=reason))
            continue
        if exchange.request_truncated:
            out.append(Outcome.of(exchange, SKIPPED, reason=(
                f"request truncated in the recording ({len(exchange.request)} of {exchange.request_size} bytes)")))
            continue
        try:
            plan = handler.plan(exchange)
        except Exception as exc:  # ProtocolError, or a slip on bytes nobody foresaw
            detail = str(exc) if isinstance(exc, ProtocolError) else f"{type(exc).__name__}: {exc}"
            out.append(Outcome.of(exchange, ERROR, reason=f"the recorded exchange cannot be parsed: {detail}"))
            continue
        if isinstance(plan, Skip):
            out.append(Outcome.of(exchange, SKIPPED, reason=plan.reason))
        else:
            out.append(plan)
    return out


def run(plans: Sequence[Plan | Outcome], handler: Handler, concurrency: int = 1, rate: float | None = None,
        on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Send every plan (one connection per worker); outcomes in recorded order.

    With one worker the exchanges go strictly in recorded order on one connection; with more,
    each worker takes the next exchange in order, so exchanges overlap.
    """
    outcomes: dict[int, Outcome] = {}
    todo = [(index, item) for index, item in enumerate(plans) if isinstance(item, Plan)]
    for index, item in enumerate(plans):
        if isinstance(item, Outcome):
            outcomes[index] = item
    lock = threading.Lock()
    limiter = RateLimiter(rate)
    position = iter(todo)

    def work() -> None:
        connection = handler.open()
        try:
            while True:
                with lock:
                    item = next(position, None)
                if item is None:
                    return
                index, plan = item
                limiter.wait()
                outcome = _one(handler, connection, plan)
                with lock:
                    outcomes[index] = outcome
                if on_outcome is not None:
                    on_outcome(outcome)
        finally:
            try:
                handler.close(connection)
            except Exception:
                pass

    workers = max(1, min(concurrency, len(todo)))
    if workers == 1:
        work()
    else:
        threads = [threading.Thread(target=work, name=f"replay-{n}", daemon=True) for n in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    missing = [index for index, _ in todo if index not in outcomes]
    for index in missing:  # a worker died on something unexpected
        outcomes[index] = Outcome.of(plans[index].exchange, ERROR, reason="not replayed: its worker failed")
    return [outcomes[index] for index in range(len(plans))]


def _one(handler: Handler, connection: Any, plan: Plan) -> Outcome:
    exchange = plan.exchange
    try:
        replayed, latency = handler.execute(connection, plan)
    except ReplayError as exc:
        return Outcome.of(exchange, ERROR, reason=str(exc))
    except (ProtocolError, ValueError, IndexError) as exc:
        return Outcome.of(exchange, ERROR, reason=f"unexpected response: {exc}")
    except Exception as exc:  # a slip in replay itself: reported, never a crash mid-run
        return Outcome.of(exchange, ERROR, reason=f"replay failed: {type(exc).__name__}: {exc}")
    try:
        diffs = handler.compare(plan, replayed)
    except Exception as exc:
        return Outcome.of(exchange, ERROR, reason=f"comparison failed: {type(exc).__name__}: {exc}",
                          latency_replayed_ns=latency)
    return Outcome.of(exchange, MISMATCH if diffs else MATCH, diffs=diffs, latency_replayed_ns=latency)
