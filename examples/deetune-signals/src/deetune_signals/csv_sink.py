"""The ``csv`` sink: one CSV row per event.

File layout (one file can hold several event types):

* every row starts with the event type, then ``ts`` (wall-clock ns);
* the first time a type appears, a header row for it is written just before
  its first row: ``type,ts,<the other keys of that event's to_json()>``.
  A header row is recognised by its first cell, the literal ``type``; it
  names the columns of the type of the row right after it.  A run of a
  single probe therefore produces an ordinary CSV file with one header line;
* the columns of a type are fixed by its first event: the keys of its
  ``to_json()``, plus the event class's other attrs fields (some events leave
  out keys that do not apply, e.g. a connection ``open`` has no
  ``bytes_sent``).  A later event without a column gets an empty cell; a key
  outside the columns is dropped (and counted in ``dropped_keys``);
* cells: None → empty, booleans → ``true``/``false``, dicts and lists →
  compact JSON, everything else ``str()``.

The file is truncated when the sink opens (``csv:-`` writes stdout), written
through a buffer, and flushed by :meth:`CsvSink.flush` and :meth:`CsvSink.close`
(the pipeline closes its sinks when it stops).  :func:`read_csv_events` reads
such a file back.
"""

from __future__ import annotations

import csv
import json
import sys
from typing import IO, Any, Iterator

import attrs

from deetune.events import Event
from deetune.sinks.base import Sink, SinkError

FIRST_COLUMNS = ("type", "ts")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return str(value)


def columns_for(event: Event) -> list[str]:
    """``type``, ``ts``, then the event's to_json() keys, then any attrs field to_json() left out."""
    columns = list(FIRST_COLUMNS)
    for key in event.to_json():
        if key not in columns:
            columns.append(key)
    if attrs.has(type(event)):
        for field in attrs.fields(type(event)):
            if field.name not in columns:
                columns.append(field.name)
    return columns


class CsvSink(Sink):
    name = "csv"
    description = "one CSV row per event, a header per event type; csv:PATH (truncated), csv:- for stdout"

    def __init__(self, stream: IO[str], *, owned: bool):
        self._stream = stream
        self._owned = owned
        self._writer = csv.writer(stream, lineterminator="\n")
        self._columns: dict[str, list[str]] = {}
        self._closed = False
        #: Keys dropped because they were not among their type's columns.
        self.dropped_keys = 0

    @classmethod
    def from_arg(cls, arg: str | None) -> "CsvSink":
        if not arg:
            raise SinkError("csv sink needs a path: --sink csv:PATH (or csv:- for stdout)")
        if arg == "-":
            return cls(sys.stdout, owned=False)
        try:
            # newline="": the csv module writes its own line endings.
            return cls(open(arg, "w", newline="", encoding="utf-8"), owned=True)
        except OSError as exc:
            raise SinkError(f"cannot open {arg} for the csv sink: {exc.strerror}") from None

    def handle(self, event: Event) -> None:
        data = event.to_json()
        columns = self._columns.get(event.type)
        if columns is None:
            columns = self._columns[event.type] = columns_for(event)
            self._writer.writerow(columns)
        self.dropped_keys += sum(1 for key in data if key not in columns)
        self._writer.writerow(_cell(data.get(key)) for key in columns)

    def flush(self) -> None:
        if not self._closed:
            self._stream.flush()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._owned:
            self._stream.close()


def read_csv_events(path: str) -> Iterator[dict[str, str]]:
    """The rows of a file written by :class:`CsvSink`, as dicts keyed by their
    type's columns (values are the cells' text)."""
    with open(path, newline="", encoding="utf-8") as stream:
        headers: dict[str, list[str]] = {}
        pending: list[str] | None = None
        for row in csv.reader(stream):
            if not row:
                continue
            if row[0] == "type":
                pending = row
                continue
            if pending is not None:  # the first row of its type (of this run, if files were joined)
                headers[row[0]] = pending
                pending = None
            elif row[0] not in headers:
                raise ValueError(f"{path}: a {row[0]!r} row before its header row")
            yield dict(zip(headers[row[0]], row))
