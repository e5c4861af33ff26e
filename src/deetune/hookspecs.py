"""The hooks a deetune plugin can implement.

A plugin is a module or object with functions decorated by
:data:`hookimpl`; it is found through the ``deetune`` entry-point group (or
registered by hand with ``PluginManager.register``).  Built-in probes,
decoders and sinks are registered the same way (:mod:`deetune.builtin`).
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "deetune"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def deetune_register_probes(register: Callable[..., None]) -> None:
    """Called once when the plugin manager is built.  Call ``register(ProbeClass)``
    for every :class:`deetune.probes.Probe` subclass the plugin offers."""


@hookspec
def deetune_register_decoders(register: Callable[..., None]) -> None:
    """Called once when the plugin manager is built.  Call ``register(DecoderClass)``
    for every :class:`deetune.decoders.Decoder` subclass the plugin offers."""


@hookspec
def deetune_register_sinks(register: Callable[..., None]) -> None:
    """Called once when the plugin manager is built.  Call ``register(SinkClass)``
    for every :class:`deetune.sinks.Sink` subclass the plugin offers.

    Any of the three ``register`` calls also takes ``register("module:Class",
    name="NAME")``: the module is imported only when NAME is used, for a plugin
    whose dependencies are heavy (docs/plugins.md)."""


@hookspec(firstresult=True)
def deetune_resolve_service(process: Any) -> str | None:
    """Name the service a process (a :class:`deetune.services.ProcessInfo`)
    belongs to, or return None to let the next resolver try.  The first
    non-None answer wins.  The built-in resolvers (environment, container,
    systemd unit, executable) are a hook wrapper that answers only when every
    other resolver returned None, so a third-party resolver always comes first
    (see docs/services.md)."""
