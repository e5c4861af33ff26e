"""Service identity: which service a local process or a remote endpoint is.

- :class:`ProcessInfo` is what a resolver sees of a process (read from /proc).
- The built-in resolvers, asked in this order after any third-party plugin:
  the environment (``OTEL_SERVICE_NAME``, ``DEETUNE_SERVICE``), the container
  (:class:`ContainerResolver`), the systemd unit (:func:`systemd_unit`), and
  the executable or script (:func:`resolve_executable`).
- :class:`ServiceResolver` is what the pipeline uses: the :class:`Instance` of
  a pid, and the service behind a remote ``addr:port`` (a local listener's
  service, a name from the :class:`EndpointMapping` file, or ``ip:port``).

See docs/services.md.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import logging
import os
import re
import socket
import threading
import time
import tomllib
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import attrs

from deetune import procnet
from deetune.topology.model import Instance

if TYPE_CHECKING:
    from deetune.plugins import Plugins

log = logging.getLogger("deetune.services")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The environment variables kept in :attr:`ProcessInfo.environ` (the rest of a
#: process's environment may hold secrets and is never stored).
ENV_KEYS: tuple[str, ...] = ("OTEL_SERVICE_NAME", "DEETUNE_SERVICE", "OTEL_RESOURCE_ATTRIBUTES")


# --------------------------------------------------------------------------- processes


class ProcessGone(LookupError):
    """The process exited (or never existed) while it was being read."""

    def __init__(self, pid: int):
        super().__init__(f"process {pid} is gone")
        self.pid = pid


def read_environ(pid: int, keys: Iterable[str] | None = ENV_KEYS, proc: str = "/proc") -> dict[str, str]:
    """The variables ``keys`` (all of them with None) of a process's environment;
    {} when it cannot be read (not permitted, kernel thread, gone)."""
    try:
        with open(f"{proc}/{pid}/environ", "rb") as file:
            raw = file.read()
    except OSError:
        return {}
    wanted = None if keys is None else set(keys)
    environ = {}
    for item in raw.split(b"\0"):
        name, sep, value = item.partition(b"=")
        if not sep:
            continue
        key = name.decode("utf-8", "replace")
        if wanted is None or key in wanted:
            environ[key] = value.decode("utf-8", "replace")
    return environ


@attrs.frozen
class ProcessInfo:
    """What a service resolver knows of a process (the hook's ``process`` argument)."""

    pid: int
    #: Kernel task name (15 characters at most).
    comm: str
    #: Path of the executable (``/proc/PID/exe``); None when unreadable (kernel
    #: threads, zombies, another user's process without privileges).
    exe: str | None = None
    #: Arguments; [] for kernel threads and zombies.  (Not hashed: a list.)
    cmdline: list[str] = attrs.field(factory=list, hash=False)
    #: Text of /proc/PID/cgroup.
    cgroup: str = ""
    #: Only the variables in :data:`ENV_KEYS` (not hashed: a dict).
    environ: dict[str, str] = attrs.field(factory=dict, hash=False)
    host: str = ""

    @classmethod
    def read(cls, pid: int, proc: str = "/proc", *, host: str | None = None) -> ProcessInfo:
        """Read a process from /proc; raises :class:`ProcessGone` when it no longer exists."""
        base = f"{proc}/{pid}"
        comm = _read_proc_file(pid, f"{base}/comm").rstrip("\n")
        raw_cmdline = _read_proc_file(pid, f"{base}/cmdline")
        cgroup = _read_proc_file(pid, f"{base}/cgroup")
        try:
            exe: str | None = os.readlink(f"{base}/exe")
        except OSError:  # kernel thread, zombie, or not permitted: not a reason to fail
            exe = None
        # Processes that rewrite their title (nginx, postgres) pad it with NULs.
        cmdline = raw_cmdline.split("\0")
        while cmdline and not cmdline[-1]:
            cmdline.pop()
        return cls(
            pid=pid, comm=comm, exe=exe, cmdline=cmdline, cgroup=cgroup,
            environ=read_environ(pid, ENV_KEYS, proc), host=host if host is not None else socket.gethostname(),
        )


def _read_proc_file(pid: int, path: str) -> str:
    """A /proc file's text; "" when not permitted; ProcessGone when the process is."""
    try:
        with open(path, "rb") as file:
            return file.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: it exited while being read
        raise ProcessGone(pid) from None
    except PermissionError:
        return ""


# --------------------------------------------------------------------------- (a) environment


def resolve_from_environment(process: ProcessInfo) -> str | None:
    """``OTEL_SERVICE_NAME``, then ``DEETUNE_SERVICE``, then ``service.name`` in
    ``OTEL_RESOURCE_ATTRIBUTES`` (which OpenTelemetry SDKs also rank below
    ``OTEL_SERVICE_NAME``)."""
    env = process.environ
    for key in ("OTEL_SERVICE_NAME", "DEETUNE_SERVICE"):
        value = env.get(key, "").strip()
        if value:
            return value
    for pair in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = pair.partition("=")
        if sep and key.strip() == "service.name" and value.strip():
            return urllib.parse.unquote(value.strip())
    return None


# --------------------------------------------------------------------------- cgroup paths


def cgroup_paths(cgroup: str) -> list[tuple[str, str]]:
    """(controllers, path) of each line of /proc/PID/cgroup text; v2's line has controllers ""."""
    paths = []
    for line in cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths.append((parts[1], parts[2]))
    return paths


@attrs.frozen
class ContainerRef:
    """A container id found in a cgroup path; ``runtime`` None when the layout
    does not tell (a bare id under ``/kubepods``: any CRI runtime)."""

    id: str
    runtime: str | None


_HEX64 = r"([0-9a-f]{64})"
#: systemd-driver scopes (cgroup v1 and v2): ``<prefix>-<id>.scope``.  The
#: ``libpod-conmon-``/``crio-conmon-`` scopes hold the monitor, not the container.
_SCOPE_RUNTIMES = {"docker": "docker", "cri-containerd": "containerd", "crio": "cri-o", "libpod": "podman",
                   "nerdctl": "containerd"}
_SCOPE = re.compile(rf"^(docker|cri-containerd|crio|libpod|nerdctl)-{_HEX64}\.scope$")
_BARE = re.compile(rf"^{_HEX64}$")
_LIBPOD_CGROUPFS = re.compile(rf"^libpod-{_HEX64}$")


def parse_container(cgroup: str) -> ContainerRef | None:
    """The container a process runs in, from its /proc/PID/cgroup text.

    Recognised (deepest path segment first, so a container nested in another
    one, e.g. kind, names the inner one): systemd scopes ``docker-<id>.scope``,
    ``cri-containerd-<id>.scope``, ``crio-<id>.scope``, ``libpod-<id>.scope``
    (possibly followed by ``/container``); cgroupfs paths ``/docker/<id>``,
    ``/kubepods/<qos>/pod<uid>/<id>``, ``/libpod_parent/libpod-<id>``.
    """
    for _, path in cgroup_paths(cgroup):
        segments = [s for s in path.split("/") if s]
        for index in range(len(segments) - 1, -1, -1):
            segment = segments[index]
            if match := _SCOPE.match(segment):
                return ContainerRef(match.group(2), _SCOPE_RUNTIMES[match.group(1)])
            if match := _LIBPOD_CGROUPFS.match(segment):
                return ContainerRef(match.group(1), "podman")
            if match := _BARE.match(segment):
                parent = segments[index - 1] if index else ""
                return ContainerRef(match.group(1), "docker" if parent == "docker" else None)
    return None


_UNIT_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")
_USER_MANAGER = re.compile(r"^user@\d+\.service$")


def systemd_unit(cgroup: str) -> str | None:
    """The service a systemd unit names, from /proc/PID/cgroup text: the deepest
    unit in the path.  ``/system.slice/nginx.service`` → ``nginx``,
    ``…/user@1000.service/app.slice/foo.service`` → ``foo``, the template
    ``getty@tty1.service`` → ``getty``.  None for scopes (sessions, containers,
    desktop apps: ``session-3.scope``) and for the user manager ``user@N.service``."""
    paths = dict(cgroup_paths(cgroup))
    # v1 and hybrid: systemd's own hierarchy; v2: the unified one.
    path = paths.get("name=systemd") or paths.get("")
    if not path:
        return None
    for segment in reversed([s for s in path.split("/") if s]):
        if segment.endswith(".scope"):
            return None
        if segment.endswith(".service"):
            if _USER_MANAGER.match(segment):
                return None
            name = segment[: -len(".service")].split("@", 1)[0]
            name = _UNIT_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), name)
            return name or None
    return None


def resolve_systemd(process: ProcessInfo) -> str | None:
    return systemd_unit(process.cgroup)


# --------------------------------------------------------------------------- (b) containers


@attrs.frozen
class Container:
    """What the runtime's state on disk says about a container (fields None when unknown)."""

    id: str
    runtime: str | None = None
    #: The runtime's name for it (docker ``--name``, podman name).
    name: str | None = None
    #: Image reference as given (``docker.io/library/nginx:1.25``).
    image: str | None = None
    pod: str | None = None
    namespace: str | None = None
    #: The container's name inside its Kubernetes pod.
    k8s_container: str | None = None
    #: An application label: ``app.kubernetes.io/name``, ``app``, or docker compose's service.
    app: str | None = None

    @property
    def service(self) -> str | None:
        """The application label, else the Kubernetes container name, else the
        container name, else the image's base name without tag or digest."""
        return self.app or self.k8s_container or self.name or image_basename(self.image)

    @property
    def display_name(self) -> str | None:
        """The name :class:`Instance` shows: the pod's container name or the runtime's."""
        return self.k8s_container or self.name


def image_basename(image: str | None) -> str | None:
    """``registry:5000/team/app:1.2@sha256:…`` → ``app``."""
    if not image:
        return None
    image = image.split("@", 1)[0]
    base = image.rsplit("/", 1)[-1]
    base = base.split(":", 1)[0]
    return base or None


_APP_LABELS = ("app.kubernetes.io/name", "app", "com.docker.compose.service")


def _app_label(labels: dict[str, Any]) -> str | None:
    for key in _APP_LABELS:
        value = labels.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _load_json(path: str) -> Any:
    try:
        with open(path, "rb") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


class ContainerResolver:
    """Container metadata from the runtimes' state on disk, cached per container id.

    The roots are constructor arguments so tests (and hosts with non-default
    locations, or an agent that sees the host's filesystem under ``/host``) can
    point elsewhere.
    """

    #: Entries kept; containers come and go, so the cache is bounded.
    max_cached = 4096

    def __init__(
        self,
        *,
        docker_root: str = "/var/lib/docker",
        containerd_root: str = "/run/containerd/io.containerd.runtime.v2.task",
        containers_storage_root: str = "/var/lib/containers/storage",
    ):
        self.docker_root = docker_root
        self.containerd_root = containerd_root
        self.containers_storage_root = containers_storage_root
        self._cache: OrderedDict[str, Container] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, process: ProcessInfo) -> Container | None:
        """The container of a process, or None when it runs in none."""
        ref = parse_container(process.cgroup)
        return self.container(ref) if ref else None

    def service(self, process: ProcessInfo) -> str | None:
        """The built-in container resolver: None outside containers and for
        containers the runtime's state says nothing about (the next resolvers
        then name the executable, better than a hex id)."""
        container = self.lookup(process)
        return container.service if container else None

    def container(self, ref: ContainerRef) -> Container:
        with self._lock:
            cached = self._cache.get(ref.id)
        if cached is not None:
            return cached
        found = self._read(ref)
        with self._lock:
            self._cache[ref.id] = found
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return found

    def _read(self, ref: ContainerRef) -> Container:
        readers = {"docker": self._docker, "containerd": self._containerd,
                   "cri-o": self._containers_storage, "podman": self._containers_storage}
        # The cgroup's runtime first; when it is unknown (a bare id under /kubepods), all of them.
        order = [readers[ref.runtime]] if ref.runtime else []
        order += [r for r in (self._docker, self._containerd, self._containers_storage) if r not in order]
        for reader in order:
            found = reader(ref.id)
            if found is not None:
                return attrs.evolve(found, runtime=ref.runtime or found.runtime)
        return Container(ref.id, ref.runtime)

    def _docker(self, cid: str) -> Container | None:
        config = _load_json(f"{self.docker_root}/containers/{cid}/config.v2.json")
        if not isinstance(config, dict):
            return None
        inner = config.get("Config") or {}
        labels = inner.get("Labels") or {}
        return Container(
            cid, "docker",
            name=(config.get("Name") or "").lstrip("/") or None,
            image=inner.get("Image") or None,
            pod=labels.get("io.kubernetes.pod.name"),
            namespace=labels.get("io.kubernetes.pod.namespace"),
            k8s_container=_k8s_container(labels.get("io.kubernetes.container.name")),
            app=_app_label(labels),
        )

    def _containerd(self, cid: str) -> Container | None:
        try:
            namespaces = sorted(os.listdir(self.containerd_root))
        except OSError:
            return None
        for namespace in namespaces:  # k8s.io, default, moby …
            spec = _load_json(f"{self.containerd_root}/{namespace}/{cid}/config.json")
            if not isinstance(spec, dict):
                continue
            notes = spec.get("annotations") or {}
            return Container(
                cid, "containerd",
                name=notes.get("nerdctl/name"),
                image=notes.get("io.kubernetes.cri.image-name"),
                pod=notes.get("io.kubernetes.cri.sandbox-name"),
                namespace=notes.get("io.kubernetes.cri.sandbox-namespace"),
                k8s_container=_k8s_container(notes.get("io.kubernetes.cri.container-name")),
                app=_app_label(notes),
            )
        return None

    def _containers_storage(self, cid: str) -> Container | None:
        """podman and CRI-O share containers/storage: the OCI spec's annotations
        (CRI-O's Kubernetes ones) and containers.json (names, image)."""
        root = f"{self.containers_storage_root}/overlay-containers"
        spec = _load_json(f"{root}/{cid}/userdata/config.json")
        notes = (spec.get("annotations") or {}) if isinstance(spec, dict) else {}
        entry = None
        listing = _load_json(f"{root}/containers.json")
        if isinstance(listing, list):
            entry = next((c for c in listing if isinstance(c, dict) and c.get("id") == cid), None)
        if not notes and entry is None:
            return None
        name = image = None
        if entry is not None:
            names = entry.get("names") or []
            name = names[0] if names else None
            try:
                metadata = json.loads(entry.get("metadata") or "{}")
            except ValueError:
                metadata = {}
            image = metadata.get("image-name") if isinstance(metadata, dict) else None
        runtime = "cri-o" if "io.kubernetes.cri-o.ContainerType" in notes else "podman"
        return Container(
            cid, runtime,
            name=name,
            image=notes.get("io.kubernetes.cri-o.ImageName") or image,
            pod=notes.get("io.kubernetes.pod.name"),
            namespace=notes.get("io.kubernetes.pod.namespace"),
            k8s_container=_k8s_container(notes.get("io.kubernetes.container.name")),
            app=_app_label(notes),
        )


def _k8s_container(name: str | None) -> str | None:
    # "POD" is the pause container that holds a pod's namespaces (dockershim).
    return name if name and name != "POD" else None


# --------------------------------------------------------------------------- (d) executables

_INTERPRETERS = (
    ("python", re.compile(r"^(python|pypy)[\d.]*[mw]?$")),
    ("node", re.compile(r"^(node|nodejs)$")),
    ("ruby", re.compile(r"^ruby[\d.]*$")),
    ("perl", re.compile(r"^perl[\d.]*$")),
    ("php", re.compile(r"^php[\d.]*(-cli)?$")),
    ("java", re.compile(r"^java$")),
    ("shell", re.compile(r"^(ba|da|z|k|a)?sh$")),
)


@attrs.frozen
class _Syntax:
    """An interpreter's command-line options, as far as finding the script needs."""

    #: Short options taking an argument, attached (``-Ilib``) or next (``-I lib``).
    with_arg: str = ""
    #: Short options that take the rest of their word as argument (``-Mstrict``).
    attached: str = ""
    #: Short options after which no script file follows (inline code, stdin,
    #: a module); their argument is returned instead.
    stop: str = ""
    long_with_arg: frozenset[str] = frozenset()
    long_stop: frozenset[str] = frozenset()
    #: ``+o``, ``+x``: shells take options with a plus too.
    plus: bool = False


_SYNTAX = {
    "python": _Syntax(with_arg="WX", stop="cm", long_with_arg=frozenset({"--check-hash-based-pycs"})),
    "node": _Syntax(with_arg="rC", stop="ep", long_stop=frozenset({"--eval", "--print"}),
                    long_with_arg=frozenset({"--require", "--loader", "--experimental-loader", "--import",
                                             "--conditions", "--title", "--env-file", "--input-type"})),
    "ruby": _Syntax(with_arg="IrCE", attached="xK", stop="e", long_with_arg=frozenset({"--encoding"})),
    # -l, -0, -C take digits only: as letters they are harmless.
    "perl": _Syntax(with_arg="I", attached="MmxiDd", stop="eE"),
    "php": _Syntax(with_arg="cdzt", stop="rSaf"),
    "shell": _Syntax(with_arg="oO", stop="cs", long_with_arg=frozenset({"--rcfile", "--init-file"}), plus=True),
}

_SCRIPT_SUFFIXES = (".py", ".pyc", ".pyw", ".pyz", ".js", ".mjs", ".cjs", ".ts", ".rb", ".pl", ".pm",
                    ".php", ".sh", ".bash", ".zsh", ".jar")
_JAR_VERSION = re.compile(r"-\d+(\.\d+)*([.-][A-Za-z0-9]+)*$")


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _script_name(path: str) -> str:
    """``/srv/app.py`` → ``app``; ``pkg/__main__.py`` → ``pkg`` (like ``-m pkg``)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        return ""
    stem = parts[-1]
    for suffix in _SCRIPT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    if stem == "__main__" and len(parts) > 1 and parts[-2] != "..":
        return parts[-2]
    return stem


def _scan(args: list[str], syntax: _Syntax) -> tuple[str | None, str | None, str | None]:
    """(script, stop option, its argument): the first operand of an
    interpreter's command line, or the option that means there is none."""
    skip = False
    for index, arg in enumerate(args):
        following = args[index + 1] if index + 1 < len(args) else None
        if skip or not arg:
            skip = False
            continue
        if arg == "--":
            return following, None, None
        if arg == "-":  # the program comes from stdin
            return None, "-", None
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            if name in syntax.long_stop:
                return None, name, arg.partition("=")[2] or following
            skip = name in syntax.long_with_arg and "=" not in arg
            continue
        if (arg[0] == "-" or (arg[0] == "+" and syntax.plus)) and len(arg) > 1:  # a cluster: -uB, -euo, +x
            for position, letter in enumerate(arg[1:], 1):
                rest = arg[position + 1:]
                if letter in syntax.stop:
                    return None, letter, rest or following
                if letter in syntax.attached:
                    break
                if letter in syntax.with_arg:
                    skip = not rest
                    break
            continue
        return arg, None, None
    return None, None, None


def _java(args: list[str]) -> str | None:
    """``-jar foo-1.2.jar`` → ``foo``; ``-m mod/com.x.Main`` and ``com.x.Main`` → ``Main``."""
    skip = False
    for index, arg in enumerate(args):
        following = args[index + 1] if index + 1 < len(args) else ""
        if skip:
            skip = False
            continue
        if arg == "-jar":
            stem = _basename(following).removesuffix(".jar")
            return _JAR_VERSION.sub("", stem) or stem or None
        if arg in ("-m", "--module"):
            module, _, main_class = following.partition("/")
            return (main_class.rsplit(".", 1)[-1] if main_class else module) or None
        if arg in _JAVA_ARG:
            skip = True
            continue
        if arg.startswith(("-", "@")):  # -Dx=y, -Xmx1g, -javaagent:…, @argfile
            continue
        return arg.rsplit(".", 1)[-1] or None
    return None


_JAVA_ARG = {"-cp", "-classpath", "--class-path", "-p", "--module-path", "--upgrade-module-path",
             "--add-modules", "--add-opens", "--add-exports", "--add-reads", "--patch-module",
             "--limit-modules", "--enable-native-access"}


def _interpreted(kind: str, args: list[str]) -> str | None:
    """The service an interpreter's arguments name, or None (inline code, REPL)."""
    if kind == "java":
        return _java(args)
    script, stop, value = _scan(args, _SYNTAX[kind])
    if script:
        return _script_name(script) or None
    if kind == "python" and stop == "m" and value:
        # The whole dotted module: `-m http.server` is not "server".
        return value.removesuffix(".__main__") or None
    if kind == "php" and stop == "f" and value:
        return _script_name(value) or None
    return None


def interpreter_kind(name: str) -> str | None:
    """``python3.11`` → ``python``; None when ``name`` is no interpreter deetune knows."""
    for kind, pattern in _INTERPRETERS:
        if pattern.match(name):
            return kind
    return None


def _program_name(cmdline: list[str]) -> str:
    """The program's name in argv[0]; for a process that rewrote its title into
    one word-separated argument (``nginx: worker process``, ``puma 6.4.0
    (tcp://…)``), its first word; a login shell's ``-bash`` is ``bash``."""
    if not cmdline:
        return ""
    arg0 = cmdline[0]
    if len(cmdline) == 1 and " " in arg0.strip():
        arg0 = re.split(r"[:\s]", arg0.strip(), maxsplit=1)[0]
    return _basename(arg0).lstrip("-")


def resolve_executable(process: ProcessInfo) -> str:
    """The executable or script: ``python3 app.py`` → ``app``, ``python -m
    pkg.server`` → ``pkg.server``, ``node server.js`` → ``server``, ``java -jar
    foo-1.2.jar`` → ``foo``, ``java … com.x.Main`` → ``Main``, ``bash run.sh`` →
    ``run``; otherwise the command name (comm, completed from the executable's or
    argv[0]'s name when comm is their 15-character truncation)."""
    comm = process.comm
    exe = _basename(process.exe.removesuffix(" (deleted)")) if process.exe else ""
    arg0 = _program_name(process.cmdline)
    kind = interpreter_kind(arg0) or interpreter_kind(exe)
    if kind and process.cmdline:
        script = _interpreted(kind, process.cmdline[1:])
        if script:
            return script
        # No script: a renamed title (gunicorn, puma) or the bare interpreter.
        return arg0 or exe or comm or f"pid-{process.pid}"
    for full in (exe, arg0):
        if comm and full.startswith(comm):
            return full
    return comm or exe or arg0 or f"pid-{process.pid}"


# --------------------------------------------------------------------------- built-in chain


class BuiltinResolvers:
    """The four built-in resolvers, asked in order: environment, container,
    systemd unit, executable.  ``deetune.builtin`` calls :meth:`resolve` from
    one hook wrapper, after every third-party resolver returned None (see
    docs/services.md)."""

    def __init__(self, containers: ContainerResolver | None = None):
        self.containers = containers or ContainerResolver()

    def resolve(self, process: Any) -> str | None:
        if isinstance(process, int):  # the hook accepts a bare pid too
            try:
                process = ProcessInfo.read(process)
            except ProcessGone:
                return None
        if not isinstance(process, ProcessInfo):
            return None
        return (
            resolve_from_environment(process)
            or self.containers.service(process)
            or resolve_systemd(process)
            or resolve_executable(process)
        )


#: The chain ``deetune.builtin`` calls; :class:`ServiceResolver` reads container
#: details from the same :class:`ContainerResolver` (one cache).
BUILTIN = BuiltinResolvers()


# --------------------------------------------------------------------------- endpoint mapping


class MappingError(ValueError):
    """A bad endpoint mapping file; the message is one line: ``FILE: reason``."""


@attrs.frozen
class EndpointRule:
    name: str
    address: IPAddress | None = None
    cidr: IPNetwork | None = None
    port: int | None = None


def _normalize(addr: IPAddress) -> IPAddress:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


class EndpointMapping:
    """Names for remote endpoints, from a TOML file of ``[[endpoint]]`` tables.

    The most specific rule wins: address+port, then address, then cidr+port,
    then cidr (longest prefix first in both), then port alone.
    """

    _KEYS = frozenset({"name", "address", "cidr", "port"})

    def __init__(self, rules: Iterable[EndpointRule] = (), source: str = "<mapping>"):
        self.rules = list(rules)
        self._by_addr_port: dict[tuple[IPAddress, int], str] = {}
        self._by_addr: dict[IPAddress, str] = {}
        self._by_port: dict[int, str] = {}
        cidr_port: list[tuple[IPNetwork, int, str]] = []
        cidr: list[tuple[IPNetwork, str]] = []
        seen: dict[tuple, str] = {}
        for rule in self.rules:
            key = (rule.address, rule.cidr, rule.port)
            if key in seen:
                raise MappingError(f"{source}: endpoints {seen[key]!r} and {rule.name!r} match the same traffic")
            seen[key] = rule.name
            if rule.address is not None:
                if rule.port is not None:
                    self._by_addr_port[(rule.address, rule.port)] = rule.name
                else:
                    self._by_addr[rule.address] = rule.name
            elif rule.cidr is not None:
                if rule.port is not None:
                    cidr_port.append((rule.cidr, rule.port, rule.name))
                else:
                    cidr.append((rule.cidr, rule.name))
            elif rule.port is not None:
                self._by_port[rule.port] = rule.name
        self._cidr_port = sorted(cidr_port, key=lambda r: -r[0].prefixlen)
        self._cidr = sorted(cidr, key=lambda r: -r[0].prefixlen)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EndpointMapping:
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except OSError as err:
            raise MappingError(f"{path}: {err.strerror or err}") from None
        except tomllib.TOMLDecodeError as err:
            raise MappingError(f"{path}: {err}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<mapping>") -> EndpointMapping:
        unknown = set(data) - {"endpoint"}
        if unknown:
            raise MappingError(f"{source}: unknown table {min(unknown)!r} (expected [[endpoint]])")
        entries = data.get("endpoint", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise MappingError(f"{source}: 'endpoint' must be an array of tables ([[endpoint]])")
        return cls((cls._rule(entry, index, source) for index, entry in enumerate(entries, 1)), source)

    @classmethod
    def _rule(cls, entry: dict[str, Any], index: int, source: str) -> EndpointRule:
        name = entry.get("name")
        where = f"endpoint {index}" + (f" ({name})" if isinstance(name, str) and name else "")

        def fail(reason: str) -> MappingError:
            return MappingError(f"{source}: {where}: {reason}")

        unknown = set(entry) - cls._KEYS
        if unknown:
            raise fail(f"unknown key {min(unknown)!r} (known: address, cidr, name, port)")
        if not isinstance(name, str) or not name.strip():
            raise fail("'name' must be a non-empty string")
        address = cidr = port = None
        if "address" in entry and "cidr" in entry:
            raise fail("give 'address' or 'cidr', not both")
        if "address" in entry:
            try:
                address = _normalize(ipaddress.ip_address(str(entry["address"])))
            except ValueError:
                raise fail(f"'address' {entry['address']!r} is not an IP address") from None
        if "cidr" in entry:
            try:
                cidr = ipaddress.ip_network(str(entry["cidr"]))
            except ValueError as err:
                raise fail(f"'cidr' {entry['cidr']!r}: {err}") from None
        if "port" in entry:
            port = entry["port"]
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise fail(f"'port' {port!r} is not a port number (1-65535)")
        if address is None and cidr is None and port is None:
            raise fail("needs 'address', 'cidr' or 'port'")
        return EndpointRule(name.strip(), address, cidr, port)

    def lookup(self, addr: str | IPAddress, port: int) -> str | None:
        """The name of the most specific rule matching addr:port, or None."""
        try:
            ip = _normalize(ipaddress.ip_address(addr)) if isinstance(addr, str) else _normalize(addr)
        except ValueError:
            return self._by_port.get(port)
        name = self._by_addr_port.get((ip, port)) or self._by_addr.get(ip)
        if name:
            return name
        for net, rule_port, rule_name in self._cidr_port:
            if rule_port == port and ip.version == net.version and ip in net:
                return rule_name
        for net, rule_name in self._cidr:
            if ip.version == net.version and ip in net:
                return rule_name
        return self._by_port.get(port)

    def __len__(self) -> int:
        return len(self.rules)


# --------------------------------------------------------------------------- host addresses


def local_addresses(proc: str = "/proc") -> tuple[set[IPAddress], list[IPNetwork]]:
    """This host's addresses (in the agent's network namespace): the ``host
    LOCAL`` entries of /proc/net/fib_trie and the addresses in
    /proc/net/if_inet6; plus local ranges (127.0.0.0/8, ::1/128)."""
    addresses: set[IPAddress] = set()
    networks: list[IPNetwork] = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    try:
        with open(f"{proc}/net/fib_trie") as trie:
            last = None
            for line in trie:
                text = line.strip()
                if text.startswith(("|--", "+--")):
                    last = text[3:].split()[0]
                elif last and text.startswith("/") and "host LOCAL" in text:
                    prefix = int(text[1:].split()[0])
                    if prefix == 32:
                        addresses.add(ipaddress.IPv4Address(last))
                    else:
                        net = ipaddress.ip_network(f"{last}/{prefix}", strict=False)
                        if net not in networks:
                            networks.append(net)
    except (OSError, ValueError):
        pass
    try:
        with open(f"{proc}/net/if_inet6") as table:
            for line in table:
                fields = line.split()
                if fields:
                    addresses.add(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
    except (OSError, ValueError):
        pass
    return addresses, networks


def format_endpoint(addr: str, port: int) -> str:
    """``10.0.0.1:80``; IPv6 in brackets: ``[2001:db8::1]:80``."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


# --------------------------------------------------------------------------- resolved names


class ResolvedNames:
    """The names clients asked DNS for, by the addresses the answers gave: a remote endpoint
    nothing else names is named after the name a client resolved to reach it.

    Fed by :meth:`observe`, a pipeline handler placed before the topology aggregator: an
    exchange whose ``attributes["addresses"]`` lists addresses (the DNS decoder's, for the
    name in ``target``) teaches it those.  The latest answer wins; at most ``max_names``
    addresses are kept (the oldest forgotten first)."""

    def __init__(self, max_names: int = 65536) -> None:
        self.max_names = max_names
        self._names: OrderedDict[IPAddress, str] = OrderedDict()
        #: Bumped whenever an address gets a new name (callers' caches of names go stale).
        self.version = 0

    def learn(self, name: str, addresses: Iterable[str]) -> None:
        name = name.rstrip(".")
        if not name:
            return
        for text in addresses:
            ip = _parse_ip(text)
            if ip is None:
                continue
            if self._names.get(ip) != name:
                self._names[ip] = name
                self.version += 1
            self._names.move_to_end(ip)
            if len(self._names) > self.max_names:
                self._names.popitem(last=False)

    def name(self, ip: IPAddress) -> str | None:
        return self._names.get(ip)

    def observe(self, event: Any) -> tuple[Any]:
        """Pipeline handler: learn from exchanges that resolved a name; pass every event on."""
        attributes = getattr(event, "attributes", None)
        if attributes and not getattr(event, "error", False):
            addresses = attributes.get("addresses")
            if addresses:
                self.learn(event.target, addresses)
        return (event,)

    def __len__(self) -> int:
        return len(self._names)


# --------------------------------------------------------------------------- the resolver


class _Listeners:
    """A snapshot of this host's listening sockets and their owners."""

    def __init__(self, proc: str):
        # TCP listeners, then unconnected bound UDP sockets (a DNS server on this host is named, and
        # its exchanges counted once, like a TCP server's); a TCP listener wins a shared port.
        sockets = procnet.read_listening_sockets(proc) + procnet.read_udp_bound_sockets(proc)
        self.inodes: dict[tuple[str, int], int] = {}
        for s in sockets:
            self.inodes.setdefault((s.laddr, s.lport), s.inode)
        self.owners = procnet.socket_inode_owners(set(self.inodes.values()), proc)
        self.owner_pids = set(self.owners.values())
        self.addresses, self.networks = local_addresses(proc)
        #: (addr, port) as events spell them → (listening inode or None, name when nobody here
        #: listens): settled answers only, so that a connection's endpoints are parsed once
        #: per snapshot rather than once per event.
        self.settled: dict[tuple[str, int], tuple[int | None, str]] = {}

    def is_local(self, ip: IPAddress) -> bool:
        return ip in self.addresses or any(ip.version == n.version and ip in n for n in self.networks)


class ServiceResolver:
    """Names local processes and remote endpoints for the topology.

    Process instances are cached per pid until :meth:`forget`; the listening
    sockets (and this host's addresses) are a snapshot re-read on a miss, at
    most once per :attr:`refresh_interval`, and at the latest after
    :attr:`max_age`: a new listener is found within a second, and /proc is
    not scanned per event.
    """

    #: Seconds between two re-reads of the listeners caused by misses.
    refresh_interval: float = 1.0
    #: Seconds after which the listeners are re-read even without a miss.
    max_age: float = 60.0
    #: Cached instances (their pids are forgotten after exit; the bound covers lost exit events).
    max_instances: int = 65536
    #: Exec events remembered to name processes gone from /proc.
    max_execs: int = 16384
    #: Seconds an exited process's instance is kept (its last counts are read after its exit).
    retire_seconds: float = 30.0

    def __init__(self, plugins: Plugins | None = None, *, mapping: EndpointMapping | None = None,
                 host: str | None = None, proc: str = "/proc", resolved: ResolvedNames | None = None):
        if plugins is None:
            from deetune.plugins import default_plugins

            plugins = default_plugins()
        self.plugins = plugins
        self.mapping = mapping
        #: Names learned from DNS answers (after local listeners and the mapping file).
        self.resolved = resolved
        self._resolved_version = 0
        self.host = host or socket.gethostname()
        self.proc = proc
        #: The clock for the refresh intervals (a test may replace it).
        self.clock = time.monotonic
        self._instances: dict[int, Instance] = {}
        self._listeners: _Listeners | None = None
        self._listeners_at = float("-inf")
        self._listeners_stale = False
        self._lock = threading.Lock()
        self._plugin_failed = False
        #: pid → (comm, command line) from exec events: names a process gone from /proc.
        self._execs: collections.OrderedDict[int, tuple[str, str]] = collections.OrderedDict()
        #: (when to forget, pid) of exited processes.
        self._retiring: collections.deque[tuple[float, int]] = collections.deque()

    # ---- processes

    def instance(self, pid: int, comm: str = "") -> Instance:
        """The instance (service name, host, pid, container) of a local process; cached per pid.
        A pid that vanished is named from what its exec said (note_exec), else from comm (or
        "pid-N"), rather than an error."""
        cached = self._instances.get(pid)
        if cached is not None:
            return cached
        try:
            info = ProcessInfo.read(pid, self.proc, host=self.host)
        except ProcessGone:
            execed = self._execs.get(pid)
            if execed is not None:
                exec_comm, cmdline = execed
                found = self._instance_of(ProcessInfo(pid=pid, comm=exec_comm, cmdline=cmdline.split(" "),
                                                      host=self.host))
            else:
                found = Instance(service=comm or f"pid-{pid}", host=self.host, pid=pid, comm=comm)
        else:
            found = self._instance_of(info)
        if len(self._instances) >= self.max_instances:
            self._instances.pop(next(iter(self._instances)), None)  # the oldest
        self._instances[pid] = found
        return found

    def _instance_of(self, info: ProcessInfo) -> Instance:
        try:
            service = self.plugins.resolve_service(info)
        except Exception:  # a broken third-party resolver must not stop the agent
            if not self._plugin_failed:
                log.warning("a service resolver plugin failed; using the built-in ones", exc_info=True)
                self._plugin_failed = True
            service = BUILTIN.resolve(info)
        container = BUILTIN.containers.lookup(info)
        return Instance(
            service=service or info.comm or f"pid-{info.pid}",
            host=self.host,
            pid=info.pid,
            comm=info.comm,
            container_id=container.id if container else None,
            container_name=container.display_name if container else None,
            pod=container.pod if container else None,
            namespace=container.namespace if container else None,
        )

    def note_exec(self, pid: int, comm: str, cmdline: str) -> None:
        """A process started (an exec event): what names it once it is gone from /proc (the
        kernel's counts of a short-lived client are read after it exits)."""
        self.forget(pid)
        execs = self._execs
        execs[pid] = (comm, cmdline)
        if len(execs) > self.max_execs:
            execs.popitem(last=False)

    def retire(self, pid: int, now: float | None = None) -> None:
        """A process exited: its instance is kept a little longer (counts read after its exit
        still name it), then forgotten."""
        now = self.clock() if now is None else now
        self._retiring.append((now + self.retire_seconds, pid))
        while self._retiring and self._retiring[0][0] <= now:
            _, old = self._retiring.popleft()
            self.forget(old)  # a pid used again meanwhile is read from /proc again: no harm
            self._execs.pop(old, None)

    def forget(self, pid: int) -> None:
        """Drop the cache for pid (called on exec events, and after exits)."""
        self._instances.pop(pid, None)
        listeners = self._listeners
        if listeners is not None and pid in listeners.owner_pids:
            # Its sockets may now belong to nobody, or to another process.
            self._listeners_stale = True

    # ---- endpoints

    def endpoint(self, addr: str, port: int) -> str:
        """The service behind a remote endpoint: the local process listening on addr:port (any
        address of this host, 127.0.0.0/8, ::1, 0.0.0.0/::) → its service; else the mapping file's
        name (by address, CIDR, port, or address+port); else "ip:port" (IPv6 as "[ip]:port")."""
        listeners, inode, fallback = self._resolve(addr, port)
        owner = listeners.owners.get(inode) if inode is not None else None
        if owner is not None:
            return self.instance(owner).service
        return fallback

    def is_local_listener(self, addr: str, port: int) -> bool:
        """Whether a process on this host listens on addr:port (so it reports its own side)."""
        return self._resolve(addr, port)[1] is not None

    def is_local_address(self, addr: str) -> bool:
        """Whether addr is one of this host's addresses (loopback included)."""
        ip = _parse_ip(addr)
        return ip is not None and self._snapshot(missed=False).is_local(ip)

    def _resolve(self, addr: str, port: int) -> tuple[_Listeners, int | None, str]:
        """The listeners snapshot, the inode listening on addr:port (None when not this host's
        or nobody listens), and the name to use when no local process owns it."""
        listeners = self._snapshot(missed=False)
        resolved = self.resolved
        if resolved is not None and resolved.version != self._resolved_version:
            self._resolved_version = resolved.version
            listeners.settled.clear()  # a name learned since: the settled names may be stale
        settled = listeners.settled.get((addr, port))
        if settled is not None:
            return listeners, settled[0], settled[1]
        ip = _parse_ip(addr)
        if ip is None:
            name = self.mapping.lookup(addr, port) if self.mapping else None
            return listeners, None, name or format_endpoint(addr.strip("[]"), port)
        listeners, inode = self._lookup(ip, port)
        name = (self.mapping.lookup(ip, port) if self.mapping else None) or self._resolved_name(ip, port) \
            or format_endpoint(str(ip), port)
        if inode is None and port and listeners.is_local(ip):
            return listeners, inode, name  # a local miss: looked up again (a server may start)
        if inode is not None and inode not in listeners.owners:
            return listeners, inode, name  # owner unknown yet
        if len(listeners.settled) >= self.max_instances:
            listeners.settled.clear()
        listeners.settled[(addr, port)] = (inode, name)
        return listeners, inode, name

    def _resolved_name(self, ip: IPAddress, port: int) -> str | None:
        """``name:port`` (or the name alone for port 0) when a client resolved a name to ``ip``."""
        name = self.resolved.name(ip) if self.resolved is not None else None
        if name is None:
            return None
        return f"{name}:{port}" if port else name

    def listening_ports(self, service: str) -> set[int]:
        """The TCP ports the local instances of ``service`` listen on (recording tasks raise their
        capture).  Re-reads the listeners when the snapshot is older than the refresh interval."""
        listeners = self._snapshot(missed=True)
        ports = self._ports_of(listeners, service)
        if not ports and self.clock() - self._listeners_at >= 0.1:
            # A server that just started (or a task created just after it did): read them again now.
            listeners = self.refresh_listeners()
            ports = self._ports_of(listeners, service)
        return ports

    def refresh_listeners(self) -> _Listeners:
        """Read this host's listening sockets again now (a recording task was just created)."""
        with self._lock:
            self._listeners = listeners = _Listeners(self.proc)
            self._listeners_at = self.clock()
            self._listeners_stale = False
        return listeners

    def _ports_of(self, listeners: _Listeners, service: str) -> set[int]:
        ports = set()
        for (_, port), inode in listeners.inodes.items():
            pid = listeners.owners.get(inode)
            if pid is not None and self.instance(pid).service == service:
                ports.add(port)
        return ports

    def _snapshot(self, *, missed: bool) -> _Listeners:
        now = self.clock()
        listeners = self._listeners
        age = now - self._listeners_at
        if listeners is None or age >= self.max_age or (
            (missed or self._listeners_stale) and age >= self.refresh_interval
        ):
            with self._lock:
                # Another thread may have refreshed while this one waited.
                if self._listeners is listeners:
                    self._listeners_stale = False
                    self._listeners = listeners = _Listeners(self.proc)
                    self._listeners_at = self.clock()
                else:
                    listeners = self._listeners
        return listeners

    def _lookup(self, ip: IPAddress, port: int) -> tuple[_Listeners, int | None]:
        """The listeners snapshot and the inode of the listening socket a
        connection to ip:port reaches (None when ip is not this host's or
        nothing listens).  Only a miss on a local address (or a listener whose
        owner is unknown yet) re-reads the snapshot: connections to remote
        addresses, most of the traffic, never cause a /proc scan."""
        if not port:  # endpoint(addr, 0) names an address alone: nothing listens on port 0
            return self._snapshot(missed=False), None
        if ip.is_unspecified:  # connect(0.0.0.0) reaches the loopback address
            ip = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
        # "::" listeners take IPv4 too unless IPV6_V6ONLY (not visible in /proc; off by default).
        candidates = (str(ip), "0.0.0.0", "::") if ip.version == 4 else (str(ip), "::")

        def match(listeners: _Listeners) -> int | None:
            return next((inode for laddr in candidates if (inode := listeners.inodes.get((laddr, port)))), None)

        listeners = self._snapshot(missed=False)
        if not listeners.is_local(ip):
            return listeners, None
        inode = match(listeners)
        if inode is None or inode not in listeners.owners:
            listeners = self._snapshot(missed=True)
            inode = match(listeners) if listeners.is_local(ip) else None
        return listeners, inode


def _parse_ip(addr: str) -> IPAddress | None:
    try:
        return _normalize(ipaddress.ip_address(addr.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


__all__ = [
    "BUILTIN", "BuiltinResolvers", "Container", "ContainerRef", "ContainerResolver", "EndpointMapping",
    "EndpointRule", "MappingError", "ProcessGone", "ProcessInfo", "ResolvedNames", "ServiceResolver",
    "format_endpoint",
    "image_basename", "local_addresses", "parse_container", "read_environ", "resolve_executable",
    "resolve_from_environment", "systemd_unit",
]
