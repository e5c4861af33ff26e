"""Redis decoder: exact exchanges from RESP2/RESP3 byte streams, properties, third-party vectors."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deetune.decoders.base import Chunk, Direction, Exchange, Undecodable
from deetune.decoders.redis import RedisDecoder

REQ, RESP = Direction.REQUEST, Direction.RESPONSE


def command(*args: bytes | str) -> bytes:
    """A command as clients send it: an array of bulk strings."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


GET_K = command("GET", "k")


def feed_all(events, decoder: RedisDecoder | None = None, close_ts: int | None = None) -> list[Exchange]:
    """Feed ``(direction, data, ts)`` or ``(direction, data, size, ts)`` events; collect exchanges."""
    decoder = decoder or RedisDecoder()
    out: list[Exchange] = []
    for event in events:
        if len(event) == 3:
            direction, data, ts = event
            size = len(data)
        else:
            direction, data, size, ts = event
        out.extend(decoder.feed(Chunk(direction, data, size, ts)))
    if close_ts is not None:
        out.extend(decoder.close(close_ts))
    return out


def exchange(method, target, status, req, resp, req_bytes, resp_bytes, error_message=None,
             error=False, **attributes) -> Exchange:
    """An expected exchange; ``req``/``resp`` are (start, end) timestamps or None."""
    return Exchange(
        "redis", method, target, status, error, req[0], req[1],
        None if resp is None else resp[0], None if resp is None else resp[1],
        req_bytes, resp_bytes, error_message, attributes,
    )


# Basic commands.


def test_get_and_set():
    get, set_ = command("GET", "user:1"), command("SET", "user:1", "alice")
    out = feed_all([
        (REQ, get, 100), (RESP, b"$5\r\nalice\r\n", 150),
        (REQ, set_, 200), (RESP, b"+OK\r\n", 260),
    ])
    assert out == [
        exchange("GET", "user:1", "OK", (100, 100), (150, 150), len(get), 11,
                 argc=1, reply_type="bulk"),
        exchange("SET", "user:1", "OK", (200, 200), (260, 260), len(set_), 5,
                 argc=2, reply_type="simple"),
    ]
    assert out[0].latency_ns == 50


def test_command_name_is_upper_cased_and_key_kept_verbatim():
    out = feed_all([(REQ, command("get", "MiXeD"), 1), (RESP, b"$-1\r\n", 2)])
    assert (out[0].method, out[0].target, out[0].attributes) == (
        "GET", "MiXeD", {"argc": 1, "reply_type": "null"})


def test_pipelined_three_commands_pair_in_order():
    cmds = [command("INCR", "a"), command("GET", "b"), command("DEL", "c", "d")]
    out = feed_all([
        (REQ, b"".join(cmds), 10),
        (RESP, b":1\r\n$2\r\nhi", 20),  # the second reply is split across chunks
        (RESP, b"\r\n:2\r\n", 30),
    ])
    assert out == [
        exchange("INCR", "a", "OK", (10, 10), (20, 20), len(cmds[0]), 4, argc=1, reply_type="integer"),
        exchange("GET", "b", "OK", (10, 10), (20, 30), len(cmds[1]), 8, argc=1, reply_type="bulk"),
        exchange("DEL", "c", "OK", (10, 10), (30, 30), len(cmds[2]), 4, argc=2, reply_type="integer"),
    ]


def test_request_spanning_chunks_times_first_and_last_byte():
    get = command("GET", "k")
    # Cut inside the "*2\r\n" header line: the start time is that of the first byte's chunk.
    out = feed_all([(REQ, get[:2], 5), (REQ, get[2:9], 6), (REQ, get[9:], 7), (RESP, b"$-1\r", 8),
                    (RESP, b"\n", 9)])
    assert out == [exchange("GET", "k", "OK", (5, 7), (8, 9), len(get), 5, argc=1, reply_type="null")]


def test_reply_header_split_across_chunks_starts_at_its_first_byte():
    get, ping = command("GET", "k"), command("PING")
    out = feed_all([(REQ, get + ping, 1), (RESP, b"$", 2), (RESP, b"1", 3),
                    (RESP, b"\r\nv\r\n+PO", 4), (RESP, b"NG\r\n", 5)])
    assert [(e.method, e.response_start_ns, e.response_end_ns, e.response_bytes) for e in out] == [
        ("GET", 2, 4, 7), ("PING", 4, 5, 7)]


def test_inline_command():
    out = feed_all([(REQ, b"PING\r\n", 1), (RESP, b"+PONG\r\n", 2),
                    (REQ, b"\r\nexists  foo\n", 3), (RESP, b":0\r\n", 4)])
    assert out == [
        exchange("PING", "", "OK", (1, 1), (2, 2), 6, 7, argc=0, reply_type="simple"),
        exchange("EXISTS", "foo", "OK", (3, 3), (4, 4), 12, 4, argc=1, reply_type="integer"),
    ]


def test_empty_multibulk_is_ignored_like_redis_does():
    get = command("GET", "k")
    out = feed_all([(REQ, b"*0\r\n*-1\r\n" + get, 1), (RESP, b"$1\r\nv\r\n", 2)])
    assert [(e.method, e.request_bytes) for e in out] == [("GET", len(get))]


@pytest.mark.parametrize("args, method, target, attributes", [
    (("PING",), "PING", "", {"argc": 0}),
    (("AUTH", "user", "s3cret"), "AUTH", "", {"argc": 2}),
    (("HELLO", "3", "AUTH", "user", "s3cret"), "HELLO", "", {"argc": 4}),
    (("CONFIG", "get", "maxmemory"), "CONFIG", "", {"argc": 2, "subcommand": "GET"}),
    (("CLIENT", "setname", "app"), "CLIENT", "", {"argc": 2, "subcommand": "SETNAME"}),
    (("OBJECT", "ENCODING", "mykey"), "OBJECT", "mykey", {"argc": 2, "subcommand": "ENCODING"}),
    (("XINFO", "STREAM", "s1"), "XINFO", "s1", {"argc": 2, "subcommand": "STREAM"}),
    (("EVAL", "return 1", "1", "k1", "a"), "EVAL", "k1", {"argc": 4}),
    (("EVALSHA", "abc", "0", "a"), "EVALSHA", "", {"argc": 3}),
    (("BITOP", "AND", "dest", "k1", "k2"), "BITOP", "dest", {"argc": 4}),
    (("ZUNION", "2", "z1", "z2"), "ZUNION", "z1", {"argc": 3}),
    (("BLMPOP", "0", "1", "l1", "LEFT"), "BLMPOP", "l1", {"argc": 4}),
    (("PUBLISH", "news", "hello"), "PUBLISH", "news", {"argc": 2}),
    (("SELECT", "2"), "SELECT", "", {"argc": 1}),
    (("MSET", "k1", "v1", "k2", "v2"), "MSET", "k1", {"argc": 4}),
    ((b"GET", b"\xff\x00bin"), "GET", "\\xff\x00bin", {"argc": 1}),
])
def test_method_target_and_attributes(args, method, target, attributes):
    out = feed_all([(REQ, command(*args), 1), (RESP, b"+OK\r\n", 2)])
    assert (out[0].method, out[0].target) == (method, target)
    assert out[0].attributes == {**attributes, "reply_type": "simple"}


# Replies.


def test_error_reply_fields():
    get = command("GET", "abcd")
    out = feed_all([(REQ, get, 1), (RESP, b"-NOAUTH Authentication required.\r\n", 74)])
    assert out == [exchange("GET", "abcd", "ERR", (1, 1), (74, 74), len(get), 34,
                            "NOAUTH Authentication required.", error=True, argc=1, reply_type="error")]


def test_nested_arrays():
    reply = b"*3\r\n*2\r\n:1\r\n*1\r\n$1\r\na\r\n*-1\r\n*0\r\n"
    out = feed_all([(REQ, command("EXEC"), 1), (RESP, reply, 2)])
    assert out == [exchange("EXEC", "", "OK", (1, 1), (2, 2), 14, len(reply), argc=0, reply_type="array")]


def test_error_inside_array_does_not_make_the_reply_an_error():
    reply = b"*2\r\n+OK\r\n-WRONGTYPE Operation against a key\r\n"
    out = feed_all([(REQ, command("EXEC"), 1), (RESP, reply, 2)])
    assert (out[0].status, out[0].error, out[0].error_message) == ("OK", False, None)


@pytest.mark.parametrize("reply, reply_type", [
    (b"%2\r\n+first\r\n:1\r\n$6\r\nsecond\r\n#t\r\n", "map"),
    (b"~3\r\n+a\r\n+b\r\n,3.14\r\n", "set"),
    (b",1.23e-4\r\n", "double"),
    (b",-inf\r\n", "double"),
    (b",nan\r\n", "double"),
    (b"#f\r\n", "boolean"),
    (b"_\r\n", "null"),
    (b"$-1\r\n", "null"),
    (b"*-1\r\n", "null"),
    (b"(3492890328409238509324850943850943825024385\r\n", "bignum"),
    (b"=15\r\ntxt:Some string\r\n", "verbatim"),
    (b"%1\r\n$1\r\nk\r\n%1\r\n$1\r\nn\r\n~0\r\n", "map"),
    # An attribute precedes the reply it annotates; it is not a reply of its own.
    (b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n"
     b"*2\r\n:2039123\r\n:9543892\r\n", "array"),
    # An attribute inside an aggregate is not one of its elements.
    (b"*2\r\n:1\r\n|1\r\n+ttl\r\n:3600\r\n:2\r\n", "array"),
])
def test_resp3_reply_types(reply, reply_type):
    hello = command("HELLO", "3")
    out = feed_all([(REQ, hello, 1), (RESP, b"%1\r\n$6\r\nserver\r\n$5\r\nredis\r\n", 2),
                    (REQ, command("X", "k"), 3), (RESP, reply, 4),
                    (REQ, command("PING"), 5), (RESP, b"+PONG\r\n", 6)])
    assert [e.method for e in out] == ["HELLO", "X", "PING"]  # still in sync after the reply
    assert out[0].attributes["reply_type"] == "map"
    assert (out[1].status, out[1].error, out[1].response_bytes) == ("OK", False, len(reply))
    assert out[1].attributes["reply_type"] == reply_type


def test_resp3_blob_error():
    reply = b"!21\r\nSYNTAX invalid syntax\r\n"
    out = feed_all([(REQ, command("FOO"), 1), (RESP, reply, 2)])
    assert out == [exchange("FOO", "", "ERR", (1, 1), (2, 2), 13, len(reply), "SYNTAX invalid syntax",
                            error=True, argc=0, reply_type="error")]


def test_resp3_push_frames_are_not_replies():
    get = command("GET", "k")
    push = b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    invalidate = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
    out = feed_all([(REQ, get, 1), (RESP, push + invalidate, 2), (RESP, b"$1\r\nv\r\n", 3)])
    assert out == [
        exchange("MESSAGE", "news", "OK", (2, 2), (2, 2), 0, len(push), push=True, reply_type="push"),
        exchange("INVALIDATE", "", "OK", (2, 2), (2, 2), 0, len(invalidate), push=True, reply_type="push"),
        exchange("GET", "k", "OK", (1, 1), (3, 3), len(get), 7, argc=1, reply_type="bulk"),
    ]


def test_resp3_subscribe_confirmation_is_a_push_answering_subscribe():
    sub = command("SUBSCRIBE", "news")
    confirmation = b">3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    message = b">3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n"
    get = command("GET", "k")
    out = feed_all([(REQ, sub, 1), (RESP, confirmation, 2), (RESP, message, 3),
                    (REQ, get, 4), (RESP, b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nb\r\n", 5)])
    assert [(e.method, e.target, e.attributes.get("push", False)) for e in out] == [
        ("SUBSCRIBE", "news", False), ("MESSAGE", "news", True), ("GET", "k", False)]
    assert out[0].response_bytes == len(confirmation)


# CLIENT REPLY.


def test_client_reply_off_on_skip():
    off, on, skip = (command("CLIENT", "REPLY", mode) for mode in ("OFF", "ON", "SKIP"))
    set1, set2, get = command("SET", "a", "1"), command("SET", "b", "2"), command("GET", "a")
    out = feed_all([
        (REQ, off + set1, 1),  # no reply for either
        (REQ, on, 2), (RESP, b"+OK\r\n", 3),  # ON itself is answered
        (REQ, skip + set2 + get, 4),  # SKIP and SET b are not answered, GET is
        (RESP, b"$1\r\n1\r\n", 5),
    ])
    client = {"argc": 2, "subcommand": "REPLY"}
    assert out == [
        exchange("CLIENT", "", None, (1, 1), None, len(off), 0, **client),
        exchange("SET", "a", None, (1, 1), None, len(set1), 0, argc=2),
        exchange("CLIENT", "", "OK", (2, 2), (3, 3), len(on), 5, **client, reply_type="simple"),
        exchange("CLIENT", "", None, (4, 4), None, len(skip), 0, **client),
        exchange("SET", "b", None, (4, 4), None, len(set2), 0, argc=2),
        exchange("GET", "a", "OK", (4, 4), (5, 5), len(get), 7, argc=1, reply_type="bulk"),
    ]


def test_unanswered_commands_wait_for_earlier_replies_to_keep_order():
    get, skip, set_ = command("GET", "a"), command("CLIENT", "REPLY", "SKIP"), command("SET", "a", "1")
    decoder = RedisDecoder()
    assert list(decoder.feed(Chunk(REQ, get + skip + set_, len(get + skip + set_), 1))) == []
    out = list(decoder.feed(Chunk(RESP, b"$-1\r\n", 5, 2)))
    assert [(e.method, e.status) for e in out] == [("GET", "OK"), ("CLIENT", None), ("SET", None)]


# Pub/sub in RESP2.


def test_pubsub_resp2_sequence():
    sub = command("SUBSCRIBE", "a", "b")
    psub = command("PSUBSCRIBE", "n*")
    ping = command("PING")
    unsub = command("UNSUBSCRIBE")
    lrange = command("LRANGE", "l", "0", "-1")

    def frame(*items: bytes | int) -> bytes:
        body = b"".join(b":%d\r\n" % i if isinstance(i, int) else b"$%d\r\n%s\r\n" % (len(i), i)
                        for i in items)
        return b"*%d\r\n" % len(items) + body

    confirm_a, confirm_b = frame(b"subscribe", b"a", 1), frame(b"subscribe", b"b", 2)
    message = frame(b"message", b"a", b"hello")
    confirm_p = frame(b"psubscribe", b"n*", 3)
    pmessage = frame(b"pmessage", b"n*", b"news", b"extra!")
    pong = frame(b"pong", b"")
    unsub_a, unsub_b = frame(b"unsubscribe", b"a", 2), frame(b"unsubscribe", b"b", 1)
    punsub = command("PUNSUBSCRIBE")
    punsub_confirm = frame(b"punsubscribe", b"n*", 0)
    lrange_reply = frame(b"message", b"x", b"y")  # an ordinary list: no longer subscribed
    out = feed_all([
        (REQ, sub, 1), (RESP, confirm_a, 2), (RESP, confirm_b + message, 3),
        (REQ, psub, 4), (RESP, confirm_p, 5), (RESP, pmessage, 6),
        (REQ, ping, 7), (RESP, pong, 8),
        (REQ, unsub, 9), (RESP, unsub_a + unsub_b, 10),
        (REQ, punsub, 11), (RESP, punsub_confirm, 12),
        (REQ, lrange, 13), (RESP, lrange_reply, 14),
    ])
    assert out == [
        exchange("SUBSCRIBE", "a", "OK", (1, 1), (2, 2), len(sub), len(confirm_a), argc=2,
                 reply_type="array"),
        exchange("MESSAGE", "a", "OK", (3, 3), (3, 3), 0, len(message), push=True, reply_type="array"),
        exchange("PSUBSCRIBE", "n*", "OK", (4, 4), (5, 5), len(psub), len(confirm_p), argc=1,
                 reply_type="array"),
        exchange("PMESSAGE", "news", "OK", (6, 6), (6, 6), 0, len(pmessage), push=True,
                 reply_type="array", pattern="n*"),
        exchange("PING", "", "OK", (7, 7), (8, 8), len(ping), len(pong), argc=0, reply_type="array"),
        exchange("UNSUBSCRIBE", "", "OK", (9, 9), (10, 10), len(unsub), len(unsub_a), argc=0,
                 reply_type="array"),
        exchange("PUNSUBSCRIBE", "", "OK", (11, 11), (12, 12), len(punsub), len(punsub_confirm), argc=0,
                 reply_type="array"),
        exchange("LRANGE", "l", "OK", (13, 13), (14, 14), len(lrange), len(lrange_reply), argc=3,
                 reply_type="array"),
    ]


def test_array_starting_with_message_is_a_reply_when_not_subscribed():
    reply = b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$1\r\nb\r\n"
    out = feed_all([(REQ, command("LRANGE", "l", "0", "-1"), 1), (RESP, reply, 2)])
    assert [(e.method, e.attributes.get("push")) for e in out] == [("LRANGE", None)]


# Truncated captures.


def test_truncated_bulk_reply_is_stepped_over_by_its_declared_length():
    value_len = 100_000
    reply_size = len(b"$%d\r\n" % value_len) + value_len + 2
    captured = (b"$%d\r\n" % value_len + b"x" * value_len)[:256]
    get, get2 = command("GET", "big"), command("GET", "small")
    out = feed_all([
        (REQ, get, 1), (RESP, captured, reply_size, 2),
        (REQ, get2, 3), (RESP, b"$2\r\nok\r\n", 4),
    ])
    assert out == [
        exchange("GET", "big", "OK", (1, 1), (2, 2), len(get), reply_size, argc=1, reply_type="bulk",
                 truncated=True),
        exchange("GET", "small", "OK", (3, 3), (4, 4), len(get2), 8, argc=1, reply_type="bulk"),
    ]


def test_truncated_value_in_a_command_is_stepped_over():
    set_ = command("SET", "k", b"v" * 5000)
    out = feed_all([(REQ, set_[:100], len(set_), 1), (REQ, command("GET", "k"), 2),
                    (RESP, b"+OK\r\n$1\r\nv\r\n", 3)])
    assert [(e.method, e.target, e.attributes.get("truncated")) for e in out] == [
        ("SET", "k", True), ("GET", "k", None)]


def test_gap_spanning_chunks_and_ending_in_the_crlf():
    reply = b"$10\r\n0123456789\r\n"
    # The first gap covers "2", the second "3456789\r": the final "\n" is captured and checked.
    out = feed_all([(REQ, command("GET", "k"), 1), (RESP, reply[:7], 8, 2), (RESP, b"", 8, 3),
                    (RESP, b"\n", 1, 4), (REQ, command("PING"), 5), (RESP, b"+PONG\r\n", 6)])
    assert [(e.method, e.response_bytes, e.response_end_ns) for e in out] == [("GET", 17, 4), ("PING", 7, 6)]


@pytest.mark.parametrize("captured, size, first", [
    # inside a simple string line: nothing known of the reply; GET's reply was lost with the framing
    (b"+OK", 5, ("GET", None, {"gap": True})),
    # an array header is fine, but the gap covers the element headers: the reply ends with the call
    (b"*2\r\n", 20, ("GET", "OK", {"reply_type": "array", "truncated": True})),
    # the bulk ends, and the gap covers replies to commands not seen
    (b"$3\r\nabc\r\n", 14, ("GET", "OK", {"reply_type": "bulk"})),
])
def test_gap_without_a_declared_length_loses_the_framing_until_the_next_reply(captured, size, first):
    decoder = RedisDecoder()
    out = feed_all([(REQ, GET_K, 1), (RESP, captured, size, 2), (RESP, b"+OK\r\n", 3), (REQ, command("PING"), 4),
                    (RESP, b"+PONG\r\n", 5)], decoder)
    assert [(e.method, e.status, {k: v for k, v in e.attributes.items() if k != "argc"}) for e in out] == [
        first, ("PING", "OK", {"reply_type": "simple"})]
    assert decoder.take_counts() == {"resync:gap": 1, "skipped_bytes": 5}


# Malformed input.


@pytest.mark.parametrize("data, reason", [
    (b"*2\r\n$x\r\nGET\r\n", "garbage"),
    (b"*2\r\n:1\r\n", "garbage"),
    (b"*1\r\n$3\r\nGETXX", "garbage"),
    (b"*1\r\n$-1\r\n", "garbage"),
    (b"\x00\x01\x02binary", "garbage"),
    (b"GET k\x00\r\n", "garbage"),
    (b"*abc\r\n", "garbage"),
])
def test_malformed_commands_are_skipped_to_the_next_command(data, reason):
    """The command before still gets its reply; what the garbage held is unknown, so replies after it
    are skipped until one that follows a command seen again."""
    decoder = RedisDecoder()
    ping = command("PING")
    out = feed_all([(REQ, GET_K, 1), (REQ, data, 2), (RESP, b"$1\r\nv\r\n+OK\r\n", 3), (REQ, b"tail", 4),
                    (REQ, ping, 5), (RESP, b"+PONG\r\n", 6)], decoder)
    assert [(e.method, e.status, e.request_start_ns, e.response_start_ns) for e in out] == [
        ("GET", "OK", 1, 3), ("PING", "OK", 5, 6)]
    assert decoder.take_counts() == {f"resync:{reason}": 1, "unsolicited_response": 1, "skipped_bytes": 4}


@pytest.mark.parametrize("data, reason", [
    (b"?what\r\n", "garbage"),
    (b":12a\r\n", "garbage"),
    (b"#x\r\n", "garbage"),
    (b",1.2.3\r\n", "garbage"),
    (b"_x\r\n", "garbage"),
    (b"$3\r\nabcd\r\n", "garbage"),
    (b"$-2\r\n", "garbage"),
    (b"%-1\r\n", "garbage"),
    (b"!-1\r\n", "garbage"),
    (b"*?\r\n", "garbage"),
    (b"$99999999999999999999\r\n", "garbage"),
    (b"HTTP/1.1 200 OK\r\n", "garbage"),
])
def test_malformed_replies_lose_the_waiting_command_and_the_next_exchange_decodes(data, reason):
    decoder = RedisDecoder()
    ping = command("PING")
    out = feed_all([(REQ, GET_K, 1), (RESP, data, 2), (RESP, b"+OK\r\n", 3), (REQ, ping, 4),
                    (RESP, b"+PONG\r\n", 5)], decoder)
    assert [(e.method, e.status, e.attributes.get("gap")) for e in out] == [("GET", None, True), ("PING", "OK", None)]
    assert decoder.take_counts() == {f"resync:{reason}": 1, "skipped_bytes": 5}


def test_complete_replies_before_garbage_are_reported():
    """`+OK\r\n+OK\r\n` and then bytes that are not RESP, in one chunk: both exchanges count."""
    set_a, set_b = command("SET", "a", "1"), command("SET", "b", "2")
    decoder = RedisDecoder()
    out = feed_all([(REQ, set_a + set_b + GET_K, 1), (RESP, b"+OK\r\n+OK\r\n\x00\xffnot RESP", 2)], decoder)
    assert [(e.target, e.status, e.attributes.get("gap")) for e in out] == [
        ("a", "OK", None), ("b", "OK", None), ("k", None, True)]


@pytest.mark.parametrize("direction, head", [(REQ, b"GET "), (RESP, b"+"), (RESP, b"*1\r\n$")])
def test_unbounded_line_is_cut_at_64_kib(direction, head):
    decoder = RedisDecoder()
    for _ in range(20):
        decoder.feed(Chunk(direction, head + b"a" * 4096, 4096 + len(head), 1))
        head = b""
    assert decoder.take_counts() == {"resync:line_limit": 1, "skipped_bytes": 4 * 4096}


def test_one_long_line_in_one_byte_pieces_takes_linear_time():
    """65,001 one-byte pieces of one line took 1.7 s (each piece copied and searched the whole line)."""
    decoder = RedisDecoder()
    decoder.feed(Chunk(REQ, GET_K, len(GET_K), 0))
    started = time.process_time()
    line = b"+" + b"x" * 60_000 + b"\r\n"
    out = []
    for i in range(len(line)):
        out.extend(decoder.feed(Chunk(RESP, line[i : i + 1], 1, i + 1)))
    elapsed = time.process_time() - started
    (got,) = out
    assert (got.status, got.response_bytes) == ("OK", len(line))
    # Linear: well under the quadratic 1.7 s on a slow machine (a generous bound for a busy one).
    assert elapsed < 1.0, elapsed


def test_nesting_is_bounded():
    decoder = RedisDecoder()
    decoder.feed(Chunk(REQ, GET_K, len(GET_K), 1))
    out = list(decoder.feed(Chunk(RESP, b"*1\r\n" * 100_000, 400_000, 2)))
    assert [(e.method, e.attributes.get("gap")) for e in out] == [("GET", True)]
    assert decoder._replies._stack == [] and decoder.take_counts() == {"resync:nesting_limit": 1}


# Closing, orphans.


def test_close_reports_unanswered_and_partially_received_replies():
    get, ping = command("GET", "k"), command("PING")
    decoder = RedisDecoder()
    feed_all([(REQ, get + ping, 1), (RESP, b"$10\r\n01234", 2)], decoder)
    assert list(decoder.close(9)) == [
        exchange("GET", "k", "OK", (1, 1), (2, 2), len(get), 10, argc=1, incomplete=True,
                 reply_type="bulk"),
        exchange("PING", "", None, (1, 1), None, len(ping), 0, argc=0),
    ]


def test_reply_without_a_command_is_skipped():
    decoder = RedisDecoder()
    out = feed_all([(RESP, b"+OK\r\n", 1), (REQ, command("PING"), 2), (RESP, b"+PONG\r\n", 3)], decoder)
    assert [e.method for e in out] == ["PING"]
    assert decoder.orphan_replies == 1


def test_commands_never_answered_are_bounded():
    decoder = RedisDecoder()
    decoder.max_pending = 100
    assert feed_all([(REQ, GET_K * 100, 1)], decoder) == []
    out = list(decoder.feed(Chunk(REQ, GET_K, len(GET_K), 2)))
    assert [(e.status, e.request_start_ns) for e in out] == [(None, 1)] * 100 + [(None, 2)]
    assert decoder.take_counts() == {"pending_limit": 1}
    # A late reply answers a command that is no longer waiting: skipped; the next command pairs.
    assert feed_all([(RESP, b"$1\r\nv\r\n", 3), (REQ, GET_K, 4), (RESP, b"$1\r\nw\r\n", 5)], decoder)[0].response_start_ns == 5


def test_commands_waiting_for_replies_are_small():
    """A client pipelining commands nobody answers keeps max_pending of them per direction waiting
    (bench/soak.py: over 20,000 at once in the agent, 595 bytes each); each is about 250 bytes, and
    says what it said when reported."""
    import tracemalloc

    decoder = RedisDecoder()
    chunk = command("GET", "key") * 64
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(100):
            assert list(decoder.feed(Chunk(REQ, chunk, len(chunk), i))) == []
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(decoder._pending) == 6400 and held / 6400 < 300  # (was 595)
    out = list(decoder.feed(Chunk(REQ, chunk * 30, len(chunk) * 30, 100)))  # past max_pending: reported
    assert len(out) == 6400 + 64 * 30 and decoder.take_counts() == {"pending_limit": 1}
    assert {(e.method, e.target, e.status, tuple(e.attributes.items())) for e in out} == {("GET", "key", None, (("argc", 1),))}
    hset = command("HSET", "h", "f", "v")
    decoder = RedisDecoder()
    feed_all([(REQ, hset, 1)], decoder)
    (answered,) = feed_all([(RESP, b":1\r\n", 2)], decoder)
    assert (answered.method, answered.target, answered.attributes) == ("HSET", "h", {"argc": 3, "reply_type": "integer"})


def test_multi_exec():
    multi, set_, exec_ = command("MULTI"), command("SET", "k", "v"), command("EXEC")
    out = feed_all([(REQ, multi + set_ + exec_, 1), (RESP, b"+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n", 2)])
    assert [(e.method, e.target, e.attributes["reply_type"], e.response_bytes) for e in out] == [
        ("MULTI", "", "simple", 5), ("SET", "k", "simple", 9), ("EXEC", "", "array", 9)]


def test_errors_inside_exec_are_the_queued_commands_outcomes():
    """A WRONGTYPE inside MULTI/EXEC was reported as success: the queued command said +QUEUED."""
    commands = [command("MULTI"), command("SET", "k", "v"), command("INCR", "k"), command("LPUSH", "k", "x"),
                command("EXEC")]
    wrongtype = b"WRONGTYPE Operation against a key holding the wrong kind of value"
    replies = (b"+OK\r\n" + b"+QUEUED\r\n" * 3 + b"*3\r\n+OK\r\n-ERR value is not an integer or out of range\r\n-"
               + wrongtype + b"\r\n")
    out = feed_all([(REQ, b"".join(commands), 1), (RESP, replies, 2), (REQ, GET_K, 3), (RESP, b"$-1\r\n", 4)])
    assert [(e.method, e.status, e.error, e.error_message, e.attributes.get("transaction")) for e in out] == [
        ("MULTI", "OK", False, None, None),
        ("SET", "OK", False, None, "executed"),
        ("INCR", "ERR", True, "ERR value is not an integer or out of range", "executed"),
        ("LPUSH", "ERR", True, wrongtype.decode(), "executed"),
        ("EXEC", "OK", False, None, None),
        ("GET", "OK", False, None, None),
    ]


def test_discarded_and_aborted_transactions():
    multi, set_, discard, exec_ = command("MULTI"), command("SET", "k", "v"), command("DISCARD"), command("EXEC")
    out = feed_all([(REQ, multi + set_ + discard, 1), (RESP, b"+OK\r\n+QUEUED\r\n+OK\r\n", 2),
                    (REQ, multi + set_ + exec_, 3), (RESP, b"+OK\r\n+QUEUED\r\n*-1\r\n", 4)])  # WATCH failed
    assert [(e.method, e.attributes.get("transaction")) for e in out] == [
        ("MULTI", None), ("SET", "discarded"), ("DISCARD", None), ("MULTI", None), ("SET", "discarded"),
        ("EXEC", None)]


def test_a_pipeline_longer_than_the_capture_keeps_every_command_seen():
    """100 pipelined commands in one write of 4,117 bytes, 4,096 of them copied (redis-py's pipeline of
    the issue): all 100 are decoded, the last one cut short, each with its reply."""
    commands = [command("SET", f"key:{i:03d}", "v" * 8) for i in range(99)] + [command("SET", "key:099", "v" * 123)]
    wire = b"".join(commands)
    assert len(wire) == 4117
    out = feed_all([(REQ, wire[:4096], len(wire), 1), (RESP, b"+OK\r\n" * 100, 2), (REQ, GET_K, 3),
                    (RESP, b"$1\r\nv\r\n", 4)])
    assert [e.target for e in out] == [f"key:{i:03d}" for i in range(100)] + ["k"]
    assert all(e.status == "OK" for e in out)
    assert [e.request_bytes for e in out[:100]] == [len(c) for c in commands]
    assert [e.attributes.get("truncated") for e in out] == [None] * 99 + [True, None]


def test_commands_wholly_past_the_capture_are_skipped_with_their_replies():
    """A pipeline of 100 commands, 4 KiB of 4.3 KB copied: the 95 commands seen and the one cut are
    decoded; the replies to the 4 never seen are skipped (counted), and pairing stays right after."""
    commands = [command("SET", f"key:{i:03d}", "v" * 10) for i in range(100)]
    wire = b"".join(commands)
    decoder = RedisDecoder()
    out = feed_all([(REQ, wire[:4096], len(wire), 1), (RESP, b"+OK\r\n" * 100, 2), (REQ, GET_K, 3),
                    (RESP, b"$1\r\nv\r\n", 4)], decoder)
    # The 96th was cut in its second element: its method is known, not its key.
    assert [(e.method, e.target) for e in out] == [("SET", f"key:{i:03d}") for i in range(95)] + [
        ("SET", ""), ("GET", "k")]
    assert [e.attributes.get("truncated") for e in out] == [None] * 95 + [True, None]
    assert decoder.take_counts() == {"resync:gap": 1, "unsolicited_response": 4}


def test_replies_longer_than_the_capture_are_decoded_where_seen():
    """The replies to 100 GETs read in one call of 6 KB, 4 KiB copied: the replies seen pair with their
    commands, the one cut is truncated, the ones not seen are reported as lost, and the next exchange
    decodes."""
    gets = b"".join(command("GET", f"k{i}") for i in range(100))
    reply = b"$50\r\n" + b"x" * 50 + b"\r\n"
    replies = reply * 100
    out = feed_all([(REQ, gets, 1), (RESP, replies[:4096], len(replies), 2), (REQ, GET_K, 3),
                    (RESP, b"$1\r\nv\r\n", 4)])
    seen = 4096 // len(reply)
    assert len(out) == 101
    assert [e.status for e in out[:seen]] == ["OK"] * seen and all(e.response_bytes == len(reply) for e in out[:seen])
    assert (out[seen].status, out[seen].attributes["truncated"]) == ("OK", True)
    assert {(e.status, e.attributes["gap"]) for e in out[seen + 1:100]} == {(None, True)}
    assert (out[100].target, out[100].status) == ("k", "OK")


# Detection.


@pytest.mark.parametrize("data", [
    command("GET", "k"), command("client", "setname", "x"), command("CLIENT|LIST"),
    command("SET", "k", "v")[:10],  # a prefix is enough once the command name starts
    b"PING\r\n", b"ping\n", b"SET k v\r\n", b"info replication\r\n",  # inline commands
])
def test_detect_requests_by_content(data):
    # Content only: the decoder never sees ports, so Redis on port 10625 is found the same way.
    assert RedisDecoder.detect(REQ, data)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"EHLO mail.example\r\n", b"USER anonymous\r\n", b"PING",
    b"*2\r\n:1\r\n", b"*2\r\n$3\r\n",
    b"*2\r\n$3\r\n1+1\r\n", b"\x16\x03\x01\x02\x00", b"", b"*", b"*0\r\n",
])
def test_detect_rejects_other_requests(data):
    assert not RedisDecoder.detect(REQ, data)


@pytest.mark.parametrize("data, expected", [
    (b"+OK\r\n", True), (b"+PONG\r\n", True), (b"-ERR unknown command\r\n", True),
    (b"|1\r\n+key-popularity\r\n%2\r\n", True),  # a RESP3 attribute before the reply
    (b"-NOAUTH Authentication required.\r\n", True), (b"$5\r\nhello\r\n", True), (b"$-1\r\n", True),
    (b":42\r\n", True), (b"*2\r\n$1\r\na\r\n", True), (b"%7\r\n$6\r\nserver\r\n", True),
    (b"+OK Dovecot ready.\r\n", False), (b"HTTP/1.1 200 OK\r\n", False), (b"220 smtp ESMTP\r\n", False),
    (b"* OK IMAP4rev1\r\n", False), (b"+OK", False), (b"$abc\r\n", False), (b"J\x00\x00\x00\n5.7", False),
])
def test_detect_responses_conservatively(data, expected):
    assert RedisDecoder.detect(RESP, data) is expected


@given(st.binary(max_size=64), st.sampled_from([REQ, RESP]))
def test_detect_never_raises(data, direction):
    assert RedisDecoder.detect(direction, data) in (True, False)


# Byte-boundary splits.

CONVERSATION = [
    (REQ, command("HELLO", "3") + command("GET", "k"), 1),
    (RESP, b"%1\r\n$5\r\nproto\r\n:3\r\n", 2),
    (RESP, b"|1\r\n+a\r\n+b\r\n$5\r\nhello\r\n>3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n", 3),
    (REQ, command("CLIENT", "REPLY", "SKIP") + command("SET", "k", b"v\r\n") + command("EXEC"), 4),
    (RESP, b"*3\r\n~1\r\n,1.5\r\n!3\r\nERR\r\n=7\r\ntxt:abc\r\n", 5),
    (REQ, b"PING\r\n" + command("GET", "k"), 6),
    (RESP, b"-ERR no\r\n_\r\n", 7),
]


def split_at(events, index: int, cut: int):
    direction, data, ts = events[index]
    return events[:index] + [(direction, data[:cut], ts), (direction, data[cut:], ts)] + events[index + 1:]


def test_every_byte_boundary_gives_identical_exchanges():
    expected = feed_all(CONVERSATION, close_ts=99)
    assert [e.method for e in expected] == ["HELLO", "GET", "MESSAGE", "CLIENT", "SET", "EXEC", "PING", "GET"]
    for index, (_, data, _) in enumerate(CONVERSATION):
        for cut in range(1, len(data)):
            assert feed_all(split_at(CONVERSATION, index, cut), close_ts=99) == expected, (index, cut)


def test_byte_by_byte_gives_identical_exchanges():
    one_byte_chunks = [(d, data[i:i + 1], ts) for d, data, ts in CONVERSATION for i in range(len(data))]
    assert feed_all(one_byte_chunks, close_ts=99) == feed_all(CONVERSATION, close_ts=99)


# Property tests.

resp_text = st.binary(max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b)
resp_scalar = st.one_of(
    resp_text.map(lambda s: b"+" + s + b"\r\n"),
    resp_text.map(lambda s: b"-ERR " + s + b"\r\n"),
    st.integers(-2**70, 2**70).map(lambda i: b":%d\r\n" % i if abs(i) < 2**63 else b"(%d\r\n" % i),
    st.binary(max_size=40).map(lambda b: b"$%d\r\n%s\r\n" % (len(b), b)),
    st.binary(max_size=20).map(lambda b: b"!%d\r\n%s\r\n" % (len(b), b)),
    st.binary(max_size=20).map(lambda b: b"=%d\r\ntxt:%s\r\n" % (len(b) + 4, b)),
    st.floats(allow_nan=False).map(lambda f: b",%s\r\n" % repr(f).encode()),
    st.sampled_from([b"_\r\n", b"#t\r\n", b"#f\r\n", b"$-1\r\n", b"*-1\r\n", b",nan\r\n"]),
)


def _aggregate(children):
    items = st.lists(children, max_size=4)
    return st.one_of(
        items.map(lambda xs: b"*%d\r\n" % len(xs) + b"".join(xs)),
        items.map(lambda xs: b"~%d\r\n" % len(xs) + b"".join(xs)),
        st.lists(st.tuples(children, children), max_size=3).map(
            lambda kv: b"%%%d\r\n" % len(kv) + b"".join(k + v for k, v in kv)),
        st.tuples(children, children, children).map(lambda t: b"|1\r\n" + t[0] + t[1] + t[2]),
    )


resp_reply = st.recursive(resp_scalar, _aggregate, max_leaves=12)
resp_push = st.lists(resp_scalar, min_size=1, max_size=3).map(
    lambda xs: b">%d\r\n$7\r\nmessage\r\n" % (len(xs) + 1) + b"".join(xs))
resp_command = st.lists(st.binary(max_size=30), max_size=4).flatmap(
    lambda args: st.sampled_from(["GET", "SET", "DEL", "PING", "CLIENT", "SUBSCRIBE", "EXEC"]).map(
        lambda name: command(name, *args)))


@st.composite
def conversations(draw):
    """Alternating command and reply chunks, sometimes pipelined, with pushes sprinkled in."""
    events, ts = [], 0
    for _ in range(draw(st.integers(1, 4))):
        batch = draw(st.lists(resp_command, min_size=1, max_size=3))
        ts += 1
        events.append((REQ, b"".join(batch), ts))
        replies = [draw(st.one_of(resp_reply, resp_push)) for _ in batch]
        ts += 1
        events.append((RESP, b"".join(replies), ts))
    return events


@st.composite
def resplit(draw, events):
    """The same bytes cut at random points; every piece keeps its chunk's timestamp."""
    out = []
    for direction, data, ts in events:
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=4)))
        cuts = [c for c in cuts if 0 < c < len(data)]
        for start, stop in zip([0, *cuts], [*cuts, len(data)]):
            out.append((direction, data[start:stop], ts))
    return out


def outcome(events):
    try:
        return feed_all(events, close_ts=10**6)
    except Undecodable:
        return ("undecodable",)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_splits_of_valid_streams_give_identical_exchanges(data):
    events = data.draw(conversations())
    assert outcome(data.draw(resplit(events))) == outcome(events)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from([REQ, RESP]), st.binary(max_size=40), st.integers(0, 50)),
                max_size=12))
def test_random_bytes_raise_only_undecodable(chunks):
    decoder = RedisDecoder()
    try:
        for direction, data, extra in chunks:
            decoder.feed(Chunk(direction, data, len(data) + extra, 1))
        decoder.close(2)
    except Undecodable as exc:
        assert "\n" not in str(exc)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_truncation_and_reordering_raise_only_undecodable(data):
    events = data.draw(resplit(data.draw(conversations())))
    events = data.draw(st.permutations(events)) if data.draw(st.booleans()) else events
    decoder = RedisDecoder()
    try:
        for direction, chunk, ts in events:
            kept = data.draw(st.integers(0, len(chunk)))
            decoder.feed(Chunk(direction, chunk[:kept], len(chunk), ts))
        decoder.close(10**6)
    except Undecodable:
        pass


# Third-party vectors.

DEEPFLOW_REDIS = "deepflow/agent/resources/test/flow_generator/redis"
KINDLING_REDIS = "kindling/collector/pkg/component/analyzer/network/protocol/testdata/redis"


def read_streams(vectors: pathlib.Path, relative: str) -> list[dict]:
    pytest.importorskip("dpkt")
    spec = importlib.util.spec_from_file_location("pcap_to_streams", vectors / "pcap_to_streams.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_streams(str(vectors / relative))[3]


def decode_pcap(vectors: pathlib.Path, relative: str) -> list[Exchange]:
    """Every connection's segments fed in time order, as a packet capture shows them."""
    out = []
    for conn in read_streams(vectors, relative):
        chunks = []
        for direction, name in ((REQ, "c2s"), (RESP, "s2c")):
            offset = 0
            for ts, length in conn[name + "_events"]:
                segment = conn[name][offset:offset + length]
                offset += length
                chunks.append((round(ts * 1_000_000) * 1000, direction is RESP, direction, segment))
        chunks.sort(key=lambda c: c[:2])
        out += feed_all([(d, data, ts) for ts, _, d, data in chunks], close_ts=chunks[-1][0])
    return sorted(out, key=lambda e: e.request_start_ns)


def deepflow_results(vectors: pathlib.Path, name: str) -> list[tuple[str, str, str]]:
    """(request, request_type, response_result) of the packets of a DeepFlow ``.result`` file."""
    text = (vectors / DEEPFLOW_REDIS / name).read_text()
    return re.findall(r'request: "(.*?)", request_type: "(.*?)", status: ".*?", response_result: (\w+)', text)


def rrt_us(exchanges: list[Exchange]) -> list[int]:
    return [e.latency_ns // 1000 for e in exchanges]


def test_deepflow_redis_pcap(vectors):
    exchanges = decode_pcap(vectors, DEEPFLOW_REDIS + "/redis.pcap")
    results = deepflow_results(vectors, "redis.result")
    requests = [request for request, _, _ in results if request]
    assert [f"{e.method} {e.target}" for e in exchanges] == requests
    reply_types = {"BulkString": "bulk", "Integer": "integer", "Array": "array", "Error": "error"}
    replies = [reply_types[kind] for request, _, kind in results if not request and kind != "Unknown"]
    assert [e.attributes["reply_type"] for e in exchanges] == replies
    # DeepFlow's L7PerfStats: 10 request/response pairs, RRT sum 592 µs, max 96 µs.
    assert len(exchanges) == 10 and not any(e.error for e in exchanges)
    assert (sum(rrt_us(exchanges)), max(rrt_us(exchanges))) == (592, 96)
    # The capture stops 2 bytes short of the last reply (a 490,493-byte value).
    assert exchanges[-1].attributes.get("incomplete") and exchanges[-1].response_bytes == 490_502
    assert all(not e.attributes.get("incomplete") for e in exchanges[:-1])


def test_deepflow_redis_error_pcap(vectors):
    [e] = decode_pcap(vectors, DEEPFLOW_REDIS + "/redis-error.pcap")
    assert deepflow_results(vectors, "redis-error.result")[0] == ("get abcd", "get", "Unknown")
    assert (e.method, e.target, e.status, e.error) == ("GET", "abcd", "ERR", True)
    assert e.error_message == "NOAUTH Authentication required."
    assert (e.request_bytes, e.response_bytes, rrt_us([e])) == (23, 34, [73])


def test_deepflow_redis_debug_pcap(vectors):
    [e] = decode_pcap(vectors, DEEPFLOW_REDIS + "/redis-debug.pcap")
    request, method, _ = deepflow_results(vectors, "redis-debug.result")[0]
    assert (e.method, e.target) == (method, "mylist") and request == "LRANGE mylist 0 299"
    assert (e.status, e.attributes["reply_type"], e.attributes["argc"]) == ("OK", "array", 3)
    assert (e.request_bytes, e.response_bytes, rrt_us([e])) == (44, 2706, [1209])


def kindling_bytes(items: list[str]) -> bytes:
    """Kindling's ``data`` items: "hex|0a0b", "string|text", "03|def" (hex then text), or text."""
    out = b""
    for item in items:
        prefix, bar, rest = item.partition("|")
        if not bar:
            out += item.encode()
        elif prefix == "hex":
            out += bytes.fromhex(rest)
        elif prefix == "string":
            out += rest.encode()
        else:
            out += bytes.fromhex(prefix) + rest.encode()
    return out


def kindling_trace(vectors: pathlib.Path, name: str) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((vectors / KINDLING_REDIS / name).read_text())["trace"]


def kindling_exchanges(trace: dict) -> list[Exchange]:
    events = []
    for direction, name in ((REQ, "requests"), (RESP, "responses")):
        for event in trace[name]:
            data = kindling_bytes(event["user_attributes"]["data"])
            # A chunk moves at least what was captured (1k-trace.yml records res=1000 for 1002 bytes).
            size = max(event["user_attributes"]["res"], len(data))
            events.append((direction, data, size, event["timestamp"]))
    return feed_all(events)


def test_kindling_server_trace_get(vectors):
    trace = kindling_trace(vectors, "server-trace-get.yml")
    [e] = kindling_exchanges(trace)
    [expect] = trace["expects"]
    values, labels = expect["Values"], expect["Labels"]
    assert e.method == labels["redis_command"].upper() and e.target == "key"
    assert e.error is labels["is_error"] and e.status == "OK"
    assert e.request_bytes == values["request_io"] == sum(
        r["user_attributes"]["res"] for r in trace["requests"])
    assert e.response_bytes == values["response_io"] == sum(
        r["user_attributes"]["res"] for r in trace["responses"])
    # Kindling times from syscall *exit* timestamps and subtracts the first response write's own
    # duration: waiting_ttfb = (first response ts − its latency) − last request ts.  Our latency runs
    # from the last request chunk to the first response chunk, so it includes that write's duration.
    first_response_duration = trace["responses"][0]["user_attributes"]["latency"]
    assert e.latency_ns == values["waiting_ttfb_time"] + first_response_duration
    first_request_duration = trace["requests"][0]["user_attributes"]["latency"]
    assert e.request_start_ns - first_request_duration == expect["Timestamp"]
    assert e.response_end_ns - e.request_start_ns + first_request_duration == values["request_total_time"]
    assert e.response_end_ns == labels["end_timestamp"]


def test_kindling_1k_trace(vectors):
    [e] = kindling_exchanges(kindling_trace(vectors, "1k-trace.yml"))
    assert (e.method, e.target, e.attributes["reply_type"]) == ("GET", "key", "array")
    assert (e.request_bytes, e.response_bytes) == (22, 1002)
