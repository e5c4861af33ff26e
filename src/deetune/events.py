"""Typed events that probes produce and sinks consume.

Every event is a frozen attrs record with a ``to_json()`` giving the dict the
jsonl sink writes.  ``ts`` is wall-clock time as integer nanoseconds since the
Unix epoch (UTC); ``ts_mono_ns`` is the kernel's CLOCK_MONOTONIC time of the
same moment, for computing intervals.
"""

from __future__ import annotations

import base64
import errno
import functools
import ipaddress
from typing import Any, ClassVar

import attrs

from deetune.redaction import redact_exchange_text


@functools.cache
def _dict_builder(cls: type) -> Any:
    """``f(event) -> {"type": …, field: value, …}`` for one event class, generated once:
    a dict display is several times faster than a loop of getattr (it shows per event)."""
    names = [field.name for field in attrs.fields(cls)]
    body = ", ".join(f"{name!r}: e.{name}" for name in names)
    namespace: dict[str, Any] = {}
    exec(f"def build(e):\n    return {{'type': e.type, {body}}}", namespace)  # noqa: S102 - the class's field names
    return namespace["build"]


@functools.cache
def positional_builder(cls: type) -> Any:
    """``f(value, …) -> cls`` taking every field of an attrs class positionally, in field order,
    for the hot paths that make one object per kernel record: calling the class takes about
    twice as long (keyword arguments bound one by one, then each field set through the frozen
    class's ``object.__setattr__``).  The object is the one the class makes: each field is set
    through its slot.  A class whose ``__init__`` does more than set its fields (validators,
    converters, ``__attrs_post_init__``, no slots) gets the class itself, called by keyword."""
    fields = attrs.fields(cls)
    names = [field.name for field in fields]
    slotted = all(type(getattr(cls, name, None)).__name__ == "member_descriptor" for name in names)
    plain = all(f.validator is None and f.converter is None and f.init and f.alias == f.name for f in fields)
    if not slotted or not plain or hasattr(cls, "__attrs_post_init__") or hasattr(cls, "__attrs_pre_init__"):
        namespace: dict[str, Any] = {"cls": cls}
        args = ", ".join(names)
        source = f"def build({args}):\n    return cls({', '.join(f'{n}={n}' for n in names)})"
        exec(compile(source, f"<positional_builder {cls.__name__}>", "exec"), namespace)  # noqa: S102
        return namespace["build"]
    namespace = {"_new": object.__new__, "_cls": cls}
    namespace.update({f"_set_{name}": getattr(cls, name).__set__ for name in names})
    body = "".join(f"    _set_{name}(self, {name})\n" for name in names)
    source = f"def build({', '.join(names)}):\n    self = _new(_cls)\n{body}    return self"
    exec(compile(source, f"<positional_builder {cls.__name__}>", "exec"), namespace)  # noqa: S102
    return namespace["build"]


@attrs.frozen
class Event:
    """Base of all events."""

    type: ClassVar[str] = "event"
    #: Wall-clock time, ns since the Unix epoch.
    ts: int
    #: CLOCK_MONOTONIC ns (bpf_ktime_get_ns) of the same moment.
    ts_mono_ns: int = attrs.field(kw_only=True, default=0)

    def to_json(self) -> dict[str, Any]:
        return _dict_builder(type(self))(self)


@attrs.frozen
class ProcessEvent(Event):
    """A process started (exec), was forked, or exited."""

    type: ClassVar[str] = "process"
    #: ``"exec"``, ``"fork"`` or ``"exit"``.
    phase: str = attrs.field(kw_only=True)
    pid: int = attrs.field(kw_only=True)
    ppid: int = attrs.field(kw_only=True)
    #: Kernel task name (15 characters at most).
    comm: str = attrs.field(kw_only=True)
    #: Arguments joined by spaces (exec); "" otherwise.
    cmdline: str = attrs.field(kw_only=True, default="")
    #: True when the command line was longer than the capture limit (4 KiB).
    cmdline_truncated: bool = attrs.field(kw_only=True, default=False)
    cgroup_id: int = attrs.field(kw_only=True, default=0)
    #: exit: the process's exit status (``exit(3)`` argument), None when killed by a signal.
    exit_code: int | None = attrs.field(kw_only=True, default=None)
    #: exit: the signal that killed the process, None otherwise.
    signal: int | None = attrs.field(kw_only=True, default=None)


@attrs.frozen
class ConnectionEvent(Event):
    """A TCP connection opened, closed, or failed to open."""

    type: ClassVar[str] = "connection"
    #: ``"open"``, ``"close"`` or ``"failed"``.
    phase: str = attrs.field(kw_only=True)
    #: ``"client"`` (this side connected) or ``"server"`` (this side accepted); "unknown" for
    #: connections that predate the agent and could not be classified.
    role: str = attrs.field(kw_only=True)
    pid: int = attrs.field(kw_only=True)
    comm: str = attrs.field(kw_only=True)
    laddr: str = attrs.field(kw_only=True)
    lport: int = attrs.field(kw_only=True)
    raddr: str = attrs.field(kw_only=True)
    rport: int = attrs.field(kw_only=True)
    #: 4 or 6.
    family: int = attrs.field(kw_only=True)
    #: Kernel socket identity, unique among open connections (reused once the socket is freed).
    sock_id: int = attrs.field(kw_only=True)
    cgroup_id: int = attrs.field(kw_only=True, default=0)
    #: The socket's cookie: unique per connection while the kernel runs (0: not known).
    conn_id: int = attrs.field(kw_only=True, default=0)
    # close only
    bytes_sent: int | None = attrs.field(kw_only=True, default=None)
    bytes_received: int | None = attrs.field(kw_only=True, default=None)
    #: From open to close; None when the open predates the agent.
    duration_ns: int | None = attrs.field(kw_only=True, default=None)
    retransmits: int | None = attrs.field(kw_only=True, default=None)
    #: close: ``"received"``, ``"sent"`` or None: whether the connection ended by a reset.
    reset: str | None = attrs.field(kw_only=True, default=None)
    #: close: the connection was open before the agent started.
    preexisting: bool = attrs.field(kw_only=True, default=False)
    # failed only
    #: failed: ``"refused"``, ``"timeout"``, or the errno name.
    error: str | None = attrs.field(kw_only=True, default=None)
    #: Overload sampling: this open or close stands for this many connections, of which the
    #: others were not reported (1: for itself only; in JSON only when more).
    sampling: int = attrs.field(kw_only=True, default=1)
    #: Service names of both ends, set in place by the topology aggregator (None before it; the
    #: one writer of these two fields, see deetune.topology.aggregator._enricher).
    client_service: str | None = attrs.field(kw_only=True, default=None)
    server_service: str | None = attrs.field(kw_only=True, default=None)

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        if self.phase != "close":
            for key in ("bytes_sent", "bytes_received", "duration_ns", "retransmits", "reset", "preexisting"):
                del data[key]
        if self.phase != "failed":
            del data["error"]
        if self.sampling == 1:
            del data["sampling"]
        if self.client_service is None:
            del data["client_service"], data["server_service"]
        return data


def failure_reason(err: int) -> str:
    """Name a failed connect's socket error the way users say it."""
    if err == errno.ECONNREFUSED:
        return "refused"
    if err == errno.ETIMEDOUT:
        return "timeout"
    return errno.errorcode.get(err, f"errno {err}").lower() if err else "unknown"


@functools.lru_cache(maxsize=8192)
def format_address(family: int, raw: bytes) -> str:
    """Text form of an address from a record (IPv4 in the first 4 bytes).
    Cached: a host talks to few addresses, and every payload record has two."""
    if family == 4:
        return str(ipaddress.IPv4Address(raw[:4]))
    addr = ipaddress.IPv6Address(raw[:16])
    return str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)


@attrs.frozen
class DataEvent(Event):
    """Bytes one call moved on a TCP or UDP socket (a prefix of them when ``truncated``)."""

    type: ClassVar[str] = "data"
    pid: int = attrs.field(kw_only=True)
    tid: int = attrs.field(kw_only=True)
    comm: str = attrs.field(kw_only=True)
    fd: int = attrs.field(kw_only=True)
    sock_id: int = attrs.field(kw_only=True)
    #: ``"egress"`` (this process wrote) or ``"ingress"`` (it read).
    direction: str = attrs.field(kw_only=True)
    #: The syscall: ``read``, ``write``, ``sendmsg`` …; ``other`` for a transfer made by a call
    #: whose buffer the probe does not read (splice, io_uring): its ``data`` is empty.
    syscall: str = attrs.field(kw_only=True)
    #: Bytes the syscall moved.
    size: int = attrs.field(kw_only=True)
    #: The captured prefix (``len(data) <= size``).
    data: bytes = attrs.field(kw_only=True, repr=lambda d: f"<{len(d)} bytes>")
    #: CLOCK_MONOTONIC ns when the call began, where the source knows it; the live payload
    #: probe sees a call when it is done, and gives ``ts_mono_ns`` here too.
    start_mono_ns: int = attrs.field(kw_only=True)
    laddr: str = attrs.field(kw_only=True)
    lport: int = attrs.field(kw_only=True)
    raddr: str = attrs.field(kw_only=True)
    rport: int = attrs.field(kw_only=True)
    family: int = attrs.field(kw_only=True)
    cgroup_id: int = attrs.field(kw_only=True, default=0)
    #: The socket's cookie: unique per connection while the kernel runs (0: not known).
    conn_id: int = attrs.field(kw_only=True, default=0)
    #: Overload sampling: copied while 1 connection-period in this many was (1: every one).
    sampling: int = attrs.field(kw_only=True, default=1)
    #: Copied because the kernel's accounting saw an error response: the request's head, then the
    #: response's head, two events to be decoded on their own (``seq`` means nothing then), whether
    #: or not the connection's calls are copied (overload sampling).
    error_head: bool = attrs.field(kw_only=True, default=False)
    #: On a response's error head: the call was copied for the connection's own decoding too, which
    #: reports the error unless it loses the exchange.
    also_copied: bool = attrs.field(kw_only=True, default=False)
    #: On a response's error head (PostgreSQL): the request head is what was sent after an error
    #: was answered, which the server skipped, and the response its ReadyForQuery.
    after_error: bool = attrs.field(kw_only=True, default=False)
    #: Where these bytes start in their direction's stream (bytes moved that way before them, since
    #: the probe first copied from the socket); -1 when the source does not know.  A call that was
    #: not copied (overload sampling, a record lost) shows as a jump: ``seq`` > previous seq + size.
    seq: int = attrs.field(kw_only=True, default=-1)
    #: ``"tcp"``, or ``"udp"``: the call moved one datagram, and ``rport`` is 0 when its peer is not
    #: known (a datagram received on an unconnected socket).
    transport: str = attrs.field(kw_only=True, default="tcp")
    #: The bytes are the plaintext of a TLS connection on this socket (the tls probe: ``syscall`` is
    #: the library call, ``SSL_write``, ``go_tls_read`` …), not the socket's own bytes.
    tls: bool = attrs.field(kw_only=True, default=False)

    @property
    def truncated(self) -> bool:
        return len(self.data) < self.size

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        data["data"] = self.data.hex()
        data["truncated"] = self.truncated
        return data


@attrs.frozen
class ExchangeEvent(Event):
    """A decoded request and its response, seen by one side of a connection.

    ``ts`` is the wall-clock time of the first request byte.  When client and
    server both run on this host, each side reports the exchange with its own
    ``role``.
    """

    type: ClassVar[str] = "request"
    protocol: str = attrs.field(kw_only=True)
    pid: int = attrs.field(kw_only=True)
    comm: str = attrs.field(kw_only=True)
    role: str = attrs.field(kw_only=True)
    laddr: str = attrs.field(kw_only=True)
    lport: int = attrs.field(kw_only=True)
    raddr: str = attrs.field(kw_only=True)
    rport: int = attrs.field(kw_only=True)
    #: HTTP method, Redis command, MySQL command (``QUERY`` …).
    method: str = attrs.field(kw_only=True)
    #: HTTP path and query, Redis key, MySQL statement.
    target: str = attrs.field(kw_only=True)
    #: HTTP status code, ``"OK"``/``"ERR"`` for Redis and MySQL, None without a response.
    status: int | str | None = attrs.field(kw_only=True)
    error: bool = attrs.field(kw_only=True)
    error_message: str | None = attrs.field(kw_only=True, default=None)
    #: From the last request byte to the first response byte, as this side saw them.
    latency_ns: int | None = attrs.field(kw_only=True)
    #: From the first request byte to the last response byte.
    duration_ns: int | None = attrs.field(kw_only=True, default=None)
    request_bytes: int = attrs.field(kw_only=True)
    response_bytes: int = attrs.field(kw_only=True)
    sock_id: int = attrs.field(kw_only=True, default=0)
    cgroup_id: int = attrs.field(kw_only=True, default=0)
    #: The socket's cookie: unique per connection while the kernel runs (0: not known).
    conn_id: int = attrs.field(kw_only=True, default=0)
    #: How many exchanges this detail stands for (1: itself).  Under overload sampling the payload
    #: of 1 connection-period in N is decoded; the exchanges the kernel counts are weighted so that
    #: the decoded ones of an edge side add up to its exact count (deetune.detail), others by N.
    sampling: int | float = attrs.field(kw_only=True, default=1)
    #: Protocol specifics (``host``, ``version``, ``traceparent``, ``user`` …).
    attributes: dict[str, Any] = attrs.field(kw_only=True, factory=dict)
    #: Service names of both ends, set in place by the topology aggregator (None before it; the
    #: one writer of these two fields, see deetune.topology.aggregator._enricher).
    client_service: str | None = attrs.field(kw_only=True, default=None)
    server_service: str | None = attrs.field(kw_only=True, default=None)
    #: The request's and the response's bytes as they crossed the socket, only on connections a
    #: recording task records (None otherwise, and not in the JSON): a prefix of at most the task's
    #: limit, shorter than ``request_bytes``/``response_bytes`` when cut by the limit or a capture
    #: gap.  The recorder takes them off the event before it reaches the sinks.
    request_payload: bytes | None = attrs.field(
        kw_only=True, default=None, repr=lambda b: "None" if b is None else f"<{len(b)} bytes>")
    response_payload: bytes | None = attrs.field(
        kw_only=True, default=None, repr=lambda b: "None" if b is None else f"<{len(b)} bytes>")

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        if self.client_service is None:
            del data["client_service"], data["server_service"]
        for key in ("request_payload", "response_payload"):
            value = data[key]
            if value is None:
                del data[key]
            else:
                data[key] = base64.b64encode(value).decode()
        return data

    @classmethod
    def from_exchange(cls, x: Any, *, clock_offset: int, pid: int, comm: str, role: str, laddr: str, lport: int,
                      raddr: str, rport: int, sock_id: int = 0, cgroup_id: int = 0, conn_id: int = 0,
                      sampling: int | float = 1, request_payload: bytes | None = None,
                      response_payload: bytes | None = None, **extra: Any) -> "ExchangeEvent":
        """The event for a decoder's :class:`~deetune.decoders.base.Exchange`, seen by one side
        (``clock_offset``: wall clock minus the exchange's clock).  Its text is redacted here, once
        for every sink (passwords in statements, credentials in URLs: deetune.redaction)."""
        event = exchange_event(x, clock_offset, pid, comm, role, laddr, lport, raddr, rport, sock_id, cgroup_id,
                               conn_id, sampling, request_payload, response_payload)
        if not extra and cls is ExchangeEvent:
            return event
        return cls(**{**attrs.asdict(event, recurse=False), **extra})  # a subclass, or fields given beside


def exchange_event(x: Any, clock_offset: int, pid: int, comm: str, role: str, laddr: str, lport: int, raddr: str,
                   rport: int, sock_id: int = 0, cgroup_id: int = 0, conn_id: int = 0, sampling: int | float = 1,
                   request_payload: bytes | None = None, response_payload: bytes | None = None) -> ExchangeEvent:
    """``ExchangeEvent.from_exchange`` with its arguments in this order (the L7 handler's call, once
    per exchange: keywords take longer to bind); the fields go positionally (positional_builder)."""
    start = x.request_start_ns
    end = x.response_end_ns
    protocol = x.protocol
    target, error_message = redact_exchange_text(protocol, x.target, x.error_message)
    return _build_exchange_event(
        start + clock_offset,  # ts
        start,  # ts_mono_ns
        protocol,
        pid,
        comm,
        role,
        laddr,
        lport,
        raddr,
        rport,
        x.method,
        target,
        x.status,
        x.error,
        error_message,
        x.latency_ns,
        None if end is None else end - start,  # duration_ns
        x.request_bytes,
        x.response_bytes,
        sock_id,
        cgroup_id,
        conn_id,
        sampling,
        dict(x.attributes),
        None,  # client_service
        None,  # server_service
        request_payload,
        response_payload,
    )


_build_exchange_event = positional_builder(ExchangeEvent)
assert [f.name for f in attrs.fields(ExchangeEvent)] == [
    "ts", "ts_mono_ns", "protocol", "pid", "comm", "role", "laddr", "lport", "raddr", "rport", "method", "target",
    "status", "error", "error_message", "latency_ns", "duration_ns", "request_bytes", "response_bytes", "sock_id",
    "cgroup_id", "conn_id", "sampling", "attributes", "client_service", "server_service", "request_payload",
    "response_payload",
], "ExchangeEvent.from_exchange passes the fields positionally: update it"


@attrs.frozen
class CountedEvent(Event):
    """Base of the kernel's exact counts (deetune.accounting): differences since the last read,
    for one side of an edge.  The topology aggregator names both ends (``client_service`` /
    ``server_service``) and says whether this side is the one counted (``counted``: an exchange
    between two processes of this host is counted on one side only)."""

    #: ``"client"`` or ``"server"``: which side kept the counter.
    role: str = attrs.field(kw_only=True)
    #: That side's process.
    pid: int = attrs.field(kw_only=True)
    #: Server side: its client's process when the client connected from this host; 0 otherwise.
    peer_pid: int = attrs.field(kw_only=True, default=0)
    cgroup_id: int = attrs.field(kw_only=True, default=0)
    #: The other side's address.
    raddr: str = attrs.field(kw_only=True)
    #: The server's port (local on the server side, remote on the client side).
    port: int = attrs.field(kw_only=True)
    #: ``http``, ``redis``, ``mysql``; ``tcp`` for connection counts.
    protocol: str = attrs.field(kw_only=True)
    client_service: str | None = attrs.field(kw_only=True, default=None)
    server_service: str | None = attrs.field(kw_only=True, default=None)
    counted: bool | None = attrs.field(kw_only=True, default=None)

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        if self.client_service is None:
            del data["client_service"], data["server_service"], data["counted"]
        return data


@attrs.frozen
class RequestCounts(CountedEvent):
    """Exchanges the kernel counted for one edge side, method and status since the last read."""

    type: ClassVar[str] = "request_counts"
    method: str = attrs.field(kw_only=True)
    #: As the decoders report it: HTTP's code, ``"OK"``/``"ERR"`` for the others, None without one.
    status: int | str | None = attrs.field(kw_only=True)
    #: ``ok``, ``error``, ``no_response``, ``status_unknown`` (exchanges); ``unparsed`` (chunks the
    #: kernel could not follow), ``unsolicited`` (replies no request asked for): see deetune.accounting.
    outcome: str = attrs.field(kw_only=True)
    #: How many (exchanges, or chunks or replies for the last two outcomes).
    count: int = attrs.field(kw_only=True)
    request_bytes: int = attrs.field(kw_only=True, default=0)
    response_bytes: int = attrs.field(kw_only=True, default=0)
    latency_sum_ns: int = attrs.field(kw_only=True, default=0)


@attrs.frozen
class LatencyCounts(CountedEvent):
    """The latency histogram of one edge side and method since the last read: bucket → exchanges
    (buckets of deetune.accounting.LATENCY_BOUNDS_NS)."""

    type: ClassVar[str] = "latency_counts"
    method: str = attrs.field(kw_only=True)
    buckets: dict[int, int] = attrs.field(kw_only=True, factory=dict)


@attrs.frozen
class ConnectionCounts(CountedEvent):
    """Connections the kernel counted for one edge side since the last read."""

    type: ClassVar[str] = "connection_counts"
    opened: int = attrs.field(kw_only=True, default=0)
    closed: int = attrs.field(kw_only=True, default=0)
    failed: int = attrs.field(kw_only=True, default=0)
    #: Payload bytes client → server and back, of the connections closed.
    bytes_sent: int = attrs.field(kw_only=True, default=0)
    bytes_received: int = attrs.field(kw_only=True, default=0)
    retransmits: int = attrs.field(kw_only=True, default=0)
    #: Connections closed by a reset (either way).
    resets: int = attrs.field(kw_only=True, default=0)
