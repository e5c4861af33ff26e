"""Micro-benchmark of the HTTP/2 decoder (and gRPC on top): exchanges per second on one core.

One connection made by a real HTTP/2 implementation (python-hyper's h2, client and server in
memory): ``--streams`` requests, answered as they come, each request one write and each response
one write, as a server writing per stream would.  Two shapes: ``http2`` (GET, 12 header fields
indexed after the first request, 1 KiB response body) and ``grpc`` (a unary call: a 64-byte message
each way, trailers).  Chunks are built before timing; time is the process's CPU time, and the best
of several rounds is reported (slower rounds measure other load on the machine).

    .venv/bin/python bench/bench_http2_decoder.py [--streams 20000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import h2.config
import h2.connection
import h2.events

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from deetune.decoders.base import Chunk, Direction  # noqa: E402
from deetune.decoders.http2 import Http2Decoder  # noqa: E402

BODY = b"x" * 1024
REQUEST_HEADERS = [(":method", "GET"), (":scheme", "https"), (":authority", "shop.example.com"),
                   ("user-agent", "bench/1.0"), ("accept", "*/*"), ("accept-encoding", "gzip")]
RESPONSE_HEADERS = [(":status", "200"), ("server", "nginx/1.22.1"), ("content-type", "application/json"),
                    ("content-length", str(len(BODY))), ("cache-control", "no-cache")]
GRPC_REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/shop.Catalog/GetItem"),
                (":authority", "catalog:50051"), ("content-type", "application/grpc"), ("te", "trailers")]
MESSAGE = b"\x00" + (64).to_bytes(4, "big") + b"m" * 64


def conversation(shape: str, streams: int) -> list[Chunk]:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    chunks: list[Chunk] = []
    t = 0

    def deliver(sender, receiver, direction):
        nonlocal t
        data = sender.data_to_send()
        if data:
            t += 50_000
            chunks.append(Chunk(direction, data, len(data), t))
            for event in receiver.receive_data(data):
                if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                    receiver.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    client.initiate_connection()
    deliver(client, server, Direction.REQUEST)
    server.initiate_connection()
    deliver(server, client, Direction.RESPONSE)
    for i in range(streams):
        sid = client.get_next_available_stream_id()
        if shape == "grpc":
            client.send_headers(sid, GRPC_REQUEST)
            client.send_data(sid, MESSAGE, end_stream=True)
        else:
            client.send_headers(sid, [*REQUEST_HEADERS[:1], (":path", f"/api/items/{i % 100}"), *REQUEST_HEADERS[1:]],
                                end_stream=True)
        deliver(client, server, Direction.REQUEST)
        if shape == "grpc":
            server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            server.send_data(sid, MESSAGE)
            server.send_headers(sid, [("grpc-status", "0"), ("grpc-message", "")], end_stream=True)
        else:
            server.send_headers(sid, RESPONSE_HEADERS)
            server.send_data(sid, BODY, end_stream=True)
        deliver(server, client, Direction.RESPONSE)
        deliver(client, server, Direction.REQUEST)  # WINDOW_UPDATE
    return chunks


def run_round(chunks: list[Chunk]) -> tuple[int, float]:
    feed = Http2Decoder().feed
    exchanges = 0
    started = time.process_time()
    for chunk in chunks:
        exchanges += len(feed(chunk))
    return exchanges, time.process_time() - started


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    out: dict = {"benchmark": "http2_decoder", "machine": common.machine(), "args": vars(args), "shapes": {}}
    texts = []
    for shape in ("http2", "grpc"):
        chunks = conversation(shape, args.streams)
        size = sum(c.size for c in chunks)
        best = float("inf")
        rounds = []
        for _ in range(args.rounds):
            exchanges, elapsed = run_round(chunks)
            assert exchanges == args.streams, (exchanges, args.streams)
            rounds.append(round(args.streams / elapsed))
            best = min(best, elapsed)
        rate = round(args.streams / best)
        out["shapes"][shape] = {"exchanges_per_s": rate, "rounds": rounds, "chunks": len(chunks), "bytes": size}
        texts.append(f"{shape}: {args.streams:,} streams on one connection, {len(chunks):,} chunks, {size:,} bytes: "
                     f"best {rate:,} exchanges/s (rounds: {', '.join(f'{r:,}' for r in rounds)})")
    return common.report("http2_decoder", out, texts)


if __name__ == "__main__":
    main()
