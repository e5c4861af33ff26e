"""The reference agent: ``python -m deetune.agent``.

Usage::

    python -m deetune.agent [--probe NAME]... [--sink SPEC]... [--duration SECONDS]
                            [--pid PID] [--port PORT] [--api [HOST:PORT]] [-v]
    python -m deetune.agent doctor      # preflight checks; non-zero exit when it cannot run
    python -m deetune.agent plugins     # probes, decoders and sinks, built-in and installed

Exit codes: 0 done, 1 runtime failure (e.g. verifier rejection), 2 bad usage or
missing privileges/prerequisites.  Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from typing import Sequence

from deetune import doctor
from deetune.api import DEFAULT_API_HOST, DEFAULT_API_PORT
from deetune.cli_types import parse_duration, positive_seconds, seconds_between
from deetune.libbpf import LibbpfError
from deetune.pipeline import Pipeline
from deetune.place import Place, PlaceError
from deetune.plugins import PluginImportError, Plugins, UnknownPluginError
from deetune.probes.base import Clock, ProbeOptions
from deetune.probes.overload import DEFAULT_BUSY_CPU, OverloadSampling
from deetune.probes.payload import DEFAULT_CAPTURE_BYTES, MAX_CAPTURE_BYTES, PayloadProbe
from deetune.probes.tls import TlsProbe
from deetune.services import EndpointMapping, MappingError, ResolvedNames, ServiceResolver
from deetune.sinks.base import SinkError, parse_sink_spec
from deetune.topology.aggregator import TopologyAggregator
from deetune.topology.store import StoreError, StoreInUse, StoreSink, TopologyStore

log = logging.getLogger("deetune.agent")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

#: Where the agent keeps its topology history unless told otherwise.
DEFAULT_STORE = "/var/lib/deetune/deetune.db"
#: How much the agent lowers its own CPU priority by default (see --nice).
DEFAULT_NICE = 10


class UsageError(Exception):
    """Bad arguments or an environment the agent cannot run in (exit code 2)."""


#: Ring buffer sizes a probe may ask for: the kernel takes larger ones, but each is memory locked
#: for the run and mapped into the agent (a 2 GiB ring took the agent 30 s to set up and tear down).
MIN_RINGBUF, MAX_RINGBUF = 4096, 256 << 20
#: The aggregation window: a tenth of a second to a day.
MIN_WINDOW, MAX_WINDOW = 0.1, 86400.0


def _ringbuf_size(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() else -1
    if not MIN_RINGBUF <= value <= MAX_RINGBUF or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"must be a power of two from {MIN_RINGBUF} to {MAX_RINGBUF} (256 MiB): {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port (1-65535): {text!r}")
    return int(text)


def _capture_bytes(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_CAPTURE_BYTES:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_CAPTURE_BYTES}: {text!r}")
    return int(text)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _exchanges_per_edge(text: str) -> int | None:
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a count or 'all': {text!r}")
    return int(text)


def _nice(text: str) -> int | str:
    if text == "idle":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 19:
        raise argparse.ArgumentTypeError(f"must be 0 to 19 or 'idle': {text!r}")
    return value


def _busy_cpu(text: str) -> float | None:
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of cores above 0, or 'off': {text!r}")
    return value


def _netns_path(text: str) -> str:
    """A network namespace by name (``ip netns``: /run/netns/NAME) or path (/proc/PID/ns/net)."""
    path = text if "/" in text else f"/run/netns/{text}"
    if not os.path.exists(path):
        raise argparse.ArgumentTypeError(f"no network namespace at {path}")
    return path


def enter_netns(path: str) -> int:
    """Move this process into the network namespace at ``path`` (before any thread or socket
    exists: /proc/net, the API and the exporters then belong to it) and return its inode number,
    the probes' scope."""
    import ctypes

    clone_newnet = 0x40000000
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise UsageError(f"--netns {path}: {exc.strerror}") from None
    try:
        inode = os.fstat(fd).st_ino
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, clone_newnet) != 0:
            err = ctypes.get_errno()
            raise UsageError(f"--netns {path}: cannot enter it: {os.strerror(err)}")
    finally:
        os.close(fd)
    return inode


def _network(text: str):
    import ipaddress

    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address or CIDR: {text!r}") from None


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in one line with exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m deetune.agent",
        description="Watch processes and TCP connections on this host through eBPF.",
        epilog="Subcommands: 'doctor' (preflight checks), 'plugins' (list probes, decoders, sinks).",
    )
    parser.add_argument("--probe", action="append", metavar="NAME",
                        help="probe to run (repeatable; default: every probe but tls)")
    parser.add_argument("--tls", action="store_true",
                        help="also read TLS plaintext (the tls probe: uprobes on OpenSSL and Go crypto/tls; "
                             "each TLS call then costs the application a few microseconds, docs/tls.md)")
    parser.add_argument(
        "--sink", action="append", metavar="SPEC",
        help="where events go: console, jsonl:PATH, jsonl:-, prometheus[:HOST:PORT], otlp[:URL], store:PATH (repeatable; default: console)"
    )
    parser.add_argument("--duration", type=positive_seconds, metavar="SECONDS", help="stop after this long (default: until SIGINT/SIGTERM)")
    parser.add_argument("--pid", type=_pid, help="only this process")
    parser.add_argument("--port", type=_port, help="only connections with this local or remote port")
    parser.add_argument("--netns", type=_netns_path, metavar="NAME|PATH",
                        help="act as the host of one network namespace (an `ip netns` name or /proc/PID/ns/net): "
                             "the agent enters it and sees only its sockets and processes")
    parser.add_argument("--host-name", metavar="NAME",
                        help="this host's name on everything exported (default $DEETUNE_HOST_NAME, else the hostname)")
    parser.add_argument("--label", action="append", default=[], metavar="NAME=VALUE",
                        help="a label of this host on everything exported, e.g. idc=bj1 (repeatable; "
                             "also $DEETUNE_LABELS=idc=bj1,zone=a)")
    parser.add_argument("--ringbuf-size", type=_ringbuf_size, metavar="BYTES",
                        help=f"ring buffer size per probe (a power of two, {MIN_RINGBUF} to {MAX_RINGBUF})")
    parser.add_argument(
        "--capture-bytes", type=_capture_bytes, default=DEFAULT_CAPTURE_BYTES, metavar="N",
        help=f"payload prefix copied per syscall (default {DEFAULT_CAPTURE_BYTES}, at most {MAX_CAPTURE_BYTES})",
    )
    parser.add_argument(
        "--no-overload-sampling", dest="overload_sampling", action="store_false",
        help="when the agent cannot keep up, lose records at random instead of reporting fewer "
             "connections, whole (default: sample, and say so on stop)",
    )
    parser.add_argument(
        "--busy-cpu", type=_busy_cpu, default=DEFAULT_BUSY_CPU, metavar="CORES",
        help=f"on a host with no idle CPU, the agent keeps itself under this many cores by reporting fewer "
             f"connections and copying the payload of fewer ('off': no limit; default {DEFAULT_BUSY_CPU})",
    )
    parser.add_argument("--protocol", action="append", metavar="NAME", help="decode only these protocols (repeatable; default: all)")
    parser.add_argument("--emit-data", action="store_true", help="also send raw payload events (type data) to the sinks")
    parser.add_argument(
        "--store", default=DEFAULT_STORE, metavar="PATH",
        help=f"SQLite file keeping the topology and recent exchanges (default {DEFAULT_STORE})",
    )
    parser.add_argument("--no-store", action="store_true", help="keep no topology history (and serve no API)")
    parser.add_argument("--retention", type=parse_duration, default=7 * 86400, metavar="DURATION",
                        help="drop history older than this: 90m, 12h, 7d (default 7d)")
    parser.add_argument("--window", type=seconds_between(MIN_WINDOW, MAX_WINDOW), default=10.0, metavar="SECONDS",
                        help=f"topology aggregation window ({MIN_WINDOW:g} to {MAX_WINDOW:g}; default 10)")
    parser.add_argument("--exchanges-per-edge", type=_exchanges_per_edge, default=100, metavar="N",
                        help="exchanges the store keeps per edge and window besides every error (default "
                             "%(default)s; 0: errors only; all: every exchange); the rest are counted")
    parser.add_argument("--mapping", metavar="FILE", help="TOML file naming remote endpoints (docs/services.md)")
    parser.add_argument("--api", type=_host_port, metavar="HOST:PORT", nargs="?",
                        const=(DEFAULT_API_HOST, DEFAULT_API_PORT),
                        help=f"serve the HTTP API (topology, recording tasks) and web UI here; --api alone: "
                             f"{DEFAULT_API_HOST}:{DEFAULT_API_PORT} (default: no API)")
    parser.add_argument("--api-token", metavar="TOKEN", default=os.environ.get("DEETUNE_API_TOKEN"),
                        help="bearer token for the API (default $DEETUNE_API_TOKEN, else one made at the first "
                             "start and kept beside the store in STORE.api-token, mode 0600)")
    parser.add_argument("--api-hostname", action="append", metavar="NAME",
                        help="another name the API answers to in the Host header (a proxy's or DNS name; "
                             "repeatable): other names are refused, against DNS rebinding")
    parser.add_argument("--webhook-allow", action="append", type=_network, metavar="CIDR",
                        help="let recording webhooks reach these addresses (repeatable; link-local and cloud "
                             "metadata addresses are refused otherwise)")
    parser.add_argument("--nice", type=_nice, default=DEFAULT_NICE, metavar="N",
                        help="lower the agent's CPU priority by N (0-19; default %(default)s): on a saturated "
                             "host the applications keep their CPU and the agent drops records (counted); "
                             "'idle': run only on otherwise idle CPUs (SCHED_IDLE; the API may stall under load)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="deetune: %(levelname)s %(name)s: %(message)s")


def check_names(args: argparse.Namespace, plugins: Plugins) -> None:
    """Every probe, protocol and sink named exists (raises UnknownPluginError)."""
    for name in args.probe or ():
        plugins.probes.get(name)
    for name in args.protocol or ():
        plugins.decoders.get(name)
    for spec in args.sink or ():
        plugins.sinks.get(parse_sink_spec(spec)[0])


def build_pipeline(args: argparse.Namespace, plugins: Plugins, *, netns: int | None = None) -> Pipeline:
    options = ProbeOptions(pid=args.pid, port=args.port, ringbuf_bytes=args.ringbuf_size, exclude_self=True,
                           netns=netns)
    clock = Clock()
    names = list(args.probe or [n for n in plugins.probes.names() if plugins.probes.get(n).default])
    if args.tls:
        names.append("tls")
    probes = []
    for name in dict.fromkeys(names):
        cls = plugins.probes.get(name)
        kwargs: dict = {}
        if issubclass(cls, OverloadSampling):
            kwargs.update(overload_sampling=args.overload_sampling, busy_cpu=args.busy_cpu)
        if issubclass(cls, (PayloadProbe, TlsProbe)):
            kwargs["capture_bytes"] = args.capture_bytes
        probe = cls(options, clock, **kwargs)
        if netns is not None and not args.probe and not probe.scopable_to_netns():
            # An installed plugin's probe not asked for by name: the others still run.
            log.warning("probe %s not run: it cannot be scoped to --netns (its object was built without "
                        "deetune's common.bpf.h)", name)
            continue
        probes.append(probe)
    decoders = [plugins.decoders.get(name) for name in dict.fromkeys(args.protocol or plugins.decoders.names())]
    handlers: list = []
    payload = next((p for p in probes if isinstance(p, PayloadProbe)), None)
    tls = next((p for p in probes if isinstance(p, TlsProbe)), None)
    # Decoding, recording and the API are imported only by an agent that uses them:
    # each module loaded is memory the agent keeps (docs/performance.md, agent memory).
    recording_ports = None
    if payload is not None or tls is not None:
        from deetune.l7 import L7Handler
        from deetune.recording.capture import RecordingPorts

        # Recording tasks need the payload (their bytes) and the store (where they go).
        recording_ports = RecordingPorts() if not args.no_store and payload is not None else None
        handlers.append(L7Handler(decoders, mute=payload.mute if payload is not None else None,
                                  emit_data=args.emit_data, recording=recording_ports))
        from deetune.detail import DetailWeigher

        handlers.append(DetailWeigher())  # the detail weighted by the kernel's exact counts
    mapping = None
    if args.mapping:
        try:
            mapping = EndpointMapping.load(args.mapping)
        except MappingError as exc:
            raise UsageError(str(exc)) from None
    try:
        place = Place.build(args.host_name, args.label)
    except PlaceError as exc:
        raise UsageError(str(exc)) from None
    resolved = ResolvedNames()
    if payload is not None:  # remote endpoints named after the names clients resolved (DNS answers)
        handlers.append(resolved.observe)
    resolver = ServiceResolver(plugins, mapping=mapping, host=place.host, resolved=resolved)
    # The built-in probes count exchanges and connections in the kernel (deetune.accounting): the
    # topology and Prometheus count from there, exact at any load; decoded exchanges are detail.
    aggregator = TopologyAggregator(resolver, window_seconds=args.window, kernel_counts=True)
    handlers.append(aggregator)
    if args.no_store and args.api:
        raise UsageError("--api serves the store: it cannot go with --no-store")
    sinks = []
    for spec in args.sink or ["console"]:
        name, arg = parse_sink_spec(spec)
        sink = plugins.sinks.get(name).from_arg(arg)
        if hasattr(sink, "kernel_counts"):
            sink.kernel_counts = True  # a sink that can count from the kernel's counters (prometheus)
        sinks.append(sink)
    for sink in sinks:  # where this agent runs, on everything it exports (docs/fleet.md)
        if hasattr(sink, "set_place"):
            sink.set_place(place, api_port=args.api[1] if args.api else None)
    services: list = []
    if not args.no_store:
        store = open_store(args.store, args.retention, exchanges_per_edge=args.exchanges_per_edge,
                           window=args.window)
        manager = None
        if recording_ports is not None:
            from deetune.recording.recorder import Recorder, RecordingManager

            # Started (as a service) once the probes are attached: resumes the tasks left running.
            def set_port_capture(port: int, capture_bytes: int | None) -> None:
                payload.set_port_capture(port, capture_bytes)
                if tls is not None:  # a recorded TLS connection's plaintext, the same way
                    tls.set_port_capture(port, capture_bytes)

            manager = RecordingManager(store, set_port_capture=set_port_capture,
                                       ports_of=resolver.listening_ports, refresh_ports=resolver.refresh_listeners,
                                       recording_ports=recording_ports, webhook_allow=args.webhook_allow or ())
            handlers.append(Recorder(manager, counted=aggregator.is_counted))
            services.append(manager)
        store_sink = StoreSink(store)
        if args.api:
            try:
                services.append(build_api(args, store, store_sink, manager, place))
            except UsageError:
                store_sink.close()
                raise
        sinks.append(store_sink)
    return Pipeline(probes, sinks, handlers, services=services)


def token_file(store_path: str) -> str:
    """Where the agent keeps the API token it made: beside the store, mode 0600."""
    return os.path.abspath(store_path) + ".api-token"


def api_token(args: argparse.Namespace) -> str:
    """The API's bearer token: --api-token (or $DEETUNE_API_TOKEN), else the one kept beside the
    store, made at the first start (and printed then, once, on stderr)."""
    if args.api_token is not None:
        return args.api_token
    path = token_file(args.store)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        try:
            info = os.stat(path)
            with open(path, encoding="ascii") as file:
                token = file.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--api: cannot read the API token in {path}: {getattr(exc, 'strerror', None) or exc}") from None
        if info.st_mode & 0o077:
            raise UsageError(f"--api: {path} is readable by others (mode {info.st_mode & 0o777:o}): chmod 600 it")
        if not token:
            raise UsageError(f"--api: {path} is empty: delete it to have a new token made")
        return token
    except OSError as exc:
        raise UsageError(f"--api: cannot create the API token file {path}: {exc.strerror}") from None
    from deetune.api.server import new_token

    token = new_token()
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(token + "\n")
    print(f"deetune: API token (kept in {path}, mode 0600): {token}", file=sys.stderr)
    return token


def build_api(args: argparse.Namespace, store: TopologyStore, store_sink: StoreSink, manager,
              place: Place | None = None) -> object:
    """The API server, its socket bound already (a port in use is a usage error, before any probe loads)."""
    from deetune.api.routes import AgentPlaceRoutes
    from deetune.api.server import ApiServer

    host, port = args.api
    try:
        server = ApiServer(store, host, port, token=args.api_token, recordings=manager,
                           allowed_hosts=args.api_hostname or (), health=store_sink.health,
                           extensions=[AgentPlaceRoutes(place)] if place is not None else (),
                           nice=getattr(args, "api_nice", None))
        server.bind()
    except ValueError as exc:
        raise UsageError(f"--api: {exc}") from None
    except OSError as exc:
        raise UsageError(f"--api: {exc.strerror or exc}") from None
    if args.api_token is None:
        # Once the port is ours: the token kept beside the store (made and printed at the first start).
        server.token = api_token(args)
    return server


def open_store(path: str, retention: float, *, exchanges_per_edge: int | None = 100,
               window: float = 10.0) -> TopologyStore:
    """The topology store, its directory created when missing; errors as one line."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return TopologyStore(path, retention_seconds=retention, max_exchanges_per_edge_window=exchanges_per_edge,
                             exchange_window_seconds=window)
    except StoreInUse as exc:
        raise UsageError(f"--store: {exc}") from None
    except (OSError, StoreError) as exc:
        raise UsageError(f"--store {path}: {getattr(exc, 'strerror', None) or exc}") from None


#: Allocations between two young-generation collections (Python's default: 700).
GC_YOUNG_THRESHOLD = 20_000
#: Longest a thread waiting for the GIL waits for a busy thread to give it up (Python's
#: default: 5 ms).  An API request takes the GIL back many times (waitress's I/O thread, its
#: worker, every SQLite statement), up to 5 ms each behind a busy pipeline: a topology request
#: took 100-170 ms for 4 ms of work (bench/soak.py).
SWITCH_INTERVAL = 0.0005


def _tune_gc() -> None:
    """The agent makes several short-lived objects per kernel record, freed by their
    reference counts; the cycle collector ran every 700 allocations and took about 6 %
    of the agent's CPU at 10,000 requests/s.  Collect young objects less often, and keep
    what start-up built (modules, plugins, tables) out of every later full collection."""
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL)


def detail_summary(handlers: Sequence[object]) -> str | None:
    """For the stop line: the exchanges the DetailWeigher let go before the kernel's count they
    belong to was read, to stay within its bound (None: none were)."""
    for handler in handlers:
        early = getattr(getattr(handler, "stats", None), "released_early", 0)
        if early:
            from deetune.detail import MAX_HELD

            return f"detail: {early} exchanges weighed before their count was read (over {MAX_HELD} waiting)"
    return None


def cmd_run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    plugins = Plugins()
    # Names first (a typo is reported as such), then what the host lacks,
    # then what opens files and ports.
    check_names(args, plugins)
    problem = doctor.essential_problem()
    if problem:
        raise UsageError(problem)
    # The BPF programs run in the applications' context whatever this says; only user space yields.
    # Before any thread starts: threads inherit it.
    if args.nice == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif args.nice:
        # The API's threads keep the priority the agent started with (deetune.api.server._set_nice).
        args.api_nice = os.getpriority(os.PRIO_PROCESS, 0)
        os.nice(args.nice)
    netns = enter_netns(args.netns) if args.netns else None
    pipeline = build_pipeline(args, plugins, netns=netns)
    _tune_gc()
    stats = pipeline.run(args.duration)
    summary = stats.summary()
    detail_line = detail_summary(pipeline.handlers)
    if detail_line:
        summary += f"; {detail_line}"
    unpersisted = False
    for sink in pipeline.sinks:
        if isinstance(sink, StoreSink):
            store_line = sink.summary()
            if store_line:
                summary += f"; {store_line}"
            unpersisted = unpersisted or not sink.persisted_all
    print(f"deetune: {summary}", file=sys.stderr)
    return EXIT_FAILURE if unpersisted else EXIT_OK


def cmd_doctor(argv: Sequence[str]) -> int:
    parser = _Parser(prog="python -m deetune.agent doctor", description="Check that the agent can run here.")
    parser.add_argument("--no-cache", action="store_true", help="probe attach types again instead of using this boot's cache")
    args = parser.parse_args(argv)
    _setup_logging(0)
    checks = doctor.run_checks(use_cache=not args.no_cache)
    for check in checks:
        mark = "ok  " if check.ok else ("FAIL" if check.essential else "no  ")
        print(f"{mark} {check.name:<22} {check.detail}")
    failed = [c for c in checks if not c.ok and c.essential]
    if failed:
        print(f"deetune: cannot run: {failed[0].name}: {failed[0].detail}", file=sys.stderr)
        return EXIT_USAGE if failed[0].name == "privileges" else EXIT_FAILURE
    return EXIT_OK


def cmd_plugins(argv: Sequence[str]) -> int:
    _Parser(prog="python -m deetune.agent plugins", description="List plugins.").parse_args(argv)
    plugins = Plugins()
    for title, registry in (("probes", plugins.probes), ("decoders", plugins.decoders), ("sinks", plugins.sinks)):
        print(f"{title}:")
        for name in registry.names():
            try:
                cls = registry.get(name)
            except PluginImportError as exc:
                print(f"  {name:<12} (unusable: {exc.__cause__})  [{registry.origin(name)}]")
                continue
            text = getattr(cls, "description", "") or (cls.__doc__ or "").strip().splitlines()[0:1]
            if isinstance(text, list):
                text = text[0] if text else ""
            if getattr(cls, "default", True) is False:
                text += f" (not run unless named: --probe {name}" + (", --tls)" if name == "tls" else ")")
            print(f"  {name:<12} {text}  [{registry.origin(name)}]")
    print("plugins: " + ", ".join(plugins.plugin_names()))
    return EXIT_OK


COMMANDS = {"doctor": cmd_doctor, "plugins": cmd_plugins}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        if command:
            return command(argv[1:])
        return cmd_run(argv)
    except UsageError as exc:
        print(f"deetune: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (UnknownPluginError, SinkError) as exc:
        print(f"deetune: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EXIT_USAGE
    except LibbpfError as exc:
        print(f"deetune: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
