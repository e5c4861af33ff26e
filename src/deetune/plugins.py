"""The plugin manager: built-ins and entry-point plugins in one registry."""

from __future__ import annotations

import importlib
import logging
from typing import Generic, Iterable, TypeVar

import pluggy

from deetune import hookspecs

log = logging.getLogger("deetune.plugins")

T = TypeVar("T")


class UnknownPluginError(LookupError):
    """A probe, decoder or sink name that no plugin registered."""


class PluginImportError(UnknownPluginError):
    """A plugin registered by name whose module cannot be imported (a missing dependency)."""


class Registry(Generic[T]):
    """Name → class for one kind of plugin (probes, decoders or sinks).

    A plugin may register a class, or ``"module:Class"`` with its name: the module
    is imported when that name is first asked for, so a sink with heavy
    dependencies (OpenTelemetry's SDK and protobuf) costs nothing to an agent
    that does not use it."""

    def __init__(self, kind: str):
        self.kind = kind
        self._classes: dict[str, type | str] = {}
        self._origins: dict[str, str] = {}

    def register(self, cls: type | str, origin: str = "", *, name: str | None = None) -> None:
        if isinstance(cls, str):
            if not name or ":" not in cls:
                raise TypeError(f"{self.kind} plugin {cls!r}: a lazy plugin is 'module:Class' with name=")
        else:
            name = _name_of(cls)
        if not name:
            raise TypeError(f"{self.kind} plugin {cls!r} has no name")
        if name in self._classes and self._classes[name] != cls:
            raise ValueError(
                f"{self.kind} {name!r} registered twice: by {self._origins[name]} and by {origin or _module_of(cls)}"
            )
        self._classes[name] = cls
        self._origins[name] = origin or _module_of(cls)

    def get(self, name: str) -> type:
        try:
            cls = self._classes[name]
        except KeyError:
            known = ", ".join(sorted(self._classes)) or "none"
            raise UnknownPluginError(f"unknown {self.kind} {name!r}; available: {known}") from None
        if isinstance(cls, str):
            cls = self._classes[name] = self._load(name, cls)
        return cls

    def _load(self, name: str, target: str) -> type:
        module, _, attr = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise PluginImportError(f"{self.kind} {name!r} ({target}) cannot be imported: {exc}") from exc
        loaded_name = _name_of(cls)
        if loaded_name != name:
            raise TypeError(f"{self.kind} {name!r} ({target}) is named {loaded_name!r}")
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def classes(self) -> list[type]:
        return [self.get(n) for n in self.names()]

    def origin(self, name: str) -> str:
        return self._origins[name]

    def __contains__(self, name: str) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterable[str]:
        return iter(self.names())


class Plugins:
    """The pluggy manager plus the registries its plugins filled."""

    def __init__(self, *, load_entry_points: bool = True, extra: Iterable[object] = ()):
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        from deetune import builtin

        self.manager.register(builtin, name="deetune.builtin")
        for plugin in extra:
            self.manager.register(plugin)
        if load_entry_points:
            self.manager.load_setuptools_entrypoints(hookspecs.PROJECT)
        # A misspelled hook implementation would otherwise be ignored silently.
        self.manager.check_pending()
        self.probes: Registry = Registry("probe")
        self.decoders: Registry = Registry("decoder")
        self.sinks: Registry = Registry("sink")
        self._collect()

    def _collect(self) -> None:
        hook = self.manager.hook
        for registry, caller in (
            (self.probes, hook.deetune_register_probes),
            (self.decoders, hook.deetune_register_decoders),
            (self.sinks, hook.deetune_register_sinks),
        ):
            for impl in caller.get_hookimpls():
                origin = self.manager.get_name(impl.plugin) or repr(impl.plugin)
                impl.function(register=lambda cls, o=origin, r=registry, **kw: r.register(cls, o, **kw))

    def resolve_service(self, process: object) -> str | None:
        return self.manager.hook.deetune_resolve_service(process=process)

    def plugin_names(self) -> list[str]:
        return sorted(name for name, _ in self.manager.list_name_plugin())


def _name_of(cls: type) -> str | None:
    """The name a plugin class is registered under (decoders: their ``protocol``)."""
    return getattr(cls, "name", None) or getattr(cls, "protocol", None)


def _module_of(cls: type | str) -> str:
    return cls.partition(":")[0] if isinstance(cls, str) else cls.__module__


_default: Plugins | None = None


def default_plugins() -> Plugins:
    """The process-wide manager with built-ins and installed plugins, built once."""
    global _default
    if _default is None:
        _default = Plugins()
    return _default
