"""The L7 handler on datagram (UDP) sockets: one session per socket whatever its peers, each
exchange naming its own peer, the peer of a datagram received on an unconnected socket learned
from the answer, sockets carrying something else muted by cookie, flush at stop."""

from __future__ import annotations

from deetune.decoders.dns import DnsDecoder
from deetune.decoders.http import HttpDecoder
from deetune.events import DataEvent, ExchangeEvent
from deetune.decoders.session import DETECTION_CHUNKS
from deetune.l7 import L7Handler, ListeningPorts
from tests.decoders.conversations import dns_query, dns_response

SERVER = ("127.0.0.53", 53)


def datagram(ts: int, direction: str, payload: bytes, peer: tuple[str, int] | None, *, cookie: int = 7,
             lport: int = 53, laddr: str = "127.0.0.53") -> DataEvent:
    raddr, rport = peer if peer is not None else ("0.0.0.0", 0)
    return DataEvent(ts=ts, ts_mono_ns=ts, pid=99, tid=99, comm="dnsmasq", fd=4, sock_id=0xFFFF0000 + cookie,
                     direction=direction, syscall="recvmsg" if direction == "ingress" else "sendmsg",
                     size=len(payload), data=payload, start_mono_ns=ts, laddr=laddr, lport=lport, raddr=raddr,
                     rport=rport, family=4, conn_id=cookie, transport="udp")


def run(h: L7Handler, events) -> list[ExchangeEvent]:
    return [e for event in events for e in h(event) if isinstance(e, ExchangeEvent)]


def test_a_server_socket_names_each_client_from_its_answer():
    muted = []
    h = L7Handler([HttpDecoder, DnsDecoder], mute=muted.append, listening=ListeningPorts(reader=set))
    alice, bob = ("127.0.0.1", 40001), ("127.0.0.2", 40002)
    got = run(h, [
        datagram(100, "ingress", dns_query(1, "a.test"), None),  # recvmsg: the sender is not known here
        datagram(110, "ingress", dns_query(2, "b.test"), None),
        datagram(120, "egress", dns_response(2, "b.test", addresses=["10.0.0.2"]), bob),
        datagram(130, "egress", dns_response(1, "a.test", rcode=3), alice),
    ])
    assert [(e.role, e.target, e.status, e.raddr, e.rport, e.lport, e.latency_ns) for e in got] == [
        ("server", "b.test", "NOERROR", *bob, 53, 10), ("server", "a.test", "NXDOMAIN", *alice, 53, 30)]
    assert got[0].attributes["addresses"] == ["10.0.0.2"] and got[0].conn_id == 7
    assert muted == [] and h.stats.exchanges == 2


def test_a_client_socket_and_what_is_not_dns():
    muted = []
    h = L7Handler([DnsDecoder], mute=muted.append, listening=ListeningPorts(reader=set))
    got = run(h, [
        datagram(100, "egress", dns_query(5, "c.test"), SERVER, cookie=8, lport=45000, laddr="127.0.0.1"),
        datagram(150, "ingress", dns_response(5, "c.test", addresses=["10.9.9.9"]), None, cookie=8, lport=45000,
                 laddr="127.0.0.1"),
    ])
    assert [(e.role, e.raddr, e.rport, e.latency_ns) for e in got] == [("client", *SERVER, 50)]
    # A socket of something else (statsd, QUIC …): given up after a few datagrams, muted by its cookie.
    for i in range(DETECTION_CHUNKS):
        run(h, [datagram(200 + i, "egress", b"metric.name:1|c", ("127.0.0.1", 8125), cookie=9, lport=41000)])
    assert muted == [9] and h.stats.unknown == 1
    # A query never answered: reported at stop, without a response.
    run(h, [datagram(300, "egress", dns_query(6, "d.test"), SERVER, cookie=8, lport=45000, laddr="127.0.0.1")])
    [pending] = [e for e in h.flush() if isinstance(e, ExchangeEvent)]
    assert (pending.target, pending.status, pending.raddr, pending.rport) == ("d.test", None, *SERVER)


def test_without_a_datagram_decoder_udp_sockets_are_muted_at_once():
    muted = []
    h = L7Handler([HttpDecoder], mute=muted.append, listening=ListeningPorts(reader=set))
    assert run(h, [datagram(100, "ingress", dns_query(1, "a.test"), None, cookie=11)]) == []
    assert muted == [11]
