"""The reference agent as users run it: a subprocess, its CLI, its exits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.harness import TcpPeer

AGENT = [sys.executable, "-m", "deetune.agent"]


def run_agent(*args: str, timeout: float = 60, user: str | None = None) -> subprocess.CompletedProcess:
    cmd = [*AGENT, *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", "--inh-caps=-all", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def loaded_program_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "prog", "list"], capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out)}


def program_ids_of(pid: int) -> set[int]:
    """BPF programs a process holds, from the fdinfo of its descriptors (other
    agents and tests may load programs on this host at the same time)."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def wait_unloaded(ids: set[int], timeout: float = 10) -> set[int]:
    """The kernel frees programs when the last descriptor goes; give it a moment."""
    deadline = time.monotonic() + timeout
    while (left := ids & loaded_program_ids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


_started_agents: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_agent_outlives_its_test():
    """A test that fails between starting the agent and stopping it must not leave it running
    (one did: it went on capturing every benchmark run on the host for an hour)."""
    yield
    while _started_agents:
        proc = _started_agents.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)


class AgentProcess:
    """The agent in the background, ready once every probe has attached."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([*AGENT, "-v", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _started_agents.append(self.proc)
        self.stderr: list[str] = []
        probes = [args[i + 1] for i, a in enumerate(args) if a == "--probe"] or ["process", "tcp"]
        waiting = set(probes)
        deadline = time.monotonic() + 30
        while waiting and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.stderr.append(line)
            for name in list(waiting):
                if f"probe {name} attached" in line:
                    waiting.discard(name)
        if waiting:
            self.proc.kill()
            raise AssertionError(f"agent did not attach {waiting}: {''.join(self.stderr)}")

    def finish(self, sig: int = signal.SIGTERM, timeout: float = 20) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, "".join(self.stderr) + err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--probe", "nope"], "deetune: unknown probe 'nope'; available: "),
        (["--sink", "nope:x"], "deetune: unknown sink 'nope'; available: "),
        (["--sink", "jsonl"], "deetune: jsonl sink needs a path: --sink jsonl:PATH (or jsonl:- for stdout)"),
        (["--sink", "jsonl:/nonexistent/dir/x.jsonl"], "deetune: cannot open /nonexistent/dir/x.jsonl for the jsonl sink: No such file or directory"),
        (["--sink", "console:extra"], "deetune: sink console takes no argument (got 'extra')"),
        (["--duration", "-3"], "deetune: argument --duration: must be positive: '-3'"),
        (["--port", "70000"], "deetune: argument --port: not a TCP port (1-65535): '70000'"),
        (["--pid", "abc"], "deetune: argument --pid: not a process id: 'abc'"),
        (["--exchanges-per-edge", "-1"], "deetune: argument --exchanges-per-edge: expected a count or 'all': '-1'"),
        (["--nice", "20"], "deetune: argument --nice: must be 0 to 19 or 'idle': '20'"),
        (["--nice", "low"], "deetune: argument --nice: must be 0 to 19 or 'idle': 'low'"),
        (["--busy-cpu", "0"], "deetune: argument --busy-cpu: must be a number of cores above 0, or 'off': '0'"),
        (["--busy-cpu", "half"], "deetune: argument --busy-cpu: must be a number of cores above 0, or 'off': 'half'"),
        (["--bogus"], "deetune: unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args, message):
    result = run_agent(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(message)
    assert "Traceback" not in result.stderr


def test_unknown_probe_lists_the_available_ones():
    result = run_agent("--probe", "nope")
    available = result.stderr.split("available: ", 1)[1].strip().split(", ")
    assert {"process", "tcp"} <= set(available)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) missing")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
@pytest.mark.parametrize("command", [[], ["doctor"]])
def test_not_root_is_a_clear_message_and_exit_2(command):
    result = run_agent(*command, "--duration", "1", user="65534") if not command else run_agent(*command, user="65534")
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "deetune: privileges: needs root (or CAP_BPF and CAP_PERFMON): run it with sudo"
        if not command
        else "deetune: cannot run: privileges: needs root (or CAP_BPF and CAP_PERFMON): run it with sudo"
    )


def test_plugins_command_lists_builtins():
    result = run_agent("plugins")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert "probes:" in lines and "decoders:" in lines and "sinks:" in lines
    assert any(line.split()[0] == "tcp" and line.endswith("[deetune.builtin]") for line in lines if line.startswith("  "))
    assert any(line.split()[0] == "jsonl" for line in lines if line.startswith("  "))


@pytest.mark.bpf
def test_doctor_reports_what_works():
    result = run_agent("doctor", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line[5:].split()[0] + ("" if not line[5:].startswith("attach") else " " + line[5:].split()[1]): line[:4].strip() for line in result.stdout.splitlines()}
    assert rows["privileges"] == "ok" and rows["btf"] == "ok" and rows["tracefs"] == "ok"
    assert rows["attach tracepoint"] == "ok" and rows["attach tp_btf"] == "ok" and rows["attach ringbuf"] == "ok"
    # What these machines allow, each loaded and attached for real (uprobe on libc's getpid,
    # cgroup programs on an empty cgroup of the doctor's own).
    for kind in ("raw_tracepoint", "uprobe", "socket_filter", "cgroup_skb", "sockops"):
        assert rows[f"attach {kind}"] == "ok", kind
    # On these machines kprobes and fentry are refused; the doctor says so without failing.
    assert rows["attach kprobe"] in ("ok", "no") and rows["attach fentry"] in ("ok", "no")


@pytest.mark.bpf
def test_jsonl_events_and_clean_stop_on_sigterm(tmp_path):
    out = tmp_path / "events.jsonl"
    peer = TcpPeer(reply=300)
    agent = AgentProcess("--probe", "tcp", "--probe", "process", "--sink", f"jsonl:{out}", "--port", str(peer.port),
                         "--store", str(tmp_path / "t.db"))
    programs = program_ids_of(agent.proc.pid)
    assert len(programs) == 9  # tcp 6 + process 3
    with socket.create_connection(("127.0.0.1", peer.port)) as client:
        lport = client.getsockname()[1]
        client.sendall(b"x" * 200)
        client.shutdown(socket.SHUT_WR)
        while client.recv(4096):
            pass
    peer.finish()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and out.read_text().count('"phase":"close"') < 2:
        time.sleep(0.05)
    code, _, err = agent.finish(signal.SIGTERM)
    assert code == 0, err
    assert "records, 0 lost" in err.splitlines()[-1]
    assert wait_unloaded(programs) == set()

    events = [json.loads(line) for line in out.read_text().splitlines()]
    conns = [e for e in events if e["type"] == "connection"]
    assert sorted((e["phase"], e["role"]) for e in conns) == [
        ("close", "client"), ("close", "server"), ("open", "client"), ("open", "server")
    ]
    client_close = next(e for e in conns if e["phase"] == "close" and e["role"] == "client")
    assert {k: client_close[k] for k in ("pid", "laddr", "lport", "raddr", "rport", "bytes_sent", "bytes_received", "retransmits")} == {
        "pid": os.getpid(), "laddr": "127.0.0.1", "lport": lport, "raddr": "127.0.0.1", "rport": peer.port,
        "bytes_sent": 200, "bytes_received": 300, "retransmits": 0,
    }
    assert isinstance(client_close["duration_ns"], int) and isinstance(client_close["ts"], int)
    assert client_close["comm"] == open("/proc/self/comm").read().strip()


@pytest.mark.bpf
@pytest.mark.parametrize("extra", [(), ("--tls",)])
def test_tls_probe_runs_only_when_asked(tmp_path, extra):
    """The tls probe costs every TLS call two uprobe traps: it is opt-in (--tls)."""
    result = run_agent("--duration", "1", "--no-store", "--sink", "jsonl:/dev/null", "-v", *extra)
    assert result.returncode == 0, result.stderr
    attached = {line.split("probe ", 1)[1].split()[0] for line in result.stderr.splitlines()
                if " attached" in line and "probe " in line}
    assert {"payload", "process", "tcp"} <= attached, result.stderr  # and installed plugins' probes
    assert ("tls" in attached) == bool(extra), result.stderr
    listing = run_agent("plugins").stdout
    assert "(not run unless named: --probe tls, --tls)" in next(l for l in listing.splitlines() if l.split()[:1] == ["tls"])


@pytest.mark.bpf
def test_duration_and_stdout_sink(tmp_path):
    result = run_agent("--probe", "process", "--sink", "jsonl:-", "--duration", "1.5", "--no-store")
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines():
        assert json.loads(line)["type"] == "process"
    assert result.stderr.startswith("deetune: ") and "process:" in result.stderr


@pytest.mark.bpf
def test_nice_lowers_the_agents_priority_only(tmp_path):
    agent = AgentProcess("--probe", "process", "--sink", "jsonl:/dev/null", "--no-store", "--nice", "7")
    # /proc/PID/stat field 19 is the nice value; comm (field 2) may hold spaces, so split after it.
    fields = open(f"/proc/{agent.proc.pid}/stat").read().rpartition(")")[2].split()
    assert int(fields[16]) == os.nice(0) + 7
    assert int(fields[38]) == os.SCHED_OTHER  # field 41: scheduling policy
    code, _, err = agent.finish()
    assert code == 0, err


@pytest.mark.bpf
def test_nice_idle_runs_the_agent_only_on_idle_cpus(tmp_path):
    agent = AgentProcess("--probe", "process", "--sink", "jsonl:/dev/null", "--no-store", "--nice", "idle")
    for task in os.listdir(f"/proc/{agent.proc.pid}/task"):  # every thread, started after the switch
        fields = open(f"/proc/{agent.proc.pid}/task/{task}/stat").read().rpartition(")")[2].split()
        assert int(fields[38]) == os.SCHED_IDLE
    code, _, err = agent.finish()
    assert code == 0, err


@pytest.mark.bpf
def test_kill_9_leaves_nothing_attached(tmp_path):
    agent = AgentProcess("--sink", "jsonl:/dev/null", "--store", str(tmp_path / "t.db"))
    programs = program_ids_of(agent.proc.pid)
    assert len(programs) >= 9 + 3  # tcp, process, payload (and any installed plugin's)
    assert programs <= loaded_program_ids()
    agent.finish(signal.SIGKILL)
    assert agent.proc.returncode == -signal.SIGKILL
    assert wait_unloaded(programs) == set()


@pytest.mark.parametrize(("value", "kept"), [("0", 0), ("25", 25), ("all", None)])
def test_exchanges_per_edge_reaches_the_store(tmp_path, value, kept):
    from deetune.agent import build_parser, open_store

    args = build_parser().parse_args(["--exchanges-per-edge", value, "--window", "5"])
    store = open_store(str(tmp_path / "d" / "t.db"), 3600, exchanges_per_edge=args.exchanges_per_edge,
                       window=args.window)
    try:
        assert (store.max_exchanges_per_edge_window, store.exchange_window_ns) == (kept, 5_000_000_000)
    finally:
        store.close()
