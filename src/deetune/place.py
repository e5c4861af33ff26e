"""Where an agent runs: its host name and labels (``--host-name``, ``--label idc=bj1``).

Every exporter of the agent carries them: Prometheus series get them as labels, OTLP
resources as attributes, the topology's instances as their ``host``.  The fleet server
(:mod:`deetune.server`) groups hosts by them (IDCs, zones) and flags edges that cross them.

From the command line or, for each one not given there, the environment::

    DEETUNE_HOST_NAME=web-3 DEETUNE_LABELS="idc=bj1,zone=a" python -m deetune.agent …

Labels are bounded: at most :data:`MAX_LABELS`, Prometheus label names (not a name a deetune
family already uses, nor ``host``), values of at most :data:`MAX_VALUE` characters.  They are
constant for one agent, so they add no series: every series of the agent carries the same ones.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Mapping

import attrs

MAX_LABELS = 8
MAX_VALUE = 128
MAX_HOST = 253
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
#: Label names deetune's families and Prometheus already use: a place label may not take them.
RESERVED = frozenset({
    "host", "instance", "job", "le", "quantile", "client", "server", "protocol", "method", "status", "service",
    "service_instance", "container", "family", "probe", "mode", "state", "address", "port", "version", "api_port",
})


class PlaceError(ValueError):
    """A bad host name or label (one-line message)."""


@attrs.frozen
class Place:
    """A host name and its labels, in the order given."""

    host: str
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)

    @classmethod
    def build(cls, host: str | None = None, labels: Iterable[str] = (), *,
              environ: Mapping[str, str] | None = None) -> "Place":
        """From ``--host-name`` and ``--label K=V`` (repeatable), completed from
        ``$DEETUNE_HOST_NAME`` and ``$DEETUNE_LABELS`` (``k=v,k=v``): a label given on the
        command line replaces the environment's of the same name."""
        env = os.environ if environ is None else environ
        host = host if host is not None else env.get("DEETUNE_HOST_NAME") or socket.gethostname()
        host = host.strip()
        if not host or len(host) > MAX_HOST or not host.isprintable() or any(c.isspace() for c in host):
            raise PlaceError(f"host name must be 1 to {MAX_HOST} printable characters without spaces, got {host!r}")
        merged: dict[str, str] = {}
        from_env = [item for item in env.get("DEETUNE_LABELS", "").split(",") if item.strip()]
        for source, items in (("DEETUNE_LABELS", from_env), ("--label", list(labels))):
            given: dict[str, str] = {}
            for item in items:
                key, value = parse_label(item, source)
                if key in given:
                    raise PlaceError(f"{source}: label {key!r} given twice")
                given[key] = value
            merged.update(given)
        if len(merged) > MAX_LABELS:
            raise PlaceError(f"at most {MAX_LABELS} labels, got {len(merged)}: {', '.join(merged)}")
        return cls(host, tuple(merged.items()))


def parse_label(text: str, source: str = "--label") -> tuple[str, str]:
    """``"idc=bj1"`` → ``("idc", "bj1")``, or a :class:`PlaceError` saying what is wrong."""
    key, sep, value = text.strip().partition("=")
    if not sep:
        raise PlaceError(f"{source}: expected NAME=VALUE, got {text!r}")
    if not _NAME.match(key) or key.startswith("__"):
        raise PlaceError(f"{source}: label name must match [a-zA-Z_][a-zA-Z0-9_]* (not __…), got {key!r}")
    if key in RESERVED:
        raise PlaceError(f"{source}: label name {key!r} is taken (reserved: {', '.join(sorted(RESERVED))})")
    if not value or len(value) > MAX_VALUE or not value.isprintable():
        raise PlaceError(f"{source}: label {key!r} needs a value of 1 to {MAX_VALUE} printable characters")
    return key, value
