"""The new protocol decoders on real servers, end to end through the kernel: the payload probe
copies both ends of each connection (client and server run on this host), the L7 handler
decodes them, and every exchange is reported once per side with exact values.

PostgreSQL 15 (psycopg 3: simple and extended queries, a pipeline with an error, COPY),
memcached (pymemcache and raw meta commands), mosquitto (paho-mqtt, MQTT 3.1.1 and 5) and
RabbitMQ (pika).  Each test owns its server's port while it runs, so counts are exact.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from deetune.testing import agent, assert_exchanges, summary
from tests.protocol_servers import (  # noqa: F401  (fixtures)
    PG_PASSWORD,
    memcached_server,
    mosquitto_server,
    postgres_server,
    rabbitmq_server,
)
from tests.servers import need_module

pytestmark = [pytest.mark.bpf, pytest.mark.servers]
FIELDS = ("method", "target", "status", "error")


def sides(run, protocol: str, count: int) -> tuple[list, list]:
    """The client's and the server's exchanges, once both have reported ``count``."""
    run.wait(count, role="client", protocol=protocol)
    run.wait(count, role="server", protocol=protocol)
    return run.exchanges(role="client", protocol=protocol), run.exchanges(role="server", protocol=protocol)


def check_both_sides(client, server, expected, client_pid, server_pid):
    assert_exchanges(client, expected)
    assert_exchanges(server, expected)
    for c, s in zip(client, server):
        assert c.pid == client_pid and s.pid != client_pid
        assert (c.request_bytes, c.response_bytes) == (s.request_bytes, s.response_bytes)
        assert c.latency_ns is None or c.latency_ns >= 0
        assert (c.rport, s.lport) == (s.lport, s.lport)
    if isinstance(server_pid, int):
        assert {s.pid for s in server} == {server_pid}
    elif server_pid is not None:  # a server that forks per connection: its command name
        assert {s.comm for s in server} == {server_pid}


# -- PostgreSQL ----------------------------------------------------------------------------------


def test_postgres_psycopg(postgres_server):
    psycopg = need_module("psycopg", "psycopg[binary]")
    pg = postgres_server
    expected = [
        {"method": "SSL_REQUEST", "target": "", "status": "OK", "error": False},
        {"method": "STARTUP", "target": "deetune_pg", "status": "OK", "error": False},
        {"method": "QUERY", "target": "SELECT n, square FROM numbers WHERE n <= 3", "status": "OK", "error": False},
        {"method": "EXECUTE", "target": "SELECT name FROM numbers WHERE n = $1", "status": "OK", "error": False},
        {"method": "EXECUTE", "target": "SELECT 1", "status": "OK", "error": False},
        {"method": "EXECUTE", "target": "SELECT 1/0", "status": "ERR", "error": True},
        {"method": "EXECUTE", "target": "SELECT 3", "status": "ERR", "error": True},
        {"method": "QUERY", "target": "COPY (SELECT n FROM numbers) TO STDOUT", "status": "OK", "error": False},
        {"method": "QUERY", "target": "SELECT * FROM no_such_table", "status": "ERR", "error": True},
    ]
    with agent([pg.port], protocols=["postgres"]) as run:
        with psycopg.connect(pg.dsn(sslmode="prefer"), autocommit=True) as conn:
            with conn.cursor() as cur:
                cur.execute(b"SELECT n, square FROM numbers WHERE n <= 3", prepare=False)  # bytes: simple protocol
                assert cur.fetchall() == [(1, 1), (2, 4), (3, 9)]
            assert conn.execute("SELECT name FROM numbers WHERE n = %s", (7,)).fetchone() == ("n7",)
            with pytest.raises(psycopg.errors.DivisionByZero):
                with conn.pipeline():
                    conn.execute("SELECT 1")
                    conn.execute("SELECT 1/0")
                    conn.execute("SELECT 3")
            with conn.cursor() as cur:
                with cur.copy("COPY (SELECT n FROM numbers) TO STDOUT") as copy:
                    assert len(list(copy.rows())) == 10
            with pytest.raises(psycopg.errors.UndefinedTable):
                conn.cursor().execute(b"SELECT * FROM no_such_table")
        client, server = sides(run, "postgres", len(expected))
    check_both_sides(client, server, expected, os.getpid(), "postgres")
    login = client[1].attributes
    assert (login["user"], login["database"], login["auth"]) == ("deetune", "deetune_pg", "sasl")
    assert client[0].attributes["encryption"] == "refused"
    assert [x.attributes.get("rows") for x in client[2:4]] == [3, 1]
    assert (client[5].attributes["sqlstate"], client[5].error_message) == ("22012", "division by zero")
    assert client[6].attributes["aborted"] is True
    assert client[7].attributes["rows"] == 10
    assert client[8].attributes["sqlstate"] == "42P01"
    assert all(PG_PASSWORD not in repr(x) for x in client + server)


# -- memcached -----------------------------------------------------------------------------------


def test_memcached_text_and_meta(memcached_server):
    need_module("pymemcache", "pymemcache")
    from pymemcache.client.base import Client

    port = memcached_server.port
    expected = [
        {"method": "SET", "target": "user:1", "status": "OK", "error": False},
        {"method": "GET", "target": "user:1", "status": "OK", "error": False},
        {"method": "GET", "target": "user:1", "status": "OK", "error": False},  # get_many: three keys
        {"method": "INCR", "target": "hits", "status": "OK", "error": False},
        {"method": "DELETE", "target": "user:1", "status": "OK", "error": False},
        {"method": "MS", "target": "m:1", "status": "OK", "error": False},
        {"method": "MG", "target": "m:1", "status": "OK", "error": False},
        {"method": "MG", "target": "m:none", "status": "OK", "error": False},
        {"method": "BOGUS", "target": "", "status": "ERR", "error": True},
    ]
    with agent([port], protocols=["memcached"]) as run:
        client = Client(("127.0.0.1", port), default_noreply=False)
        client.set("user:1", b"x" * 100)
        assert client.get("user:1") == b"x" * 100
        assert client.get_many(["user:1", "user:2", "user:3"]) == {"user:1": b"x" * 100}
        assert client.incr("hits", 1) is None
        assert client.delete("user:1") is True
        client.close()
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"ms m:1 2 T0\r\nhi\r\n")
            assert raw.recv(100) == b"HD\r\n"
            raw.sendall(b"mg m:1 v\r\n")
            assert raw.recv(100) == b"VA 2\r\nhi\r\n"
            raw.sendall(b"mg m:none v\r\n")
            assert raw.recv(100) == b"EN\r\n"
            raw.sendall(b"bogus\r\n")
            assert raw.recv(100) == b"ERROR\r\n"
        client_side, server_side = sides(run, "memcached", len(expected))
    check_both_sides(client_side, server_side, expected, os.getpid(), memcached_server.pid)
    assert [(x.attributes.get("hits"), x.attributes.get("misses")) for x in client_side[1:3]] == [(1, 0), (1, 2)]
    assert [x.attributes["result"] for x in client_side[3:5]] == ["NOT_FOUND", "DELETED"]
    assert client_side[6].response_bytes == len(b"VA 2\r\nhi\r\n")


# -- MQTT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["3.1.1", "5.0"])
def test_mqtt_paho(mosquitto_server, version):
    need_module("paho.mqtt.client", "paho-mqtt")
    import paho.mqtt.client as mqtt

    port = mosquitto_server.port
    protocol = mqtt.MQTTv311 if version == "3.1.1" else mqtt.MQTTv5
    expected = [
        {"method": "CONNECT", "target": f"deetune-{version}", "status": "OK", "error": False},
        {"method": "SUBSCRIBE", "target": "sensors/+", "status": "OK", "error": False},
        {"method": "PUBLISH", "target": "sensors/a", "status": None, "error": False},
        {"method": "PUBLISH", "target": "sensors/b", "status": "OK", "error": False},
        {"method": "PUBLISH", "target": "sensors/c", "status": "OK", "error": False},
        {"method": "PUBREL", "target": "sensors/c", "status": "OK", "error": False},
    ]
    received = []
    with agent([port], protocols=["mqtt"]) as run:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"deetune-{version}", protocol=protocol)
        client.username_pw_set("meter", "mqtt-pw-never-kept")
        client.on_message = lambda c, u, m: received.append(m.topic)
        client.connect("127.0.0.1", port)
        client.loop_start()
        try:
            _, mid = client.subscribe("sensors/+", qos=0)
            deadline = time.monotonic() + 10
            while not run.exchanges(role="client", protocol="mqtt")[1:] and time.monotonic() < deadline:
                time.sleep(0.02)
            for qos, topic in ((0, "sensors/a"), (1, "sensors/b"), (2, "sensors/c")):
                client.publish(topic, b"21.5", qos=qos).wait_for_publish(5)
            deadline = time.monotonic() + 10
            while len(received) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            client.disconnect()
            client.loop_stop()
        run.wait(len(expected) + 3, role="client", protocol="mqtt")
        run.wait(len(expected) + 3, role="server", protocol="mqtt")
    assert sorted(received) == ["sensors/a", "sensors/b", "sensors/c"]
    for role in ("client", "server"):
        got = run.exchanges(role=role, protocol="mqtt")
        pushed = [x for x in got if x.attributes.get("push")]
        assert_exchanges([x for x in got if not x.attributes.get("push")], expected)
        assert sorted(x.target for x in pushed) == ["sensors/a", "sensors/b", "sensors/c"]
        connect = got[0].attributes
        assert (connect["version"], connect["username"]) == (version, "meter")
        assert "mqtt-pw-never-kept" not in repr(got)


# -- RabbitMQ ------------------------------------------------------------------------------------


def test_rabbitmq_pika(rabbitmq_server):
    pika = need_module("pika", "pika")
    port = rabbitmq_server.port
    expected = [
        {"method": "connection.start-ok", "target": "", "status": "OK", "error": False},
        {"method": "connection.open", "target": "/", "status": "OK", "error": False},
        {"method": "channel.open", "target": "", "status": "OK", "error": False},
        {"method": "queue.declare", "target": "deetune-jobs", "status": "OK", "error": False},
        {"method": "basic.publish", "target": "deetune-jobs", "status": None, "error": False},
        {"method": "confirm.select", "target": "", "status": "OK", "error": False},
        {"method": "basic.publish", "target": "deetune-jobs", "status": "OK", "error": False},
        {"method": "basic.get", "target": "deetune-jobs", "status": "OK", "error": False},
        {"method": "basic.ack", "target": "", "status": None, "error": False},
        {"method": "basic.get", "target": "deetune-jobs", "status": "OK", "error": False},
        {"method": "basic.get", "target": "deetune-jobs", "status": "OK", "error": False},
        {"method": "queue.declare", "target": "deetune-missing", "status": "ERR", "error": True},
        {"method": "connection.close", "target": "", "status": "OK", "error": False},
    ]
    with agent([port], protocols=["amqp"]) as run:
        params = pika.ConnectionParameters("127.0.0.1", port, credentials=pika.PlainCredentials("guest", "guest"))
        conn = pika.BlockingConnection(params)
        channel = conn.channel()
        channel.queue_declare("deetune-jobs")
        channel.basic_publish("", "deetune-jobs", b"job-1" * 20)
        channel.confirm_delivery()
        channel.basic_publish("", "deetune-jobs", b"job-2")
        method, _, body = channel.basic_get("deetune-jobs")
        assert body == b"job-1" * 20
        channel.basic_ack(method.delivery_tag)
        assert channel.basic_get("deetune-jobs", auto_ack=True)[2] == b"job-2"
        assert channel.basic_get("deetune-jobs")[0] is None
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            channel.queue_declare("deetune-missing", passive=True)
        conn.close()
        client, server = sides(run, "amqp", len(expected))
    check_both_sides(client, server, expected, os.getpid(), None)
    assert client[0].attributes["user"] == "guest"
    assert [x.attributes.get("body_size") for x in client[4:8]] == [100, None, 5, 100]
    assert client[10].attributes["empty"] is True
    assert (client[11].attributes["reply_code"], client[11].error_message) == (
        404, "NOT_FOUND - no queue 'deetune-missing' in vhost '/'")
    assert summary(client, ("attributes.channel",))[3] == {"attributes.channel": 1}
