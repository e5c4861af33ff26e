"""The contract between the stream reassembly and protocol decoder plugins.

A decoder sees one TCP connection as two ordered byte streams, the request
direction (client → server) and the response direction (server → client),
delivered as :class:`Chunk` objects in the order the bytes moved.  A chunk may
carry fewer bytes than moved (``len(data) < size``): the kernel copied only a
prefix.  A chunk may carry no bytes at all (``data == b""``, ``size > 0``): calls
that were not copied (overload sampling, a lost record) or a hole in a capture.
The missing bytes are a *gap* the decoder steps over using lengths the protocol
declares (Content-Length, chunk sizes, RESP bulk lengths, MySQL packet lengths).
When it cannot, it finds the next message it recognises (a later chunk, or later
in the same one) and goes on from there; requests waiting for a response when the
framing was lost are reported without one (``attributes["gap"] = True``) rather
than paired with a later response.  A decoder that cannot do that raises
:class:`Undecodable` with the exchanges it completed before; the caller reports
those, closes the decoder (which reports what it still holds) and starts a new one
at the next chunk that ``detect`` recognises as a request.

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
    """The stream cannot be followed from here; stop feeding this decoder.

    Raised from :meth:`Decoder.feed`.  The message is one line.  ``exchanges``
    are the ones this feed completed before the failure: the caller reports them.
    ``reason`` is a short name for counting (``"gap"``, ``"garbage"`` …; default
    ``"undecodable"``).  The caller then closes the decoder and, when the protocol
    was recognised, starts a fresh one at the next chunk that looks like a request
    (counted as a resync), or gives the connection up when that keeps failing.
    ``reason="unsupported"`` (TLS, a compressed protocol, a replication stream)
    gives the connection up at once.
    """

    def __init__(self, message: str = "", *, exchanges: Iterable["Exchange"] = (), reason: str = "undecodable"):
        super().__init__(message)
        self.exchanges: list[Exchange] = list(exchanges)
        self.reason = reason


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
    #: Datagram sockets only: the other end of this datagram, an opaque value the decoder
    #: hands back in :attr:`Exchange.peer`; None on streams, and when the kernel did not say
    #: (a datagram received on an unconnected socket).
    peer: Any = None

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
    #: Values are JSON-serialisable.  Shared by every decoder: ``anomalies`` (a list of short
    #: names, each a departure from the standard the decoder tolerated, e.g. ``"bare_lf"``),
    #: ``gap`` (true: bytes of this exchange were not captured and its response, or part of
    #: it, is unknown).
    attributes: dict[str, Any] = attrs.field(factory=dict)
    #: Datagram sockets only: the other end of the exchange (the ``peer`` of whichever of its
    #: chunks knew it); None on streams, where the connection says who the peer is.
    peer: Any = None

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
    #: Whether the decoder also decodes datagram (UDP) sockets.  There, each chunk is one whole
    #: datagram (a prefix of it when cut), one instance sees every peer of the socket (chunks
    #: carry ``peer``), and the class is instantiated with ``datagram=True``.
    datagrams: ClassVar[bool] = False
    #: Among decoders the ports hint equally, lower is asked first: a decoder that claims bytes
    #: another one also accepts (an HTTP/1.1 request upgrading to h2c is HTTP/2's) goes before it.
    detect_order: ClassVar[int] = 0

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        """Whether ``data`` looks like the start of this protocol's messages in ``direction``.

        ``data`` starts at a chunk's first byte: the first bytes seen on a connection, or a later
        chunk where a message may start (a connection older than the capture is taken up at its
        first recognisable message; a stream is resynchronised at its next request).  It may join
        consecutive chunks (a message header read apart from its body), and ``detect`` is asked
        again with more bytes of the same start when it said no.  Must not raise."""
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

    # What a decoder skipped or repaired outside any exchange (an unsolicited response, bytes
    # skipped to find the next message, a bound that cut in) is counted by name; the caller
    # sums the counts per protocol (the agent's L7 stats, `deetune decode`'s summary).
    #: Counts not yet taken by the caller; None while there are none.
    counts: dict[str, int] | None = None

    def count(self, what: str, n: int = 1) -> None:
        """Count ``n`` occurrences of ``what`` (a short name: ``"unsolicited_response"`` …)."""
        if not n:
            return
        counts = self.counts
        if counts is None:
            counts = self.counts = {}
        counts[what] = counts.get(what, 0) + n

    def take_counts(self) -> dict[str, int]:
        """The counts since the last call, and start again from none."""
        counts, self.counts = self.counts, None
        return counts or {}
