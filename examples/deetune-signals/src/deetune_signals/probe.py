"""The ``signals`` probe: its BPF object, its knobs, and record decoding."""

from __future__ import annotations

import logging
import pathlib
import signal as signal_mod
from typing import Iterable

import attrs

from deetune import resources
from deetune.libbpf import BpfObject
from deetune.probes.base import Probe, ProbeOptions
from deetune_signals import records
from deetune_signals.events import SignalEvent

log = logging.getLogger("deetune_signals")

PACKAGE_BPF = pathlib.Path(__file__).resolve().parent / "_bpf"


def signal_number(value: int | str | None) -> int | None:
    """``10``, ``"10"``, ``"USR1"`` or ``"SIGUSR1"`` → 10; None → None."""
    if value is None or isinstance(value, int):
        number = value
    elif value.isdigit():
        number = int(value)
    else:
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            number = int(signal_mod.Signals[name])
        except KeyError:
            raise ValueError(f"unknown signal {value!r}") from None
    if number is not None and not 0 < number < 65:
        raise ValueError(f"not a signal number (1-64): {number}")
    return number


def signal_name(number: int) -> str:
    try:
        return signal_mod.Signals(number).name
    except ValueError:
        return f"SIG{number}"


@attrs.frozen
class SignalsOptions(ProbeOptions):
    """deetune's probe options plus this probe's own.

    The agent's command line builds plain :class:`ProbeOptions` (``--pid`` …);
    ``sig`` is for the Python API (``SignalsProbe(SignalsOptions(sig="SIGTERM"))``).
    """

    #: Only this signal (number or name); None: all.
    sig: int | None = attrs.field(default=None, converter=signal_number)


class SignalsProbe(Probe):
    name = "signals"
    description = "signals generated (signal/signal_generate): signal, sender, target, result"
    object_name = "signals"
    build_hint = "run `make examples` in the deetune checkout"

    def object_file(self) -> pathlib.Path:
        """Our own object, shipped in this package (not deetune's ``_bpf``)."""
        return PACKAGE_BPF / resources.machine_arch() / f"{self.object_name}.bpf.o"

    def configure(self, obj: BpfObject) -> None:
        # Knobs are `const volatile` globals: set between open and load, after
        # which the verifier sees them as constants and prunes dead branches.
        sig = getattr(self.options, "sig", None)
        if sig:
            obj.set_constant("targ_sig", sig)
        if self.options.pid:
            obj.set_constant("targ_tgid", self.options.pid)

    def decode(self, raw: bytes) -> Iterable[SignalEvent]:
        rec = dict(zip(records.SIGNAL_FIELDS, records.SIGNAL_RECORD.unpack_from(raw)))
        if rec["hdr_kind"] != records.lib.DT_REC_SIGNAL:
            return ()
        event = SignalEvent(
            ts=self.clock.wall(rec["hdr_ts_ns"]),
            ts_mono_ns=rec["hdr_ts_ns"],
            sig=rec["sig"],
            signame=signal_name(rec["sig"]),
            sender_pid=rec["hdr_pid"],
            sender_tid=rec["sender_tid"],
            sender_uid=rec["sender_uid"],
            sender_comm=records.cstr(rec["sender_comm"]),
            target_pid=rec["target_pid"],
            target_comm=records.cstr(rec["target_comm"]),
            group=bool(rec["group"]),
            code=rec["code"],
            si_errno=rec["err"],
            result=records.RESULTS.get(rec["result"], str(rec["result"])),
        )
        return (event,)
