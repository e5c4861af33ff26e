"""Share of exchanges decoded whole, by payload capture size, on real servers (needs root and BPF).

    sudo .venv/bin/python bench/bench_capture_size.py [--sizes 4096,8192,16384,32768,65536] [--json PATH]

For each capture size, the workloads of tests/test_l7_fidelity.py run against nginx, redis-server
and MariaDB on loopback (started here, stopped at the end), with a payload probe copying that many
bytes per call and the L7 handler decoding: redis-py pipelines of 1,000 GETs; ten pipelined HTTP
requests for a 3 KiB file read in one go; 2 MB bodies on short connections; a 10,000-row result
through pymysql (text protocol) and through mysql-connector (prepared statements).  Per workload
and side (client, server) it prints the share decoded whole: Redis and HTTP exchanges with their
own response, MySQL results whose row count is exact (not rows_truncated).  It also prints the
bytes the kernel copied, the cost the capture size buys it with.

The shares depend on how the programs size their reads and writes, not on the machine's load; the
bytes copied are what a busier host pays per call.  Prints a table and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deetune.decoders.http import HttpDecoder  # noqa: E402
from deetune.decoders.mysql import MysqlDecoder  # noqa: E402
from deetune.decoders.redis import RedisDecoder  # noqa: E402
from deetune.events import DataEvent, ExchangeEvent  # noqa: E402
from deetune.l7 import L7Handler, ListeningPorts  # noqa: E402
from deetune.probes import ProbeOptions  # noqa: E402
from deetune.probes.payload import PayloadProbe  # noqa: E402
from deetune.probes.tcp import TcpProbe  # noqa: E402
from tests.harness import running_pipeline  # noqa: E402
from tests.servers import DB_NAME, DB_PASSWORD, DB_USER, HOST, MariaDB, Nginx, Redis  # noqa: E402

ROWS = 10_000


def run(port: int, capture_bytes: int, workload) -> tuple[list[ExchangeEvent], int]:
    payload = PayloadProbe(ProbeOptions(), ports=[port], exclude_self=False, capture_bytes=capture_bytes,
                           busy_cpu=None)
    handler = L7Handler([HttpDecoder, RedisDecoder, MysqlDecoder], emit_data=True,
                        listening=ListeningPorts(reader=lambda: {port}))
    with running_pipeline([TcpProbe(ProbeOptions(port=port)), payload], handlers=[handler]) as collector:
        workload()
        time.sleep(1.0)
    events = collector.matching(lambda e: isinstance(e, (ExchangeEvent, DataEvent)) and port in (e.lport, e.rport))
    copied = sum(len(e.data) for e in events if isinstance(e, DataEvent))
    return [e for e in events if isinstance(e, ExchangeEvent)], copied


def share(exchanges, good, total: int) -> dict[str, float]:
    return {role: round(sum(1 for e in exchanges if e.role == role and good(e)) / total, 3)
            for role in ("client", "server")}


def redis_pipeline(redis, capture_bytes, extra=0):
    """1,000 GETs in one redis-py pipeline; values of 3-39 bytes (+ ``extra``)."""
    import redis as redis_py

    keys = [f"cap:{i:05d}" for i in range(1000)]
    client = redis_py.Redis(host=HOST, port=redis.port)
    client.mset({k: b"v" * (i % 37 + 3 + extra) for i, k in enumerate(keys)})

    def workload():
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        pipe.execute()

    got, copied = run(redis.port, capture_bytes, workload)
    client.close()
    size = {k: len(b"$%d\r\n%s\r\n" % (i % 37 + 3 + extra, b"v" * (i % 37 + 3 + extra))) for i, k in enumerate(keys)}
    return share(got, lambda e: e.method == "GET" and e.status == "OK" and e.response_bytes == size.get(e.target),
                 len(keys)), copied


def http_pipelining(nginx, capture_bytes):
    (nginx.dir / "html" / "cap3k.bin").write_bytes(bytes(range(256)) * 12)

    def workload():
        with socket.create_connection((HOST, nginx.port)) as sock:
            sock.sendall(b"".join(b"GET /cap3k.bin?%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(10)))
            data = b""
            while data.count(b"HTTP/1.1 200") < 10 or len(data) < 10 * 3072:
                data += sock.recv(262144)

    got, copied = run(nginx.port, capture_bytes, workload)
    return share(got, lambda e: e.status == 200 and e.attributes.get("response_body_bytes") == 3072, 10), copied


def http_large_bodies(nginx, capture_bytes):
    (nginx.dir / "html" / "cap2m.bin").write_bytes(os.urandom(2 << 20))

    def workload():
        for i in range(5):
            with socket.create_connection((HOST, nginx.port)) as sock:
                sock.sendall(b"GET /cap2m.bin?%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % i)
                while sock.recv(1 << 20):
                    pass

    got, copied = run(nginx.port, capture_bytes, workload)
    return share(got, lambda e: e.status == 200 and e.attributes.get("response_body_bytes") == 2 << 20, 5), copied


def mysql_rows(db, capture_bytes, prepared: bool):
    import mysql.connector
    import pymysql

    def workload():
        if prepared:
            conn = mysql.connector.connect(host=HOST, port=db.port, user=DB_USER, password=DB_PASSWORD,
                                           database=DB_NAME, use_pure=True, ssl_disabled=True)
            cur = conn.cursor(prepared=True)
            cur.execute(f"SELECT seq, CONCAT('row-', seq) FROM seq_1_to_{ROWS} WHERE seq > ?", (0,))
            cur.fetchall()
            cur.close()
        else:
            conn = pymysql.connect(host=HOST, port=db.port, user=DB_USER, password=DB_PASSWORD, database=DB_NAME)
            with conn.cursor() as cur:
                cur.execute(f"SELECT seq, seq * seq, CONCAT('row-', seq) FROM seq_1_to_{ROWS}")
        conn.close()

    got, copied = run(db.port, capture_bytes, workload)
    return share(got, lambda e: e.attributes.get("rows") == ROWS and not e.attributes.get("rows_truncated"), 1), copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,8192,16384,32768,65536")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / f"capture-size-{time.strftime('%Y%m%d-%H%M%S')}.json"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp)
        nginx, redis, db = Nginx.start(base / "nginx"), Redis.start(base / "redis"), MariaDB.start(base / "db")
        try:
            workloads = {
                "redis pipeline 1000": lambda size: redis_pipeline(redis, size),
                "redis pipeline 1000, 50 B values": lambda size: redis_pipeline(redis, size, extra=30),
                "http 10 pipelined 3 KiB": lambda size: http_pipelining(nginx, size),
                "http 2 MB short connections": lambda size: http_large_bodies(nginx, size),
                "mysql 10k rows text": lambda size: mysql_rows(db, size, prepared=False),
                "mysql 10k rows prepared": lambda size: mysql_rows(db, size, prepared=True),
            }
            for name, workload in workloads.items():
                for size in sizes:
                    decoded, copied = workload(size)
                    results.setdefault(name, {})[size] = {"decoded": decoded, "copied_bytes": copied}
        finally:
            for server in (nginx, redis, db):
                server.stop()
    print(f"{'workload':30} " + " ".join(f"{s:>17}" for s in sizes) + "   (client/server share decoded whole)")
    for name, by_size in results.items():
        cells = [f"{r['decoded']['client']:.2f}/{r['decoded']['server']:.2f}" for r in by_size.values()]
        print(f"{name:30} " + " ".join(f"{c:>17}" for c in cells))
    print(f"{'bytes copied (MB), all':30} " + " ".join(
        f"{sum(results[n][s]['copied_bytes'] for n in results) / 1e6:>17.1f}" for s in sizes))
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
