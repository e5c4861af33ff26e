"""``python -m deetune.record``: recording tasks from the command line (see :mod:`deetune.recording.cli`)."""

from deetune.recording.cli import main

__all__ = ["main"]
