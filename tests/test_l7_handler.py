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


# -- connection identity (conn_id) and stream positions (seq) -------------------------------------


def cdata(ts: int, direction: str, payload: bytes, *, seq: int, conn_id: int, lport: int = 40000,
          sock_id: int = SOCK, size: int | None = None) -> DataEvent:
    return DataEvent(ts=ts, ts_mono_ns=ts, pid=10, tid=10, comm="client", fd=3, sock_id=sock_id,
                     direction=direction, syscall="write" if direction == "egress" else "read",
                     size=len(payload) if size is None else size, data=payload, start_mono_ns=ts, laddr="127.0.0.1",
                     lport=lport, raddr="127.0.0.1", rport=80, family=4, conn_id=conn_id, seq=seq)


def cconn(ts: int, phase: str, *, conn_id: int, lport: int = 40000) -> ConnectionEvent:
    return ConnectionEvent(ts=ts, ts_mono_ns=ts, phase=phase, role="client", pid=10, comm="client",
                           laddr="127.0.0.1", lport=lport, raddr="127.0.0.1", rport=80, family=4, sock_id=SOCK,
                           conn_id=conn_id)


def test_the_next_connection_on_the_socket_does_not_cut_the_previous_one_short():
    """Short connections: the next connection on the same kernel socket was opened (connection ring)
    before the previous one's last data came (payload ring); its response was cut short."""
    body = b"b" * 40_000
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    h = handler()
    pieces = [response[i : i + 4096] for i in range(0, len(response), 4096)]
    events = [cconn(100, "open", conn_id=1), cdata(110, "egress", REQUEST, seq=0, conn_id=1)]
    seq = 0
    for i, piece in enumerate(pieces[:3]):
        events.append(cdata(120 + i, "ingress", piece, seq=seq, conn_id=1))
        seq += len(piece)
    # The close of the first and the open of the next are handled before the first's last reads.
    events += [cconn(200, "close", conn_id=1), cconn(210, "open", conn_id=2, lport=40001)]
    for i, piece in enumerate(pieces[3:]):
        events.append(cdata(130 + i, "ingress", piece, seq=seq, conn_id=1))
        seq += len(piece)
    events += [cdata(220, "egress", REQUEST, seq=0, conn_id=2, lport=40001),
               cdata(230, "ingress", RESPONSE, seq=0, conn_id=2, lport=40001)]
    got = run(h, events)
    assert [(e.conn_id, e.lport, e.status, e.response_bytes, e.attributes.get("incomplete")) for e in got] == [
        (1, 40000, 200, len(response), None), (2, 40001, 200, len(RESPONSE), None)]
    assert all(e.sock_id == SOCK for e in got)


def test_a_sampling_gap_reports_the_waiting_request_without_pairing_it_with_a_later_response():
    """Server side of a keep-alive connection: a request, then calls not copied for a while (overload
    sampling), then more exchanges.  The request waiting took the next response seen (latency 1.25 s),
    and every later exchange was paired with the following request's response."""
    h = L7Handler([HttpDecoder], listening=ListeningPorts(reader=lambda: {80}))
    request = lambda i: b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i  # noqa: E731
    response = lambda i: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(str(i)), str(i).encode())  # noqa: E731

    def server(ts, direction, payload, seq):
        return DataEvent(ts=ts, ts_mono_ns=ts, pid=20, tid=20, comm="server", fd=4, sock_id=SOCK, direction=direction,
                         syscall="read", size=len(payload), data=payload, start_mono_ns=ts, laddr="127.0.0.1",
                         lport=80, raddr="127.0.0.1", rport=40000, family=4, conn_id=7, seq=seq)

    events = [server(1, "ingress", request(0), 0)]  # its response and requests 1..9 were not copied
    seen_in = len(request(0)) + sum(len(request(i)) for i in range(1, 10))
    seen_out = sum(len(response(i)) for i in range(0, 10))
    for i in range(10, 13):
        events.append(server(10 * i, "ingress", request(i), seen_in))
        events.append(server(10 * i + 5, "egress", response(i), seen_out))
        seen_in += len(request(i))
        seen_out += len(response(i))
    got = run(h, events)
    # /10 came while /0 waited (its response not yet known lost): whether its answer is the next
    # response cannot be told from a client that pipelines, so it is given up rather than guessed.
    assert [(e.target, e.status, e.attributes.get("gap"), e.latency_ns) for e in got] == [
        ("/0", None, True, None), ("/10", None, True, None), ("/11", 200, None, 5), ("/12", 200, None, 5)]
    assert (h.stats.gaps, h.stats.gap_bytes) == (2, seen_in - len(request(0)) - sum(
        len(request(i)) for i in range(10, 13)) + sum(len(response(i)) for i in range(10)))
    assert h.stats.skipped == {"http": {"resync:gap": 2, "unsolicited_response": 1}}


def test_a_call_seen_twice_is_passed_once():
    h = handler()
    got = run(h, [cdata(1, "egress", REQUEST, seq=0, conn_id=3), cdata(2, "egress", REQUEST, seq=0, conn_id=3),
                  cdata(3, "ingress", RESPONSE, seq=0, conn_id=3)])
    assert [(e.target, e.status) for e in got] == [("/a", 200)]
    assert h.stats.reordered == 1


def test_an_error_answering_a_request_not_copied_is_reported_from_its_heads():
    """Server side, sampled: /0 decoded whole; /1's request not copied (a gap), its 503 copied.
    The decoding skips a response without its request, so the kernel's heads of the error
    (request, then response) report it; an error the decoding did report is not reported twice."""
    h = L7Handler([HttpDecoder], listening=ListeningPorts(reader=lambda: {80}))
    fail = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"

    def server(ts, direction, payload, seq, *, head=False):
        return DataEvent(ts=ts, ts_mono_ns=ts, pid=20, tid=20, comm="server", fd=4, sock_id=SOCK,
                         direction=direction, syscall="read", size=len(payload), data=payload, start_mono_ns=ts,
                         laddr="127.0.0.1", lport=80, raddr="127.0.0.1", rport=40000, family=4, conn_id=7,
                         seq=-1 if head else seq, error_head=head)

    request1 = b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
    got = run(h, [
        server(10, "ingress", REQUEST, 0), server(20, "egress", RESPONSE, 0),
        # /1: only its response was copied …
        server(40, "egress", fail, len(RESPONSE)),
        # … and the kernel's heads of the error, from the same calls.
        server(30, "ingress", request1, 0, head=True), server(40, "egress", fail, 0, head=True),
        # /2 decoded whole, error included: its heads are dropped.
        server(50, "ingress", b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n", len(REQUEST) + len(request1)),
        server(60, "egress", fail, len(RESPONSE) + len(fail)),
        server(50, "ingress", b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n", 0, head=True),
        server(60, "egress", fail, 0, head=True),
    ])
    assert [(e.target, e.status, e.error) for e in got] == [("/a", 200, False), ("/1", 503, True), ("/2", 503, True)]
    assert h.stats.error_heads_duplicate == 1


def test_an_error_its_own_decoding_holds_is_reported_from_its_heads_once():
    """Server side: /1's 500 head is copied for the connection's decoding (its body is to follow);
    then the stream loses its framing (bytes that are no request) and the decoding holds /1
    unreported.  The kernel's heads of that call (marked: also copied) waited for the decoding and
    report /1 once a second of data has passed; the decoding's report at the connection's end is
    then dropped.  /2's 500, written in two copied calls, is
    reported by the decoding when whole: its waiting heads are dropped, whichever comes first."""
    h = L7Handler([HttpDecoder], listening=ListeningPorts(reader=lambda: {80}))
    head = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\n"

    def server(ts, direction, payload, seq, *, is_head=False, conn_id=7):
        return DataEvent(ts=ts, ts_mono_ns=ts, pid=20, tid=20, comm="server", fd=4, sock_id=SOCK,
                         direction=direction, syscall="read", size=len(payload), data=payload, start_mono_ns=ts,
                         laddr="127.0.0.1", lport=80, raddr="127.0.0.1", rport=40000, family=4, conn_id=conn_id,
                         seq=-1 if is_head else seq, error_head=is_head,
                         also_copied=is_head and direction == "egress")

    req2 = b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
    out = len(head) + 4
    got = run(h, [
        server(30, "ingress", req2, 0), server(40, "egress", head, 0),
        server(30, "ingress", req2, 0, is_head=True), server(40, "egress", head, 0, is_head=True),
        server(41, "egress", b"boom", len(head)),
    ])
    assert [(e.target, e.status, e.error) for e in got] == [("/2", 500, True)]
    assert h.stats.error_heads_duplicate == 1
    req1 = b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
    assert run(h, [
        server(50, "ingress", req1, len(req2)), server(60, "egress", head, out),
        server(50, "ingress", req1, 0, is_head=True), server(60, "egress", head, 0, is_head=True),
        server(70, "ingress", b"\x16\x03\x01\x00\x05hello", len(req2) + len(req1)),  # framing lost
    ]) == []
    later = run(h, [server(60 + l7.ERROR_HEAD_WAIT_NS, "ingress", req2, len(req2) + len(req1) + 10)])
    assert [(e.target, e.status, e.error) for e in later] == [("/1", 500, True)]
    assert h.stats.error_heads_duplicate == 1 and h.stats.error_heads == 2
    # /3, on a new connection: its heads come through their own ring before the copied calls.
    req3, at = b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n", 2 * l7.ERROR_HEAD_WAIT_NS
    got = run(h, [
        server(at, "ingress", req3, 0, is_head=True, conn_id=8), server(at + 10, "egress", head, 0, is_head=True, conn_id=8),
        server(at, "ingress", req3, 0, conn_id=8), server(at + 10, "egress", head + b"boom", 0, conn_id=8),
    ])
    # Connection 7 ends there: its decoding's late report of /1 is dropped, /2 never answered.
    assert [(e.target, e.status) for e in got] == [("/2", None), ("/3", 500)]
    assert h.stats.error_heads_duplicate == 3
    assert h.flush() == []
