"""Socket payload probe: bytes moved by read/write/send/recv-family calls on TCP and UDP sockets."""

from __future__ import annotations

import logging
import os
import struct
import threading
from typing import Iterable

import attrs

from deetune import accounting, records
from deetune.events import DataEvent, Event, format_address, positional_builder
from deetune.libbpf import BpfObject, num_possible_cpus
from deetune.probes.base import Probe, ProbeOptions
from deetune.probes.overload import DEFAULT_BUSY_CPU, OverloadSampling

_L = records.lib
_FIXED, _FIELDS = records.record_struct("struct dt_data_record", upto="data")
# decode() unpacks positionally, in this order; a layout change must update it.
assert _FIELDS == (
    "hdr_kind", "hdr_pid", "hdr_ts_ns", "sock_id", "conn_id", "cgroup_id", "seq", "tid", "fd", "size", "captured",
    "family", "lport", "rport", "direction", "syscall", "sample_key", "sample_shift", "flags", "laddr", "raddr",
    "comm",
), _FIELDS
_DATA_OFFSET = records.ffi.offsetof("struct dt_data_record", "data")
_SYSCALLS = {
    _L.DT_SYS_READ: "read",
    _L.DT_SYS_WRITE: "write",
    _L.DT_SYS_READV: "readv",
    _L.DT_SYS_WRITEV: "writev",
    _L.DT_SYS_SENDTO: "sendto",
    _L.DT_SYS_RECVFROM: "recvfrom",
    _L.DT_SYS_SENDMSG: "sendmsg",
    _L.DT_SYS_RECVMSG: "recvmsg",
    _L.DT_SYS_SENDMMSG: "sendmmsg",
    _L.DT_SYS_RECVMMSG: "recvmmsg",
    _L.DT_SYS_SENDFILE: "sendfile",
    _L.DT_SYS_OTHER: "other",
}
_AF_INET6 = 10
_DATAGRAM = _L.DT_DATA_DATAGRAM
_DATA_KIND = _L.DT_REC_DATA
_ERROR_HEAD = _L.DT_DATA_ERROR_HEAD
_ALSO_COPIED = _L.DT_DATA_ALSO_COPIED
_AFTER_ERROR = _L.DT_DATA_AFTER_ERROR
_INGRESS = _L.DT_INGRESS
_COMMS = records._COMMS
#: IPv4 addresses of records (their 16 raw bytes) → text.
_ADDRESSES4: dict[bytes, str] = {}
_build_data_event = positional_builder(DataEvent)
assert [f.name for f in attrs.fields(DataEvent)] == [
    "ts", "ts_mono_ns", "pid", "tid", "comm", "fd", "sock_id", "direction", "syscall", "size", "data",
    "start_mono_ns", "laddr", "lport", "raddr", "rport", "family", "cgroup_id", "conn_id", "sampling", "error_head",
    "also_copied", "after_error", "seq", "transport", "tls",
], "PayloadProbe.decode passes DataEvent's fields positionally: update it"
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_ZERO = _U32.pack(0)
_CONTROLS = struct.Struct("<IIII")
assert _CONTROLS.size == records.ffi.sizeof("struct dt_payload_controls")
log = logging.getLogger(__name__)

#: Default prefix copied per syscall: the smallest size at which every workload of
#: bench/bench_capture_size.py decodes whole (redis replies to a 1,000-GET pipeline come in one
#: write of up to 50 KB; 16 KiB decoded 28-59 % of them, 4 KiB 7-29 %).  Calls are copied only
#: as long as they are: small ones cost the same at any size.
DEFAULT_CAPTURE_BYTES = 65536
#: Heads of error exchanges copied per second at most where the overload sampling copies nothing.
DEFAULT_ERROR_HEADS_PER_SECOND = 200
MAX_CAPTURE_BYTES = _L.DT_PAYLOAD_MAX
class PayloadProbe(OverloadSampling, Probe):
    name = "payload"
    description = "bytes moved on TCP and UDP sockets by read/write/send/recv/…mmsg/sendfile, with a capped prefix"
    object_name = "payload"

    def __init__(self, options: ProbeOptions | None = None, clock=None, *, capture_bytes: int = DEFAULT_CAPTURE_BYTES,
                 cgroup_id: int | None = None, ports: Iterable[int] = (), exclude_self: bool | None = None,
                 overload_sampling: bool = True, busy_cpu: float | None = DEFAULT_BUSY_CPU,
                 accounting: bool = True, error_heads_per_second: int = DEFAULT_ERROR_HEADS_PER_SECOND,
                 accounting_keys: int = _L.DT_L7_SLOTS):
        super().__init__(options, clock)
        #: Count every HTTP, Redis, MySQL and PostgreSQL exchange in the kernel (read_counts); off: only copies.
        self.accounting = accounting
        if error_heads_per_second < 0:
            raise ValueError(f"error_heads_per_second must be 0 or more, got {error_heads_per_second}")
        #: Heads of error exchanges copied per second, on connections the overload sampling leaves out.
        self.error_heads_per_second = error_heads_per_second
        if not 1 <= accounting_keys <= _L.DT_L7_SLOTS:
            raise ValueError(f"accounting_keys must be between 1 and {_L.DT_L7_SLOTS}, got {accounting_keys}")
        #: Keys (edge side, method, status) the kernel counts at once; beyond: uncounted_key_table_full.
        self.accounting_keys = accounting_keys
        self._counters: accounting.L7Counters | None = None
        if not 0 <= capture_bytes <= MAX_CAPTURE_BYTES:
            raise ValueError(f"capture_bytes must be between 0 and {MAX_CAPTURE_BYTES}, got {capture_bytes}")
        self.capture_bytes = capture_bytes
        self.cgroup_id = cgroup_id
        self.ports = set(ports)
        if self.options.port:
            self.ports.add(self.options.port)
        #: Skip this process's own sockets (default: ``options.exclude_self``).
        self.exclude_self = self.options.exclude_self if exclude_self is None else exclude_self
        self.muted = 0
        self._init_overload_sampling(overload_sampling, busy_cpu)
        # The kernel caches each socket's verdict until this changes (see _write_controls).
        self._generation = 0
        self._controls_lock = threading.Lock()

    def configure(self, obj: BpfObject) -> None:
        obj.maps["data_scratch"].max_entries = num_possible_cpus() * _L.DT_SCRATCH_SLOTS
        if self.exclude_self:
            obj.set_constant("self_tgid", os.getpid())
        obj.set_constant("capture_bytes", self.capture_bytes)
        if self.options.pid:
            obj.set_constant("targ_tgid", self.options.pid)
        if self.cgroup_id:
            obj.set_constant("targ_cgroup_id", self.cgroup_id)
        if self.ports:
            obj.set_constant("filter_ports", 1)
        obj.set_constant("account_l7", int(self.accounting))
        obj.set_constant("error_heads_per_second", self.error_heads_per_second)
        accounting.configure(obj, self.accounting_keys)

    def loaded(self, obj: BpfObject) -> None:
        self._counters = accounting.L7Counters(obj.maps)
        self._counters.seed()

    def after_attach(self) -> None:
        # Attached first, then filled: until the first generation is written, nothing is copied.
        ports = self.obj.maps["capture_ports"]
        for port in self.ports:
            ports.update(struct.pack("<H", port), b"\x01")
        self._write_controls(new_generation=True)

    def _write_controls(self, *, new_generation: bool = False) -> None:
        """Write the kernel's live settings; a new generation makes every socket's
        verdict (ports, capture size, muted) be decided again from the maps."""
        with self._controls_lock:
            if new_generation:
                self._generation = self._generation % 0xFFFFFFFF + 1  # never 0: "not set up"
            self.obj.maps["controls"].update(
                _ZERO, _CONTROLS.pack(self.sampling - 1, self._generation, self.sampling.bit_length() - 1, 0))

    def _write_sampling(self) -> None:
        self._write_controls()

    def set_port_capture(self, port: int, capture_bytes: int | None) -> None:
        """Copy ``capture_bytes`` per call on connections with this local or remote
        port, even when muted or not selected (recording); None restores the default.
        Applied live, in the kernel."""
        if self.obj is None:
            raise RuntimeError("probe payload is not started")
        key = struct.pack("<H", port)
        if capture_bytes is None:
            self.obj.maps["port_capture_bytes"].delete(key)
        elif not 0 <= capture_bytes <= MAX_CAPTURE_BYTES:
            raise ValueError(f"capture_bytes must be between 0 and {MAX_CAPTURE_BYTES}, got {capture_bytes}")
        else:
            self.obj.maps["port_capture_bytes"].update(key, struct.pack("<I", capture_bytes))
        self._write_controls(new_generation=True)

    def mute(self, sock_id: int) -> None:
        """Stop copying this socket's payload (it carries nothing we decode)."""
        if self.obj is None:
            return
        try:
            self.obj.maps["muted_socks"].update(_U64.pack(sock_id), b"\x01")
            self._write_controls(new_generation=True)
            self.muted += 1
        except Exception:  # the map is LRU: it cannot be full; anything else is not worth a crash
            pass

    def read_counts(self) -> list[Event]:
        """The exchanges the kernel counted since the last call (RequestCounts), and their
        latencies (LatencyCounts, per edge side and method)."""
        if self.obj is None or self._counters is None or not self.accounting:
            return []
        return accounting.count_events(self._counters)

    def decode(self, raw: bytes) -> Iterable[DataEvent]:
        (kind, pid, ts_mono, sock_id, conn_id, cgroup_id, seq, tid, fd, size, captured, family, lport, rport,
         direction, syscall, sample_key, sample_shift, flags, laddr, raddr, comm) = _FIXED.unpack_from(raw)  # fmt: skip
        if kind != _DATA_KIND:
            return ()
        self._read += 1
        error_head = flags & _ERROR_HEAD
        if not error_head and sample_key & self._mask and self._left_out_as_read(sample_key):
            return ()
        # Positional, in DataEvent's field order (see events.positional_builder): this runs once per record.
        if family == _AF_INET6:
            family = 6
            laddr_text = format_address(6, laddr)
            raddr_text = format_address(6, raddr)
        else:
            family = 4
            laddr_text = _ADDRESSES4.get(laddr)
            if laddr_text is None:
                laddr_text = _address4(laddr)
            raddr_text = _ADDRESSES4.get(raddr)
            if raddr_text is None:
                raddr_text = _address4(raddr)
        name = _COMMS.get(comm)
        if name is None:
            name = records.comm(comm)
        return (
            _build_data_event(
                ts_mono + self.clock.offset_ns,  # ts
                ts_mono,  # ts_mono_ns
                pid,
                tid,
                name,  # comm
                fd,
                sock_id,
                "ingress" if direction == _INGRESS else "egress",
                _SYSCALLS.get(syscall) or str(syscall),
                size,
                raw[_DATA_OFFSET : _DATA_OFFSET + captured],  # data
                ts_mono,  # start_mono_ns
                laddr_text,
                lport,
                raddr_text,
                rport,
                family,
                cgroup_id,
                conn_id,
                # sampling: the sparser of the record's and ours (ours is 1 or more: no max() when 1 << 0)
                1 if error_head else max(1 << sample_shift, self.sampling) if sample_shift else self.sampling,
                bool(error_head),
                bool(flags & _ALSO_COPIED),
                bool(flags & _AFTER_ERROR),
                -1 if error_head else seq,
                "udp" if flags & _DATAGRAM else "tcp",  # transport
                False,  # tls
            ),
        )


def _address4(raw: bytes) -> str:
    """format_address(4, raw), kept in a dict of its own (a lookup there costs less than the
    lru_cache's call); cleared when it holds as many as format_address's cache."""
    if len(_ADDRESSES4) >= 8192:
        _ADDRESSES4.clear()
    text = _ADDRESSES4[raw] = format_address(4, raw)
    return text
