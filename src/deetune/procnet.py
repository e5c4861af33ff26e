"""What the kernel already had before the agent started: TCP sockets and
their owning processes (from /proc/PID/fd).

Sockets come from NETLINK_SOCK_DIAG when reading the live system: the kernel
filters by state, so asking for listeners on a host with 60,000 TIME-WAIT
sockets costs microseconds instead of the seconds /proc/net/tcp takes to
generate.  /proc/net/tcp{,6} is read for a ``proc`` other than /proc (tests,
containers' views) or when netlink is refused."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Container

import attrs

from deetune.events import format_address

log = logging.getLogger("deetune.procnet")

TCP_ESTABLISHED = 0x01
TCP_SYN_SENT = 0x02
TCP_FIN_WAIT1 = 0x04
TCP_FIN_WAIT2 = 0x05
TCP_CLOSE_WAIT = 0x08
TCP_LAST_ACK = 0x09
TCP_LISTEN = 0x0A
TCP_CLOSING = 0x0B
#: States of a connection still open in at least one direction.
OPEN_STATES = frozenset({TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING})
ALL_STATES = frozenset(range(1, 13))

# linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLMSG_HEADER = struct.Struct("=IHHII")
_DIAG_REQUEST = struct.Struct("=BBBBI48s")  # family, protocol, ext, pad, states, inet_diag_sockid
_DIAG_SOCKID = struct.Struct(">HH16s16sI8s")
_DIAG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode


@attrs.frozen
class SocketEntry:
    family: int  # 4 or 6
    laddr: str
    lport: int
    raddr: str
    rport: int
    state: int
    inode: int


@attrs.frozen
class Owner:
    pid: int
    comm: str


def _parse_addr(text: str, family: int) -> tuple[str, int]:
    addr_hex, port_hex = text.split(":")
    raw = bytes.fromhex(addr_hex)
    if family == 4:
        addr = ipaddress.IPv4Address(struct.pack("<I", struct.unpack(">I", raw)[0]))
        return str(addr), int(port_hex, 16)
    # Four 32-bit words, each in host (little-endian) order.
    words = struct.unpack(">4I", raw)
    packed = b"".join(struct.pack("<I", w) for w in words)
    v6 = ipaddress.IPv6Address(packed)
    return (str(v6.ipv4_mapped) if v6.ipv4_mapped else str(v6)), int(port_hex, 16)


def diag_tcp_sockets(states: frozenset[int] | set[int] = ALL_STATES,
                     inodes: Container[int] | None = None) -> list[SocketEntry]:
    """TCP sockets in ``states`` from NETLINK_SOCK_DIAG (IPv4 then IPv6); only those whose
    inode is in ``inodes`` when given."""
    mask = 0
    for state in states:
        mask |= 1 << state
    entries: list[SocketEntry] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        for seq, (af, family) in enumerate(((socket.AF_INET, 4), (socket.AF_INET6, 6)), start=1):
            request = _DIAG_REQUEST.pack(af, socket.IPPROTO_TCP, 0, 0, mask, bytes(48))
            header = _NLMSG_HEADER.pack(_NLMSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY,
                                        _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0)
            nl.sendall(header + request)
            done = False
            while not done:
                data = nl.recv(1 << 16)
                offset = 0
                while offset + _NLMSG_HEADER.size <= len(data):
                    length, kind, _, _, _ = _NLMSG_HEADER.unpack_from(data, offset)
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        errno_value = -struct.unpack_from("=i", data, offset + _NLMSG_HEADER.size)[0]
                        raise OSError(errno_value, f"sock_diag: {os.strerror(errno_value)}")
                    body = offset + _NLMSG_HEADER.size
                    offset += (length + 3) & ~3
                    inode = _DIAG_TAIL.unpack_from(data, body + 4 + _DIAG_SOCKID.size)[4]
                    if inodes is not None and inode not in inodes:
                        continue
                    state = data[body + 1]
                    sport, dport, src, dst, _, _ = _DIAG_SOCKID.unpack_from(data, body + 4)
                    # The records' formatter, cached: a scan meets the same few addresses thousands
                    # of times, and the entries kept from it then share one string each.
                    entries.append(SocketEntry(family, format_address(family, src), sport,
                                               format_address(family, dst), dport, state, inode))
                if not data:
                    break
    return entries


def read_tcp_sockets(proc: str = "/proc", states: frozenset[int] | set[int] | None = None,
                     inodes: Container[int] | None = None) -> list[SocketEntry]:
    """TCP sockets (optionally only those in ``states``, and only those whose inode is in
    ``inodes``: skipped before their addresses are parsed, which matters at high connection
    churn, when most open sockets are orphans on their way out)."""
    if proc == "/proc":
        try:
            return diag_tcp_sockets(ALL_STATES if states is None else states, inodes)
        except OSError as exc:  # netlink refused (seccomp, old kernel): the slow way
            log.debug("sock_diag unavailable (%s); reading /proc/net/tcp", exc)
    return _read_proc_tcp(proc, states, inodes)


def _read_proc_tcp(proc: str, states: frozenset[int] | set[int] | None,
                   inodes: Container[int] | None = None) -> list[SocketEntry]:
    entries = []
    for name, family in (("tcp", 4), ("tcp6", 6)):
        try:
            with open(f"{proc}/net/{name}") as table:
                next(table)
                for line in table:
                    fields = line.split()
                    state = int(fields[3], 16)
                    # The state is checked before the addresses are parsed: that
                    # matters on hosts with many connections.
                    if states is not None and state not in states:
                        continue
                    inode = int(fields[9])
                    if inodes is not None and inode not in inodes:
                        continue
                    laddr, lport = _parse_addr(fields[1], family)
                    raddr, rport = _parse_addr(fields[2], family)
                    entries.append(SocketEntry(family, laddr, lport, raddr, rport, state, inode))
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
    return entries


def socket_owners(proc: str = "/proc") -> dict[int, Owner]:
    """Socket inode → first process found holding it."""
    owners: dict[int, Owner] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fds = os.scandir(f"{proc}/{pid}/fd")
            with fds:
                inodes = []
                for fd in fds:
                    try:
                        target = os.readlink(fd.path)
                    except OSError:
                        continue
                    if target.startswith("socket:["):
                        inodes.append(int(target[8:-1]))
            if not inodes:
                continue
            with open(f"{proc}/{pid}/comm") as comm_file:
                comm = comm_file.read().rstrip("\n")
        except OSError:  # the process exited meanwhile, or no permission
            continue
        owner = Owner(pid, comm)
        for inode in inodes:
            owners.setdefault(inode, owner)
    return owners


@attrs.frozen
class PreexistingConnection:
    role: str
    owner: Owner | None
    #: 4 or 6: the socket's family (an IPv4 peer of an IPv6 socket shows as IPv4 text).
    family: int = 4


def snapshot_connections(proc: str = "/proc") -> dict[tuple, PreexistingConnection]:
    """Established connections now, keyed by (laddr, lport, raddr, rport); a
    connection whose local port is listening on this host is the server side."""
    sockets = read_tcp_sockets(proc, OPEN_STATES | {TCP_LISTEN})
    owners = socket_owners(proc)
    listening = {s.lport for s in sockets if s.state == TCP_LISTEN}
    result = {}
    for s in sockets:
        if s.state == TCP_LISTEN or s.rport == 0:
            continue
        role = "server" if s.lport in listening else "client"
        result[(s.laddr, s.lport, s.raddr, s.rport)] = PreexistingConnection(role, owners.get(s.inode), s.family)
    return result


def read_udp_bound_sockets(proc: str = "/proc") -> list[SocketEntry]:
    """UDP sockets bound to a port and not connected: where datagram servers (DNS) listen."""
    entries = []
    for name, family in (("udp", 4), ("udp6", 6)):
        try:
            with open(f"{proc}/net/{name}") as table:
                next(table)
                for line in table:
                    fields = line.split()
                    laddr, lport = _parse_addr(fields[1], family)
                    raddr, rport = _parse_addr(fields[2], family)
                    if lport and not rport:
                        entries.append(SocketEntry(family, laddr, lport, raddr, rport, int(fields[3], 16),
                                                   int(fields[9])))
        except (FileNotFoundError, StopIteration):  # no IPv6 in this kernel
            continue
    return entries


def listening_ports(proc: str = "/proc") -> set[int]:
    return {s.lport for s in read_tcp_sockets(proc, {TCP_LISTEN})}


def read_listening_sockets(proc: str = "/proc") -> list[SocketEntry]:
    """Only the LISTEN sockets."""
    return read_tcp_sockets(proc, {TCP_LISTEN})


def socket_inode_owners(inodes: set[int] | frozenset[int], proc: str = "/proc") -> dict[int, int]:
    """Socket inode → pid of the first process (in /proc order) holding it, for
    the given inodes only; stops scanning once all of them are found."""
    wanted = set(inodes)
    owners: dict[int, int] = {}
    if not wanted:
        return owners
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with os.scandir(f"{proc}/{pid}/fd") as fds:
                for fd in fds:
                    try:
                        target = os.readlink(fd.path)
                    except OSError:
                        continue
                    if target.startswith("socket:["):
                        inode = int(target[8:-1])
                        if inode in wanted:
                            owners[inode] = pid
                            wanted.discard(inode)
        except OSError:  # the process exited meanwhile, or no permission
            continue
        if not wanted:
            break
    return owners


__all__ = [
    "listening_ports", "read_listening_sockets", "read_tcp_sockets", "snapshot_connections",
    "socket_inode_owners", "socket_owners",
]
