"""Byte-exact conversations for the protocol decoders' unit tests, built from the protocol specs.

Each builder returns the wire bytes of one message; each conversation is a list of
``(direction, bytes)`` in the order they moved, with the exchanges a decoder must report
(``method``, ``target``, ``status``, ``error``).  Sources: the PostgreSQL frontend/backend
protocol 3.0 chapter, RFC 1035 / RFC 7766 (DNS), Apache Kafka's message schemas (through
kafka-python 3, which encodes from them), the AMQP 0-9-1 specification, memcached's
protocol.txt, MQTT 3.1.1 and 5.0 (OASIS).
"""

from __future__ import annotations

import struct

from deetune.decoders.base import Chunk, Direction

REQ, RESP = Direction.REQUEST, Direction.RESPONSE


def chunks(conversation, start_ns: int = 1_000) -> list[Chunk]:
    """One chunk per message, 1 µs apart."""
    return [Chunk(d, b, len(b), start_ns + 1000 * i) for i, (d, b) in enumerate(conversation)]


def joined(conversation) -> list[tuple[Direction, bytes]]:
    """Consecutive messages of one direction joined (as one write would send them)."""
    out: list[tuple[Direction, bytes]] = []
    for d, b in conversation:
        if out and out[-1][0] is d:
            out[-1] = (d, out[-1][1] + b)
        else:
            out.append((d, b))
    return out


# -- PostgreSQL ----------------------------------------------------------------------------------


def pg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack(">I", len(body) + 4) + body


def pg_startup(user: str = "app", database: str = "shop", **extra: str) -> bytes:
    params = {"user": user, "database": database, **extra}
    body = struct.pack(">I", 196608) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack(">I", len(body) + 4) + body


PG_SSL_REQUEST = struct.pack(">II", 8, 80877103)
PG_READY = pg(b"Z", b"I")
PG_AUTH_OK = pg(b"R", struct.pack(">I", 0))


def pg_error(sqlstate: str, message: str) -> bytes:
    return pg(b"E", b"SERROR\0VERROR\0C" + sqlstate.encode() + b"\0M" + message.encode() + b"\0\0")


def pg_query(sql: str) -> bytes:
    return pg(b"Q", sql.encode() + b"\0")


def pg_parse(sql: str, name: bytes = b"") -> bytes:
    return pg(b"P", name + b"\0" + sql.encode() + b"\0" + b"\0\0")


def pg_bind(statement: bytes = b"", portal: bytes = b"") -> bytes:
    return pg(b"B", portal + b"\0" + statement + b"\0" + b"\0\0" + b"\0\0" + b"\0\0")


def pg_execute(portal: bytes = b"") -> bytes:
    return pg(b"E", portal + b"\0" + b"\0\0\0\0")


PG_SYNC = pg(b"S")
PG_DESCRIBE_PORTAL = pg(b"D", b"P\0")
PG_ROWDESC = pg(b"T", b"\0\x01n\0" + b"\0" * 6 + b"\0\x17\0\x04\xff\xff\xff\xff\0\0")


def pg_row(value: bytes) -> bytes:
    return pg(b"D", b"\0\x01" + struct.pack(">I", len(value)) + value)


def pg_complete(tag: str) -> bytes:
    return pg(b"C", tag.encode() + b"\0")


PG_LOGIN = [
    (REQ, pg_startup()),
    (RESP, PG_AUTH_OK + pg(b"S", b"server_version\x0015.0\0") + pg(b"K", b"\0\0\x04\xd2\0\0\0\x07") + PG_READY),
]
PG_SIMPLE = [
    (REQ, pg_query("SELECT n FROM numbers")),
    (RESP, PG_ROWDESC + pg_row(b"1") + pg_row(b"2") + pg_complete("SELECT 2") + PG_READY),
]
PG_EXTENDED = [
    (REQ, pg_parse("SELECT $1::int") + pg_bind() + PG_DESCRIBE_PORTAL + pg_execute() + PG_SYNC),
    (RESP, pg(b"1") + pg(b"2") + PG_ROWDESC + pg_row(b"5") + pg_complete("SELECT 1") + PG_READY),
]
PG_PIPELINE_ERROR = [  # three statements, one Sync: the second fails, the third is skipped
    (REQ, pg_parse("SELECT 1") + pg_bind() + pg_execute()),
    (REQ, pg_parse("SELECT 1/0") + pg_bind() + pg_execute()),
    (REQ, pg_parse("SELECT 3") + pg_bind() + pg_execute() + PG_SYNC),
    (RESP, pg(b"1") + pg(b"2") + pg_row(b"1") + pg_complete("SELECT 1") + pg(b"1") + pg(b"2")
     + pg_error("22012", "division by zero") + PG_READY),
]
PG_CONVERSATION = PG_LOGIN + PG_SIMPLE + PG_EXTENDED + PG_PIPELINE_ERROR
PG_EXPECTED = [
    {"method": "STARTUP", "target": "shop", "status": "OK", "error": False},
    {"method": "QUERY", "target": "SELECT n FROM numbers", "status": "OK", "error": False},
    {"method": "EXECUTE", "target": "SELECT $1::int", "status": "OK", "error": False},
    {"method": "EXECUTE", "target": "SELECT 1", "status": "OK", "error": False},
    {"method": "EXECUTE", "target": "SELECT 1/0", "status": "ERR", "error": True},
    {"method": "EXECUTE", "target": "SELECT 3", "status": "ERR", "error": True},
]

# -- DNS -----------------------------------------------------------------------------------------


def dns_name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


def dns_query(qid: int, name: str, qtype: int = 1) -> bytes:
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + dns_name(name) + struct.pack(">HH", qtype, 1)


def dns_response(qid: int, name: str, qtype: int = 1, rcode: int = 0, addresses=(), cname: str | None = None) -> bytes:
    answers = b""
    count = 0
    if cname:
        target = dns_name(cname)
        answers += b"\xc0\x0c" + struct.pack(">HHIH", 5, 1, 60, len(target)) + target
        count += 1
    for address in addresses:
        raw = bytes(int(x) for x in address.split("."))
        answers += b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + raw
        count += 1
    return (struct.pack(">HHHHHH", qid, 0x8180 | rcode, 1, count, 0, 0) + dns_name(name)
            + struct.pack(">HH", qtype, 1) + answers)


def dns_tcp(message: bytes) -> bytes:
    return struct.pack(">H", len(message)) + message


DNS_CONVERSATION = [
    (REQ, dns_query(0x1111, "web.example.test")),
    (REQ, dns_query(0x2222, "web.example.test", 28)),
    (RESP, dns_response(0x2222, "web.example.test", 28)),  # out of order
    (RESP, dns_response(0x1111, "web.example.test", addresses=["10.1.2.3"], cname="lb.example.test")),
    (REQ, dns_query(0x3333, "nx.example.test")),
    (RESP, dns_response(0x3333, "nx.example.test", rcode=3)),
    (REQ, dns_query(0x4444, "other.test")),
    (RESP, dns_response(0x4444, "other.test", rcode=5)),
]
DNS_EXPECTED = [
    {"method": "AAAA", "target": "web.example.test", "status": "NOERROR", "error": False},
    {"method": "A", "target": "web.example.test", "status": "NOERROR", "error": False},
    {"method": "A", "target": "nx.example.test", "status": "NXDOMAIN", "error": False},
    {"method": "A", "target": "other.test", "status": "REFUSED", "error": True},
]

# -- memcached -----------------------------------------------------------------------------------

MEMCACHED_CONVERSATION = [
    (REQ, b"set user:1 0 0 5\r\nhello\r\n"),
    (RESP, b"STORED\r\n"),
    (REQ, b"get user:1 user:2\r\n"),
    (RESP, b"VALUE user:1 0 5\r\nhello\r\nEND\r\n"),
    (REQ, b"incr counter 1\r\n"),
    (RESP, b"NOT_FOUND\r\n"),
    (REQ, b"delete user:1 noreply\r\nmg user:1 v\r\n"),
    (RESP, b"EN\r\n"),
    (REQ, b"ms user:3 2 T0\r\nhi\r\nmg user:3 v\r\n"),
    (RESP, b"HD\r\nVA 2\r\nhi\r\n"),
    (REQ, b"set x 0 0 abc\r\n"),
    (RESP, b"CLIENT_ERROR bad command line format\r\n"),
]
MEMCACHED_EXPECTED = [
    {"method": "SET", "target": "user:1", "status": "OK", "error": False},
    {"method": "GET", "target": "user:1", "status": "OK", "error": False},
    {"method": "INCR", "target": "counter", "status": "OK", "error": False},
    {"method": "DELETE", "target": "user:1", "status": None, "error": False},
    {"method": "MG", "target": "user:1", "status": "OK", "error": False},
    {"method": "MS", "target": "user:3", "status": "OK", "error": False},
    {"method": "MG", "target": "user:3", "status": "OK", "error": False},
    {"method": "SET", "target": "x", "status": "ERR", "error": True},
]

# -- MQTT ----------------------------------------------------------------------------------------


def mqtt(kind: int, flags: int, body: bytes) -> bytes:
    length = len(body)
    encoded = b""
    while True:
        byte = length & 0x7F
        length >>= 7
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return bytes([kind << 4 | flags]) + encoded + body


def mqtt_str(text: str) -> bytes:
    return struct.pack(">H", len(text)) + text.encode()


def mqtt_connect(client_id: str, level: int = 4, user: str | None = None, password: str | None = None) -> bytes:
    flags = 0x02 | (0x80 if user else 0) | (0x40 if password else 0)
    body = mqtt_str("MQTT") + bytes([level, flags]) + struct.pack(">H", 30)
    if level == 5:
        body += b"\0"
    body += mqtt_str(client_id)
    if user:
        body += mqtt_str(user)
    if password:
        body += mqtt_str(password)
    return mqtt(1, 0, body)


def mqtt_publish(topic: str, payload: bytes, qos: int = 0, packet_id: int = 0, v5: bool = False) -> bytes:
    body = mqtt_str(topic) + (struct.pack(">H", packet_id) if qos else b"") + (b"\0" if v5 else b"") + payload
    return mqtt(3, qos << 1, body)


MQTT_CONVERSATION = [
    (REQ, mqtt_connect("sensor-1", user="alice", password="s3cret")),
    (RESP, mqtt(2, 0, b"\x00\x00")),
    (REQ, mqtt(8, 2, struct.pack(">H", 1) + mqtt_str("t/a") + b"\x01" + mqtt_str("t/b") + b"\x02")),
    (RESP, mqtt(9, 0, struct.pack(">H", 1) + b"\x01\x80")),
    (REQ, mqtt_publish("t/a", b"x" * 20)),
    (REQ, mqtt_publish("t/a", b"y" * 20, qos=1, packet_id=2)),
    (RESP, mqtt_publish("t/a", b"x" * 20)),
    (RESP, mqtt(4, 0, struct.pack(">H", 2))),
    (REQ, mqtt_publish("t/q2", b"z", qos=2, packet_id=3)),
    (RESP, mqtt(5, 0, struct.pack(">H", 3))),
    (REQ, mqtt(6, 2, struct.pack(">H", 3))),
    (RESP, mqtt(7, 0, struct.pack(">H", 3))),
    (REQ, mqtt(12, 0, b"")),
    (RESP, mqtt(13, 0, b"")),
]
MQTT_EXPECTED = [
    {"method": "CONNECT", "target": "sensor-1", "status": "OK", "error": False},
    {"method": "SUBSCRIBE", "target": "t/a", "status": "ERR", "error": True},
    {"method": "PUBLISH", "target": "t/a", "status": None, "error": False},
    {"method": "PUBLISH", "target": "t/a", "status": "OK", "error": False},  # the delivery (push)
    {"method": "PUBLISH", "target": "t/a", "status": "OK", "error": False},
    {"method": "PUBLISH", "target": "t/q2", "status": "OK", "error": False},
    {"method": "PUBREL", "target": "t/q2", "status": "OK", "error": False},
    {"method": "PINGREQ", "target": "", "status": "OK", "error": False},
]

# -- AMQP 0-9-1 ----------------------------------------------------------------------------------


def amqp_frame(kind: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel, len(payload)) + payload + b"\xce"


def amqp_method(channel: int, cls: int, method: int, args: bytes = b"") -> bytes:
    return amqp_frame(1, channel, struct.pack(">HH", cls, method) + args)


def shortstr(text: str) -> bytes:
    return bytes([len(text)]) + text.encode()


def amqp_content(channel: int, body: bytes) -> bytes:
    header = struct.pack(">HHQH", 60, 0, len(body), 0)
    return amqp_frame(2, channel, header) + (amqp_frame(3, channel, body) if body else b"")


AMQP_CONVERSATION = [
    (REQ, b"AMQP\x00\x00\x09\x01"),
    (RESP, amqp_method(0, 10, 10, b"\x00\x09" + struct.pack(">I", 0) + struct.pack(">I", 5) + b"PLAIN"
                       + struct.pack(">I", 5) + b"en_US")),
    (REQ, amqp_method(0, 10, 11, struct.pack(">I", 0) + shortstr("PLAIN") + struct.pack(">I", 12)
                      + b"\x00guest\x00pass" + shortstr("en_US"))),
    (RESP, amqp_method(0, 10, 30, struct.pack(">HIH", 2047, 131072, 60))),
    (REQ, amqp_method(0, 10, 31, struct.pack(">HIH", 2047, 131072, 60))
     + amqp_method(0, 10, 40, shortstr("/") + b"\x00\x00")),
    (RESP, amqp_method(0, 10, 41, b"\x00")),
    (REQ, amqp_method(1, 20, 10, b"\x00")),
    (RESP, amqp_method(1, 20, 11, struct.pack(">I", 0))),
    (REQ, amqp_method(1, 50, 10, b"\x00\x00" + shortstr("jobs") + b"\x02" + struct.pack(">I", 0))),
    (RESP, amqp_method(1, 50, 11, shortstr("jobs") + struct.pack(">II", 0, 0))),
    (REQ, amqp_method(1, 60, 40, b"\x00\x00" + shortstr("") + shortstr("jobs") + b"\x00") + amqp_content(1, b"hello")),
    (REQ, amqp_method(1, 60, 70, b"\x00\x00" + shortstr("jobs") + b"\x00")),
    (RESP, amqp_method(1, 60, 71, struct.pack(">Q", 1) + b"\x00" + shortstr("") + shortstr("jobs")
                       + struct.pack(">I", 0)) + amqp_content(1, b"hello")),
    (REQ, amqp_method(1, 60, 80, struct.pack(">Q", 1) + b"\x00")),
    (REQ, amqp_method(1, 60, 20, b"\x00\x00" + shortstr("jobs") + shortstr("") + b"\x00" + struct.pack(">I", 0))),
    (RESP, amqp_method(1, 60, 21, shortstr("ctag-1"))),
    (RESP, amqp_method(1, 60, 60, shortstr("ctag-1") + struct.pack(">Q", 2) + b"\x00" + shortstr("orders")
                       + shortstr("eu.new")) + amqp_content(1, b"order-17")),
    (REQ, amqp_method(1, 60, 40, b"\x00\x00" + shortstr("orders") + shortstr("nowhere") + b"\x01")
     + amqp_content(1, b"")),
    (RESP, amqp_method(1, 60, 50, struct.pack(">H", 312) + shortstr("NO_ROUTE") + shortstr("orders")
                       + shortstr("nowhere")) + amqp_content(1, b"")),
    (REQ, amqp_method(1, 50, 10, b"\x00\x00" + shortstr("missing") + b"\x01" + struct.pack(">I", 0))),
    (RESP, amqp_method(1, 20, 40, struct.pack(">H", 404) + shortstr("NOT_FOUND - no queue 'missing'")
                       + struct.pack(">HH", 50, 10))),
    (REQ, amqp_method(1, 20, 41)),
]
AMQP_EXPECTED = [
    {"method": "connection.start-ok", "target": "", "status": "OK", "error": False},
    {"method": "connection.open", "target": "/", "status": "OK", "error": False},
    {"method": "channel.open", "target": "", "status": "OK", "error": False},
    {"method": "queue.declare", "target": "jobs", "status": "OK", "error": False},
    {"method": "basic.publish", "target": "jobs", "status": None, "error": False},
    {"method": "basic.get", "target": "jobs", "status": "OK", "error": False},
    {"method": "basic.ack", "target": "", "status": None, "error": False},
    {"method": "basic.consume", "target": "jobs", "status": "OK", "error": False},
    {"method": "basic.deliver", "target": "orders", "status": "OK", "error": False},
    {"method": "basic.publish", "target": "orders", "status": None, "error": False},
    {"method": "basic.return", "target": "orders", "status": "ERR", "error": True},
    {"method": "queue.declare", "target": "missing", "status": "ERR", "error": True},
]


# -- Kafka (encoded by kafka-python from Apache Kafka's message schemas) -------------------------


def kafka_messages():
    """(conversation, expected) or None when kafka-python is not installed."""
    try:
        from kafka.protocol.consumer.fetch import FetchRequest, FetchResponse
        from kafka.protocol.producer.produce import ProduceRequest, ProduceResponse
    except ImportError:
        return None

    def encode(message, version: int, correlation: int) -> bytes:
        message.API_VERSION = version
        if message.is_request():
            message.with_header(correlation_id=correlation, client_id="shop-api")
        else:
            message.with_header(correlation_id=correlation)
        return bytes(message.encode(header=True, framed=True))

    topic, partition = ProduceRequest.TopicProduceData, ProduceRequest.TopicProduceData.PartitionProduceData
    r_topic = ProduceResponse.TopicProduceResponse
    r_partition = r_topic.PartitionProduceResponse

    def produce(acks: int, name: str):
        return ProduceRequest(transactional_id=None, acks=acks, timeout_ms=1000,
                              topic_data=[topic(name=name, partition_data=[partition(index=0, records=b"r" * 40)])])

    def produced(name: str, error: int):
        return ProduceResponse(responses=[r_topic(name=name, partition_responses=[
            r_partition(index=0, error_code=error, base_offset=-1 if error else 42)])], throttle_time_ms=0)

    f_topic = FetchRequest.FetchTopic
    f_partition = f_topic.FetchPartition
    fr_topic = FetchResponse.FetchableTopicResponse
    fr_partition = fr_topic.PartitionData

    def fetch(name: str):
        return FetchRequest(replica_id=-1, max_wait_ms=500, min_bytes=1, max_bytes=1 << 20, isolation_level=0,
                            session_id=0, session_epoch=-1,
                            topics=[f_topic(topic=name, partitions=[f_partition(partition=0, fetch_offset=0,
                                                                                  partition_max_bytes=1 << 20)])],
                            forgotten_topics_data=[], rack_id="")

    def fetched(name: str, error: int):
        return FetchResponse(throttle_time_ms=0, error_code=0, session_id=0, responses=[fr_topic(
            topic=name, partitions=[fr_partition(partition_index=0, error_code=error, high_watermark=10,
                                                 last_stable_offset=10, log_start_offset=0, aborted_transactions=[],
                                                 preferred_read_replica=-1, records=b"")])])

    conversation = [
        (REQ, encode(produce(-1, "orders"), 7, 1)),
        (REQ, encode(produce(1, "audit"), 9, 2)),  # flexible version
        (RESP, encode(produced("audit", 0), 9, 2)),  # answered out of order
        (RESP, encode(produced("orders", 3), 7, 1)),
        (REQ, encode(produce(0, "metrics"), 8, 3)),  # acks=0: no response
        (REQ, encode(fetch("orders"), 11, 4)),
        (RESP, encode(fetched("orders", 0), 11, 4)),
        (REQ, encode(fetch("orders"), 12, 5)),
        (RESP, encode(fetched("orders", 1), 12, 5)),
    ]
    expected = [
        {"method": "Produce", "target": "audit", "status": "OK", "error": False},
        {"method": "Produce", "target": "orders", "status": "ERR", "error": True},
        {"method": "Produce", "target": "metrics", "status": None, "error": False},
        {"method": "Fetch", "target": "orders", "status": "OK", "error": False},
        {"method": "Fetch", "target": "orders", "status": "ERR", "error": True},
    ]
    return conversation, expected
