"""deetune-signals: an example deetune plugin (a signals probe, a CSV sink and a beanstalkd decoder).

deetune loads it through the ``deetune`` entry-point group
(:mod:`deetune_signals.plugin`); the classes can also be used directly::

    from deetune.pipeline import Pipeline
    from deetune_signals import CsvSink, SignalsOptions, SignalsProbe

    Pipeline([SignalsProbe(SignalsOptions(sig="SIGTERM"))], [CsvSink.from_arg("/tmp/s.csv")]).run(10)
"""

import importlib

_EXPORTS = {
    "BeanstalkDecoder": "deetune_signals.beanstalk",
    "CsvSink": "deetune_signals.csv_sink",
    "read_csv_events": "deetune_signals.csv_sink",
    "SignalEvent": "deetune_signals.events",
    "SignalsOptions": "deetune_signals.probe",
    "SignalsProbe": "deetune_signals.probe",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Imported on first use: deetune imports this package (for deetune_signals.plugin)
    # in every agent, and the probe's module parses a C header (pycparser, ~5 MB).
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deetune_signals' has no attribute {name!r}")
