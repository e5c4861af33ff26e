"""A protocol decoder for beanstalkd, the work queue (its protocol.txt): the example of a decoder
plugin that docs/plugins.md walks through, from this one file to tests against a real server
and a capture.

Commands and answers are lines ending in ``\\r\\n``.  Three lines declare a body that follows:
``put <pri> <delay> <ttr> <bytes>`` (the job), and the answers ``RESERVED <id> <bytes>``,
``FOUND <id> <bytes>`` and ``OK <bytes>``.  A server answers commands in order.

An exchange: ``method`` the command (``put``, ``reserve`` …), ``target`` the tube (for ``put``
the tube in use) or the job id, ``status`` ``OK`` or ``ERR``; the answer's first word is the
``result`` attribute (``INSERTED``, ``RESERVED``, ``TIMED_OUT`` …), job ids and body sizes too.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

from deetune.decoders import Chunk, Decoder, Direction, Exchange, Undecodable

MAX_LINE = 1024  # beanstalkd's own limit on a command line is 224 bytes
COMMANDS = frozenset(
    b"put use reserve reserve-with-timeout reserve-job delete release bury touch watch ignore peek peek-ready "
    b"peek-delayed peek-buried kick kick-job stats-job stats-tube stats list-tubes list-tube-used "
    b"list-tubes-watched pause-tube quit".split())
TUBE_COMMANDS = frozenset((b"use", b"watch", b"ignore", b"stats-tube", b"pause-tube"))
JOB_COMMANDS = frozenset((b"delete", b"release", b"bury", b"touch", b"peek", b"kick-job", b"stats-job", b"reserve-job"))
ERRORS = frozenset((b"OUT_OF_MEMORY", b"INTERNAL_ERROR", b"BAD_FORMAT", b"UNKNOWN_COMMAND", b"EXPECTED_CRLF",
                    b"JOB_TOO_BIG", b"DRAINING"))
WITH_BODY = frozenset((b"put", b"RESERVED", b"FOUND", b"OK"))  # their last word is the body's length


class _Lines:
    """One direction: (line, bytes on the wire with its body, first ts, last ts) per message."""

    def __init__(self) -> None:
        self.buffer = b""
        self.started = 0  # timestamp of the first byte of the message in the buffer
        self.body_left = 0  # bytes of a body (and its \r\n) not seen yet, after self.line
        self.line = b""
        self.size = 0

    def feed(self, chunk: Chunk) -> list[tuple[bytes, int, int, int]]:
        out: list[tuple[bytes, int, int, int]] = []
        data, gap = chunk.data, chunk.size - len(chunk.data)
        if not self.buffer and not self.body_left:
            self.started = chunk.ts_ns
        while data or gap:
            if self.body_left:  # inside a body: skip it, captured or not (its length is declared)
                step = min(self.body_left, len(data))
                data, self.body_left = data[step:], self.body_left - step
                if not data and gap and self.body_left:
                    step = min(self.body_left, gap)
                    gap, self.body_left = gap - step, self.body_left - step
                if self.body_left:
                    break
                out.append((self.line, self.size, self.started, chunk.ts_ns))
                self.started = chunk.ts_ns
                continue
            if gap and not data:
                raise Undecodable("beanstalk: capture gap outside a body")
            self.buffer += data
            data = b""
            end = self.buffer.find(b"\r\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    raise Undecodable("beanstalk: line too long")
                break
            line, data, self.buffer = self.buffer[:end], self.buffer[end + 2:], b""
            words = line.split()
            if words and words[0] in WITH_BODY:
                if not words[-1].isdigit():
                    raise Undecodable("beanstalk: body length is not a number")
                self.line, self.body_left = line, int(words[-1]) + 2
                self.size = end + 2 + self.body_left
                continue
            out.append((line, end + 2, self.started, chunk.ts_ns))
            self.started = chunk.ts_ns
        return out


class BeanstalkDecoder(Decoder):
    """beanstalkd work-queue commands and their answers (the example decoder of docs/plugins.md)."""

    protocol = "beanstalk"
    default_ports = (11300,)

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        line, crlf, _ = data.partition(b"\r\n")
        words = line.split(b" ")
        if direction is Direction.REQUEST:
            return bool(crlf) and words[0] in COMMANDS
        return bool(crlf) and words[0] in (b"INSERTED", b"USING", b"RESERVED", b"WATCHING", b"DELETED", b"OK")

    def __init__(self) -> None:
        self._requests = _Lines()
        self._responses = _Lines()
        self._waiting: deque[dict[str, Any]] = deque()
        self._tube = "default"

    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        if chunk.direction is Direction.REQUEST:
            for line, size, start, end in self._requests.feed(chunk):
                self._on_command(line, size, start, end)
            return ()
        return [self._exchange(line, size, start, end) for line, size, start, end in self._responses.feed(chunk)
                if self._waiting]

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        # Commands still waiting: reported without an answer (quit never gets one).
        return [self._exchange(None, 0, None, None) for _ in range(len(self._waiting))]

    def _on_command(self, line: bytes, size: int, start: int, end: int) -> None:
        words = line.split()
        if not words or words[0] not in COMMANDS:
            raise Undecodable(f"beanstalk: not a command: {line[:20]!r}")
        name = words[0].decode()
        if words[0] in TUBE_COMMANDS and len(words) > 1:
            target = words[1].decode("utf-8", "replace")
            if name == "use":
                self._tube = target
        elif name == "put":
            target = self._tube
        else:
            target = words[1].decode() if words[0] in JOB_COMMANDS and len(words) > 1 and words[1].isdigit() else ""
        self._waiting.append({"method": name, "target": target, "start": start, "end": end, "size": size})

    def _exchange(self, line: bytes | None, size: int, start: int | None, end: int | None) -> Exchange:
        command = self._waiting.popleft()
        words = line.split() if line is not None else [b""]
        error = words[0] in ERRORS
        attributes: dict[str, Any] = {}
        if line is not None:
            attributes["result"] = words[0].decode("ascii", "replace")
            if words[0] in (b"INSERTED", b"RESERVED", b"FOUND", b"BURIED") and len(words) > 1 and words[1].isdigit():
                attributes["job"] = int(words[1])
            if words[0] in WITH_BODY:
                attributes["body_bytes"] = int(words[-1])
        return Exchange(
            protocol="beanstalk", method=command["method"], target=command["target"],
            status=None if line is None else ("ERR" if error else "OK"), error=error,
            request_start_ns=command["start"], request_end_ns=command["end"],
            response_start_ns=start, response_end_ns=end,
            request_bytes=command["size"], response_bytes=size,
            error_message=line.decode("ascii", "replace") if error else None, attributes=attributes,
        )
