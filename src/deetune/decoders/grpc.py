"""gRPC on HTTP/2: what the HTTP/2 decoder needs to tell a gRPC call apart and describe it.

A gRPC call is one HTTP/2 stream: a POST to ``/package.Service/Method`` with
``content-type: application/grpc…``, messages framed in DATA as a 1-byte
compressed flag and a 4-byte big-endian length, and the outcome in trailers
(``grpc-status``, ``grpc-message``), or in the only HEADERS of a
*trailers-only* response.  See the gRPC over HTTP/2 protocol description.
"""

from __future__ import annotations

import urllib.parse

#: Status codes and their canonical names (the ``status`` of a gRPC exchange).
STATUS_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
    10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
    15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}  # fmt: skip

#: Bytes before each message: compressed flag (1) and length (4).
PREFIX_BYTES = 5


def is_grpc(content_type: bytes | None) -> bool:
    return content_type is not None and content_type[:16].lower() == b"application/grpc"


def status_name(code: int) -> str:
    return STATUS_NAMES.get(code, str(code))


def split_path(path: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` → (``pkg.Service``, ``Method``); ("", "") when not of that form."""
    service, sep, method = path.lstrip("/").rpartition("/")
    if not sep or not service or not method:
        return "", ""
    return service, method


def message_text(raw: bytes) -> str:
    """``grpc-message`` is percent-encoded UTF-8."""
    return urllib.parse.unquote(raw.decode("latin-1"), errors="replace")


def streaming(request_messages: int, response_messages: int) -> str:
    """The call type the message counts show: ``unary``, ``client`` (client streaming: more than
    one request message), ``server`` (more than one response message) or ``bidi`` (both).  A
    streaming call that carried one message each way shows as unary: the method's declared type
    is in the .proto, not on the wire."""
    client = request_messages > 1
    server = response_messages > 1
    if client and server:
        return "bidi"
    return "client" if client else "server" if server else "unary"


class MessageCounter:
    """Counts the length-prefixed messages of one direction of a call as DATA bytes pass,
    without keeping them.  ``exact`` turns false when a capture gap hid a message's prefix
    (the count is then a lower bound)."""

    __slots__ = ("count", "remaining", "prefix", "exact")

    def __init__(self) -> None:
        self.count = 0
        self.remaining = 0  # bytes left of the current message's body
        self.prefix = b""  # the part of a prefix seen so far
        self.exact = True

    def feed(self, data: bytes | memoryview) -> None:
        if not self.exact:
            return  # lost the framing: whatever follows would be read as prefixes at random
        i, n = 0, len(data)
        while i < n:
            if self.remaining:
                step = min(self.remaining, n - i)
                self.remaining -= step
                i += step
                continue
            need = PREFIX_BYTES - len(self.prefix)
            self.prefix += bytes(data[i:i + need])
            i += need
            if len(self.prefix) == PREFIX_BYTES:
                self.count += 1
                self.remaining = int.from_bytes(self.prefix[1:], "big")
                self.prefix = b""

    def skip(self, n: int) -> None:
        """``n`` bytes went by uncaptured: fine inside a message's body, not over a prefix."""
        if self.prefix or n > self.remaining:
            self.exact = False
            self.remaining = 0
            self.prefix = b""
        else:
            self.remaining -= n
