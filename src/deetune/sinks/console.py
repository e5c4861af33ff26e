"""Human console view: one aligned line per event."""

from __future__ import annotations

import sys
import time
from typing import IO

from deetune.events import ConnectionCounts, ConnectionEvent, Event, ExchangeEvent, LatencyCounts, ProcessEvent, RequestCounts
from deetune.sinks.base import Sink


def _clock(ts_ns: int) -> str:
    seconds, ns = divmod(ts_ns, 1_000_000_000)
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{ns // 1_000_000:03d}"


def _endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def format_event(event: Event) -> str:
    head = f"{_clock(event.ts)} {event.type:<10}"
    if isinstance(event, ProcessEvent):
        detail = f"{event.phase:<6} pid={event.pid} ppid={event.ppid} {event.comm}"
        if event.phase == "exec":
            detail += f"  {event.cmdline}"
        elif event.phase == "exit":
            detail += f"  exit={event.exit_code}" if event.signal is None else f"  signal={event.signal}"
        return f"{head} {detail}"
    if isinstance(event, ConnectionEvent):
        arrow = "->" if event.role == "client" else "<-"
        detail = (
            f"{event.phase:<6} {event.role:<6} pid={event.pid} {event.comm:<15} "
            f"{_endpoint(event.laddr, event.lport)} {arrow} {_endpoint(event.raddr, event.rport)}"
        )
        if event.phase == "close":
            duration = f"{event.duration_ns / 1e6:.1f}ms" if event.duration_ns is not None else "?"
            detail += f"  sent={event.bytes_sent} recv={event.bytes_received} dur={duration} retrans={event.retransmits}"
            if event.reset:
                detail += f" reset={event.reset}"
        elif event.phase == "failed":
            detail += f"  error={event.error}"
        return f"{head} {detail}"
    if isinstance(event, ExchangeEvent):
        latency = f"{event.latency_ns / 1e6:.2f}ms" if event.latency_ns is not None else "-"
        arrow = "->" if event.role == "client" else "<-"
        error = f"  error={event.error_message}" if event.error_message else ""
        return (
            f"{head} {event.protocol:<6} {event.role:<6} pid={event.pid} {event.comm:<15} "
            f"{_endpoint(event.laddr, event.lport)} {arrow} {_endpoint(event.raddr, event.rport)}  "
            f"{event.method} {event.target[:80]} -> {event.status} {latency} "
            f"req={event.request_bytes}B resp={event.response_bytes}B{error}"
        )
    if isinstance(event, RequestCounts):
        return (f"{head} {event.protocol:<6} {event.role:<6} pid={event.pid} {_ends(event)}  "
                f"{event.method or '-'} {event.status if event.status is not None else '-'} x{event.count}"
                + ("" if event.outcome in ("ok", "error") else f" ({event.outcome})"))
    if isinstance(event, ConnectionCounts):
        return (f"{head} tcp    {event.role:<6} pid={event.pid} {_ends(event)}  opened={event.opened} "
                f"closed={event.closed} failed={event.failed}")
    fields = " ".join(f"{k}={v}" for k, v in event.to_json().items() if k not in ("type", "ts", "ts_mono_ns"))
    return f"{head} {fields}"


def _ends(event) -> str:
    if event.client_service is not None:
        return f"{event.client_service} -> {event.server_service}" + ("" if event.counted else " (counted by the server)")
    return f"{event.raddr} port {event.port}"


class ConsoleSink(Sink):
    name = "console"
    description = "a human-readable line per event on stdout"

    def __init__(self, stream: IO[str] | None = None):
        self._stream = stream or sys.stdout

    def handle(self, event: Event) -> None:
        if isinstance(event, LatencyCounts):
            return  # histograms are for the edges' percentiles, not for reading line by line
        self._stream.write(format_event(event) + "\n")

    def flush(self) -> None:
        self._stream.flush()
