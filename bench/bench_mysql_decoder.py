"""Throughput of the MySQL decoder on small exchanges.

Run: .venv/bin/python bench/bench_mysql_decoder.py [N]

Feeds N (default 100,000) pre-built QUERY exchanges, one chunk per request and
one per response (as a syscall capture delivers them), and prints queries/s for
QUERY + OK, QUERY + a small result set, and an even mix of both; then rows/s
for 1,000 queries each answered by a 1,000-row result set.
"""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from deetune.decoders.base import Chunk, Direction  # noqa: E402
from deetune.decoders.mysql import MysqlDecoder  # noqa: E402


def packet(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload) | seq << 24) + payload


def lenenc_str(value: bytes) -> bytes:
    return bytes([len(value)]) + value


def column(name: bytes) -> bytes:
    return (
        lenenc_str(b"def") + lenenc_str(b"shop") + lenenc_str(b"orders") + lenenc_str(b"orders")
        + lenenc_str(name) + lenenc_str(name) + b"\x0c\x21\x00\x00\x01\x00\x00\xfd\x00\x00\x00\x00\x00"
    )


QUERY = packet(0, b"\x03SELECT id, status FROM orders WHERE customer_id = 42")
OK = packet(1, b"\x00\x01\x00\x02\x00\x00\x00")
EOF = b"\xfe\x00\x00\x02\x00"
RESULT_SET = b"".join(
    [
        packet(1, b"\x02"),
        packet(2, column(b"id")),
        packet(3, column(b"status")),
        packet(4, EOF),
        packet(5, lenenc_str(b"1001") + lenenc_str(b"shipped")),
        packet(6, lenenc_str(b"1002") + lenenc_str(b"pending")),
        packet(7, EOF),
    ]
)


def big_result_set(rows: int) -> bytes:
    packets = [packet(1, b"\x02"), packet(2, column(b"id")), packet(3, column(b"status")), packet(4, EOF)]
    seq = 5
    for i in range(rows):
        packets.append(packet(seq & 0xFF, lenenc_str(str(i).encode()) + lenenc_str(b"shipped")))
        seq += 1
    packets.append(packet(seq & 0xFF, EOF))
    return b"".join(packets)


def chunks(n: int, responses: list[bytes]) -> list[Chunk]:
    out = []
    ts = 1_000_000
    for i in range(n):
        response = responses[i % len(responses)]
        out.append(Chunk(Direction.REQUEST, QUERY, len(QUERY), ts))
        out.append(Chunk(Direction.RESPONSE, response, len(response), ts + 50_000))
        ts += 100_000
    return out


def run(label: str, n: int, responses: list[bytes]) -> None:
    stream = chunks(n, responses)
    best = None
    for _ in range(3):
        decoder = MysqlDecoder()
        feed = decoder.feed
        exchanges = 0
        start = time.perf_counter()
        for chunk in stream:
            exchanges += len(feed(chunk))
        elapsed = time.perf_counter() - start
        assert exchanges == n, exchanges
        best = elapsed if best is None else min(best, elapsed)
    print(f"{label:<28} {n:>8} exchanges  {best:7.3f} s  {n / best:>10,.0f} queries/s")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(f"python {sys.version.split()[0]}, best of 3")
    run("QUERY + OK", n, [OK])
    run("QUERY + 2x2 result set", n, [RESULT_SET])
    run("mixed (OK / result set)", n, [OK, RESULT_SET])
    rows = 1000
    big = big_result_set(rows)
    stream = chunks(1000, [big])
    start = time.perf_counter()
    decoder = MysqlDecoder()
    for chunk in stream:
        decoder.feed(chunk)
    elapsed = time.perf_counter() - start
    label = "QUERY + 1000-row result set"
    print(f"{label:<28} {1000:>8} exchanges  {elapsed:7.3f} s  {1000 * rows / elapsed:>10,.0f} rows/s")


if __name__ == "__main__":
    main()
