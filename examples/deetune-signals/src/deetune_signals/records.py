"""The record layout shared with signals.bpf.c, read from ``signals.h``.

As in :mod:`deetune.records`, the header is the only definition of the
layout: cffi parses it (less its preprocessor lines) and the record gets a
:class:`struct.Struct` built from cffi's offsets, so decoding a record is one
``unpack_from`` call.  Our FFI *includes* deetune's, so ``struct dt_header``,
the ``__u32``-style typedefs and deetune's enum constants (``DT_COMM_LEN``)
come from deetune's ``deetune.h`` exactly as the BPF side sees them.
"""

from __future__ import annotations

import pathlib

from deetune import records as dt_records

PACKAGE_BPF = pathlib.Path(__file__).resolve().parent / "_bpf"
#: examples/deetune-signals/bpf in a source checkout (editable install before `make examples`).
SOURCE_BPF = pathlib.Path(__file__).resolve().parents[2] / "bpf"


def header_path() -> pathlib.Path:
    """``signals.h``: package data when built, else the source tree's."""
    packaged = PACKAGE_BPF / "signals.h"
    return packaged if packaged.exists() else SOURCE_BPF / "signals.h"


ffi = dt_records.load_header(header_path(), include=dt_records.ffi)
lib = ffi.dlopen(None)  # only for the enum constants


def record_struct(ctype_name: str):
    """A little-endian ``struct.Struct`` for the record, and its field names."""
    return dt_records.record_struct(ctype_name, ffi=ffi)


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
