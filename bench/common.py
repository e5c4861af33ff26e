"""Shared helpers of the overhead benchmarks (bench_connections.py, bench_l7.py, run_all.py).

- :class:`Agent`: ``python -m deetune.agent -v --sink jsonl:PATH ...`` as a subprocess, ready once
  stderr said ``probe NAME attached`` for every probe; CPU time and RSS from /proc while it runs,
  CPU time and peak RSS of its whole life from wait4(2), its final summary line (records, lost).
- :func:`bpf_stats`: BPF run-time statistics on for the duration, through a ``BPF_ENABLE_STATS``
  file descriptor (off again when this process ends, however it ends).  Fixed-rate runs only: the
  statistics cost two clock reads per program run, which a throughput run would charge to the agent.
- :func:`prog_stats`: run_cnt / run_time_ns of given program ids from ``bpftool -j prog show``;
  the agent's program ids come from its /proc/PID/fdinfo (exact, whatever else is loaded).
- :func:`loadgen`: the C load generator (bench/loadgen.c), compiled with gcc on first use.
- :func:`interleave`, :func:`median`, :func:`pair_ratios`, :func:`table`, :func:`save_results`, :func:`report`.

Benchmarks print their figures; they are not tests.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import socket
import statistics
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

_SUMMARY = re.compile(r"^deetune: (\d+) events in ([\d.]+)s; (.*)$")
_PROBE_PART = re.compile(r"^(\S+): (\d+) records, (\d+) lost(?:, (\d+) undecodable)?"
                         r"(?:, (\d+) (?:calls|records) left out by overload sampling \(down to 1 connection in (\d+)\))?"
                         r"(?:, \d+ [a-z ]+)*$")  # a probe's own counters (the tls probe's)


_SNAPSHOT: str | None = None


def source_snapshot() -> str:
    """A copy of src/deetune taken once per benchmark process, imported by every agent and decoder run
    (through PYTHONPATH): other people edit the tree while a benchmark runs, and all runs of one
    benchmark must measure the same code."""
    global _SNAPSHOT
    if _SNAPSHOT is None and os.environ.get("DEETUNE_BENCH_SOURCE"):
        _SNAPSHOT = os.environ["DEETUNE_BENCH_SOURCE"]  # a directory holding a deetune/ package to measure
    if _SNAPSHOT is None:
        root = tempfile.mkdtemp(prefix="deetune-src-")
        shutil.copytree(REPO / "src" / "deetune", os.path.join(root, "deetune"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        atexit.register(shutil.rmtree, root, True)
        _SNAPSHOT = root
    return _SNAPSHOT


def source_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": source_snapshot()}


def source_digest() -> str:
    digest = hashlib.sha256()
    root = pathlib.Path(source_snapshot())
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the machine ------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu": model,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": _git(["git", "rev-parse", "--short", "HEAD"]),
        "git_dirty_src": _git(["git", "status", "--short", "--", "src", "bpf"]).splitlines(),
        "source_snapshot_sha256": source_digest(),
    }


def _git(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=10).stdout.strip()
    except OSError:
        return ""


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(count: int, start: int = 20000) -> int:
    """First port of ``count`` consecutive free ports (below the ephemeral range)."""
    base = start
    while base + count < 32768:
        try:
            sockets = []
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            base += count
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port range")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# -- /proc -----------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after "pid (comm)": state is fields[0]; utime is field 14 of stat(5) → index 11 here
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) / 1024
    return {"rss_mb": out.get("VmRSS", 0.0), "hwm_mb": out.get("VmHWM", 0.0)}


def smaps_breakdown(pid: int, top: int = 8) -> dict[str, float]:
    """Resident MiB by mapping name (ring buffers show up as anon_inode:bpf-map, mapped twice over)."""
    sizes: dict[str, int] = {}
    name = "?"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping line: range perms offset dev inode [path]
                name = head[5].strip() if len(head) > 5 else "[anonymous]"
                if name.endswith(".so") or ".so." in name:
                    name = "shared libraries"
            elif line.startswith("Rss:"):
                sizes[name] = sizes.get(name, 0) + int(line.split()[1])
    ordered = sorted(sizes.items(), key=lambda kv: -kv[1])
    return {k: round(v / 1024, 1) for k, v in ordered[:top]} | {"total": round(sum(sizes.values()) / 1024, 1)}


def schedstat(pid: int, *, main_thread: bool = False) -> tuple[float, float]:
    """(seconds on a CPU, seconds waiting on a run queue) of all of a process's threads
    (/proc/PID/schedstat alone is the main thread's; the store and sinks have threads of their own)."""
    on_cpu = waiting = 0
    for task in [str(pid)] if main_thread else os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                fields = f.read().split()
        except FileNotFoundError:  # a thread that just ended
            continue
        on_cpu += int(fields[0])
        waiting += int(fields[1])
    return on_cpu / 1e9, waiting / 1e9


def tcp_table_size() -> int:
    """Lines of /proc/net/tcp + tcp6 (TIME_WAIT sockets included): what the tcp probe's start-up snapshot parses."""
    total = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name, "rb") as f:
            total += sum(1 for _ in f) - 1
    return total


def listen_overflows() -> int:
    """The kernel's count of connections refused because a listener's accept queue was full
    (TcpExt ListenOverflows): each makes the client retry its SYN a second later."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split()))["ListenOverflows"])
    raise RuntimeError("no TcpExt ListenOverflows in /proc/net/netstat")


@contextlib.contextmanager
def busy_loops(on: bool = True, settle: float = 0.5) -> Iterator[None]:
    """A saturated host while on: one busy loop per CPU at nice 19, so that no CPU is ever idle;
    ended by pid.  ``settle`` seconds for the scheduler to spread them before the load starts."""
    loops = [subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"])
             for _ in range(os.cpu_count() or 1)] if on else []
    try:
        if loops:
            time.sleep(settle)
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def busy_cores_since(snapshot: tuple[float, list[int]] | None = None):
    """Without argument: a snapshot of /proc/stat; with one: cores busy (all processes) since it."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    now = (time.monotonic(), fields)
    if snapshot is None:
        return now
    wall = now[0] - snapshot[0]
    delta = [b - a for a, b in zip(snapshot[1], now[1])]
    idle = delta[3] + delta[4]  # idle + iowait
    return round((sum(delta[:8]) - idle) / CLK_TCK / wall, 2) if wall > 0 else None


class OtherCpu:
    """CPU used during a window by processes outside this benchmark's process tree (other people's test runs)."""

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _ours() -> set[int]:
        import psutil

        me = psutil.Process()
        return {me.pid, *(c.pid for c in me.children(recursive=True))}

    def _sample(self) -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for p in psutil.process_iter(["pid", "name", "cpu_times"]):
            times = p.info["cpu_times"]
            if times is not None:
                out[p.info["pid"]] = (p.info["name"], times.user + times.system)
        return out

    def stop(self, wall: float) -> dict[str, Any]:
        end = self._sample()
        ours = self._ours()
        used: dict[str, float] = {}
        for pid, (name, cpu) in end.items():
            if pid in ours:
                continue
            delta = cpu - self.start[pid][1] if pid in self.start else cpu  # else: started during the window
            if delta > 0.01:
                used[name] = used.get(name, 0.0) + delta
        top = dict(sorted(((k, round(v / wall, 2)) for k, v in used.items()), key=lambda kv: -kv[1])[:5])
        return {"other_cores": round(sum(used.values()) / wall, 2), "other_top": top}


#: Environment knobs for a machine that never goes quiet: DEETUNE_BENCH_QUIET_WAIT (s, 0: do not wait),
#: DEETUNE_BENCH_RETRIES (times a disturbed round is run again).
QUIET_WAIT = float(os.environ.get("DEETUNE_BENCH_QUIET_WAIT", "45"))
RETRIES = int(os.environ.get("DEETUNE_BENCH_RETRIES", "1"))


def wait_quiet(threshold: float = 0.3, max_wait: float | None = None) -> float:
    """Wait (up to max_wait s) until the host is nearly idle: busy cores below threshold over 1 s.
    Other engineers' test runs share this 2-core machine; starting a run in the middle of one skews it.
    Returns the seconds waited."""
    max_wait = QUIET_WAIT if max_wait is None else max_wait
    began = time.monotonic()
    while time.monotonic() - began < max_wait:
        snap = busy_cores_since()
        time.sleep(1.0)
        if busy_cores_since(snap) < threshold:
            break
    return round(time.monotonic() - began, 1)


def prog_ids_of(pid: int) -> set[int]:
    """Ids of the BPF programs a process holds (its program and link file descriptors)."""
    ids = set()
    fdinfo = pathlib.Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


# -- BPF statistics --------------------------------------------------------------------------------------
_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0


def _enable_stats_fd() -> int | None:
    """bpf(BPF_ENABLE_STATS): counters stay on while the returned fd is open."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint8 * 128)()  # union bpf_attr, enable_stats.type = 0 (run time)
    fd = libc.syscall(_SYS_BPF, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
    return fd if fd >= 0 else None


@contextlib.contextmanager
def bpf_stats() -> Iterator[None]:
    """BPF run-time statistics on for the duration: through a BPF_ENABLE_STATS file descriptor,
    so that they go off with this process even when it is killed.  (Writing the
    ``kernel.bpf_stats_enabled`` sysctl did not: a killed run left them on, and every later
    program run paid two clock reads, a slow paravirtual clock in a VM.)  Use them only where
    their cost is not what is measured: a throughput run with them on reports the overhead of
    the statistics as the agent's."""
    fd = _enable_stats_fd()
    if fd is None:
        raise RuntimeError("bpf(BPF_ENABLE_STATS) failed: run as root on Linux 5.8 or later")
    try:
        yield
    finally:
        os.close(fd)


def all_programs() -> list[dict[str, Any]]:
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


def prog_stats(ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """{id: {name, run_cnt, run_time_ns}} of the given programs, from bpftool."""
    wanted = set(ids)
    return {
        p["id"]: {"name": p.get("name", "?"), "run_cnt": p.get("run_cnt", 0), "run_time_ns": p.get("run_time_ns", 0)}
        for p in all_programs()
        if p["id"] in wanted
    }


def sum_stats(stats: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Totals and a per-program breakdown (by name, summed), largest run time first."""
    by_name: dict[str, list[int]] = {}
    for s in stats.values():
        entry = by_name.setdefault(s["name"], [0, 0])
        entry[0] += s["run_cnt"]
        entry[1] += s["run_time_ns"]
    return {
        "run_cnt": sum(s["run_cnt"] for s in stats.values()),
        "run_time_ns": sum(s["run_time_ns"] for s in stats.values()),
        "programs": {
            name: {"run_cnt": c, "run_time_ns": t, "ns_per_run": round(t / c, 1) if c else None}
            for name, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])
        },
    }


def stats_between(before: dict[int, dict[str, Any]], after: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """:func:`sum_stats` of what the programs ran between two :func:`prog_stats` readings."""
    return sum_stats({pid: {**s, "run_cnt": s["run_cnt"] - before.get(pid, {}).get("run_cnt", 0),
                            "run_time_ns": s["run_time_ns"] - before.get(pid, {}).get("run_time_ns", 0)}
                      for pid, s in after.items()})


def foreign_programs(exclude: Iterable[int] = ()) -> list[str]:
    """Names of tracing programs loaded by someone else (other test runs add load to every run)."""
    excluded = set(exclude)
    return sorted(
        p.get("name", "?")
        for p in all_programs()
        if p["id"] not in excluded and p.get("type") in ("tracepoint", "raw_tracepoint", "tracing", "kprobe")
    )


# -- the agent -------------------------------------------------------------------------------------------
def parse_summary(line: str) -> dict[str, Any] | None:
    """``deetune: N events in Xs; probe: R records, L lost; ...`` → dict."""
    match = _SUMMARY.match(line.strip())
    if not match:
        return None
    probes = {}
    for part in match.group(3).split("; "):
        m = _PROBE_PART.match(part.strip())
        if m:
            probes[m.group(1)] = {"records": int(m.group(2)), "lost": int(m.group(3)), "undecodable": int(m.group(4) or 0),
                                  "sampled_out": int(m.group(5) or 0), "sparsest_sampling": int(m.group(6) or 1)}
    return {
        "events": int(match.group(1)),
        "seconds": float(match.group(2)),
        "probes": probes,
        "records": sum(p["records"] for p in probes.values()),
        "lost": sum(p["lost"] for p in probes.values()),
        "sampled_out": sum(p["sampled_out"] for p in probes.values()),
        "sparsest_sampling": max((p["sparsest_sampling"] for p in probes.values()), default=1),
    }


_AGENT_HELP: str | None = None


def agent_supports(option: str) -> bool:
    """Whether the agent under test (the source snapshot) has a command-line option."""
    global _AGENT_HELP
    if _AGENT_HELP is None:
        out = subprocess.run([PYTHON, "-m", "deetune.agent", "--help"], capture_output=True, text=True, cwd=REPO,
                             env=source_env(), timeout=60)
        _AGENT_HELP = out.stdout
    return option in _AGENT_HELP


class Agent:
    """``python -m deetune.agent -v --sink jsonl:PATH --probe ... [extra]`` in a subprocess.

    Agents that keep a topology store by default (``--store``, default /var/lib/deetune) keep it,
    as users run them, but in a file next to the jsonl file, deleted with it."""

    def __init__(self, probes: Sequence[str], jsonl: str | os.PathLike, extra: Sequence[str] = (),
                 *, python_args: Sequence[str] = (), ready_timeout: float = 60.0):
        self.probes = list(probes)
        self.jsonl = str(jsonl)
        self.argv = [PYTHON, *python_args, "-m", "deetune.agent", "-v", "--sink", f"jsonl:{self.jsonl}"]
        for probe in self.probes:
            self.argv += ["--probe", probe]
        self.argv += list(extra)
        # e.g. DEETUNE_BENCH_AGENT_ARGS="--nice 10": compare agent settings without editing a benchmark.
        self.argv += shlex.split(os.environ.get("DEETUNE_BENCH_AGENT_ARGS", ""))
        self.store = None
        if agent_supports("--store") and "--store" not in extra and "--no-store" not in extra:
            self.store = self.jsonl + ".store.db"
            self.argv += ["--store", self.store]
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.stderr: list[str] = []
        self._attached: set[str] = set()
        self._wanted = set(self.probes) | ({"tcp-snapshot"} if "tcp" in self.probes else set())
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self.prog_ids: set[int] = set()
        self._window: dict[str, float] = {}
        self.result: dict[str, Any] = {}

    def _read_stderr(self) -> None:
        assert self.proc and self.proc.stderr
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))
            m = re.search(r"probe (\S+) attached", line)
            if m:
                self._attached.add(m.group(1))
            elif "connections were open before the probe" in line:
                # the tcp probe's /proc snapshot, taken after its "attached" line
                self._attached.add("tcp-snapshot")
            if self._attached >= self._wanted:
                self._ready.set()
        self._ready.set()  # exited: wake start() up

    def start(self) -> "Agent":
        pathlib.Path(self.jsonl).unlink(missing_ok=True)
        self._remove_store()
        self.result["argv"] = self.argv[1:]
        self.result["tcp_table_at_start"] = tcp_table_size()
        began = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO, env=source_env())
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        if not self._ready.wait(self.ready_timeout) or self.proc.poll() is not None:
            tail = "\n".join(self.stderr[-10:])
            self.kill()
            raise RuntimeError(f"agent not ready ({' '.join(self.argv)}):\n{tail}")
        time.sleep(0.3)  # the pipeline sets up its epoll set after the last probe
        self.prog_ids = prog_ids_of(self.proc.pid)
        self.result["startup_s"] = round(time.monotonic() - began, 2)
        self.result["startup_hwm_mb"] = round(memory_mb(self.proc.pid)["hwm_mb"], 1)
        return self

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def begin_window(self) -> None:
        """Mark the start of the measured workload (CPU time is counted from here)."""
        on_cpu, waiting = schedstat(self.pid)
        self._window = {"cpu": cpu_seconds(self.pid), "t": time.monotonic(), "on_cpu": on_cpu, "runq": waiting,
                        "main": schedstat(self.pid, main_thread=True)[0]}

    def end_window(self) -> dict[str, Any]:
        """CPU (in cores), memory and BPF counters over the workload, read while the agent still runs."""
        cpu = cpu_seconds(self.pid)
        on_cpu, waiting = schedstat(self.pid)
        wall = time.monotonic() - self._window["t"]
        out = {
            "window_s": round(wall, 3),
            # from schedstat (ns resolution) rather than ticks: time on a CPU, and waiting for one
            "oncpu_cores": round((on_cpu - self._window["on_cpu"]) / wall, 3) if wall > 0 else None,
            "main_oncpu_cores": round((schedstat(self.pid, main_thread=True)[0] - self._window["main"]) / wall, 3)
            if wall > 0 else None,
            "runq_wait_s": round(waiting - self._window["runq"], 3),
            "cpu_s": round(cpu - self._window["cpu"], 3),
            "cpu_cores": round((cpu - self._window["cpu"]) / wall, 3) if wall > 0 else None,
            **{k: round(v, 1) for k, v in memory_mb(self.pid).items()},
        }
        self.result.update(out)
        return out

    def stop(self, timeout: float = 300.0) -> dict[str, Any]:
        """SIGTERM, wait (it drains its rings first), then: summary, lost, lifetime CPU and peak RSS."""
        assert self.proc
        stop_at = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        rusage = None
        while True:
            pid, status, rusage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                pid, status, rusage = os.wait4(self.proc.pid, 0)
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.result["killed_after_s"] = timeout
                break
            time.sleep(0.05)
        if self._reader:
            self._reader.join(10)
        summary = next((parse_summary(l) for l in reversed(self.stderr) if parse_summary(l)), None)
        self.result.update({
            "exit_code": self.proc.returncode,
            "stop_s": round(time.monotonic() - stop_at, 2),
            "lifetime_cpu_s": round(rusage.ru_utime + rusage.ru_stime, 3) if rusage else None,
            "lifetime_maxrss_mb": round(rusage.ru_maxrss / 1024, 1) if rusage else None,
            "summary": summary,
            "lost": summary["lost"] if summary else None,
            "sampled_out": summary["sampled_out"] if summary else None,
            "sparsest_sampling": summary["sparsest_sampling"] if summary else None,
            "warnings": [l for l in self.stderr if " WARNING " in l or " ERROR " in l][:20],
        })
        if self.store:
            self.result["store_mb"] = round(sum(
                os.path.getsize(self.store + x) for x in ("", "-wal") if os.path.exists(self.store + x)) / 2**20, 1)
            self._remove_store()
        if summary is None:
            self.result["stderr_tail"] = self.stderr[-15:]
        elif rusage and self._window and summary["records"]:
            # CPU from the start of the load to the exit (drain included) per record read from the rings
            self.result["cpu_us_per_record"] = round(
                (rusage.ru_utime + rusage.ru_stime - self._window["cpu"]) / summary["records"] * 1e6, 1)
        return self.result

    def _remove_store(self) -> None:
        if self.store:
            for suffix in ("", "-wal", "-shm", "-journal"):
                pathlib.Path(self.store + suffix).unlink(missing_ok=True)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- the load generator ----------------------------------------------------------------------------------
def loadgen() -> str:
    """Path of the compiled bench/loadgen.c (rebuilt when the source is newer)."""
    source = BENCH / "loadgen.c"
    binary = RESULTS / "bin" / "loadgen"
    if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
        binary.parent.mkdir(parents=True, exist_ok=True)
        if not shutil.which("gcc"):
            raise RuntimeError("gcc is needed to build bench/loadgen.c (apt-get install gcc)")
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return str(binary)


def run_json(argv: Sequence[str], timeout: float = 600) -> dict[str, Any]:
    """Run a command whose last stdout line is JSON."""
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- jsonl -----------------------------------------------------------------------------------------------
def scan_jsonl(path: str | os.PathLike, needle: str, keep: Callable[[dict], Any]) -> dict[Any, int]:
    """Count events by ``keep(event)`` (None: not counted) over lines containing ``needle``."""
    counts: dict[Any, int] = {}
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as f:
        for line in f:
            if needle not in line:
                continue
            key = keep(json.loads(line))
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
    return counts


# -- statistics and output -------------------------------------------------------------------------------
#: A run during which processes outside the benchmark used more CPU than this (cores) is "disturbed".
DISTURBED_CORES = 0.3


def disturbed(result: dict[str, Any]) -> bool:
    return (result.get("other_cores") or 0) > DISTURBED_CORES


def interleave(modes: Sequence[str], rounds: int, run: Callable[[str, int], dict[str, Any]],
               *, retries: int | None = None) -> tuple[dict[str, list[dict]], list[dict[str, dict]]]:
    """Run ``run(mode, round)`` as A B C … A B C …; results by mode, in round order.

    A round in which any run was disturbed by other processes' load (other engineers' test runs on this
    shared 2-core machine) is run again, up to ``retries`` times; the last attempt is kept either way
    (and flagged ``disturbed``).  Returns (kept results by mode, discarded rounds)."""
    retries = RETRIES if retries is None else retries
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    discarded: list[dict[str, dict]] = []
    for r in range(rounds):
        for attempt in range(retries + 1):
            current = {}
            for mode in modes:
                current[mode] = run(mode, r)
                current[mode]["disturbed"] = disturbed(current[mode])
            if not any(x["disturbed"] for x in current.values()) or attempt == retries:
                break
            log(f"  round {r + 1}: others used > {DISTURBED_CORES} cores during a run: running the round again")
            discarded.append(current)
        for mode in modes:
            results[mode].append(current[mode])
    return results, discarded


def median(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def pair_ratios(a: Sequence[float | None], b: Sequence[float | None]) -> list[float | None]:
    """b[i] / a[i] for each interleaved pair."""
    return [None if x in (None, 0) or y is None else y / x for x, y in zip(a, b)]


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def save_results(name: str, data: dict[str, Any]) -> pathlib.Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{stamp}.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def report(name: str, out: dict[str, Any], texts: Sequence[str], targets: list[list[str]] | None = None) -> dict[str, Any]:
    """The end of every benchmark: the texts (and the targets' table) on stdout, the raw results
    saved as bench/results/NAME-STAMP.json (with the targets), and ``out`` returned."""
    texts = list(texts)
    if targets is not None:
        texts.append("Targets:\n" + table(["target", "measured", ""], targets))
        out["targets"] = targets
    print("\n\n".join(texts))
    print(f"\nraw results: {save_results(name, out)}")
    return out


def require_root() -> None:
    if os.geteuid() != 0:
        sys.exit("the benchmarks load BPF programs and need root")
