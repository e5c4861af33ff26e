"""PostgreSQL exchanges counted exactly in the kernel (bpf/l7.bpf.h), as the decoder groups them.

A real PostgreSQL 15 and psycopg clients: simple queries, extended-protocol ones, prepared ones, a
pipeline, SQL errors (simple and extended, one in the middle of a pipeline), an SSL request the
server refuses, and a connection opened before the probe (joined in the middle).  The kernel's
counts per role, method and outcome must be exactly what was sent, on both sides, and the same as
the decoded exchanges; with the overload sampling copying almost nothing they must not move.  And
the agent at its default flags, on an idle host and on a saturated one (a busy loop at nice 19 on
every CPU, as tests/test_accounting_servers.py does it): its edges and Prometheus series exactly
what concurrent psycopg clients did and what PostgreSQL itself counted (pg_stat_statements, its
log of logins and errors), every error in /api/exchanges once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import socket
import struct
import time
from typing import Iterator

import pytest

from deetune.decoders.postgres import PostgresDecoder
from deetune.events import ExchangeEvent, RequestCounts
from deetune.l7 import L7Handler, ListeningPorts
from deetune.probes import ProbeOptions
from deetune.probes.payload import PayloadProbe
from tests.harness import running_pipeline
from tests.protocol_servers import PG_DB, PG_USER, postgres_server  # noqa: F401  (fixture)
from tests.servers import HOST, need_module

pytestmark = [pytest.mark.bpf, pytest.mark.servers]

ROLES = ("client", "server")


def kernel_counts(collector, port: int) -> collections.Counter:
    """(role, method, outcome) → exchanges (or chunks: unparsed) the kernel counted on ``port``."""
    out: collections.Counter = collections.Counter()
    for e in collector.matching(lambda e: isinstance(e, RequestCounts) and e.port == port):
        if e.count:
            out[(e.role, e.method, e.outcome)] += e.count
    return out


def decoded_counts(collector, port: int) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for e in collector.matching(lambda e: isinstance(e, ExchangeEvent) and port in (e.lport, e.rport)):
        out[(e.role, e.method, "error" if e.error else "ok")] += 1
    return out


def both_sides(expected: dict[tuple[str, str], int]) -> collections.Counter:
    return collections.Counter({(role, method, outcome): n for role in ROLES
                                for (method, outcome), n in expected.items() if n})


@contextlib.contextmanager
def probe_on(port: int, sampling: int = 1) -> Iterator:
    """The payload probe on ``port`` with a PostgreSQL decoder; ``sampling``: the overload sampling
    forced to copy 1 connection-period in that many."""
    payload = PayloadProbe(ProbeOptions(), ports=(port,), exclude_self=False, overload_sampling=False)
    handler = L7Handler([PostgresDecoder], mute=payload.mute, listening=ListeningPorts(reader=lambda: {port}))
    with running_pipeline([payload], handlers=[handler]) as collector:
        if sampling > 1:
            payload.set_sampling(sampling)
        collector.probe = payload
        yield collector


def wait_counts(collector, port: int, expected: collections.Counter, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while kernel_counts(collector, port) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.5)  # two more reads: nothing else comes
    got = kernel_counts(collector, port)
    assert got == expected, (f"kernel counted {dict(got)}, expected {dict(expected)}; "
                             f"missing {dict(expected - got)}, extra {dict(got - expected)}")


def test_postgres_exchanges_counted_exactly_in_the_kernel(postgres_server):
    psycopg = need_module("psycopg", "psycopg[binary]")
    pg = postgres_server
    port = pg.port
    n_simple, n_extended, n_prepared, n_pipeline, n_joined = 20, 20, 20, 30, 7
    # Opened (and logged in) before the probe: joined in the middle, at its next query.
    early = psycopg.connect(pg.dsn(), autocommit=True, prepare_threshold=None)
    try:
        early.execute("SELECT 1").fetchall()
        with probe_on(port) as collector:
            for i in range(n_joined):
                assert early.execute("SELECT %s::int", (i,)).fetchone() == (i,)
            with pytest.raises(psycopg.errors.DivisionByZero):
                early.execute("SELECT 1 / %s::int", (0,))
            with psycopg.connect(pg.dsn(), autocommit=True, prepare_threshold=None) as conn:
                for _ in range(n_simple):  # no parameters: the simple protocol (Query)
                    assert conn.execute("SELECT square FROM numbers WHERE n = 3").fetchone() == (9,)
                for i in range(n_extended):  # Parse, Bind, Describe, Execute, Sync
                    assert conn.execute("SELECT square FROM numbers WHERE n = %s", (i % 10 + 1,)).fetchone()
                for i in range(n_prepared):  # a named statement: parsed with the first, then Bind, Execute, Sync
                    assert conn.execute("SELECT name FROM numbers WHERE n = %s", (i % 10 + 1,),
                                        prepare=True).fetchone()
                with conn.pipeline():  # n_pipeline Executes, one Sync
                    cursors = [conn.execute("SELECT %s::int + 1", (i,)) for i in range(n_pipeline)]
                assert [c.fetchone()[0] for c in cursors] == [i + 1 for i in range(n_pipeline)]
                for _ in range(3):  # errors of simple queries
                    with pytest.raises(psycopg.errors.DivisionByZero):
                        conn.execute("SELECT 1 / 0")
                for _ in range(2):  # of extended ones (at Parse)
                    with pytest.raises(psycopg.errors.UndefinedTable):
                        conn.execute("SELECT * FROM nowhere WHERE n = %s", (1,))
                # In a pipeline: the first answered, the second fails, the third is skipped (an error too).
                with pytest.raises(psycopg.errors.DivisionByZero):
                    with conn.pipeline():
                        conn.execute("SELECT %s::int", (1,))
                        conn.execute("SELECT 1 / %s::int", (0,))
                        conn.execute("SELECT %s::int", (3,))
            # An SSL request the server refuses ('N'): the start-up follows in the clear.
            with psycopg.connect(pg.dsn(sslmode="prefer"), autocommit=True) as conn:
                conn.execute("SELECT 2").fetchall()
            expected = both_sides({
                ("STARTUP", "ok"): 2,
                ("SSL_REQUEST", "ok"): 1,
                ("QUERY", "ok"): n_simple + 1,
                ("QUERY", "error"): 3,
                ("EXECUTE", "ok"): n_joined + n_extended + n_prepared + n_pipeline + 1,
                ("EXECUTE", "error"): 1 + 2 + 2,
            })
            wait_counts(collector, port, expected)
            # The decoded exchanges (all copied here) are the same ones.
            assert decoded_counts(collector, port) == expected
            assert collector.probe.counters()["uncounted_key_table_full"] == 0
    finally:
        early.close()


def test_postgres_counts_do_not_move_with_the_overload_sampling(postgres_server):
    """Copying 1 connection-period in 1024, the kernel still counts every exchange."""
    psycopg = need_module("psycopg", "psycopg[binary]")
    pg = postgres_server
    port = pg.port
    connections, rounds = 6, 40
    with probe_on(port, sampling=1024) as collector:
        for _ in range(connections):
            with psycopg.connect(pg.dsn(), autocommit=True, prepare_threshold=None) as conn:
                for i in range(rounds):
                    conn.execute("SELECT name FROM numbers WHERE n = 4").fetchall()
                    conn.execute("SELECT name FROM numbers WHERE n = %s", (i % 10 + 1,)).fetchall()
                with pytest.raises(psycopg.errors.UndefinedTable):
                    conn.execute("SELECT * FROM nowhere")
                with conn.pipeline():
                    for i in range(rounds):
                        conn.execute("SELECT %s::int", (i,))
        expected = both_sides({
            ("STARTUP", "ok"): connections,
            ("QUERY", "ok"): connections * rounds,
            ("QUERY", "error"): connections,
            ("EXECUTE", "ok"): connections * rounds * 2,
        })
        wait_counts(collector, port, expected)
        assert collector.probe.counters()["sampled_out"] > 0
        # The copies are a sample: far fewer exchanges decoded than counted (errors aside: their
        # heads are copied whatever the sampling).
        decoded = decoded_counts(collector, port)
        assert sum(n for (_, _, outcome), n in decoded.items() if outcome == "ok") < sum(expected.values()) // 2
        # Every error is decoded, from the heads the kernel copies of each (l7_account's L7_ERROR_DETAIL).
        errors = lambda: {k: n for k, n in decoded_counts(collector, port).items() if k[2] == "error"}  # noqa: E731
        deadline = time.monotonic() + 10
        while errors() != {(role, "QUERY", "error"): connections for role in ROLES} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert errors() == {(role, "QUERY", "error"): connections for role in ROLES}


def startup_message() -> bytes:
    body = struct.pack(">i", 196608) + f"user\0{PG_USER}\0database\0{PG_DB}\0\0".encode()
    return struct.pack(">i", len(body) + 4) + body


def test_postgres_bytes_it_cannot_follow_are_counted_as_unparsed(postgres_server):
    """A client that logs in, then sends bytes that are no frontend message: the kernel counts the
    start-up (refused: the server answers the garbage with an error and closes) and the chunk it
    could not follow, and nothing else."""
    port = postgres_server.port
    with probe_on(port) as collector, socket.create_connection((HOST, port), timeout=10) as client:
        client.sendall(startup_message())
        assert client.recv(4096)[:1] == b"R"  # the SCRAM authentication request
        client.sendall(b"\xfe\x00\x00\x00\x08garbage!")
        while client.recv(4096):  # an ErrorResponse, then the server closes
            pass
        wait_counts(collector, port, collections.Counter({
            ("client", "STARTUP", "error"): 1, ("client", "", "unparsed"): 1,
            ("server", "STARTUP", "error"): 1, ("server", "", "unparsed"): 1,
        }))


def psycopg_mix(psycopg, dsn: str, rounds: int, pipeline: int, errors_every: int) -> collections.Counter:
    """One connection's simple, extended, prepared and pipelined queries, with errors of each kind
    every ``errors_every`` rounds: the exchanges it made, as (method, outcome) → count, and under
    ``"skipped"`` how many of its errors are statements the server skipped after an error (each
    an exchange counted in ("EXECUTE", "error") too)."""
    done: collections.Counter = collections.Counter()
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        done["STARTUP", "ok"] += 1
        for i in range(rounds):
            assert conn.execute("SELECT square FROM numbers WHERE n = 3").fetchone() == (9,)
            done["QUERY", "ok"] += 1
            assert conn.execute("SELECT square FROM numbers WHERE n = %s", (i % 10 + 1,)).fetchone()
            assert conn.execute("SELECT name FROM numbers WHERE n = %s", (i % 10 + 1,), prepare=True).fetchone()
            with conn.pipeline():
                cursors = [conn.execute("SELECT %s::int + 1", (j,)) for j in range(pipeline)]
            assert [c.fetchone()[0] for c in cursors] == [j + 1 for j in range(pipeline)]
            done["EXECUTE", "ok"] += 2 + pipeline
            if i % errors_every == 0:
                with pytest.raises(psycopg.errors.DivisionByZero):
                    conn.execute("SELECT 1 / 0")
                with pytest.raises(psycopg.errors.UndefinedTable):
                    conn.execute("SELECT * FROM nowhere WHERE n = %s", (1,))
                with pytest.raises(psycopg.errors.DivisionByZero):
                    with conn.pipeline():  # answered, failed, skipped (an error too)
                        conn.execute("SELECT %s::int", (1,))
                        conn.execute("SELECT 1 / %s::int", (0,))
                        conn.execute("SELECT %s::int", (3,))
                done["QUERY", "error"] += 1
                done["EXECUTE", "ok"] += 1
                done["EXECUTE", "error"] += 3
                done["skipped"] += 1  # the pipeline's third
    return done


@pytest.mark.parametrize("saturated", [False, True], ids=["idle", "saturated"])
def test_postgres_counts_exact_with_the_agent_at_default_flags(postgres_server, tmp_path, saturated):
    """The agent at default flags (its overload sampling on), psycopg connections at once, on an idle
    host and a saturated one: the requests and errors of the edge, in the topology API and in the
    Prometheus exposition, are exactly the exchanges the clients made and what the server counted;
    every error is in /api/exchanges, copied (sampling 1); the detail's weights add up to the
    truth within 5 %.

    The server's own counts: logins (``log_connections``: one STARTUP exchange each), statements
    executed to their end (``pg_stat_statements``' calls: a Query, or an Execute with the Parse,
    Bind, Describe and Sync around it, one each) and errors (the ``ERROR:`` lines of its log: one
    ErrorResponse each; ``pg_stat_statements`` counts no failed statement).  What PostgreSQL
    counts nowhere: a statement of a pipeline it skipped after an error (read and dropped until
    the Sync), an error exchange in the kernel's accounting as in the decoder's; their number is
    what the clients sent (one a failing pipeline) and the agent marks them ``aborted``.  The
    server's counters are reset and read, and its log sized, over the Unix socket as the
    superuser in the ``postgres`` database (``Postgres.admin_sql``): no TCP the agent sees,
    nothing the statistics of user ``deetune`` in ``deetune_pg`` count."""
    from tests.test_accounting_servers import Run, prometheus_counts, saturated_host

    psycopg = need_module("psycopg", "psycopg[binary]")
    pg = postgres_server
    connections, rounds, pipeline, errors_every = 4, 60, 8, 15
    clients = ("pytest", "python", "python3")  # this process (its threads)
    run = Run(tmp_path)
    try:
        with saturated_host(saturated):
            since = run.begin("postgres", "postgres", clients)
            pg.reset_statements()
            log_from = pg.log_size()
            with concurrent.futures.ThreadPoolExecutor(connections) as pool:
                done = sum((f.result() for f in [pool.submit(psycopg_mix, psycopg, pg.dsn(), rounds, pipeline,
                                                             errors_every) for _ in range(connections)]),
                           collections.Counter())
            skipped = done.pop("skipped")
            # What the server counted, each before it answered (the clients have all their answers).
            logins = pg.logged(log_from, "LOG:  connection authorized:")
            executed = pg.statements_executed()
            failed = pg.logged(log_from, "ERROR:")
            until = run.end()
            truth = sum(done.values()), sum(n for (_, outcome), n in done.items() if outcome == "error")
            by_server = logins + executed + failed + skipped, failed + skipped
            # The server's counts and the clients' agree (per kind: not only in total).
            assert (logins, executed, failed) == (
                done["STARTUP", "ok"], done["QUERY", "ok"] + done["EXECUTE", "ok"],
                done["QUERY", "error"] + done["EXECUTE", "error"] - skipped), (logins, executed, failed, skipped, done)
            assert by_server == truth
            run.check(since, until, server="postgres", port=pg.port, protocol="postgres", clients=clients,
                      truth_of=lambda: by_server, weigh=False)
            # Exact, not only within the tolerance the other servers' checks allow: what the server
            # counted (and the statements it skipped), what the clients did.
            assert run.counted(since, until, "postgres", pg.port) == by_server, (by_server, done)
            prom = prometheus_counts(run.metrics_port, "postgres", "postgres", clients)
            assert (prom[0] - run.prom_before[0], prom[1] - run.prom_before[1]) == by_server, (by_server, done)
            # Each error once, of the method it was: a statement the server skipped too, whether it
            # read it before or after it wrote the error, decoded from the stream or from the
            # kernel's heads (the connection sampled out).
            kept = run.errors_kept(since, "postgres", pg.port)
            assert collections.Counter(x["method"] for x in kept) == {
                method: n for (method, outcome), n in done.items() if outcome == "error"}
            assert sum(bool(x["attributes"].get("aborted")) for x in kept) == skipped
            assert all(x["latency_ns"] is not None and x["latency_ns"] >= 0 for x in kept), kept
            run.check_weights(since, until, pg.port, by_server[0])
    finally:
        run.stop()
