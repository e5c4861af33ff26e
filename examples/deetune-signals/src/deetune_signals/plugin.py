"""The plugin module named by the ``deetune`` entry point in pyproject.toml.

deetune's plugin manager calls each hook once, when it is built; ``register``
adds a class to the probe (or sink) registry under its ``name``.  Imports are
inside the hooks so that listing plugins stays cheap.
"""

from __future__ import annotations

from deetune.hookspecs import hookimpl


@hookimpl
def deetune_register_probes(register):
    from deetune_signals.probe import SignalsProbe

    register(SignalsProbe)


@hookimpl
def deetune_register_sinks(register):
    from deetune_signals.csv_sink import CsvSink

    register(CsvSink)
