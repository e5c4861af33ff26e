"""Regular expressions from API clients (a task's ``statement`` filter, its ``redact.patterns``),
compiled by RE2 (the ``google-re2`` bindings): matching takes time linear in the text, whatever
the pattern, so no pattern can stall the pipeline thread that matches it against every exchange
(Python's ``re`` backtracks: ``(a+)+$`` against 39 bytes took 14 s).

RE2 is Python's syntax without backreferences and lookaround (``\\1``, ``(?=…)``, ``(?<=…)``):
a pattern using them is refused when the task is created.  Patterns are at most 1024 characters
(statement) or 512 (redaction), and a compiled pattern may use at most 8 MiB.
"""

from __future__ import annotations

from typing import Any

#: Memory one compiled pattern may use (RE2's default: 8 MiB too; said here so it stays so).
MAX_PATTERN_MEMORY = 8 << 20


class PatternError(ValueError):
    """A pattern RE2 does not take (one line)."""


def compile_pattern(pattern: str | bytes) -> Any:
    """The compiled pattern (``search``, ``match``, ``finditer``, ``groups`` as ``re``'s), or PatternError."""
    import re2  # only for tasks that have patterns

    options = re2.Options()
    options.log_errors = False  # RE2 would log parse errors on stderr: they come back as the exception
    options.max_mem = MAX_PATTERN_MEMORY
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid"
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise PatternError(f"{reason} (patterns are RE2: no backreferences, no lookaround)") from None


__all__ = ["MAX_PATTERN_MEMORY", "PatternError", "compile_pattern"]
