"""The record layout shared with signals.bpf.c, read from ``signals.h``.

As in :mod:`deetune.records`, the header is the only definition of the
layout: cffi parses it (less its preprocessor lines) and the record gets a
:class:`struct.Struct` built from cffi's offsets, so decoding a record is one
``unpack_from`` call.  Our FFI *includes* deetune's, so ``struct dt_header``,
the ``__u32``-style typedefs and deetune's enum constants (``DT_COMM_LEN``)
come from deetune's ``deetune.h`` exactly as the BPF side sees them.

``deetune.records.record_struct`` only knows deetune's own FFI, so the few
lines that turn a cffi struct into a ``struct.Struct`` are repeated here for
our FFI.
"""

from __future__ import annotations

import pathlib
import struct

import cffi

from deetune import records as dt_records

PACKAGE_BPF = pathlib.Path(__file__).resolve().parent / "_bpf"
#: examples/deetune-signals/bpf in a source checkout (editable install before `make examples`).
SOURCE_BPF = pathlib.Path(__file__).resolve().parents[2] / "bpf"


def header_path() -> pathlib.Path:
    """``signals.h``: package data when built, else the source tree's."""
    packaged = PACKAGE_BPF / "signals.h"
    return packaged if packaged.exists() else SOURCE_BPF / "signals.h"


def _cdef_source(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


ffi = cffi.FFI()
ffi.include(dt_records.ffi)
ffi.cdef(_cdef_source(header_path().read_text()))
lib = ffi.dlopen(None)  # only for the enum constants

_SCALAR_FORMATS = {
    "unsigned char": "B",
    "unsigned short": "H",
    "unsigned int": "I",
    "int": "i",
    "unsigned long long": "Q",
    "long long": "q",
}


def record_struct(ctype_name: str) -> tuple[struct.Struct, tuple[str, ...]]:
    """A little-endian ``struct.Struct`` for the whole record and its field
    names, nested structs flattened (``hdr_pid``), char arrays as bytes."""
    fmt = ["<"]
    names: list[str] = []
    position = 0

    def walk(ctype, prefix: str, base: int) -> None:
        nonlocal position
        for name, field in ctype.fields:
            ftype, offset = field.type, base + field.offset
            if ftype.kind == "struct":
                walk(ftype, f"{prefix}{name}_", offset)
                continue
            if ftype.kind == "array":
                code = f"{ffi.sizeof(ftype)}s"
            elif ftype.kind == "enum":
                code = "I"
            elif ftype.kind == "primitive" and ftype.cname in _SCALAR_FORMATS:
                code = _SCALAR_FORMATS[ftype.cname]
            else:
                raise TypeError(f"{ctype_name}.{prefix}{name}: unsupported field type {ftype.cname}")
            if offset > position:
                fmt.append(f"{offset - position}x")
            fmt.append(code)
            names.append(f"{prefix}{name}")
            position = offset + struct.calcsize("<" + code)

    walk(ffi.typeof(ctype_name), "", 0)
    size = ffi.sizeof(ctype_name)
    if size > position:
        fmt.append(f"{size - position}x")
    return struct.Struct("".join(fmt)), tuple(names)


SIGNAL_RECORD, SIGNAL_FIELDS = record_struct("struct dt_signal_record")

#: enum dt_signal_result → the word used in events.
RESULTS = {
    lib.DT_SIGNAL_DELIVERED: "delivered",
    lib.DT_SIGNAL_IGNORED: "ignored",
    lib.DT_SIGNAL_ALREADY_PENDING: "already_pending",
    lib.DT_SIGNAL_OVERFLOW_FAIL: "overflow_fail",
    lib.DT_SIGNAL_LOSE_INFO: "lose_info",
}

cstr = dt_records.cstr
