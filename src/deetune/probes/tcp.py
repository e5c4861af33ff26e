"""TCP connection probe: opens (client and server), closes, failed connects."""

from __future__ import annotations

import logging
import os
import struct
from typing import Iterable

import ipaddress
import time

from deetune import accounting, procnet, records
from deetune.events import ConnectionCounts, ConnectionEvent, Event, failure_reason, format_address
from deetune.libbpf import BpfObject
from deetune.probes.base import Probe, ProbeOptions
from deetune.probes.overload import DEFAULT_BUSY_CPU, OverloadSampling

log = logging.getLogger("deetune.probes.tcp")

_STRUCT, _FIELDS = records.record_struct("struct dt_conn_record")
# decode() unpacks positionally, in this order; a layout change must update it.
assert _FIELDS == (
    "hdr_kind", "hdr_pid", "hdr_ts_ns", "sock_id", "conn_id", "open_ts_ns", "bytes_sent", "bytes_received", "cgroup_id",
    "retransmits", "error", "family", "lport", "rport", "role", "flags", "laddr", "raddr", "comm", "sample_shift",
    "_pad1", "sample_key", "_pad2",
), _FIELDS
_L = records.lib
_PHASES = {_L.DT_REC_CONN_OPEN: "open", _L.DT_REC_CONN_CLOSE: "close", _L.DT_REC_CONN_FAILED: "failed"}
_ROLES = {_L.DT_ROLE_CLIENT: "client", _L.DT_ROLE_SERVER: "server"}
_AF_INET6 = 10
_ZERO = struct.pack("<I", 0)
_LOCAL_CONN = struct.Struct("<16s16sHHHH")
assert _LOCAL_CONN.size == records.ffi.sizeof("struct dt_local_conn")


def _packed(family: int, addr: str) -> bytes:
    """An address as the kernel keeps it for a socket of this family (IPv4: 4 bytes then zeros)."""
    ip = ipaddress.ip_address(addr)
    if family == 6:
        return (ip if ip.version == 6 else ipaddress.IPv6Address(f"::ffff:{ip}")).packed
    return ip.packed.ljust(16, b"\0")
_CONTROLS = struct.Struct("<II")
assert _CONTROLS.size == records.ffi.sizeof("struct dt_tcp_controls")


class TcpProbe(OverloadSampling, Probe):
    """Connections as the kernel's TCP state machine moves them.

    When the agent cannot keep up (records lost, or its CPU over ``busy_cpu`` on a busy
    host), the kernel reports 1 connection in N, opens and closes together, and each
    reported event says how many it stands for (``sampling``); failed connects are sampled
    alike.  See :class:`~deetune.probes.overload.OverloadSampling`.
    """

    name = "tcp"
    description = "TCP connections: open, close (bytes, duration, retransmits, resets), failed connects; IPv4 and IPv6"
    object_name = "tcp"

    def __init__(self, options: ProbeOptions | None = None, clock=None, *, overload_sampling: bool = True,
                 busy_cpu: float | None = DEFAULT_BUSY_CPU):
        super().__init__(options, clock)
        self._init_overload_sampling(overload_sampling, busy_cpu)
        self._preexisting: dict[tuple, procnet.PreexistingConnection] = {}
        self._counts: accounting.CounterMap | None = None

    def configure(self, obj: BpfObject) -> None:
        if self.options.exclude_self:
            obj.set_constant("self_tgid", os.getpid())
        if self.options.pid:
            obj.set_constant("targ_tgid", self.options.pid)
        if self.options.port:
            obj.set_constant("targ_port", self.options.port)

    def _write_sampling(self) -> None:
        self.obj.maps["controls"].update(_ZERO, _CONTROLS.pack(self._mask, self.sampling.bit_length() - 1))

    def after_attach(self) -> None:
        # Taken after attaching so that no connection falls between the two:
        # one that closes in between is reported, just without its owner.
        self._preexisting = procnet.snapshot_connections()
        log.info("%d connections were open before the probe", len(self._preexisting))
        self._counts = accounting.CounterMap(self.obj.maps["dt_conn_counts"], 7, accounting.decode_edge_key)
        self._note_local_clients()

    def _note_local_clients(self) -> None:
        """Clients of this host connected before the probe: listed where the server side's
        accounting finds its local client (bpf/local_clients.bpf.h), as a connect does."""
        table = self.obj.maps["dt_local_clients"]
        for (laddr, lport, raddr, rport), conn in self._preexisting.items():
            if conn.role != "client" or conn.owner is None:
                continue
            try:
                local, remote = _packed(conn.family, laddr), _packed(conn.family, raddr)
            except ValueError:
                continue
            if not (remote == local or ipaddress.ip_address(raddr).is_loopback or raddr.startswith("::ffff:127.")):
                continue
            family = _AF_INET6 if conn.family == 6 else 2
            key = _LOCAL_CONN.pack(local, remote, lport, rport, family, 0)
            try:
                table.update(key, struct.pack("<I", conn.owner.pid))
            except Exception as exc:  # a full table: those servers name their clients by address
                log.debug("cannot list a local client: %s", exc)
                return

    def read_counts(self) -> list[Event]:
        """The connections the kernel counted per edge side since the last call."""
        if self.obj is None or self._counts is None:
            return []
        ts, mono = time.time_ns(), time.monotonic_ns()
        return [
            ConnectionCounts(
                ts, ts_mono_ns=mono, role=edge.role, pid=edge.pid, peer_pid=edge.peer_pid, cgroup_id=edge.cgroup_id,
                raddr=edge.raddr, port=edge.port, protocol="tcp", opened=opened, closed=closed, failed=failed,
                bytes_sent=sent, bytes_received=received, retransmits=retransmits, resets=resets,
            )
            for edge, (opened, closed, failed, sent, received, retransmits, resets) in self._counts.read()
        ]

    def decode(self, raw: bytes) -> Iterable[ConnectionEvent]:
        (kind, pid, ts_mono, sock_id, conn_id, open_ts, bytes_sent, bytes_received, cgroup_id, retransmits, error,
         family, lport, rport, role, flags, laddr, raddr, comm, sample_shift, _, sample_key, _) = _STRUCT.unpack_from(raw)  # fmt: skip
        phase = _PHASES.get(kind)
        if phase is None:
            return ()
        self._read += 1
        if self._left_out_as_read(sample_key):
            return ()
        sampling = max(1 << sample_shift, self.sampling)
        family = 6 if family == _AF_INET6 else 4
        laddr = format_address(family, laddr)
        raddr = format_address(family, raddr)
        comm = records.comm(comm)
        role = _ROLES.get(role, "unknown")
        preexisting = bool(flags & _L.DT_CONN_OPEN_UNSEEN)
        if preexisting:
            known = self._preexisting.pop((laddr, lport, raddr, rport), None)
            if known is None:
                return ()  # opened and closed while we attached, or not ours to report
            role = known.role
            if known.owner:
                pid, comm = known.owner.pid, known.owner.comm
            if self.options.pid and pid != self.options.pid:
                return ()
        reset = None
        if flags & _L.DT_CONN_RESET_RECEIVED:
            reset = "received"
        elif flags & _L.DT_CONN_RESET_SENT:
            reset = "sent"
        closed = phase == "close"
        event = ConnectionEvent(
            ts=ts_mono + self.clock.offset_ns,
            ts_mono_ns=ts_mono,
            phase=phase,
            role=role,
            pid=pid,
            comm=comm,
            laddr=laddr,
            lport=lport,
            raddr=raddr,
            rport=rport,
            family=family,
            sock_id=sock_id,
            conn_id=conn_id,
            cgroup_id=cgroup_id,
            bytes_sent=bytes_sent if closed else None,
            bytes_received=bytes_received if closed else None,
            duration_ns=(ts_mono - open_ts) if closed and open_ts else None,
            retransmits=retransmits if closed else None,
            reset=reset if closed else None,
            preexisting=preexisting,
            error=failure_reason(error) if phase == "failed" else None,
            sampling=sampling,
        )
        return (event,)
