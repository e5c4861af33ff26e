"""Pipeline: probes → handlers → sinks, until a signal or a deadline.

Data flows one way.  Each probe's ring buffers are drained in batches; every
record becomes events (``probe.decode``); each handler may turn an event into
other events (a handler returns the events to pass on, possibly the same one);
every resulting event goes to every sink.

On stop the rings are drained once more, the kernel's emitted/lost counters
are read, every probe is detached and unloaded, and the sinks are closed.

A sink that wants the run's counters while it runs (e.g. to export them as
metrics) defines ``observe_stats(stats: RunStats)``: the pipeline then reads the
kernel's emitted/lost counters of every probe about once per ``stats_interval``
seconds and calls it from its own thread, and once more at stop with the final
counters, before the sinks are closed.  Sinks without the method cost nothing.
"""

from __future__ import annotations

import logging
import select
import signal
import threading
import time
from typing import Callable, Iterable, Protocol, Sequence

import attrs

from deetune.events import Event
from deetune.hostcpu import CpuMeter
from deetune.probes.base import Probe
from deetune.sinks.base import Sink

log = logging.getLogger("deetune.pipeline")

#: When a ring falls behind (a flood begins), the probes are ticked this long after, on the CPU
#: used since: the agent's own CPU is counted in 10 ms clock ticks.
FLOOD_TICK_SECONDS = 0.05

#: A handler sees every event and returns the events to pass on.  A handler
#: with a ``flush()`` method returning events is flushed once at stop.
Handler = Callable[[Event], Iterable[Event]]


@attrs.define
class ProbeStats:
    """What one probe did during a run."""

    name: str
    #: Records decoded in user space.
    records: int = 0
    #: Records the kernel wrote to the ring buffer.
    emitted: int = 0
    #: Records the kernel dropped because the ring buffer was full.
    lost: int = 0
    #: Records user space could not decode (counted, skipped).
    undecodable: int = 0
    #: Records left out while overload sampling was on (payload probe: calls not copied by the
    #: kernel, or copied just before the sampling grew sparser and dropped as they were read;
    #: tcp probe: opens and closes not reported).
    sampled_out: int = 0
    #: The sparsest overload sampling of the run: 1 connection in this many (1: none).
    sparsest_sampling: int = 1
    #: The probe's own counters beyond those above (the tls probe's ``programs_not_probed`` …).
    extra: dict[str, int] = attrs.field(factory=dict)


@attrs.define
class RunStats:
    probes: dict[str, ProbeStats] = attrs.field(factory=dict)
    events: int = 0
    sink_errors: int = 0
    seconds: float = 0.0
    #: Longest time between two drains of the rings: how long the kernel had to hold records
    #: alone (a ring that fills meanwhile loses them), from the epoll timeout and the agent's
    #: own stalls (processing a big batch, waiting for a CPU).
    longest_unread: float = 0.0

    @property
    def lost(self) -> int:
        return sum(p.lost for p in self.probes.values())

    def summary(self) -> str:
        parts = [
            f"{p.name}: {p.records} records, {p.lost} lost" + (f", {p.undecodable} undecodable" if p.undecodable else "")
            + (f", {p.sampled_out} records left out by overload sampling (down to 1 connection in {p.sparsest_sampling})"
               if p.sampled_out else "")
            + "".join(f", {value} {name.replace('_', ' ')}" for name, value in p.extra.items() if value)
            for p in self.probes.values()
        ]
        return (f"{self.events} events in {self.seconds:.1f}s; " + "; ".join(parts)
                + f"; rings unread for at most {self.longest_unread:.2f}s")


class Service(Protocol):
    """Something running beside the pipeline (the HTTP API): started after the
    probes attach, stopped before the sinks close."""

    def start(self) -> object: ...

    def stop(self) -> None: ...


def _mono_time(event: Event) -> int:
    return event.ts_mono_ns


def _cpu_meter() -> CpuMeter | None:
    try:
        return CpuMeter()
    except (OSError, ValueError) as exc:  # no /proc/stat: sampling then follows lost records only
        log.warning("cannot read the host's CPU use (%s): overload sampling follows lost records only", exc)
        return None


class Pipeline:
    def __init__(
        self,
        probes: Sequence[Probe],
        sinks: Sequence[Sink],
        handlers: Sequence[Handler] = (),
        *,
        poll_interval: float = 0.05,
        stats_interval: float = 1.0,
        probe_tick_interval: float = 0.25,
        services: Sequence[Service] = (),
    ):
        self.probes = list(probes)
        #: Started once the probes are attached, stopped before the sinks close
        #: (the HTTP API reads what a sink writes).
        self.services = list(services)
        self._running_services: list[Service] = []
        self.sinks = list(sinks)
        self.handlers = list(handlers)
        self.poll_interval = poll_interval
        #: Seconds between two ``observe_stats`` calls to the sinks that have it.
        self.stats_interval = stats_interval
        #: Seconds between two ``tick(cpu)`` calls to the probes that adapt to load:
        #: short, so that an agent that competes with the applications backs off fast.
        self.probe_tick_interval = probe_tick_interval
        #: At stop, how long to keep reading what the kernel wrote before the stop.
        self.final_drain_seconds = 5.0
        self.stats = RunStats(probes={p.name: ProbeStats(p.name) for p in self.probes})
        self._stop = threading.Event()
        self._last_drain = 0.0
        self._drained_ns: int | None = None  # the rings were read up to here (see _drain_round)
        self._started: list[Probe] = []
        self._closed = False
        self._cpu_meter: CpuMeter | None = None

    # -- control -----------------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`run` to finish (thread- and signal-safe)."""
        self._stop.set()

    def start(self) -> None:
        """Attach every probe; if one fails, detach those already attached and re-raise."""
        try:
            for probe in self.probes:
                probe.start()
                self._started.append(probe)
            for service in self.services:
                service.start()
                self._running_services.append(service)
        except BaseException:
            self._stop_services()
            self._stop_probes()
            raise

    def run(self, duration: float | None = None, *, ready: Callable[[], None] | None = None) -> RunStats:
        """Start, process events until stopped (signal, :meth:`stop`, or ``duration`` seconds), then close."""
        restore = self._install_signal_handlers()
        began = time.monotonic()
        try:
            if not self._started:
                self.start()
            if ready:
                ready()
            deadline = None if duration is None else began + duration
            epoll = select.epoll()
            rings = {}
            try:
                for probe in self._started:
                    for ring in probe.ring_buffers():
                        epoll.register(ring.fd, select.EPOLLIN)
                        rings[ring.fd] = (probe, ring)
                next_stats = time.monotonic() + self.stats_interval
                next_probe_tick = time.monotonic() + self.probe_tick_interval
                flood_tick: float | None = None  # when to tick for a flood that began
                last_flood_tick = float("-inf")
                self._cpu_meter = _cpu_meter()
                behind = False
                while not self._stop.is_set():
                    timeout = self.poll_interval
                    if deadline is not None:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        timeout = min(timeout, remaining)
                    # Probes wake us only when a ring passes its wake-up mark (see
                    # dt_output in bpf/common.bpf.h); otherwise the timeout is the drain
                    # clock.  A ring still above the mark will not wake us again: no sleep.
                    if not behind:
                        epoll.poll(timeout)
                    self._drain_round(rings.values())
                    was_behind, behind = behind, any(ring.behind() for _, ring in rings.values())
                    now = time.monotonic()
                    if (behind and not was_behind and flood_tick is None
                            and now - last_flood_tick >= self.probe_tick_interval):
                        # A flood begins.  A regular tick could come up to a tick interval later
                        # and judge a CPU sample mostly from before it: the probes (whose overload
                        # sampling judges such a tick at once) hear of it on the CPU used from now.
                        self._restart_cpu_sample()
                        flood_tick = now + FLOOD_TICK_SECONDS
                    flood_due = flood_tick is not None and now >= flood_tick
                    if now >= next_probe_tick or flood_due:
                        if flood_due:
                            last_flood_tick = now
                        flood_tick = None
                        next_probe_tick = now + self.probe_tick_interval
                        self._tick_probes()
                    if time.monotonic() >= next_stats:
                        next_stats = time.monotonic() + self.stats_interval
                        self._read_counts_of_probes(rings.values())
                        self._tick_handlers()
                        if self._stats_observers():
                            self._read_counters()
                            self._publish_stats()
                # Whatever the kernel wrote before we stopped is still ours to deliver
                # (bounded in time: on a busy host the rings never stay empty).
                drain_until = time.monotonic() + self.final_drain_seconds
                while self._drain_round(rings.values()) and time.monotonic() < drain_until:
                    pass
                self._read_counts_of_probes(rings.values())
                self._flush_handlers()
            finally:
                epoll.close()
        finally:
            self.stats.seconds = time.monotonic() - began
            self.close()
            restore()
        return self.stats

    def close(self) -> None:
        """Read final counters, detach and unload every probe, close every sink (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for probe in self._read_counters(final=True):
            stats = self.stats.probes[probe.name]
            if stats.lost:
                log.warning("probe %s: %d records lost in the kernel (ring buffer full)", probe.name, stats.lost)
        self._stop_probes()
        self._stop_services()
        self._publish_stats()
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:
                self.stats.sink_errors += 1
                log.error("sink %s failed to close: %s", sink.name, exc)

    # -- internals -----------------------------------------------------------------
    def _stop_services(self) -> None:
        for service in reversed(self._running_services):
            try:
                service.stop()
            except Exception as exc:
                log.error("%s failed to stop: %s", type(service).__name__, exc)
        self._running_services = []

    def _read_counters(self, final: bool = False) -> list[Probe]:
        """Copy every started probe's kernel counters into :attr:`stats`; return the probes read."""
        read = []
        for probe in self._started:
            try:
                counters = probe.counters()
            except Exception as exc:  # the object may be half torn down after an error
                if final:
                    log.warning("cannot read counters of probe %s: %s", probe.name, exc)
                else:
                    log.debug("cannot read counters of probe %s: %s", probe.name, exc)
                continue
            stats = self.stats.probes[probe.name]
            stats.emitted = counters["emitted"]
            stats.lost = counters["lost"]
            stats.sampled_out = counters.get("sampled_out", 0)
            stats.extra = {k: v for k, v in counters.items() if k not in ("emitted", "lost", "sampled_out")}
            stats.sparsest_sampling = getattr(probe, "sparsest_sampling", 1)  # the probe keeps the run's sparsest
            read.append(probe)
        return read

    def _stats_observers(self) -> list[Sink]:
        return [s for s in self.sinks if callable(getattr(s, "observe_stats", None))]

    def _publish_stats(self) -> None:
        """Hand the run's counters to the sinks that observe them."""
        for sink in self._stats_observers():
            try:
                sink.observe_stats(self.stats)
            except Exception as exc:
                self.stats.sink_errors += 1
                log.error("sink %s failed to observe stats: %s", sink.name, exc)

    def _stop_probes(self) -> None:
        for probe in reversed(self._started):
            try:
                probe.stop()
            except Exception as exc:
                log.error("probe %s failed to stop: %s", probe.name, exc)
        self._started = []

    def _drain_round(self, rings) -> int:
        """Take what every ring holds now and emit it in kernel time order.

        Probes report through separate rings, so a connection's close (TCP ring)
        could otherwise be handled before its last payload (payload ring)."""
        began_ns = time.monotonic_ns()
        now = began_ns / 1e9
        if self._last_drain and now - self._last_drain > self.stats.longest_unread:
            self.stats.longest_unread = now - self._last_drain
        self._last_drain = now
        events: list[Event] = []
        sources = 0
        for probe, ring in rings:
            batch = ring.consume()
            if batch:
                sources += 1
                events.extend(self._decode(probe, batch))
        if sources > 1:
            events.sort(key=_mono_time)
        if all(getattr(ring, "caught_up", True) for _, ring in rings):
            self._drained_ns = began_ns  # every record written before then is read (DetailWeigher)
        emit = self._emit_from
        for event in events:
            emit(0, (event,))  # emit(event)
        return len(events)

    def _read_counts_of_probes(self, rings=()) -> None:
        """The kernel's exact counters (what changed since the last read) through the handlers,
        after what the rings hold from before the read: a short-lived client's exec record (its
        name) and the exchanges counted come first."""
        counts: list[Event] = []
        for probe in self._started:
            try:
                counts.extend(probe.read_counts())
            except Exception as exc:  # a probe half torn down, or a plugin's bug: counted, not fatal
                log.warning("probe %s: cannot read its counters: %s", probe.name, exc)
        if rings:
            self._drain_round(rings)
        for event in counts:
            self.emit(event)

    def _decode(self, probe: Probe, batch: list[bytes]) -> list[Event]:
        stats = self.stats.probes[probe.name]
        stats.records += len(batch)
        out: list[Event] = []
        for raw in batch:
            try:
                out.extend(probe.decode(raw))
            except Exception as exc:
                stats.undecodable += 1
                log.debug("probe %s: undecodable record (%d bytes): %s", probe.name, len(raw), exc)
        return out

    def emit(self, event: Event) -> None:
        """Pass one event through the handlers to the sinks."""
        self._emit_from(0, [event])

    def _emit_from(self, first_handler: int, pending: Sequence[Event]) -> None:
        for handler in self.handlers[first_handler:] if first_handler else self.handlers:
            if len(pending) == 1:
                # One event (the usual case): what the handler returns, unless it is not a sequence.
                pending = handler(pending[0])
                if type(pending) is not list and type(pending) is not tuple:
                    pending = list(pending)
            else:
                pending = [out for item in pending for out in handler(item)]
            if not pending:
                return  # (most payload records end in the L7 handler)
        for item in pending:
            self.stats.events += 1
            for sink in self.sinks:
                try:
                    sink.handle(item)
                except Exception as exc:
                    self.stats.sink_errors += 1
                    log.error("sink %s failed on a %s event: %s", sink.name, item.type, exc)

    def _restart_cpu_sample(self) -> None:
        """The next tick's CPU sample begins now."""
        if self._cpu_meter is not None:
            self._cpu_meter.sample()

    def _tick_probes(self) -> None:
        """Probes with a ``tick(cpu)`` adapt to load (the payload probe's overload sampling), told
        how busy the host's CPUs were since the last tick and how much of them the agent took."""
        cpu = self._cpu_meter.sample() if self._cpu_meter is not None else None
        for probe in self._started:
            tick = getattr(probe, "tick", None)
            if tick is not None:
                try:
                    tick(cpu)
                except Exception as exc:  # a probe torn down meanwhile; not worth stopping the run
                    log.debug("probe %s failed on tick: %s", probe.name, exc)

    def _tick_handlers(self) -> None:
        """Handlers and sinks with a ``tick()`` (time-based work: closing windows,
        flushing buffers on a quiet host) run once a second."""
        for index, handler in enumerate(self.handlers):
            drained = getattr(handler, "drained", None)
            if drained is not None and self._drained_ns is not None:
                drained(self._drained_ns)
            tick = getattr(handler, "tick", None)
            if tick is not None:
                self._emit_from(index + 1, list(tick()))
        for sink in self.sinks:
            tick = getattr(sink, "tick", None)
            if tick is not None:
                try:
                    tick()
                except Exception as exc:
                    self.stats.sink_errors += 1
                    log.error("sink %s failed on tick: %s", sink.name, exc)

    def _flush_handlers(self) -> None:
        """Handlers holding state (e.g. requests still waiting for a response) hand it over at stop."""
        for index, handler in enumerate(self.handlers):
            flush = getattr(handler, "flush", None)
            if flush is not None:
                self._emit_from(index + 1, list(flush()))

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum, frame):
            log.info("received %s, stopping", signal.Signals(signum).name)
            self._stop.set()

        for sig in previous:
            signal.signal(sig, on_signal)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore
