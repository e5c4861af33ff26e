"""The pipeline's loop: when probes are ticked."""

from __future__ import annotations

import os
import time

from deetune.pipeline import FLOOD_TICK_SECONDS, Pipeline


class _Ring:
    """A ring buffer stand-in that holds nothing and falls behind on a schedule."""

    def __init__(self, behind_at: list[tuple[float, float]]):
        self.fd = os.eventfd(0)
        self.behind_at = behind_at  # (from, to) seconds after the first call

        self.began: float | None = None

    def consume(self):
        return []

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
