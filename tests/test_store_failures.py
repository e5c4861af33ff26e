"""Issue 18, items 4 and 6: a full disk never corrupts the topology, is retried, counted and
reported (stop line, /healthz, exit code); one agent per store."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from deetune.topology.model import EdgeKey, EdgeStats, EdgeWindowEvent
from deetune.topology.store import StoreInUse, StoreSink, TopologyStore
from tests.servers import HOST, free_port

SEC = 1_000_000_000
T0 = 1_700_000_000 * SEC
W = 10 * SEC


@contextlib.contextmanager
def small_filesystem(where: pathlib.Path, size: str = "8m"):
    """A tmpfs of ``size`` mounted at ``where`` (needs root), unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: pathlib.Path) -> pathlib.Path:
    """Fill the filesystem of ``directory`` to the last byte; the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size) == size:
                    pass
    finally:
        os.close(fd)
    return filler


def window(client: str, server: str, start: int, requests: int) -> EdgeWindowEvent:
    stats = EdgeStats()
    stats.requests = requests
    stats.latency_buckets[0] = requests
    return EdgeWindowEvent(start, ts_mono_ns=0, key=EdgeKey(client, server, "http", 80), window_start=start,
                           window_ns=W, stats=stats)


def totals(path: pathlib.Path) -> dict[tuple[str, str], int]:
    store = TopologyStore(path, clock=lambda: T0 + 10_000 * W, lock=False)
    try:
        return {(e["client"], e["server"]): e["requests"] for e in store.edges(0, T0 + 10_000 * W)}
    finally:
        store.close()


def wait(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_full_disk_is_retried_and_credits_every_edge_exactly(tmp_path):
    """The issue: a failed write's rollback raised itself, the edge caches survived it, and after
    the disk recovered another edge's requests were credited to an edge that the rollback removed."""
    with small_filesystem(tmp_path / "fs") as fs:
        path = fs / "topology.db"
        sink = StoreSink(TopologyStore(path, clock=lambda: T0), interval=0.02, retry_interval=0.05)
        sink.handle(window("a", "b", T0, 100))
        sink.flush()
        assert sink.stats.failed_batches == 0
        filler = fill(fs)
        # Many new edges: their rows need more room than the WAL has.
        for n in range(3000):
            sink.handle(window("a", f"new{n:04}", T0 + W, 1))
        sink.handle(window("a", "b", T0 + W, 7))
        wait(lambda: sink.stats.failed_batches >= 2, "commits to fail on the full disk")
        health = sink.health()
        assert health["status"] == "degraded" and health["store"]["writing"] is False
        assert health["store"]["pending_events"] == 3001 and "full" in health["store"]["last_error"]
        filler.unlink()
        wait(lambda: sink.health()["store"]["writing"], "the retried batch to be written")
        # Edges the failed transaction had created (and rolled back) come after it, new and old.
        sink.handle(window("c", "d", T0 + 2 * W, 5))
        sink.handle(window("a", "new0000", T0 + 2 * W, 10))
        sink.handle(window("a", "b", T0 + 2 * W, 1000))
        sink.close()
        assert sink.stats.lost == 0 and sink.stats.dropped == 0 and sink.persisted_all
        assert sink.summary().startswith("store: ") and "failed commits" in sink.summary()
        found = totals(path)
        assert found[("a", "b")] == 1107
        assert found[("c", "d")] == 5
        assert found[("a", "new0000")] == 11
        assert sum(found[("a", f"new{n:04}")] for n in range(1, 3000)) == 2999
        assert len(found) == 3002


def test_a_store_still_full_at_stop_counts_what_it_lost(tmp_path):
    with small_filesystem(tmp_path / "fs") as fs:
        sink = StoreSink(TopologyStore(fs / "topology.db", clock=lambda: T0), interval=0.02, retry_interval=0.05,
                         batch_size=1000)
        sink.handle(window("a", "b", T0, 1))
        sink.flush()
        fill(fs)
        for n in range(3000):
            sink.handle(window("a", f"new{n:04}", T0 + W, 1))
        wait(lambda: sink.stats.failed_batches >= 1, "a commit to fail")
        for n in range(50):  # while it fails, no more than one batch waits: these are dropped, counted
            sink.handle(window("z", f"late{n}", T0 + 2 * W, 1))
        sink.close()
        # (the writer may have failed before all 3000 were queued: then fewer waited, more were dropped)
        stats = sink.stats
        assert stats.lost + stats.dropped == 3050 and stats.dropped >= 50 and stats.lost >= 1000, stats
        assert not sink.persisted_all and sink.health()["status"] == "degraded"
        assert f"{stats.dropped} events dropped (queue full or store failing), {stats.lost} events never written" in sink.summary()


def test_a_second_writer_is_refused(tmp_path):
    first = TopologyStore(tmp_path / "t.db")
    try:
        with pytest.raises(StoreInUse, match=rf"^{tmp_path}/t.db is in use by process {os.getpid()} \(another agent\?\)"):
            TopologyStore(tmp_path / "t.db")
    finally:
        first.close()
    TopologyStore(tmp_path / "t.db").close()  # free again once closed


AGENT = [sys.executable, "-m", "deetune.agent"]


@pytest.mark.bpf
def test_two_agents_on_one_store(tmp_path):
    """Started at once on a new store: one runs, the other says why it cannot, in one line."""
    store = tmp_path / "new" / "s.db"
    args = [*AGENT, "--probe", "process", "--store", str(store), "--sink", "jsonl:/dev/null", "--duration", "4"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[2] == 2)
    winner = next(p for p, r in zip(procs, results) if r[2] == 0)
    assert loser[1] == f"deetune: --store: {store} is in use by process {winner.pid} (another agent?): one agent per store\n"


@pytest.mark.bpf
def test_agent_on_a_full_disk_says_so_and_exits_1(tmp_path):
    """/healthz says degraded while the store cannot write; the stop line says what was not
    persisted, and the exit code is 1."""
    with small_filesystem(tmp_path / "fs", size="16m") as fs:
        store, port = fs / "s.db", free_port()
        with socket.socket() as listener:
            listener.bind((HOST, 0))
            listener.listen(128)
            target = listener.getsockname()[1]
            agent = subprocess.Popen([*AGENT, "-v", "--probe", "tcp", "--port", str(target), "--store", str(store),
                                      "--window", "0.5", "--api", f"{HOST}:{port}", "--api-token", "tok",
                                      "--sink", "jsonl:/dev/null"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
            try:
                def health() -> dict:
                    try:
                        with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=2) as reply:
                            return json.load(reply)
                    except OSError:
                        return {}

                wait(lambda: health().get("status") == "ok", "the agent's API", timeout=60)
                fill(fs)
                stop = threading.Event()

                def connect() -> None:  # edges to write
                    n = 0
                    while not stop.is_set():
                        with contextlib.suppress(OSError), socket.create_connection((HOST, target), timeout=1):
                            pass
                        n += 1
                        time.sleep(0.002)

                thread = threading.Thread(target=connect, daemon=True)
                thread.start()
                accepter = threading.Thread(target=lambda: [listener.accept()[0].close() for _ in range(100000)],
                                            daemon=True)
                accepter.start()
                wait(lambda: health().get("status") == "degraded", "/healthz to say degraded", timeout=30)
                assert health()["store"]["writing"] is False
                stop.set()
                thread.join()
                agent.send_signal(2)
                _, err = agent.communicate(timeout=60)
            finally:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait()
    assert agent.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("deetune: ") and "; store: " in last and "events never written" in last, last
    assert "Traceback" not in err
