"""The libbpf bindings: open, knobs, load, attach, maps, ring buffers, errors."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import pytest

from deetune import resources
from deetune.libbpf import BpfObject, LibbpfError, VerifierError, num_possible_cpus
from deetune.ringbuf import RingBuffer

HERE = pathlib.Path(__file__).resolve().parent
BPF_SRC = HERE.parent / "bpf"


def compile_object(name: str, out_dir: pathlib.Path, arch: str = "x86") -> pathlib.Path:
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang not installed (make setup installs it)")
    out = out_dir / f"{name}.bpf.o"
    subprocess.run(
        [clang, "-g", "-O2", "-target", "bpf", f"-D__TARGET_ARCH_{arch}", f"-I{BPF_SRC}", "-c", str(HERE / "bpf" / f"{name}.bpf.c"), "-o", str(out)],
        check=True,
    )
    return out


@pytest.fixture(scope="module")
def maps_object(tmp_path_factory) -> pathlib.Path:
    return compile_object("maps", tmp_path_factory.mktemp("bpf"))


@contextlib.contextmanager
def attached_ring(maps_object: pathlib.Path, *, ring_bytes: int | None = None, **constants):
    """The test object loaded for this process (and ``constants``), attached: (object, its ring)."""
    with BpfObject.open(maps_object) as obj:
        obj.set_constant("targ_tgid", os.getpid())
        for name, value in constants.items():
            obj.set_constant(name, value)
        if ring_bytes is not None:
            obj.maps["test_ring"].max_entries = ring_bytes
        obj.load()
        obj.attach_all()
        ring = RingBuffer(obj.maps["test_ring"])
        try:
            yield obj, ring
        finally:
            ring.close()


def test_open_lists_programs_maps_and_constants(maps_object):
    with BpfObject.open(maps_object) as obj:
        assert obj.state == "open"
        assert list(obj.programs) == ["on_getppid"]
        assert obj.programs["on_getppid"].section == "tracepoint/syscalls/sys_enter_getppid"
        assert {"test_hash", "test_percpu", "test_ring", "dt_stats"} <= set(obj.maps)
        layout = obj.constants()
        assert {name: size for name, (_, size) in layout.items()} == {"knob_u32": 4, "knob_u64": 8, "targ_tgid": 4, "dt_targ_netns": 4}
        assert obj.get_constant("knob_u32") == (7).to_bytes(4, "little")
        obj.set_constant("knob_u32", 41)
        assert obj.get_constant("knob_u32") == (41).to_bytes(4, "little")
        with pytest.raises(LibbpfError, match="no constant 'nope' \\(known: dt_targ_netns, knob_u32, knob_u64, targ_tgid\\)"):
            obj.set_constant("nope", 1)
    assert obj.state == "closed"


def test_missing_object_is_a_clear_error(tmp_path):
    with pytest.raises(LibbpfError, match="not found"):
        BpfObject.open(tmp_path / "absent.bpf.o")


def test_arm64_objects_open(tmp_path):
    """arm64 objects are built alongside; opening them checks they are well-formed."""
    for name in ("process", "tcp", "payload", "features"):
        path = resources.object_path(name, "arm64")
        if not path.exists():
            pytest.fail(f"{path} missing: make bpf builds both architectures")
        with BpfObject.open(path) as obj:
            assert obj.programs


@pytest.mark.bpf
def test_knobs_maps_and_ring_buffer_end_to_end(maps_object):
    with BpfObject.open(maps_object) as obj:
        obj.set_constant("knob_u32", 41)
        obj.set_constant("knob_u64", 0x1122334455667788)
        obj.set_constant("targ_tgid", os.getpid())
        obj.maps["test_ring"].max_entries = 8192
        obj.load()
        assert obj.state == "loaded"
        with pytest.raises(LibbpfError, match="object is loaded, needs open"):
            obj.set_constant("knob_u32", 1)
        (link,) = obj.attach_all()
        ring = RingBuffer(obj.maps["test_ring"])
        assert ring.size == 8192
        try:
            os.getppid()  # Python caches nothing here: this is a real syscall
            records = ring.poll(2.0)
            assert records == [struct.pack("<QQ", 0x1122334455667788, os.getpid())]
            hash_map = obj.maps["test_hash"]
            assert hash_map.lookup(struct.pack("<I", 1)) == struct.pack("<Q", 41)
            assert hash_map.lookup(struct.pack("<I", 2)) is None
            hash_map.update(struct.pack("<I", 5), struct.pack("<Q", 99))
            assert dict(hash_map.items()) == {
                struct.pack("<I", 1): struct.pack("<Q", 41),
                struct.pack("<I", 5): struct.pack("<Q", 99),
            }
            assert hash_map.delete(struct.pack("<I", 5)) is True
            assert hash_map.delete(struct.pack("<I", 5)) is False
            with pytest.raises(ValueError, match="key is 2 bytes, expected 4"):
                hash_map.lookup(b"xx")
            percpu = obj.maps["test_percpu"]
            values = percpu.lookup(struct.pack("<I", 0))
            assert len(values) == num_possible_cpus() and all(v == b"\0\0\0\0" for v in values)
            stats = obj.maps["dt_stats"]
            assert stats.sum_percpu_u64(struct.pack("<I", 0)) == 1  # emitted
            assert stats.sum_percpu_u64(struct.pack("<I", 1)) == 0  # lost
        finally:
            ring.close()
        assert not link.closed
    assert link.closed


@pytest.mark.bpf
def test_ring_buffer_overflow_is_counted(maps_object):
    """A full ring drops records in the kernel and counts them: nothing is lost silently."""
    with attached_ring(maps_object) as (obj, ring):
        for _ in range(1000):  # 24 bytes each (16 + 8 header) in a 4 KiB ring
            os.getppid()
        got = len(ring.consume())
        stats = obj.maps["dt_stats"]
        emitted = stats.sum_percpu_u64(struct.pack("<I", 0))
        lost = stats.sum_percpu_u64(struct.pack("<I", 1))
    assert got == emitted == 4096 // 24
    assert emitted + lost == 1000


@pytest.mark.bpf
def test_a_consume_call_takes_a_bounded_batch(maps_object):
    """At most ``limit`` records, and no record begun past ``max_bytes``; the rest is
    left for the next call, in order."""
    with attached_ring(maps_object) as (obj, ring):
        for _ in range(100):  # 24 bytes each with its header: 2,400 of the 4 KiB ring
            os.getppid()
        batches = [len(ring.consume(limit=30)), len(ring.consume(max_bytes=48)), len(ring.consume(max_bytes=49))]
        batches.append(len(ring.consume()))
        assert ring.pending_bytes() == 0
    assert batches == [30, 2, 3, 65]


@pytest.mark.bpf
def test_a_ring_is_behind_past_its_wake_up_mark(maps_object):
    """Past 1/16 of the ring unread (256 bytes of 4 KiB: more than 10 records of 24 bytes),
    the kernel side no longer wakes the reader: the reader is behind."""
    with attached_ring(maps_object) as (obj, ring):
        for _ in range(11):
            os.getppid()
        first = (ring.pending_bytes(), ring.behind())
        ring.consume(limit=1)
        second = (ring.pending_bytes(), ring.behind())
    assert first == (264, True)
    assert second == (240, False)


@pytest.mark.bpf
def test_records_wrapping_around_the_ring_read_whole(maps_object):
    """The data area is mapped once: a record that runs past the end of the
    ring is joined from its two parts.  24-byte records in a 4 KiB ring end
    at every 8-byte offset in turn, so some wrap on every lap."""
    with attached_ring(maps_object, knob_u64=0x0102030405060708) as (obj, ring):
        records = []
        for _ in range(1000):  # about 6 laps
            os.getppid()
            os.getppid()
            records += ring.consume()
    assert records == [struct.pack("<QQ", 0x0102030405060708, os.getpid())] * 2000


WATCH_CONSUMER_POSITION = """
import mmap, sys, time
page = mmap.mmap(int(sys.argv[1]), mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ)
position = memoryview(page)[:8].cast("Q")
print("ready", flush=True)
deadline = time.monotonic() + float(sys.argv[2])
reads = zeros = 0
while time.monotonic() < deadline:
    for _ in range(4096):
        if position[0] == 0:
            zeros += 1
    reads += 4096
print(reads, zeros)
"""


@pytest.mark.bpf
def test_the_kernel_never_sees_the_consumer_position_at_zero(maps_object):
    """Each drain stores the consumer position, which the kernel reads for
    every record it reserves.  Stored with struct.pack_into it read 0 for a
    moment (the target is zeroed before packing): the ring looked full and the
    record was dropped, about 1 in 100,000 at 10,000 connections/s.  Another
    process watches the shared page while this one produces and drains."""
    with attached_ring(maps_object, ring_bytes=1 << 16) as (obj, ring):
        os.getppid()
        assert len(ring.consume()) == 1  # the position is past 0 from here on
        watcher = subprocess.Popen(
            [sys.executable, "-c", WATCH_CONSUMER_POSITION, str(ring.fd), "1.5"],
            pass_fds=(ring.fd,), stdout=subprocess.PIPE, text=True,
        )
        assert watcher.stdout.readline() == "ready\n"
        drained = 0
        while watcher.poll() is None:
            for _ in range(1000):
                os.getppid()
                drained += len(ring.consume())
        reads, zeros = map(int, watcher.stdout.read().split())
        lost = obj.maps["dt_stats"].sum_percpu_u64(struct.pack("<I", 1))
    assert reads > 1_000_000 and drained > 10_000
    assert (zeros, lost) == (0, 0)


@pytest.mark.bpf
def test_verifier_rejection_carries_the_log_tail(tmp_path):
    path = compile_object("rejected", tmp_path)
    with BpfObject.open(path) as obj:
        with pytest.raises(VerifierError) as info:
            obj.load()
    err = info.value
    assert err.errno == 13  # EACCES
    assert "invalid mem access 'scalar'" in err.log
    message = str(err)
    assert message.startswith("verifier rejected a program of rejected:")
    assert "invalid mem access 'scalar'" in message
    assert len(message.splitlines()) <= VerifierError.TAIL_LINES + 2


@pytest.mark.bpf
def test_links_detach_on_close_and_nothing_stays_loaded(maps_object):
    def our_programs() -> int:
        out = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True, check=True).stdout
        import json

        return sum(1 for p in json.loads(out) if p.get("name") == "on_getppid")

    before = our_programs()
    obj = BpfObject.open(maps_object)
    obj.set_constant("targ_tgid", os.getpid())
    obj.load()
    links = obj.attach_all()
    assert our_programs() == before + 1
    obj.close()
    assert all(link.closed for link in links)
    assert our_programs() == before
