"""Sink: where events end up."""

from __future__ import annotations

from typing import ClassVar

from deetune.events import Event


class SinkError(ValueError):
    """A sink could not be set up from its spec (one-line message)."""


class Sink:
    """Base class of sinks.

    ``--sink NAME[:ARG]`` on the command line builds ``SinkClass.from_arg(ARG)``
    (ARG is None when absent).  :meth:`handle` runs on the pipeline's thread for
    every event, so it must be quick; slow sinks queue and work elsewhere.
    """

    #: Name on the command line.
    name: ClassVar[str] = ""
    #: One-line description for ``deetune.agent plugins``.
    description: ClassVar[str] = ""

    @classmethod
    def from_arg(cls, arg: str | None) -> "Sink":
        if arg:
            raise SinkError(f"sink {cls.name} takes no argument (got {arg!r})")
        return cls()

    def handle(self, event: Event) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything handled so far durable/visible."""

    def close(self) -> None:
        """Flush and release resources; called once at pipeline stop."""
        self.flush()


def parse_sink_spec(spec: str) -> tuple[str, str | None]:
    """``"jsonl:/tmp/x.jsonl"`` → ``("jsonl", "/tmp/x.jsonl")``; ``"console"`` → ``("console", None)``."""
    name, sep, arg = spec.partition(":")
    return name, (arg if sep else None)
