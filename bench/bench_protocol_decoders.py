"""Throughput of the protocol decoders on one core: exchanges per second of CPU time.

Run: .venv/bin/python bench/bench_protocol_decoders.py [--exchanges N] [--rounds R]

Each decoder gets a typical exchange repeated N times on one connection, every message in
its own chunk as syscalls deliver them (the request in one chunk, the response in one):
PostgreSQL's simple query (Q → T D C Z) and extended burst (P B D E S → 1 2 T D C Z), DNS
over UDP and TCP (an A query and its answer), Kafka Produce v9 (acks=1), AMQP basic.publish
under confirms (publish + content → basic.ack), memcached ``get`` with a hit and ``mg``,
MQTT PUBLISH QoS 1 → PUBACK, and Redis GET as the reference the other decoders were held to.
CPU time (``time.process_time``), best of R rounds: the figure least disturbed by other load.
Prints a table and saves bench/results/protocol-decoders-STAMP.json.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.decoders.conversations

import common  # noqa: E402
from deetune.decoders.base import Chunk, Direction  # noqa: E402
from tests.decoders import conversations as cv  # noqa: E402

REQ, RESP = Direction.REQUEST, Direction.RESPONSE
#: The target the issue set for the binary protocols.
TARGET = 100_000


def _kafka_pair() -> tuple[bytes, bytes]:
    from kafka.protocol.producer.produce import ProduceRequest, ProduceResponse

    t, p = ProduceRequest.TopicProduceData, ProduceRequest.TopicProduceData.PartitionProduceData
    rt = ProduceResponse.TopicProduceResponse
    request = ProduceRequest(transactional_id=None, acks=1, timeout_ms=1000,
                             topic_data=[t(name="orders", partition_data=[p(index=0, records=b"r" * 60)])])
    response = ProduceResponse(responses=[rt(name="orders", partition_responses=[
        rt.PartitionProduceResponse(index=0, error_code=0, base_offset=1)])], throttle_time_ms=0)
    out = []
    for message in (request, response):
        message.API_VERSION = 9
        if message.is_request():
            message.with_header(correlation_id=1, client_id="bench")
        else:
            message.with_header(correlation_id=1)
        out.append(bytes(message.encode(header=True, framed=True)))
    return out[0], out[1]


def scenarios():
    """name → (decoder class, options, setup chunks, request(i), response(i), binary?)."""
    from deetune.decoders.amqp import AmqpDecoder
    from deetune.decoders.dns import DnsDecoder
    from deetune.decoders.kafka import KafkaDecoder
    from deetune.decoders.memcached import MemcachedDecoder
    from deetune.decoders.mqtt import MqttDecoder
    from deetune.decoders.postgres import PostgresDecoder
    from deetune.decoders.redis import RedisDecoder

    pg_simple = (cv.pg_query("SELECT n FROM numbers WHERE n = 1"),
                 cv.PG_ROWDESC + cv.pg_row(b"1") + cv.pg_complete("SELECT 1") + cv.PG_READY)
    pg_extended = (cv.PG_EXTENDED[0][1], cv.PG_EXTENDED[1][1])
    kafka_request, kafka_response = _kafka_pair()
    kafka_header = struct.Struct(">i")

    def kafka_request_i(i: int) -> bytes:  # a new correlation id each time
        return kafka_request[:8] + kafka_header.pack(i) + kafka_request[12:]

    def kafka_response_i(i: int) -> bytes:
        return kafka_response[:4] + kafka_header.pack(i) + kafka_response[8:]

    amqp_setup = [(REQ, b"AMQP\x00\x00\x09\x01"), (REQ, cv.amqp_method(1, 85, 10, b"\x00")),
                  (RESP, cv.amqp_method(1, 85, 11))]
    publish = (cv.amqp_method(1, 60, 40, b"\x00\x00" + cv.shortstr("") + cv.shortstr("jobs") + b"\x00")
               + cv.amqp_content(1, b"payload" * 8))

    def ack(i: int) -> bytes:
        return cv.amqp_method(1, 60, 80, struct.pack(">Q", i + 1) + b"\x00")

    def dns_query(i: int) -> bytes:
        return cv.dns_query(i & 0xFFFF, "api.example.com")

    dns_answer_bytes = {i: cv.dns_response(i, "api.example.com", addresses=["10.0.0.1"]) for i in range(65536)}
    mqtt_publish = {i: cv.mqtt_publish("sensors/t", b"21.5", qos=1, packet_id=i % 65535 + 1) for i in range(65535)}
    mqtt_ack = {i: cv.mqtt(4, 0, struct.pack(">H", i % 65535 + 1)) for i in range(65535)}
    redis = (b"*2\r\n$3\r\nGET\r\n$8\r\nuser:123\r\n", b"$11\r\nhello world\r\n")
    return {
        "postgres simple query": (PostgresDecoder, {}, cv.PG_LOGIN, lambda i: pg_simple[0], lambda i: pg_simple[1], True),
        "postgres extended (P B D E S)": (PostgresDecoder, {}, cv.PG_LOGIN, lambda i: pg_extended[0],
                                          lambda i: pg_extended[1], True),
        "dns over udp": (DnsDecoder, {"datagram": True}, [], dns_query, lambda i: dns_answer_bytes[i & 0xFFFF], True),
        "dns over tcp": (DnsDecoder, {}, [], lambda i: cv.dns_tcp(dns_query(i)),
                         lambda i: cv.dns_tcp(dns_answer_bytes[i & 0xFFFF]), True),
        "kafka produce v9": (KafkaDecoder, {}, [], kafka_request_i, kafka_response_i, True),
        "amqp publish + confirm": (AmqpDecoder, {}, amqp_setup, lambda i: publish, ack, True),
        "mqtt publish qos 1": (MqttDecoder, {}, [], lambda i: mqtt_publish[i % 65535], lambda i: mqtt_ack[i % 65535],
                               True),
        "memcached get (hit)": (MemcachedDecoder, {}, [], lambda i: b"get user:123\r\n",
                                lambda i: b"VALUE user:123 0 11\r\nhello world\r\nEND\r\n", False),
        "memcached mg (meta)": (MemcachedDecoder, {}, [], lambda i: b"mg user:123 v\r\n",
                                lambda i: b"VA 11\r\nhello world\r\n", False),
        "redis GET (reference)": (RedisDecoder, {}, [], lambda i: redis[0], lambda i: redis[1], False),
    }


def measure(decoder, options, setup, request, response, exchanges: int, rounds: int) -> float:
    chunks = [Chunk(d, b, len(b), i) for i, (d, b) in enumerate(setup)]
    base = len(chunks)
    for i in range(exchanges):
        a, b = request(i), response(i)
        chunks.append(Chunk(REQ, a, len(a), base + 2 * i))
        chunks.append(Chunk(RESP, b, len(b), base + 2 * i + 1))
    best = float("inf")
    for _ in range(rounds):
        feed = decoder(**options).feed
        count = 0
        started = time.process_time()
        for chunk in chunks:
            count += len(feed(chunk))
        best = min(best, time.process_time() - started)
        expected = exchanges + (1 if setup is cv.PG_LOGIN else 0) + (1 if decoder.protocol == "amqp" else 0)
        assert count == expected, (decoder.protocol, count, expected)
    return exchanges / best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exchanges", type=int, default=100_000, help="exchanges per scenario")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per scenario (the best counts)")
    args = parser.parse_args(argv)
    results = {}
    rows = []
    for name, (decoder, options, setup, request, response, binary) in scenarios().items():
        rate = measure(decoder, options, setup, request, response, args.exchanges, args.rounds)
        results[name] = {"exchanges_per_s": round(rate), "binary": binary}
        verdict = ("met" if rate >= TARGET else "not met") if binary else ""
        rows.append([name, common.fmt(rate), verdict])
        common.log(f"{name}: {rate:,.0f} exchanges/s")
    text = (f"Decoders alone, one core, CPU time, best of {args.rounds} ({args.exchanges:,} exchanges each; "
            f"target for the binary protocols: {TARGET:,} exchanges/s)\n"
            + common.table(["scenario", "exchanges/s", "target"], rows))
    out = {"machine": common.machine(), "args": vars(args), "results": results}
    return common.report("protocol-decoders", out, [text])


if __name__ == "__main__":
    main()
