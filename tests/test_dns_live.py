"""DNS over UDP and TCP through the kernel: dnsmasq on an address of 127.0.0.0/8 of its own,
queried by dnspython (an unconnected UDP socket: sendto/recvfrom), by a connected UDP socket and
over TCP.  dnsmasq answers on its unconnected socket with sendmsg naming the client: the server
side learns each query's client from the answer; the client side names dnsmasq from its own
sendto."""

from __future__ import annotations

import os
import socket

import pytest

from deetune.testing import agent, assert_exchanges, free_port
from tests.decoders.conversations import dns_query
from tests.protocol_servers import DNS_RECORDS, dnsmasq_server  # noqa: F401  (fixture)
from tests.servers import need_module

pytestmark = [pytest.mark.bpf, pytest.mark.servers]


def test_dns_udp_and_tcp(dnsmasq_server):
    need_module("dns.query", "dnspython")
    import dns.message
    import dns.query
    import dns.rcode

    server = dnsmasq_server
    client_port = free_port(kind=socket.SOCK_DGRAM)  # the unconnected socket's: the kernel filter selects it
    connected_port = free_port(kind=socket.SOCK_DGRAM)
    expected_udp = [
        {"method": "A", "target": "web.deetune.test", "status": "NOERROR", "error": False},
        {"method": "A", "target": "www.deetune.test", "status": "NOERROR", "error": False},
        {"method": "A", "target": "nx.deetune.test", "status": "NXDOMAIN", "error": False},
        {"method": "A", "target": "example.com", "status": "REFUSED", "error": True},
    ]
    with agent([server.port, client_port, connected_port], protocols=["dns"]) as run:
        for name in ("web.deetune.test", "www.deetune.test", "nx.deetune.test", "example.com"):
            query = dns.message.make_query(name, "A")
            dns.query.udp(query, server.address, port=server.port, source="127.0.0.1", source_port=client_port,
                          timeout=5)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", connected_port))
            s.connect((server.address, server.port))
            s.send(dns_query(0x4242, "db.deetune.test"))
            answer = s.recv(512)
            assert answer[:2] == b"\x42\x42" and answer[3] & 0xF == 0
        response = dns.query.tcp(dns.message.make_query("db.deetune.test", "A"), server.address, port=server.port,
                                 timeout=5)
        assert response.rcode() == dns.rcode.NOERROR
        run.wait(6, role="server", protocol="dns")
        run.wait(6, role="client", protocol="dns")
    clients = run.exchanges(role="client", protocol="dns")
    servers = run.exchanges(role="server", protocol="dns")
    for side in (clients, servers):
        udp = [x for x in side if x.attributes["transport"] == "udp"]
        tcp = [x for x in side if x.attributes["transport"] == "tcp"]
        assert_exchanges(udp[:4], expected_udp)
        assert_exchanges(udp[4:] + tcp, [{"method": "A", "target": "db.deetune.test", "status": "NOERROR"}] * 2)
    unconnected = [x for x in clients if x.lport == client_port]
    assert {(x.pid, x.raddr, x.rport) for x in unconnected} == {(os.getpid(), server.address, server.port)}
    assert unconnected[0].attributes["addresses"] == [DNS_RECORDS["web.deetune.test"]]
    assert (unconnected[1].attributes["cnames"], unconnected[1].attributes["addresses"]) == (
        ["web.deetune.test"], [DNS_RECORDS["web.deetune.test"]])
    assert all(x.latency_ns is not None and x.latency_ns >= 0 for x in clients + servers)
    # The server side: dnsmasq, each query's client named from the answer it sent back.
    assert {x.comm for x in servers} == {"dnsmasq"}
    assert {(x.laddr, x.lport) for x in servers} == {(server.address, server.port)}
    assert sorted((x.raddr, x.rport) for x in servers if x.attributes["transport"] == "udp") == sorted(
        [("127.0.0.1", client_port)] * 4 + [("127.0.0.1", connected_port)])


def test_a_local_dns_server_is_a_listener(dnsmasq_server):
    """The topology names a local UDP server by its process and counts its exchanges once (where
    the server is), as it does a TCP listener."""
    from deetune.services import ServiceResolver

    resolver = ServiceResolver()
    assert resolver.is_local_listener(dnsmasq_server.address, dnsmasq_server.port)
    assert resolver.endpoint(dnsmasq_server.address, dnsmasq_server.port) == "dnsmasq"
