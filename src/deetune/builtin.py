"""The built-in plugin: registered through the same manager as third-party ones."""

from __future__ import annotations

from deetune.hookspecs import hookimpl


@hookimpl
def deetune_register_probes(register):
    from deetune.probes.process import ProcessProbe
    from deetune.probes.tcp import TcpProbe

    register(ProcessProbe)
    register(TcpProbe)


@hookimpl
def deetune_register_sinks(register):
    from deetune.sinks.console import ConsoleSink
    from deetune.sinks.jsonl import JsonlSink

    register(ConsoleSink)
    register(JsonlSink)


@hookimpl
def deetune_register_decoders(register):
    import importlib

    # Decoders land one by one; each module is optional until it exists.
    for module, cls in (("http", "HttpDecoder"), ("redis", "RedisDecoder"), ("mysql", "MysqlDecoder")):
        try:
            mod = importlib.import_module(f"deetune.decoders.{module}")
        except ModuleNotFoundError:
            continue
        register(getattr(mod, cls))
