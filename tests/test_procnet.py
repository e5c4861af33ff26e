"""Sockets and their owners read from the live system (sock_diag and /proc/net/tcp)."""

from __future__ import annotations

import os
import socket

import pytest

from deetune import procnet

# "/proc" reads through NETLINK_SOCK_DIAG; any other path reads the files (here the same ones).
SOURCES = ["/proc", "/proc/."]


@pytest.fixture
def connection():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    yield client, accepted
    for sock in (client, accepted, server):
        sock.close()


@pytest.mark.parametrize("proc", SOURCES)
def test_only_the_sockets_asked_for_by_inode(proc, connection):
    client, accepted = connection
    inode = os.fstat(client.fileno()).st_ino
    (lport, rport) = client.getsockname()[1], client.getpeername()[1]
    entries = procnet.read_tcp_sockets(proc, procnet.OPEN_STATES, inodes={inode})
    assert entries == [procnet.SocketEntry(4, "127.0.0.1", lport, "127.0.0.1", rport, procnet.TCP_ESTABLISHED, inode)]
    assert procnet.read_tcp_sockets(proc, procnet.OPEN_STATES, inodes=set()) == []
    every = procnet.read_tcp_sockets(proc, procnet.OPEN_STATES)
    both = {e.inode for e in every} & {inode, os.fstat(accepted.fileno()).st_ino}
    assert len(both) == 2


def test_socket_owners_name_this_process(connection):
    client, _ = connection
    owner = procnet.socket_owners()[os.fstat(client.fileno()).st_ino]
    with open("/proc/self/comm") as comm:
        assert owner == procnet.Owner(os.getpid(), comm.read().rstrip("\n"))
