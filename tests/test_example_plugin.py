"""The example third-party plugin (examples/deetune-signals), end to end.

It is installed by ``make examples`` (``make test`` depends on it): a probe
``signals`` with its own BPF object and a sink ``csv``, both found through the
``deetune`` entry-point group.  Tests marked ``bpf`` load the probe into the
running kernel (tests/conftest.py skips them without root/BTF, and fails them
under CI=true).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from deetune.events import ConnectionEvent, ProcessEvent
from deetune.plugins import Plugins
from deetune.sinks.base import SinkError

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def plugin():
    """The installed plugin package (skips, or fails under CI, when it is not installed)."""
    try:
        return importlib.import_module("deetune_signals")
    except ModuleNotFoundError:
        _unavailable("deetune-signals is not installed: run `make examples`")


@pytest.fixture
def signals_object(plugin):
    """The example's compiled BPF object for this machine (``make examples``)."""
    path = plugin.SignalsProbe().object_file()
    if not path.exists():
        _unavailable(f"{path} not built: run `make examples`")
    return path


def agent(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deetune.agent", *args], capture_output=True, text=True, timeout=60, **kwargs
    )


def bpf_prog_ids(pid: int) -> set[int]:
    """Ids of the BPF programs process ``pid`` holds (programs and links), from /proc."""
    ids = set()
    for info in pathlib.Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:  # the fd was closed meanwhile
            continue
        ids.update(int(m) for m in re.findall(r"^prog_id:\s+(\d+)$", text, re.M))
    return ids


def assert_gone(prog_ids: set[int]) -> None:
    """None of these programs is still loaded, nor attached by any link."""
    if shutil.which("bpftool") is None:
        return
    progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True).stdout or "[]")
    links = json.loads(subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout or "[]")
    assert not prog_ids & {p["id"] for p in progs}, "a program stayed loaded"
    assert not prog_ids & {link.get("prog_id") for link in links}, "a link stayed attached"


def spawn_sleep() -> subprocess.Popen:
    """A ``sleep 30`` child whose task name is already ``sleep``.

    Popen returns when exec closes its CLOEXEC pipe, which the kernel does
    shortly before it renames the task: wait for the new name.
    """
    child = subprocess.Popen(["sleep", "30"])
    deadline = time.monotonic() + 5
    while pathlib.Path(f"/proc/{child.pid}/comm").read_text().strip() != "sleep":
        if time.monotonic() > deadline:
            child.kill()
            child.wait()
            pytest.fail("sleep was not exec'd within 5 s")
        time.sleep(0.005)
    return child


# -- registration (no kernel needed) ---------------------------------------------


def test_agent_lists_the_plugin_with_its_origin(plugin):
    result = agent("plugins")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    probes = lines[lines.index("probes:") + 1 : lines.index("decoders:")]
    sinks = lines[lines.index("sinks:") + 1 :]
    # The origin is the entry point's name (pyproject: [project.entry-points.deetune] signals = ...).
    assert any(line.split()[0] == "signals" and line.endswith("[signals]") for line in probes), probes
    assert any(line.split()[0] == "csv" and line.endswith("[signals]") for line in sinks), sinks
    assert "signals" in lines[-1].removeprefix("plugins: ").split(", ")


def test_plugin_registers_through_the_entry_point(plugin):
    plugins = Plugins()
    assert plugins.probes.get("signals") is plugin.SignalsProbe
    assert plugins.sinks.get("csv") is plugin.CsvSink
    assert plugins.probes.origin("signals") == plugins.sinks.origin("csv") == "signals"
    # Without entry points only the built-ins are there.
    assert "signals" not in Plugins(load_entry_points=False).probes


def test_unknown_sink_lists_csv_among_available(plugin):
    result = agent("--probe", "signals", "--sink", "nope")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("deetune: unknown sink 'nope'; available: ")
    available = result.stderr.strip().split("available: ", 1)[1].split(", ")
    assert "csv" in available and "jsonl" in available


@pytest.mark.parametrize(
    "spec, message",
    [
        ("csv:/nonexistent-dir/x.csv", "deetune: cannot open /nonexistent-dir/x.csv for the csv sink: No such file or directory"),
        ("csv", "deetune: csv sink needs a path: --sink csv:PATH (or csv:- for stdout)"),
    ],
)
def test_bad_csv_spec_is_a_one_line_usage_error(plugin, spec, message):
    result = agent("--probe", "signals", "--sink", spec)
    assert result.returncode == 2
    assert result.stderr == message + "\n"


# -- record layout and decoding (no kernel needed) ---------------------------------


def test_record_layout_matches_the_header(plugin):
    from deetune_signals import records

    assert records.ffi.sizeof("struct dt_signal_record") == records.SIGNAL_RECORD.size == 80
    # No implicit padding: the fields tile the record.
    layout = records.ffi.typeof("struct dt_signal_record")
    end = 0
    for _, field in layout.fields:
        assert field.offset == end
        end = field.offset + records.ffi.sizeof(field.type)
    assert end == records.SIGNAL_RECORD.size


def test_decode_a_record(plugin):
    from deetune_signals import records

    values = {
        "hdr_kind": records.lib.DT_REC_SIGNAL, "hdr_pid": 100, "hdr_ts_ns": 5_000,
        "sender_tid": 101, "sender_uid": 1000, "target_pid": 200, "sig": int(signal.SIGUSR1),
        "code": 0, "err": 0, "result": records.lib.DT_SIGNAL_IGNORED, "group": 1,
        "sender_comm": b"kill\0", "target_comm": b"sleep\0",
    }
    raw = records.SIGNAL_RECORD.pack(*(values[name] for name in records.SIGNAL_FIELDS))
    probe = plugin.SignalsProbe()
    (event,) = probe.decode(raw)
    assert event.to_json() == {
        "type": "signal", "ts": probe.clock.wall(5_000), "ts_mono_ns": 5_000,
        "sig": 10, "signame": "SIGUSR1", "sender_pid": 100, "sender_tid": 101, "sender_uid": 1000,
        "sender_comm": "kill", "target_pid": 200, "target_comm": "sleep", "group": True,
        "code": 0, "si_errno": 0, "result": "ignored",
    }


def test_signal_option_accepts_names_and_numbers(plugin):
    assert plugin.SignalsOptions(sig="USR2").sig == plugin.SignalsOptions(sig="SIGUSR2").sig == 12
    assert plugin.SignalsOptions(sig="12").sig == 12 and plugin.SignalsOptions().sig is None
    with pytest.raises(ValueError, match="unknown signal"):
        plugin.SignalsOptions(sig="SIGNOPE")


def test_options_set_the_knobs(plugin, signals_object):
    from deetune.libbpf import BpfObject

    # Opening an object (no load) needs libbpf but no privileges.
    with BpfObject.open(signals_object) as obj:
        # Its own knobs, and the one every object gets from common.bpf.h (--netns).
        assert set(obj.constants()) == {"targ_sig", "targ_tgid", "dt_targ_netns"}
        plugin.SignalsProbe().configure(obj)
        assert obj.get_constant("targ_sig") == obj.get_constant("targ_tgid") == bytes(4)
        plugin.SignalsProbe(plugin.SignalsOptions(sig="SIGTERM", pid=4242)).configure(obj)
        assert int.from_bytes(obj.get_constant("targ_sig"), "little") == 15
        assert int.from_bytes(obj.get_constant("targ_tgid"), "little") == 4242


# -- the csv sink (no kernel needed) ---------------------------------------------


def test_csv_sink_writes_a_header_per_type_and_reads_back(plugin, tmp_path):
    path = tmp_path / "events.csv"
    sink = plugin.CsvSink.from_arg(str(path))
    common = dict(role="client", pid=1, comm="curl", laddr="127.0.0.1", lport=40000, raddr="127.0.0.1", rport=80, family=4, sock_id=7)
    sink.handle(ConnectionEvent(1, phase="open", **common))
    sink.handle(ProcessEvent(2, phase="exec", pid=3, ppid=1, comm="ls", cmdline="ls -l, -a"))
    sink.handle(ConnectionEvent(3, phase="close", bytes_sent=10, bytes_received=20, duration_ns=2, retransmits=0, **common))
    assert path.read_text() == ""  # buffered until flush/close
    sink.close()
    sink.close()  # idempotent

    lines = path.read_text().splitlines()
    assert lines[0].startswith("type,ts,ts_mono_ns,phase,role,pid,comm,")
    assert lines[0].endswith(",bytes_sent,bytes_received,duration_ns,retransmits,reset,preexisting,error,sampling,client_service,server_service")
    assert lines[2].startswith("type,ts,ts_mono_ns,phase,pid,ppid,comm,cmdline,")
    assert [line.split(",")[0] for line in lines] == ["type", "connection", "type", "process", "connection"]

    rows = list(plugin.read_csv_events(str(path)))
    assert [(r["type"], r["ts"], r["phase"]) for r in rows] == [("connection", "1", "open"), ("process", "2", "exec"), ("connection", "3", "close")]
    assert rows[0]["bytes_sent"] == "" and rows[2]["bytes_sent"] == "10" and rows[2]["preexisting"] == "false"
    assert rows[1]["cmdline"] == "ls -l, -a" and rows[1]["exit_code"] == ""
    assert sink.dropped_keys == 0


def test_csv_sink_errors_are_sink_errors(plugin, tmp_path):
    with pytest.raises(SinkError, match=r"^cannot open .* for the csv sink: Is a directory$"):
        plugin.CsvSink.from_arg(str(tmp_path))
    with pytest.raises(SinkError, match="needs a path"):
        plugin.CsvSink.from_arg(None)


def test_csv_sink_truncates_its_file(plugin, tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("old\n")
    plugin.CsvSink.from_arg(str(path)).close()
    assert path.read_text() == ""


# -- against the kernel ------------------------------------------------------------


def _read_lines(stream, lines: "queue.Queue[str | None]") -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


@pytest.mark.bpf
def test_agent_reports_a_signal_the_test_sends(plugin, signals_object, tmp_path):
    csv_path, jsonl_path = tmp_path / "signals.csv", tmp_path / "signals.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deetune.agent", "-v", "--probe", "signals",
         "--sink", f"csv:{csv_path}", "--sink", f"jsonl:{jsonl_path}", "--duration", "6"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    child = None
    stderr: list[str] = []
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
        # Readiness: the agent logs this once its program is attached (-v).
        deadline = time.monotonic() + 30
        while not any("probe signals attached" in line for line in stderr):
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("the agent did not attach within 30 s: " + "".join(stderr))
            if line is None:
                pytest.fail(f"the agent exited before attaching (rc {proc.wait()}): " + "".join(stderr))
            stderr.append(line)
        ours = bpf_prog_ids(proc.pid)
        assert ours, "the agent holds no BPF program"

        child = spawn_sleep()
        os.kill(child.pid, signal.SIGUSR1)
        assert child.wait(timeout=10) == -signal.SIGUSR1

        assert proc.wait(timeout=30) == 0, "".join(stderr)
        while (line := lines.get(timeout=10)) is not None:
            stderr.append(line)
    finally:
        for p in (child, proc):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()

    assert stderr[-1].startswith("deetune: ") and " lost" in stderr[-1], stderr
    rows = [r for r in plugin.read_csv_events(str(csv_path)) if r["sig"] == "10" and r["target_pid"] == str(child.pid)]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["type"] == "signal" and row["signame"] == "SIGUSR1"
    assert row["sender_pid"] == str(os.getpid())
    assert row["sender_tid"] == str(threading.get_native_id())
    assert row["sender_uid"] == str(os.getuid())
    assert row["target_comm"] == "sleep"
    assert (row["group"], row["code"], row["result"]) == ("true", "0", "delivered")  # kill(2): SI_USER

    events = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    matching = [e for e in events if e["sig"] == 10 and e["target_pid"] == child.pid]
    assert len(matching) == 1
    assert {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in matching[0].items()} == row
    assert_gone(ours)


@pytest.mark.bpf
def test_pipeline_api_with_the_signal_knob(plugin, signals_object, tmp_path):
    from deetune.pipeline import Pipeline

    csv_path = tmp_path / "signals.csv"
    before = bpf_prog_ids(os.getpid())
    probe = plugin.SignalsProbe(plugin.SignalsOptions(sig="SIGUSR2"))
    pipeline = Pipeline([probe], [plugin.CsvSink.from_arg(str(csv_path))])
    attached = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            pipeline.run(duration=60, ready=attached.set)
        except BaseException as exc:  # reported by the test thread
            failure.append(exc)
            attached.set()

    thread = threading.Thread(target=run, name="pipeline")
    thread.start()
    children = []
    try:
        assert attached.wait(timeout=30), "the pipeline did not attach within 30 s"
        assert not failure, failure
        ours = bpf_prog_ids(os.getpid()) - before
        assert len(ours) == 1, ours  # one program: handle_signal
        # Both signals kill sleep; the knob keeps only SIGUSR2, in the kernel.
        for _ in range(2):
            children.append(spawn_sleep())
        os.kill(children[0].pid, signal.SIGUSR1)
        os.kill(children[1].pid, signal.SIGUSR2)
        assert [c.wait(timeout=10) for c in children] == [-signal.SIGUSR1, -signal.SIGUSR2]
    finally:
        pipeline.stop()
        thread.join(timeout=30)
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert not thread.is_alive()
    assert not failure, failure

    rows = list(plugin.read_csv_events(str(csv_path)))
    assert rows and {r["sig"] for r in rows} == {"12"}, rows  # not even the children's SIGCHLDs
    (row,) = [r for r in rows if r["target_pid"] == str(children[1].pid)]
    assert row["sender_pid"] == str(os.getpid()) and row["target_comm"] == "sleep" and row["result"] == "delivered"
    assert not [r for r in rows if r["target_pid"] == str(children[0].pid)]
    stats = pipeline.stats.probes["signals"]
    assert stats.records == stats.emitted == len(rows) and stats.lost == 0 and stats.undecodable == 0
    assert pipeline.stats.events == len(rows)
    assert probe.obj is None  # detached and unloaded
    assert not bpf_prog_ids(os.getpid()) & ours
    assert_gone(ours)
