"""Real servers for the protocol decoders' tests: PostgreSQL 15, dnsmasq, RabbitMQ, memcached, mosquitto.

Each runs from a temporary directory of its own on a free loopback port (dnsmasq on an
address of 127.0.0.0/8 of its own too), started through :class:`deetune.testing.ServerProcess`
and stopped by its pid; system services and the system resolver are never touched.  A
missing binary skips the test with the reason, or fails it under ``CI=true``.
"""

from __future__ import annotations

import os
import pathlib
import pwd
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from deetune.testing import ServerProcess, free_port
from tests.servers import require_binary, unavailable

HOST = "127.0.0.1"

# -- PostgreSQL ----------------------------------------------------------------------------------

PG_BIN = pathlib.Path("/usr/lib/postgresql/15/bin")
PG_USER = "deetune"
PG_PASSWORD = "pg-S3cret-pw"
PG_DB = "deetune_pg"


class Postgres:
    """PostgreSQL 15 with a password (SCRAM) user ``PG_USER`` owning ``PG_DB`` (table ``numbers``).

    ``count_statements``: the server counts what it does in its own ways too: the statements it
    executed in ``pg_stat_statements`` (the extension created in the ``postgres`` database), each
    login (``log_connections``) and each error in its log, whose lines name the user and database
    (``user@database`` after the pid): see :meth:`statements_executed` and :meth:`logged`.
    """

    def __init__(self, server: ServerProcess, directory: pathlib.Path):
        self.server = server
        self.port = server.port
        self.dir = directory

    @property
    def pid(self) -> int:
        return self.server.pid

    def dsn(self, **extra: str) -> str:
        parts = {"host": HOST, "port": str(self.port), "user": PG_USER, "password": PG_PASSWORD,
                 "dbname": PG_DB, "sslmode": "disable", **extra}
        return " ".join(f"{k}={v}" for k, v in parts.items())

    @classmethod
    def start(cls, count_statements: bool = False) -> "Postgres":
        if not (PG_BIN / "postgres").exists():
            unavailable("PostgreSQL 15 not found: install the Debian package postgresql-15 (`make test-deps`)")
        # Its own directory under /tmp: the server refuses to run as root, and the user it runs as
        # must reach the directory (pytest's are private to root).
        directory = pathlib.Path(tempfile.mkdtemp(prefix="deetune-pg-"))
        data = directory / "data"
        as_postgres = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                unavailable("no 'postgres' user (installed by the postgresql-15 package)")
            os.chmod(directory, 0o755)
            os.chown(directory, owner.pw_uid, owner.pw_gid)
            as_postgres = ["runuser", "-u", "postgres", "--"]
        pwfile = directory / "pw"
        pwfile.write_text("boot-" + PG_PASSWORD + "\n")
        if as_postgres:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        log = str(directory / "postgres.log")
        with open(log, "ab") as out:
            subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
                            "--auth=scram-sha-256", f"--pwfile={pwfile}", "--no-sync", "-E", "UTF8",
                            "--locale=C"],
                           stdout=out, stderr=subprocess.STDOUT, check=True, timeout=180)
        def ready(port: int, proc: subprocess.Popen) -> None:
            """Accepting logins, not only connections (it refuses them while it starts up)."""
            deadline = time.monotonic() + 60
            while subprocess.run([str(PG_BIN / "pg_isready"), "-q", "-h", str(directory), "-p", str(port)],
                                 timeout=10).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready on {port}; see {log}")
                time.sleep(0.05)

        server = ServerProcess.start(
            [*as_postgres, str(PG_BIN / "postgres"), "-D", str(data), "-h", HOST, "-p", "{port}",
             "-k", str(directory), "-c", "fsync=off", "-c", "max_connections=40", "-c", "shared_buffers=16MB",
             "-c", "ssl=off",
             *(["-c", "shared_preload_libraries=pg_stat_statements", "-c", "pg_stat_statements.track=top",
                "-c", "log_connections=on", "-c", "log_line_prefix=%m [%p] %q%u@%d "] if count_statements else [])],
            log=log, ready=ready)
        pg = cls(server, directory)
        try:
            if count_statements:
                pg.admin_sql("CREATE EXTENSION pg_stat_statements")
            pg.admin_sql(f"CREATE USER {PG_USER} PASSWORD '{PG_PASSWORD}'")
            pg.admin_sql(f"CREATE DATABASE {PG_DB} OWNER {PG_USER}")
            pg.admin_sql(
                "CREATE TABLE numbers (n INT PRIMARY KEY, square INT, name TEXT);"
                "INSERT INTO numbers SELECT n, n*n, 'n' || n FROM generate_series(1, 10) n;"
                f"ALTER TABLE numbers OWNER TO {PG_USER};", db=PG_DB)
        except BaseException:
            server.stop()
            raise
        return pg

    def admin_sql(self, sql: str, db: str = "postgres") -> str:
        """SQL as the superuser over the Unix socket (never seen as TCP traffic)."""
        env = {**os.environ, "PGPASSWORD": "boot-" + PG_PASSWORD}
        out = subprocess.run([str(PG_BIN / "psql"), "-h", str(self.dir), "-p", str(self.port), "-U", "postgres",
                              "-d", db, "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql],
                             capture_output=True, text=True, timeout=60, env=env)
        if out.returncode != 0:
            raise RuntimeError(f"psql -c {sql[:60]!r} failed: {out.stderr.strip()}")
        return out.stdout

    def statements_executed(self, user: str = PG_USER, db: str = PG_DB) -> int:
        """The executions of statements by ``user`` in ``db`` that ``pg_stat_statements`` counted
        (since :meth:`reset_statements`): those that ran to their end, none that failed.  Asked
        over the Unix socket as the superuser, in the ``postgres`` database: not counted in it."""
        return int(self.admin_sql(
            "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
            f"JOIN pg_database d ON d.oid = s.dbid WHERE r.rolname = '{user}' AND d.datname = '{db}'"))

    def reset_statements(self) -> None:
        self.admin_sql("SELECT pg_stat_statements_reset()")

    def log_size(self) -> int:
        return (self.dir / "postgres.log").stat().st_size

    def logged(self, since: int, message: str, user: str = PG_USER, db: str = PG_DB) -> int:
        """Lines of the server's log from byte ``since`` of a session of ``user`` in ``db`` whose
        message starts with ``message`` (e.g. ``ERROR:``, ``LOG:  connection authorized:``)."""
        with open(self.dir / "postgres.log", "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        return sum(1 for line in text.splitlines()
                   if re.match(r"\S+ \S+ \S+ \[\d+\] " + re.escape(f"{user}@{db} {message}"), line))

    def stop(self) -> None:
        self.server.stop(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- memcached -----------------------------------------------------------------------------------


class Memcached:
    def __init__(self, server: ServerProcess):
        self.server = server
        self.port = server.port

    @property
    def pid(self) -> int:
        return self.server.pid

    @classmethod
    def start(cls, directory: pathlib.Path) -> "Memcached":
        binary = require_binary("memcached", "memcached")
        directory.mkdir(parents=True, exist_ok=True)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        server = ServerProcess.start([binary, "-l", HOST, "-p", "{port}", "-U", "0", "-m", "16", "-t", "1", *user],
                                     log=str(directory / "memcached.log"))
        return cls(server)

    def stop(self) -> None:
        self.server.stop()


# -- mosquitto -----------------------------------------------------------------------------------


class Mosquitto:
    def __init__(self, server: ServerProcess):
        self.server = server
        self.port = server.port

    @property
    def pid(self) -> int:
        return self.server.pid

    @classmethod
    def start(cls, directory: pathlib.Path) -> "Mosquitto":
        binary = require_binary("mosquitto", "mosquitto")
        directory.mkdir(parents=True, exist_ok=True)
        conf = directory / "mosquitto.conf"
        port = free_port()
        conf.write_text(f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
                        f"log_dest file {directory}/mosquitto.log\n"
                        + ("user root\n" if os.geteuid() == 0 else ""))
        server = ServerProcess.start([binary, "-c", str(conf)], port=port, log=str(directory / "out.log"))
        return cls(server)

    def stop(self) -> None:
        self.server.stop()


# -- RabbitMQ ------------------------------------------------------------------------------------


class RabbitMQ:
    """A RabbitMQ node of its own (node name, data and logs under the directory; guest on loopback),
    with an Erlang port mapper of its own in the foreground: the one Erlang starts by itself
    daemonises and would outlive the test."""

    def __init__(self, server: ServerProcess, directory: pathlib.Path, env: dict[str, str], epmd: ServerProcess):
        self.server = server
        self.port = server.port
        self.dir = directory
        self.env = env
        self.epmd = epmd

    @property
    def pid(self) -> int:
        return self.server.pid

    @classmethod
    def start(cls, directory: pathlib.Path) -> "RabbitMQ":
        require_binary("rabbitmq-server", "rabbitmq-server")
        # The script itself, not Debian's wrapper (which switches to the rabbitmq user, with
        # its own environment and directories).
        binary = "/usr/lib/rabbitmq/bin/rabbitmq-server"
        directory.mkdir(parents=True, exist_ok=True)
        epmd_binary = require_binary("epmd", "erlang-base")
        epmd = ServerProcess.start([epmd_binary, "-port", "{port}", "-address", HOST],
                                   log=str(directory / "epmd.log"))
        port = free_port()
        dist = free_port()
        name = f"deetune{port}@localhost"
        env = {
            **os.environ, "ERL_EPMD_PORT": str(epmd.port),
            "RABBITMQ_NODENAME": name, "RABBITMQ_NODE_IP_ADDRESS": HOST, "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist), "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"), "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(directory / "rabbitmq.pid"), "HOME": str(directory),
            "RABBITMQ_SERVER_START_ARGS": "", "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        (directory / "enabled_plugins").write_text("[].\n")
        (directory / "rabbitmq.conf").write_text("loopback_users = none\n")
        try:
            server = ServerProcess.start([binary], port=port, env=env, log=str(directory / "rabbitmq.out"),
                                         timeout=120, cwd=str(directory))
        except BaseException:
            epmd.stop()
            raise
        return cls(server, directory, env, epmd)

    def stop(self) -> None:
        self.server.stop(timeout=60)
        self.epmd.stop()


# -- dnsmasq -------------------------------------------------------------------------------------

DNS_DOMAIN = "deetune.test"
#: Names dnsmasq answers (A records), and one it answers with a CNAME.
DNS_RECORDS = {"web.deetune.test": "127.0.0.9", "db.deetune.test": "127.0.0.10"}
DNS_CNAME = ("www.deetune.test", "web.deetune.test")


class Dnsmasq:
    """dnsmasq answering for ``deetune.test`` only (NXDOMAIN for other names there, REFUSED
    outside: no upstream), on an address of 127.0.0.0/8 of its own and a free port, UDP and TCP."""

    def __init__(self, server: ServerProcess, address: str):
        self.server = server
        self.port = server.port
        self.address = address

    @property
    def pid(self) -> int:
        return self.server.pid

    @classmethod
    def start(cls, directory: pathlib.Path) -> "Dnsmasq":
        binary = require_binary("dnsmasq", "dnsmasq-base")
        directory.mkdir(parents=True, exist_ok=True)
        address = f"127.0.{random.randint(60, 250)}.{random.randint(2, 250)}"
        records = [f"--host-record={name},{ip}" for name, ip in DNS_RECORDS.items()]
        user = ["--user=root"] if os.geteuid() == 0 else []
        for attempt in range(3):
            port = free_port(address)
            if not _udp_free(address, port):
                continue
            try:
                server = ServerProcess.start(
                    [binary, "--keep-in-foreground", "--no-daemon", "--conf-file=/dev/null", "--no-resolv",
                     "--no-hosts", "--bind-interfaces", f"--listen-address={address}", "--port={port}",
                     f"--local=/{DNS_DOMAIN}/", f"--cname={DNS_CNAME[0]},{DNS_CNAME[1]}", *records,
                     f"--pid-file={directory}/dnsmasq.pid", "--log-facility=" + str(directory / "dnsmasq.log"),
                     *user],
                    host=address, port=port, log=str(directory / "dnsmasq.out"))
            except RuntimeError:
                if attempt == 2:
                    raise
                continue
            return cls(server, address)
        raise RuntimeError("no free port for dnsmasq")

    def stop(self) -> None:
        self.server.stop()


def _udp_free(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    server = Postgres.start(count_statements=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def memcached_server(tmp_path_factory):
    server = Memcached.start(tmp_path_factory.mktemp("memcached"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mosquitto_server(tmp_path_factory):
    server = Mosquitto.start(tmp_path_factory.mktemp("mosquitto"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory):
    server = RabbitMQ.start(tmp_path_factory.mktemp("rabbitmq"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def dnsmasq_server(tmp_path_factory):
    server = Dnsmasq.start(tmp_path_factory.mktemp("dnsmasq"))
    yield server
    server.stop()


__all__ = ["DNS_CNAME", "DNS_DOMAIN", "DNS_RECORDS", "Dnsmasq", "Memcached", "Mosquitto", "PG_DB", "PG_PASSWORD",
           "PG_USER", "Postgres", "RabbitMQ", "dnsmasq_server", "memcached_server", "mosquitto_server",
           "postgres_server", "rabbitmq_server"]
