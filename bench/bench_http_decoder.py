"""Micro-benchmark of the HTTP/1.x decoder on typical small keep-alive exchanges.

Each exchange is one request chunk (~100 bytes) and one response chunk (~200
bytes of headers and a 1 KiB body), all on one connection.  Chunks are built
before timing, so the figure is the decoder's own cost.  Several rounds run and
the best is reported, as timeit does: slower rounds measure other load on the machine.
Time is the process's CPU time, so waiting for a busy CPU does not count.

    .venv/bin/python bench/bench_http_decoder.py [EXCHANGES] [ROUNDS]
"""

from __future__ import annotations

import sys
import time

from deetune.decoders.base import Chunk, Direction
from deetune.decoders.http import HttpDecoder

REQUEST = (
    b"GET /api/v1/items?page=2&size=20 HTTP/1.1\r\n"
    b"Host: shop.example.com\r\n"
    b"User-Agent: curl/8.5.0\r\n"
    b"Accept: */*\r\n"
    b"\r\n"
)
BODY = b"x" * 1024
RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.24.0\r\n"
    b"Date: Tue, 14 May 2024 09:12:01 GMT\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"Connection: keep-alive\r\n"
    b"Cache-Control: no-cache\r\n"
    b"X-Request-Id: 5b0c4a43-8c1e-4f5e-9a52-3f0e2d1b7a90\r\n"
    b"\r\n" + BODY
)


def run_round(chunks: list[Chunk]) -> tuple[int, float]:
    feed = HttpDecoder().feed
    exchanges = 0
    started = time.process_time()
    for chunk in chunks:
        exchanges += len(feed(chunk))
    return exchanges, time.process_time() - started


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    chunks = []
    for i in range(count):
        ts = i * 1_000_000
        chunks.append(Chunk(Direction.REQUEST, REQUEST, len(REQUEST), ts))
        chunks.append(Chunk(Direction.RESPONSE, RESPONSE, len(RESPONSE), ts + 250_000))
    print(f"http decoder: {count} exchanges per round (request {len(REQUEST)} B, response {len(RESPONSE)} B, one chunk each)")
    best = float("inf")
    for round_number in range(1, rounds + 1):
        exchanges, elapsed = run_round(chunks)
        assert exchanges == count, (exchanges, count)
        best = min(best, elapsed)
        print(f"  round {round_number}: {elapsed:.3f} s = {count / elapsed:,.0f} exchanges/s")
    print(f"best: {count / best:,.0f} exchanges/s")


if __name__ == "__main__":
    main()
