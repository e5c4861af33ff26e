"""The contract between the stream reassembly and protocol decoder plugins.

A decoder sees one TCP connection as two ordered byte streams, the request
direction (client → server) and the response direction (server → client),
delivered as :class:`Chunk` objects in the order the bytes moved.  A chunk may
carry fewer bytes than moved (``len(data) < size``): the kernel copied only a
prefix.  The missing tail is a *gap* the decoder must step over using lengths
the protocol declares (Content-Length, chunk sizes, RESP bulk lengths, MySQL
packet lengths).  When it cannot, it raises :class:`Undecodable` and the
connection is marked undecodable, counted and skipped.

Decoders are incremental: ``feed`` returns the exchanges completed by this
chunk (often none).  They never see sockets, pids or addresses: the caller
(live connection table or offline pcap reader) adds those.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar, Iterable

import attrs


class Direction(enum.Enum):
    """Which way a chunk of bytes moved, seen from the protocol's roles."""

    REQUEST = "request"  #: client → server
    RESPONSE = "response"  #: server → client

    @property
    def other(self) -> "Direction":
        return Direction.RESPONSE if self is Direction.REQUEST else Direction.REQUEST


class Undecodable(Exception):
    """The stream is not (or no longer) this protocol; stop decoding it.

    Raised from :meth:`Decoder.feed`; the caller marks the connection
    undecodable, counts it, and stops feeding it.  The message is one line.
    """


@attrs.frozen
class Chunk:
    """Bytes moved by one syscall (or one packet, offline)."""

    direction: Direction
    #: The captured bytes: a prefix of what moved, possibly all of it.
    data: bytes
    #: How many bytes the syscall moved; ``>= len(data)``.
    size: int
    #: Monotonic time in nanoseconds (kernel ``bpf_ktime_get_ns``, or capture time offline).
    ts_ns: int

    @property
    def truncated(self) -> bool:
        return self.size > len(self.data)


@attrs.frozen
class Exchange:
    """One request and its response (or a request that gets no response)."""

    #: ``"http"``, ``"redis"``, ``"mysql"``, or a plugin's protocol name.
    protocol: str
    #: HTTP method, Redis command (upper case), MySQL command (``QUERY``, ``STMT_EXECUTE`` …).
    method: str
    #: HTTP path and query, Redis first key, MySQL statement text; ``""`` when none.
    target: str
    #: HTTP status code (int), ``"OK"``/``"ERR"`` for Redis and MySQL, ``None`` when no response.
    status: int | str | None
    #: True for HTTP 5xx, Redis error replies, MySQL ERR.
    error: bool
    #: Timestamp (ns, same clock as the chunks) of the first request byte.
    request_start_ns: int
    #: Timestamp of the last request byte (the chunk that completed the request).
    request_end_ns: int
    #: Timestamp of the first response byte; ``None`` when there is no response.
    response_start_ns: int | None
    #: Timestamp of the last response byte; ``None`` when there is no response.
    response_end_ns: int | None
    #: Bytes the request occupied on the wire (headers and body).
    request_bytes: int
    #: Bytes the response occupied on the wire; 0 when no response.
    response_bytes: int
    #: Error text (Redis error reply, MySQL ERR message); ``None`` otherwise.
    error_message: str | None = None
    #: Protocol-specific fields (``host``, ``version``, ``traceparent``, ``db_user`` …).
    #: Values are JSON-serialisable.
    attributes: dict[str, Any] = attrs.field(factory=dict)

    @property
    def latency_ns(self) -> int | None:
        """From the last request byte to the first response byte."""
        if self.response_start_ns is None:
            return None
        return self.response_start_ns - self.request_end_ns


class Decoder:
    """Base class of protocol decoders: one instance per connection.

    Subclasses set :attr:`protocol` and implement :meth:`detect` and
    :meth:`feed`.  Register the class from a plugin's
    ``deetune_register_decoders(register)`` hook.  The class is instantiated
    with no arguments, except for options the caller names for its protocol
    (live capture passes ``trust_syscall_boundaries=True`` to ``http``), so
    every constructor argument needs a default.
    """

    #: Protocol name used in exchanges and on the command line.
    protocol: ClassVar[str] = ""
    #: Ports where the protocol usually lives: a hint for ordering detection, never a requirement.
    default_ports: ClassVar[tuple[int, ...]] = ()
    #: Among decoders the ports hint equally, lower is asked first: a decoder that claims bytes
    #: another one also accepts (an HTTP/1.1 request upgrading to h2c is HTTP/2's) goes before it.
    detect_order: ClassVar[int] = 0

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        """Whether ``data``, the first bytes seen on a connection in
        ``direction``, look like this protocol.  Must not raise."""
        raise NotImplementedError

    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        """Consume one chunk; return the exchanges it completed.

        Raises :class:`Undecodable` when the stream cannot be followed any more.
        """
        raise NotImplementedError

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        """The connection closed: return what is still pending and complete
        enough to report (e.g. a request whose response never came).  Default: nothing."""
        return ()
