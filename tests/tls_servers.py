"""TLS, HTTP/2 and gRPC peers for end-to-end tests: nginx with TLS and h2c, an h2c upgrade server (python-hyper's h2),
Python's ssl server and client, Go programs and an OpenSSL-static C client built in the test,
a grpcio server and client.  Sources in tests/tls_programs/.

Certificates are self-signed, made in the test's directory.  Every server listens on a free port
of 127.0.0.1 and is stopped by the pid this module started.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import attrs
import pytest

from tests.servers import HOST, _start, free_port, port_is_free, require_binary, stop_process, unavailable, wait_for_port

PROGRAMS = pathlib.Path(__file__).resolve().parent / "tls_programs"


def make_certificate(directory: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed certificate for 127.0.0.1 / localhost: (cert, key)."""
    openssl = require_binary("openssl", "openssl")
    cert, key = directory / "cert.pem", directory / "key.pem"
    if not cert.exists():
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                       check=True, capture_output=True, timeout=60)
    return cert, key


class Peer:
    """A program started by the test: prints its port as its first line when it is a server."""

    def __init__(self, args: list[str], *, server: bool, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.port = 0
        if server:
            line = self.proc.stdout.readline()
            if not line.strip().isdigit():
                err = self.proc.stderr.read() if self.proc.poll() is not None else ""
                stop_process(self.proc)
                raise RuntimeError(f"{args[0]} did not start: {line!r} {err}")
            self.port = int(line)
            wait_for_port(self.port, self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self, timeout: float = 60) -> list[str]:
        """Tell a client to start (a line on its stdin) and wait for it: its output lines."""
        out, err = self.proc.communicate("go\n", timeout=timeout)
        assert self.proc.returncode == 0, f"{self.proc.args[0]} failed ({self.proc.returncode}): {err.strip()}"
        return out.split()

    def stop(self) -> None:
        stop_process(self.proc)


# -- nginx with TLS and h2c ------------------------------------------------------------------------

NGINX_TLS_CONF = """\
master_process off;
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    default_type application/octet-stream;
    keepalive_timeout 60;
    server {{
        listen 127.0.0.1:{tls_port} ssl http2;
        listen 127.0.0.1:{h2c_port} http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {dir}/html;
        location / {{ }}
        location = /missing {{ return 404; }}
        location = /broken {{ return 503; }}
    }}
}}
"""

#: The static file nginx serves at /static.bin.
STATIC = bytes(range(256)) * 8


@attrs.define
class NginxTls:
    proc: subprocess.Popen
    tls_port: int
    h2c_port: int
    dir: pathlib.Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, directory: pathlib.Path) -> NginxTls:
        binary = require_binary("nginx", "nginx")
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = make_certificate(directory)
        (directory / "html").mkdir(exist_ok=True)
        (directory / "html" / "static.bin").write_bytes(STATIC)
        for attempt in range(3):
            tls_port, h2c_port = free_port(), free_port()
            conf = directory / "nginx.conf"
            conf.write_text(NGINX_TLS_CONF.format(dir=directory, tls_port=tls_port, h2c_port=h2c_port, cert=cert,
                                                  key=key))
            try:
                proc = _start([binary, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")],
                              tls_port, directory / "nginx.out")
                wait_for_port(h2c_port, proc)
            except RuntimeError:
                if attempt == 2 or (port_is_free(tls_port) and port_is_free(h2c_port)):
                    raise
                continue
            return cls(proc, tls_port, h2c_port, directory)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        stop_process(self.proc)


# -- programs built in the test --------------------------------------------------------------------


def go_build(directory: pathlib.Path, source: str, name: str, *, strip: bool = False) -> pathlib.Path:
    """Build tests/tls_programs/SOURCE with Debian's Go toolchain, modules and caches in ``directory``."""
    go = require_binary("go", "golang-go")
    out = directory / name
    env = dict(os.environ, HOME=str(directory), GOCACHE=str(directory / "gocache"), GOPATH=str(directory / "gopath"),
               GO111MODULE="off", GOFLAGS="", CGO_ENABLED="0")
    args = [go, "build", "-o", str(out)]
    if strip:
        args += ["-ldflags", "-s -w"]
    result = subprocess.run([*args, str(PROGRAMS / source)], env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"go build {source}: {result.stderr.strip()}")
    return out


def static_openssl_client(directory: pathlib.Path) -> pathlib.Path:
    """tests/tls_programs/static_client.c with libssl and libcrypto linked in (symbols kept)."""
    gcc = require_binary("gcc", "gcc")
    if not pathlib.Path("/usr/lib/x86_64-linux-gnu/libssl.a").exists() and not list(
            pathlib.Path("/usr/lib").glob("*/libssl.a")):
        unavailable("libssl.a not found: install the Debian package libssl-dev (`make test-deps`)")
    out = directory / "static_client"
    result = subprocess.run([gcc, "-O1", "-D_GNU_SOURCE", "-o", str(out), str(PROGRAMS / "static_client.c"),
                             "-Wl,-Bstatic", "-lssl", "-lcrypto", "-Wl,-Bdynamic", "-lpthread", "-ldl"],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"gcc static_client.c: {result.stderr.strip()}")
    return out


def python_program(name: str, *args: str, server: bool = False, env: dict[str, str] | None = None) -> Peer:
    return Peer([sys.executable, str(PROGRAMS / name), *args], server=server, env=env)


@pytest.fixture(scope="session")
def nginx_tls(tmp_path_factory):
    server = NginxTls.start(tmp_path_factory.mktemp("nginx-tls"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def go_programs(tmp_path_factory):
    """(server, client, stripped client) built once per session."""
    directory = tmp_path_factory.mktemp("go")
    return (go_build(directory, "go_server.go", "go_server"), go_build(directory, "go_client.go", "go_client"),
            go_build(directory, "go_client.go", "go_client_stripped", strip=True))


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("cert"))


def copy_libssl(directory: pathlib.Path) -> pathlib.Path:
    """A copy of the system's libssl (another file: a uprobe on the system's does not fire in it)."""
    import ssl

    source = pathlib.Path("/usr/lib/x86_64-linux-gnu/libssl.so.3")
    if not source.exists():
        found = [p for p in pathlib.Path("/usr/lib").glob("*/libssl.so.3")]
        if not found:
            unavailable(f"no libssl.so.3 to copy ({ssl.OPENSSL_VERSION})")
        source = found[0]
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "libssl.so.3"
    shutil.copy2(source, target)
    return target
