"""The plugin module named by the ``deetune`` entry point in pyproject.toml.

deetune's plugin manager calls each hook once, when it is built; ``register``
adds a class to the probe, decoder or sink registry under its ``name`` (a decoder's:
its ``protocol``).  Every agent on a
host with this package installed runs these hooks, so they import nothing heavy:
the probe's module parses ``signals.h`` with cffi (pycparser, about 5 MB), so it is
registered by name and imported only by an agent that uses it.
"""

from __future__ import annotations

from deetune.hookspecs import hookimpl


@hookimpl
def deetune_register_probes(register):
    register("deetune_signals.probe:SignalsProbe", name="signals")


@hookimpl
def deetune_register_decoders(register):
    # By name too: imported by an agent that decodes it (every agent does, unless --protocol).
    register("deetune_signals.beanstalk:BeanstalkDecoder", name="beanstalk")


@hookimpl
def deetune_register_sinks(register):
    from deetune_signals.csv_sink import CsvSink

    register(CsvSink)
