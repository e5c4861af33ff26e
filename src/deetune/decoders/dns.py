"""DNS decoder (RFC 1035), over UDP and over TCP.

Over UDP every datagram is one message; over TCP each message is preceded by its
2-byte length (RFC 7766) and a connection may carry several queries at once.  A
query is paired with the response that carries the same id and the same question
(compared byte for byte: resolvers echo the question as asked), in any order.  On a
UDP socket one decoder sees every peer: a server's socket receives the queries of
all its clients, so a query whose sender the kernel did not say (``Chunk.peer`` is
None on an unconnected socket's receive side) gets it from the response sent back.

An exchange: ``method`` the query type (``A``, ``AAAA``, ``PTR`` …; the opcode for
anything but a standard query), ``target`` the name asked, ``status`` the response
code (``NOERROR``, ``NXDOMAIN``, ``SERVFAIL`` …).  ``error`` is set for the codes
that say the server failed or refused (every code but NOERROR and NXDOMAIN, which is
an answer: the name does not exist).  Attributes: ``answers`` (answer count),
``addresses`` (the A/AAAA records of the answer, whatever name they are for: the
addresses the name asked resolves to, through CNAMEs), ``cnames``, ``transport``,
``tc`` (truncated response: the client retries over TCP).  A query without a
response within :attr:`DnsDecoder.timeout_ns` is reported without one
(``status`` None, ``attributes["timeout"]``).
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Iterable

from deetune.decoders.base import Chunk, Decoder, Direction, Exchange, Undecodable
from deetune.decoders.framing import Framer

__all__ = ["DnsDecoder"]

#: Queries awaiting a response per decoder, beyond which the oldest is reported unanswered.
MAX_PENDING = 4096
#: Addresses and CNAMEs kept per response.
MAX_RECORDS = 16
_HEADER = struct.Struct(">HHHHHH")
_RR = struct.Struct(">HHIH")

_TYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT", 28: "AAAA",
    33: "SRV", 35: "NAPTR", 39: "DNAME", 41: "OPT", 43: "DS", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY",
    52: "TLSA", 64: "SVCB", 65: "HTTPS", 99: "SPF", 252: "AXFR", 251: "IXFR", 255: "ANY", 257: "CAA",
}
_RCODES = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED", 6: "YXDOMAIN",
    7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE",
}
_OPCODES = {0: "QUERY", 1: "IQUERY", 2: "STATUS", 4: "NOTIFY", 5: "UPDATE", 6: "DSO"}
_NOT_ERRORS = frozenset((0, 3))
_NAME_BYTES = bytes(range(0x21, 0x7F))
_ntop = socket.inet_ntop
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
_REQUEST = Direction.REQUEST


def _question_end(msg: bytes, pos: int) -> int:
    """Where the question's name (uncompressed labels) ends plus its type and class, or -1."""
    end = len(msg)
    for _ in range(128):
        if pos >= end:
            return -1
        n = msg[pos]
        if n == 0:
            return pos + 5 if pos + 5 <= end else -1
        if n > 63:
            return -1  # a compression pointer has nothing to point back to in the question
        pos += n + 1
    return -1


def _skip_name(msg: bytes, pos: int) -> int:
    """The position after a (possibly compressed) name in a resource record, or -1."""
    end = len(msg)
    for _ in range(128):
        if pos >= end:
            return -1
        n = msg[pos]
        if n == 0:
            return pos + 1
        if n >= 0xC0:
            return pos + 2
        if n > 63:
            return -1
        pos += n + 1
    return -1


def _read_name(msg: bytes, pos: int) -> str | None:
    """A name, following compression pointers (bounded), as dotted text; None when malformed."""
    labels: list[str] = []
    for _ in range(64):
        if pos >= len(msg):
            return None
        n = msg[pos]
        if n == 0:
            return ".".join(labels) if labels else "."
        if n >= 0xC0:
            if pos + 1 >= len(msg):
                return None
            pos = (n & 0x3F) << 8 | msg[pos + 1]
            continue
        if n > 63:
            return None
        labels.append(msg[pos + 1:pos + 1 + n].decode("ascii", "backslashreplace"))
        pos += n + 1
    return None


def _looks_like(msg: bytes, response: bool) -> bool:
    """detect(): a whole DNS message header and question (the start of one, at least)."""
    if len(msg) < 17:
        return False
    _, flags, qd, an, ns, ar = _HEADER.unpack_from(msg)
    if (flags >> 15) != response or (flags >> 11) & 0xF not in (0, 4, 5) or flags & 0x40:  # QR, opcode, Z
        return False
    if qd != 1 or ar > 16:
        return False
    if not response and (an or ns or flags & 0xF):
        return False
    if response and (flags & 0xF) > 10:
        return False
    end = _question_end(msg, 12)
    if end < 0 or end - 12 > 260:
        return False
    qtype, qclass = struct.unpack_from(">HH", msg, end - 4)
    if qclass not in (1, 3, 4, 254, 255) and not (qclass & 0x7FFF) == 1:
        return False
    if qtype == 0:
        return False
    # Labels of printable characters (names on the wire are host names, mostly).
    pos = 12
    while msg[pos]:
        label = msg[pos + 1:pos + 1 + msg[pos]]
        if label.translate(None, _NAME_BYTES):
            return False
        pos += msg[pos] + 1
    return True


class _Tcp(Framer):
    """RFC 7766: a 2-byte length before every message."""

    keep = 4096
    length_at = 0
    length_format = ">H"
    length_adds = 2
    min_size = 2 + 12


class _Query:
    __slots__ = ("name", "qtype", "opcode", "start", "end", "nbytes", "peer", "truncated")

    def __init__(self, name: str, qtype: int, opcode: int, start: int, end: int, nbytes: int, peer: Any,
                 truncated: bool) -> None:
        self.name = name
        self.qtype = qtype
        self.opcode = opcode
        self.start = start
        self.end = end
        self.nbytes = nbytes
        self.peer = peer
        self.truncated = truncated


class DnsDecoder(Decoder):
    """DNS queries and responses of one TCP connection or one UDP socket."""

    protocol = "dns"
    default_ports = (53,)
    datagrams = True
    #: How long (ns) a query waits for its response before it is reported without one.
    timeout_ns = 5_000_000_000

    @classmethod
    def detect(cls, direction: Direction, data: bytes) -> bool:
        try:
            response = direction is Direction.RESPONSE
            if _looks_like(data, response):
                return True
            # Over TCP: the 2-byte length first.
            return (len(data) >= 19 and struct.unpack_from(">H", data)[0] >= len(data) - 2
                    and _looks_like(data[2:], response))
        except Exception:  # detect() must never raise, whatever the bytes
            return False

    def __init__(self, datagram: bool = False) -> None:
        self.datagram = datagram
        self._framers = None if datagram else {Direction.REQUEST: _Tcp(), Direction.RESPONSE: _Tcp()}
        self._request_framer, self._response_framer = (
            (None, None) if datagram else (self._framers[Direction.REQUEST], self._framers[Direction.RESPONSE]))
        #: (id + question bytes) → queries awaiting a response (several when ids collide).
        self._pending: dict[bytes, list[_Query]] = {}
        self._count = 0
        self._names: dict[bytes, str] = {}
        self._out: list[Exchange] = []
        #: Responses that answered no query seen (the capture started after it).
        self.orphan_responses = 0
        #: Datagrams too short or malformed to read: skipped (a UDP socket carries other things too).
        self.malformed = 0

    def feed(self, chunk: Chunk) -> Iterable[Exchange]:
        self._out = out = []
        try:
            if self.datagram:
                self._message(chunk.data, chunk.size, chunk.direction, chunk.ts_ns, chunk.ts_ns, chunk.peer,
                              chunk.size > len(chunk.data))
            else:
                direction = chunk.direction
                framer = self._request_framer if direction is _REQUEST else self._response_framer
                message = self._message
                for head, size, ts0, ts1, truncated in framer.feed(chunk.data, chunk.size, chunk.ts_ns):
                    message(head[2:], size, direction, ts0, ts1, None, truncated)
            if self._count:
                # Nothing to expire while the oldest query waiting is younger than the timeout.
                pending = self._pending
                if pending and pending[next(iter(pending))][0].end < chunk.ts_ns - self.timeout_ns:
                    self._expire(chunk.ts_ns)
        except Undecodable:
            raise
        except Exception as exc:  # a slip on malformed bytes: stop decoding, never crash the caller
            raise Undecodable(f"dns: malformed message ({type(exc).__name__}: {exc})") from None
        return out

    def close(self, ts_ns: int) -> Iterable[Exchange]:
        self._out = []
        for queries in self._pending.values():
            for query in queries:
                self._out.append(self._exchange(query, None, None, 0, ts_ns, None))
        self._pending.clear()
        self._count = 0
        return self._out

    # ------------------------------------------------------------------ messages

    def _message(self, msg: bytes, size: int, direction: Direction, ts0: int, ts1: int, peer: Any,
                 truncated: bool) -> None:
        if len(msg) < 12:
            self._bad("message shorter than its header")
            return
        flags = msg[2] << 8 | msg[3]
        end = _question_end(msg, 12) if msg[4] == 0 and msg[5] == 1 else -1
        if end < 0:
            self._bad("no question (or a malformed one)")
            return
        key = msg[:2] + msg[12:end]
        if not flags & 0x8000:  # a query
            if direction is not _REQUEST and not self.datagram:
                raise Undecodable("dns: a query in the response direction")
            qname = msg[12:end - 4]
            name = self._names.get(qname)
            if name is None:
                name = _read_name(msg, 12) or ""
                if len(self._names) < MAX_PENDING:
                    self._names[qname] = name
            query = _Query(name, msg[end - 4] << 8 | msg[end - 3], (flags >> 11) & 0xF, ts0, ts1, size, peer,
                           truncated)
            queries = self._pending.get(key)
            if queries is None:
                self._pending[key] = [query]
            else:
                queries.append(query)
            self._count += 1
            if self._count > MAX_PENDING:
                self._expire(ts1, force=True)
            return
        queries = self._pending.get(key)
        if not queries:
            self.orphan_responses += 1
            return
        index = 0
        if peer is not None and len(queries) > 1:
            index = next((i for i, q in enumerate(queries) if q.peer == peer or q.peer is None), 0)
        query = queries.pop(index)
        if not queries:
            del self._pending[key]
        self._count -= 1
        self._out.append(self._exchange(query, msg, ts0, size, ts1, peer, truncated, end))

    def _bad(self, why: str) -> None:
        if not self.datagram:
            raise Undecodable(f"dns: {why}")
        self.malformed += 1

    def _expire(self, now: int, force: bool = False) -> None:
        """Report queries that waited longer than the timeout (or the oldest, over the bound).
        Keys are in the order their first query came: the oldest is first."""
        deadline = now - self.timeout_ns
        pending = self._pending
        while pending:
            key = next(iter(pending))
            queries = pending[key]
            if not force and queries[0].end >= deadline:
                break
            force = False
            query = queries.pop(0)
            if not queries:
                del pending[key]
            self._count -= 1
            exchange = self._exchange(query, None, None, 0, None, None)
            exchange.attributes["timeout"] = True
            self._out.append(exchange)

    def _exchange(self, query: _Query, msg: bytes | None, ts0: int | None, size: int, ts1: int | None,
                  peer: Any, truncated: bool = False, question_end: int = 0) -> Exchange:
        qtype = _TYPES.get(query.qtype) or f"TYPE{query.qtype}"
        method = qtype if query.opcode == 0 else _OPCODES.get(query.opcode, f"OPCODE{query.opcode}")
        attributes: dict[str, Any] = {"transport": "udp" if self.datagram else "tcp"}
        if query.opcode:
            attributes["qtype"] = qtype
        status = None
        error = False
        message = None
        if msg is not None:
            flags = msg[2] << 8 | msg[3]
            rcode = flags & 0xF
            status = _RCODES.get(rcode) or f"RCODE{rcode}"
            error = rcode not in _NOT_ERRORS
            if error:
                message = status
            answers = msg[6] << 8 | msg[7]
            attributes["answers"] = answers
            if flags & 0x0200:
                attributes["tc"] = True
            if answers:
                self._answers(msg, question_end, answers, attributes)
        if query.truncated or truncated:
            attributes["truncated"] = True
        return Exchange(
            "dns", method, query.name, status, error, query.start, query.end, ts0, ts1, query.nbytes, size,
            message, attributes, query.peer if query.peer is not None else peer,
        )

    @staticmethod
    def _answers(msg: bytes, pos: int, count: int, attributes: dict[str, Any]) -> None:
        """The A/AAAA addresses and CNAME targets of the answer section (as far as captured),
        which starts at ``pos``."""
        addresses: list[str] = []
        cnames: list[str] = []
        for _ in range(min(count, 64)):
            if pos < len(msg) and msg[pos] >= 0xC0:  # a compression pointer: the usual owner name
                pos += 2
            else:
                pos = _skip_name(msg, pos)
            if pos < 0 or pos + 10 > len(msg):
                break
            rtype, _, _, length = _RR.unpack_from(msg, pos)
            pos += 10
            if pos + length > len(msg):
                break
            if rtype == 1 and length == 4 and len(addresses) < MAX_RECORDS:
                addresses.append(_ntop(_AF_INET, msg[pos:pos + 4]))
            elif rtype == 28 and length == 16 and len(addresses) < MAX_RECORDS:
                addresses.append(_ntop(_AF_INET6, msg[pos:pos + 16]))
            elif rtype == 5 and len(cnames) < MAX_RECORDS:
                name = _read_name(msg, pos)
                if name:
                    cnames.append(name)
            pos += length
        if addresses:
            attributes["addresses"] = addresses
        if cnames:
            attributes["cnames"] = cnames
