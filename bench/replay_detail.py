"""The agent's user-space detail path alone, without BPF: synthetic payload records replayed.

    .venv/bin/python bench/replay_detail.py [--requests 40000] [--rounds 5] [--profile FILE]

Builds the agent's pipeline as ``python -m deetune.agent --probe tcp --probe payload --port PORT
--sink jsonl:… --store …`` does (nothing attached), then feeds it the ring records of HTTP/1.1
keep-alive exchanges on 10 connections with both ends on this host (client write, server read,
server writev of headers and a 1 KiB page, client read: 4 records a request), in batches as the
pipeline drains them, ticking the handlers once per 10,000 requests.  Prints the best round's CPU
time per record (µs).  A local listener on the server port makes the resolver see a local server.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import shutil
import socket
import sys
import tempfile
import time

from deetune import records
from deetune.agent import _tune_gc, build_parser, build_pipeline
from deetune.plugins import Plugins
from deetune.probes.payload import PayloadProbe

_L = records.lib
_FIXED, _ = records.record_struct("struct dt_data_record", upto="data")
PAGE = b"x" * 1024
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: loadgen\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 07 Dec 2026 22:00:00 GMT\r\n"
            b"Content-Type: text/html\r\nContent-Length: 1024\r\nLast-Modified: Mon, 07 Dec 2026 21:00:00 GMT\r\n"
            b"Connection: keep-alive\r\nETag: \"6938b0f0-400\"\r\nAccept-Ranges: bytes\r\n\r\n" + PAGE)


def record(ts, pid, sock_id, conn_id, seq, direction, syscall, lport, rport, data, comm):
    addr = socket.inet_aton("127.0.0.1") + bytes(12)
    head = _FIXED.pack(_L.DT_REC_DATA, pid, ts, sock_id, conn_id, 0, seq, pid, 5, len(data), len(data), 2, lport,
                       rport, direction, syscall, 0, 0, 0, addr, addr, comm)
    return head + data


def make_records(requests: int, conns: int, port: int, t0: int) -> list[bytes]:
    out = []
    seqs = {}
    ts = t0
    for i in range(requests):
        c = i % conns
        cport = 40000 + c
        client = (1000 + c, 0x1000 + c, 0x5000 + c, cport, port, b"loadgen".ljust(16, b"\0"))
        server = (999, 0x2000 + c, 0x6000 + c, port, cport, b"nginx".ljust(16, b"\0"))
        for side, direction, syscall, data in ((client, _L.DT_EGRESS, _L.DT_SYS_WRITE, REQUEST),
                                               (server, _L.DT_INGRESS, _L.DT_SYS_READ, REQUEST),
                                               (server, _L.DT_EGRESS, _L.DT_SYS_WRITEV, RESPONSE),
                                               (client, _L.DT_INGRESS, _L.DT_SYS_READ, RESPONSE)):
            pid, sock_id, conn_id, lport, rport, comm = side
            key = (conn_id, direction)
            seq = seqs.get(key, 0)
            seqs[key] = seq + len(data)
            ts += 20_000
            out.append(record(ts, pid, sock_id, conn_id, seq, direction, syscall, lport, rport, data, comm))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: any free one)")
    parser.add_argument("--batch", type=int, default=256, help="records per drain")
    parser.add_argument("--profile", help="write a cProfile of the last round here")
    parser.add_argument("--keep", help="copy the last round's jsonl here (its clock offset 0, its records the same "
                                       "every run: to compare two versions' events)")
    args = parser.parse_args(argv)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen()
    port = listener.getsockname()[1]
    _tune_gc()  # as the agent does
    best = None
    with tempfile.TemporaryDirectory(prefix="deetune-replay-") as tmp:
        for round_ in range(args.rounds):
            agent_args = build_parser().parse_args(
                ["--probe", "tcp", "--probe", "payload", "--port", str(port), "--sink",
                 f"jsonl:{tmp}/events{round_}.jsonl", "--store", f"{tmp}/store{round_}.db"])
            pipeline = build_pipeline(agent_args, Plugins())
            probe = next(p for p in pipeline.probes if isinstance(p, PayloadProbe))
            if args.keep:
                probe.clock.offset_ns = 0
            raws = make_records(args.requests, 10, port, 10**15 if args.keep else time.monotonic_ns())
            profiler = cProfile.Profile() if args.profile and round_ == args.rounds - 1 else None
            events_before = pipeline.stats.events
            if profiler:
                profiler.enable()
            began = time.process_time()
            per_tick = 40000
            for start in range(0, len(raws), args.batch):
                batch = raws[start:start + args.batch]
                for event in pipeline._decode(probe, batch):
                    pipeline.emit(event)
                if (start + args.batch) % per_tick < args.batch:
                    pipeline._tick_handlers()
            for index, handler in enumerate(pipeline.handlers):
                flush = getattr(handler, "flush", None)
                if flush is not None:
                    pipeline._emit_from(index + 1, list(flush()))
            spent = time.process_time() - began
            if profiler:
                profiler.disable()
                profiler.dump_stats(args.profile)
            per_record = spent / len(raws) * 1e6
            exchanges = sum(getattr(h, "stats", None).exchanges for h in pipeline.handlers[:1])
            print(f"round {round_ + 1}: {per_record:.2f} µs per record ({len(raws)} records, "
                  f"{exchanges} exchanges, {pipeline.stats.events - events_before} events to sinks)")
            best = per_record if best is None else min(best, per_record)
            for sink in pipeline.sinks:
                sink.close()
            if args.keep and round_ == args.rounds - 1:
                shutil.copy(f"{tmp}/events{round_}.jsonl", args.keep)
    print(f"best: {best:.2f} µs per record")


if __name__ == "__main__":
    sys.exit(main())
