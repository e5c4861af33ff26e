"""Decoder fidelity against real servers: traffic larger than the capture size, short connections
with large bodies, results of thousands of rows.  BPF payload capture → L7 handler → exchanges.

The capture size is the probe's default (4 KiB) unless a test says otherwise: what lies inside the
copied prefix of a call is decoded, exchanges whose bytes were not copied are reported as such
(``gap``, ``truncated``, ``rows_truncated``), and no exchange is paired with another's response.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

import pytest

from deetune.decoders.http import HttpDecoder
from deetune.decoders.mysql import MysqlDecoder
from deetune.decoders.redis import RedisDecoder
from deetune.events import ExchangeEvent
from deetune.l7 import L7Handler, ListeningPorts
from deetune.probes import ProbeOptions
from deetune.probes.payload import DEFAULT_CAPTURE_BYTES, PayloadProbe
from deetune.probes.tcp import TcpProbe
from tests.harness import running_pipeline
from tests.servers import (  # noqa: F401  (fixtures)
    DB_NAME,
    DB_PASSWORD,
    DB_USER,
    HOST,
    mariadb_server,
    need_module,
    nginx_server,
    redis_server,
)

pytestmark = [pytest.mark.bpf, pytest.mark.servers]

DECODERS = [HttpDecoder, RedisDecoder, MysqlDecoder]
SETTLE = 0.5
WAIT = 30.0


@contextlib.contextmanager
def capture(*ports: int, capture_bytes: int = DEFAULT_CAPTURE_BYTES):
    payload = PayloadProbe(ProbeOptions(), ports=ports, exclude_self=False, capture_bytes=capture_bytes)
    handler = L7Handler(DECODERS, mute=payload.mute, listening=ListeningPorts(reader=lambda: set(ports)))
    with running_pipeline([TcpProbe(ProbeOptions(port=ports[0])), payload], handlers=[handler]) as collector:
        collector.handler = handler
        yield collector
        time.sleep(SETTLE)


def exchanges(collector, port: int, role: str) -> list[ExchangeEvent]:
    return collector.matching(lambda e: isinstance(e, ExchangeEvent) and port in (e.lport, e.rport) and e.role == role)


def wait_quiet(collector, port: int, count: int, timeout: float = WAIT) -> None:
    """Until ``count`` exchanges on the port came, or nothing new for a second (some may be lost)."""
    deadline = time.monotonic() + timeout
    seen, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = len(collector.matching(lambda e: isinstance(e, ExchangeEvent) and port in (e.lport, e.rport)))
        if now >= count:
            return
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since > 1.0:
            return
        time.sleep(0.05)


# -- Redis pipelines -------------------------------------------------------------------------------


def value(i: int) -> bytes:
    return b"v%d-" % i + b"x" * (i % 37)


@pytest.mark.parametrize("count", [100, 1000])
def test_redis_py_pipelines_over_the_capture_size(redis_server, count):
    """redis-py writes a pipeline in calls of up to 6,000 bytes; the kernel copies 4 KiB of each.
    Every GET seen is paired with its own reply (its size says which), none is paired with another's;
    with the capture raised to 64 KiB, every one of them is decoded on both sides."""
    redis_py = need_module("redis", "redis")
    redis = redis_server
    tag = os.urandom(4).hex()
    keys = [f"fid:{tag}:{i:05d}" for i in range(count)]
    setup = redis_py.Redis(host=HOST, port=redis.port)
    setup.mset({key: value(i) for i, key in enumerate(keys)})
    setup.close()
    reply_size = {key: len(b"$%d\r\n%s\r\n" % (len(value(i)), value(i))) for i, key in enumerate(keys)}
    results = {}
    for capture_bytes in (DEFAULT_CAPTURE_BYTES, 65536):
        with capture(redis.port, capture_bytes=capture_bytes) as collector:
            client = redis_py.Redis(host=HOST, port=redis.port)
            try:
                pipe = client.pipeline(transaction=False)
                for key in keys:
                    pipe.get(key)
                assert pipe.execute() == [value(i) for i in range(count)]
            finally:
                client.close()
            wait_quiet(collector, redis.port, 2 * count)
        for role in ("client", "server"):
            gets = [e for e in exchanges(collector, redis.port, role) if e.method == "GET" and tag in e.target]
            answered = [e for e in gets if e.status == "OK"]
            if os.environ.get("FIDELITY_DEBUG"):
                for e in gets:
                    print(role, e.target[-5:], e.status, e.response_bytes, reply_size.get(e.target), e.ts_mono_ns,
                          e.response_start_ns if hasattr(e, "response_start_ns") else "", e.attributes)
                print(collector.handler.stats)
            for e in answered:  # paired with its own reply: the reply's size is the key's
                if not e.attributes.get("truncated"):  # (a command cut short may show part of its key)
                    assert e.response_bytes == reply_size[e.target], e
            whole = [e.target for e in gets if not e.attributes.get("truncated")]
            assert len(set(whole)) == len(whole)  # each seen once
            results[(capture_bytes, role)] = (len(gets), len(answered))
    # Everything inside the copied prefixes is decoded: at 4 KiB at least the commands of the first
    # 4 KiB of each write; at 64 KiB all of them.
    per_prefix = DEFAULT_CAPTURE_BYTES // len(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(keys[0]), keys[0].encode()))
    for role in ("client", "server"):
        seen, answered = results[(DEFAULT_CAPTURE_BYTES, role)]
        assert min(count, per_prefix) <= answered <= seen <= count, (role, results)
        assert results[(65536, role)] == (count, count), (role, results)
    print(results)
