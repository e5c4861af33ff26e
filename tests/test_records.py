"""Record layouts: the header parsed by cffi must match what clang laid out."""

from __future__ import annotations

import json
import struct
import subprocess

import pytest

from deetune import records, resources
from deetune.events import ConnectionEvent, ProcessEvent, format_address
from deetune.probes.base import Clock
from deetune.probes.process import ProcessProbe
from deetune.probes.tcp import TcpProbe


def btf_struct_sizes(obj_path) -> dict[str, int]:
    out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", str(obj_path)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"bpftool cannot read {obj_path}: {out.stderr.strip()}")
    return {t["name"]: t["size"] for t in json.loads(out.stdout)["types"] if t["kind"] == "STRUCT"}


@pytest.mark.parametrize("arch", ["x86", "arm64"])
@pytest.mark.parametrize(
    "obj,struct_name", [("process", "dt_process_record"), ("tcp", "dt_conn_record")]
)
def test_sizes_match_the_compiled_objects(obj, struct_name, arch):
    path = resources.object_path(obj, arch)
    if not path.exists():
        pytest.fail(f"{path} missing: run make bpf")
    sizes = btf_struct_sizes(path)
    assert sizes[struct_name] == records.ffi.sizeof(f"struct {struct_name}")
    assert sizes["dt_header"] == records.ffi.sizeof("struct dt_header") == 16


def test_struct_formats_follow_cffi_offsets():
    fmt, names = records.record_struct("struct dt_conn_record")
    assert fmt.size == records.ffi.sizeof("struct dt_conn_record")
    for field in records.flat_fields("struct dt_conn_record"):
        assert field.name in names
    assert names[:3] == ("hdr_kind", "hdr_pid", "hdr_ts_ns")


def pack_conn(**values) -> bytes:
    buf = records.ffi.new("struct dt_conn_record *")
    for key, value in values.items():
        if "." in key:
            outer, inner = key.split(".")
            setattr(getattr(buf, outer), inner, value)
        elif isinstance(value, bytes):
            target = getattr(buf, key)
            records.ffi.memmove(target, value, len(value))
        else:
            setattr(buf, key, value)
    return bytes(records.ffi.buffer(buf))


def test_decode_connection_close_record():
    probe = TcpProbe(clock=Clock())
    probe.clock.offset_ns = 1_000
    raw = pack_conn(
        **{"hdr.kind": records.lib.DT_REC_CONN_CLOSE, "hdr.pid": 4242, "hdr.ts_ns": 5_000_000},
        sock_id=0xFFFF888000001234,
        conn_id=77,
        open_ts_ns=1_000_000,
        bytes_sent=123,
        bytes_received=456,
        retransmits=2,
        family=2,
        lport=40000,
        rport=80,
        role=records.lib.DT_ROLE_CLIENT,
        flags=records.lib.DT_CONN_RESET_RECEIVED,
        laddr=bytes([10, 0, 0, 1]),
        raddr=bytes([10, 0, 0, 2]),
        comm=b"curl",
    )
    (event,) = probe.decode(raw)
    assert event == ConnectionEvent(
        ts=5_001_000,
        ts_mono_ns=5_000_000,
        phase="close",
        role="client",
        pid=4242,
        comm="curl",
        laddr="10.0.0.1",
        lport=40000,
        raddr="10.0.0.2",
        rport=80,
        family=4,
        sock_id=0xFFFF888000001234,
        conn_id=77,
        bytes_sent=123,
        bytes_received=456,
        duration_ns=4_000_000,
        retransmits=2,
        reset="received",
        preexisting=False,
    )
    assert set(event.to_json()) == {
        "type", "ts", "ts_mono_ns", "phase", "role", "pid", "comm", "laddr", "lport", "raddr", "rport",
        "family", "sock_id", "conn_id", "cgroup_id", "bytes_sent", "bytes_received", "duration_ns", "retransmits",
        "reset", "preexisting",
    }


def test_decode_failed_and_open_records_omit_close_fields():
    probe = TcpProbe(clock=Clock())
    raw = pack_conn(**{"hdr.kind": records.lib.DT_REC_CONN_FAILED, "hdr.pid": 1}, error=111, family=10, role=1,
                    raddr=bytes(15) + b"\x01", laddr=bytes(15) + b"\x01", rport=1)
    (event,) = probe.decode(raw)
    data = event.to_json()
    assert (data["phase"], data["error"], data["raddr"], data["family"]) == ("failed", "refused", "::1", 6)
    assert "bytes_sent" not in data and "duration_ns" not in data
    raw = pack_conn(**{"hdr.kind": records.lib.DT_REC_CONN_OPEN}, family=2, role=2)
    data = next(iter(probe.decode(raw))).to_json()
    assert data["role"] == "server" and "error" not in data and "bytes_sent" not in data


def test_unknown_record_kind_is_skipped():
    assert list(TcpProbe().decode(pack_conn(**{"hdr.kind": 999}))) == []


def test_decode_exec_record_with_cmdline():
    buf = records.ffi.new("struct dt_process_record *")
    buf.hdr.kind = records.lib.DT_REC_EXEC
    buf.hdr.pid = 77
    buf.ppid = 1
    args = b"python3\0app.py\0--port\x008080\0"
    records.ffi.memmove(buf.cmdline, args, len(args))
    buf.cmdline_len = len(args)
    records.ffi.memmove(buf.comm, b"python3", 7)
    offset = records.ffi.offsetof("struct dt_process_record", "cmdline")
    raw = bytes(records.ffi.buffer(buf))[: offset + len(args)]  # the kernel sends only the used part
    (event,) = ProcessProbe().decode(raw)
    assert isinstance(event, ProcessEvent)
    assert (event.phase, event.pid, event.ppid, event.comm, event.cmdline) == ("exec", 77, 1, "python3", "python3 app.py --port 8080")
    assert "exit_code" in event.to_json()


def test_ipv4_mapped_addresses_read_as_ipv4():
    assert format_address(6, bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])) == "127.0.0.1"
    assert format_address(4, bytes([192, 168, 1, 2]) + bytes(12)) == "192.168.1.2"


def test_truncated_record_is_an_error_the_pipeline_counts():
    with pytest.raises(struct.error):
        list(TcpProbe().decode(b"\x0b\0\0\0"))


def test_comm_is_text_up_to_the_nul_and_cached():
    raw = b"nginx\0\0\0\0\0\0\0\0\0\0\0"
    assert records.comm(raw) == "nginx"
    assert records.comm(raw) is records.comm(bytes(raw))  # one str per distinct comm
    assert records.comm(b"\xffbad\0" + bytes(11)) == "\ufffdbad"
