"""Recording tasks and their exchanges in the topology store's SQLite file.

Tables (schema version 3 of :mod:`deetune.topology.store`):

``recording_tasks``
    One row per task: its spec (JSON), state, times, counters, the ports it raised, its
    error and its webhook's outcome.
``recorded_exchanges``
    One row per recorded exchange: task, sequence number, time, the exchange's fields
    (JSON, without the bytes) and the request and response bytes (BLOBs).

Tasks and their exchanges are kept until the task is deleted: the store's retention
does not apply to them.  Writes from the pipeline go through the store sink's batches
(:class:`~deetune.recording.events.RecordedEvent`,
:class:`~deetune.recording.events.RecordingStatusEvent`); the API's writes (create, stop,
delete) are synchronous transactions of their own.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Iterable, Iterator

import attrs
import orjson

from deetune.recording.model import RecordedExchange
from deetune.recording.tasks import Task, TaskError, TaskSpec

#: The tables, as the store's migration to schema version 3 creates them.
MIGRATION: tuple[str, ...] = (
    "CREATE TABLE recording_tasks (id TEXT PRIMARY KEY, spec TEXT NOT NULL, state TEXT NOT NULL,"
    " created INTEGER NOT NULL, started INTEGER, ended INTEGER,"
    " matched INTEGER NOT NULL DEFAULT 0, recorded INTEGER NOT NULL DEFAULT 0,"
    " dropped_sampling INTEGER NOT NULL DEFAULT 0, dropped_capture INTEGER NOT NULL DEFAULT 0,"
    " dropped_queue INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0,"
    " ports TEXT NOT NULL DEFAULT '[]', error TEXT, webhook_status TEXT)",
    "CREATE TABLE recorded_exchanges (id INTEGER PRIMARY KEY, task_id TEXT NOT NULL, seq INTEGER NOT NULL,"
    " ts INTEGER NOT NULL, meta TEXT NOT NULL, request BLOB NOT NULL, response BLOB NOT NULL)",
    "CREATE UNIQUE INDEX recorded_exchanges_task ON recorded_exchanges (task_id, seq)",
)

_TASK_COLUMNS = ("id", "spec", "state", "created", "started", "ended", "matched", "recorded", "dropped_sampling",
                 "dropped_capture", "dropped_queue", "bytes", "ports", "error", "webhook_status")
_COUNTERS = ("matched", "recorded", "dropped_sampling", "dropped_capture", "dropped_queue", "bytes")
_ACTIVE = "('pending', 'running')"
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def task_row(task: Task) -> tuple:
    return (task.id, _JSON.encode(task.spec.to_json()), task.state, task.created, task.started, task.ended,
            task.matched, task.recorded, task.dropped_sampling, task.dropped_capture, task.dropped_queue,
            task.bytes, _JSON.encode(list(task.ports)), task.error, task.webhook_status)


def task_from_row(row: Iterable[Any]) -> Task:
    values = dict(zip(_TASK_COLUMNS, row))
    raw = values.pop("spec")
    values["ports"] = tuple(json.loads(values["ports"]))
    try:
        spec = TaskSpec.from_json(json.loads(raw))
    except (TaskError, ValueError) as exc:
        # Written by another version of deetune: shown, never resumed.
        data = json.loads(raw) if raw.startswith("{") else {}
        server = data.get("server") if isinstance(data.get("server"), str) and data.get("server") else "?"
        spec = TaskSpec(server=server)
        if values["state"] in ("pending", "running"):
            values["state"] = "failed"
        values["error"] = f"unreadable task description: {exc}"
    return Task(spec=spec, **values)


# -- writes (callers hold the store's write transaction) ----------------------------------------------


def insert_task(conn: sqlite3.Connection, task: Task) -> None:
    conn.execute(f"INSERT INTO recording_tasks ({', '.join(_TASK_COLUMNS)})"
                 f" VALUES ({', '.join('?' * len(_TASK_COLUMNS))})", task_row(task))


def save_task(conn: sqlite3.Connection, task: Task) -> None:
    """Everything of a task (the API's changes: stop, failure)."""
    conn.execute(f"UPDATE recording_tasks SET {', '.join(f'{c} = ?' for c in _TASK_COLUMNS[1:])} WHERE id = ?",
                 (*task_row(task)[1:], task.id))


def delete_task(conn: sqlite3.Connection, task_id: str) -> bool:
    conn.execute("DELETE FROM recorded_exchanges WHERE task_id = ?", (task_id,))
    return conn.execute("DELETE FROM recording_tasks WHERE id = ?", (task_id,)).rowcount > 0


def set_webhook_status(conn: sqlite3.Connection, task_id: str, status: str) -> None:
    conn.execute("UPDATE recording_tasks SET webhook_status = ? WHERE id = ?", (status, task_id))


def write_events(conn: sqlite3.Connection, recorded: list, statuses: list) -> int:
    """A batch of RecordedEvent and RecordingStatusEvent; returns the exchanges stored (those of
    deleted tasks are not)."""
    stored = 0
    if recorded:
        encode = _encode_meta
        rows = []
        for event in recorded:
            x: RecordedExchange = event.exchange
            meta = {name: getattr(x, name) for name in _META_FIELDS}
            meta["redactions"] = list(x.redactions)
            rows.append((x.task_id, x.seq, x.ts, encode(meta), x.request, x.response, x.task_id))
        before = conn.total_changes
        conn.executemany(
            "INSERT OR IGNORE INTO recorded_exchanges (task_id, seq, ts, meta, request, response)"
            " SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM recording_tasks WHERE id = ?)", rows)
        stored = conn.total_changes - before
    for event in statuses:
        # Counters always (the pipeline counts); the state only while the row's is active (the API
        # may have stopped the task meanwhile).
        conn.execute(
            f"UPDATE recording_tasks SET {', '.join(f'{c} = ?' for c in _COUNTERS)}, ports = ?,"
            f" started = coalesce(started, ?),"
            f" ended = CASE WHEN state IN {_ACTIVE} THEN ? ELSE ended END,"
            f" error = CASE WHEN state IN {_ACTIVE} THEN ? ELSE error END,"
            f" state = CASE WHEN state IN {_ACTIVE} THEN ? ELSE state END WHERE id = ?",
            (*(event.counters[c] for c in _COUNTERS), _JSON.encode(list(event.ports)), event.started,
             event.ended, event.error, event.state, event.task_id))
    return stored


def _encode_meta(meta: dict[str, Any]) -> str:
    # orjson: a quarter of json's cost, and this runs once per recorded exchange on the writer thread.
    return orjson.dumps(meta, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


_META_FIELDS = tuple(a.name for a in attrs.fields(RecordedExchange) if a.name not in ("request", "response", "redactions"))


# -- reads --------------------------------------------------------------------------------------------


def load_tasks(conn: sqlite3.Connection, active_only: bool = False) -> list[Task]:
    where = f" WHERE state IN {_ACTIVE}" if active_only else ""
    return [task_from_row(row) for row in
            conn.execute(f"SELECT {', '.join(_TASK_COLUMNS)} FROM recording_tasks{where} ORDER BY created, id")]


def load_task(conn: sqlite3.Connection, task_id: str) -> Task | None:
    row = conn.execute(f"SELECT {', '.join(_TASK_COLUMNS)} FROM recording_tasks WHERE id = ?", (task_id,)).fetchone()
    return None if row is None else task_from_row(row)


def stored_totals(conn: sqlite3.Connection, task_id: str) -> tuple[int, int, int]:
    """(exchanges stored, their bytes, the next sequence number) of a task."""
    count, size, last = conn.execute(
        "SELECT count(*), coalesce(sum(length(request) + length(response)), 0), max(seq)"
        " FROM recorded_exchanges WHERE task_id = ?", (task_id,)).fetchone()
    return count, size, (last + 1 if last is not None else 0)


def count_exchanges(conn: sqlite3.Connection, task_id: str, protocol: str | None = None) -> int:
    if protocol is None:
        return conn.execute("SELECT count(*) FROM recorded_exchanges WHERE task_id = ?", (task_id,)).fetchone()[0]
    return conn.execute("SELECT count(*) FROM recorded_exchanges WHERE task_id = ?"
                        " AND json_extract(meta, '$.protocol') = ?", (task_id, protocol)).fetchone()[0]


def read_exchanges(conn: sqlite3.Connection, task_id: str, limit: int | None, offset: int,
                   protocol: str | None = None) -> list[RecordedExchange]:
    """A task's exchanges in sequence order."""
    where = "task_id = ?"
    params: list[Any] = [task_id]
    if protocol is not None:
        where += " AND json_extract(meta, '$.protocol') = ?"
        params.append(protocol)
    params += [-1 if limit is None else limit, offset]
    rows = conn.execute(f"SELECT meta, request, response FROM recorded_exchanges WHERE {where}"
                        " ORDER BY seq LIMIT ? OFFSET ?", params)
    return [exchange_from_row(*row) for row in rows]


def exchange_from_row(meta: str, request: bytes, response: bytes) -> RecordedExchange:
    values = json.loads(meta)
    values["redactions"] = tuple(values.get("redactions", ()))
    return RecordedExchange(request=bytes(request), response=bytes(response), **values)


def iter_exchanges(read, task_id: str, page: int = 200, protocol: str | None = None,
                   limit: int | None = None, offset: int = 0) -> Iterator[RecordedExchange]:
    """All of a task's exchanges (from ``offset``, at most ``limit``), a page per read transaction:
    an export of any size holds one page in memory."""
    left = limit
    while left is None or left > 0:
        size = page if left is None else min(page, left)
        batch = read(lambda conn: read_exchanges(conn, task_id, size, offset, protocol))
        yield from batch
        if len(batch) < size:
            return
        offset += len(batch)
        if left is not None:
            left -= len(batch)


__all__ = [
    "MIGRATION", "count_exchanges", "delete_task", "exchange_from_row", "insert_task", "iter_exchanges",
    "load_task", "load_tasks", "read_exchanges", "save_task", "set_webhook_status", "stored_totals",
    "task_from_row", "task_row", "write_events",
]
