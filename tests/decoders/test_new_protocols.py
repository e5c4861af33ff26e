"""Properties every new protocol decoder must have, on spec-built conversations:
exact exchanges, the same exchanges whatever the chunking, gaps stepped over inside
messages, detection by content that recognises its own first bytes and none of the
others', and malformed input that never raises anything but Undecodable."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deetune.decoders.amqp import AmqpDecoder
from deetune.decoders.base import Chunk, Decoder, Undecodable
from deetune.decoders.dns import DnsDecoder
from deetune.decoders.kafka import KafkaDecoder
from deetune.decoders.memcached import MemcachedDecoder
from deetune.decoders.mqtt import MqttDecoder
from deetune.decoders.postgres import PostgresDecoder
from deetune.testing import assert_exchanges, decode_chunks, summary
from tests.decoders import conversations as cv

_kafka = cv.kafka_messages()
CASES = {
    "postgres": (PostgresDecoder, cv.PG_CONVERSATION, cv.PG_EXPECTED, {}),
    "dns-udp": (DnsDecoder, cv.DNS_CONVERSATION, cv.DNS_EXPECTED, {"datagram": True}),
    "dns-tcp": (DnsDecoder, [(d, cv.dns_tcp(b)) for d, b in cv.DNS_CONVERSATION], cv.DNS_EXPECTED, {}),
    "memcached": (MemcachedDecoder, cv.MEMCACHED_CONVERSATION, cv.MEMCACHED_EXPECTED, {}),
    "mqtt": (MqttDecoder, cv.MQTT_CONVERSATION, cv.MQTT_EXPECTED, {}),
    "amqp": (AmqpDecoder, cv.AMQP_CONVERSATION, cv.AMQP_EXPECTED, {}),
}
if _kafka is not None:
    CASES["kafka"] = (KafkaDecoder, _kafka[0], _kafka[1], {})
STREAMS = [name for name in CASES if name != "dns-udp"]


def test_kafka_vectors_available():
    assert _kafka is not None, "kafka-python (the test extra) encodes the Kafka vectors"


@pytest.mark.parametrize("name", list(CASES))
def test_exact_exchanges(name):
    decoder, conversation, expected, options = CASES[name]
    exchanges = decode_chunks(decoder, cv.chunks(conversation), **options)
    assert_exchanges(exchanges, expected)
    for x in exchanges:
        assert x.protocol == decoder.protocol
        assert x.request_start_ns <= x.request_end_ns
        if x.response_start_ns is not None:
            assert x.response_end_ns >= x.response_start_ns
            assert x.response_bytes > 0


@pytest.mark.parametrize("name", STREAMS)
def test_chunking_does_not_matter(name):
    """Split the two streams at every byte: the same exchanges, the same byte counts."""
    decoder, conversation, expected, options = CASES[name]
    fields = ("method", "target", "status", "error", "request_bytes", "response_bytes")
    reference = summary(decode_chunks(decoder, cv.chunks(conversation), **options), fields)
    assert len(reference) == len(expected)
    together = summary(decode_chunks(decoder, cv.chunks(cv.joined(conversation)), **options), fields)
    assert together == reference
    stream = cv.joined(conversation)
    for index, (d, data) in enumerate(stream):
        for cut in range(1, len(data), max(1, len(data) // 40)):
            pieces = stream[:index] + [(d, data[:cut]), (d, data[cut:])] + stream[index + 1:]
            got = summary(decode_chunks(decoder, cv.chunks(pieces), **options), fields)
            assert got == reference, f"split of message {index} at {cut}"


@pytest.mark.parametrize("name", STREAMS)
def test_one_byte_at_a_time(name):
    decoder, conversation, _, options = CASES[name]
    reference = summary(decode_chunks(decoder, cv.chunks(conversation), **options))
    bytewise = [(d, data[i:i + 1]) for d, data in conversation for i in range(len(data))]
    assert summary(decode_chunks(decoder, cv.chunks(bytewise), **options)) == reference


@pytest.mark.parametrize("name", list(CASES))
def test_detects_its_own_first_bytes(name):
    decoder, conversation, _, _ = CASES[name]
    direction, first = conversation[0]
    assert decoder.detect(direction, first)


ALL_FIRST = {name: CASES[name][1][0] for name in CASES}
ALL_FIRST.update({
    "http": (cv.REQ, b"GET /index.html HTTP/1.1\r\nHost: example\r\n\r\n"),
    "http-response": (cv.RESP, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    "redis": (cv.REQ, b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n"),
    "tls": (cv.REQ, bytes.fromhex("16030100f4010000f00303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"),
    "ssh": (cv.RESP, b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"),
    "mysql-greeting": (cv.RESP, b"J\x00\x00\x00\n8.0.36\x00" + bytes(40)),
})
OWNER = {"dns-udp": "dns", "dns-tcp": "dns"}


@pytest.mark.parametrize("name", list(CASES))
def test_rejects_the_other_protocols(name):
    decoder = CASES[name][0]
    for other, (direction, first) in ALL_FIRST.items():
        if OWNER.get(other, other) == decoder.protocol:
            continue
        assert not decoder.detect(direction, first), f"{decoder.protocol} detects {other}"
        assert not decoder.detect(direction.other, first), f"{decoder.protocol} detects {other} (other way)"


# Conversations whose longest chunk ends inside a message body (where a capture cut falls).
GAPS = {
    "postgres": cv.PG_LOGIN + [(cv.REQ, cv.pg_query("SELECT v FROM blobs")), (cv.RESP, cv.PG_ROWDESC),
                               (cv.RESP, cv.pg_row(b"x" * 300)), (cv.RESP, cv.pg_complete("SELECT 1") + cv.PG_READY)],
    "memcached": [(cv.REQ, b"get big\r\n"), (cv.RESP, b"VALUE big 0 300\r\n" + b"v" * 300 + b"\r\n"),
                  (cv.RESP, b"END\r\n")],
}


@pytest.mark.parametrize("name", STREAMS)
def test_capture_gap_inside_a_message_is_stepped_over(name):
    """The longest chunk loses its last bytes to a capture gap (inside a message): the exchanges
    stay the same, byte counts too; the one that holds the gap says truncated."""
    decoder, conversation, _, options = CASES[name]
    conversation = GAPS.get(name, conversation)
    reference = summary(decode_chunks(decoder, cv.chunks(conversation), **options),
                        ("method", "target", "request_bytes", "response_bytes"))
    index = max(range(len(conversation)), key=lambda i: len(conversation[i][1]))
    chunks = cv.chunks(conversation)
    longest = chunks[index]
    cut = Chunk(longest.direction, longest.data[:len(longest.data) - 3], longest.size, longest.ts_ns)
    chunks[index] = cut
    try:
        got = decode_chunks(decoder, chunks, **options)
    except Undecodable as exc:
        pytest.fail(f"gap inside a message lost the stream: {exc}")
    assert summary(got, ("method", "target", "request_bytes", "response_bytes")) == reference
    assert any(x.attributes.get("truncated") for x in got)


def test_dns_udp_skips_what_is_not_dns():
    """A UDP socket carries anything; a datagram that is not DNS is counted, not fatal."""
    decoder = DnsDecoder(datagram=True)
    assert list(decoder.feed(Chunk(cv.REQ, b"\x01\x02garbage", 9, 1))) == []
    assert decoder.malformed == 1
    query = cv.dns_query(7, "a.test")
    assert list(decoder.feed(Chunk(cv.REQ, query, len(query), 2, ("10.0.0.1", 5353)))) == []
    response = cv.dns_response(7, "a.test", addresses=["10.9.9.9"])
    [x] = decoder.feed(Chunk(cv.RESP, response, len(response), 3, None))
    assert (x.target, x.peer, x.attributes["addresses"], x.latency_ns) == ("a.test", ("10.0.0.1", 5353),
                                                                           ["10.9.9.9"], 1)


def test_dns_query_without_response_times_out():
    decoder = DnsDecoder(datagram=True)
    first = cv.dns_query(1, "slow.test")
    decoder.feed(Chunk(cv.REQ, first, len(first), 1_000))
    later = cv.dns_query(2, "fast.test")
    [x] = decoder.feed(Chunk(cv.REQ, later, len(later), 1_000 + DnsDecoder.timeout_ns + 1))
    assert (x.target, x.status, x.attributes["timeout"]) == ("slow.test", None, True)
    [y] = decoder.close(10**12)
    assert (y.target, y.status) == ("fast.test", None)


def test_postgres_password_is_never_kept():
    password = b"pw-never-in-output"
    conversation = [
        (cv.REQ, cv.pg_startup("alice", "db")),
        (cv.RESP, cv.pg(b"R", b"\0\0\0\x03")),  # cleartext password, please
        (cv.REQ, cv.pg(b"p", password + b"\0")),
        (cv.RESP, cv.PG_AUTH_OK + cv.PG_READY),
    ]
    [x] = decode_chunks(PostgresDecoder, cv.chunks(conversation))
    assert (x.method, x.attributes["user"], x.attributes["database"], x.attributes["auth"]) == (
        "STARTUP", "alice", "db", "password")
    assert password.decode() not in repr(x)
    assert x.latency_ns == 1000  # from the password to AuthenticationOk


def test_postgres_ssl_refused_then_startup_and_accepted_then_nothing():
    refused = [(cv.REQ, cv.PG_SSL_REQUEST), (cv.RESP, b"N")] + cv.PG_LOGIN
    got = decode_chunks(PostgresDecoder, cv.chunks(refused))
    assert [(x.method, x.attributes.get("encryption")) for x in got] == [("SSL_REQUEST", "refused"), ("STARTUP", None)]
    decoder = PostgresDecoder()
    assert [x.attributes["encryption"] for x in decode_chunks(
        decoder, cv.chunks([(cv.REQ, cv.PG_SSL_REQUEST), (cv.RESP, b"S")]), close=False)] == ["accepted"]
    hello = bytes.fromhex("16030100f4010000f00303")
    with pytest.raises(Undecodable, match="encrypted"):
        decoder.feed(Chunk(cv.REQ, hello, len(hello), 5))


def test_postgres_error_fields_and_rows():
    conversation = cv.PG_LOGIN + cv.PG_SIMPLE + [
        (cv.REQ, cv.pg_query("INSERT INTO t VALUES (1), (2), (3)")),
        (cv.RESP, cv.pg_complete("INSERT 0 3") + cv.PG_READY),
        (cv.REQ, cv.pg_query("SELECT * FROM nope")),
        (cv.RESP, cv.pg_error("42P01", 'relation "nope" does not exist') + cv.PG_READY),
    ]
    got = decode_chunks(PostgresDecoder, cv.chunks(conversation))[1:]
    assert [(x.attributes.get("command"), x.attributes.get("rows")) for x in got] == [
        ("SELECT", 2), ("INSERT", 3), (None, None)]
    assert (got[2].error_message, got[2].attributes["sqlstate"]) == ('relation "nope" does not exist', "42P01")


def test_postgres_pipeline_error_written_before_the_sync():
    """The server read the pipeline before its Sync: the error is written at once, the
    ReadyForQuery after the Sync.  The skipped statement is answered by that error (as the kernel's
    heads of the error, which end before the Sync, see it: one exchange whichever decodes it), and
    its latency is not negative."""
    conversation = cv.PG_LOGIN + [
        (cv.REQ, cv.pg_parse("SELECT 1") + cv.pg_bind() + cv.pg_execute() + cv.pg_parse("SELECT 1/0")
         + cv.pg_bind() + cv.pg_execute() + cv.pg_parse("SELECT 3") + cv.pg_bind() + cv.pg_execute()),
        (cv.RESP, cv.pg(b"1") + cv.pg(b"2") + cv.pg_row(b"1") + cv.pg_complete("SELECT 1") + cv.pg(b"1")
         + cv.pg(b"2") + cv.pg_error("22012", "division by zero")),
        (cv.REQ, cv.PG_SYNC),
        (cv.RESP, cv.PG_READY),
    ]
    stream = cv.chunks(conversation)
    error_at = stream[-3].ts_ns
    _, ok, failed, skipped = decode_chunks(PostgresDecoder, stream)
    assert [(x.status, x.attributes.get("aborted")) for x in (ok, failed, skipped)] == [
        ("OK", None), ("ERR", None), ("ERR", True)]
    assert failed.response_start_ns == skipped.response_start_ns == error_at
    assert skipped.latency_ns is not None and skipped.latency_ns >= 0
    # From the heads alone (the request's call and the error's): the same exchange, answered then.
    *_, heads_skipped = decode_chunks(PostgresDecoder, stream[:-2])
    assert (heads_skipped.method, heads_skipped.response_start_ns) == ("EXECUTE", error_at)


def test_postgres_requests_after_an_error_decoded_as_skipped():
    """The kernel's heads of what a client sent after an error was answered, and its ReadyForQuery
    (deetune.l7: DataEvent.after_error): statements the server skipped, errors."""
    conversation = [(cv.REQ, cv.pg_parse("SELECT 3") + cv.pg_bind() + cv.pg_execute()), (cv.REQ, cv.PG_SYNC),
                    (cv.RESP, cv.PG_READY)]
    [x] = decode_chunks(PostgresDecoder(skipping=True), cv.chunks(conversation))
    assert (x.method, x.target, x.status, x.attributes) == ("EXECUTE", "SELECT 3", "ERR", {"aborted": True})
    assert x.latency_ns == 1000


def test_postgres_copy_from_stdin():
    conversation = cv.PG_LOGIN + [
        (cv.REQ, cv.pg_query("COPY t FROM STDIN")),
        (cv.RESP, cv.pg(b"G", b"\0\0\x01\0\0")),
        (cv.REQ, cv.pg(b"d", b"1\n") + cv.pg(b"d", b"2\n") + cv.pg(b"c")),
        (cv.RESP, cv.pg_complete("COPY 2") + cv.PG_READY),
    ]
    [_, x] = decode_chunks(PostgresDecoder, cv.chunks(conversation))
    assert (x.method, x.attributes["rows"], x.request_bytes, x.latency_ns) == ("QUERY", 2, 23 + 7 + 7 + 5, 1000)


def test_memcached_hits_and_misses():
    got = decode_chunks(MemcachedDecoder, cv.chunks(cv.MEMCACHED_CONVERSATION))
    assert [(x.attributes.get("hits"), x.attributes.get("misses")) for x in got if x.method in ("GET", "MG")] == [
        (1, 1), (0, 1), (1, 0)]
    assert got[-1].error_message == "bad command line format"


def test_mqtt_connect_refused_and_never_the_password():
    conversation = [(cv.REQ, cv.mqtt_connect("c1", user="bob", password="hunter2")), (cv.RESP, cv.mqtt(2, 0, b"\x00\x05"))]
    [x] = decode_chunks(MqttDecoder, cv.chunks(conversation))
    assert (x.status, x.error, x.error_message, x.attributes["username"]) == ("ERR", True, "not authorized", "bob")
    assert "hunter2" not in repr(x)
    v5 = [(cv.REQ, cv.mqtt_connect("c2", level=5)), (cv.RESP, cv.mqtt(2, 0, b"\x00\x86\x00"))]
    [y] = decode_chunks(MqttDecoder, cv.chunks(v5))
    assert (y.attributes["version"], y.error_message, y.attributes["reason_code"]) == (
        "5.0", "bad user name or password", 0x86)


def test_amqp_never_keeps_the_password_and_flags_close_codes():
    got = decode_chunks(AmqpDecoder, cv.chunks(cv.AMQP_CONVERSATION))
    assert got[0].attributes["user"] == "guest"
    assert "pass" not in repr(got[0].attributes)
    failed = got[-1]
    assert (failed.attributes["reply_code"], failed.error_message) == (404, "NOT_FOUND - no queue 'missing'")
    assert got[4].attributes["body_size"] == 5 and got[5].attributes["body_size"] == 5
    deliver = got[8]
    assert (deliver.attributes["push"], deliver.attributes["routing_key"], deliver.attributes["delivery_tag"],
            deliver.attributes["body_size"], deliver.request_bytes) == (True, "eu.new", 2, 8, 0)
    returned = got[10]
    assert (returned.error_message, returned.attributes["reply_code"], returned.attributes["push"]) == (
        "NO_ROUTE", 312, True)


# -- malformed input -----------------------------------------------------------------------------

ALL_DECODERS = [PostgresDecoder, KafkaDecoder, AmqpDecoder, MemcachedDecoder, MqttDecoder, DnsDecoder]


def _feed_all(decoder: Decoder, pieces) -> None:
    ts = 0
    for request, data, extra in pieces:
        ts += 1
        try:
            decoder.feed(Chunk(cv.REQ if request else cv.RESP, data, len(data) + extra, ts))
        except Undecodable as exc:
            assert str(exc) and "\n" not in str(exc)
            return
    try:
        decoder.close(ts + 1)
    except Undecodable:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ALL_DECODERS + ["dns-udp"]),
       st.lists(st.tuples(st.booleans(), st.binary(max_size=300), st.sampled_from([0, 0, 0, 5, 1000])),
                max_size=12))
def test_random_bytes_raise_only_undecodable(cls, pieces):
    for data in pieces:
        (cls if cls != "dns-udp" else DnsDecoder).detect(cv.REQ, data[1])
    decoder = DnsDecoder(datagram=True) if cls == "dns-udp" else cls()
    _feed_all(decoder, pieces)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(CASES)), st.data())
def test_mutated_conversations_raise_only_undecodable(name, data):
    """A valid conversation with bytes flipped, cut or dropped: never anything but Undecodable."""
    decoder_cls, conversation, _, options = CASES[name]
    pieces = []
    for direction, message in cv.joined(conversation):
        message = bytearray(message)
        for _ in range(data.draw(st.integers(0, 3))):
            if message:
                at = data.draw(st.integers(0, len(message) - 1))
                message[at] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(message)))
        pieces.append((direction is cv.REQ, bytes(message[:cut]), data.draw(st.sampled_from([0, 0, len(message) - cut]))))
    _feed_all(decoder_cls(**options), pieces)
