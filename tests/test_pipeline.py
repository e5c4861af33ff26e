"""The pipeline's loop: when probes are ticked."""

from __future__ import annotations

import os
import time

from deetune.events import ProcessEvent, RequestCounts
from deetune.pipeline import FLOOD_TICK_SECONDS, Pipeline


class _Ring:
    """A ring buffer stand-in that holds nothing and falls behind on a schedule."""

    def __init__(self, behind_at: list[tuple[float, float]]):
        self.fd = os.eventfd(0)
        self.behind_at = behind_at  # (from, to) seconds after the first call

        self.began: float | None = None
        self.records: list[bytes] = []

    def consume(self):
        records, self.records = self.records, []
        return records

    def behind(self) -> bool:
        now = time.monotonic()
        if self.began is None:
            self.began = now
        return any(start <= now - self.began < end for start, end in self.behind_at)


class _TickedProbe:
    name = "ticked"

    def __init__(self, ring: _Ring):
        self.ring = ring
        self.ticks: list[tuple[float, object]] = []

    def start(self):
        pass

    def ring_buffers(self):
        return [self.ring]

    def counters(self):
        return {"emitted": 0, "lost": 0}

    def tick(self, cpu):
        self.ticks.append((time.monotonic() - self.ring.began, cpu))

    def stop(self):
        os.close(self.ring.fd)


class _Sink:
    name = "none"

    def handle(self, event):
        pass

    def close(self):
        pass


def test_a_ring_falling_behind_has_the_probes_ticked_at_once_on_the_cpu_since():
    # Regular ticks every 10 s: none in this run.  The ring falls behind at 0.2 s, catches up,
    # and falls behind again: one early tick, FLOOD_TICK_SECONDS after the first, its CPU
    # sample begun when the ring fell behind (not when the run began).
    probe = _TickedProbe(_Ring([(0.2, 0.3), (0.35, 0.5)]))
    Pipeline([probe], [_Sink()], poll_interval=0.01, probe_tick_interval=10.0).run(duration=0.7)
    assert len(probe.ticks) == 1
    when, cpu = probe.ticks[0]
    assert 0.2 + FLOOD_TICK_SECONDS <= when < 0.3
    assert cpu is not None and cpu.seconds < 0.15


def test_a_ring_that_keeps_up_leaves_the_probes_to_their_clock():
    probe = _TickedProbe(_Ring([]))
    Pipeline([probe], [_Sink()], poll_interval=0.01, probe_tick_interval=0.2).run(duration=0.75)
    assert len(probe.ticks) == 3
    assert all(cpu is not None and cpu.seconds >= 0.19 for _, cpu in probe.ticks)


class _CountingProbe(_TickedProbe):
    """A probe whose short-lived client exec'd just before the kernel's counts were read: its
    record is still in the ring when the counts are."""

    name = "counting"

    def __init__(self, ring: _Ring):
        super().__init__(ring)
        self.reads = 0

    def read_counts(self):
        self.reads += 1
        self.ring.records.append(b"exec")
        return [RequestCounts(self.reads, role="client", pid=42, raddr="127.0.0.1", port=3306, protocol="mysql",
                              method="COM_QUERY", status="OK", outcome="ok", count=1)]

    def decode(self, raw):
        return [ProcessEvent(self.reads, phase="exec", pid=42, ppid=1, comm="mariadb")]


class _Recorder(_Sink):
    def __init__(self):
        self.events = []

    def handle(self, event):
        self.events.append(event)


def test_what_the_rings_hold_from_before_a_read_of_the_counts_comes_before_them():
    """A client that exited just before the read is named by its exec record, not "pid-N"."""
    probe, sink = _CountingProbe(_Ring([])), _Recorder()
    Pipeline([probe], [sink], poll_interval=0.01, stats_interval=0.1).run(duration=0.35)
    kinds = [e.type for e in sink.events]
    assert probe.reads >= 3 and kinds.count("request_counts") == probe.reads
    assert kinds == ["process", "request_counts"] * probe.reads
