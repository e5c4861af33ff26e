"""Overload sampling: what a probe does when the agent cannot keep up with the kernel.

A probe whose kernel side can leave out whole connections (the payload probe: their
calls' bytes; the tcp probe: their opens and closes) mixes in :class:`OverloadSampling`:
the pipeline calls its :meth:`~OverloadSampling.tick` a few times a second with the CPU
use, and it tells the kernel to report 1 connection in N, or all of them again.
"""

from __future__ import annotations

import collections
import logging
import os

from deetune.hostcpu import CpuSample

log = logging.getLogger(__name__)

#: Overload sampling never goes sparser than 1 connection (payload: connection-second) in this many.
SPARSEST_SAMPLING = 1024
#: Seconds without a sign of overload, with room for more work, before overload sampling takes
#: more connections again (as many more as fit: after a burst, full detail is back at once).
CALM_SECONDS = 0.5
#: Cores the agent allows itself while the host has no idle CPU, before it samples: 1 % of a
#: 2-CPU host (0.05 took ~3 % of a saturated 2-CPU host's connections/s: docs/performance.md, section 1).
DEFAULT_BUSY_CPU = 0.02
#: The longest a busy host makes overload sampling wait before it takes more connections.
MAX_CALM_SECONDS = 80
#: Below this share of its CPUs idle (but not busy), a host's idle CPU is the gaps of applications
#: that wait on each other (a client and its server): overload sampling then takes at most twice
#: as many connections at a time, not all the idle CPU would hold (under pgbench, stepping back
#: to full detail at once made the sampling swing between sparse and dense), and only as far as
#: its budget (``busy_cpu``) holds, as on a busy host; the longer waits that bursts on a busy host
#: earned are kept until the host is this idle again.
RELAX_IDLE_SHARE = 0.5
#: The resolution of a process's CPU time (os.times: clock ticks).
OWN_CPU_TICK = 1.0 / os.sysconf("SC_CLK_TCK")
#: Overload sampling judges the CPU use over this long.
CPU_WINDOW_SECONDS = 1.0


def _power_of_two_above(ratio: float) -> int:
    """The smallest power of two, at least 2, that is not below ``ratio``."""
    factor = 2
    while factor < ratio:
        factor *= 2
    return factor


class OverloadSampling:
    """Mixin for a :class:`~deetune.probes.base.Probe` whose kernel side samples connections.

    The probe calls :meth:`_init_overload_sampling` in its constructor, counts the records
    it decodes in ``self._read``, and writes ``self.sampling`` to its kernel side in
    :meth:`_write_sampling`.  Records already in the ring when the sampling grows sparser
    get the same choice as they are read (the kernel's key travels in them): the probe asks
    :meth:`_left_out_as_read` of each.
    """

    def _init_overload_sampling(self, overload_sampling: bool, busy_cpu: float | None) -> None:
        if busy_cpu is not None and busy_cpu <= 0:
            raise ValueError(f"busy_cpu must be more than 0 cores, got {busy_cpu}")
        #: Adapt sampling to the records lost and, on a busy host, to this process's CPU (see
        #: :meth:`tick`); off: lose records instead.
        self.overload_sampling = overload_sampling
        #: Cores this process may use on a host with no idle CPU (None: no limit); see :meth:`tick`.
        self.busy_cpu = busy_cpu
        #: Report 1 connection in this many (1: all); the sparsest of the run.
        self.sampling = 1
        self.sparsest_sampling = 1
        self._mask = 0  # sampling - 1
        self._sampled_out_here = 0
        self._read = self._read_seen = 0  # records user space took from the ring
        self._cpu_window: collections.deque[CpuSample] = collections.deque()
        self._emitted_seen = self._lost_seen = 0
        self._calm = 0.0  # seconds without a sign of overload
        self._calm_needed = float(CALM_SECONDS)  # before the next step back (see tick)
        self._since_relax = float("inf")
        self._settling = False

    def counters(self) -> dict[str, int]:
        """The kernel's counters; ``sampled_out`` also counts the records user space left out
        because they were made just before the sampling grew sparser."""
        counts = super().counters()  # type: ignore[misc]
        counts["sampled_out"] += self._sampled_out_here
        return counts

    def _left_out_as_read(self, sample_key: int) -> bool:
        """Made before the sampling grew sparser and left out now, as the kernel does (counted)."""
        if sample_key & self._mask:
            self._sampled_out_here += 1
            return True
        return False

    def _write_sampling(self) -> None:
        """Tell the kernel side ``self.sampling``."""
        raise NotImplementedError

    def tick(self, cpu: CpuSample | None = None) -> None:
        """A few times a second (the pipeline's clock): overload sampling.

        Two signs of overload make the kernel report fewer connections, in proportion:
        records lost (user space cannot keep up: a tick in which the kernel made 20 times
        the records user space took takes 1 connection in 32), and, over the last
        CPU_WINDOW_SECONDS on a host with no idle CPU, this process using more than
        ``busy_cpu`` cores (its CPU is then taken from the applications: 0.4 cores against a
        budget of 0.05 takes 1 connection in 8); both at once multiply (half the records lost
        while using 0.4 cores against 0.05 takes 1 in 16).  Either way the kernel's copies and
        user space's decoding are spared, and the sampled connections stay whole.  The tick
        after a change only watches, and the CPU is judged again on a whole window after the
        change; but while records are lost, or a ring is past its wake-up mark, the CPU of this
        tick alone is judged: the agent is behind, and waiting a whole window would have it
        decode at full tilt for that long.

        After CALM_SECONDS without a loss and with room for more work (idle CPU for it, or on a
        busy host, room in the budget), it takes as many more connections as fit: all of them at
        once when a burst is over (the host mostly idle), at most twice as many, and within the
        budget, while the host's idle CPU is only the gaps of busy applications (RELAX_IDLE_SHARE).
        On a busy host, a step back that overran the budget soon after makes the next one
        wait twice as long (up to MAX_CALM_SECONDS): few busy connections make the work
        come in bursts, and without this the agent would spend its budget on them over and
        over; only a mostly idle host (RELAX_IDLE_SHARE) resets that wait.  Without ``cpu`` (a caller that does not measure it), a tick counts as a
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
        # Losing records, or about to (a ring past its wake-up mark): the agent is behind and
        # works flat out, so this tick's CPU is judged, not a window that may hold the calm
        # before the flood (or, after a change, nothing yet).
        behind = lost > 0 or any(ring.behind() for ring in self.ring_buffers())  # type: ignore[attr-defined]
        judged = cpu if behind and watching_cpu else window
        competing = judged is not None and judged.host_busy and judged.own > self.busy_cpu
        elapsed = cpu.seconds if cpu is not None else 1.0
        self._since_relax += elapsed
        if window is not None and window.host_idle >= RELAX_IDLE_SHARE * window.host_cores:
            # Mostly idle again: the wait was for bursts on a busy host.  (Not the idle gaps of
            # applications waiting on each other: a host hovering at the busy mark would undo it.)
            self._calm_needed = CALM_SECONDS
        sampling = self.sampling
        if competing and self._since_relax < 2 * self._calm_needed:
            self._calm_needed = min(self._calm_needed * 2, MAX_CALM_SECONDS)
        if lost > 0 or competing:
            # What the kernel made against what user space took: its pace, not the ring's size
            # (a caller that never reads records, as in tests: against what the ring took).
            # Both at once multiply: to take all the kernel made within its budget, the agent
            # would need its CPU times the share of the records it missed.
            taken = read or emitted
            missed = (emitted + lost) / max(taken, 1) if lost > 0 else 1.0
            over_budget = judged.own / self.busy_cpu if competing else 1.0
            factor = _power_of_two_above(missed * over_budget)
            sampling = min(sampling * factor, SPARSEST_SAMPLING)
            self._calm = 0.0
        elif sampling > 1 and (factor := 2 if not watching_cpu else self._room_to_relax(window, cpu, behind)) >= 2:
            self._calm += elapsed
            if self._calm >= self._calm_needed:
                sampling = max(1, sampling // factor)
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

    def _room_to_relax(self, window: CpuSample | None, tick: CpuSample, behind: bool) -> int:
        """Room to take more connections: judged on the last second, or when a burst is over
        (nothing waiting in the rings, idle CPU on this tick) on this tick alone, so that full
        detail is back in about a second rather than after a whole window of calm."""
        room = self._room_for(window)
        if not behind and not tick.host_busy:
            room = max(room, self._room_for(tick))
        if not tick.host_busy and tick.host_idle < RELAX_IDLE_SHARE * tick.host_cores:
            # The gaps of applications waiting on each other: what the agent takes there delays
            # them as on a busy host, so it takes connections back only as far as its budget
            # holds (judged on the last second), and twice as many at a time at most.
            room = min(room, 2, self._room_for(window, budget=True))
        return room

    def _room_for(self, cpu: CpuSample | None, budget: bool = False) -> int:
        """How many times the work would fit (a power of two; 1: no more): in the idle CPU and
        what the agent uses now, or on a busy host (or with ``budget``) in the budget.  None (no
        whole window yet): 1."""
        if cpu is None:
            return 1
        if budget or cpu.host_busy:
            # The process's CPU time comes in clock ticks: a window that shows none used less than
            # one tick, not nothing (taken as nothing, a budget had room for every connection at
            # once, and a host hovering at the busy mark went from 1 in 256 to all of them).
            room = self.busy_cpu / max(cpu.own, OWN_CPU_TICK / cpu.seconds)
        else:
            room = (cpu.host_idle + cpu.own) / max(cpu.own, 1e-6)
        factor = 1
        while factor * 2 <= room and factor < SPARSEST_SAMPLING:
            factor *= 2
        return factor

    def set_sampling(self, one_in: int) -> None:
        """Report only 1 connection in ``one_in`` (a power of two; 1: all), chosen anew every second."""
        if self.obj is None:
            raise RuntimeError(f"probe {self.name} is not started")
        if one_in < 1 or one_in & (one_in - 1):
            raise ValueError(f"sampling must be a power of two, got {one_in}")
        if one_in != self.sampling:
            log.info("%s: overload sampling %s", self.name, f"1 connection in {one_in}" if one_in > 1 else "off")
        self.sampling = one_in
        self._mask = one_in - 1
        self.sparsest_sampling = max(self.sparsest_sampling, one_in)
        self._write_sampling()
