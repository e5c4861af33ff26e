"""The built-in plugin: registered through the same manager as third-party ones."""

from __future__ import annotations

from deetune.hookspecs import hookimpl


@hookimpl
def deetune_register_probes(register):
    from deetune.probes.payload import PayloadProbe
    from deetune.probes.process import ProcessProbe
    from deetune.probes.tcp import TcpProbe

    register(ProcessProbe)
    register(TcpProbe)
    register(PayloadProbe)


@hookimpl
def deetune_register_sinks(register):
    from deetune.sinks.console import ConsoleSink
    from deetune.sinks.jsonl import JsonlSink

    register(ConsoleSink)
    register(JsonlSink)


@hookimpl
def deetune_register_decoders(register):
    from deetune.decoders.http import HttpDecoder
    from deetune.decoders.mysql import MysqlDecoder
    from deetune.decoders.redis import RedisDecoder

    register(HttpDecoder)
    register(RedisDecoder)
    register(MysqlDecoder)
