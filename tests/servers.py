"""Real servers on loopback for end-to-end tests: nginx (with a Python upstream), Redis, MariaDB.

Each server runs from a temporary directory of its own, on a free port of
127.0.0.1, and is stopped by the pid this module started: system services and
their data directories are never touched.  Readiness is polled (the port
accepts connections), never slept for.

The session-scoped fixtures start each server once per test session.  A test
module uses them by importing them (``from tests.servers import nginx_server``,
…).  A missing binary skips the test with the reason, or fails it under
``CI=true`` (CI must not pass by skipping).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import random
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import attrs
import pytest

AS_ROOT = os.geteuid() == 0

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HOST = "127.0.0.1"
#: How long a server may take to accept connections (MariaDB's first start is the slowest).
START_TIMEOUT = 60.0


def unavailable(reason: str) -> None:
    """Skip the requesting test with ``reason``; under CI=true, fail it instead."""
    if IN_CI:
        pytest.fail(f"server unavailable under CI=true: {reason}")
    pytest.skip(reason)


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin", "/sbin") if (p := pathlib.Path(d, name)).exists()), None
    )
    if path is None:
        unavailable(f"{name} not found: install the Debian package {package} (`make test-deps`)")
    return path


def need_module(name: str, package: str):
    """Import a client library from the ``test`` extra; skip (fail under CI) without it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(f"Python module {name} missing: pip install {package} (it is in the `test` extra)")


#: Ports tests listen on: below the kernel's ephemeral range (32768-60999 by default), so that no
#: connection of another process on this host has one as its source port (a test filtering by its
#: port would count it).
_TEST_PORTS = (20000, 32767)


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now, outside the ephemeral range."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = random.randint(*_TEST_PORTS)
        with socket.socket(family) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family) as s:  # a crowded range: the kernel's choice
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = START_TIMEOUT, host: str = HOST,
                  log: pathlib.Path | None = None) -> None:
    """Poll until ``port`` accepts a connection; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}"
                               + _tail(log))
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} did not listen on {port} within {timeout}s" + _tail(log))
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _tail(log: pathlib.Path | None, lines: int = 20) -> str:
    if log is None or not log.exists():
        return ""
    return "\n--- " + str(log) + " ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process we started (by its pid), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _start(args: Sequence[str], port: int, log: pathlib.Path, **kwargs) -> subprocess.Popen:
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)
    try:
        wait_for_port(port, proc, log=log)
    except BaseException:
        stop_process(proc)
        raise
    return proc


# -- upstream: a small HTTP/1.1 keep-alive server in Python ------------------------------------

UPSTREAM = r"""
import socket, sys, threading
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(64)
print(srv.getsockname()[1], flush=True)

def response(path, nbytes):
    status = 200
    if path.startswith(b"/api/status/"):
        status = int(path[12:15])
    body = b'{"path":"%s","request_bytes":%06d}\n' % (path, nbytes)
    reason = {200: b"OK", 404: b"Not Found", 503: b"Service Unavailable"}.get(status, b"Other")
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (status, reason, len(body))
    return head + body

def serve(conn):
    buf = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            conn.sendall(response(path, len(head) + 4))

while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def upstream_response(path: str, request_bytes: int) -> bytes:
    """The exact bytes the upstream answers ``path`` with, given the size of the request it read."""
    status = int(path[12:15]) if path.startswith("/api/status/") else 200
    body = b'{"path":"%s","request_bytes":%06d}\n' % (path.encode(), request_bytes)
    reason = {200: b"OK", 404: b"Not Found", 503: b"Service Unavailable"}.get(status, b"Other")
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
        status, reason, len(body))
    return head + body


@attrs.define
class Upstream:
    proc: subprocess.Popen
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, args: Sequence[str] | None = None, *, env: dict[str, str] | None = None) -> Upstream:
        """The built-in upstream (:data:`UPSTREAM`), or any server started by ``args`` that binds a port of
        127.0.0.1 and prints it as its first line on stdout (``env``: its whole environment)."""
        args = [sys.executable, "-c", UPSTREAM] if args is None else list(args)
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            stop_process(proc)
            raise RuntimeError(f"upstream did not start: {line!r}")
        port = int(line)
        wait_for_port(port, proc)
        return cls(proc, port)

    def stop(self) -> None:
        stop_process(self.proc)


# -- nginx ---------------------------------------------------------------------------------------

#: The static file's size and bytes.
STATIC_BYTES = bytes(range(256)) * 4  # 1 KiB

NGINX_CONF = """\
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
    types {{ text/html html; application/octet-stream bin; }}
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 60;
    keepalive_requests 1000;
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        root {dir}/html;
        location / {{ }}
        location /nosendfile/ {{ sendfile off; }}
        location = /fail {{ return 503; }}
        location /api/ {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@attrs.define
class Nginx:
    """nginx in one process (``master_process off``): the pid serving clients is ``pid``."""

    proc: subprocess.Popen
    port: int
    dir: pathlib.Path
    upstream: Upstream

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    @classmethod
    def start(cls, directory: pathlib.Path, upstream: Upstream | None = None) -> Nginx:
        """nginx proxying ``/api/`` to ``upstream`` (default: a new :data:`UPSTREAM`); it owns the
        upstream from then on (:meth:`stop` stops both)."""
        binary = require_binary("nginx", "nginx")
        directory.mkdir(parents=True, exist_ok=True)
        upstream = upstream if upstream is not None else Upstream.start()
        try:
            html = directory / "html"
            (html / "nosendfile").mkdir(parents=True)
            (html / "static.bin").write_bytes(STATIC_BYTES)
            (html / "nosendfile" / "static.bin").write_bytes(STATIC_BYTES)
            for attempt in range(3):
                port = free_port()
                conf = directory / "nginx.conf"
                conf.write_text(NGINX_CONF.format(dir=directory, port=port, upstream=upstream.port))
                log = directory / "nginx.out"
                try:
                    proc = _start([binary, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")],
                                  port, log)
                except RuntimeError:
                    if attempt == 2 or port_is_free(port):
                        raise
                    continue  # someone took the port in between: another one
                return cls(proc, port, directory, upstream)
            raise AssertionError("unreachable")
        except BaseException:
            upstream.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc)
        self.upstream.stop()


# -- Redis ---------------------------------------------------------------------------------------


@attrs.define
class Redis:
    proc: subprocess.Popen
    port: int
    dir: pathlib.Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, directory: pathlib.Path, port: int | None = None) -> Redis:
        binary = require_binary("redis-server", "redis-server")
        directory.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            chosen = port if port is not None else free_port()
            args = [binary, "--port", str(chosen), "--bind", HOST, "--save", "", "--appendonly", "no",
                    "--dir", str(directory), "--daemonize", "no", "--logfile", "", "--protected-mode", "yes"]
            try:
                proc = _start(args, chosen, directory / "redis.log")
            except RuntimeError:
                if port is not None or attempt == 2 or port_is_free(chosen):
                    raise
                continue
            return cls(proc, chosen, directory)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        stop_process(self.proc)


# -- MariaDB -------------------------------------------------------------------------------------

DB_USER = "deetune"
DB_PASSWORD = "s3cret-Pa55word"
DB_NAME = "deetune_test"


@attrs.define
class MariaDB:
    """A MariaDB server with a password-protected ``DB_USER`` owning ``DB_NAME`` (tables ``numbers``)."""

    proc: subprocess.Popen
    port: int
    dir: pathlib.Path
    socket: pathlib.Path
    client: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(cls, directory: pathlib.Path) -> MariaDB:
        server = require_binary("mariadbd", "mariadb-server")
        install = require_binary("mariadb-install-db", "mariadb-server")
        client = require_binary("mariadb", "mariadb-client")
        directory.mkdir(parents=True, exist_ok=True)
        datadir = directory / "data"
        log = directory / "mariadb.log"
        with open(log, "ab") as out:
            subprocess.run(
                [install, "--no-defaults", f"--datadir={datadir}", "--auth-root-authentication-method=normal",
                 "--skip-test-db", *(["--user=root"] if AS_ROOT else [])],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=True, timeout=180,
            )
        sock = directory / "mariadb.sock"
        for attempt in range(3):
            port = free_port()
            args = [server, "--no-defaults", f"--datadir={datadir}", f"--socket={sock}", f"--port={port}",
                    f"--bind-address={HOST}", *(["--user=root"] if AS_ROOT else []),
                    f"--pid-file={directory}/mariadb.pid",
                    f"--log-error={log}", "--skip-name-resolve", "--innodb-buffer-pool-size=32M",
                    "--skip-log-bin", "--max-connections=64"]
            try:
                proc = _start(args, port, log)
            except RuntimeError:
                if attempt == 2 or port_is_free(port):
                    raise
                continue
            db = cls(proc, port, directory, sock, client)
            try:
                db.root_sql(
                    f"CREATE DATABASE {DB_NAME};"
                    f"CREATE USER '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASSWORD}';"
                    f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'127.0.0.1';"
                    f"CREATE TABLE {DB_NAME}.numbers (n INT PRIMARY KEY, square INT, name VARCHAR(20));"
                    f"INSERT INTO {DB_NAME}.numbers VALUES "
                    + ",".join(f"({n},{n * n},'n{n}')" for n in range(1, 11))
                    + ";"
                )
            except BaseException:
                db.stop()
                raise
            return db
        raise AssertionError("unreachable")

    def root_sql(self, sql: str) -> str:
        """Run SQL as root over the Unix socket (so it never shows up as TCP traffic)."""
        out = subprocess.run([self.client, "--no-defaults", f"--socket={self.socket}", "-uroot", "-N", "-B", "-e", sql],
                             capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"mariadb -e {sql[:60]!r} failed: {out.stderr.strip()}")
        return out.stdout

    def stop(self) -> None:
        stop_process(self.proc, timeout=60)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nginx_server(tmp_path_factory):
    server = Nginx.start(tmp_path_factory.mktemp("nginx"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = Redis.start(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mariadb_server(tmp_path_factory):
    server = MariaDB.start(tmp_path_factory.mktemp("mariadb"))
    yield server
    server.stop()
