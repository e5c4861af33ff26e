"""Events the recorder hands to the store sink (and that other sinks may show)."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import attrs

from deetune.events import Event
from deetune.recording.model import RecordedExchange


@attrs.frozen
class RecordedEvent(Event):
    """One exchange a recording task recorded, redacted, for the store.

    Its JSON (``type: "recorded"``, what the jsonl and console sinks show) names the exchange
    and its sizes but carries none of its bytes: those go to the store only.
    """

    type: ClassVar[str] = "recorded"
    exchange: RecordedExchange = attrs.field(kw_only=True)
    #: Called (on the pipeline thread) by a sink that could not queue the event (full).
    on_drop: Callable[["RecordedEvent"], None] | None = attrs.field(kw_only=True, default=None, eq=False,
                                                                     repr=False)

    def to_json(self) -> dict[str, Any]:
        x = self.exchange
        return {"type": self.type, "ts": self.ts, "ts_mono_ns": self.ts_mono_ns, "task_id": x.task_id,
                "seq": x.seq, "protocol": x.protocol, "client": x.client, "server": x.server, "method": x.method,
                "target": x.target, "status": x.status, "request_size": x.request_size,
                "response_size": x.response_size, "request_stored": len(x.request),
                "response_stored": len(x.response), "request_truncated": x.request_truncated,
                "response_truncated": x.response_truncated, "redactions": list(x.redactions)}


@attrs.frozen
class RecordingStatusEvent(Event):
    """A task's state and counters, for the store (at each change of state, and about once a
    second while they change)."""

    type: ClassVar[str] = "recording"
    task_id: str = attrs.field(kw_only=True)
    state: str = attrs.field(kw_only=True)
    counters: dict[str, int] = attrs.field(kw_only=True)
    ports: tuple[int, ...] = attrs.field(kw_only=True, default=())
    started: int | None = attrs.field(kw_only=True, default=None)
    ended: int | None = attrs.field(kw_only=True, default=None)
    error: str | None = attrs.field(kw_only=True, default=None)

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data["ports"] = list(self.ports)
        return data


__all__ = ["RecordedEvent", "RecordingStatusEvent"]
