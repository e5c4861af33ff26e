"""Offline decoding: captures in, exchange events out; the `python -m deetune decode` CLI."""

from __future__ import annotations

import gzip
import io
import json
import re
import socket
import struct
import subprocess
import sys
from decimal import Decimal

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deetune.__main__ import main
from deetune.offline import CaptureError, DecodeStats, decode_file
from deetune.plugins import default_plugins

FLOWS = "deepflow/agent/resources/test/flow_generator"
T0 = 1_700_000_000  # capture epoch of the synthetic captures (s)
SYN, ACK, PSH, FIN, RST = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_PUSH, dpkt.tcp.TH_FIN, dpkt.tcp.TH_RST


def ns(us: int) -> int:
    """Capture time ``us`` µs after T0, in ns since the epoch."""
    return (T0 * 1_000_000 + us) * 1000


def decode(path, protocols=None) -> tuple[list[dict], DecodeStats]:
    registry = default_plugins().decoders
    decoders = [registry.get(p) for p in protocols] if protocols else None
    stats = DecodeStats()
    return [e.to_json() for e in decode_file(str(path), decoders, stats)], stats


# -- third-party vectors --------------------------------------------------------------------


def test_http_vector(vectors):
    out, stats = decode(vectors / FLOWS / "http/httpv1.pcap")
    assert [(e["method"], e["target"], e["status"], e["latency_ns"]) for e in out] == [
        ("POST", "/query?1590632942", 200, 84_051_000)
    ]
    assert out[0]["role"] == "client" and out[0]["rport"] == 80
    assert (stats.connections, stats.exchanges, stats.unknown, stats.undecodable) == (1, 1, 0, 0)


def test_redis_vector(vectors):
    out, stats = decode(vectors / FLOWS / "redis/redis.pcap")
    # DeepFlow prints each command as "COMMAND args…": the command name and, here, one key.
    expected = []
    for line in (vectors / FLOWS / "redis/redis.result").read_text().splitlines():
        match = re.match(r'RedisInfo \{ request: "([^"]*)", request_type: "([^"]*)"', line)
        assert match, line
        if match.group(2):
            expected.append((match.group(2), match.group(1).split(" ", 1)[1]))
    assert len(expected) == 10
    out.sort(key=lambda e: e["ts"])
    assert [(e["method"], e["target"]) for e in out] == expected
    assert all(e["status"] == "OK" and e["rport"] == 6379 for e in out)
    latencies = [e["latency_ns"] for e in out]
    # INDEX.md: DeepFlow's RRT for this capture is n=10, sum=592 µs, max=96 µs.
    assert (len(latencies), sum(latencies), max(latencies)) == (10, 592_000, 96_000)
    assert stats.connections == 4  # two more connections carry only keep-alive ACKs


def rrt(exchanges: list[dict]) -> tuple[int, int, int]:
    """DeepFlow's RRT statistics (count, sum, max in µs) over exchanges that got a response."""
    latencies = [e["latency_ns"] // 1000 for e in exchanges if e["latency_ns"] is not None]
    return len(latencies), sum(latencies), max(latencies)


def test_mysql_error_vector(vectors):
    out, _ = decode(vectors / FLOWS / "mysql/mysql-error.pcap")
    assert [(e["method"], e["target"], e["status"]) for e in out] == [
        ("LOGIN", "", "OK"),
        ("QUERY", "select @@version_comment limit 1", "OK"),
        ("QUERY", "SELECT DATABASE()", "OK"),
        ("INIT_DB", "abcd", "ERR"),
        ("QUIT", "", None),
    ]
    error = out[3]
    assert error["error"] is True and error["error_message"] == "Unknown database 'abcd'"
    # DeepFlow times the login too (66 µs here): n=4 counts it, QUIT gets no response.
    assert rrt(out) == (4, 292, 146)
    assert rrt([e for e in out if e["method"] != "LOGIN"]) == (3, 226, 146)


def test_mysql_171_vector(vectors):
    out, stats = decode(vectors / FLOWS / "mysql/171-mysql.pcap")
    assert rrt([e for e in out if e["method"] != "LOGIN"]) == (390, 127_090, 5_355)
    assert (stats.connections, stats.exchanges, stats.unknown, stats.undecodable) == (6, 390, 0, 0)


# -- synthetic captures ---------------------------------------------------------------------


class Tcp:
    """Frames of one TCP connection, sequence and ack numbers kept as a real stack would."""

    def __init__(self, client, server, client_isn=1000, server_isn=500_000):
        self.client, self.server = client, server
        self.next = {True: client_isn, False: server_isn}  # next sequence number, by "from client"

    def packet(self, from_client: bool, payload: bytes = b"", flags: int = ACK | PSH, seq: int | None = None,
               ack: int | None = None) -> bytes:
        """An IP packet; ``seq`` given: a resend or a reordering, the sender's state is kept."""
        src, dst = (self.client, self.server) if from_client else (self.server, self.client)
        own = self.next[from_client] if seq is None else seq
        if ack is None:
            ack = self.next[not from_client] if flags & ACK else 0
        tcp = dpkt.tcp.TCP(sport=src[1], dport=dst[1], seq=own & 0xFFFFFFFF, ack=ack & 0xFFFFFFFF,
                           flags=flags, win=65535, data=payload)
        if seq is None:
            self.next[from_client] = own + len(payload) + (1 if flags & (SYN | FIN) else 0)
        if ":" in src[0]:
            return bytes(dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, src[0]),
                                      dst=socket.inet_pton(socket.AF_INET6, dst[0]),
                                      nxt=6, hlim=64, plen=len(tcp), data=tcp))
        return bytes(dpkt.ip.IP(src=socket.inet_aton(src[0]), dst=socket.inet_aton(dst[0]), p=6, ttl=64, data=tcp))

    def handshake(self, us: int) -> list[tuple[int, bytes]]:
        return [(us, self.packet(True, flags=SYN)), (us + 100, self.packet(False, flags=SYN | ACK)),
                (us + 200, self.packet(True, flags=ACK))]

    def close(self, us: int) -> list[tuple[int, bytes]]:
        return [(us, self.packet(True, flags=FIN | ACK)), (us + 100, self.packet(False, flags=FIN | ACK)),
                (us + 200, self.packet(True, flags=ACK))]


def ethernet(ip: bytes) -> bytes:
    ethertype = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ethertype) + ip


def write_pcap(path, packets, linktype=dpkt.pcap.DLT_EN10MB, frame=ethernet, fmt="pcap"):
    """``packets``: (µs after T0, IP packet); written in list order, the order of the capture."""
    buf = io.BytesIO()
    writer = dpkt.pcapng.Writer(buf, linktype=linktype) if fmt == "pcapng" else dpkt.pcap.Writer(buf, linktype=linktype)
    for us, ip in packets:
        writer.writepkt(frame(ip), ts=T0 + us / 1e6)
    data = buf.getvalue()
    path.write_bytes(gzip.compress(data) if fmt == "gz" else data)
    return path


REQUEST_A = b"GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n"
RESPONSE_A = b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n" + b"0123456789" * 3
REQUEST_B = b"POST /api/v1/items HTTP/1.1\r\nHost: example.com\r\nContent-Length: 11\r\n\r\nhello world"
RESPONSE_B = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}"


def sample_packets() -> list[tuple[int, bytes]]:
    """Two interleaved HTTP connections (IPv4 and IPv6): retransmission, reordering, FIN."""
    a = Tcp(("10.0.0.1", 40000), ("10.0.0.2", 8080), client_isn=0xFFFFFFF0)  # wraps during the request
    b = Tcp(("2001:db8::1", 40001), ("2001:db8::2", 80))
    head = len(RESPONSE_A) - 30
    packets = a.handshake(0) + b.handshake(300)
    packets.append((1000, a.packet(True, REQUEST_A)))
    r1 = a.packet(False, RESPONSE_A[: head + 10])
    r2 = a.packet(False, RESPONSE_A[head + 10 : head + 20])
    r3 = a.packet(False, RESPONSE_A[head + 20 :])
    packets += [
        (5000, r1),
        (5500, r1),  # exact retransmission
        (6000, r3),  # out of order ...
        (7000, r2),  # ... then the segment before it
        (7500, a.packet(True, flags=ACK)),
        (8000, b.packet(True, REQUEST_B[:40])),
        (8100, b.packet(True, REQUEST_B[40:])),
        (9000, b.packet(False, RESPONSE_B)),
    ]
    packets += a.close(10_000) + b.close(11_000)
    return packets


EXPECTED = [
    {"type": "request", "protocol": "http", "method": "GET", "target": "/index.html", "status": 200,
     "error": False, "error_message": None, "ts": ns(1000), "latency_ns": 4_000_000, "duration_ns": 6_000_000,
     "request_bytes": len(REQUEST_A), "response_bytes": len(RESPONSE_A), "role": "client", "pid": 0, "comm": "",
     "laddr": "10.0.0.1", "lport": 40000, "raddr": "10.0.0.2", "rport": 8080},
    {"type": "request", "protocol": "http", "method": "POST", "target": "/api/v1/items", "status": 201,
     "error": False, "error_message": None, "ts": ns(8000), "latency_ns": 900_000, "duration_ns": 1_000_000,
     "request_bytes": len(REQUEST_B), "response_bytes": len(RESPONSE_B), "role": "client", "pid": 0, "comm": "",
     "laddr": "2001:db8::1", "lport": 40001, "raddr": "2001:db8::2", "rport": 80},
]


def subset(events: list[dict]) -> list[dict]:
    return [{k: e[k] for k in EXPECTED[0]} for e in events]


@pytest.mark.parametrize("fmt", ["pcap", "pcapng", "gz"])
def test_synthetic_capture(tmp_path, fmt):
    path = write_pcap(tmp_path / f"sample.{fmt}", sample_packets(), fmt=fmt)
    out, stats = decode(path)
    assert subset(out) == EXPECTED
    assert out[0]["attributes"]["host"] == "example.com" and "incomplete" not in out[0]["attributes"]
    assert (stats.packets, stats.tcp_packets, stats.connections, stats.exchanges) == (21, 21, 2, 2)
    assert (stats.retransmissions, stats.gaps, stats.malformed, stats.non_tcp, stats.read_error) == (1, 0, 0, 0, None)


def test_nanosecond_pcap(tmp_path):
    buf = io.BytesIO()
    writer = dpkt.pcap.Writer(buf, nano=True)
    for us, ip in sample_packets():
        writer.writepkt(ethernet(ip), ts=Decimal(ns(us) + 7) / 10**9)  # exact, 7 ns past the µs
    (tmp_path / "nano.pcap").write_bytes(buf.getvalue())
    expected = [dict(e, ts=e["ts"] + 7) for e in EXPECTED]
    assert subset(decode(tmp_path / "nano.pcap")[0]) == expected


def vlan(ip: bytes) -> bytes:
    frame = ethernet(ip)
    return frame[:12] + b"\x81\x00\x00\x2a" + frame[12:]


def qinq(ip: bytes) -> bytes:
    frame = ethernet(ip)
    return frame[:12] + b"\x88\xa8\x00\x07\x81\x00\x00\x2a" + frame[12:]


def sll(ip: bytes) -> bytes:
    return struct.pack("!HHH8sH", 0, 1, 6, b"\x02" * 6 + b"\0\0", 0x86DD if ip[0] >> 4 == 6 else 0x0800) + ip


def sll2(ip: bytes) -> bytes:
    return struct.pack("!HHIHBB8s", 0x86DD if ip[0] >> 4 == 6 else 0x0800, 0, 2, 1, 0, 6, b"\x02" * 6 + b"\0\0") + ip


def null(ip: bytes) -> bytes:
    return struct.pack("<I", 30 if ip[0] >> 4 == 6 else 2) + ip


def loop(ip: bytes) -> bytes:
    return struct.pack("!I", 30 if ip[0] >> 4 == 6 else 2) + ip


@pytest.mark.parametrize("linktype, frame", [
    (dpkt.pcap.DLT_EN10MB, vlan), (dpkt.pcap.DLT_EN10MB, qinq), (dpkt.pcap.DLT_RAW, lambda ip: ip),
    (dpkt.pcap.DLT_LINUX_SLL, sll), (276, sll2), (dpkt.pcap.DLT_NULL, null), (dpkt.pcap.DLT_LOOP, loop),
], ids=["vlan", "qinq", "raw", "sll", "sll2", "null", "loop"])  # fmt: skip
def test_link_types(tmp_path, linktype, frame):
    path = write_pcap(tmp_path / "link.pcap", sample_packets(), linktype=linktype, frame=frame)
    assert subset(decode(path)[0]) == EXPECTED


def keep_alive_packets(drop: str | None = None) -> tuple[list[tuple[int, bytes]], bytes]:
    """Two requests on one connection; the first response's 3000-byte body comes in three segments.
    ``drop``: the body segment ("middle", "last") or the server's FIN ("fin") the capture lost."""
    c = Tcp(("192.168.1.10", 51000), ("192.168.1.20", 80))
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n" + bytes(3000)
    head = len(response) - 3000
    packets = c.handshake(0)
    packets.append((1000, c.packet(True, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")))
    segments = [response[: head + 1000], response[head + 1000 : head + 2000], response[head + 2000 :]]
    for i, part in enumerate(segments):
        frame = c.packet(False, part)
        if not (drop == "middle" and i == 1 or drop == "last" and i == 2):
            packets.append((2000 + 100 * i, frame))
    # The client's next request acknowledges the whole body, the lost segment included.
    packets.append((3000, c.packet(True, b"GET /b HTTP/1.1\r\nHost: h\r\n\r\n")))
    packets.append((3500, c.packet(False, NOT_FOUND)))
    close = c.close(4000)
    if drop == "fin":
        del close[1]
    return packets + close, response


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


@pytest.mark.parametrize("drop, gap, response_end_us", [
    (None, 0, 2200), ("middle", 1000, 2200), ("last", 1000, 3000), ("fin", 0, 2200),
])  # fmt: skip
def test_missing_segment_in_body(tmp_path, drop, gap, response_end_us):
    """A lost segment the client acknowledged is a gap: the body is stepped over, decoding goes on.
    A lost last segment ends the body when the acknowledgement shows it (3000 µs)."""
    packets, response = keep_alive_packets(drop)
    out, stats = decode(write_pcap(tmp_path / "gap.pcap", packets))
    assert [(e["target"], e["status"], e["response_bytes"]) for e in out] == [
        ("/a", 200, len(response)), ("/b", 404, len(NOT_FOUND))
    ]
    assert out[0]["latency_ns"] == 1_000_000 and out[1]["latency_ns"] == 500_000
    assert out[0]["ts"] + out[0]["duration_ns"] == ns(response_end_us)
    assert (stats.gaps, stats.gap_bytes) == ((1, gap) if gap else (0, 0))
    assert (stats.unknown, stats.undecodable) == (0, 0)


def test_snap_length_cut_segment(tmp_path):
    """A segment the capture cut short (caplen < IP length) is a chunk with a gap at its end."""
    packets, response = keep_alive_packets()
    cut = [(us, ip[:120] if len(ip) > 1000 else ip) for us, ip in packets]
    out, stats = decode(write_pcap(tmp_path / "snap.pcap", cut))
    assert [(e["target"], e["status"], e["response_bytes"]) for e in out] == [
        ("/a", 200, len(response)), ("/b", 404, len(NOT_FOUND))
    ]
    assert stats.gaps == 0 and stats.malformed == 0


def test_overlapping_resend_and_port_reuse(tmp_path):
    """A resend that overlaps bytes already seen is trimmed; the same ports then carry a new connection."""
    expected, packets = [], []
    for n, us in ((1, 0), (2, 10_000)):
        c = Tcp(("10.0.0.1", 42000), ("10.0.0.2", 80), client_isn=n * 7_000_000)
        request = f"GET /{n} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
        start = c.next[True] + 1
        packets += c.handshake(us)
        packets.append((us + 1000, c.packet(True, request[:10], seq=start)))
        packets.append((us + 1100, c.packet(True, request[5:], seq=start + 5)))  # overlaps 5 bytes
        c.next[True] += len(request)
        packets.append((us + 2000, c.packet(False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")))
        packets += c.close(us + 3000)
        expected.append((f"/{n}", 200, len(request), ns(us + 1000), 900_000))
    out, stats = decode(write_pcap(tmp_path / "reuse.pcap", packets))
    assert [(e["target"], e["status"], e["request_bytes"], e["ts"], e["latency_ns"]) for e in out] == expected
    assert (stats.connections, stats.retransmissions) == (2, 0)


def test_data_on_syn(tmp_path):
    """TCP Fast Open: the request rides on the SYN."""
    c = Tcp(("10.0.0.1", 43000), ("10.0.0.2", 80))
    packets = [(0, c.packet(True, b"GET /fast HTTP/1.1\r\nHost: h\r\n\r\n", flags=SYN)),
               (100, c.packet(False, flags=SYN | ACK)),
               (200, c.packet(False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))]
    out, _ = decode(write_pcap(tmp_path / "tfo.pcap", packets))
    assert [(e["target"], e["status"], e["latency_ns"]) for e in out] == [("/fast", 200, 200_000)]


def test_no_syn_server_port_decides_the_client(tmp_path):
    """Capture starts mid-connection with a reply: the side on the Redis port is the server."""
    c = Tcp(("127.0.0.1", 45000), ("127.0.0.1", 6379))
    packets = [(0, c.packet(False, b"+OK\r\n")), (100, c.packet(True, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")),
               (250, c.packet(False, b"$1\r\nv\r\n"))]
    out, _ = decode(write_pcap(tmp_path / "mid.pcap", packets))
    assert [(e["method"], e["target"], e["lport"], e["rport"], e["latency_ns"]) for e in out] == [
        ("GET", "k", 45000, 6379, 150_000)
    ]


def test_no_syn_content_decides_the_client(tmp_path):
    """Neither port looks like a server's and the first data is a reply: content settles the roles."""
    c = Tcp(("10.1.1.1", 40000), ("10.1.1.2", 7000))
    packets = [(0, c.packet(False, b"+OK\r\n")), (100, c.packet(True, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")),
               (300, c.packet(False, b"$-1\r\n"))]
    out, _ = decode(write_pcap(tmp_path / "mid.pcap", packets))
    assert [(e["method"], e["laddr"], e["lport"], e["rport"], e["role"], e["latency_ns"]) for e in out] == [
        ("GET", "10.1.1.1", 40000, 7000, "client", 200_000)
    ]


def test_reset_and_counters(tmp_path):
    c = Tcp(("10.0.0.1", 41000), ("10.0.0.2", 80))
    other = Tcp(("10.0.0.1", 41001), ("10.0.0.2", 22))
    udp = bytes(dpkt.ip.IP(src=b"\x0a\0\0\x01", dst=b"\x0a\0\0\x02", p=17, data=dpkt.udp.UDP(sport=1, dport=53)))
    packets = c.handshake(0) + [
        (1000, c.packet(True, b"GET /r HTTP/1.1\r\nHost: h\r\n\r\n")),
        (2000, c.packet(False, flags=RST | ACK)),
        (2100, c.packet(True, b"late")),  # after the reset: ignored
        (3000, udp),
        (3100, b"\x45\x00\x00"),  # cut IP header
        (3200, other.packet(True, b"SSH-2.0-OpenSSH_9.6\r\n")),
    ]
    out, stats = decode(write_pcap(tmp_path / "rst.pcap", packets))
    # The request got no response before the reset: reported without one.
    assert [(e["target"], e["status"], e["latency_ns"]) for e in out] == [("/r", None, None)]
    assert (stats.packets, stats.tcp_packets, stats.non_tcp, stats.malformed) == (9, 7, 1, 1)
    assert (stats.connections, stats.exchanges, stats.unknown, stats.undecodable) == (2, 1, 1, 0)


def test_protocol_filter(tmp_path):
    path = write_pcap(tmp_path / "sample.pcap", sample_packets())
    out, stats = decode(path, ["redis"])
    assert out == [] and stats.unknown == 2


# -- command line ---------------------------------------------------------------------------

FIELDS = {"type", "protocol", "method", "target", "status", "error", "latency_ns", "request_bytes",
          "response_bytes", "ts", "role", "laddr", "lport", "raddr", "rport"}  # fmt: skip


def test_cli_decode_to_stdout(tmp_path, capsys):
    path = write_pcap(tmp_path / "sample.pcap", sample_packets())
    assert main(["decode", str(path)]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and all(FIELDS <= json.loads(line).keys() for line in lines)
    assert {json.loads(line)["type"] for line in lines} == {"request"}
    assert json.loads(lines[0])["target"] == "/index.html"
    assert lines[0] == json.dumps(json.loads(lines[0]), separators=(",", ":"))  # compact, as the jsonl sink
    assert err == ("deetune: 2 exchanges from 2 connections (0 unknown, 0 undecodable), 21 packets\n"
                   "deetune:   http: 2 exchanges on 2 connections\n")


def test_cli_output_file_and_protocol(tmp_path, capsys):
    path = write_pcap(tmp_path / "sample.pcap", sample_packets())
    output = tmp_path / "out.jsonl"
    output.write_text("stale\n")
    assert main(["decode", str(path), "--protocol", "http", "--output", str(output)]) == 0
    assert [json.loads(line)["method"] for line in output.read_text().splitlines()] == ["GET", "POST"]
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[0].endswith("21 packets")


def test_cli_several_files(tmp_path, capsys):
    path = write_pcap(tmp_path / "sample.pcap", sample_packets())
    assert main(["decode", str(path), str(path), "-o", "-"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 4
    assert err.splitlines()[-2:] == ["deetune: 4 exchanges from 4 connections (0 unknown, 0 undecodable), 42 packets",
                                     "deetune:   http: 4 exchanges on 4 connections"]


@pytest.mark.parametrize("name, content, message", [
    ("missing.pcap", None, "No such file or directory"),
    ("notes.txt", b"just some text\n", "not a pcap or pcapng capture"),
    ("empty.pcap", b"", "not a pcap or pcapng capture"),
    ("short.pcap", b"\xd4\xc3\xb2\xa1\x02\x00", "not a valid capture"),
    ("broken.gz", b"\x1f\x8b\x08\x00garbage", "not a valid capture"),
])  # fmt: skip
def test_cli_bad_input(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    output = tmp_path / "out.jsonl"
    assert main(["decode", str(path), "-o", str(output)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and not output.exists()
    assert err.startswith(f"deetune: {path}: {message}") and err.count("\n") == 1


def test_cli_unknown_protocol(tmp_path, capsys):
    path = write_pcap(tmp_path / "sample.pcap", sample_packets())
    assert main(["decode", str(path), "--protocol", "gopher"]) == 2
    err = capsys.readouterr().err
    assert err == "deetune: unknown decoder 'gopher'; available: " + ", ".join(default_plugins().decoders.names()) + "\n"


def test_cli_subprocess_help_and_error(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "deetune", *args], capture_output=True, text=True, check=False)

    help_ = run("--help")
    assert help_.returncode == 0 and "decode" in help_.stdout
    missing = run("decode", str(tmp_path / "nope.pcap"))
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr == f"deetune: {tmp_path / 'nope.pcap'}: No such file or directory\n"
    assert run().returncode == 2


def test_cli_truncated_capture_warns(tmp_path, capsys):
    path = write_pcap(tmp_path / "sample.pcap", sample_packets())
    last = len(ethernet(sample_packets()[-1][1]))
    path.write_bytes(path.read_bytes()[: -(last + 10)])  # tcpdump killed mid-write: 6 header bytes left
    assert main(["decode", str(path)]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2  # the connections close at the end of what was read
    assert err.splitlines()[0] == (f"deetune: {path}: capture damaged: the file ends inside a packet "
                                   "(its captured part is decoded)")


# -- robustness -----------------------------------------------------------------------------

PCAP_HEADER = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
PCAPNG_HEADER = bytes.fromhex("0a0d0d0a1c0000004d3c2b1a01000000ffffffffffffffff1c000000")


def read_all(path) -> DecodeStats:
    """Decode, allowing only a one-line CaptureError."""
    stats = DecodeStats()
    try:
        for _ in decode_file(str(path), None, stats):
            pass
    except CaptureError as exc:
        assert "\n" not in str(exc) and str(exc)
    return stats


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=st.sampled_from([b"", PCAP_HEADER, PCAPNG_HEADER, b"\x1f\x8b"]), body=st.binary(max_size=600))
def test_random_bytes_never_crash(tmp_path, prefix, body):
    path = tmp_path / "random.pcap"
    path.write_bytes(prefix + body)
    read_all(path)
    path.write_bytes(gzip.compress(prefix + body))
    read_all(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.binary(max_size=120), max_size=20),
       linktype=st.sampled_from([1, 101, 113, 276, 0, 108, 147]))  # fmt: skip
def test_random_frames_are_counted(tmp_path, frames, linktype):
    path = tmp_path / "frames.pcap"
    write_pcap(path, [(i, f) for i, f in enumerate(frames)], linktype=linktype, frame=lambda f: f)
    stats = read_all(path)
    assert stats.packets == len(frames)
    assert stats.packets == stats.tcp_packets + stats.non_tcp + stats.malformed + stats.fragments


PAYLOADS = [b"GET / HTTP/1.1\r\n", b"Host: h\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hello",
            b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n", b"\x00" * 10, b""]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                          st.integers(0, 0x3F), st.sampled_from(PAYLOADS)), max_size=25))  # fmt: skip
def test_random_segments_never_crash(tmp_path, segments):
    """Arbitrary sequence/ack numbers and flags on one connection: reassembly never raises."""
    c = Tcp(("10.0.0.1", 40000), ("10.0.0.2", 80))
    packets = [(i, c.packet(fc, data, flags=flags, seq=seq, ack=ack))
               for i, (fc, seq, ack, flags, data) in enumerate(segments)]  # fmt: skip
    stats = read_all(write_pcap(tmp_path / "segments.pcap", packets))
    assert stats.tcp_packets == len(segments)


# -- damaged captures: nothing lost without a word ----------------------------------------------


def http_keep_alive(count: int) -> list[tuple[int, bytes]]:
    """One HTTP keep-alive connection with ``count`` exchanges, a packet per message."""
    c = Tcp(("10.0.0.1", 40000), ("10.0.0.2", 80))
    packets = c.handshake(0)
    for i in range(count):
        packets.append((1000 + 20 * i, c.packet(True, b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % i)))
        packets.append((1010 + 20 * i, c.packet(False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")))
    return packets


def record_offsets(data: bytes) -> list[int]:
    """Where each record header of a little-endian pcap starts."""
    offsets, pos = [], 24
    while pos + 16 <= len(data):
        offsets.append(pos)
        pos += 16 + struct.unpack_from("<I", data, pos + 8)[0]
    return offsets


@pytest.mark.parametrize("fmt", ["pcap", "gz"])
def test_a_record_header_with_a_huge_length_costs_that_record_only(tmp_path, capsys, fmt):
    """A record header claiming 3 GB swallowed 49 of 50 packets, exit 0, no warning."""
    path = write_pcap(tmp_path / "damaged.pcap", http_keep_alive(25))
    data = bytearray(path.read_bytes())
    offsets = record_offsets(bytes(data))
    damaged = offsets[5]  # the third request's record (after the handshake's 3 and a request and response)
    struct.pack_into("<I", data, damaged + 8, 3_000_000_000)
    path.write_bytes(gzip.compress(bytes(data)) if fmt == "gz" else bytes(data))
    assert main(["decode", str(path)]) == 0
    out, err = capsys.readouterr()
    targets = [json.loads(line)["target"] for line in out.splitlines()]
    assert targets == ["/0"] + [f"/{i}" for i in range(2, 25)]  # /1's request is the record lost
    assert err.splitlines()[0] == (f"deetune: {path}: capture damaged: 1 damaged record skipped "
                                   f"({offsets[6] - offsets[5]} bytes)")
    assert "capture damage: 1 damaged records skipped" in err


def test_a_file_cut_inside_a_packet_decodes_what_it_has(tmp_path):
    path = write_pcap(tmp_path / "cut.pcap", http_keep_alive(3))
    data = path.read_bytes()
    offsets = record_offsets(data)
    path.write_bytes(data[: offsets[-1] + 16 + 54 + 38])  # the last response: its headers but not its body
    stats = DecodeStats()
    got = list(decode_file(str(path), None, stats))
    # The body's last 2 bytes were never written: its length says where it ends, the exchange is whole.
    assert [(e.target, e.status, e.response_bytes) for e in got] == [("/0", 200, 40), ("/1", 200, 40), ("/2", 200, 40)]
    assert (stats.cut_captures, stats.damaged_records, stats.read_error) == (1, 0, None)


def test_a_damaged_pcapng_block_is_skipped(tmp_path):
    path = write_pcap(tmp_path / "damaged.pcapng", http_keep_alive(10), fmt="pcapng")
    data = bytearray(path.read_bytes())
    # Find the enhanced packet blocks (type 6) and break the length of the fifth.
    blocks, pos = [], 0
    while pos + 8 <= len(data):
        kind, length = struct.unpack_from("<II", data, pos)
        if kind == 6:
            blocks.append(pos)
        pos += length
    struct.pack_into("<I", data, blocks[5] + 4, 0x7FFFFFF0)  # the second request's
    path.write_bytes(bytes(data))
    stats = DecodeStats()
    got = list(decode_file(str(path), None, stats))
    assert [e.target for e in got] == ["/0"] + [f"/{i}" for i in range(2, 10)]
    assert stats.damaged_records == 1 and stats.read_error is None


def test_decode_summary_lists_what_each_protocol_skipped(tmp_path, capsys):
    c = Tcp(("10.0.0.1", 40000), ("10.0.0.2", 80))
    packets = c.handshake(0) + [
        (1000, c.packet(True, b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")),
        (1010, c.packet(False, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")),
        (1020, c.packet(False, b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")),  # unsolicited
    ]
    path = write_pcap(tmp_path / "extra.pcap", packets)
    assert main(["decode", str(path)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[1:] == ["deetune:   http: 1 exchanges on 1 connections; 1 unsolicited response"]


def test_decode_shows_progress_on_a_terminal(tmp_path):
    """On a terminal, a progress bar per file (rich) while decoding; then the summary."""
    import os
    import pty

    path = write_pcap(tmp_path / "big.pcap", http_keep_alive(2000))
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "deetune", "decode", str(path), "-o", str(tmp_path / "out.jsonl")],
                            stderr=slave, stdout=subprocess.DEVNULL)
    os.close(slave)
    screen = b""
    while True:
        try:
            block = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not block:
            break
        screen += block
    assert proc.wait(60) == 0
    os.close(master)
    text = screen.decode(errors="replace")
    assert "big.pcap" in text and "exchanges" in text  # the progress line
    assert "deetune: 2000 exchanges from 1 connections" in text
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2000


def test_decode_mysql_affected_rows_adding_past_two_to_the_64th(tmp_path, capsys):
    """Two OK packets of one multi-statement query whose affected rows add past 2^64: a traceback."""
    def packet(seq, payload):
        return struct.pack("<I", len(payload) | seq << 24) + payload

    huge = b"\xfe" + struct.pack("<Q", (1 << 64) - 1)
    c = Tcp(("10.0.0.1", 40000), ("10.0.0.2", 3306))
    query = packet(0, b"\x03UPDATE a SET x=1; UPDATE b SET x=1")
    oks = packet(1, b"\x00" + huge + b"\x00" + struct.pack("<HH", 0x000A, 0)) + packet(
        2, b"\x00" + huge + b"\x00" + struct.pack("<HH", 0x0002, 0))
    path = write_pcap(tmp_path / "mysql.pcap", c.handshake(0) + [(1000, c.packet(True, query)),
                                                                 (1100, c.packet(False, oks))])
    assert main(["decode", str(path)]) == 0
    out, err = capsys.readouterr()
    (line,) = out.splitlines()
    exchange = json.loads(line)
    assert exchange["attributes"]["affected_rows"] == (1 << 64) - 1
    assert exchange["attributes"]["anomalies"] == ["affected_rows_overflow"]
    assert "Traceback" not in err
