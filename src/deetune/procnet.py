"""What the kernel already had before the agent started: TCP sockets from
/proc/net/tcp{,6} and their owning processes from /proc/PID/fd."""

from __future__ import annotations

import ipaddress
import os
import struct

import attrs

TCP_ESTABLISHED = 0x01
TCP_LISTEN = 0x0A


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


def read_tcp_sockets(proc: str = "/proc") -> list[SocketEntry]:
    entries = []
    for name, family in (("tcp", 4), ("tcp6", 6)):
        try:
            with open(f"{proc}/net/{name}") as table:
                next(table)
                for line in table:
                    fields = line.split()
                    laddr, lport = _parse_addr(fields[1], family)
                    raddr, rport = _parse_addr(fields[2], family)
                    entries.append(SocketEntry(family, laddr, lport, raddr, rport, int(fields[3], 16), int(fields[9])))
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


def snapshot_connections(proc: str = "/proc") -> dict[tuple, PreexistingConnection]:
    """Established connections now, keyed by (laddr, lport, raddr, rport); a
    connection whose local port is listening on this host is the server side."""
    sockets = read_tcp_sockets(proc)
    owners = socket_owners(proc)
    listening = {s.lport for s in sockets if s.state == TCP_LISTEN}
    result = {}
    for s in sockets:
        if s.state == TCP_LISTEN or s.rport == 0:
            continue
        role = "server" if s.lport in listening else "client"
        result[(s.laddr, s.lport, s.raddr, s.rport)] = PreexistingConnection(role, owners.get(s.inode))
    return result


def listening_ports(proc: str = "/proc") -> set[int]:
    return {s.lport for s in read_tcp_sockets(proc) if s.state == TCP_LISTEN}


def read_listening_sockets(proc: str = "/proc") -> list[SocketEntry]:
    """Only the LISTEN sockets of /proc/net/tcp{,6}: the state is checked before
    the addresses are parsed, which matters on hosts with many connections."""
    entries = []
    for name, family in (("tcp", 4), ("tcp6", 6)):
        try:
            with open(f"{proc}/net/{name}") as table:
                next(table)
                for line in table:
                    fields = line.split()
                    if int(fields[3], 16) != TCP_LISTEN:
                        continue
                    laddr, lport = _parse_addr(fields[1], family)
                    entries.append(SocketEntry(family, laddr, lport, "", 0, TCP_LISTEN, int(fields[9])))
        except FileNotFoundError:  # no IPv6 in this kernel
            continue
    return entries


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
