"""Replay recorded exchanges against a target and compare the responses: ``python -m deetune.replay``.

The input is recorded exchanges (:class:`deetune.recording.model.RecordedExchange`,
one JSON object a line), from a file or from the agent's API.  Each request is
re-sent as it was recorded (HTTP, Redis) or re-issued on a connection replay
logs in itself (MySQL / MariaDB), and the response is compared with the recorded
one under noise rules (:mod:`deetune.replay.compare`).  See docs/replay.md.
"""

from deetune.replay.compare import Diff, JsonPath, Rules
from deetune.replay.runner import Outcome

__all__ = ["Diff", "JsonPath", "Outcome", "Rules"]
