"""Preflight: can the agent run here, and which attach types does this kernel allow?

``python -m deetune.agent doctor`` prints every check; the agent runs the
essential ones (:func:`essential_problem`) before loading anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import pathlib
import threading

import attrs

from deetune import resources

log = logging.getLogger("deetune.doctor")

BTF_PATH = pathlib.Path("/sys/kernel/btf/vmlinux")
TRACEFS_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
BPFFS_PATH = "/sys/fs/bpf"
CACHE_DIR = pathlib.Path(os.environ.get("DEETUNE_CACHE_DIR", "/run/deetune"))

# Capability bits (linux/capability.h).
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

#: Attach types the feature probe object tries, in the order shown.
FEATURES = (
    ("tracepoint", "feat_tracepoint"),
    ("raw_tracepoint", "feat_raw_tp"),
    ("tp_btf", "feat_tp_btf"),
    ("uprobe", "feat_uprobe"),
    ("socket_filter", "feat_socket_filter"),
    ("cgroup_skb", "feat_cgroup_skb"),
    ("sockops", "feat_sockops"),
    ("ringbuf", None),
    ("kprobe", "feat_kprobe"),
    ("fentry", "feat_fentry"),
)


@attrs.frozen
class Check:
    name: str
    ok: bool
    detail: str
    #: False for checks that only inform (a missing attach type the agent does not need).
    essential: bool = True


def effective_capabilities() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> Check:
    caps = effective_capabilities()
    has_bpf = bool(caps & (1 << CAP_BPF)) and bool(caps & (1 << CAP_PERFMON))
    if os.geteuid() == 0 or has_bpf or caps & (1 << CAP_SYS_ADMIN):
        who = "root" if os.geteuid() == 0 else "CAP_BPF+CAP_PERFMON"
        return Check("privileges", True, who)
    return Check("privileges", False, "needs root (or CAP_BPF and CAP_PERFMON): run it with sudo")


def check_btf() -> Check:
    if BTF_PATH.exists():
        return Check("btf", True, str(BTF_PATH))
    return Check("btf", False, f"{BTF_PATH} missing: the kernel needs CONFIG_DEBUG_INFO_BTF=y for CO-RE")


def cgroup2_root() -> str | None:
    """Mount point of the cgroup v2 hierarchy (``/sys/fs/cgroup`` or, on hybrid
    systems, ``/sys/fs/cgroup/unified``)."""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[2] == "cgroup2":
                return fields[1]
    return None


def _is_mounted(path: str, fstype: str) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == path and line.split()[2] == fstype for line in mounts)


def _mount(fstype: str, target: str) -> str | None:
    """Mount a pseudo filesystem; None on success, else the reason."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(fstype.encode(), target.encode(), fstype.encode(), 0, None) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def check_tracefs(mount_if_missing: bool = True) -> Check:
    for path in TRACEFS_PATHS:
        if os.path.isdir(path) and _is_mounted(path, "tracefs"):
            return Check("tracefs", True, path)
    if mount_if_missing and os.path.isdir(TRACEFS_PATHS[0]):
        reason = _mount("tracefs", TRACEFS_PATHS[0])
        if reason is None:
            return Check("tracefs", True, f"{TRACEFS_PATHS[0]} (mounted now)")
        return Check("tracefs", False, f"tracefs not mounted and mounting it failed: {reason}")
    return Check("tracefs", False, "tracefs not mounted: mount -t tracefs nodev /sys/kernel/tracing")


def check_bpffs() -> Check:
    if _is_mounted(BPFFS_PATH, "bpf"):
        return Check("bpffs", True, BPFFS_PATH, essential=False)
    return Check("bpffs", False, f"{BPFFS_PATH} not mounted (deetune pins nothing, so it is optional)", essential=False)


def check_kernel() -> Check:
    release = os.uname().release
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return Check("kernel", True, release)
    if (major, minor) < (5, 8):
        return Check("kernel", False, f"{release}: BPF ring buffers need Linux 5.8 or newer")
    return Check("kernel", True, release)


def check_libbpf() -> Check:
    from deetune.libbpf import LibbpfError, lib

    try:
        lib()
    except LibbpfError as exc:
        return Check("libbpf", False, str(exc))
    return Check("libbpf", True, "libbpf.so.1")


def check_objects() -> Check:
    missing = [n for n in ("process", "tcp", "features") if not resources.object_path(n).exists()]
    if missing:
        return Check("bpf objects", False, f"missing {', '.join(missing)}.bpf.o in {resources.object_path('x').parent}: run `make bpf`")
    return Check("bpf objects", True, str(resources.object_path("tcp").parent))


def essential_problem() -> str | None:
    """The first reason the agent cannot run, as one line; None when it can."""
    for check in (check_privileges, check_kernel, check_btf, check_libbpf, check_objects, check_tracefs):
        result = check()
        if not result.ok and result.essential:
            return f"{result.name}: {result.detail}"
    return None


# -- attach types ----------------------------------------------------------------


def _boot_id() -> str:
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _try_feature(program: str | None) -> tuple[bool, str]:
    from deetune.libbpf import BpfObject, LibbpfError, quiet

    obj = BpfObject.open(resources.object_path("features"))
    try:
        with quiet():
            return _attach_feature(obj, program)
    except LibbpfError as exc:
        return False, str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
    except OSError as exc:
        return False, exc.strerror or str(exc)
    finally:
        obj.close()


def _attach_feature(obj, program: str | None) -> tuple[bool, str]:
    for prog in obj.programs.values():
        prog.autoload = prog.name == program
    obj.load()
    if program is None:  # ringbuf: the load created the ring buffer map
        return True, "map created"
    prog = obj.programs[program]
    if program == "feat_socket_filter":
        return True, "loaded"
    if program == "feat_uprobe":
        soname = ctypes.util.find_library("c")
        libc_path = _resolve_library_path(soname) if soname else None
        if not libc_path:
            return False, "libc not found to attach to"
        prog.attach_uprobe(libc_path, "getpid")
    elif program in ("feat_cgroup_skb", "feat_sockops"):
        # A pass-through program on an empty cgroup of our own, removed right after.
        root = cgroup2_root()
        if root is None:
            return False, "no cgroup v2 hierarchy mounted"
        cgroup = os.path.join(root, f"deetune-doctor-{os.getpid()}")
        os.mkdir(cgroup)  # cgroupfs: rmdir, not rmtree, removes it
        try:
            prog.attach_cgroup(cgroup).close()
        finally:
            os.rmdir(cgroup)
    else:
        prog.attach()
    return True, "attached"


def _resolve_library_path(soname: str) -> str | None:
    for base in ("/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib64", "/lib"):
        candidate = os.path.join(base, soname)
        if os.path.exists(candidate):
            return candidate
    return None


_feature_lock = threading.Lock()


def attach_features(*, use_cache: bool = True) -> dict[str, tuple[bool, str]]:
    """Attach type → (works, detail), cached per boot in /run/deetune."""
    cache = CACHE_DIR / f"features-{_boot_id()}.json"
    with _feature_lock:
        if use_cache and cache.exists():
            try:
                return {k: (bool(v[0]), str(v[1])) for k, v in json.loads(cache.read_text()).items()}
            except (OSError, ValueError):
                pass
        results = {name: _try_feature(program) for name, program in FEATURES}
        try:
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(results))
        except OSError as exc:
            log.debug("cannot cache features in %s: %s", cache, exc)
        return results


#: Attach types the built-in probes need.
NEEDED_FEATURES = {"tracepoint", "tp_btf", "ringbuf"}


def run_checks(*, use_cache: bool = True) -> list[Check]:
    checks = [check_privileges(), check_kernel(), check_btf(), check_tracefs(), check_bpffs(), check_libbpf(), check_objects()]
    if all(c.ok for c in checks if c.essential):
        for name, (works, detail) in attach_features(use_cache=use_cache).items():
            checks.append(Check(f"attach {name}", works, detail, essential=name in NEEDED_FEATURES))
    checks.extend(check_tls())
    return checks


def check_tls() -> list[Check]:
    """The TLS libraries and programs the tls probe would read, and those it cannot (named)."""
    from deetune.probes.tls import scan_host

    try:
        probeable, unprobed = scan_host()
    except OSError as exc:
        return [Check("tls", False, f"cannot look at the processes: {exc}", essential=False)]
    names = ", ".join(f"{t.path}{' (' + t.version + ')' if t.version else ''}" for t in probeable)
    checks = [Check("tls", bool(probeable), f"{len(probeable)} probed: {names}" if probeable
                    else "no OpenSSL library or Go program with crypto/tls found", essential=False)]
    for entry in unprobed:
        checks.append(Check("tls not probed", False, entry.describe(), essential=False))
    return checks


def bpf_stats_enabled() -> bool:
    try:
        return pathlib.Path("/proc/sys/kernel/bpf_stats_enabled").read_text().strip() == "1"
    except OSError:
        return False


__all__ = ["Check", "run_checks", "essential_problem", "attach_features"]
