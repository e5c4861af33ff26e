"""Throughput of the Redis decoder: GET commands and their bulk replies on one connection.

Run: .venv/bin/python bench/bench_redis_decoder.py
First scenario: every command and every reply in its own chunk, as syscalls deliver them
one by one.  Second: the same 200,000 pairs pipelined, 50 commands (or replies) per chunk.
"""

from __future__ import annotations

import time

from deetune.decoders.base import Chunk, Direction
from deetune.decoders.redis import RedisDecoder

PAIRS = 200_000
REPLY = b"$11\r\nhello world\r\n"


def get_command(i: int) -> bytes:
    key = b"user:%d" % i
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key)


def one_per_chunk(pairs: int) -> list[Chunk]:
    chunks = []
    for i in range(pairs):
        command = get_command(i)
        chunks.append(Chunk(Direction.REQUEST, command, len(command), 2 * i))
        chunks.append(Chunk(Direction.RESPONSE, REPLY, len(REPLY), 2 * i + 1))
    return chunks


def pipelined(pairs: int, depth: int) -> list[Chunk]:
    chunks = []
    for batch in range(0, pairs, depth):
        commands = b"".join(get_command(i) for i in range(batch, batch + depth))
        replies = REPLY * depth
        chunks.append(Chunk(Direction.REQUEST, commands, len(commands), 2 * batch))
        chunks.append(Chunk(Direction.RESPONSE, replies, len(replies), 2 * batch + 1))
    return chunks


def commands_per_second(chunks: list[Chunk]) -> float:
    best = float("inf")
    for _ in range(3):
        feed = RedisDecoder().feed
        exchanges = 0
        started = time.perf_counter()
        for chunk in chunks:
            exchanges += len(feed(chunk))
        best = min(best, time.perf_counter() - started)
        assert exchanges == PAIRS, exchanges
    return PAIRS / best


def main() -> None:
    rate = commands_per_second(one_per_chunk(PAIRS))
    print(f"{PAIRS} GET/reply pairs, one chunk each: {rate:,.0f} commands/s (best of 3)")
    rate = commands_per_second(pipelined(PAIRS, 50))
    print(f"{PAIRS} GET/reply pairs, pipelined 50 per chunk: {rate:,.0f} commands/s (best of 3)")


if __name__ == "__main__":
    main()
