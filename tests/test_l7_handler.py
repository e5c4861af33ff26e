"""The L7 connection table when connection events and data events arrive out of step.

They come through two ring buffers that the pipeline drains one after the other, and the
connection ring can overflow: a close may be handled before the connection's last data, a
new socket may reuse a sock_id whose close was lost or is handled late.  (Seen with real
servers: tests/test_l7_servers.py.)
"""

from __future__ import annotations

import pytest

from deetune import l7
from deetune.decoders.http import HttpDecoder
from deetune.events import ConnectionEvent, DataEvent, ExchangeEvent
from deetune.l7 import L7Handler, ListeningPorts

SOCK = 0xFFFF888100000000
REQUEST = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def data(ts: int, direction: str, payload: bytes, *, lport: int = 40000, rport: int = 80,
         sock_id: int = SOCK) -> DataEvent:
    return DataEvent(ts=ts, ts_mono_ns=ts, pid=10, tid=10, comm="client", fd=3, sock_id=sock_id,
                     direction=direction, syscall="write" if direction == "egress" else "read",
                     size=len(payload), data=payload, start_mono_ns=ts - 1, laddr="127.0.0.1", lport=lport,
                     raddr="127.0.0.1", rport=rport, family=4)


def conn(ts: int, phase: str, *, lport: int = 40000, rport: int = 80, sock_id: int = SOCK) -> ConnectionEvent:
    return ConnectionEvent(ts=ts, ts_mono_ns=ts, phase=phase, role="client", pid=10, comm="client",
                           laddr="127.0.0.1", lport=lport, raddr="127.0.0.1", rport=rport, family=4, sock_id=sock_id)


def handler() -> L7Handler:
    return L7Handler([HttpDecoder], listening=ListeningPorts(reader=set))


def run(h: L7Handler, events) -> list[ExchangeEvent]:
    out = [e for event in events for e in h(event)]
    return [e for e in out if isinstance(e, ExchangeEvent)]


def test_close_handled_before_the_last_data_waits_for_it():
    h = handler()
    got = run(h, [conn(100, "open"), data(200, "egress", REQUEST), conn(400, "close"), data(300, "ingress", RESPONSE)])
    assert [(e.target, e.status, e.response_bytes, e.role) for e in got] == [("/a", 200, len(RESPONSE), "client")]
    assert "incomplete" not in got[0].attributes
    assert h.flush() == []


def test_close_waits_until_data_from_after_it_was_seen():
    h = handler()
    run(h, [conn(100, "open"), data(200, "egress", REQUEST)])
    assert run(h, [conn(300, "close")]) == []  # its response may still be in the data ring
    got = run(h, [data(350, "egress", REQUEST, lport=40001, sock_id=SOCK + 1)])  # now it cannot
    assert [(e.target, e.status, e.lport) for e in got] == [("/a", None, 40000)]


def test_close_after_data_from_later_finishes_at_once():
    h = handler()
    run(h, [data(200, "egress", REQUEST), data(350, "egress", REQUEST, lport=40001, sock_id=SOCK + 1)])
    got = run(h, [conn(300, "close")])
    assert [(e.target, e.status, e.lport) for e in got] == [("/a", None, 40000)]


def test_close_without_later_data_finishes_after_the_grace(monkeypatch):
    h = handler()
    run(h, [data(200, "egress", REQUEST)])
    monkeypatch.setattr(l7, "CLOSE_GRACE_NS", 0)
    got = run(h, [conn(300, "close"), conn(301, "open", lport=1, sock_id=1)])
    assert [(e.target, e.status) for e in got] == [("/a", None)]


def test_sock_id_reused_after_a_lost_close_is_a_new_connection():
    h = handler()
    first = run(h, [data(100, "egress", REQUEST), data(110, "ingress", RESPONSE), data(120, "egress", REQUEST)])
    assert len(first) == 1
    # The close of port 40000 was lost; a new socket at the same address talks from port 40001.
    got = run(h, [data(200, "egress", REQUEST, lport=40001), data(210, "ingress", RESPONSE, lport=40001)])
    assert [(e.lport, e.status) for e in got] == [(40000, None), (40001, 200)]  # the old one's pending request


def test_late_close_of_the_previous_socket_leaves_the_new_one_alone():
    h = handler()
    run(h, [data(100, "egress", REQUEST), data(110, "ingress", RESPONSE)])
    run(h, [data(200, "egress", REQUEST, lport=40001)])
    assert run(h, [conn(150, "close", lport=40000)]) == []
    got = run(h, [data(210, "ingress", RESPONSE, lport=40001)])
    assert [(e.lport, e.status) for e in got] == [(40001, 200)]


def test_open_of_a_new_socket_replaces_a_stale_connection_and_brings_its_role():
    h = handler()
    run(h, [data(100, "ingress", REQUEST, lport=8080, rport=50000)])  # content says: server
    open_new = ConnectionEvent(ts=200, ts_mono_ns=200, phase="open", role="client", pid=10, comm="client",
                               laddr="127.0.0.1", lport=40001, raddr="127.0.0.1", rport=80, family=4, sock_id=SOCK)
    got = run(h, [open_new, data(210, "egress", REQUEST, lport=40001), data(220, "ingress", RESPONSE, lport=40001)])
    assert [(e.lport, e.role, e.status) for e in got] == [(8080, "server", None), (40001, "client", 200)]


@pytest.mark.parametrize("flush_ts", [300])
def test_flush_ends_closing_connections_at_their_close(flush_ts):
    h = handler()
    run(h, [data(200, "egress", REQUEST), conn(flush_ts, "close")])
    (got,) = [e for e in h.flush() if isinstance(e, ExchangeEvent)]
    assert (got.target, got.status) == ("/a", None)
