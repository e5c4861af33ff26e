"""TLS plaintext probe: what OpenSSL and Go's crypto/tls encrypt and decrypt, as the payload of
the TCP socket under each TLS connection (see bpf/tls.bpf.c).

Its records have the payload probe's layout and identity (``sock_id``, ``conn_id``), with
``tls`` set: the L7 handler decodes them in place of the socket's ciphertext, which it has the
payload probe stop copying (``mute``), so the same decoders, topology, accounting and recording
apply to encrypted connections.

Where it attaches: uprobes are set on files, and fire in every process that maps the file.  At
start the probe attaches to the libssl of this host's library directories, to every libssl
mapped by a running process (containers' own included, through ``/proc/PID/root``), and to the
executables of running processes that link OpenSSL in (with symbols) or are Go programs using
crypto/tls.  Then, at each exec, it looks at the new program, and at its mappings again shortly
after (libraries loaded at start-up or by dlopen); every 30 seconds it looks at every process.
A program that uses TLS but cannot be probed is logged once by name, counted
(``programs_not_probed``) and listed by ``python -m deetune.agent doctor``.
"""

from __future__ import annotations

import heapq
import struct
import logging
import os
import threading
import time
from typing import Iterable

import attrs

from deetune import accounting as accounting_
from deetune import records
from deetune.events import DataEvent, Event, format_address
from deetune.libbpf import BpfObject, LibbpfError, Link, num_possible_cpus
from deetune.probes import tls_targets
from deetune.probes.base import Probe, ProbeOptions
from deetune.probes.overload import DEFAULT_BUSY_CPU, OverloadSampling
from deetune.probes.tls_targets import Target

log = logging.getLogger("deetune.probes.tls")

_L = records.lib
_FIXED, _FIELDS = records.record_struct("struct dt_data_record", upto="data")
assert _FIELDS[:2] == ("hdr_kind", "hdr_pid") and _FIELDS[-1] == "comm", _FIELDS
_DATA_OFFSET = records.ffi.offsetof("struct dt_data_record", "data")
_HEADER_SIZE = records.ffi.sizeof("struct dt_header")
_CALLS = {
    _L.DT_SYS_SSL_READ: "SSL_read",
    _L.DT_SYS_SSL_WRITE: "SSL_write",
    _L.DT_SYS_GO_TLS_READ: "go_tls_read",
    _L.DT_SYS_GO_TLS_WRITE: "go_tls_write",
}
_AF_INET6 = 10
_CONTROLS = struct.Struct("<II")
assert _CONTROLS.size == records.ffi.sizeof("struct dt_tls_controls")
#: The probe's own counters (enum tls_stat in bpf/tls.bpf.c).
_STAT_NO_SOCKET, _STAT_TIED = 0, 1

#: Plaintext copied per library call: as the payload probe's (its reasons hold here too).
DEFAULT_CAPTURE_BYTES = 65536
#: After an exec, when to look at the process's mappings again (seconds): the dynamic loader maps
#: libraries right after the exec, a program may dlopen libssl later.
EXEC_RESCANS = (0.0, 0.2, 1.0, 5.0)
#: How often every process is looked at again.
RESCAN_SECONDS = 30.0

#: OpenSSL function → (entry program, return program).  ssl_read_internal and ssl_write_internal,
#: probed in place of the functions that wrap them (tls_targets.openssl_probe_points), take the _ex
#: forms' arguments (s, buf, num, &processed).
_OPENSSL_PROGRAMS = {
    "SSL_read": ("ssl_read_enter", "ssl_data_exit"),
    "SSL_read_ex": ("ssl_read_ex_enter", "ssl_data_exit"),
    "ssl_read_internal": ("ssl_read_ex_enter", "ssl_data_exit"),
    "SSL_write": ("ssl_write_enter", "ssl_data_exit"),
    "SSL_write_ex": ("ssl_write_ex_enter", "ssl_data_exit"),
    "ssl_write_internal": ("ssl_write_ex_enter", "ssl_data_exit"),
    "SSL_do_handshake": ("ssl_handshake_enter", "ssl_handshake_exit"),
}
#: Go function → (entry program, program at each RET).
_GO_PROGRAMS = {
    tls_targets.GO_READ: ("go_tls_read_enter", "go_tls_data_exit"),
    tls_targets.GO_WRITE: ("go_tls_write_enter", "go_tls_data_exit"),
    tls_targets.GO_HANDSHAKE: ("go_tls_handshake_enter", "go_tls_handshake_exit"),
}


class Unprobed:
    """A program that uses TLS the probe cannot read, and where it was seen."""

    def __init__(self, target: Target, pid: int | None, command: str):
        self.target = target
        self.pid = pid
        self.command = command

    def describe(self) -> str:
        who = f"{self.command} (pid {self.pid})" if self.pid else self.target.path
        return f"{who}: {self.target.path}: {self.target.reason}"


class TlsProbe(OverloadSampling, Probe):
    name = "tls"
    description = "TLS plaintext of OpenSSL (libssl or linked in) and Go crypto/tls, as their sockets' payload"
    object_name = "tls"
    default = False  # two uprobe traps per TLS call cost the application (docs/tls.md): opt in with --tls

    def __init__(self, options: ProbeOptions | None = None, clock=None, *,
                 capture_bytes: int = DEFAULT_CAPTURE_BYTES, exclude_self: bool | None = None,
                 rescan_seconds: float = RESCAN_SECONDS, system_libraries: bool = True,
                 overload_sampling: bool = True, busy_cpu: float | None = DEFAULT_BUSY_CPU,
                 accounting: bool = True, floor: bool = False):
        super().__init__(options, clock)
        #: Attach programs that return at once, and nothing else (bench/bench_tls.py): the traps' cost.
        self.floor = floor
        self._init_overload_sampling(overload_sampling, busy_cpu)
        #: Count every HTTP, Redis, MySQL and PostgreSQL exchange of the plaintext in the kernel (read_counts).
        self.accounting = accounting
        self._counters: "accounting_.L7Counters | None" = None
        if not 0 <= capture_bytes <= _L.DT_PAYLOAD_MAX:
            raise ValueError(f"capture_bytes must be between 0 and {_L.DT_PAYLOAD_MAX}, got {capture_bytes}")
        self.capture_bytes = capture_bytes
        self.exclude_self = self.options.exclude_self if exclude_self is None else exclude_self
        self.rescan_seconds = rescan_seconds
        #: Attach to the host's own libssl at start (before any process maps it).
        self.system_libraries = system_libraries
        #: Files looked at: (device, inode) → what they offer (None: no TLS we know).
        self._seen: dict[tuple[int, int], Target | None] = {}
        #: Files with probes attached (during the run, kept after it): (device, inode) → (target, links).
        self.attached: dict[tuple[int, int], tuple[Target, list[Link]]] = {}
        #: Programs that use TLS but cannot be probed: (device, inode) → where seen.
        self.unprobed: dict[tuple[int, int], Unprobed] = {}
        self._pending: list[tuple[float, int]] = []  # (when, pid): processes to look at
        self._wake = threading.Condition()
        self._stopping = False
        self._scanner: threading.Thread | None = None
        self._lock = threading.Lock()  # attaching: the scanner thread and start()

    # -- kernel side ------------------------------------------------------------------------
    def configure(self, obj: BpfObject) -> None:
        obj.maps["tls_scratch"].max_entries = num_possible_cpus() * _L.DT_SCRATCH_SLOTS
        if self.exclude_self:
            obj.set_constant("self_tgid", os.getpid())
        obj.set_constant("capture_bytes", self.capture_bytes)
        if self.options.pid:
            obj.set_constant("targ_tgid", self.options.pid)
        if self.options.port:
            obj.set_constant("filter_ports", 1)
        obj.set_constant("account_l7", int(self.accounting))
        accounting_.configure(obj)

    def attach(self, obj: BpfObject) -> None:
        # The tracepoints first: a TLS object is tied to its socket as soon as the uprobes fire.
        for name in ("tls_tie_send", "tls_tie_recv", "tls_sock_close", "tls_exec"):
            if not self.floor or name == "tls_exec":
                obj.programs[name].attach()
        if self.options.port:
            obj.maps["capture_ports"].update(self.options.port.to_bytes(2, "little"), b"\x01")

    def _write_sampling(self) -> None:
        self.obj.maps["controls"].update(b"\0\0\0\0", _CONTROLS.pack(self.sampling - 1, self.sampling.bit_length() - 1))

    def loaded(self, obj: BpfObject) -> None:
        self._counters = accounting_.L7Counters(obj.maps)
        self._counters.seed()

    def after_attach(self) -> None:
        self._write_sampling()
        # Synchronously: when start() returns, the TLS libraries in use are probed.
        if self.system_libraries:
            for path in tls_targets.system_libssl():
                self._consider(path, None)
        self._scan_all()
        self._stopping = False
        self._scanner = threading.Thread(target=self._scan_loop, name="tls-scanner", daemon=True)
        self._scanner.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._scanner is not None:
            self._scanner.join(10)
            self._scanner = None
        super().stop()

    def read_counts(self) -> list[Event]:
        """The exchanges of TLS plaintext the kernel counted since the last call (RequestCounts,
        LatencyCounts): those of HTTP/1, Redis, MySQL and PostgreSQL over TLS, exact whatever the sampling."""
        if self.obj is None or self._counters is None or not self.accounting:
            return []
        return accounting_.count_events(self._counters)

    def set_port_capture(self, port: int, capture_bytes: int | None) -> None:
        """Copy ``capture_bytes`` of plaintext per call on connections with this local or remote
        port, even when not selected (recording); None restores the default.  Applied live."""
        if self.obj is None:
            raise RuntimeError("probe tls is not started")
        key = port.to_bytes(2, "little")
        if capture_bytes is None:
            self.obj.maps["port_capture_bytes"].delete(key)
        elif not 0 <= capture_bytes <= _L.DT_PAYLOAD_MAX:
            raise ValueError(f"capture_bytes must be between 0 and {_L.DT_PAYLOAD_MAX}, got {capture_bytes}")
        else:
            self.obj.maps["port_capture_bytes"].update(key, capture_bytes.to_bytes(4, "little"))

    def counters(self) -> dict[str, int]:
        counts = super().counters()
        if self.obj is not None:
            stats = self.obj.maps["tls_stats"]
            counts["plaintext_without_socket"] = stats.sum_percpu_u64(_STAT_NO_SOCKET.to_bytes(4, "little"))
        counts["programs_not_probed"] = len(self.unprobed)
        return counts

    # -- records ----------------------------------------------------------------------------
    def decode(self, raw: bytes) -> Iterable[Event]:
        kind = int.from_bytes(raw[:4], "little")
        if kind == _L.DT_REC_EXEC and len(raw) >= _HEADER_SIZE:
            self._exec(int.from_bytes(raw[4:8], "little"))
            return ()
        if kind != _L.DT_REC_DATA:
            return ()
        (kind, pid, ts_mono, sock_id, conn_id, cgroup_id, seq, tid, fd, size, captured, family, lport, rport,
         direction, syscall, sample_key, sample_shift, _flags, laddr, raddr, comm) = _FIXED.unpack_from(raw)  # fmt: skip
        self._read += 1
        if self._left_out_as_read(sample_key):
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
                syscall=_CALLS.get(syscall, str(syscall)),
                size=size,
                data=raw[_DATA_OFFSET:_DATA_OFFSET + captured],
                start_mono_ns=ts_mono,
                laddr=format_address(family, laddr),
                lport=lport,
                raddr=format_address(family, raddr),
                rport=rport,
                family=family,
                cgroup_id=cgroup_id,
                conn_id=conn_id,
                seq=seq,
                sampling=max(1 << sample_shift, self.sampling),
                tls=True,
            ),
        )

    # -- finding what to attach to ----------------------------------------------------------
    def _exec(self, pid: int) -> None:
        """A process exec'ed: look at it now and a few times in the next seconds."""
        now = time.monotonic()
        with self._wake:
            for delay in EXEC_RESCANS:
                heapq.heappush(self._pending, (now + delay, pid))
            self._wake.notify()

    def _scan_loop(self) -> None:
        next_full = time.monotonic() + self.rescan_seconds
        while True:
            with self._wake:
                while not self._stopping:
                    now = time.monotonic()
                    due = self._pending[0][0] if self._pending else next_full
                    if min(due, next_full) <= now:
                        break
                    self._wake.wait(min(due, next_full) - now)
                if self._stopping:
                    return
                now = time.monotonic()
                pids = []
                while self._pending and self._pending[0][0] <= now:
                    pids.append(heapq.heappop(self._pending)[1])
            try:
                for pid in dict.fromkeys(pids):
                    self._scan_process(pid)
                if now >= next_full:
                    next_full = now + self.rescan_seconds
                    self._scan_all()
            except Exception as exc:  # a scan must never end the scanner
                log.warning("tls: scanning processes failed: %s", exc)

    def _scan_all(self) -> None:
        for pid in tls_targets.process_ids():
            if self._stopping:
                return
            self._scan_process(pid)

    def _scan_process(self, pid: int) -> None:
        if self.options.pid and pid != self.options.pid:
            return
        if self.exclude_self and pid == os.getpid():
            return
        self._consider(f"/proc/{pid}/exe", pid)
        for path in tls_targets.libssl_in_maps(pid):
            self._consider(path, pid)

    def _consider(self, path: str, pid: int | None) -> None:
        key = tls_targets.file_key(path)
        if key is None or key in self._seen:
            return
        target = tls_targets.inspect(path)
        with self._lock:
            if key in self._seen or self.obj is None:
                return
            self._seen[key] = target
            if target is None:
                return
            if not target.probeable:
                self._unprobeable(key, target, pid)
                return
            try:
                links = self._attach_target(target)
            except LibbpfError as exc:
                self._unprobeable(key, Target(target.path, target.kind, version=target.version,
                                              reason=f"attach failed: {exc}"), pid)
                return
            self.attached[key] = (target, links)
        log.info("tls: probing %s (%s%s, %d probes)", _real(path), target.kind,
                 f" {target.version}" if target.version else "", len(links))

    def _attach_target(self, target: Target) -> list[Link]:
        programs = self.obj.programs
        links: list[Link] = []
        # With --pid, the breakpoints are written into that process only: others mapping the file
        # take no trap.
        pid = self.options.pid or -1

        def attach(name: str, offset: int, retprobe: bool = False) -> None:
            if self.floor:
                name = "tls_floor_exit" if retprobe else "tls_floor_enter"
            links.append(programs[name].attach_uprobe(target.path, offset=offset, pid=pid, retprobe=retprobe))

        try:
            if target.kind == "openssl":
                for point in target.openssl:
                    enter, leave = _OPENSSL_PROGRAMS[point.name]
                    attach(enter, point.offset)
                    attach(leave, point.offset, retprobe=True)
            else:
                for function in target.go:
                    enter, leave = _GO_PROGRAMS[function.name]
                    # The RETs first: a call whose entry was seen is seen to return (go_enter takes
                    # a call still in progress with the same arguments for the same call).
                    for offset in function.returns:
                        attach(leave, offset)
                    attach(enter, function.entry)
        except BaseException:
            for link in links:
                link.close()
            raise
        return links

    def _unprobeable(self, key: tuple[int, int], target: Target, pid: int | None) -> None:
        command = ""
        if pid:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    command = f.read().strip()
            except OSError:
                pass
        entry = self.unprobed[key] = Unprobed(Target(_real(target.path), target.kind, version=target.version,
                                                     reason=target.reason), pid, command)
        log.warning("tls: cannot read the TLS plaintext of %s", entry.describe())


def _real(path: str) -> str:
    """A /proc/PID/exe or /proc/PID/root/… path as the file's own path (when it can be told)."""
    if path.startswith("/proc/") and path.endswith("/exe"):
        try:
            return os.readlink(path)
        except OSError:
            return path
    parts = path.split("/", 4)
    if len(parts) == 5 and parts[1] == "proc" and parts[3] == "root":
        return "/" + parts[4]
    return path


def scan_host() -> tuple[list[Target], list[Unprobed]]:
    """Every TLS library and program of the running processes and the host's library directories,
    split into those the probe can read and those it cannot (for ``doctor``)."""
    seen: dict[tuple[int, int], Target | None] = {}
    probeable: list[Target] = []
    unprobed: list[Unprobed] = []
    candidates: list[tuple[str, int | None]] = [(p, None) for p in tls_targets.system_libssl()]
    for pid in tls_targets.process_ids():
        candidates.append((f"/proc/{pid}/exe", pid))
        candidates.extend((p, pid) for p in tls_targets.libssl_in_maps(pid))
    for path, pid in candidates:
        key = tls_targets.file_key(path)
        if key is None or key in seen:
            continue
        target = seen[key] = tls_targets.inspect(path)
        if target is None:
            continue
        target = attrs.evolve(target, path=_real(path))
        if target.probeable:
            probeable.append(target)
        else:
            command = ""
            if pid:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        command = f.read().strip()
                except OSError:
                    pass
            unprobed.append(Unprobed(target, pid, command))
    return probeable, unprobed


__all__ = ["TlsProbe", "Unprobed", "scan_host"]
