"""The payload probe against real sockets: every syscall family, exact sizes and bytes."""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import tempfile
import threading
import time

import pytest

from deetune import records
from deetune.events import DataEvent
from deetune.hostcpu import CpuSample
from deetune.probes import ProbeOptions
from deetune.probes.payload import PayloadProbe

from tests.harness import running_pipeline, with_fake_controls

pytestmark = pytest.mark.bpf


class Pair:
    """A connected loopback pair in this process: ``client`` and the accepted ``server``."""

    def __init__(self, host: str = "127.0.0.1"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as listener:
            listener.bind((host, 0))
            listener.listen(1)
            self.client = socket.create_connection(listener.getsockname()[:2])
            self.server, _ = listener.accept()
        self.port = self.server.getsockname()[1]

    def close(self) -> None:
        self.client.close()
        self.server.close()


def data_events(collector, port):
    return collector.matching(lambda e: isinstance(e, DataEvent) and port in (e.lport, e.rport))


def wait_data(collector, port, count):
    return collector.wait_for(lambda e: isinstance(e, DataEvent) and port in (e.lport, e.rport), count)


def test_read_write_and_vectored_and_msg_calls():
    pair = Pair()
    probe = PayloadProbe(ProbeOptions(port=pair.port), exclude_self=False)
    with running_pipeline([probe]) as collector:
        os.write(pair.client.fileno(), b"hello via write")
        assert os.read(pair.server.fileno(), 100) == b"hello via write"
        os.writev(pair.server.fileno(), [b"vec-one ", b"vec-two"])
        buf1, buf2 = bytearray(8), bytearray(100)
        assert os.readv(pair.client.fileno(), [buf1, buf2]) == 15
        pair.client.sendmsg([b"msg-a", b"msg-b"])
        assert pair.server.recvmsg(100)[0] == b"msg-amsg-b"
        pair.server.send(b"via send")  # libc's send() is the sendto syscall
        assert pair.client.recv(100) == b"via send"
        events = wait_data(collector, pair.port, 8)
    client_fd = pair.client.fileno()
    pair.close()
    seen = [(e.syscall, e.direction, e.size, e.data, e.pid) for e in events]
    me = os.getpid()
    assert seen == [
        ("write", "egress", 15, b"hello via write", me),
        ("read", "ingress", 15, b"hello via write", me),
        ("writev", "egress", 15, b"vec-one vec-two", me),
        ("readv", "ingress", 15, b"vec-one vec-two", me),
        ("sendmsg", "egress", 10, b"msg-amsg-b", me),
        ("recvmsg", "ingress", 10, b"msg-amsg-b", me),
        ("sendto", "egress", 8, b"via send", me),
        ("recvfrom", "ingress", 8, b"via send", me),
    ]
    client_side = [e for e in events if e.lport != pair.port]
    assert all(e.raddr == "127.0.0.1" and e.rport == pair.port and e.fd == client_fd for e in client_side)
    assert all(e.start_mono_ns <= e.ts_mono_ns for e in events)


def test_capture_is_a_prefix_with_the_full_size():
    pair = Pair("::1")
    payload = bytes(range(256)) * 40  # 10240 bytes
    probe = PayloadProbe(ProbeOptions(port=pair.port), capture_bytes=100, exclude_self=False)
    with running_pipeline([probe]) as collector:
        pair.client.sendall(payload)
        received = b""
        while len(received) < len(payload):
            received += pair.server.recv(65536)
        events = wait_data(collector, pair.port, 2)
        time.sleep(0.1)
    pair.close()
    events = data_events(collector, pair.port)
    sent = [e for e in events if e.direction == "egress"]
    got = [e for e in events if e.direction == "ingress"]
    assert sum(e.size for e in sent) == sum(e.size for e in got) == 10240
    assert all(e.data == payload[:100] for e in sent)
    assert all(len(e.data) == min(100, e.size) and e.truncated == (e.size > 100) for e in events)
    assert got[0].data == payload[:100] and got[0].laddr == "::1"


def test_sendfile_is_counted_by_length(tmp_path):
    pair = Pair()
    source = tmp_path / "blob"
    source.write_bytes(b"z" * 5000)
    with running_pipeline([PayloadProbe(ProbeOptions(port=pair.port), exclude_self=False)]) as collector:
        with open(source, "rb") as f:
            sent = os.sendfile(pair.client.fileno(), f.fileno(), 0, 5000)
        received = 0
        while received < sent:
            received += len(pair.server.recv(65536))
        events = wait_data(collector, pair.port, 2)
    pair.close()
    sendfile = [e for e in events if e.syscall == "sendfile"]
    assert [(e.size, e.data) for e in sendfile] == [(5000, b"")]
    assert sum(e.size for e in events if e.direction == "ingress") == 5000


def test_sendmmsg_and_recvmmsg_report_each_message():
    """Through libc: Python has no binding for the *mmsg calls."""
    libc = ctypes.CDLL(None, use_errno=True)

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    class MsgHdr(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint), ("iov", ctypes.POINTER(IoVec)),
                    ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]

    class MMsgHdr(ctypes.Structure):
        _fields_ = [("hdr", MsgHdr), ("len", ctypes.c_uint)]

    pair = Pair()
    messages = [b"first message", b"second"]
    buffers = [ctypes.create_string_buffer(m, len(m)) for m in messages]
    iovs = [IoVec(ctypes.cast(b, ctypes.c_void_p), len(m)) for b, m in zip(buffers, messages)]
    vec = (MMsgHdr * 2)()
    for i, iov in enumerate(iovs):
        vec[i].hdr.iov = ctypes.pointer(iov)
        vec[i].hdr.iovlen = 1
    with running_pipeline([PayloadProbe(ProbeOptions(port=pair.port), exclude_self=False)]) as collector:
        assert libc.sendmmsg(pair.client.fileno(), vec, 2, 0) == 2
        time.sleep(0.05)
        inbuf = ctypes.create_string_buffer(100)
        in_iov = IoVec(ctypes.cast(inbuf, ctypes.c_void_p), 100)
        invec = (MMsgHdr * 1)()
        invec[0].hdr.iov = ctypes.pointer(in_iov)
        invec[0].hdr.iovlen = 1
        assert libc.recvmmsg(pair.server.fileno(), invec, 1, 0, None) == 1
        # The same arrays again (the probe tracks which message of a call comes next): a
        # call with fewer messages, then more; a receive that ends early (its second message
        # finds nothing: EAGAIN), then another: each message still finds its own buffer.
        assert libc.sendmmsg(pair.client.fileno(), vec, 1, 0) == 1
        assert libc.sendmmsg(pair.client.fileno(), vec, 2, 0) == 2
        time.sleep(0.05)
        inbufs = [ctypes.create_string_buffer(100) for _ in range(2)]
        in_iovs = [IoVec(ctypes.cast(b, ctypes.c_void_p), 100) for b in inbufs]
        invec2 = (MMsgHdr * 2)()
        for i, iov in enumerate(in_iovs):
            invec2[i].hdr.iov = ctypes.pointer(iov)
            invec2[i].hdr.iovlen = 1
        assert libc.recvmmsg(pair.server.fileno(), invec2, 2, socket.MSG_DONTWAIT, None) == 1
        pair.client.sendall(b"third")
        time.sleep(0.05)
        assert libc.recvmmsg(pair.server.fileno(), invec2, 2, socket.MSG_DONTWAIT, None) == 1
        assert inbufs[0].raw[:5] == b"third"
        events = wait_data(collector, pair.port, 9)
    pair.close()
    assert [(e.syscall, e.size, e.data) for e in events] == [
        ("sendmmsg", 13, b"first message"),
        ("sendmmsg", 6, b"second"),
        ("recvmmsg", 19, b"first messagesecond"),
        ("sendmmsg", 13, b"first message"),
        ("sendmmsg", 13, b"first message"),
        ("sendmmsg", 6, b"second"),
        ("recvmmsg", 32, b"first messagefirst messagesecond"),
        ("sendto", 5, b"third"),
        ("recvmmsg", 5, b"third"),
    ]


def test_peeks_are_not_copied_and_other_transfers_are_counted_by_length():
    """A peeked read is read again (copying it would show its bytes twice); a transfer
    made by a call the probe cannot read a buffer from (splice here) keeps its length."""
    pair = Pair()
    with running_pipeline([PayloadProbe(ProbeOptions(port=pair.port), exclude_self=False)]) as collector:
        pair.client.sendall(b"peek at me")
        assert pair.server.recv(100, socket.MSG_PEEK) == b"peek at me"
        assert pair.server.recv(100) == b"peek at me"
        read_end, write_end = os.pipe()
        os.write(write_end, b"spliced bytes")
        assert os.splice(read_end, pair.server.fileno(), 13) == 13
        assert pair.client.recv(100) == b"spliced bytes"
        events = wait_data(collector, pair.port, 4)
        os.close(read_end)
        os.close(write_end)
    client_fd, server_fd = pair.client.fileno(), pair.server.fileno()
    pair.close()
    assert [(e.syscall, e.direction, e.size, e.data, e.fd) for e in events] == [
        ("sendto", "egress", 10, b"peek at me", client_fd),
        ("recvfrom", "ingress", 10, b"peek at me", server_fd),
        ("other", "egress", 13, b"", -1),
        ("recvfrom", "ingress", 13, b"spliced bytes", client_fd),
    ]


def test_files_pipes_and_other_ports_are_not_captured():
    pair, other = Pair(), Pair()
    with running_pipeline([PayloadProbe(ProbeOptions(port=pair.port), exclude_self=False)]) as collector:
        read_end, write_end = os.pipe()
        os.write(write_end, b"pipe bytes")
        os.read(read_end, 100)
        with tempfile.TemporaryFile() as f:
            f.write(b"file bytes")
            f.flush()
        other.client.sendall(b"other port")
        other.server.recv(100)
        pair.client.sendall(b"selected")
        pair.server.recv(100)
        wait_data(collector, pair.port, 2)
        time.sleep(0.2)
        os.close(read_end), os.close(write_end)
    pair.close(), other.close()
    datas = collector.matching(lambda e: isinstance(e, DataEvent))
    assert [e.data for e in datas] == [b"selected", b"selected"]


def test_muted_socket_is_no_longer_copied():
    pair = Pair()
    probe = PayloadProbe(ProbeOptions(port=pair.port), exclude_self=False)
    with running_pipeline([probe]) as collector:
        pair.client.sendall(b"before")
        pair.server.recv(100)
        (first, _) = wait_data(collector, pair.port, 2)
        probe.mute(first.sock_id)  # the client's socket
        pair.client.sendall(b"after")
        pair.server.recv(100)
        wait_data(collector, pair.port, 3)
        time.sleep(0.2)
    pair.close()
    assert [(e.direction, e.data) for e in data_events(collector, pair.port)] == [
        ("egress", b"before"), ("ingress", b"before"), ("ingress", b"after")
    ]


def test_threads_of_a_server_are_attributed_to_their_process():
    pair = Pair()
    with running_pipeline([PayloadProbe(ProbeOptions(port=pair.port), exclude_self=False)]) as collector:
        t = threading.Thread(target=lambda: pair.client.sendall(b"from a thread"))
        t.start()
        t.join()
        pair.server.recv(100)
        events = wait_data(collector, pair.port, 2)
    pair.close()
    assert {e.pid for e in events} == {os.getpid()}
    assert len({e.tid for e in events}) == 2


def test_port_capture_override_applies_live_even_to_muted_and_unselected_sockets():
    pair, recorded = Pair(), Pair()
    probe = PayloadProbe(ProbeOptions(port=pair.port), capture_bytes=8, exclude_self=False)
    payload = b"0123456789" * 100
    with running_pipeline([probe]) as collector:
        recorded.client.sendall(payload)  # not selected: nothing copied
        recorded.server.recv(4096)
        pair.client.sendall(payload)
        pair.server.recv(4096)
        wait_data(collector, pair.port, 2)
        probe.set_port_capture(recorded.port, 600)
        recorded.client.sendall(payload)
        while len(recorded.server.recv(4096)) < 1:
            pass
        wait_data(collector, recorded.port, 2)
        probe.set_port_capture(recorded.port, None)
        recorded.client.sendall(b"x")
        recorded.server.recv(10)
        time.sleep(0.2)
    pair.close(), recorded.close()
    assert [len(e.data) for e in data_events(collector, pair.port)] == [8, 8]
    assert [(e.size, e.data) for e in data_events(collector, recorded.port)] == [
        (1000, payload[:600]), (1000, payload[:600])
    ]


def test_overload_sampling_copies_whole_connections_and_counts_the_rest():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port = listener.getsockname()[1]
        probe = PayloadProbe(ProbeOptions(port=port), exclude_self=False, overload_sampling=False)
        pairs = []
        with running_pipeline([probe]) as collector:
            probe.set_sampling(4)
            for _ in range(64):
                client = socket.create_connection(("127.0.0.1", port))
                server, _ = listener.accept()
                pairs.append((client, server))
                client.sendall(b"sampled?")
                assert server.recv(100) == b"sampled?"
            counts = probe.counters()
            probe.set_sampling(1)
            client, server = pairs[0]
            client.sendall(b"all again")
            assert server.recv(100) == b"all again"
            wait_data(collector, port, counts["emitted"] + 2)
        for client, server in pairs:
            client.close()
            server.close()
    # Every call on the selected port was either copied or counted as left out.
    assert counts["emitted"] + counts["sampled_out"] == 128
    assert 0 < counts["sampled_out"] < 128
    assert [e.data for e in data_events(collector, port)[-2:]] == [b"all again", b"all again"]
    stats = collector.stats.probes["payload"]
    assert (stats.sampled_out, stats.sparsest_sampling) == (counts["sampled_out"], 4)


def _tick_on_two_cpus(probe: PayloadProbe, idle: float, own: float, seconds: float = 1.0) -> int:
    """One tick of a 2-CPU host with ``idle`` cores idle and the agent on ``own`` cores; the sampling after it."""
    probe.tick(CpuSample(seconds=seconds, host_cores=2, host_idle=idle, own=own))
    return probe.sampling


def test_overload_sampling_follows_the_records_lost():
    probe = PayloadProbe()
    counts = {"emitted": 0, "lost": 0, "sampled_out": 0}
    mask = with_fake_controls(probe, counts)

    def second(emitted: int, lost: int) -> int:
        counts["emitted"] += emitted
        counts["lost"] += lost
        probe.tick()
        return probe.sampling

    assert second(1000, 0) == 1
    assert second(1000, 19000) == 32  # 1 record in 20 got through: 1 connection in 32
    assert second(500, 3000) == 32  # the tick after a change only watches: the ring still drains
    assert second(900, 100) == 64  # still losing
    # Without CPU figures a tick counts as a second: each calm one after the tick that watches
    # takes twice as many connections.
    assert [second(800, 0) for _ in range(8)] == [64, 32, 32, 16, 16, 8, 8, 4]
    assert mask.masks == [31, 63, 31, 15, 7, 3]
    assert probe.sparsest_sampling == 64
    for _ in range(40):
        second(100, 100_000)
    assert probe.sampling == 1024  # the sparsest it goes
    probe.obj = None  # stopped: nothing to adapt
    assert second(0, 5) == 1024


def test_overload_sampling_keeps_the_agent_within_its_budget_on_a_busy_host():
    probe = PayloadProbe(busy_cpu=0.05)
    controls = with_fake_controls(probe, {"emitted": 0, "lost": 0, "sampled_out": 0})
    tick = functools.partial(_tick_on_two_cpus, probe)

    assert tick(idle=1.2, own=0.7) == 1  # the agent uses spare CPU: no limit
    # One busy quarter second is no trend: the CPU is judged over a second.
    assert [tick(idle=0.05, own=0.9, seconds=0.25) for _ in range(3)] == [1, 1, 1]
    assert tick(idle=0.05, own=0.9, seconds=0.25) == 32  # now a whole busy second: 0.9 / 0.05 takes 1 in 32
    assert tick(idle=0.05, own=0.3) == 32  # the tick after a change only watches
    assert tick(idle=0.1, own=0.08) == 64  # still over the budget (0.1 idle is 5 %: busy)
    assert tick(idle=0.1, own=0.03) == 64  # settling
    # Busy host, under budget but not by half: hold.  With room for twice the work: a step back
    # at each calm second after the one that watches.
    assert [tick(idle=0.1, own=0.03) for _ in range(8)] == [64] * 8
    assert [tick(idle=0.1, own=0.02) for _ in range(5)] == [32, 32, 16, 16, 8]
    # An idle host takes as many more connections as the idle CPU fits: (1.5 idle + 0.4 used) / 0.4
    # is room for 4 times the work, then the rest.
    assert [tick(idle=1.5, own=0.4) for _ in range(5)] == [8, 2, 2, 1, 1]
    assert [tick(idle=0.5, own=0.6) for _ in range(10)] == [1] * 10  # nothing lost, CPU idle: all
    assert controls.masks == [31, 63, 31, 15, 7, 1, 0]

    unlimited = PayloadProbe(busy_cpu=None)
    unlimited.obj, unlimited.counters = probe.obj, probe.counters
    unlimited.tick(CpuSample(seconds=1.0, host_cores=2, host_idle=0.0, own=1.0))
    assert unlimited.sampling == 1


def test_records_lost_on_a_busy_host_have_the_cpu_of_that_tick_judged_at_once():
    for idle, expected in [(0.05, 64), (1.5, 2)]:
        probe = PayloadProbe(busy_cpu=0.05)
        counts = {"emitted": 0, "lost": 0, "sampled_out": 0}
        with_fake_controls(probe, counts)
        assert _tick_on_two_cpus(probe, idle=idle, own=0.9, seconds=0.25) == 1  # no loss, and no whole second yet
        counts["emitted"] += 2000
        counts["lost"] += 2000
        # Half the records lost: 1 in 2 would do with idle CPU.  On a busy host the agent's 0.9
        # cores against its budget of 0.05 (18 times) are judged at once, not after a whole
        # second of decoding flat out, and for all it missed: 2 x 18 = 36 takes 1 in 64.
        assert _tick_on_two_cpus(probe, idle=idle, own=0.9, seconds=0.25) == expected, idle


class _RingAt:
    """A ring buffer stand-in that is, or is not, past its wake-up mark."""

    def __init__(self, behind: bool):
        self.is_behind = behind

    def behind(self) -> bool:
        return self.is_behind


def test_a_ring_past_its_wake_up_mark_on_a_busy_host_has_the_cpu_of_that_tick_judged_at_once():
    probe = PayloadProbe(busy_cpu=0.05)
    counts = {"emitted": 0, "lost": 0, "sampled_out": 0}
    with_fake_controls(probe, counts)
    ring = _RingAt(behind=False)
    probe._rings = [ring]
    counts["emitted"] += 5000
    assert _tick_on_two_cpus(probe, idle=0.05, own=0.9, seconds=0.25) == 1  # keeping up: one tick is no trend
    ring.is_behind = True
    counts["emitted"] += 5000
    # Nothing lost yet, but the reader is behind: 0.9 cores against 0.05 take 1 in 32 now.
    assert _tick_on_two_cpus(probe, idle=0.05, own=0.9, seconds=0.25) == 32
    idle_host = PayloadProbe(busy_cpu=0.05)
    with_fake_controls(idle_host, counts)
    idle_host._rings = [ring]
    assert _tick_on_two_cpus(idle_host, idle=1.5, own=0.9, seconds=0.25) == 1  # idle CPU: no limit


def test_a_flood_after_a_calm_second_is_judged_on_its_own_tick():
    """A whole window of calm before the flood does not water its CPU down."""
    probe = PayloadProbe(busy_cpu=0.05)
    with_fake_controls(probe, {"emitted": 0, "lost": 0, "sampled_out": 0})
    ring = _RingAt(behind=False)
    probe._rings = [ring]
    assert [_tick_on_two_cpus(probe, idle=0.05, own=0.01, seconds=0.25) for _ in range(4)] == [1] * 4
    ring.is_behind = True
    # Over the last second the agent averaged under 0.05 cores; in this tick it used 0.9.
    assert _tick_on_two_cpus(probe, idle=0.05, own=0.9, seconds=0.05) == 32


def test_records_copied_before_the_sampling_grew_sparser_are_left_out_as_they_are_read():
    probe = PayloadProbe()
    with_fake_controls(probe)  # the probe's own counters: what it dropped as it read
    rec = records.ffi.new("struct dt_data_record *")
    rec.hdr.kind = records.lib.DT_REC_DATA
    rec.size = rec.captured = 3
    rec.data[0:3] = b"abc"
    rec.sample_key = 0b1010
    raw = bytes(records.ffi.buffer(rec))[: records.ffi.offsetof("struct dt_data_record", "data") + 3]
    assert [e.data for e in probe.decode(raw)] == [b"abc"]
    probe.set_sampling(2)  # the kernel copies keys with bit 0 clear: this one still
    assert [e.data for e in probe.decode(raw)] == [b"abc"]
    probe.set_sampling(4)  # bits 0-1 clear only: left out, and counted with the kernel's
    assert probe.decode(raw) == ()
    assert probe.counters()["sampled_out"] == 1


def test_a_step_back_that_overran_the_budget_makes_the_next_one_wait_twice_as_long():
    probe = PayloadProbe(busy_cpu=0.05)
    with_fake_controls(probe, {"emitted": 0, "lost": 0, "sampled_out": 0})

    def tick(own: float, idle: float = 0.1) -> int:  # quarter-second ticks, as the pipeline makes them
        return _tick_on_two_cpus(probe, idle=idle, own=own, seconds=0.25)

    def calm_until_step_back(idle: float = 0.1) -> tuple[int, int]:
        """Ticks with the agent on 0.01 cores until the sampling steps back, and where it lands."""
        before, ticks = probe.sampling, 0
        while probe.sampling == before and ticks < 1000:
            tick(0.01, idle)
            ticks += 1
        return ticks, probe.sampling

    assert [tick(0.8) for _ in range(4)] == [1, 1, 1, 16]  # a whole busy second: 0.8 / 0.05 takes 1 in 16
    # One tick watches, a whole second of CPU is judged, then half a second of calm: 0.01 of a 0.05
    # budget leaves room for 4 times the work.
    assert calm_until_step_back() == (5, 4)
    assert [tick(0.3) for _ in range(4)] == [4, 4, 4, 32]  # a burst right after: the next step back waits 1 s
    assert calm_until_step_back() == (7, 8)
    assert [tick(0.3) for _ in range(4)] == [8, 8, 8, 64]  # again: 2 s
    assert calm_until_step_back() == (11, 16)
    # Idle CPU again: the wait is half a second, judged tick by tick (a burst is over, not a
    # whole second of calm needed), and a burst's end brings every connection back at once.
    assert calm_until_step_back(idle=1.5) == (4, 1)


def test_each_connection_has_its_own_id_in_data_and_connection_events():
    """The socket cookie tells connections apart even when the kernel reuses a socket's
    address (sock_id): data and connection records of one socket carry the same id."""
    from deetune.events import ConnectionEvent
    from deetune.probes.tcp import TcpProbe

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        payload = PayloadProbe(ProbeOptions(port=port), exclude_self=False)
        tcp = TcpProbe(ProbeOptions(port=port))
        with running_pipeline([payload, tcp]) as collector:
            for i in range(3):
                client = socket.create_connection(("127.0.0.1", port))
                server, _ = listener.accept()
                client.sendall(b"ping %d" % i)
                assert server.recv(100) == b"ping %d" % i
                client.close()
                server.close()
            collector.wait_for(lambda e: isinstance(e, ConnectionEvent) and e.phase == "close"
                               and port in (e.lport, e.rport), 6)
            wait_data(collector, port, 6)
    data = data_events(collector, port)
    conns = collector.matching(lambda e: isinstance(e, ConnectionEvent) and port in (e.lport, e.rport))
    ids = {e.conn_id for e in data}
    assert len(ids) == 6 and 0 not in ids  # 3 connections, 2 sides each
    for e in conns:
        assert e.conn_id in ids, e
    for e in data:  # every data record's id is its own side's, as the tcp probe reported it
        side = [c for c in conns if (c.lport, c.rport) == (e.lport, e.rport)]
        assert {c.conn_id for c in side} == {e.conn_id}
    assert all(e.sampling == 1 for e in data)


def test_each_call_says_where_its_bytes_start_in_the_stream():
    pair = Pair()
    probe = PayloadProbe(ProbeOptions(port=pair.port), exclude_self=False)
    with running_pipeline([probe]) as collector:
        for chunk in (b"12345", b"1234567", b"123456789"):
            pair.client.sendall(chunk)
            assert pair.server.recv(100) == chunk
        pair.server.sendall(b"reply")
        assert pair.client.recv(100) == b"reply"
        events = wait_data(collector, pair.port, 8)
    pair.close()
    client_out = [e.seq for e in events if e.lport != pair.port and e.direction == "egress"]
    server_in = [e.seq for e in events if e.lport == pair.port and e.direction == "ingress"]
    assert client_out == server_in == [0, 5, 12]
    assert [e.seq for e in events if e.direction == "egress" and e.lport == pair.port] == [0]


def test_idle_gaps_beside_busy_applications_take_connections_back_two_at_a_time():
    """A client and a server waiting on each other leave idle CPU (a quarter of the host here) that
    is not room to spare: the sampling steps back by 2 at a time.  A mostly idle host (a burst is
    over) takes every connection back at once."""
    probe = PayloadProbe(busy_cpu=0.05)
    with_fake_controls(probe, {"emitted": 0, "lost": 0, "sampled_out": 0})

    def relax(idle: float) -> list[int]:
        probe.set_sampling(256)
        seen = [256]
        for _ in range(200):
            if seen[-1] == 1:
                break
            now = _tick_on_two_cpus(probe, idle=idle, own=0.002, seconds=0.25)
            if now != seen[-1]:
                seen.append(now)
        return seen

    assert relax(idle=0.5) == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert relax(idle=1.5) == [256, 1]


def test_idle_gaps_beside_busy_applications_take_connections_back_within_the_budget():
    """A host hovering at the busy mark (pgbench: a client and a server waiting on each other, a
    tenth of the CPUs idle or a little more): what the agent takes from the gaps delays the
    applications as on a busy host.  It takes connections back only as far as its budget holds,
    and a partly idle second does not undo the longer wait that bursts earned."""
    probe = PayloadProbe(busy_cpu=0.05)
    with_fake_controls(probe, {"emitted": 0, "lost": 0, "sampled_out": 0})

    def tick(own: float, idle: float) -> int:
        return _tick_on_two_cpus(probe, idle=idle, own=own, seconds=0.25)

    probe.set_sampling(64)
    # A quarter of the host idle, the agent on 0.04 of its 0.05 cores: no room for twice the work.
    assert [tick(0.04, idle=0.5) for _ in range(40)] == [64] * 40
    # Within half the budget: twice as many connections at a time.
    assert 32 in [tick(0.02, idle=0.5) for _ in range(8)]
    # Bursts on a busy host make the wait longer; partly idle seconds between them keep it.
    probe = PayloadProbe(busy_cpu=0.05)
    with_fake_controls(probe, {"emitted": 0, "lost": 0, "sampled_out": 0})
    assert [tick(0.8, idle=0.1) for _ in range(4)] == [1, 1, 1, 16]
    for _ in range(20):
        if probe.sampling != 16:
            break
        tick(0.01, idle=0.1)
    assert probe.sampling == 4
    assert [tick(0.3, idle=0.1) for _ in range(4)] == [4, 4, 4, 32]  # overran soon after: waits 1 s next
    waited = 0
    while probe.sampling == 32 and waited < 100:
        tick(0.01, idle=0.3)  # partly idle (15 %), not a burst's end
        waited += 1
    assert waited == 7  # 1 s of calm after the second the change is judged on, as on a busy host


def test_a_second_that_shows_no_cpu_used_is_under_one_clock_tick_not_nothing():
    """The agent's CPU time comes in clock ticks (10 ms): a sparse sampling's second on a busy
    host may show none.  That is room for the budget over one tick, not for every connection."""
    probe = PayloadProbe(busy_cpu=0.05)
    with_fake_controls(probe, {"emitted": 0, "lost": 0, "sampled_out": 0})
    probe.set_sampling(256)
    seen = [256]
    for _ in range(12):
        now = _tick_on_two_cpus(probe, idle=0.1, own=0.0, seconds=0.25)
        if now != seen[-1]:
            seen.append(now)
    assert seen[:2] == [256, 64]  # 0.05 / 0.01 (a tick a second): room for 4 times the work
