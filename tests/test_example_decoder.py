"""The example plugin's decoder (examples/deetune-signals: beanstalk), tested the way
docs/plugins.md section 9 tells a newcomer to test theirs: chunks by hand, a real beanstalkd
through deetune.testing's recording proxy (no privileges), through the live agent (root and
BPF), and a loopback capture decoded offline, by the Python API and by `python -m deetune decode`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deetune.decoders import Chunk, Direction, Undecodable
from deetune.testing import (
    RecordingProxy,
    ServerProcess,
    agent,
    assert_exchanges,
    capture_pcap,
    decode_chunks,
    decode_pcap,
)
from tests.servers import need_module, require_binary

beanstalk = pytest.importorskip("deetune_signals.beanstalk", reason="the example plugin: `make examples`")
BeanstalkDecoder = beanstalk.BeanstalkDecoder

def expected(job: int) -> list[dict]:
    """What greenstalk sends for drive() below, and beanstalkd answers (job: the id it gave)."""
    return [{**row, "target": str(job)} if row["method"] == "delete" else row for row in EXPECTED]


EXPECTED = [
    {"method": "use", "target": "emails", "status": "OK", "error": False},
    {"method": "watch", "target": "emails", "status": "OK", "error": False},
    {"method": "ignore", "target": "default", "status": "OK", "error": False},
    {"method": "put", "target": "emails", "status": "OK", "error": False},
    {"method": "reserve-with-timeout", "target": "", "status": "OK", "error": False},
    {"method": "delete", "target": "", "status": "OK", "error": False},
    {"method": "delete", "target": "", "status": "OK", "error": False},  # NOT_FOUND is an answer
]


@pytest.fixture(scope="module")
def beanstalkd(tmp_path_factory):
    binary = require_binary("beanstalkd", "beanstalkd")
    log = tmp_path_factory.mktemp("beanstalkd") / "beanstalkd.log"
    server = ServerProcess.start([binary, "-l", "127.0.0.1", "-p", "{port}"], log=str(log))
    yield server
    server.stop()


def drive(port: int) -> int:
    """The traffic: greenstalk, a well-kept client, on one connection."""
    greenstalk = need_module("greenstalk", "greenstalk")
    with greenstalk.Client(("127.0.0.1", port), use="emails", watch="emails") as client:
        job_id = client.put("hello " * 50)
        job = client.reserve(timeout=5)
        assert (job.id, job.body) == (job_id, "hello " * 50)
        client.delete(job)
        with pytest.raises(greenstalk.NotFoundError):
            client.delete(job)
    return job_id


def test_chunks_by_hand():
    chunks = [
        Chunk(Direction.REQUEST, b"put 0 0 60 5\r\nhello\r\n", 21, 1),
        Chunk(Direction.RESPONSE, b"INSERTED 7\r\n", 12, 2),
        Chunk(Direction.REQUEST, b"reserve\r\n", 9, 3),
        Chunk(Direction.RESPONSE, b"RESERVED 7 5\r\nhel", 21, 4),  # a capture gap: "lo\r\n" not copied
        Chunk(Direction.REQUEST, b"delete 8\r\n", 10, 5),
        Chunk(Direction.RESPONSE, b"NOT_FOUND\r\n", 11, 6),
        Chunk(Direction.REQUEST, b"frobnicate\r\n", 12, 7),
    ]
    with pytest.raises(Undecodable, match="not a command"):
        decode_chunks(BeanstalkDecoder, chunks)
    got = decode_chunks(BeanstalkDecoder, chunks[:-1])
    assert_exchanges(got, [
        {"method": "put", "target": "default", "status": "OK", "response_bytes": 12, "latency_ns": 1},
        {"method": "reserve", "target": "", "status": "OK", "response_bytes": 21, "latency_ns": 1},
        {"method": "delete", "target": "8", "status": "OK", "response_bytes": 11, "latency_ns": 1},
    ])
    assert [x.attributes for x in got] == [{"result": "INSERTED", "job": 7}, {"result": "RESERVED", "job": 7,
                                           "body_bytes": 5}, {"result": "NOT_FOUND"}]


def test_against_a_real_server(beanstalkd):
    with RecordingProxy(beanstalkd.port) as proxy:
        job = drive(proxy.port)
    [connection] = proxy.connections()
    assert_exchanges(decode_chunks(BeanstalkDecoder, connection), expected(job))


@pytest.mark.bpf
def test_through_the_agent(beanstalkd):
    with agent([beanstalkd.port], decoders=[BeanstalkDecoder]) as run:
        job = drive(beanstalkd.port)
        run.wait(len(EXPECTED), role="server")
    assert_exchanges(run.exchanges(role="client"), expected(job))
    assert_exchanges(run.exchanges(role="server"), expected(job))
    assert {x.comm for x in run.exchanges(role="server")} == {"beanstalkd"}


@pytest.mark.bpf
def test_a_capture(beanstalkd, tmp_path):
    pcap = tmp_path / "beanstalk.pcap"
    with capture_pcap(str(pcap), [beanstalkd.port]):
        job = drive(beanstalkd.port)
    assert_exchanges(decode_pcap(str(pcap), [BeanstalkDecoder]), expected(job))
    out = subprocess.run([sys.executable, "-m", "deetune", "decode", str(pcap), "--protocol", "beanstalk"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().startswith(f"deetune: {len(EXPECTED)} exchanges from 1 connections")
    assert len(out.stdout.splitlines()) == len(EXPECTED)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=80), st.sampled_from([0, 0, 3, 500])), max_size=10))
def test_random_bytes_raise_only_undecodable(pieces):
    decoder = BeanstalkDecoder()
    for ts, (request, data, gap) in enumerate(pieces):
        direction = Direction.REQUEST if request else Direction.RESPONSE
        BeanstalkDecoder.detect(direction, data)
        try:
            decoder.feed(Chunk(direction, data, len(data) + gap, ts))
        except Undecodable:
            return
    decoder.close(len(pieces))
