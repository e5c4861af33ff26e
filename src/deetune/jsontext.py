"""JSON text for anything an event or an API answer holds, never failing on a value.

:func:`dumps` takes orjson's fast path and, for what orjson refuses, falls back to the standard
library with the value made encodable first:

- integers beyond 64 bits stay numbers (JSON has no size limit; ``json`` and most parsers read
  them exactly); one too long to print (over ~4,300 digits, Python's limit) becomes the string
  ``"<integer of N bits>"``;
- strings that are not valid UTF-8 (lone surrogates from ``surrogateescape``) are written as
  ``\\uXXXX`` escapes (the text stays ASCII);
- bytes become hex, sets and tuples lists;
- nesting deeper than :data:`MAX_DEPTH` is cut: the deeper value becomes ``"<nested too deep>"``;
- NaN and infinities become null (as orjson writes them).

Used by the jsonl sink (one event per line) and the API's answers.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import orjson

#: Containers nested deeper than this are cut (orjson stops at 255; the stdlib at the recursion limit).
MAX_DEPTH = 128
_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS
_LINE = orjson.OPT_NON_STR_KEYS | orjson.OPT_APPEND_NEWLINE
#: Python refuses to print integers of more decimal digits than this (CVE-2020-10735's limit).
_MAX_DIGITS = getattr(sys, "get_int_max_str_digits", lambda: 4300)() or 4300
_MAX_BITS = int((_MAX_DIGITS - 1) * 3.32)  # comfortably under the digit limit


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _encodable(value: Any, depth: int = 0) -> Any:
    """A copy of ``value`` the standard library encodes (see the module doc)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if value.bit_length() <= _MAX_BITS else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            return "<nested too deep>"
        return {_key(k): _encodable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        if depth >= MAX_DEPTH:
            return "<nested too deep>"
        return [_encodable(v, depth + 1) for v in value]
    return _encodable(_default(value), depth)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return key
    encoded = _encodable(key)
    return encoded if isinstance(encoded, str) else json.dumps(encoded)


def _fallback(value: Any, newline: bool) -> bytes:
    text = json.dumps(_encodable(value), ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return (text + "\n" if newline else text).encode("ascii")


def dumps(value: Any) -> bytes:
    """Compact JSON (UTF-8) for ``value``; never raises for a value's content."""
    try:
        return orjson.dumps(value, default=_default, option=_ORJSON_OPTIONS)
    except TypeError:  # orjson.JSONEncodeError: 64-bit range, surrogates, depth
        return _fallback(value, False)


def dumps_line(value: Any) -> bytes:
    """:func:`dumps` and a newline (one JSON Lines record)."""
    try:
        return orjson.dumps(value, default=_default, option=_LINE)
    except TypeError:
        return _fallback(value, True)


__all__ = ["MAX_DEPTH", "dumps", "dumps_line"]
