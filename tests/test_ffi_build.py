"""The checked-in cffi modules are what deetune._ffi_build generates from today's sources."""

from __future__ import annotations

import ast
import subprocess
import sys

from deetune import _ffi_build, libbpf, records


def declarations(source: str) -> dict:
    """The arguments of the generated module's ``_cffi_backend.FFI(...)`` call: what it declares,
    whatever layout another cffi version gives the file."""
    call = next(node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call))
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords} | {"module": ast.literal_eval(call.args[0])}


def test_generated_modules_are_up_to_date():
    for name, text in _ffi_build.sources().items():
        checked_in = (_ffi_build.PACKAGE / name).read_text()
        assert declarations(checked_in) == declarations(text), f"src/deetune/{name} is out of date: run make ffi"


def test_a_changed_declaration_is_told_apart():
    changed = _ffi_build.generate("_ffi_libbpf", _ffi_build.LIBBPF_CDEF + "int bpf_extra_call(int fd);")
    assert declarations(changed) != declarations((_ffi_build.PACKAGE / "_ffi_libbpf.py").read_text())


def test_the_agent_imports_no_c_parser():
    # The point of building ahead of time: pycparser (about 5 MB) is not loaded at run time.
    code = "import sys, deetune.agent, deetune.probes.tcp; print(sorted(m for m in sys.modules if 'pycparser' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_prebuilt_layouts_match_a_runtime_parse():
    parsed = records.load_header(records.header_path())
    for name in ("struct dt_header", "struct dt_process_record", "struct dt_conn_record", "struct dt_data_record",
                 "struct dt_payload_controls"):
        assert records.ffi.sizeof(name) == parsed.sizeof(name)
        assert [(f, t.offset) for f, t in records.ffi.typeof(name).fields] == [
            (f, t.offset) for f, t in parsed.typeof(name).fields]
    assert records.lib.DT_SYS_OTHER == parsed.dlopen(None).DT_SYS_OTHER == 12


def test_libbpf_declarations_load_the_library():
    assert libbpf.num_possible_cpus() >= 1
