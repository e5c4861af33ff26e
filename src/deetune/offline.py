"""Offline decoding: pcap / pcapng captures (optionally gzipped) → exchange events.

Each TCP connection's two byte streams are rebuilt from the packets and fed,
in capture order, to the same :class:`~deetune.decoders.session.StreamSession`
the live agent uses, so a capture and a live run of the same traffic give the
same exchanges.

Point of view: offline exchanges are reported from the **client** side
(``role="client"``, ``laddr``/``lport`` the client, ``raddr``/``rport`` the
server), with ``pid=0`` and ``comm=""`` (a capture knows no processes).  Times
are the capture timestamps in ns since the epoch; the capture clock is the
only clock, so ``ts_mono_ns`` equals ``ts``.  Latency is measured where the
capture was taken, from the last request segment to the first response segment.

Who is the client: the sender of the first SYN (or the receiver of a SYN-ACK).
When the capture starts mid-connection, the sender of the first data segment,
unless its source port looks like a server's (below 1024 or a decoder's
default port) while the other does not: then the server-like port is the
server.  When ports do not tell, the content decides (bytes that look like a
request were sent by the client).

Reassembly: segments are placed by sequence number (32-bit wrap handled),
exact and partial retransmissions are trimmed away, and out-of-order segments
wait for the missing bytes.  Bytes that never show up become a *gap*: a chunk
with ``data=b""`` and ``size`` = the hole, which decoders step over when the
protocol declares lengths.  A hole is declared once the peer acknowledges
bytes the capture never had (the receiver got them, the capture did not), when
the connection ends, or when too much waits behind it.  A segment cut by the
capture's snap length is a chunk with ``len(data) < size``.

Limitations: IP fragments are counted and skipped; a pcapng file is read with
its first interface's link type; pcapng timestamps finer than a microsecond
pass through dpkt as floats (exact to about 0.25 µs).
"""

from __future__ import annotations

import collections
import gzip
import logging
import os
import socket
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import IO, Self

import attrs
import dpkt

from deetune.decoders.base import Decoder, Exchange
from deetune.decoders.session import State, StreamSession
from deetune.events import ExchangeEvent

log = logging.getLogger("deetune.offline")

__all__ = ["Capture", "CaptureError", "DecodeStats", "OfflineDecoder", "decode_file", "open_capture"]

#: Connections tracked at once; the least recently active is closed and dropped beyond.
MAX_CONNECTIONS = 65536
#: Out-of-order bytes (or segments) waiting for a hole to fill before it is declared a gap.
MAX_HELD_BYTES = 8 << 20
MAX_HELD_SEGMENTS = 4096

_MASK = 0xFFFFFFFF
_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10
_VLAN_TYPES = (0x8100, 0x88A8, 0x9100)
_ETH_IPV4, _ETH_IPV6 = 0x0800, 0x86DD
# IPv6 extension headers that may sit before TCP; 44 (fragment) is handled apart.
_IPV6_EXTENSIONS = {0, 43, 60}
_IPV6_AH, _IPV6_FRAGMENT = 51, 44

_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
_GZIP_MAGIC = b"\x1f\x8b"
#: Errors dpkt, gzip and zlib raise on damaged input: the capture ends there.
_READ_ERRORS = (dpkt.Error, ValueError, struct.error, IndexError, TypeError, EOFError, OSError, zlib.error,
                OverflowError, MemoryError)  # fmt: skip


@attrs.define
class DecodeStats:
    """What happened to one capture's packets and connections."""

    packets: int = 0
    tcp_packets: int = 0
    #: TCP connections that carried payload.
    connections: int = 0
    exchanges: int = 0
    #: Connections whose bytes no decoder recognised.
    unknown: int = 0
    #: Connections a decoder gave up on.
    undecodable: int = 0
    #: Packets that are not TCP over IP (ARP, UDP, ICMP …).
    non_tcp: int = 0
    #: Packets whose headers are cut or inconsistent.
    malformed: int = 0
    #: IP fragments (not reassembled).
    fragments: int = 0
    #: Segments whose bytes had all been seen already.
    retransmissions: int = 0
    #: Holes passed to decoders as gaps, and the bytes they covered.
    gaps: int = 0
    gap_bytes: int = 0
    #: Why reading stopped before the end of the file (damaged or cut capture); None when it did not.
    read_error: str | None = None
    #: Per protocol: ``exchanges``, ``connections``, ``undecodable`` and what its decoders skipped
    #: or repaired, by reason (``resync:gap``, ``unsolicited_response``, ``skipped_bytes`` …).
    protocols: dict[str, dict[str, int]] = attrs.field(factory=dict)
    #: Why connections were given up, by reason (one line each), with how many.
    gave_up: dict[str, int] = attrs.field(factory=dict)
    #: Damaged records or blocks skipped, the bytes they took, and captures cut inside a packet.
    damaged_records: int = 0
    damaged_bytes: int = 0
    cut_captures: int = 0

    def add(self, other: DecodeStats) -> None:
        for field in attrs.fields(DecodeStats):
            if field.type in (int, "int"):
                setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        self.read_error = self.read_error or other.read_error
        for protocol, counts in other.protocols.items():
            mine = self.protocols.setdefault(protocol, {})
            for name, n in counts.items():
                mine[name] = mine.get(name, 0) + n
        for reason, n in other.gave_up.items():
            self.gave_up[reason] = self.gave_up.get(reason, 0) + n

    def count(self, protocol: str, name: str, n: int = 1) -> None:
        counts = self.protocols.setdefault(protocol, {})
        counts[name] = counts.get(name, 0) + n

    def summary(self) -> str:
        return (f"{self.exchanges} exchanges from {self.connections} connections "
                f"({self.unknown} unknown, {self.undecodable} undecodable), {self.packets} packets")  # fmt: skip

    def details(self) -> list[str]:
        """The summary's detail, one line per protocol and one for what was not decoded or read."""
        lines = []
        for protocol in sorted(self.protocols):
            counts = dict(self.protocols[protocol])
            exchanges, connections = counts.pop("exchanges", 0), counts.pop("connections", 0)
            undecodable = counts.pop("undecodable", 0)
            line = f"{protocol}: {exchanges} exchanges on {connections} connections"
            if undecodable:
                line += f", {undecodable} given up"
            skipped = _describe_skips(counts)
            if skipped:
                line += f"; {skipped}"
            lines.append(line)
        not_decoded = []
        if self.unknown:
            not_decoded.append(f"{self.unknown} connections of no protocol decoded here")
        for reason, n in sorted(self.gave_up.items(), key=lambda item: -item[1]):
            not_decoded.append(f"{n} given up: {reason}")
        if not_decoded:
            lines.append("not decoded: " + "; ".join(not_decoded))
        skipped_packets = [f"{n} {what}" for n, what in ((self.non_tcp, "not TCP"), (self.malformed, "malformed"),
                                                          (self.fragments, "IP fragments")) if n]  # fmt: skip
        if skipped_packets:
            lines.append("packets skipped: " + ", ".join(skipped_packets))
        if self.gaps:
            lines.append(f"capture holes: {self.gaps} ({self.gap_bytes} bytes the capture never had)")
        if self.damaged_records or self.cut_captures or self.read_error:
            damage = []
            if self.damaged_records:
                damage.append(f"{self.damaged_records} damaged records skipped ({self.damaged_bytes} bytes)")
            if self.cut_captures:
                damage.append(f"{self.cut_captures} file(s) end inside a packet")
            if self.read_error:
                damage.append(f"reading stopped early: {self.read_error}")
            lines.append("capture damage: " + "; ".join(damage))
        return lines


def _describe_skips(counts: dict[str, int]) -> str:
    """``resync:gap`` … as words: "3 resyncs (gap 2, garbage 1), 1 unsolicited response, 120 bytes skipped"."""
    resyncs = {name.split(":", 1)[1]: n for name, n in counts.items() if name.startswith("resync:")}
    parts = []
    if resyncs:
        total = sum(resyncs.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(resyncs.items(), key=lambda item: -item[1]))
        parts.append(f"{total} resync{'s' if total != 1 else ''} ({reasons})")
    for name, n in sorted(counts.items()):
        if name.startswith("resync:"):
            continue
        if name == "skipped_bytes":
            parts.append(f"{n} bytes skipped")
        else:
            parts.append(f"{n} {name.replace('_', ' ')}{'s' if n != 1 and not name.endswith('s') else ''}")
    return ", ".join(parts)


# -- capture files ----------------------------------------------------------------------------

#: A record or block claiming more than this is damage, not a packet (the largest snap length
#: tools write is 262,144 bytes; pcapng blocks carry one packet and its options).
MAX_RECORD_BYTES = 1 << 20
#: How far past a damaged record the reader looks for the next good one before giving up.
MAX_RESYNC_BYTES = 64 << 20
_PCAP_MICRO = {b"\xa1\xb2\xc3\xd4": ">", b"\xd4\xc3\xb2\xa1": "<"}
_PCAP_NANO = {b"\xa1\xb2\x3c\x4d": ">", b"\x4d\x3c\xb2\xa1": "<"}
_PCAPNG_BLOCKS = {0x0A0D0D0A, 1, 2, 3, 4, 5, 6, 7, 0x0B, 0x0BAD, 0x40000BAD}


class CaptureError(Exception):
    """The file cannot be read as a capture; the message is one line."""


@attrs.define
class CaptureDamage:
    """What a damaged capture cost: nothing is skipped without being counted here."""

    #: Records (pcap) or blocks (pcapng) whose header could not be true, skipped to the next good one.
    records: int = 0
    #: Bytes skipped doing so.
    bytes: int = 0
    #: The file ends inside a packet (tcpdump killed mid-write): its captured part is decoded.
    cut_at_end: bool = False
    #: Why reading stopped before the end of the file, when it did (no good record after damage).
    stopped: str | None = None

    def describe(self) -> str | None:
        """One line, or None when the capture was whole."""
        parts = []
        if self.records:
            parts.append(f"{self.records} damaged record{'s' if self.records != 1 else ''} skipped "
                         f"({self.bytes} bytes)")  # fmt: skip
        if self.cut_at_end:
            parts.append("the file ends inside a packet (its captured part is decoded)")
        if self.stopped:
            parts.append(f"reading stopped: {self.stopped}")
        return "; ".join(parts) or None


class _Bytes:
    """A file read forward through a window, with look-ahead for finding the next good record."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._buf = bytearray()
        self._pos = 0  # offset in _buf of the next byte to read
        self.offset = 0  # file offset of the next byte to read
        self._eof = False

    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes from the read position, without consuming them (fewer at the end)."""
        while len(self._buf) - self._pos < n and not self._eof:
            block = self._f.read(max(n, 1 << 16))
            if not block:
                self._eof = True
                break
            if self._pos > (1 << 20):
                del self._buf[: self._pos]
                self._pos = 0
            self._buf += block
        return bytes(self._buf[self._pos : self._pos + n])

    def skip(self, n: int) -> None:
        self.peek(n)
        n = min(n, len(self._buf) - self._pos)
        self._pos += n
        self.offset += n

    def read(self, n: int) -> bytes:
        data = self.peek(n)
        self.skip(len(data))
        return data

    def at_end(self) -> bool:
        return not self.peek(1)


class Capture:
    """An open capture file: its packets as ``(ts_ns, linktype, frame)`` (:meth:`packets`).

    Damage does not end the reading: a record or block whose header cannot be true is skipped,
    and reading goes on at the next header that can (its successor must be one too, or the end
    of the file); a file cut inside a packet yields what it has of that packet.  :attr:`damage`
    counts both; :attr:`read_error` says why reading stopped early, when it did.
    """

    def __init__(self, path: str):
        self.path = path
        self.damage = CaptureDamage()
        self._file = _open_raw(path)
        try:
            self._raw = getattr(self._file, "fileobj", None) or self._file
            try:
                self.size = os.fstat(self._raw.fileno()).st_size
            except (OSError, AttributeError, ValueError):
                self.size = 0
            self._in = _Bytes(self._file)
            try:
                magic = self._in.peek(4)
            except _READ_ERRORS as exc:
                raise CaptureError(f"not a valid capture: {_one_line(exc) or type(exc).__name__}") from None
            if magic == _PCAPNG_MAGIC:
                self._format = "pcapng"
                self._reader = _PcapngReader(self._in, self.damage)
            elif magic in _PCAP_MICRO or magic in _PCAP_NANO:
                self._format = "pcap"
                self._reader = _PcapReader(self._in, self.damage)
            else:
                raise CaptureError("not a pcap or pcapng capture")
            #: The link type of the first interface (pcap: the file's).
            self.linktype: int = self._reader.first_linktype()
        except BaseException:
            self._file.close()
            raise

    @property
    def read_error(self) -> str | None:
        return self.damage.stopped

    @property
    def position(self) -> int:
        """Bytes of the file (compressed, when gzipped) read so far: for progress."""
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return self._in.offset

    def packets(self) -> Iterator[tuple[int, int, bytes]]:
        try:
            yield from self._reader.packets()
        except _READ_ERRORS as exc:  # the compressed stream itself is damaged
            self.damage.stopped = _one_line(exc) or type(exc).__name__

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        for ts_ns, _, frame in self.packets():
            yield ts_ns, frame

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PcapReader:
    """Classic pcap: a 24-byte file header, then 16-byte record headers each followed by its frame."""

    def __init__(self, src: _Bytes, damage: CaptureDamage) -> None:
        header = src.read(24)
        if len(header) < 24:
            raise CaptureError("not a valid capture: the file header is cut short")
        magic = header[:4]
        self._order = _PCAP_MICRO.get(magic) or _PCAP_NANO[magic]
        self._nano = magic in _PCAP_NANO
        _, _, _, _, snaplen, linktype = struct.unpack(self._order + "HHiIII", header[4:])
        self._linktype = linktype & 0x0FFFFFFF  # the upper bits carry FCS information
        self._limit = min(max(snaplen, 262144), MAX_RECORD_BYTES)
        self._record = struct.Struct(self._order + "IIII")
        self._src = src
        self._damage = damage
        self._last_sec: int | None = None

    def first_linktype(self) -> int:
        return self._linktype

    def _plausible(self, header: bytes) -> bool:
        sec, frac, caplen, origlen = self._record.unpack(header)
        if frac >= (1_000_000_000 if self._nano else 1_000_000) or caplen > self._limit or caplen > max(origlen, 1 << 18):
            return False
        return self._last_sec is None or abs(sec - self._last_sec) <= 86400

    def packets(self) -> Iterator[tuple[int, int, bytes]]:
        src = self._src
        record = self._record
        scale = 1 if self._nano else 1000
        while True:
            header = src.peek(16)
            if not header:
                return
            if len(header) < 16:
                self._damage.cut_at_end = True
                src.skip(len(header))
                return
            if not self._plausible(header):
                if not self._resync():
                    return
                continue
            sec, frac, caplen, _ = record.unpack(header)
            src.skip(16)
            frame = src.read(caplen)
            if len(frame) < caplen:
                self._damage.cut_at_end = True
            self._last_sec = sec
            yield sec * 1_000_000_000 + frac * scale, self._linktype, frame
            if len(frame) < caplen:
                return

    def _resync(self) -> bool:
        """Skip to the next record header that can be true and is followed by another (or the end)."""
        src = self._src
        start = src.offset
        src.skip(1)
        while src.offset - start < MAX_RESYNC_BYTES:
            header = src.peek(16)
            if len(header) < 16:
                break
            if self._plausible(header):
                caplen = self._record.unpack(header)[2]
                following = src.peek(16 + caplen + 16)[16 + caplen :]
                if not following or (len(following) == 16 and self._plausible(following)):
                    self._damage.records += 1
                    self._damage.bytes += src.offset - start
                    return True
            src.skip(1)
        self._damage.records += 1
        self._damage.bytes += src.offset - start
        self._damage.stopped = f"no good record in the {src.offset - start} bytes after damage at byte {start}"
        return False


class _PcapngReader:
    """pcapng: blocks (section headers, interface descriptions, packets …), each framed by its length."""

    def __init__(self, src: _Bytes, damage: CaptureDamage) -> None:
        self._src = src
        self._damage = damage
        self._order = "<"
        #: Per interface: (link type, ns per timestamp unit, or a divisor as a negative power).
        self._interfaces: list[tuple[int, int, int]] = []
        self._first: int | None = None
        head = src.peek(12)
        if len(head) < 12 or head[8:12] not in (b"\x1a\x2b\x3c\x4d", b"\x4d\x3c\x2b\x1a"):
            raise CaptureError("not a valid capture: bad pcapng section header")
        # The first interface's link type, for callers that want one: read ahead without consuming.
        self._peeked = list(self._blocks(stop_at_packet=True))

    def first_linktype(self) -> int:
        return self._interfaces[0][0] if self._interfaces else dpkt.pcap.DLT_EN10MB

    def packets(self) -> Iterator[tuple[int, int, bytes]]:
        yield from self._peeked
        self._peeked = []
        yield from self._blocks(stop_at_packet=False)

    def _blocks(self, stop_at_packet: bool) -> Iterator[tuple[int, int, bytes]]:
        src = self._src
        while True:
            head = src.peek(8)
            if not head:
                return
            if len(head) < 8:
                self._damage.cut_at_end = True
                src.skip(len(head))
                return
            if head[:4] == _PCAPNG_MAGIC:  # a section header sets the byte order for what follows
                order_bytes = src.peek(12)[8:12]
                if order_bytes == b"\x1a\x2b\x3c\x4d":
                    self._order = ">"
                elif order_bytes == b"\x4d\x3c\x2b\x1a":
                    self._order = "<"
            kind, length = struct.unpack(self._order + "II", head)
            if not self._block_ok(kind, length):
                if not self._resync():
                    return
                continue
            block = src.peek(length)
            if len(block) < length:
                self._damage.cut_at_end = True
                packet = self._packet(kind, block[8:], cut=True)
                src.skip(len(block))
                if packet is not None:
                    yield packet
                return
            src.skip(length)
            if kind == _PCAPNG_MAGIC_INT:
                self._interfaces = []
                continue
            if kind == 1:
                self._interface(block[8:-4])
                continue
            packet = self._packet(kind, block[8:-4])
            if packet is not None:
                yield packet
                if stop_at_packet:
                    return

    def _block_ok(self, kind: int, length: int) -> bool:
        if length < 12 or length % 4 or length > MAX_RECORD_BYTES or kind not in _PCAPNG_BLOCKS:
            return False
        tail = self._src.peek(length)[length - 4 : length]
        return len(tail) < 4 or struct.unpack(self._order + "I", tail)[0] == length  # cut at the end: see caller

    def _interface(self, body: bytes) -> None:
        if len(body) < 8:
            return
        linktype = struct.unpack(self._order + "H", body[:2])[0]
        unit_ns, divisor_power = 1000, 0  # microseconds by default
        pos = 8
        while pos + 4 <= len(body):
            code, size = struct.unpack(self._order + "HH", body[pos : pos + 4])
            if code == 0:
                break
            if code == 9 and size >= 1:  # if_tsresol
                value = body[pos + 4]
                if value & 0x80:
                    unit_ns, divisor_power = 0, value & 0x7F  # 2^-n seconds
                else:
                    unit_ns = 10 ** (9 - value) if value <= 9 else 0
                    divisor_power = 0 if value <= 9 else -value
            pos += 4 + (size + 3) // 4 * 4
        self._interfaces.append((linktype, unit_ns, divisor_power))

    def _packet(self, kind: int, body: bytes, cut: bool = False) -> tuple[int, int, bytes] | None:
        if kind == 6 and len(body) >= 20:  # enhanced packet block
            interface, high, low, caplen, _ = struct.unpack(self._order + "IIIII", body[:20])
            frame = body[20 : 20 + caplen]
            return self._stamp(interface, high << 32 | low), self._linktype(interface), frame
        if kind == 3 and len(body) >= 4:  # simple packet block: no timestamp
            origlen = struct.unpack(self._order + "I", body[:4])[0]
            return 0, self._linktype(0), body[4 : 4 + origlen]
        if kind == 2 and len(body) >= 20:  # obsolete packet block
            interface, _, high, low, caplen, _ = struct.unpack(self._order + "HHIIII", body[:20])
            return self._stamp(interface, high << 32 | low), self._linktype(interface), body[20 : 20 + caplen]
        return None

    def _linktype(self, interface: int) -> int:
        if interface < len(self._interfaces):
            return self._interfaces[interface][0]
        return self.first_linktype()

    def _stamp(self, interface: int, units: int) -> int:
        unit_ns, power = (self._interfaces[interface][1:] if interface < len(self._interfaces) else (1000, 0))
        if unit_ns:
            return units * unit_ns
        if power > 0:  # 2^-power seconds
            return (units * 1_000_000_000) >> power
        return units * 1_000_000_000 // 10 ** (-power)

    def _resync(self) -> bool:
        src = self._src
        start = src.offset
        src.skip(1)
        while src.offset - start < MAX_RESYNC_BYTES:
            head = src.peek(8)
            if len(head) < 8:
                break
            kind, length = struct.unpack(self._order + "II", head)
            if kind in _PCAPNG_BLOCKS and self._block_ok(kind, length) and len(src.peek(length)) == length:
                self._damage.records += 1
                self._damage.bytes += src.offset - start
                return True
            src.skip(1)
        self._damage.records += 1
        self._damage.bytes += src.offset - start
        self._damage.stopped = f"no good block in the {src.offset - start} bytes after damage at byte {start}"
        return False


_PCAPNG_MAGIC_INT = 0x0A0D0D0A


def open_capture(path: str) -> Capture:
    """Open a pcap or pcapng file, gzipped or not; :class:`CaptureError` when it is not one."""
    return Capture(path)


def _open_raw(path: str) -> IO[bytes]:
    try:
        f: IO[bytes] = open(path, "rb")  # noqa: SIM115 (returned open)
    except OSError as exc:
        raise CaptureError(exc.strerror or str(exc)) from None
    try:
        gzipped = f.read(2) == _GZIP_MAGIC
        f.seek(0)
    except OSError as exc:  # a directory opens on some systems but does not read
        f.close()
        raise CaptureError(exc.strerror or str(exc)) from None
    # Sniffed rather than trusting ".gz": renamed files are common.
    return gzip.GzipFile(fileobj=f, mode="rb") if gzipped else f  # type: ignore[return-value]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# -- packet headers ---------------------------------------------------------------------------


@attrs.frozen
class Segment:
    """The TCP header fields and payload of one packet."""

    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    ack: int
    flags: int
    #: The captured payload, a prefix of ``size`` bytes when the snap length cut it.
    data: bytes
    #: Payload bytes on the wire, from the IP length fields.
    size: int


class _Skip(Exception):
    """Not a TCP segment; ``kind`` names the stats counter."""

    def __init__(self, kind: str):
        self.kind = kind


def _parse_frame(linktype: int, frame: bytes) -> Segment:
    """The TCP segment in a link-layer frame; raises :class:`_Skip` otherwise."""
    if linktype == dpkt.pcap.DLT_EN10MB:
        if len(frame) < 14:
            raise _Skip("malformed")
        ethertype, pos = struct.unpack_from("!H", frame, 12)[0], 14
        while ethertype in _VLAN_TYPES:  # 802.1Q / QinQ tags
            if len(frame) < pos + 4:
                raise _Skip("malformed")
            ethertype, pos = struct.unpack_from("!H", frame, pos + 2)[0], pos + 4
        if ethertype not in (_ETH_IPV4, _ETH_IPV6):
            raise _Skip("non_tcp")
        return _parse_ip(frame[pos:])
    if linktype == dpkt.pcap.DLT_LINUX_SLL:
        return _parse_ip(_by_ethertype(frame, 14, 16))
    if linktype == 276:  # LINUX_SLL2: protocol first
        return _parse_ip(_by_ethertype(frame, 0, 20))
    if linktype in (dpkt.pcap.DLT_NULL, dpkt.pcap.DLT_LOOP):
        # The 4-byte family is in the capturing host's byte order (NULL) and
        # AF_INET6 differs between systems: the IP version says more.
        return _parse_ip(frame[4:])
    if linktype in (dpkt.pcap.DLT_RAW, 12, 14, 228, 229):  # raw IP (12/14 on some BSDs), IPv4, IPv6
        return _parse_ip(frame)
    raise _Skip("non_tcp")


def _by_ethertype(frame: bytes, type_at: int, header: int) -> bytes:
    if len(frame) < header:
        raise _Skip("malformed")
    if struct.unpack_from("!H", frame, type_at)[0] not in (_ETH_IPV4, _ETH_IPV6):
        raise _Skip("non_tcp")
    return frame[header:]


def _parse_ip(packet: bytes) -> Segment:
    if not packet:
        raise _Skip("malformed")
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            raise _Skip("malformed")
        ihl = (packet[0] & 0x0F) * 4
        total, frag, proto = struct.unpack_from("!H2xH1xB", packet, 2)
        if ihl < 20 or len(packet) < ihl:
            raise _Skip("malformed")
        if proto != 6:
            raise _Skip("non_tcp")
        if frag & 0x3FFF:  # more-fragments flag or an offset
            raise _Skip("fragments")
        # Length 0 is what TSO leaves in captures taken on the sender: trust the capture then.
        if total == 0:
            total = len(packet)
        if total < ihl:
            raise _Skip("malformed")
        src, dst = socket.inet_ntop(socket.AF_INET, packet[12:16]), socket.inet_ntop(socket.AF_INET, packet[16:20])
        return _parse_tcp(src, dst, packet[ihl:total], total - ihl)
    if version == 6:
        if len(packet) < 40:
            raise _Skip("malformed")
        length, proto = struct.unpack_from("!HB", packet, 4)
        if length == 0:  # jumbogram or TSO
            length = len(packet) - 40
        src, dst = socket.inet_ntop(socket.AF_INET6, packet[8:24]), socket.inet_ntop(socket.AF_INET6, packet[24:40])
        pos, end = 40, 40 + length
        while proto != 6:
            if proto == _IPV6_FRAGMENT:
                raise _Skip("fragments")
            if proto not in _IPV6_EXTENSIONS and proto != _IPV6_AH:
                raise _Skip("non_tcp")
            if len(packet) < pos + 2:
                raise _Skip("malformed")
            proto, hlen = packet[pos], packet[pos + 1]
            pos += (hlen + 2) * 4 if proto == _IPV6_AH else (hlen + 1) * 8
            if pos > end:
                raise _Skip("malformed")
        return _parse_tcp(src, dst, packet[pos:end], end - pos)
    raise _Skip("malformed")


def _parse_tcp(src: str, dst: str, tcp: bytes, wire: int) -> Segment:
    if len(tcp) < 20:
        raise _Skip("malformed")
    sport, dport, seq, ack, offset, flags = struct.unpack_from("!HHIIBB", tcp)
    header = (offset >> 4) * 4
    if header < 20 or header > wire or len(tcp) < header:
        raise _Skip("malformed")
    return Segment((src, sport), (dst, dport), seq, ack, flags, bytes(tcp[header:]), wire - header)


# -- reassembly and decoding --------------------------------------------------------------------


@attrs.define
class _Flow:
    """One direction of a connection: bytes in sequence order."""

    #: Sequence number of offset 0; None until a SYN or the first data segment sets it.
    base: int | None = None
    #: Offset of the next byte to deliver.
    next: int = 0
    #: Out-of-order segments by offset: (data, size, ts).
    held: dict[int, tuple[bytes, int, int]] = attrs.field(factory=dict)
    held_bytes: int = 0
    #: Offset of the FIN, once seen.
    fin: int | None = None

    def offset(self, seq: int) -> int:
        """``seq`` as an offset, taking the nearest 32-bit wrap to the delivery point."""
        assert self.base is not None
        delta = (seq - self.base - self.next) & _MASK
        return self.next + (delta - (1 << 32) if delta >= 1 << 31 else delta)

    @property
    def end(self) -> int:
        """Offset just past the bytes seen, held ones included."""
        return max([self.next] + [off + size for off, (_, size, _) in self.held.items()])

    @property
    def done(self) -> bool:
        return self.fin is not None and self.next >= self.fin and not self.held


@attrs.define
class _Conn:
    client: tuple[str, int] | None = None
    #: How the client was found: "syn", "port" or "first" (first data sender; content may overrule).
    client_by: str | None = None
    flows: dict[tuple[str, int], _Flow] = attrs.field(factory=dict)
    session: StreamSession | None = None
    closed: bool = False
    #: unknown/undecodable already counted.
    counted: bool = False
    #: Timestamp of the last chunk fed: when the connection ends without a packet saying so.
    last_ts: int = 0


class OfflineDecoder:
    """Connection table for captured packets: segments in, exchange events out."""

    def __init__(self, decoders: Sequence[type[Decoder]], stats: DecodeStats | None = None):
        self.decoders = list(decoders)
        self.stats = stats if stats is not None else DecodeStats()
        self._server_ports = {p for cls in self.decoders for p in getattr(cls, "default_ports", ())}
        self._conns: collections.OrderedDict[tuple, _Conn] = collections.OrderedDict()
        self._out: list[ExchangeEvent] = []

    def packet(self, ts_ns: int, linktype: int, frame: bytes) -> list[ExchangeEvent]:
        """One captured frame; returns the exchanges it completed."""
        self.stats.packets += 1
        try:
            segment = _parse_frame(linktype, frame)
        except _Skip as skip:
            setattr(self.stats, skip.kind, getattr(self.stats, skip.kind) + 1)
            return []
        self.stats.tcp_packets += 1
        self._segment(ts_ns, segment)
        out, self._out = self._out, []
        return out

    def finish(self) -> list[ExchangeEvent]:
        """End of capture: close every connection still open."""
        for conn in self._conns.values():
            if not conn.closed:
                self._close(conn, None)
        self._conns.clear()
        out, self._out = self._out, []
        return out

    # -- connections ----------------------------------------------------------------------------
    def _segment(self, ts: int, seg: Segment) -> None:
        key = (seg.src, seg.dst) if seg.src <= seg.dst else (seg.dst, seg.src)
        syn_only = seg.flags & (_SYN | _ACK) == _SYN
        conn = self._conns.get(key)
        if conn is not None and syn_only and not conn.closed:
            flow = conn.flows.get(seg.src)
            if flow is not None and flow.base is not None and flow.base != (seg.seq + 1) & _MASK:
                self._close(conn, ts)  # a new connection reuses the ports
        if conn is None or (conn.closed and syn_only):
            conn = self._conns[key] = _Conn()
            self._conns.move_to_end(key)
            if len(self._conns) > MAX_CONNECTIONS:
                _, oldest = self._conns.popitem(last=False)
                if not oldest.closed:
                    self._close(oldest, None)
        else:
            self._conns.move_to_end(key)
        if conn.closed:  # late ACKs and retransmissions of a finished connection
            return
        flow = conn.flows.setdefault(seg.src, _Flow())
        peer = conn.flows.setdefault(seg.dst, _Flow())
        if seg.flags & _SYN:
            if conn.client_by != "syn" and conn.session is None:
                conn.client, conn.client_by = (seg.dst, "syn") if seg.flags & _ACK else (seg.src, "syn")
            if flow.base is None:
                flow.base = (seg.seq + 1) & _MASK
        # The peer acknowledging bytes the capture never had: they are a hole, not late.
        if seg.flags & _ACK and peer.base is not None:
            acked = peer.offset(seg.ack)
            if acked > peer.next:
                if peer.fin is not None:
                    acked = min(acked, peer.fin)  # the FIN takes a sequence number, not a byte
                elif acked == peer.end + 1:
                    acked -= 1  # one past all we saw: most likely a FIN the capture missed
                if acked > peer.next:
                    self._flush(conn, seg.dst, peer, acked, ts)
        seq = (seg.seq + 1) & _MASK if seg.flags & _SYN else seg.seq  # data after a SYN (TCP Fast Open)
        if seg.size:
            if conn.client is None:
                self._guess_client(conn, seg)
            if flow.base is None:
                flow.base = seq
            self._data(conn, seg.src, flow, flow.offset(seq), seg.data, seg.size, ts)
        if seg.flags & _FIN and flow.base is not None:
            flow.fin = flow.offset(seq) + seg.size
        # Closed when both sides have sent FIN (not at the first: a half-closed client still
        # gets its response) or at a reset.
        if seg.flags & _RST or all(f.done for f in conn.flows.values()):
            self._close(conn, ts)

    def _guess_client(self, conn: _Conn, seg: Segment) -> None:
        src_server, dst_server = self._server_like(seg.src[1]), self._server_like(seg.dst[1])
        if src_server and not dst_server:
            conn.client, conn.client_by = seg.dst, "port"
        elif dst_server and not src_server:
            conn.client, conn.client_by = seg.src, "port"
        else:
            conn.client, conn.client_by = seg.src, "first"

    def _server_like(self, port: int) -> bool:
        return port < 1024 or port in self._server_ports

    def _close(self, conn: _Conn, ts: int | None) -> None:
        """Deliver what waits behind holes, then close the session (``ts`` None: at its last chunk)."""
        for sender, flow in conn.flows.items():
            if flow.held:
                self._flush(conn, sender, flow, flow.end, None)
        conn.closed = True
        session = conn.session
        if session is None:
            return
        self._emit(conn, session.close(conn.last_ts if ts is None else ts))
        self._count_gave_up(conn, closing=True)
        self._take_counts(session)

    # -- bytes ------------------------------------------------------------------------------------
    def _data(self, conn: _Conn, sender: tuple[str, int], flow: _Flow, off: int, data: bytes, size: int,
              ts: int) -> None:  # fmt: skip
        if off + size <= flow.next:
            self.stats.retransmissions += 1
            return
        if off > flow.next:  # out of order: wait for the hole to fill
            if off not in flow.held or flow.held[off][1] < size:
                flow.held_bytes += size - (flow.held[off][1] if off in flow.held else 0)
                flow.held[off] = (data, size, ts)
            if flow.held_bytes > MAX_HELD_BYTES or len(flow.held) > MAX_HELD_SEGMENTS:
                self._flush(conn, sender, flow, flow.end, None)
            return
        self._deliver(conn, sender, flow, off, data, size, ts)
        self._drain(conn, sender, flow, ts)

    def _deliver(self, conn: _Conn, sender: tuple[str, int], flow: _Flow, off: int, data: bytes, size: int,
                 ts: int) -> None:  # fmt: skip
        """Feed the part of a segment starting at ``flow.next`` (``off <= flow.next``)."""
        cut = flow.next - off
        if cut >= size:
            return
        self._feed(conn, sender, data[cut:], size - cut, ts)
        flow.next = off + size

    def _drain(self, conn: _Conn, sender: tuple[str, int], flow: _Flow, fill_ts: int | None) -> None:
        """Deliver held segments that became contiguous.  Their bytes became readable when the
        hole filled (``fill_ts``), or, for a declared gap, when they were captured."""
        while flow.held:
            off = min(flow.held)
            if off > flow.next:
                return
            data, size, ts = flow.held.pop(off)
            flow.held_bytes -= size
            self._deliver(conn, sender, flow, off, data, size, ts if fill_ts is None else max(ts, fill_ts))

    def _flush(self, conn: _Conn, sender: tuple[str, int], flow: _Flow, upto: int, ts: int | None) -> None:
        """Declare the holes below ``upto`` lost from the capture and deliver past them."""
        while flow.next < upto:
            below = [off for off in flow.held if off < upto]
            hole_end = min(below) if below else upto
            if hole_end > flow.next:
                hole_ts = flow.held[hole_end][2] if below else (conn.last_ts if ts is None else ts)
                self.stats.gaps += 1
                self.stats.gap_bytes += hole_end - flow.next
                self._feed(conn, sender, b"", hole_end - flow.next, hole_ts)
                flow.next = hole_end
            self._drain(conn, sender, flow, None)
            if not below:
                break

    def _feed(self, conn: _Conn, sender: tuple[str, int], data: bytes, size: int, ts: int) -> None:
        conn.last_ts = ts
        session = conn.session
        if session is None:
            assert conn.client is not None
            server = self._other(conn, conn.client)
            role = None if conn.client_by == "first" else "client"
            session = conn.session = StreamSession(self.decoders, role, ports=(server[1], conn.client[1]))
            self.stats.connections += 1
        if not session.active:
            return
        protocol = session.protocol
        self._emit(conn, session.feed(sender == conn.client, data, size, ts))
        if session.protocol is not None and protocol is None:
            self.stats.count(session.protocol, "connections")
        if session.counts:
            self._take_counts(session)
        if not session.active:
            self._count_gave_up(conn)

    def _count_gave_up(self, conn: _Conn, closing: bool = False) -> None:
        """Count a connection no decoder follows; at its close, one still in detection is unknown."""
        session = conn.session
        if session is None or conn.counted or session.state is State.DECODING:
            return
        if session.state is State.DETECTING and not closing:
            return
        conn.counted = True
        client = self._endpoints(conn)[0]
        if session.state is State.UNDECODABLE:
            self.stats.undecodable += 1
            self.stats.count(session.protocol or "?", "undecodable")
            reason = f"{session.protocol}: {session.reason}"
            self.stats.gave_up[reason] = self.stats.gave_up.get(reason, 0) + 1
            log.info("connection from %s:%d: %s stream undecodable: %s", *client, session.protocol, session.reason)
        else:
            self.stats.unknown += 1
            log.info("connection from %s:%d: no decoder recognised the bytes", *client)

    def _take_counts(self, session: StreamSession) -> None:
        for name, n in session.take_counts().items():
            self.stats.count(session.protocol or "?", name, n)

    def _other(self, conn: _Conn, endpoint: tuple[str, int]) -> tuple[str, int]:
        return next((ep for ep in conn.flows if ep != endpoint), endpoint)

    def _endpoints(self, conn: _Conn) -> tuple[tuple[str, int], tuple[str, int]]:
        """(client, server) as reported: when content showed our guess backwards, the other way round."""
        assert conn.client is not None
        client, server = conn.client, self._other(conn, conn.client)
        if conn.session is not None and conn.session.role == "server":
            client, server = server, client
        return client, server

    def _emit(self, conn: _Conn, exchanges: list[Exchange]) -> None:
        if not exchanges:
            return
        client, server = self._endpoints(conn)
        for x in exchanges:
            self._out.append(_exchange_event(x, client, server))
        self.stats.exchanges += len(exchanges)
        self.stats.count(exchanges[0].protocol, "exchanges", len(exchanges))


def _exchange_event(x: Exchange, client: tuple[str, int], server: tuple[str, int]) -> ExchangeEvent:
    # Capture timestamps are wall clock already: no offset.
    return ExchangeEvent.from_exchange(x, clock_offset=0, pid=0, comm="", role="client", laddr=client[0],
                                       lport=client[1], raddr=server[0], rport=server[1])


def decode_capture(capture: Capture, decoders: Sequence[type[Decoder]],
                   stats: DecodeStats | None = None) -> Iterator[ExchangeEvent]:  # fmt: skip
    """Exchange events of an open capture, as connections complete them."""
    decoder = OfflineDecoder(decoders, stats)
    for ts, linktype, frame in capture.packets():
        yield from decoder.packet(ts, linktype, frame)
    yield from decoder.finish()
    damage = capture.damage
    decoder.stats.read_error = damage.stopped
    decoder.stats.damaged_records += damage.records
    decoder.stats.damaged_bytes += damage.bytes
    decoder.stats.cut_captures += damage.cut_at_end


def decode_file(path: str, decoders: Sequence[type[Decoder]] | None = None,
                stats: DecodeStats | None = None) -> Iterator[ExchangeEvent]:  # fmt: skip
    """Exchange events of the capture at ``path`` (all registered decoders by default).

    Raises :class:`CaptureError` (before yielding anything) when the file is not a capture.
    """
    if decoders is None:
        from deetune.plugins import default_plugins

        decoders = default_plugins().decoders.classes()
    with open_capture(path) as capture:
        yield from decode_capture(capture, decoders, stats)
