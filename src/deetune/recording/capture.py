"""The raw bytes of recorded connections, kept by the L7 handler.

A recording task raises the kernel's capture size on its server's ports
(:meth:`deetune.probes.payload.PayloadProbe.set_port_capture`) and lists them in
a :class:`RecordingPorts` the L7 handler reads.  A connection on such a port gets
a :class:`ConnLog`: the bytes of each direction from an *aligned* point (a
message boundary), in order.  The decoders report each exchange with the wire
sizes of its request and response (``request_bytes``/``response_bytes``), in
stream order, so the log is sliced by those sizes, one exchange after the other:
no decoder needs to know about recording, and connections on other ports cost
nothing more than two additions per chunk (the stream positions, see
:mod:`deetune.l7`).

Aligned points
    A connection seen from its first byte is aligned from the start.  A connection
    already open when its port became recorded (a connection pool) starts its log
    at a request chunk arriving when every request byte seen so far belongs to a
    reported exchange (nothing in flight): the request cursor is then exact, and
    the response cursor is the end of what the other direction carried so far.

Bytes the decoders do not count
    HTTP interim responses (``100 Continue``, ``103 Early Hints``) are not part of
    ``response_bytes``, nor is the MySQL server greeting: the slicer steps over
    them.  A slice that does not look like the start of a message of its protocol
    means the accounting went wrong (an exotic stream): the log is dropped and
    starts again at the next aligned point.

Gaps and limits
    A chunk the kernel copied partly leaves a gap; a message's stored bytes stop
    at the first gap or at the limit, so they are always a prefix of the wire
    bytes (shorter than the wire size: truncated).  Each direction holds at most
    :func:`held_cap` bytes not yet consumed; beyond that new bytes are kept as a
    gap (a response of megabytes keeps its first ``limit`` bytes).
"""

from __future__ import annotations

import collections
from typing import Mapping

#: Bytes at most held per direction of a recorded connection beyond the limit (pipelined
#: messages after the one being assembled).
HELD_SLACK = 64 * 1024


def held_cap(limit: int) -> int:
    """Bytes a direction of a recorded connection may hold before new bytes become a gap."""
    return 2 * limit + HELD_SLACK


class RecordingPorts:
    """The ports whose connections are recorded, each with its payload limit (the largest
    limit of the tasks recording it).  Written by the recording manager, read lock-free by
    the L7 handler: :attr:`ports` is replaced whole, never changed in place."""

    def __init__(self) -> None:
        self.ports: Mapping[int, int] = {}


class Stream:
    """One direction's bytes from ``start`` (a stream offset) on, as (offset, data, size) segments."""

    __slots__ = ("segments", "start", "end", "held", "cap")

    def __init__(self, start: int, cap: int) -> None:
        self.segments: collections.deque[tuple[int, bytes, int]] = collections.deque()
        self.start = start
        #: Stream offset after the last byte fed.
        self.end = start
        #: Captured bytes held in segments.
        self.held = 0
        self.cap = cap

    def append(self, data: bytes, size: int) -> None:
        room = self.cap - self.held
        if len(data) > room:
            data = data[:max(room, 0)]
        self.segments.append((self.end, data, size))
        self.end += size
        self.held += len(data)

    def peek(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes from ``offset``, stopping at the first byte not captured."""
        if n <= 0 or offset < self.start:
            return b""
        parts: list[bytes] = []
        position, stop = offset, offset + n
        for seg_offset, data, size in self.segments:
            if seg_offset + size <= position:
                continue
            if seg_offset > position:
                break  # segments are contiguous; never read across a hole
            captured_end = seg_offset + len(data)
            take_end = min(stop, captured_end)
            if take_end > position:
                parts.append(data[position - seg_offset:take_end - seg_offset])
                position = take_end
            if position >= stop or captured_end < seg_offset + size:
                break  # done, or the rest of this segment was not captured: a gap
        return b"".join(parts)

    def trim(self, offset: int) -> None:
        """Forget the segments wholly before ``offset``."""
        segments = self.segments
        while segments and segments[0][0] + segments[0][2] <= offset:
            self.held -= len(segments.popleft()[1])


class ConnLog:
    """Both directions of one recorded connection, and where its next request and response start."""

    __slots__ = ("egress", "ingress", "egress_cursor", "ingress_cursor", "limit")

    def __init__(self, egress_start: int, ingress_start: int, limit: int) -> None:
        cap = held_cap(limit)
        self.egress = Stream(egress_start, cap)
        self.ingress = Stream(ingress_start, cap)
        self.egress_cursor = egress_start
        self.ingress_cursor = ingress_start
        self.limit = limit

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self.egress.cap = self.ingress.cap = held_cap(limit)

    def feed(self, egress: bool, data: bytes, size: int) -> None:
        (self.egress if egress else self.ingress).append(data, size)

    def take(self, client: bool, protocol: str, method: str, request_bytes: int,
             response_bytes: int) -> tuple[bytes, bytes] | None:
        """The request's and the response's bytes (prefixes of at most ``limit``), advancing the
        cursors; None when they do not look like messages of ``protocol`` (the log is then
        useless: the caller drops it)."""
        limit = self.limit
        if client:
            req_stream, resp_stream = self.egress, self.ingress
            req_at, resp_at = self.egress_cursor, self.ingress_cursor
        else:
            req_stream, resp_stream = self.ingress, self.egress
            req_at, resp_at = self.ingress_cursor, self.egress_cursor
        if response_bytes:
            resp_at = _skip_unaccounted(protocol, method, resp_stream, resp_at)
        request = req_stream.peek(req_at, min(request_bytes, limit))
        response = resp_stream.peek(resp_at, min(response_bytes, limit))
        req_at += request_bytes
        resp_at += response_bytes
        if client:
            self.egress_cursor, self.ingress_cursor = req_at, resp_at
        else:
            self.ingress_cursor, self.egress_cursor = req_at, resp_at
        req_stream.trim(req_at)
        resp_stream.trim(resp_at)
        if not _plausible(protocol, method, request, response):
            return None
        return request, response


def _skip_unaccounted(protocol: str, method: str, stream: Stream, at: int) -> int:
    """Step over response bytes that belong to no exchange's ``response_bytes``."""
    if protocol == "http":
        # Interim responses (1xx but 101) precede the final one.
        for _ in range(8):
            head = stream.peek(at, 4096)
            if len(head) < 13 or not head.startswith(b"HTTP/1.") or head[9:10] != b"1" or head[9:12] == b"101":
                break
            end = head.find(b"\r\n\r\n")
            if end < 0:
                break
            at += end + 4
    elif protocol == "mysql" and method == "LOGIN":
        head = stream.peek(at, 5)
        if len(head) == 5 and head[3] == 0 and head[4] == 0x0A:  # the server greeting (sequence 0, protocol 10)
            at += 4 + int.from_bytes(head[:3], "little")
    return at


_RESP_TYPES = frozenset(b"+-:$*_,#!=(%~>|")


def _plausible(protocol: str, method: str, request: bytes, response: bytes) -> bool:
    """Whether the slices start where messages of the protocol start (an accounting check)."""
    if protocol == "http":
        if request and not request.startswith(method.encode("latin-1", "replace")):
            return False
        return not response or response.startswith(b"HTTP/")
    if protocol == "redis":
        if request and request[0] != 0x2A and not request[:len(method)].upper() == method.encode("latin-1", "replace"):
            return False
        return not response or response[0] in _RESP_TYPES
    if protocol == "mysql":
        if len(request) >= 4 and method != "LOGIN" and request[3] != 0:
            return False
    return True


__all__ = ["ConnLog", "RecordingPorts", "Stream", "held_cap", "HELD_SLACK"]
