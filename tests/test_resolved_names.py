"""Remote endpoints named after the names clients resolved: DNS answers teach ResolvedNames, and
ServiceResolver.endpoint names an address nothing else names by the name asked (with the port)."""

from __future__ import annotations

from deetune.decoders.dns import DnsDecoder
from deetune.events import ExchangeEvent
from deetune.services import EndpointMapping, ResolvedNames, ServiceResolver
from deetune.testing import decode_chunks
from tests.decoders import conversations as cv


def dns_event(name: str, addresses: list[str], error: bool = False) -> ExchangeEvent:
    return ExchangeEvent(
        ts=1, protocol="dns", pid=1, comm="app", role="client", laddr="127.0.0.1", lport=40000, raddr="127.0.0.53",
        rport=53, method="A", target=name, status="NOERROR", error=error, latency_ns=1, request_bytes=30,
        response_bytes=50, attributes={"addresses": addresses})


def test_a_resolved_address_is_named_by_the_name_asked():
    resolved = ResolvedNames()
    resolver = ServiceResolver(resolved=resolved)
    assert resolver.endpoint("203.0.113.7", 443) == "203.0.113.7:443"
    event = dns_event("api.example.com", ["203.0.113.7", "2001:db8::7"])
    assert resolved.observe(event) == (event,)
    assert resolver.endpoint("203.0.113.7", 443) == "api.example.com:443"  # the cached name was dropped
    assert resolver.endpoint("2001:db8::7", 443) == "api.example.com:443"
    assert resolver.endpoint("::ffff:203.0.113.7", 8443) == "api.example.com:8443"
    assert resolver.endpoint("203.0.113.7", 0) == "api.example.com"
    assert resolver.endpoint("203.0.113.8", 443) == "203.0.113.8:443"


def test_the_mapping_file_and_local_listeners_come_first():
    resolved = ResolvedNames()
    mapping = EndpointMapping.from_dict({"endpoint": [{"address": "203.0.113.7", "name": "payments"}]})
    resolver = ServiceResolver(mapping=mapping, resolved=resolved)
    resolved.learn("api.example.com", ["203.0.113.7"])
    assert resolver.endpoint("203.0.113.7", 443) == "payments"


def test_failed_answers_teach_nothing_and_the_latest_answer_wins():
    resolved = ResolvedNames(max_names=2)
    resolved.observe(dns_event("bad.example.com", ["198.51.100.1"], error=True))
    assert len(resolved) == 0
    resolved.learn("a.example.com.", ["198.51.100.1"])
    resolved.learn("b.example.com", ["198.51.100.1", "198.51.100.2"])
    resolved.learn("c.example.com", ["198.51.100.3", "not an address"])
    assert len(resolved) == 2  # the oldest address forgotten
    import ipaddress

    assert resolved.name(ipaddress.ip_address("198.51.100.1")) is None
    assert resolved.name(ipaddress.ip_address("198.51.100.2")) == "b.example.com"
    assert resolved.name(ipaddress.ip_address("198.51.100.3")) == "c.example.com"


def test_from_a_decoded_cname_answer():
    """The name the client asked, not the CNAME's target, names the address."""
    conversation = [(cv.REQ, cv.dns_query(9, "www.shop.test")),
                    (cv.RESP, cv.dns_response(9, "www.shop.test", addresses=["192.0.2.44"], cname="cdn.shop.test"))]
    [x] = decode_chunks(DnsDecoder, cv.chunks(conversation), datagram=True)
    resolved = ResolvedNames()
    resolved.observe(x)
    assert ServiceResolver(resolved=resolved).endpoint("192.0.2.44", 443) == "www.shop.test:443"
