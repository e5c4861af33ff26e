"""TLS plaintext, HTTP/2 and gRPC end to end: real servers and clients, the tls probe (uprobes),
the payload probe, the L7 handler.

Servers: nginx with TLS (HTTP/1.1 and HTTP/2 by ALPN) and h2c, Python's ssl server, a Go HTTPS
server, a grpcio server, nghttpd (h2c upgrade).  Clients: curl, Python's http.client over ssl, a
Go client, a C client with OpenSSL linked in, grpcio, python-hyper's h2 over a socket.  Programs
started after the probe (Go, the static client, a process with its own libssl) wait for a line on
stdin: the test sends it once the probe has attached to their file, found at their exec.

Every test filters the probes by its server's port and counts exactly.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time

import pytest

from deetune.decoders.http import HttpDecoder
from deetune.decoders.http2 import Http2Decoder
from deetune.events import DataEvent, ExchangeEvent, RequestCounts
from deetune.l7 import L7Handler, ListeningPorts
from deetune.probes import ProbeOptions
from deetune.probes.payload import PayloadProbe
from deetune.probes.tcp import TcpProbe
from deetune.probes.tls import TlsProbe
from deetune.probes import tls_targets
from deetune.probes.tls_targets import file_key
from tests.harness import running_pipeline
from tests.servers import HOST, need_module, nginx_server, require_binary, stop_process  # noqa: F401
from tests.tls_servers import (  # noqa: F401  (fixtures)
    STATIC,
    Peer,
    certificate,
    copy_libssl,
    go_programs,
    nginx_tls,
    python_program,
    static_openssl_client,
)

pytestmark = [pytest.mark.bpf, pytest.mark.servers]

DECODERS = [HttpDecoder, Http2Decoder]
SETTLE = 0.5
WAIT = 30.0


@contextlib.contextmanager
def capture(port: int, *, tls: bool = True, emit_data: bool = False):
    """A pipeline decoding the connections on ``port``: the tls probe (plaintext) and the payload
    probe (cleartext, and the ciphertext of TLS connections until the handler mutes it).  No
    overload sampling: the counts are exact on a busy host too."""
    payload = PayloadProbe(ProbeOptions(), ports=[port], exclude_self=False, overload_sampling=False)
    probes = [TcpProbe(ProbeOptions(port=port), overload_sampling=False), payload]
    tls_probe = None
    if tls:
        tls_probe = TlsProbe(ProbeOptions(port=port), exclude_self=False, overload_sampling=False)
        probes.append(tls_probe)
    handler = L7Handler(DECODERS, mute=payload.mute, emit_data=emit_data,
                        listening=ListeningPorts(reader=lambda: {port}))
    with running_pipeline(probes, handlers=[handler]) as collector:
        collector.tls = tls_probe
        collector.payload = payload
        collector.handler = handler
        yield collector
        time.sleep(SETTLE)


def exchanges(collector, port: int) -> list[ExchangeEvent]:
    return collector.matching(lambda e: isinstance(e, ExchangeEvent) and port in (e.lport, e.rport))


def wait_exchanges(collector, port: int, count: int) -> None:
    collector.wait_for(lambda e: isinstance(e, ExchangeEvent) and port in (e.lport, e.rport), count, timeout=WAIT)


def summary(events: list[ExchangeEvent], role: str) -> list[tuple]:
    return sorted((e.protocol, e.method, e.target, e.status) for e in events if e.role == role)


def wait_attached(probe: TlsProbe, path: str, timeout: float = WAIT) -> None:
    key = file_key(path)
    deadline = time.monotonic() + timeout
    while key not in probe.attached:
        assert time.monotonic() < deadline, f"the tls probe did not attach to {path}: {probe.unprobed}"
        time.sleep(0.02)


def run(args: list[str]) -> tuple[int, str]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}): {err.strip()}"
    return proc.pid, out


# -- OpenSSL: nginx, curl, Python ------------------------------------------------------------------


def test_nginx_tls_and_curl_http1(nginx_tls):
    port = nginx_tls.tls_port
    curl = require_binary("curl", "curl")
    with capture(port) as c:
        pid, out = run([curl, "-sk", "--http1.1", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
                        "-w", "%{http_code}\n", f"https://{HOST}:{port}/static.bin", f"https://{HOST}:{port}/missing",
                        f"https://{HOST}:{port}/broken"])
        assert out.split() == ["200", "404", "503"]
        wait_exchanges(c, port, 6)
    got = exchanges(c, port)
    expected = [("http", "GET", "/broken", 503), ("http", "GET", "/missing", 404), ("http", "GET", "/static.bin", 200)]
    assert summary(got, "client") == expected and summary(got, "server") == expected
    assert {e.pid for e in got if e.role == "client"} == {pid}
    assert {e.pid for e in got if e.role == "server"} == {nginx_tls.pid}
    assert all(e.attributes["tls"] is True for e in got)
    static = [e for e in got if e.target == "/static.bin"]
    assert {e.attributes["response_body_bytes"] for e in static} == {len(STATIC)}
    # One connection: the same socket cookie on each side, and the ciphertext was decoded by nobody.
    assert len({e.conn_id for e in got if e.role == "client"}) == 1
    assert len(got) == 6


def test_nginx_tls_and_curl_http2(nginx_tls):
    port = nginx_tls.tls_port
    curl = require_binary("curl", "curl")
    with capture(port) as c:
        _, out = run([curl, "-sk", "--http2", "-o", "/dev/null", "-o", "/dev/null", "-w", "%{http_version} %{http_code}\n",
                      f"https://{HOST}:{port}/static.bin", f"https://{HOST}:{port}/missing"])
        assert out.split() == ["2", "200", "2", "404"]
        wait_exchanges(c, port, 4)
    got = exchanges(c, port)
    expected = [("http2", "GET", "/missing", 404), ("http2", "GET", "/static.bin", 200)]
    assert summary(got, "client") == expected and summary(got, "server") == expected
    assert sorted(e.attributes["stream_id"] for e in got) == [1, 1, 3, 3]
    assert {e.attributes["host"] for e in got} == {f"{HOST}:{port}"}
    assert all(e.attributes["tls"] and "headers_unknown" not in e.attributes for e in got)
    assert {e.attributes["response_body_bytes"] for e in got if e.target == "/static.bin"} == {len(STATIC)}


def test_python_ssl_server_and_client(certificate):
    server = python_program("py_server.py", *map(str, certificate), server=True)
    try:
        with capture(server.port) as c:
            client = python_program("py_client.py", str(server.port), "/one", "/status/404", "/two")
            assert client.go() == ["200", "404", "200"]
            wait_exchanges(c, server.port, 6)
    finally:
        server.stop()
    got = exchanges(c, server.port)
    expected = [("http", "GET", "/one", 200), ("http", "GET", "/status/404", 404), ("http", "GET", "/two", 200)]
    assert summary(got, "client") == expected and summary(got, "server") == expected
    assert {e.pid for e in got} == {client.pid, server.pid}
    data = c.matching(lambda e: isinstance(e, DataEvent))
    assert data == []  # raw data events only with emit_data
    # Counted in the kernel from the plaintext (the tls probe's accounting), once per side; the
    # ciphertext (the payload probe's) is counted as nothing.
    counts: dict[tuple, int] = {}
    for e in c.matching(lambda e: isinstance(e, RequestCounts) and e.port == server.port):
        key = (e.role, e.protocol, e.method, e.status, e.outcome)
        counts[key] = counts.get(key, 0) + e.count
    assert counts == {("client", "http", "GET", 200, "ok"): 2, ("client", "http", "GET", 404, "ok"): 1,
                      ("server", "http", "GET", 200, "ok"): 2, ("server", "http", "GET", 404, "ok"): 1}


def test_a_libssl_of_its_own_is_found_in_the_process_mappings(certificate, tmp_path):
    """A process loading another libssl file than the host's: found from /proc/PID/maps, at the
    probe's start for one already running, and after its exec for one started later."""
    library = copy_libssl(tmp_path / "lib")
    env = dict(os.environ, LD_LIBRARY_PATH=str(library.parent))
    server = python_program("py_server.py", *map(str, certificate), server=True, env=env)
    try:
        with capture(server.port) as c:
            assert file_key(str(library)) in c.tls.attached  # mapped by the server, running before
            client = python_program("py_client.py", str(server.port), "/own-libssl", env=env)
            wait_attached(c.tls, str(library))
            assert client.go() == ["200"]
            wait_exchanges(c, server.port, 2)
    finally:
        server.stop()
    got = exchanges(c, server.port)
    assert summary(got, "client") == summary(got, "server") == [("http", "GET", "/own-libssl", 200)]


def test_openssl_linked_into_a_binary(certificate, tmp_path):
    binary = static_openssl_client(tmp_path)
    server = python_program("py_server.py", *map(str, certificate), server=True)
    try:
        with capture(server.port) as c:
            client = Peer([str(binary), str(server.port), "/static/a", "/status/503"], server=False)
            wait_attached(c.tls, str(binary))  # found at its exec
            assert client.go() == ["200", "503"]
            wait_exchanges(c, server.port, 4)
    finally:
        server.stop()
    got = exchanges(c, server.port)
    expected = [("http", "GET", "/static/a", 200), ("http", "GET", "/status/503", 503)]
    assert summary(got, "client") == expected and summary(got, "server") == expected
    assert {e.pid for e in got if e.role == "client"} == {client.pid}
    target, _ = c.tls.attached[file_key(str(binary))]
    assert target.functions == ("SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex", "SSL_do_handshake")
    assert [p.name for p in target.openssl] == ["ssl_read_internal", "ssl_write_internal", "SSL_do_handshake"]


# -- where the probes are set ------------------------------------------------------------------------

SYSTEM_LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"


def code_at(pid: int, path: str, offset: int, size: int = 1) -> bytes:
    """The bytes process ``pid`` runs at file offset ``offset`` of ``path`` (0xcc: a uprobe's
    breakpoint)."""
    key = file_key(path)
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or file_key(f"/proc/{pid}/root{fields[5]}") != key:
                continue
            low, high = (int(x, 16) for x in fields[0].split("-"))
            start = int(fields[2], 16)
            if start <= offset < start + high - low:
                with open(f"/proc/{pid}/mem", "rb") as mem:
                    mem.seek(low + offset - start)
                    return mem.read(size)
    raise AssertionError(f"{path} offset {offset:#x} is not mapped by {pid}")


def test_openssl_calls_are_probed_where_the_kernel_emulates_the_instruction():
    """Debian's libssl: SSL_read, SSL_read_ex, SSL_write and SSL_write_ex start with ``sub $N,%rsp``,
    which a uprobe would single-step (a debug exception, a VM exit under KVM), and call
    ssl_read_internal or ssl_write_internal, which start with a push (emulated): those are probed,
    once for both forms; SSL_do_handshake at its entry, a push too."""
    target = tls_targets.inspect(SYSTEM_LIBSSL)
    assert [(p.name, p.emulated) for p in target.openssl] == [
        ("ssl_read_internal", True), ("ssl_write_internal", True), ("SSL_do_handshake", True)]
    with open(SYSTEM_LIBSSL, "rb") as f:
        code = f.read()
    for point in target.openssl:  # push %rbx … push %rdi, push %r8 … push %r15
        first = code[point.offset + 1] if code[point.offset] == 0x41 else code[point.offset]
        assert 0x50 <= first <= 0x57, point
    with open(SYSTEM_LIBSSL, "rb") as f:
        elf = tls_targets.ELFFile(f)
        wrappers = tls_targets._symbols(elf, set(tls_targets.OPENSSL_DATA))
        for name, (value, _size) in wrappers.items():
            assert code[tls_targets._file_offset(elf, value):][:3] == b"\x48\x83\xec", name  # sub $N,%rsp


def test_with_a_pid_the_breakpoints_are_in_that_process_only(certificate):
    """--pid: the uprobes are set for that process only; its client, mapping the same libssl,
    runs the library unmodified and takes no trap."""
    server = python_program("py_server.py", *map(str, certificate), server=True)
    try:
        client = python_program("py_client.py", str(server.port), "/pid/only")
        target = tls_targets.inspect(SYSTEM_LIBSSL)
        deadline = time.monotonic() + WAIT
        while not any(SYSTEM_LIBSSL in p for p in tls_targets.libssl_in_maps(client.pid)):  # Python starting
            assert time.monotonic() < deadline, "the client did not load libssl"
            time.sleep(0.05)
        original = {p.offset: code_at(client.pid, SYSTEM_LIBSSL, p.offset) for p in target.openssl}
        assert b"\xcc" not in original.values()
        probe = TlsProbe(ProbeOptions(pid=server.pid, port=server.port), exclude_self=False, overload_sampling=False)
        with running_pipeline([probe]) as c:
            assert {p.offset: code_at(server.pid, SYSTEM_LIBSSL, p.offset) for p in target.openssl} == {
                p.offset: b"\xcc" for p in target.openssl}
            assert {p.offset: code_at(client.pid, SYSTEM_LIBSSL, p.offset) for p in target.openssl} == original
            assert client.go() == ["200"]
            c.wait_for(lambda e: isinstance(e, DataEvent) and e.tls, 2, timeout=WAIT)
            time.sleep(SETTLE)
        assert {p.offset: code_at(server.pid, SYSTEM_LIBSSL, p.offset) for p in target.openssl} == original
    finally:
        server.stop()
    data = c.matching(lambda e: isinstance(e, DataEvent) and e.tls)
    assert {(e.pid, e.direction, e.syscall) for e in data} == {(server.pid, "ingress", "SSL_read"),
                                                               (server.pid, "egress", "SSL_write")}
    assert b"".join(e.data for e in data if e.direction == "ingress").startswith(b"GET /pid/only HTTP/1.1\r\n")


# -- Go ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["h2", "h1"])
def test_go_server_and_client(go_programs, certificate, proto):
    server_binary, client_binary, _ = go_programs
    server = Peer([str(server_binary), *map(str, certificate)], server=True)
    try:
        with capture(server.port) as c:
            wait_attached(c.tls, str(server_binary))  # running before: found at the probe's start
            base = f"https://{HOST}:{server.port}"
            client = Peer([str(client_binary), proto, f"{base}/go/first", f"{base}/status/404", f"{base}/go/last"],
                          server=False)
            wait_attached(c.tls, str(client_binary))
            version = "HTTP/2.0" if proto == "h2" else "HTTP/1.1"
            assert client.go() == [version, "200", version, "404", version, "200"]
            wait_exchanges(c, server.port, 6)
    finally:
        server.stop()
    got = exchanges(c, server.port)
    protocol = "http2" if proto == "h2" else "http"
    expected = [(protocol, "GET", "/go/first", 200), (protocol, "GET", "/go/last", 200),
                (protocol, "GET", "/status/404", 404)]
    assert summary(got, "client") == expected and summary(got, "server") == expected
    assert {e.pid for e in got} == {client.pid, server.pid}
    assert all(e.attributes["tls"] for e in got)
    # Entries probed at the stack check's jump (jbe), which the kernel emulates, not at the cmp.
    target, _ = c.tls.attached[file_key(str(server_binary))]
    with open(server_binary, "rb") as f:
        code = f.read()
    assert {f.name: code[f.entry:f.entry + 2] in (b"\x0f\x86",) or code[f.entry] == 0x76 for f in target.go} == {
        tls_targets.GO_READ: True, tls_targets.GO_WRITE: True, tls_targets.GO_HANDSHAKE: True}
    target, _ = c.tls.attached[file_key(str(client_binary))]
    assert (target.kind, target.version[:6]) == ("go", "go1.19")


def test_programs_that_cannot_be_probed_are_named_and_counted(go_programs, certificate):
    _, _, stripped = go_programs
    server = python_program("py_server.py", *map(str, certificate), server=True)
    client = Peer([str(stripped), "h1", f"https://{HOST}:{server.port}/x"], server=False)
    try:
        with capture(server.port) as c:
            [entry] = [u for u in c.tls.unprobed.values() if u.target.path == str(stripped)]
            assert entry.pid == client.pid
            assert entry.target.reason == "stripped Go binary (no symbol table)"
            assert c.tls.counters()["programs_not_probed"] >= 1
        from deetune import doctor

        named = [check.detail for check in doctor.check_tls() if check.name == "tls not probed"]
        assert f"go_client_strip (pid {client.pid}): {stripped}: stripped Go binary (no symbol table)" in named
        assert client.go() == ["HTTP/1.1", "200"]
    finally:
        client.stop()
        server.stop()
    assert "programs not probed" in c.stats.summary()


# -- cleartext HTTP/2 and gRPC -----------------------------------------------------------------------


def test_h2c_prior_knowledge_through_nginx(nginx_tls):
    """nghttp sends its three requests at once on one connection (streams 13, 15 and 17, after
    PRIORITY frames that open no stream)."""
    port = nginx_tls.h2c_port
    nghttp = require_binary("nghttp", "nghttp2-client")
    with capture(port, tls=False) as c:
        _, out = run([nghttp, "-n", "--stat", f"http://{HOST}:{port}/static.bin", f"http://{HOST}:{port}/broken",
                      f"http://{HOST}:{port}/static.bin?again"])
        assert [line.split()[4] for line in out.splitlines() if line.strip().startswith(("13 ", "15 ", "17 "))] == [
            "200", "503", "200"]
        wait_exchanges(c, port, 6)
    got = exchanges(c, port)
    expected = [("http2", "GET", "/broken", 503), ("http2", "GET", "/static.bin", 200),
                ("http2", "GET", "/static.bin?again", 200)]
    assert summary(got, "client") == expected and summary(got, "server") == expected
    assert sorted(e.attributes["stream_id"] for e in got) == [13, 13, 15, 15, 17, 17]
    assert [e.error for e in got if e.target == "/broken"] == [True, True]


def test_h2c_upgrade_and_a_declined_one(nginx_server):
    curl = require_binary("curl", "curl")
    need_module("h2", "h2")
    server = python_program("h2c_upgrade_server.py", server=True)
    try:
        with capture(server.port, tls=False) as c:
            _, out = run([curl, "-s", "--http2", "-o", "/dev/null", "-o", "/dev/null",
                          "-w", "%{http_version} %{http_code}\n", f"http://{HOST}:{server.port}/index.html",
                          f"http://{HOST}:{server.port}/missing"])
            assert out.split() == ["2", "200", "2", "404"]
            wait_exchanges(c, server.port, 4)
    finally:
        server.stop()
    got = exchanges(c, server.port)
    expected = [("http2", "GET", "/index.html", 200), ("http2", "GET", "/missing", 404)]
    assert summary(got, "client") == expected and summary(got, "server") == expected
    # The upgrade request is stream 1, answered in HTTP/2; the next request is stream 3.
    assert sorted((e.attributes["stream_id"], e.attributes.get("upgrade")) for e in got) == [
        (1, "h2c"), (1, "h2c"), (3, None), (3, None)]
    # nginx does not do h2c upgrades: it answers in HTTP/1.1, decoded as HTTP/1.
    nginx = nginx_server
    with capture(nginx.port, tls=False) as c:
        _, out = run([curl, "-s", "--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}\n",
                      nginx.url("/static.bin")])
        assert out.split() == ["1.1", "200"]
        wait_exchanges(c, nginx.port, 2)
    got = exchanges(c, nginx.port)
    assert summary(got, "client") == summary(got, "server") == [("http", "GET", "/static.bin", 200)]


def test_grpc_unary_streaming_and_an_error():
    need_module("grpc", "grpcio")
    server = python_program("grpc_server.py", server=True)
    try:
        with capture(server.port, tls=False) as c:
            client = python_program("grpc_client.py", str(server.port))
            assert client.go() == ["hello", "world", "3", "4", "2", "NOT_FOUND"]
            wait_exchanges(c, server.port, 10)
    finally:
        server.stop()
    got = exchanges(c, server.port)
    for role in ("client", "server"):
        calls = sorted((e.target, e.status, e.error, e.error_message, e.attributes["request_messages"],
                        e.attributes["response_messages"], e.attributes["streaming"])
                       for e in got if e.role == role)
        assert calls == [
            ("/demo.Greeter/Chat", "OK", False, None, 2, 2, "bidi"),
            ("/demo.Greeter/CollectHellos", "OK", False, None, 4, 1, "client"),
            ("/demo.Greeter/ListHellos", "OK", False, None, 1, 3, "server"),
            ("/demo.Greeter/SayHello", "NOT_FOUND", True, "no such greeter: fail", 1, 0, "unary"),
            ("/demo.Greeter/SayHello", "OK", False, None, 1, 1, "unary"),
        ], role
    assert {e.protocol for e in got} == {"grpc"}
    assert {(e.attributes["grpc_service"], e.attributes["http_status"]) for e in got} == {("demo.Greeter", 200)}


def test_joining_an_http2_connection_opened_before_the_agent(nginx_tls):
    """A connection whose HPACK tables were filled before the probe: repeated headers refer to
    entries never seen (unknown), new ones are literal; every stream is counted with its status."""
    h2 = need_module("h2.connection", "h2")
    import h2.config
    import h2.events

    port = nginx_tls.h2c_port
    sock = socket.create_connection((HOST, port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", f"{HOST}:{port}"),
               ("user-agent", "joiner/1.0")]

    def get(path: str) -> int:
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [*headers[:1], (":path", path), *headers[1:]], end_stream=True)
        sock.sendall(conn.data_to_send())
        status = None
        while True:
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == sid:
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == sid:
                    sock.sendall(conn.data_to_send())
                    return status
            sock.sendall(conn.data_to_send())

    try:
        assert get("/static.bin") == 200  # before the agent: fills both tables
        with capture(port, tls=False) as c:
            statuses = [get("/static.bin"), get("/missing"), get("/missing"), get("/static.bin")]
            assert statuses == [200, 404, 404, 200]
            wait_exchanges(c, port, 8)
    finally:
        sock.close()
    got = exchanges(c, port)
    for role in ("client", "server"):
        mine = sorted((e for e in got if e.role == role), key=lambda e: e.attributes["stream_id"])
        assert [(e.attributes["stream_id"], e.method, e.target, e.status) for e in mine] == [
            (3, "GET", "", 200),  # :path /static.bin was inserted by stream 1, before the join
            (5, "GET", "/missing", 404),  # new: literal, and inserted
            (7, "GET", "/missing", 404),  # refers to stream 5's insertion: seen
            (9, "GET", "", 200),
        ], role
        # :authority and user-agent (inserted by stream 1) stay unknown, and :path of streams 3 and
        # 9: 10 of the 20 request header fields.  nginx sends its response headers unindexed.
        assert [e.attributes["headers_unknown"] for e in mine] == [3, 2, 2, 3]
        assert all("host" not in e.attributes for e in mine)


# -- recording --------------------------------------------------------------------------------------


def test_a_recorded_tls_exchange_is_plaintext_redacted(certificate, tmp_path):
    """A recording task on a TLS server: the exchanges' bytes are the plaintext, with the
    Authorization header masked, and the secret reaches neither the store nor an export."""
    from tests.test_recording import Agent, exported, service_of, store_bytes, wait_until

    secret = "tls-secret-6c0ffee"
    server = python_program("py_server.py", *map(str, certificate), server=True)
    agent = Agent(tmp_path / "agent.db", "--tls")
    try:
        task_id = agent.cli("create", "--server", service_of(server.pid), "--count", "2").strip()
        wait_until(lambda: server.port in agent.task(task_id)["ports"], "the task to watch the server's port")
        client = python_program("py_client.py", str(server.port), "-H", f"Authorization: Bearer {secret}",
                                "/private/1", "/private/2")
        assert client.go() == ["200", "200"]
        recorded = agent.wait_recorded(task_id, 2)
        wait_until(lambda: agent.task(task_id)["state"] == "completed", "the task to complete")
        assert [(x.protocol, x.method, x.target, x.status) for x in recorded] == [
            ("http", "GET", "/private/1", 200), ("http", "GET", "/private/2", 200)]
        for x in recorded:
            assert x.request.startswith(b"GET /private/")
            assert b"Authorization: [REDACTED]" in x.request and secret.encode() not in x.request
            assert x.response.endswith(b"\r\n\r\nauthorized\n")  # the server saw the header
            assert x.redactions == ("http.authorization",)
        assert secret.encode() not in store_bytes(agent.store)
        assert secret.encode() not in exported(agent, task_id, ("jsonl", "json", "har"))
    finally:
        agent.stop()
        server.stop()
