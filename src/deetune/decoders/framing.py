"""Length-delimited framing for binary protocols, resumable and tolerant of capture gaps.

Most binary protocols announce each message's length in a header: PostgreSQL
(type byte, 4-byte length), Kafka (4-byte length), AMQP (7-byte frame header),
MQTT (a variable-length integer), DNS over TCP (2-byte length).  :class:`Framer`
cuts one direction's byte stream into such messages across chunks:

* a message's first ``keep`` bytes are kept (a :data:`Frame`'s head), the rest only
  counted, so a message of any size costs ``keep`` bytes of memory;
* bytes that moved but were not captured (``Chunk.size > len(Chunk.data)``) are
  stepped over inside a message whose length is known (the frame says it was truncated);
  a gap that covers a header loses the framing and raises :class:`Undecodable`.

A protocol subclasses it and implements :meth:`Framer.header`; the fast path
(whole messages inside one chunk, the common case) costs one ``header`` call
and one slice per message.
"""

from __future__ import annotations

import struct

from deetune.decoders.base import Undecodable


#: One message of a direction, as a plain tuple (cheaper than an object: decoders see many):
#: ``(head, size, start_ns, end_ns, truncated)`` — the message's first bytes, header included
#: (at most the framer's ``keep``); its length on the wire, header included; the timestamps of
#: the chunks holding its first and its last byte; whether a capture gap hid some of its bytes
#: (``head`` may then be shorter than it would be).
Frame = tuple[bytes, int, int, int, bool]


class Framer:
    """Splits one direction's stream into :data:`Frame` s.  Subclass and implement :meth:`header`."""

    #: Bytes kept of each message (header included).
    keep = 1024
    #: Longest header (or unfinished header) buffered while waiting for more bytes.
    max_header = 16
    #: Fast path for protocols whose header is a big-endian length at a fixed offset: where it
    #: is (None: call :meth:`header` for every message), its ``struct`` format, and what to add
    #: to it for the message's total size.  A declared total outside ``[min_size, max_size]``
    #: is not this protocol.  While :attr:`special` is set, :meth:`header` is called instead
    #: (a message of another shape comes next: PostgreSQL's untyped start-up message).
    length_at: int | None = None
    length_format = ">I"
    length_adds = 0
    min_size = 1
    max_size = 1 << 30

    def __init__(self) -> None:
        self._carry = b""  # an unfinished header, or the kept prefix of an unfinished message
        self._carry_ts = 0  # timestamp of the chunk holding the carried message's first byte
        self._left = 0  # bytes of the unfinished message not seen yet (0: at a boundary)
        self._size = 0  # its total size
        self._truncated = False
        self.special = False
        length = struct.Struct(self.length_format)
        self._unpack = length.unpack_from
        self._need = (self.length_at or 0) + length.size
        #: What the fast path reads, in one attribute (None: no fixed-offset length).
        self._fast = None if self.length_at is None else (
            self._unpack, self._need, self.length_at, self.length_adds, self.min_size, self.max_size, self.keep)

    def header(self, buf: bytes, pos: int, end: int) -> int:
        """(Without :attr:`length_at`, or while :attr:`special`.)  The total size (header included) of the message starting at ``buf[pos]``, or 0
        when the header is not complete in ``buf[pos:end]``.  Raise :class:`Undecodable`
        when the bytes cannot be this protocol's header.  Called at message boundaries only."""
        raise NotImplementedError

    @property
    def at_boundary(self) -> bool:
        """No message is half received."""
        return not self._left and not self._carry

    def feed(self, data: bytes, size: int, ts: int) -> list[Frame]:
        fast = self._fast
        if fast is None or self._left or self._carry or self.special:
            return self._feed(data, size, ts)
        # At a boundary with a fixed-offset length: whole messages straight from the chunk.
        unpack, need, length_at, adds, low, high, keep = fast
        out: list[Frame] = []
        append = out.append
        end = len(data)
        pos = 0
        while end - pos >= need:
            total = unpack(data, pos + length_at)[0] + adds
            if total < low or total > high:
                raise Undecodable(f"{type(self).__name__}: message length {total} out of range")
            stop = pos + total
            if stop > end:
                break
            append((data[pos:stop] if total <= keep else data[pos:pos + keep], total, ts, ts, False))
            pos = stop
        if pos == end and size == end:
            return out
        return out + self._feed(data[pos:] if pos else data, size - pos, ts)

    def _feed(self, data: bytes, size: int, ts: int) -> list[Frame]:
        out: list[Frame] = []
        keep = self.keep
        pos = 0
        start_ts = ts
        if self._left:  # continue a message begun in an earlier chunk
            take = self._left if self._left <= len(data) else len(data)
            if len(self._carry) < keep:
                self._carry += data[:min(take, keep - len(self._carry))]
            self._left -= take
            pos = take
            if not self._left:
                out.append((self._carry, self._size, self._carry_ts, ts, self._truncated))
                self._carry = b""
        elif self._carry:  # an unfinished header
            data = self._carry + data
            size += len(self._carry)
            self._carry = b""
            start_ts = self._carry_ts
        end = len(data)
        append = out.append
        length_at = self.length_at
        while pos < end:
            if length_at is None or self.special:
                total = self.header(data, pos, end)
            elif end - pos >= self._need:
                total = self._unpack(data, pos + length_at)[0] + self.length_adds
                if total < self.min_size or total > self.max_size:
                    raise Undecodable(f"{type(self).__name__}: message length {total} out of range")
            else:
                total = 0
            if total <= 0:
                if end - pos > self.max_header:
                    raise Undecodable(f"{type(self).__name__}: header longer than {self.max_header} bytes")
                self._carry = data[pos:]
                self._carry_ts = start_ts
                break
            stop = pos + total
            if stop <= end:
                append((data[pos:pos + keep] if total > keep else data[pos:stop], total, start_ts, ts, False))
                pos = stop
                start_ts = ts
                continue
            self._carry = data[pos:pos + keep]
            self._carry_ts = start_ts
            self._size = total
            self._left = stop - end
            self._truncated = False
            break
        gap = size - len(data)
        if gap > 0:
            self._skip(gap, ts, out)
        return out

    def _skip(self, gap: int, ts: int, out: list[Frame]) -> None:
        """Bytes moved but not captured: counted against the message's declared length."""
        if not self._left or gap > self._left:
            self._carry = b""
            self._left = 0
            raise Undecodable(f"{type(self).__name__}: capture gap over a message header: framing lost")
        self._left -= gap
        self._truncated = True
        if not self._left:
            out.append((self._carry, self._size, self._carry_ts, ts, True))
            self._carry = b""

    def pending(self) -> int:
        """Bytes of the unfinished message seen so far (0 at a boundary)."""
        if self._left:
            return self._size - self._left
        return len(self._carry)
