"""Socket payload probe: bytes moved by read/write/send/recv-family calls on TCP sockets."""

from __future__ import annotations

import collections
import logging
import os
import struct
import threading
from typing import Iterable

from deetune import records
from deetune.events import DataEvent, format_address
from deetune.hostcpu import CpuSample
from deetune.libbpf import BpfObject, num_possible_cpus
from deetune.probes.base import Probe, ProbeOptions

_L = records.lib
_FIXED, _FIELDS = records.record_struct("struct dt_data_record", upto="data")
# decode() unpacks positionally, in this order; a layout change must update it.
assert _FIELDS == (
    "hdr_kind", "hdr_pid", "hdr_ts_ns", "sock_id", "cgroup_id", "tid", "fd", "size", "captured",
    "family", "lport", "rport", "direction", "syscall", "sample_key", "laddr", "raddr", "comm",
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
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_ZERO = _U32.pack(0)
_CONTROLS = struct.Struct("<II")
assert _CONTROLS.size == records.ffi.sizeof("struct dt_payload_controls")
log = logging.getLogger(__name__)

#: Default prefix copied per syscall.
DEFAULT_CAPTURE_BYTES = 4096
MAX_CAPTURE_BYTES = _L.DT_PAYLOAD_MAX
#: Overload sampling never goes sparser than 1 connection-second in this many.
SPARSEST_SAMPLING = 1024
#: Seconds without a lost record before overload sampling takes twice as many connections again.
CALM_SECONDS = 5
#: Cores the agent allows itself while the host has no idle CPU, before it samples.
DEFAULT_BUSY_CPU = 0.05
#: The longest a busy host makes overload sampling wait before it takes more connections.
MAX_CALM_SECONDS = 80
#: Overload sampling judges the CPU use over this long.
CPU_WINDOW_SECONDS = 1.0


def _power_of_two_above(ratio: float) -> int:
    """The smallest power of two, at least 2, that is not below ``ratio``."""
    factor = 2
    while factor < ratio:
        factor *= 2
    return factor


class PayloadProbe(Probe):
    name = "payload"
    description = "bytes moved on TCP sockets by read/write/send/recv/…mmsg/sendfile, with a capped prefix"
    object_name = "payload"

    def __init__(self, options: ProbeOptions | None = None, clock=None, *, capture_bytes: int = DEFAULT_CAPTURE_BYTES,
                 cgroup_id: int | None = None, ports: Iterable[int] = (), exclude_self: bool | None = None,
                 overload_sampling: bool = True, busy_cpu: float | None = DEFAULT_BUSY_CPU):
        super().__init__(options, clock)
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
        #: Adapt sampling to the records lost and, on a busy host, to this process's CPU (see
        #: :meth:`tick`); off: lose records instead.
        self.overload_sampling = overload_sampling
        if busy_cpu is not None and busy_cpu <= 0:
            raise ValueError(f"busy_cpu must be more than 0 cores, got {busy_cpu}")
        #: Cores this process may use on a host with no idle CPU (None: no limit); see :meth:`tick`.
        self.busy_cpu = busy_cpu
        #: Copy 1 connection in this many (1: all); the sparsest of the run.
        self.sampling = 1
        self.sparsest_sampling = 1
        self._mask = 0  # sampling - 1, also applied to the records already in the ring
        self._sampled_out_here = 0
        self._read = self._read_seen = 0  # records user space took from the ring
        self._cpu_window: collections.deque[CpuSample] = collections.deque()
        # The kernel caches each socket's verdict until this changes (see _write_controls).
        self._generation = 0
        self._controls_lock = threading.Lock()
        self._emitted_seen = self._lost_seen = 0
        self._calm = 0.0  # seconds without a sign of overload
        self._calm_needed = float(CALM_SECONDS)  # before the next step back (see tick)
        self._since_relax = float("inf")
        self._settling = False

    def configure(self, obj: BpfObject) -> None:
        obj.maps["data_scratch"].max_entries = num_possible_cpus()
        if self.exclude_self:
            obj.set_constant("self_tgid", os.getpid())
        obj.set_constant("capture_bytes", self.capture_bytes)
        if self.options.pid:
            obj.set_constant("targ_tgid", self.options.pid)
        if self.cgroup_id:
            obj.set_constant("targ_cgroup_id", self.cgroup_id)
        if self.ports:
            obj.set_constant("filter_ports", 1)

    def counters(self) -> dict[str, int]:
        """The kernel's counters; ``sampled_out`` also counts the records user space left out
        because they were copied just before the sampling grew sparser."""
        counts = super().counters()
        counts["sampled_out"] += self._sampled_out_here
        return counts

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
            self.obj.maps["controls"].update(_ZERO, _CONTROLS.pack(self.sampling - 1, self._generation))

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

    def tick(self, cpu: CpuSample | None = None) -> None:
        """A few times a second (the pipeline's clock): overload sampling.

        Two signs of overload make the kernel copy fewer connections, in proportion:
        records lost (user space cannot keep up: a tick in which the kernel made 20 times
        the records user space took takes 1 connection in 32), and, over the last
        CPU_WINDOW_SECONDS on a host with no idle CPU, this process using more than
        ``busy_cpu`` cores (its CPU is then taken from the applications: 0.4 cores against a
        budget of 0.05 takes 1 connection in 8).  Either way the copies and the decoding are
        spared, and the sampled connections stay whole; records already in the ring get the
        same choice as they are read.  The tick after a change only watches, and the CPU is
        judged again on a whole window after the change.

        After CALM_SECONDS without a loss and with room for twice the work (idle CPU for it,
        or on a busy host, half the budget used), it takes twice as many connections again.
        On a busy host, a step back that overran the budget soon after makes the next one
        wait twice as long (up to MAX_CALM_SECONDS): few busy connections make the work
        come in bursts, and without this the agent would spend its budget on them over and
        over.  Without ``cpu`` (a caller that does not measure it), a tick counts as a
        second and only lost records count."""
        if self.obj is None or not self.overload_sampling:
            return
        counters = self.counters()
        emitted, lost = counters["emitted"] - self._emitted_seen, counters["lost"] - self._lost_seen
        self._emitted_seen, self._lost_seen = counters["emitted"], counters["lost"]
        read, self._read_seen = self._read - self._read_seen, self._read
        watching_cpu = cpu is not None and self.busy_cpu is not None
        window = self._windowed(cpu) if watching_cpu else None
        if self._settling:
            self._settling = False
            return
        competing = window is not None and window.host_busy and window.own > self.busy_cpu
        elapsed = cpu.seconds if cpu is not None else 1.0
        self._since_relax += elapsed
        if window is not None and not window.host_busy:
            self._calm_needed = CALM_SECONDS  # idle CPU again: the wait was for bursts on a busy host
        sampling = self.sampling
        if competing and self._since_relax < 2 * self._calm_needed:
            self._calm_needed = min(self._calm_needed * 2, MAX_CALM_SECONDS)
        if lost > 0 or competing:
            # What the kernel made against what user space took: its pace, not the ring's size
            # (a caller that never reads records, as in tests: against what the ring took).
            taken = read or emitted
            factor = max(_power_of_two_above((emitted + lost) / max(taken, 1)) if lost > 0 else 1,
                         _power_of_two_above(window.own / self.busy_cpu) if competing else 1)
            sampling = min(sampling * factor, SPARSEST_SAMPLING)
            self._calm = 0.0
        elif sampling > 1 and (not watching_cpu or window is not None and self._room_to_double(window)):
            self._calm += elapsed
            if self._calm >= self._calm_needed:
                sampling //= 2
                self._calm = 0.0
                self._since_relax = 0.0
        else:
            self._calm = 0.0
        if sampling != self.sampling:
            self.set_sampling(sampling)
            self._settling = True
            self._cpu_window.clear()  # judge the CPU again on time after the change only

    def _windowed(self, cpu: CpuSample) -> CpuSample | None:
        """The CPU use over the last CPU_WINDOW_SECONDS or so (one busy tick is no trend);
        None until the samples since the last change cover that long."""
        window = self._cpu_window
        window.append(cpu)
        while len(window) > 1 and sum(s.seconds for s in window) - window[0].seconds >= CPU_WINDOW_SECONDS:
            window.popleft()
        seconds = sum(s.seconds for s in window)
        if seconds < CPU_WINDOW_SECONDS * 0.99:
            return None
        return CpuSample(seconds=seconds, host_cores=cpu.host_cores,
                         host_idle=sum(s.host_idle * s.seconds for s in window) / seconds,
                         own=sum(s.own * s.seconds for s in window) / seconds)

    def _room_to_double(self, cpu: CpuSample) -> bool:
        """Would twice the work fit: in the idle CPU, or on a busy host in the budget?"""
        if cpu.host_busy:
            return cpu.own * 2 <= self.busy_cpu
        return cpu.host_idle >= cpu.own

    def set_sampling(self, one_in: int) -> None:
        """Copy only 1 connection in ``one_in`` (a power of two; 1: all), chosen anew every second."""
        if self.obj is None:
            raise RuntimeError("probe payload is not started")
        if one_in < 1 or one_in & (one_in - 1):
            raise ValueError(f"sampling must be a power of two, got {one_in}")
        if one_in != self.sampling:
            log.info("payload: overload sampling %s", f"1 connection in {one_in}" if one_in > 1 else "off")
        self.sampling = one_in
        self._mask = one_in - 1
        self.sparsest_sampling = max(self.sparsest_sampling, one_in)
        self._write_controls()

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

    def decode(self, raw: bytes) -> Iterable[DataEvent]:
        (kind, pid, ts_mono, sock_id, cgroup_id, tid, fd, size, captured, family, lport, rport,
         direction, syscall, sample_key, laddr, raddr, comm) = _FIXED.unpack_from(raw)  # fmt: skip
        if kind != _L.DT_REC_DATA:
            return ()
        self._read += 1
        if sample_key & self._mask:
            # Copied before the sampling grew sparser: left out now, as the kernel does.
            self._sampled_out_here += 1
            return ()
        family = 6 if family == _AF_INET6 else 4
        return (
            DataEvent(
                ts=ts_mono + self.clock.offset_ns,
                ts_mono_ns=ts_mono,
                pid=pid,
                tid=tid,
                comm=records.comm(comm),
                fd=fd,
                sock_id=sock_id,
                direction="ingress" if direction == _L.DT_INGRESS else "egress",
                syscall=_SYSCALLS.get(syscall, str(syscall)),
                size=size,
                data=raw[_DATA_OFFSET : _DATA_OFFSET + captured],
                start_mono_ns=ts_mono,
                laddr=format_address(family, laddr),
                lport=lport,
                raddr=format_address(family, raddr),
                rport=rport,
                family=family,
                cgroup_id=cgroup_id,
            ),
        )
