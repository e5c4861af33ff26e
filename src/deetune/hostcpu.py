"""How busy the host's CPUs are, and how much of them this process takes.

The payload probe's overload sampling uses it to tell "the agent uses CPU the host
has spare" (fine) from "the agent competes with the applications" (sample more).
"""

from __future__ import annotations

import os

import attrs

#: The host counts as busy while less than this share of its CPUs is idle.
BUSY_IDLE_SHARE = 0.10


@attrs.frozen
class CpuSample:
    """CPU use over one interval, in cores (1.0: one CPU the whole interval)."""

    seconds: float
    host_cores: int
    #: Cores the host left idle (idle and iowait; steal counts as busy).
    host_idle: float
    #: Cores this process used (all its threads, user and system).
    own: float

    @property
    def host_busy(self) -> bool:
        """No spare CPU: whatever the agent uses, the applications wait for."""
        return self.host_idle < BUSY_IDLE_SHARE * self.host_cores


def _host_times(path: str) -> tuple[int, int]:
    """(idle, total) clock ticks of all CPUs since boot, from /proc/stat's first line."""
    with open(path, "rb") as f:
        fields = f.readline().split()
    if fields[:1] != [b"cpu"]:
        raise ValueError(f"{path}: no cpu line")
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user and nice]
    ticks = [int(v) for v in fields[1:9]]
    return ticks[3] + ticks[4], sum(ticks)


class CpuMeter:
    """``sample()`` returns the CPU use since the previous call (the first one: since creation)."""

    def __init__(self, stat_path: str = "/proc/stat"):
        self.stat_path = stat_path
        with open(stat_path, "rb") as f:
            # The CPUs /proc/stat's total line adds up (a container's cpu_count may be fewer).
            self.cores = sum(1 for line in f if line[:3] == b"cpu" and line[3:4].isdigit()) or 1
        self._last = self._read()

    def _read(self) -> tuple[int, int, float, float]:
        idle, total = _host_times(self.stat_path)
        times = os.times()
        return idle, total, times.user + times.system, times.elapsed

    def sample(self) -> CpuSample | None:
        """None when no time has passed or /proc/stat went backwards (nothing to say)."""
        now = self._read()
        idle0, total0, own0, wall0 = self._last
        idle1, total1, own1, wall1 = now
        self._last = now
        seconds = wall1 - wall0
        if seconds <= 0 or total1 <= total0:
            return None
        return CpuSample(
            seconds=seconds,
            host_cores=self.cores,
            host_idle=self.cores * (idle1 - idle0) / (total1 - total0),
            own=(own1 - own0) / seconds,
        )
