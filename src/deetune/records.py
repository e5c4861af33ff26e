"""Record layouts shared with the BPF programs, read from ``deetune.h``.

The header is the only definition of the layouts: cffi parses it (less its
preprocessor lines; ahead of time, into :mod:`deetune._ffi_records`), and each
record gets a :class:`struct.Struct` built from cffi's offsets, so decoding a
record is one ``unpack_from`` call.
"""

from __future__ import annotations

import pathlib
import struct
from typing import TYPE_CHECKING, Any, NamedTuple

from deetune import resources
from deetune._ffi_records import ffi

if TYPE_CHECKING:
    import cffi


def header_path() -> pathlib.Path:
    return resources.bpf_dir() / "deetune.h"


def load_header(path: pathlib.Path, *, include: Any = None) -> "cffi.FFI":
    """An FFI holding the record layouts of a BPF header (same rules as
    ``deetune.h``), parsed now (this imports pycparser: a few MB).  A plugin passes
    ``include=deetune.records.ffi`` to get ``struct dt_header``, the fixed-width
    typedefs and deetune's enum constants as ``deetune.h`` declares them; another
    ``cffi.FFI`` is included as cffi's ``FFI.include`` does."""
    import cffi

    from deetune._ffi_build import header_cdef, headers_cdef

    new = cffi.FFI()
    if include is ffi:
        # deetune's own FFI is built ahead of time and cannot be included: parse its header too.
        new.cdef(headers_cdef(header_path().read_text(), path.read_text()))
    elif include is not None:
        new.include(include)
        new.cdef(header_cdef(path.read_text()))
    else:
        new.cdef(headers_cdef(path.read_text()))
    return new


lib = ffi.dlopen(None)  # only for the enum constants

_SCALAR_FORMATS = {
    "unsigned char": "B",
    "unsigned short": "H",
    "unsigned int": "I",
    "int": "i",
    "unsigned long long": "Q",
    "long long": "q",
}


class FieldLayout(NamedTuple):
    name: str
    offset: int
    fmt: str  # struct format of the field, e.g. "I" or "16s"


def flat_fields(ctype_name: str, ffi: Any = ffi) -> list[FieldLayout]:
    """Fields of a record, nested structs flattened with ``outer_inner`` names."""

    def walk(ctype, prefix: str, base: int) -> list[FieldLayout]:
        out = []
        for name, field in ctype.fields:
            ftype = field.type
            full = f"{prefix}{name}"
            offset = base + field.offset
            if ftype.kind == "struct":
                out.extend(walk(ftype, f"{full}_", offset))
            elif ftype.kind == "array":
                out.append(FieldLayout(full, offset, f"{ffi.sizeof(ftype)}s"))
            elif ftype.kind == "primitive" and ftype.cname in _SCALAR_FORMATS:
                out.append(FieldLayout(full, offset, _SCALAR_FORMATS[ftype.cname]))
            elif ftype.kind == "enum":
                out.append(FieldLayout(full, offset, "I"))
            else:
                raise TypeError(f"{ctype_name}.{full}: unsupported field type {ftype.cname}")
        return out

    return walk(ffi.typeof(ctype_name), "", 0)


def record_struct(
    ctype_name: str, *, upto: str | None = None, ffi: Any = ffi
) -> tuple[struct.Struct, tuple[str, ...]]:
    """A little-endian ``struct.Struct`` for the record (optionally only the fields
    before ``upto``), and the field names in unpack order."""
    fmt = ["<"]
    names = []
    position = 0
    for field in flat_fields(ctype_name, ffi):
        if field.name == upto:
            break
        if field.offset > position:
            fmt.append(f"{field.offset - position}x")
        fmt.append(field.fmt)
        names.append(field.name)
        position = field.offset + struct.calcsize("<" + field.fmt)
    if upto is None:
        size = ffi.sizeof(ctype_name)
        if size > position:
            fmt.append(f"{size - position}x")
    return struct.Struct("".join(fmt)), tuple(names)


def cstr(raw: bytes) -> str:
    """A NUL-terminated C char array as text."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


_COMMS: dict[bytes, str] = {}


def comm(raw: bytes) -> str:
    """A task's comm (16 bytes, NUL-padded) as text; cached, since a host runs few distinct
    ones and every record carries one."""
    text = _COMMS.get(raw)
    if text is None:
        if len(_COMMS) >= 4096:
            _COMMS.clear()
        text = _COMMS[raw] = cstr(raw)
    return text
