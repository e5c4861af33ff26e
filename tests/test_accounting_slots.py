"""The kernel's table of counted keys: full, it counts what it cannot count; idle keys give
their slots back, and the exchanges that follow are counted exactly in them."""

from __future__ import annotations

import collections
import socket

from deetune.events import RequestCounts
from deetune.probes.base import ProbeOptions
from deetune.probes.payload import PayloadProbe
from tests.harness import running_pipeline
from tests.servers import HOST, Upstream, upstream_response


def exchange(client: socket.socket, method: str, status: int) -> None:
    """One request to the upstream on a keep-alive connection, answered with ``status``."""
    request = f"{method} /api/status/{status} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
    client.sendall(request)
    want = len(upstream_response(f"/api/status/{status}", len(request)))
    got = b""
    while len(got) < want:
        got += client.recv(4096)


def totals(collector, port: int) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for e in collector.matching(lambda e: isinstance(e, RequestCounts) and e.port == port):
        out[(e.role, e.method, e.status)] += e.count
    return out


def wait_totals(collector, port: int, expected: dict, probe: PayloadProbe) -> None:
    def done(_event) -> bool:
        return totals(collector, port) == expected

    try:
        collector.wait_for(done, timeout=10)
    except AssertionError:
        raise AssertionError(f"counted {dict(totals(collector, port))}, expected {expected}; "
                             f"kernel counters {probe.counters()}") from None


def test_a_full_table_counts_what_it_misses_and_idle_keys_free_their_slots():
    server = Upstream.start()
    probe = PayloadProbe(ProbeOptions(port=server.port), exclude_self=False, accounting_keys=4)
    try:
        with running_pipeline([probe]) as collector, socket.create_connection((HOST, server.port)) as client:
            # Four keys (two per side) fill the table; a fifth and sixth are not counted, but said.
            for method, status in [("GET", 200), ("GET", 200), ("GET", 200), ("GET", 404), ("GET", 404)]:
                exchange(client, method, status)
            expected = {(role, "GET", status): n for role in ("client", "server")
                        for status, n in ((200, 3), (404, 2))}
            wait_totals(collector, server.port, expected, probe)
            exchange(client, "PUT", 200)
            collector.wait_for(lambda _e: probe.counters()["uncounted_key_table_full"] == 2, timeout=10)

            # Idle keys give their slots back at the next read (more than half the table taken).
            probe._counters._idle = 0.0
            collector.wait_for(lambda _e: probe._counters.deleted == 4, timeout=10)
            probe._counters._idle = 3600.0
            # The socket remembered GET 404's old slot: its generation says it is no longer so.
            for method, status in [("GET", 404), ("POST", 201), ("POST", 201)]:
                exchange(client, method, status)
            expected.update({(role, "GET", 404): 3 for role in ("client", "server")})
            expected.update({(role, "POST", 201): 2 for role in ("client", "server")})
            wait_totals(collector, server.port, expected, probe)
            assert probe.counters()["uncounted_key_table_full"] == 2
    finally:
        server.stop()
