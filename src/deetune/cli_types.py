"""Argument types shared by the command-line tools (agent, record): each refuses what it cannot
use (not a number, NaN, infinity, out of range) with a one-line message."""

from __future__ import annotations

import argparse
import math

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: 100 years: a duration in nanoseconds stays well within a signed 64-bit integer (SQLite's).
MAX_DURATION_SECONDS = 100 * 365 * 86400


def _number(text: str, what: str, shown: str | None = None) -> float:
    shown = text if shown is None else shown
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {shown!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not {what} (not finite): {shown!r}")
    return value


def seconds_between(low: float, high: float):
    """An argparse type: a finite number of seconds in [low, high]."""

    def parse(text: str) -> float:
        value = _number(text, "a number")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low:g} to {high:g} seconds: {text!r}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0 (at most 100 years)."""
    value = _number(text, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    if value > MAX_DURATION_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_DURATION_SECONDS} seconds (100 years): {text!r}")
    return value


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``12h`` or ``7d``; positive, finite, at most 100 years."""
    unit = text[-1:] if text[-1:] in _UNITS else "s"
    number = text[:-1] if text[-1:] in _UNITS else text
    what = "a duration (like 90, 90s, 15m, 12h, 7d)"
    value = _number(number, what, text) * _UNITS[unit]
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    if value > MAX_DURATION_SECONDS:
        raise argparse.ArgumentTypeError(f"must be at most 36500d (100 years): {text!r}")
    return value
