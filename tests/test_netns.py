"""Scoping to one network namespace: the probes see only its sockets and processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from deetune.events import ConnectionEvent, DataEvent, ProcessEvent
from deetune.probes import ProbeOptions
from deetune.probes.payload import PayloadProbe
from deetune.probes.process import ProcessProbe
from deetune.probes.tcp import TcpProbe

from tests.harness import running_pipeline

pytestmark = pytest.mark.bpf

#: One connection, a request and its reply, on loopback, in whatever namespace runs it.
EXCHANGE = r"""
import socket, sys
tag = sys.argv[1].encode()
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
c = socket.create_connection(srv.getsockname())
s, _ = srv.accept()
c.sendall(b"hello " + tag)
assert s.recv(100) == b"hello " + tag
s.sendall(b"bye")
c.recv(100)
c.close(); s.close()
print(srv.getsockname()[1], flush=True)
"""


@pytest.fixture
def netns():
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) not installed")
    name = f"dt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def run_exchange(tag: str, netns: str | None = None) -> tuple[int, int]:
    """(port, pid) of one exchange run by a new process, in ``netns`` or ours."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    proc = subprocess.run([*prefix, sys.executable, "-c", EXCHANGE, tag], capture_output=True, text=True,
                          check=True, timeout=30)
    return int(proc.stdout.strip()), proc


def test_probes_scoped_to_a_namespace_see_only_its_sockets_and_processes(netns):
    inode = os.stat(f"/run/netns/{netns}").st_ino
    options = ProbeOptions(netns=inode)
    probes = [TcpProbe(options), PayloadProbe(options), ProcessProbe(options)]
    with running_pipeline(probes) as collector:
        inside, _ = run_exchange("inside", netns)
        outside, _ = run_exchange("outside")
        # A last one inside: once its records are in, the outside one's would be too (same rings, in order).
        last, _ = run_exchange("last", netns)
        collector.wait_for(lambda e: isinstance(e, ConnectionEvent) and e.phase == "close" and last in (e.lport, e.rport), 2)
        collector.wait_for(lambda e: isinstance(e, DataEvent) and last in (e.lport, e.rport), 4)
    ports = {p for e in collector.events if isinstance(e, (ConnectionEvent, DataEvent)) for p in (e.lport, e.rport)}
    assert inside in ports and outside not in ports
    data = [e for e in collector.events if isinstance(e, DataEvent) and inside in (e.lport, e.rport)]
    assert sorted(e.data for e in data) == sorted([b"hello inside"] * 2 + [b"bye"] * 2)
    execs = [e for e in collector.events if isinstance(e, ProcessEvent) and e.phase == "exec"]
    assert any("inside" in e.cmdline for e in execs) and any("last" in e.cmdline for e in execs)
    assert not any("outside" in e.cmdline for e in execs)


def test_agent_enters_the_namespace_and_reports_only_it(netns, tmp_path):
    out = tmp_path / "events.jsonl"
    agent = subprocess.Popen(
        [sys.executable, "-m", "deetune.agent", "--netns", netns, "--no-store", "--sink", f"jsonl:{out}",
         "--probe", "tcp", "--duration", "6"],
        stderr=subprocess.PIPE, text=True)
    try:
        # Exchanges until one inside has been reported (the probes are attached by then).
        deadline = time.monotonic() + 20
        inside, outsides = None, []
        while time.monotonic() < deadline and agent.poll() is None:
            inside, _ = run_exchange("inside", netns)
            outsides.append(run_exchange("outside")[0])
            if out.exists() and any(str(inside) in line for line in out.read_text().splitlines()):
                break
            time.sleep(0.3)
        _, err = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert agent.returncode == 0, err
    events = [json.loads(line) for line in out.read_text().splitlines()]
    ports = {p for e in events if e["type"] == "connection" for p in (e["lport"], e["rport"])}
    assert inside in ports and not ports & set(outsides)


def test_agent_refuses_a_namespace_that_does_not_exist():
    proc = subprocess.run([sys.executable, "-m", "deetune.agent", "--netns", "no-such-ns-here", "--no-store"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["deetune: argument --netns: no network namespace at /run/netns/no-such-ns-here"]
