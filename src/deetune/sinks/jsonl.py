"""JSON Lines sink: one event per line, to a file or stdout."""

from __future__ import annotations

import sys
import time
from typing import BinaryIO

from deetune.events import Event
from deetune.jsontext import dumps_line
from deetune.sinks.base import Sink, SinkError


class JsonlSink(Sink):
    name = "jsonl"
    description = "one JSON object per event per line; jsonl:PATH appends to PATH, jsonl:- writes stdout"

    #: Longest time an event may wait in the buffer.
    FLUSH_SECONDS = 0.5

    def __init__(self, stream: BinaryIO, *, owned: bool):
        self._stream = stream
        self._owned = owned
        self._flush_at = time.monotonic() + self.FLUSH_SECONDS

    @classmethod
    def from_arg(cls, arg: str | None) -> "JsonlSink":
        if not arg:
            raise SinkError("jsonl sink needs a path: --sink jsonl:PATH (or jsonl:- for stdout)")
        if arg == "-":
            return cls(sys.stdout.buffer, owned=False)
        try:
            # Block buffered (a write syscall per event costs more than the event);
            # handle() flushes at least every FLUSH_SECONDS, so tailing readers keep up.
            return cls(open(arg, "ab", buffering=1 << 16), owned=True)
        except OSError as exc:
            raise SinkError(f"cannot open {arg} for the jsonl sink: {exc.strerror}") from None

    def handle(self, event: Event) -> None:
        # orjson (through dumps_line): several times faster than json per event, and UTF-8 bytes
        # with the newline already, written as they are to a binary stream.  What orjson refuses
        # (integers beyond 64 bits, text that is not UTF-8) is still written: see deetune.jsontext.
        self._stream.write(dumps_line(event.to_json()))
        now = time.monotonic()
        if now >= self._flush_at:
            self._flush_at = now + self.FLUSH_SECONDS
            self._stream.flush()

    def tick(self) -> None:
        """Once a second from the pipeline: nothing waits in the buffer on a quiet host."""
        self._stream.flush()

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._stream.close()
