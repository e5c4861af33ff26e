"""The recorded exchange: what a recording task stores and replay reads.

Its JSON form (one object per line in a JSONL export) is the interchange
format between the agent and ``python -m deetune.replay``; payloads are
base64 so any bytes survive.
"""

from __future__ import annotations

import base64
from typing import Any

import attrs


@attrs.frozen
class RecordedExchange:
    """One request and its response, with their bytes as they crossed the socket."""

    task_id: str
    #: Order within the task (replay sends in this order).
    seq: int
    #: Wall-clock ns since the epoch of the first request byte.
    ts: int
    protocol: str
    client: str
    server: str
    method: str
    target: str
    status: int | str | None
    error: bool
    #: Request bytes as sent (redacted), at most the task's payload limit.
    request: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")
    #: Response bytes as sent (redacted), at most the limit.
    response: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")
    #: Bytes the request and response really had on the wire.
    request_size: int = 0
    response_size: int = 0
    #: True when the stored bytes are shorter than the wire bytes (limit or capture gap).
    request_truncated: bool = False
    response_truncated: bool = False
    latency_ns: int | None = None
    duration_ns: int | None = None
    error_message: str | None = None
    #: The server endpoint as recorded (address, port), for reference.
    server_address: str = ""
    server_port: int = 0
    #: Decoded fields (HTTP host/version, MySQL user/database, …).
    attributes: dict[str, Any] = attrs.field(factory=dict)
    #: Names of the redaction rules that masked something in this exchange.
    redactions: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=False)
        data["request"] = base64.b64encode(self.request).decode()
        data["response"] = base64.b64encode(self.response).decode()
        data["redactions"] = list(self.redactions)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RecordedExchange":
        fields = {f.name for f in attrs.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown fields in a recorded exchange: {', '.join(sorted(unknown))}")
        values = dict(data)
        values["request"] = base64.b64decode(values.get("request", ""))
        values["response"] = base64.b64decode(values.get("response", ""))
        values["redactions"] = tuple(values.get("redactions", ()))
        return cls(**values)
