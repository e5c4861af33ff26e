"""The built-in plugin: registered through the same manager as third-party ones."""

from __future__ import annotations

from deetune.hookspecs import hookimpl


@hookimpl
def deetune_register_probes(register):
    from deetune.probes.payload import PayloadProbe
    from deetune.probes.process import ProcessProbe
    from deetune.probes.tcp import TcpProbe
    from deetune.probes.tls import TlsProbe

    register(ProcessProbe)
    register(TcpProbe)
    register(PayloadProbe)
    register(TlsProbe)


@hookimpl
def deetune_register_sinks(register):
    from deetune.sinks.console import ConsoleSink
    from deetune.sinks.jsonl import JsonlSink
    from deetune.topology.store import StoreSink

    register(ConsoleSink)
    register(JsonlSink)
    register(StoreSink)
    # Imported when used: their libraries (OpenTelemetry's SDK and protobuf, the
    # Prometheus client) take about 8 MB of the agent's memory.
    register("deetune.sinks.otlp:OtlpSink", name="otlp")
    register("deetune.sinks.prometheus:PrometheusSink", name="prometheus")


@hookimpl
def deetune_register_decoders(register):
    from deetune.decoders.http import HttpDecoder
    from deetune.decoders.http2 import Http2Decoder
    from deetune.decoders.mysql import MysqlDecoder
    from deetune.decoders.redis import RedisDecoder

    register(HttpDecoder)
    register(Http2Decoder)
    register(RedisDecoder)
    register(MysqlDecoder)
    # Imported when used (an agent run with --protocol pays only for the decoders it names).
    for name, target in (
        ("postgres", "deetune.decoders.postgres:PostgresDecoder"),
        ("dns", "deetune.decoders.dns:DnsDecoder"),
        ("kafka", "deetune.decoders.kafka:KafkaDecoder"),
        ("amqp", "deetune.decoders.amqp:AmqpDecoder"),
        ("memcached", "deetune.decoders.memcached:MemcachedDecoder"),
        ("mqtt", "deetune.decoders.mqtt:MqttDecoder"),
    ):
        register(target, name=name)


@hookimpl(wrapper=True)
def deetune_resolve_service(process):
    """The built-in service resolvers, chained in one implementation: the
    environment (OTEL_SERVICE_NAME, DEETUNE_SERVICE), the container, the
    systemd unit, the executable or script (deetune.services.BuiltinResolvers).

    One function, because pluggy takes one implementation of a hook per
    plugin and the four must be asked in this order.  A *wrapper* rather than
    ``trylast``: it answers only when every other implementation returned None,
    whatever their ``tryfirst``/``trylast`` marks.  (pluggy calls a
    ``trylast`` implementation registered later *after* an earlier one, so a
    plain ``trylast`` built-in, which always answers, would hide a third-party
    resolver marked ``trylast``.)  Third-party wrappers still wrap this one and
    may rewrite its answer."""
    answer = yield
    if answer is not None:
        return answer
    from deetune.services import BUILTIN

    return BUILTIN.resolve(process)
