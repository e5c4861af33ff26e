"""The host CPU meter behind overload sampling, on /proc/stat files written here and on the real one."""

from __future__ import annotations

import os
import time

import pytest

from deetune.hostcpu import CpuMeter, CpuSample

_STAT = """cpu  {user} 0 {system} {idle} {iowait} 0 {softirq} {steal} 0 0
cpu0 1 0 1 1 0 0 0 0 0 0
cpu1 1 0 1 1 0 0 0 0 0 0
intr 0
"""


def write_stat(path, **ticks):
    values = dict(user=0, system=0, idle=0, iowait=0, softirq=0, steal=0)
    values.update(ticks)
    path.write_text(_STAT.format(**values))


def test_idle_cores_are_the_idle_share_of_the_cpus_counted_in_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, user=1000, idle=1000)
    meter = CpuMeter(str(stat))
    assert meter.cores == 2
    # 200 ticks passed: 150 busy (user, system, softirq, steal), 50 idle or iowait.
    write_stat(stat, user=1060, system=40, softirq=30, steal=20, idle=1040, iowait=10)
    time.sleep(0.05)  # os.times().elapsed moves in 10 ms ticks: no tick, no sample
    sample = meter.sample()
    assert sample.host_cores == 2
    assert sample.host_idle == pytest.approx(0.5)
    assert sample.host_busy is False  # 0.5 idle cores is 25 % of the host
    write_stat(stat, user=1255, system=40, softirq=30, steal=20, idle=1055, iowait=10)
    time.sleep(0.05)  # os.times().elapsed moves in 10 ms ticks: no tick, no sample
    sample = meter.sample()
    assert sample.host_idle == pytest.approx(2 * 15 / 210)
    assert sample.host_busy is True


def test_own_cpu_is_this_process_and_nothing_passed_says_nothing(tmp_path):
    stat = tmp_path / "stat"
    write_stat(stat, user=10, idle=10)
    meter = CpuMeter(str(stat))
    assert meter.sample() is None  # /proc/stat did not move
    write_stat(stat, user=20, idle=20)
    began, wall = time.process_time(), time.monotonic()
    # Spin for 1 s of this process's CPU: os.times() counts in 10 ms ticks, and over 0.2 s one
    # tick more of CPU than of wall time read as 1.05 cores.  The wall time it took is longer
    # when other processes share the CPUs.
    while time.process_time() - began < 1.0:
        pass
    wall = time.monotonic() - wall
    sample = meter.sample()
    assert sample.seconds == pytest.approx(wall, abs=0.03)
    assert sample.own == pytest.approx(1.0 / wall, abs=0.05)


def test_the_busy_threshold_is_a_tenth_of_the_cpus():
    assert CpuSample(seconds=1, host_cores=40, host_idle=3.9, own=0).host_busy
    assert not CpuSample(seconds=1, host_cores=40, host_idle=4.0, own=0).host_busy


def test_the_real_proc_stat_reads():
    meter = CpuMeter()
    assert meter.cores == os.cpu_count()
    time.sleep(0.05)
    sample = meter.sample()
    assert sample is not None and 0 <= sample.host_idle <= meter.cores
