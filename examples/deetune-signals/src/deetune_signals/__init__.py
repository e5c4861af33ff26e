"""deetune-signals: an example deetune plugin (a signals probe and a CSV sink).

deetune loads it through the ``deetune`` entry-point group
(:mod:`deetune_signals.plugin`); the classes can also be used directly::

    from deetune.pipeline import Pipeline
    from deetune_signals import CsvSink, SignalsOptions, SignalsProbe

    Pipeline([SignalsProbe(SignalsOptions(sig="SIGTERM"))], [CsvSink.from_arg("/tmp/s.csv")]).run(10)
"""

from deetune_signals.csv_sink import CsvSink, read_csv_events
from deetune_signals.events import SignalEvent
from deetune_signals.probe import SignalsOptions, SignalsProbe

__all__ = ["CsvSink", "SignalEvent", "SignalsOptions", "SignalsProbe", "read_csv_events"]
