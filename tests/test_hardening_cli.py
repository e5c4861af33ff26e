"""Issue 18, item 7: bad arguments are one line, never a traceback; the jsonl sink writes every event."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import threading

import pytest

from deetune.events import ExchangeEvent
from deetune.pipeline import Pipeline
from deetune.sinks.jsonl import JsonlSink
from deetune.topology.store import TopologyStore

AGENT = [sys.executable, "-m", "deetune.agent"]


def run_agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=timeout)


def _one_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr.strip()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--window", "nan"], "deetune: argument --window: not a number (not finite): 'nan'"),
        (["--window", "inf"], "deetune: argument --window: not a number (not finite): 'inf'"),
        (["--window", "1e-12"], "deetune: argument --window: must be 0.1 to 86400 seconds: '1e-12'"),
        (["--retention", "1e300d"], "deetune: argument --retention: must be at most 36500d (100 years): '1e300d'"),
        (["--retention", "infd"], "deetune: argument --retention: not a duration (like 90, 90s, 15m, 12h, 7d) (not finite): 'infd'"),
        (["--ringbuf-size", "1099511627776"],
         "deetune: argument --ringbuf-size: must be a power of two from 4096 to 268435456 (256 MiB): '1099511627776'"),
        (["--ringbuf-size", "2147483648"],
         "deetune: argument --ringbuf-size: must be a power of two from 4096 to 268435456 (256 MiB): '2147483648'"),
        (["--ringbuf-size", "5000"],
         "deetune: argument --ringbuf-size: must be a power of two from 4096 to 268435456 (256 MiB): '5000'"),
        (["--duration", "nan"], "deetune: argument --duration: not a number (not finite): 'nan'"),
        (["--duration", "inf"], "deetune: argument --duration: not a number (not finite): 'inf'"),
    ],
)
def test_numbers_out_of_range_are_one_line(args, message):
    assert _one_line(run_agent(*args, "--duration", "1") if "--duration" not in args else run_agent(*args)) == message


def test_api_on_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_agent("--probe", "process", "--store", str(tmp_path / "s.db"), "--api", f"127.0.0.1:{port}",
                           "--duration", "5", "--sink", "jsonl:/dev/null")
    assert _one_line(result) == f"deetune: --api: cannot listen on 127.0.0.1 port {port}: Address already in use"


@pytest.mark.parametrize("name", ["a#b.db", "a?mode=rw.db", "x%41.db"])
def test_store_paths_with_uri_characters(tmp_path, name):
    """The read connections open the store by URI: '#', '?' and '%' in its path are its own."""
    path = tmp_path / name
    store = TopologyStore(path)
    try:
        assert store.exchange_counts() == {"stored": 0, "not_kept": 0}
        with pytest.raises(sqlite3.OperationalError, match="readonly"):  # the read connection is the store's
            store.read(lambda conn: conn.execute("INSERT INTO meta VALUES ('x', 'y')"))
    finally:
        store.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == [name]


def _exchange(**attributes) -> ExchangeEvent:
    return ExchangeEvent(1, ts_mono_ns=1, protocol="mysql", pid=1, comm="c", role="client", laddr="127.0.0.1",
                         lport=1, raddr="127.0.0.1", rport=3306, method="QUERY", target="DELETE FROM t",
                         status="OK", error=False, latency_ns=1, request_bytes=1, response_bytes=1,
                         attributes=attributes)


def test_jsonl_sink_writes_integers_beyond_64_bits_live(tmp_path):
    """Two MySQL OK packets' affected rows may add up past 2**64: the event is written with the
    exact number (JSON has no size limit), through a running pipeline, and no sink error."""
    out = tmp_path / "events.jsonl"
    sink = JsonlSink.from_arg(str(out))
    pipeline = Pipeline([], [sink], poll_interval=0.01)
    big = 2**64 + 12345
    thread = threading.Thread(target=pipeline.run, daemon=True)
    thread.start()
    pipeline.emit(_exchange(affected_rows=big, text="caf\udce9"))
    pipeline.emit(_exchange(affected_rows=1))
    pipeline.stop()
    thread.join(10)
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and pipeline.stats.sink_errors == 0
    first = json.loads(lines[0])
    assert first["attributes"] == {"affected_rows": big, "text": "caf\udce9"}
    assert json.loads(lines[1])["attributes"] == {"affected_rows": 1}


def test_store_keeps_exchanges_with_big_integers(tmp_path):
    store = TopologyStore(tmp_path / "s.db", max_exchanges_per_edge_window=None)
    try:
        event = _exchange(affected_rows=2**70)
        store.write([event])
        store.close()
        rows = sqlite3.connect(tmp_path / "s.db").execute("SELECT data FROM exchanges").fetchall()
        assert json.loads(rows[0][0])["attributes"]["affected_rows"] == 2**70
    finally:
        store.close()


@pytest.mark.bpf
def test_the_api_token_is_made_once_kept_0600_and_printed_once(tmp_path):
    import os
    import stat

    from tests.servers import free_port

    store = tmp_path / "s.db"
    args = ["--probe", "process", "--store", str(store), "--sink", "jsonl:/dev/null", "--duration", "1"]
    first = run_agent(*args, "--api", f"127.0.0.1:{free_port()}")
    assert first.returncode == 0, first.stderr
    token_file = tmp_path / "s.db.api-token"
    token = token_file.read_text().strip()
    assert len(token) == 43 and stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    assert first.stderr.splitlines()[0] == f"deetune: API token (kept in {token_file}, mode 0600): {token}"
    second = run_agent(*args, "--api", f"127.0.0.1:{free_port()}")
    assert second.returncode == 0 and token not in second.stderr and token_file.read_text().strip() == token
    os.chmod(token_file, 0o644)
    third = run_agent(*args, "--api", f"127.0.0.1:{free_port()}")
    assert _one_line(third) == f"deetune: --api: {token_file} is readable by others (mode 644): chmod 600 it"


@pytest.mark.bpf
def test_the_api_threads_keep_the_agents_first_priority(tmp_path):
    """--nice 10 lowers the agent's priority, not its API's: at nice 10 beside busy applications
    each of the API's thread wake-ups waited up to 90 ms for a CPU (bench/soak.py)."""
    import os
    import signal
    import time
    import urllib.request

    from tests.servers import free_port

    port = free_port()
    agent = subprocess.Popen([*AGENT, "--probe", "process", "--store", str(tmp_path / "s.db"), "--sink", "jsonl:/dev/null",
                              "--api", f"127.0.0.1:{port}", "--api-token", "t", "--nice", "10", "--duration", "60"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
                    assert json.loads(reply.read())["status"] == "ok"
                break
            except OSError:
                assert agent.poll() is None and time.monotonic() < deadline, agent.stderr.read() if agent.stderr else ""
                time.sleep(0.2)
        first = os.getpriority(os.PRIO_PROCESS, 0)
        nices = []
        for task in os.listdir(f"/proc/{agent.pid}/task"):
            with open(f"/proc/{agent.pid}/task/{task}/stat") as stat:
                nices.append(int(stat.read().rsplit(")", 1)[1].split()[16]))  # field 19: nice
        # waitress's I/O thread and its 4 workers; the pipeline and the store's writer at +10.
        assert nices.count(first) == 5 and nices.count(min(first + 10, 19)) == len(nices) - 5 >= 2, nices
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
    assert agent.returncode == 0
