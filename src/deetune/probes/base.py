"""Probe: one BPF object, its knobs, its ring buffers, and record decoding."""

from __future__ import annotations

import logging
import os
import pathlib
import threading
import time
from typing import ClassVar, Iterable

import attrs

from deetune import resources
from deetune.events import Event
from deetune.libbpf import BpfObject, LibbpfError
from deetune.ringbuf import RingBuffer

log = logging.getLogger("deetune.probes")


@attrs.frozen
class ProbeOptions:
    """What the user selected; probes apply it in the kernel where they can."""

    #: Only this process (thread-group id); None: all.
    pid: int | None = None
    #: Only connections with this local or remote port; None: all.
    port: int | None = None
    #: Ring buffer size in bytes (a power of two, a multiple of the page size); None: the object's default.
    ringbuf_bytes: int | None = None
    #: Ignore this process's own sockets (the agent's API and exporters).  The
    #: agent sets it; a tool that observes its own traffic leaves it off.
    exclude_self: bool = False
    #: Only this network namespace (the inode number of its ``/proc/PID/ns/net``); None: all.
    #: Applied in the kernel by every object built with deetune's ``common.bpf.h``.
    netns: int | None = None


class SharedMaps:
    """Maps that several objects of this process use as one (``bpf/local_clients.bpf.h``):
    the first object to load creates the map, the others reuse it; it lives while any probe
    that uses it runs (a duplicate of its descriptor is kept meanwhile)."""

    #: Names of the maps shared this way.
    NAMES = ("dt_local_clients",)

    def __init__(self) -> None:
        self._fds: dict[str, list[int]] = {}  # name → [fd, users]
        self._lock = threading.Lock()

    def before_load(self, obj: BpfObject) -> list[str]:
        """Make the object's shared maps the existing ones; returns the names it uses."""
        used = [name for name in self.NAMES if name in obj.maps]
        with self._lock:
            for name in used:
                entry = self._fds.get(name)
                if entry is not None:
                    obj.maps[name].reuse_fd(entry[0])
        return used

    def after_load(self, obj: BpfObject, names: list[str]) -> None:
        with self._lock:
            for name in names:
                entry = self._fds.get(name)
                if entry is None:
                    self._fds[name] = [os.dup(obj.maps[name].fd), 1]
                else:
                    entry[1] += 1

    def release(self, names: list[str]) -> None:
        with self._lock:
            for name in names:
                entry = self._fds.get(name)
                if entry is None:
                    continue
                entry[1] -= 1
                if entry[1] <= 0:
                    os.close(entry[0])
                    del self._fds[name]


#: The process's shared maps: every probe of the process uses these.
SHARED_MAPS = SharedMaps()


class Clock:
    """Turns kernel CLOCK_MONOTONIC nanoseconds into wall-clock nanoseconds."""

    def __init__(self) -> None:
        self.resync()

    def resync(self) -> None:
        # Python's monotonic clock is CLOCK_MONOTONIC, the one bpf_ktime_get_ns reads.
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def wall(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns


class Probe:
    """Base class of probes.

    A subclass names its BPF object (``object_name`` → ``<object_name>.bpf.o``),
    sets knobs in :meth:`configure`, and turns raw ring-buffer records into
    events in :meth:`decode`.  The pipeline calls :meth:`start`,
    :meth:`ring_buffers`, :meth:`decode`, :meth:`counters` and :meth:`stop`.
    """

    #: Name on the command line (``--probe NAME``).
    name: ClassVar[str] = ""
    #: One-line description for ``deetune.agent plugins``.
    description: ClassVar[str] = ""
    #: BPF object file name without ``.bpf.o``.
    object_name: ClassVar[str] = ""
    #: What to tell the user when the object file is missing.
    build_hint: ClassVar[str] = "build the BPF objects with `make bpf`"
    #: Whether the agent runs it when no ``--probe`` is named (a probe that costs the
    #: applications noticeably, such as uprobes on every TLS call, is asked for by name).
    default: ClassVar[bool] = True

    def __init__(self, options: ProbeOptions | None = None, clock: Clock | None = None):
        self.options = options or ProbeOptions()
        self.clock = clock or Clock()
        self.obj: BpfObject | None = None
        self._rings: list[RingBuffer] = []
        self._shared: list[str] = []

    def scopable_to_netns(self) -> bool:
        """Whether its object can be scoped to one network namespace (``ProbeOptions.netns``):
        objects built against deetune's common.bpf.h have the knob."""
        path = self.object_file()
        if not path.exists():
            return True  # start() says what is missing
        obj = BpfObject.open(path)
        try:
            return "dt_targ_netns" in obj.constants()
        finally:
            obj.close()

    # -- to override ---------------------------------------------------------
    def object_file(self) -> pathlib.Path:
        """The compiled BPF object.  Built-ins ship theirs in ``deetune/_bpf/<arch>/``;
        a third-party probe returns the path of its own package data."""
        return resources.object_path(self.object_name)

    def configure(self, obj: BpfObject) -> None:
        """Set knobs and autoload flags on the opened, not yet loaded object."""

    def attach(self, obj: BpfObject) -> None:
        """Attach the loaded programs: by default each where its section name says.  A probe whose
        programs go where only run time tells (uprobes on files it finds) attaches them itself."""
        obj.attach_all()

    def loaded(self, obj: BpfObject) -> None:
        """After the object is loaded, before its programs attach: fill the maps they need."""

    def after_attach(self) -> None:
        """Called once attached: e.g. snapshot state that predates the probe."""

    def decode(self, raw: bytes) -> Iterable[Event]:
        """Events for one ring-buffer record."""
        raise NotImplementedError

    def read_counts(self) -> Iterable[Event]:
        """The exact counters the probe's kernel side keeps in maps (deetune.accounting), as events
        of what changed since the last call: the pipeline calls it on its tick and once at stop.
        Default: none."""
        return ()

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Open, configure, load and attach; on any failure nothing stays loaded."""
        path = self.object_file()
        if not path.exists():
            raise LibbpfError(f"probe {self.name}: {path} not found: {self.build_hint}")
        obj = BpfObject.open(path)
        shared: list[str] = []
        try:
            if self.options.ringbuf_bytes:
                for m in obj.maps.values():
                    if m.type == 27:
                        m.max_entries = self.options.ringbuf_bytes
            if self.options.netns:
                # Objects built against common.bpf.h have the knob; others cannot be scoped.
                if "dt_targ_netns" not in obj.constants():
                    raise LibbpfError(f"probe {self.name} cannot be scoped to a network namespace: "
                                      f"its object was built without deetune's common.bpf.h")
                obj.set_constant("dt_targ_netns", self.options.netns)
            self.configure(obj)
            shared = SHARED_MAPS.before_load(obj)
            obj.load()
            SHARED_MAPS.after_load(obj, shared)
            self._shared = shared
            self.loaded(obj)
            self.attach(obj)
            self._rings = [RingBuffer(m) for m in obj.maps.values() if m.type == 27]
        except BaseException:
            for ring in self._rings:
                ring.close()
            self._rings = []
            if obj.state == "loaded":
                SHARED_MAPS.release(shared)
            self._shared = []
            obj.close()
            raise
        self.obj = obj
        log.info("probe %s attached: %d programs", self.name, len(obj.links))
        self.after_attach()

    def ring_buffers(self) -> list[RingBuffer]:
        return self._rings

    def counters(self) -> dict[str, int]:
        """Kernel-side counters: ``emitted`` and ``lost`` records (ring full), calls
        ``sampled_out`` (left out by overload sampling, see the payload probe), counts the kernel
        could not make because its table of keys was full (``uncounted_key_table_full``) and
        error heads beyond their rate cap (``error_heads_capped``)."""
        if self.obj is None or "dt_stats" not in self.obj.maps:
            return {"emitted": 0, "lost": 0, "sampled_out": 0}
        stats = self.obj.maps["dt_stats"]
        names = ("emitted", "lost", "sampled_out", "uncounted_key_table_full", "error_heads_capped")
        counts = {name: stats.sum_percpu_u64(index.to_bytes(4, "little"))
                  for index, name in enumerate(names) if index < stats.max_entries}
        counts.setdefault("sampled_out", 0)  # a third-party object built against an older deetune.h
        return counts

    def programs(self):
        return list(self.obj.programs.values()) if self.obj else []

    def stop(self) -> None:
        """Detach and unload (idempotent)."""
        for ring in self._rings:
            ring.close()
        self._rings = []
        if self.obj is not None:
            self.obj.close()
            self.obj = None
            SHARED_MAPS.release(self._shared)
            self._shared = []

    def __enter__(self) -> "Probe":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
