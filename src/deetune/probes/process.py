"""Process lifecycle probe: exec, fork, exit."""

from __future__ import annotations

from typing import Iterable

from deetune import records
from deetune.events import ProcessEvent
from deetune.libbpf import BpfObject
from deetune.probes.base import Probe

_CMDLINE_OFFSET = records.ffi.offsetof("struct dt_process_record", "cmdline")
_FIXED, _FIELDS = records.record_struct("struct dt_process_record", upto="cmdline")
_PHASES = {records.lib.DT_REC_EXEC: "exec", records.lib.DT_REC_FORK: "fork", records.lib.DT_REC_EXIT: "exit"}


def split_wait_status(status: int) -> tuple[int | None, int | None]:
    """(exit code, signal) from a wait(2)-style status."""
    signal = status & 0x7F
    if signal:
        return None, signal
    return (status >> 8) & 0xFF, None


class ProcessProbe(Probe):
    name = "process"
    description = "process exec (with command line), fork and exit (with exit code)"
    object_name = "process"

    def configure(self, obj: BpfObject) -> None:
        if self.options.pid:
            obj.set_constant("targ_tgid", self.options.pid)

    def decode(self, raw: bytes) -> Iterable[ProcessEvent]:
        rec = dict(zip(_FIELDS, _FIXED.unpack_from(raw)))
        phase = _PHASES.get(rec["hdr_kind"])
        if phase is None:
            return ()
        cmdline = raw[_CMDLINE_OFFSET : _CMDLINE_OFFSET + rec["cmdline_len"]]
        exit_code = signal = None
        if phase == "exit":
            exit_code, signal = split_wait_status(rec["exit_code"])
        event = ProcessEvent(
            ts=self.clock.wall(rec["hdr_ts_ns"]),
            ts_mono_ns=rec["hdr_ts_ns"],
            phase=phase,
            pid=rec["hdr_pid"],
            ppid=rec["ppid"],
            comm=records.cstr(rec["comm"]),
            cmdline=" ".join(arg.decode("utf-8", "replace") for arg in cmdline.rstrip(b"\0").split(b"\0")),
            cmdline_truncated=bool(rec["cmdline_truncated"]),
            cgroup_id=rec["cgroup_id"],
            exit_code=exit_code,
            signal=signal,
        )
        return (event,)
