"""The plugin registry: classes and lazily imported "module:Class" entries."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from deetune.plugins import PluginImportError, Registry, UnknownPluginError


@pytest.fixture
def lazy_module(tmp_path, monkeypatch):
    """A module ``lazy_sink_mod`` on sys.path that counts its imports in ``imports.txt``."""
    (tmp_path / "lazy_sink_mod.py").write_text(textwrap.dedent(f"""
        with open({str(tmp_path / "imports.txt")!r}, "a") as f:
            f.write("imported\\n")

        class LazySink:
            name = "lazy"

        class Misnamed:
            name = "other"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "imports.txt"
    sys.modules.pop("lazy_sink_mod", None)


def test_a_lazy_entry_is_imported_when_first_asked_for(lazy_module):
    registry = Registry("sink")
    registry.register("lazy_sink_mod:LazySink", "someplugin", name="lazy")
    assert registry.names() == ["lazy"] and "lazy" in registry
    assert registry.origin("lazy") == "someplugin"
    assert not lazy_module.exists()
    cls = registry.get("lazy")
    assert cls.__name__ == "LazySink" and registry.get("lazy") is cls
    assert lazy_module.read_text() == "imported\n"


def test_a_lazy_entry_whose_class_has_another_name_is_an_error(lazy_module):
    registry = Registry("sink")
    registry.register("lazy_sink_mod:Misnamed", name="lazy")
    with pytest.raises(TypeError, match=r"sink 'lazy' \(lazy_sink_mod:Misnamed\) is named 'other'"):
        registry.get("lazy")


def test_lazy_entries_need_a_name_and_collide_like_classes():
    registry = Registry("probe")
    with pytest.raises(TypeError, match="a lazy plugin is 'module:Class' with name="):
        registry.register("some.module:Probe")
    with pytest.raises(TypeError, match="a lazy plugin is 'module:Class' with name="):
        registry.register("no_colon", name="x")
    registry.register("a.mod:P", "first", name="p")
    registry.register("a.mod:P", "first", name="p")  # the same entry again is no error
    with pytest.raises(ValueError, match="probe 'p' registered twice: by first and by b.mod"):
        registry.register("b.mod:P", name="p")
    with pytest.raises(UnknownPluginError, match="unknown probe 'q'; available: p"):
        registry.get("q")


def test_the_agent_imports_no_sink_it_does_not_use():
    # OpenTelemetry's SDK, protobuf and the Prometheus client cost an agent about 8 MB.
    code = textwrap.dedent("""
        import sys
        from deetune.agent import build_parser, check_names
        from deetune.plugins import Plugins
        plugins = Plugins()
        check_names(build_parser().parse_args(["--sink", "jsonl:-", "--sink", "console"]), plugins)
        heavy = ("opentelemetry", "google", "prometheus_client", "pycparser", "_hashlib", "http.server")
        print(sorted(m for m in sys.modules if m.startswith(heavy)))
        plugins.sinks.get("prometheus")
        print("prometheus_client" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "True"], out.stderr


def test_a_lazy_entry_that_cannot_be_imported_is_a_one_line_error(lazy_module):
    registry = Registry("sink")
    registry.register("no_such_module_here:Sink", name="gone")
    registry.register("lazy_sink_mod:NoSuchClass", name="typo")
    with pytest.raises(PluginImportError, match=r"^sink 'gone' \(no_such_module_here:Sink\) cannot be imported: "
                                                r"No module named 'no_such_module_here'$"):
        registry.get("gone")
    with pytest.raises(PluginImportError, match=r"^sink 'typo' \(lazy_sink_mod:NoSuchClass\) cannot be imported: "):
        registry.get("typo")
    assert issubclass(PluginImportError, UnknownPluginError)  # the agent reports it in one line, exit code 2
