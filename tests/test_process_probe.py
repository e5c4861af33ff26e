"""The process probe against processes the tests start."""

from __future__ import annotations

import os
import subprocess

import pytest

from deetune.events import ProcessEvent
from deetune.probes import ProbeOptions
from deetune.probes.process import ProcessProbe, split_wait_status

from tests.harness import running_pipeline


def test_wait_status_split():
    assert split_wait_status(3 << 8) == (3, None)
    assert split_wait_status(0) == (0, None)
    assert split_wait_status(9) == (None, 9)


@pytest.mark.bpf
def test_exec_fork_and_exit_with_code():
    with running_pipeline([ProcessProbe()]) as collector:
        proc = subprocess.Popen(["/bin/sh", "-c", "exit 3", "deetune-arg0", "second arg"])
        assert proc.wait() == 3
        (exit_event,) = collector.wait_for(lambda e: isinstance(e, ProcessEvent) and e.phase == "exit" and e.pid == proc.pid)
    (exec_event,) = collector.matching(lambda e: e.phase == "exec" and e.pid == proc.pid)
    assert exec_event.cmdline == "/bin/sh -c exit 3 deetune-arg0 second arg"
    assert exec_event.ppid == os.getpid()
    assert exec_event.comm == "sh"
    assert not exec_event.cmdline_truncated
    assert exec_event.cgroup_id > 0
    assert (exit_event.exit_code, exit_event.signal) == (3, None)
    assert exit_event.comm == "sh"
    (fork_event,) = collector.matching(lambda e: e.phase == "fork" and e.pid == proc.pid)
    assert fork_event.ppid == os.getpid()
    assert fork_event.ts <= exec_event.ts <= exit_event.ts


@pytest.mark.bpf
def test_killed_process_reports_the_signal_and_long_cmdline_is_flagged():
    long_arg = "x" * 5000
    with running_pipeline([ProcessProbe()]) as collector:
        proc = subprocess.Popen(["/bin/sh", "-c", "exec sleep 30", "arg0", long_arg])
        collector.wait_for(lambda e: e.phase == "exec" and e.pid == proc.pid, 2)  # sh, then sleep
        proc.kill()
        proc.wait()
        (exit_event,) = collector.wait_for(lambda e: e.phase == "exit" and e.pid == proc.pid)
    exec_event, sleep_exec = collector.matching(lambda e: e.phase == "exec" and e.pid == proc.pid)
    assert sleep_exec.cmdline == "sleep 30" and not sleep_exec.cmdline_truncated
    assert exec_event.cmdline_truncated
    assert exec_event.cmdline.startswith("/bin/sh -c exec sleep 30 arg0 xxx")
    assert len(exec_event.cmdline) == 4096  # the first 4 KiB, no terminating NUL
    assert (exit_event.exit_code, exit_event.signal) == (None, 9)


@pytest.mark.bpf
def test_threads_are_not_processes():
    script = "import threading; ts=[threading.Thread(target=lambda: None) for _ in range(5)]; [t.start() for t in ts]; [t.join() for t in ts]"
    with running_pipeline([ProcessProbe()]) as collector:
        proc = subprocess.run(["python3", "-c", script])
        collector.wait_for(lambda e: e.phase == "exit" and e.comm.startswith("python"), timeout=10)
    pid_events = [e for e in collector.events if isinstance(e, ProcessEvent) and e.ppid != 0 and e.comm.startswith("python")]
    exits = [e for e in pid_events if e.phase == "exit"]
    assert proc.returncode == 0
    # One process: one exit however many threads ended.
    assert len({e.pid for e in exits}) == len(exits)


@pytest.mark.bpf
def test_pid_filter():
    proc = subprocess.Popen(["/bin/sleep", "30"])
    try:
        with running_pipeline([ProcessProbe(ProbeOptions(pid=proc.pid))]) as collector:
            subprocess.run(["/bin/true"])
            proc.kill()
            proc.wait()
            collector.wait_for(lambda e: e.phase == "exit")
        assert {(e.phase, e.pid) for e in collector.events if e.phase != "fork"} == {("exit", proc.pid)}
    finally:
        if proc.poll() is None:
            proc.kill()
