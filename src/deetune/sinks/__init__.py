"""Sinks: jsonl, console, and what plugins add."""

from deetune.sinks.base import Sink, SinkError, parse_sink_spec

__all__ = ["Sink", "SinkError", "parse_sink_spec"]
