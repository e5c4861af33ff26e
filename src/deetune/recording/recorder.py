"""Recording tasks at work: the :class:`RecordingManager` (tasks, their ports, the API's
side) and the :class:`Recorder` (a pipeline handler: exchanges in, recorded exchanges out).

Threads
    The API's threads create, stop and delete tasks through the manager: each change is a
    store transaction of its own, the kernel's capture sizes are updated at once (a map
    update), and the change reaches the pipeline thread through the manager's inbox (a
    deque, drained by the recorder at its next event or tick) and through
    :attr:`RecordingManager.by_server`, a dict replaced whole (never changed in place) that
    the recorder reads without a lock.  Task counters are written by the pipeline thread
    only.  The pipeline thread never waits for the store: what it records and its task's
    state changes go to the store sink as events
    (:mod:`deetune.recording.events`).

Ports
    A task raises the kernel's capture size to its limit on the ports its server service
    listens on (the resolver's listeners; when the server is not local, the ports the
    topology saw it on), re-read every :attr:`RecordingManager.refresh_seconds` while tasks
    run; several tasks on one port get the largest limit; a port no task needs any more
    gets the default size back.  The L7 handler keeps the bytes of connections on those
    ports (:mod:`deetune.recording.capture`).

Counting once
    When both ends of a connection run on this host, both report each exchange; a task
    counts and records the observation the topology counts (the server's side, see
    :meth:`deetune.topology.aggregator.TopologyAggregator.is_counted`).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import types
from typing import Any, Callable, Iterable, Iterator, Sequence

import attrs

from deetune.events import Event, ExchangeEvent
from deetune.recording import storage, webhook
from deetune.recording.capture import RecordingPorts
from deetune.recording.events import RecordedEvent, RecordingStatusEvent
from deetune.recording.model import RecordedExchange
from deetune.recording.redact import Redactor
from deetune.recording.tasks import (
    ACTIVE_STATES, COMPLETED, FAILED, FINAL_STATES, PENDING, RUNNING, STOPPED, Matcher, Task, TaskError, TaskSpec,
    new_task_id, sampled,
)

log = logging.getLogger("deetune.recording")

#: Tasks kept at once (all states); creating more is refused until some are deleted.
MAX_TASKS = 1000
#: Tasks running at once.
MAX_ACTIVE_TASKS = 64


class RecordingUnavailable(RuntimeError):
    """Recording cannot work here (no payload probe, store closed …): one line."""


class TaskNotFound(LookupError):
    pass


class TaskConflict(RuntimeError):
    """The task cannot do that in its state (stopping a finished task)."""


@attrs.define
class _Running:
    """What the recorder needs per task, compiled once."""

    task: Task
    matcher: Matcher
    redactor: Redactor


class RecordingManager:
    """Tasks and their capture (see the module doc).  A pipeline *service*: :meth:`start` runs
    once the probes are attached (it resumes the tasks that were running)."""

    #: Seconds between two re-reads of the servers' listening ports while tasks run.
    refresh_seconds: float = 2.0
    #: Seconds a webhook may take.
    webhook_timeout: float = 5.0

    def __init__(
        self,
        store,
        *,
        set_port_capture: Callable[[int, int | None], None] | None,
        ports_of: Callable[[str], set[int]],
        refresh_ports: Callable[[], object] | None = None,
        recording_ports: RecordingPorts | None = None,
        clock: Callable[[], int] = time.time_ns,
        webhook_allow: Sequence[webhook.Network] = (),
    ) -> None:
        self.store = store
        #: Networks webhooks may reach although refused by default (link-local, metadata).
        self.webhook_allow = tuple(webhook_allow)
        self.set_port_capture = set_port_capture
        #: The ports a server service's local instances listen on, and how to read them again now
        #: (when a task is created: its server may have started a moment ago).
        self.ports_of = ports_of
        self.refresh = refresh_ports
        self.recording_ports = recording_ports if recording_ports is not None else RecordingPorts()
        self.clock = clock
        self._lock = threading.RLock()
        #: Tasks of this run: the active ones and those that ended while the agent ran.
        self._tasks: dict[str, Task] = {}
        self._compiled: dict[str, _Running] = {}
        #: Server service → the running tasks recording it (replaced whole: read without a lock).
        self.by_server: dict[str, tuple[_Running, ...]] = {}
        #: (command, task id) for the pipeline thread: "start" (a new or resumed task), "ended".
        self.inbox: collections.deque[tuple[str, str]] = collections.deque()
        #: Port → capture size applied in the kernel.
        self._applied: dict[int, int] = {}
        self._refreshed_at = float("-inf")
        self._started = False
        #: Threads calling webhooks (joined by tests).
        self.webhook_threads: list[threading.Thread] = []

    # -- service -------------------------------------------------------------------------------
    def start(self) -> None:
        """Resume the tasks the store has as pending or running (the agent restarted)."""
        tasks = self.store.read(lambda conn: storage.load_tasks(conn, active_only=True))
        with self._lock:
            for task in tasks:
                if not task.active:
                    log.warning("recording task %s not resumed: %s", task.id, task.error)
                    continue
                count, size, next_seq = self.store.read(lambda conn, t=task.id: storage.stored_totals(conn, t))
                task.recorded, task.bytes, task.next_seq = count, size, max(next_seq, task.next_seq)
                task.matched = max(task.matched, task.recorded + task.dropped)
                self._tasks[task.id] = task
                self._compiled[task.id] = _Running(task, Matcher(task.spec), Redactor(task.spec.redact))
                self.inbox.append(("start", task.id))
                log.info("recording task %s resumed (%s, %d exchanges so far)", task.id, task.spec.server,
                         task.recorded)
            self._started = True
            self._apply_ports(force=True)

    def stop(self) -> None:
        self._started = False

    # -- the API's side ------------------------------------------------------------------------
    def create(self, data: Any) -> dict[str, Any]:
        """Validate and start a task (JSON description, see :class:`TaskSpec`); its status.
        Raises TaskError (bad description), RecordingUnavailable."""
        spec = TaskSpec.from_json(data)
        if spec.webhook is not None:
            try:
                webhook.resolve(spec.webhook, self.webhook_allow)
            except webhook.WebhookRefused as exc:
                raise TaskError(str(exc)) from None
        if self.set_port_capture is None:
            raise RecordingUnavailable("recording needs the payload probe, which this agent does not run")
        with self._lock:
            active = sum(1 for t in self._tasks.values() if t.active)
        if active >= MAX_ACTIVE_TASKS:
            raise TaskError(f"{MAX_ACTIVE_TASKS} tasks are running already: stop one first")
        total = self.store.read(lambda conn: conn.execute("SELECT count(*) FROM recording_tasks").fetchone()[0])
        if total >= MAX_TASKS:
            raise TaskError(f"{MAX_TASKS} tasks are stored already: delete some first")
        task = Task(id=new_task_id(), spec=spec, state=PENDING, created=self.clock())
        # The store first, outside the lock: the pipeline thread takes the lock, never the store's.
        self.store.transaction(lambda conn: storage.insert_task(conn, task))
        if self.refresh is not None:
            try:
                self.refresh()
            except Exception as exc:  # /proc: never fatal
                log.debug("cannot read the listening sockets: %s", exc)
        with self._lock:
            self._tasks[task.id] = task
            self._compiled[task.id] = _Running(task, Matcher(spec), Redactor(spec.redact))
            self.inbox.append(("start", task.id))
            self._apply_ports(force=True)
            log.info("recording task %s created: %s", task.id, json.dumps(spec.to_json()))
            return task.to_json()

    def list(self) -> list[dict[str, Any]]:
        tasks = self.store.read(storage.load_tasks)
        with self._lock:
            live = dict(self._tasks)
        return [(live.get(t.id) or t).to_json() for t in tasks]

    def get(self, task_id: str) -> Task:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None:
            task = self.store.read(lambda conn: storage.load_task(conn, task_id))
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def status(self, task_id: str) -> dict[str, Any]:
        return self.get(task_id).to_json()

    def stop_task(self, task_id: str) -> dict[str, Any]:
        """Stop a pending or running task (its exchanges stay); its final status."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                stored = self.store.read(lambda conn: storage.load_task(conn, task_id))
                if stored is None:
                    raise TaskNotFound(task_id)
                raise TaskConflict(f"task {task_id} is {stored.state}, not running")
            if not self._end(task, STOPPED):
                raise TaskConflict(f"task {task_id} is {task.state}, not running")
            self.inbox.append(("ended", task.id))
        self.store.transaction(lambda conn: storage.save_task(conn, task))
        self._webhook(task)
        return task.to_json()

    def delete(self, task_id: str) -> None:
        """Delete a task and its exchanges (a running one is stopped first, without its webhook)."""
        with self._lock:
            task = self._tasks.pop(task_id, None)
            self._compiled.pop(task_id, None)
            if task is not None and task.active:
                task.state = STOPPED
                task.ended = self.clock()
                self._rebuild()
                self._apply_ports(force=True)
        deleted = self.store.transaction(lambda conn: storage.delete_task(conn, task_id))
        if not deleted and task is None:
            raise TaskNotFound(task_id)

    def count_exchanges(self, task_id: str, protocol: str | None = None) -> int:
        return self.store.read(lambda conn: storage.count_exchanges(conn, task_id, protocol))

    def exchanges(self, task_id: str, *, limit: int | None = None, offset: int = 0,
                  protocol: str | None = None) -> Iterator[RecordedExchange]:
        """A task's exchanges in order, read a page at a time."""
        return storage.iter_exchanges(self.store.read, task_id, protocol=protocol, limit=limit, offset=offset)

    # -- shared --------------------------------------------------------------------------------
    def _end(self, task: Task, state: str, error: str | None = None) -> bool:
        """Move an active task to a final state (under the lock); False if it had ended already."""
        with self._lock:
            if not task.active:
                return False
            task.state = state
            task.ended = self.clock()
            if error is not None:
                task.error = error
            self._rebuild()
            self._apply_ports(force=True)
            log.info("recording task %s %s: %d matched, %d recorded, %d dropped", task.id, state, task.matched,
                     task.recorded, task.dropped)
            return True

    def _rebuild(self) -> None:
        by_server: dict[str, list[_Running]] = {}
        for task_id, running in self._compiled.items():
            if running.task.state == RUNNING:
                by_server.setdefault(running.task.spec.server, []).append(running)
        self.by_server = {server: tuple(items) for server, items in by_server.items()}

    def refresh_ports(self) -> None:
        """Re-read the servers' ports (called from the pipeline's ticks; at most every refresh_seconds)."""
        if time.monotonic() - self._refreshed_at < self.refresh_seconds:
            return
        with self._lock:
            self._apply_ports()

    def _server_ports(self, server: str) -> set[int]:
        try:
            ports = set(self.ports_of(server))
        except Exception as exc:  # the resolver reads /proc: never fatal
            log.debug("ports of %s: %s", server, exc)
            ports = set()
        if not ports:
            # Not a local service: the ports the topology saw it serve on (client-side recording).
            try:
                ports = set(self.store.read(lambda conn: [r[0] for r in conn.execute(
                    "SELECT DISTINCT port FROM edges WHERE server = ? AND port > 0", (server,))]))
            except Exception as exc:
                log.debug("edge ports of %s: %s", server, exc)
        return ports

    def _apply_ports(self, force: bool = False) -> None:
        """Bring the kernel's per-port capture sizes to what the active tasks need (under the lock)."""
        if not self._started:
            return
        self._refreshed_at = time.monotonic()
        wanted: dict[int, int] = {}
        failed: list[tuple[Task, str]] = []
        servers: dict[str, set[int]] = {}
        for task in self._tasks.values():
            if not task.active:
                continue
            ports = servers.get(task.spec.server)
            if ports is None:
                ports = servers[task.spec.server] = self._server_ports(task.spec.server)
            task.ports = tuple(sorted(ports))
            for port in ports:
                wanted[port] = max(wanted.get(port, 0), task.spec.limit)
        if wanted == self._applied and not force:
            return
        for port in [p for p in self._applied if p not in wanted]:
            try:
                self.set_port_capture(port, None)
            except Exception as exc:
                log.warning("cannot restore the capture size of port %d: %s", port, exc)
            del self._applied[port]
        for port, size in wanted.items():
            if self._applied.get(port) == size:
                continue
            try:
                self.set_port_capture(port, size)
                self._applied[port] = size
            except Exception as exc:
                for task in self._tasks.values():
                    if task.active and port in task.ports:
                        failed.append((task, f"cannot raise the capture size of port {port}: {exc}"))
        self.recording_ports.ports = types.MappingProxyType(dict(self._applied))
        for task, error in failed:
            if task.active:
                task.state, task.ended, task.error = FAILED, self.clock(), error
                self.inbox.append(("ended", task.id))
                self._rebuild()
                threading.Thread(target=self._persist_and_notify, args=(task,), daemon=True).start()

    def _persist_and_notify(self, task: Task) -> None:
        try:
            self.store.transaction(lambda conn: storage.save_task(conn, task))
        except Exception as exc:
            log.warning("recording task %s: cannot save its state: %s", task.id, exc)
        self._webhook(task)

    # -- webhooks ------------------------------------------------------------------------------
    def _webhook(self, task: Task) -> None:
        """POST the task's final status to its webhook, from a thread of its own."""
        if task.spec.webhook is None:
            return
        thread = threading.Thread(target=self._call_webhook, args=(task, task.to_json()),
                                  name=f"deetune-webhook-{task.id}", daemon=True)
        self.webhook_threads.append(thread)
        thread.start()

    def _call_webhook(self, task: Task, status: dict[str, Any]) -> None:
        body = json.dumps({"event": f"recording.{task.state}", "task": status}).encode()
        outcome = webhook.post(task.spec.webhook, body, timeout=self.webhook_timeout, allowed=self.webhook_allow)
        task.webhook_status = outcome
        log.info("recording task %s: webhook %s", task.id, outcome)
        try:
            self.store.transaction(lambda conn: storage.set_webhook_status(conn, task.id, outcome))
        except Exception as exc:
            log.warning("recording task %s: cannot save the webhook's outcome: %s", task.id, exc)

    # -- the pipeline's side (called by the Recorder, on the pipeline thread) ----------------------
    def take_inbox(self) -> list[tuple[str, Task]]:
        out = []
        while self.inbox:
            command, task_id = self.inbox.popleft()
            with self._lock:
                task = self._tasks.get(task_id)
                if task is None:
                    continue
                if command == "start" and task.state == PENDING:
                    task.state = RUNNING
                    if task.started is None:
                        task.started = self.clock()
                    self._rebuild()
                elif command == "start" and task.state == RUNNING:
                    self._rebuild()  # resumed
            out.append((command, task))
        return out

    def end_from_pipeline(self, task: Task, state: str, error: str | None = None) -> bool:
        """End a task the recorder saw reach its stop condition; the caller emits its status event."""
        if not self._end(task, state, error):
            return False
        self._webhook(task)
        return True

    def tasks(self) -> list[Task]:
        with self._lock:
            return list(self._tasks.values())


class Recorder:
    """Pipeline handler after the topology aggregator: records the exchanges running tasks match
    (see the module doc).  Every event is passed on; exchanges lose their payload bytes, in place
    (only the store gets them, redacted); recorded exchanges and task status changes are added as
    events."""

    def __init__(self, manager: RecordingManager, *, counted: Callable[[ExchangeEvent], bool] | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.manager = manager
        self.counted = counted if counted is not None else _server_side
        self.clock = clock
        #: Counters last handed to the store, per task.
        self._persisted: dict[str, dict[str, int]] = {}
        self._persisted_ports: dict[str, tuple[int, ...]] = {}

    def __call__(self, event: Event) -> Iterable[Event]:
        manager = self.manager
        out: list[Event] | None = None
        if manager.inbox:
            out = self._drain()
        if not isinstance(event, ExchangeEvent):
            if out:
                out.append(event)
                return out
            return (event,)
        by_server = manager.by_server
        if by_server:
            tasks = by_server.get(event.server_service)
            if tasks is not None:
                out = self._match(event, tasks, out)
        if event.request_payload is not None or event.response_payload is not None:
            _strip_payloads(event)
        if out:
            out.insert(0, event)
            return out
        return (event,)

    def _match(self, event: ExchangeEvent, tasks: tuple[_Running, ...], out: list[Event] | None) -> list[Event]:
        if out is None:
            out = []
        if not self.counted(event):
            return out
        protocol, method, target, client = event.protocol, event.method, event.target, event.client_service
        for running in tasks:
            task = running.task
            if task.state != RUNNING or not running.matcher.matches(protocol, method, target, client):
                continue
            deadline = task.deadline
            if deadline is not None and self.clock() >= deadline:
                self._end(task, COMPLETED, out)
                continue
            task.matched += 1
            self._record(running, event, out)
            count = task.spec.count
            if count is not None and task.recorded >= count:
                self._end(task, COMPLETED, out)
        return out

    def _record(self, running: _Running, event: ExchangeEvent, out: list[Event]) -> None:
        task = running.task
        spec = task.spec
        request, response = event.request_payload, event.response_payload
        if request is None or response is None:
            task.dropped_capture += 1
            return
        limit = spec.limit
        if len(request) > limit:
            request = request[:limit]
        if len(response) > limit:
            response = response[:limit]
        if spec.sample < 1.0 and not sampled(task.id, request, spec.sample):
            task.dropped_sampling += 1
            return
        request_truncated = len(request) < event.request_bytes
        response_truncated = len(response) < event.response_bytes
        request, response, target, rules = running.redactor.apply(event.protocol, event.method, request,
                                                                  response, event.target)
        server_side = event.role == "server"
        exchange = RecordedExchange(
            task_id=task.id,
            seq=task.next_seq,
            ts=event.ts,
            protocol=event.protocol,
            client=event.client_service or "",
            server=event.server_service or "",
            method=event.method,
            target=target,
            status=event.status,
            error=event.error,
            request=request,
            response=response,
            request_size=event.request_bytes,
            response_size=event.response_bytes,
            request_truncated=request_truncated,
            response_truncated=response_truncated,
            latency_ns=event.latency_ns,
            duration_ns=event.duration_ns,
            error_message=event.error_message,
            server_address=event.laddr if server_side else event.raddr,
            server_port=event.lport if server_side else event.rport,
            attributes=dict(event.attributes),
            redactions=rules,
        )
        task.next_seq += 1
        task.recorded += 1
        task.bytes += len(request) + len(response)
        out.append(RecordedEvent(event.ts, ts_mono_ns=event.ts_mono_ns, exchange=exchange, on_drop=self._dropped))

    def _dropped(self, event: RecordedEvent) -> None:
        """The store sink's queue was full: the exchange is not stored."""
        for task in self.manager.tasks():
            if task.id == event.exchange.task_id:
                task.recorded -= 1
                task.dropped_queue += 1
                task.bytes -= len(event.exchange.request) + len(event.exchange.response)
                return

    def _end(self, task: Task, state: str, out: list[Event], error: str | None = None) -> None:
        if self.manager.end_from_pipeline(task, state, error):
            out.append(self._status(task))

    def _status(self, task: Task) -> RecordingStatusEvent:
        counters = task.counters()
        self._persisted[task.id] = counters
        self._persisted_ports[task.id] = task.ports
        now = self.clock()
        return RecordingStatusEvent(now, task_id=task.id, state=task.state, counters=counters, ports=task.ports,
                                    started=task.started, ended=task.ended, error=task.error)

    def _drain(self) -> list[Event]:
        out: list[Event] = []
        for command, task in self.manager.take_inbox():
            out.append(self._status(task))
        return out

    def tick(self) -> list[Event]:
        """About once a second: stop conditions by time, ports, counters to the store."""
        out = self._drain() if self.manager.inbox else []
        now = self.clock()
        tasks = self.manager.tasks()
        for task in tasks:
            if task.state == RUNNING and task.deadline is not None and now >= task.deadline:
                self._end(task, COMPLETED, out)
        if any(t.active for t in tasks):
            self.manager.refresh_ports()
        for task in tasks:
            if task.state in ACTIVE_STATES or task.state in FINAL_STATES and task.id in self._persisted:
                if (self._persisted.get(task.id) != task.counters()
                        or self._persisted_ports.get(task.id) != task.ports):
                    out.append(self._status(task))
        return out

    def flush(self) -> list[Event]:
        """At stop: every task's counters (running tasks stay running: they resume at the next start)."""
        out = self._drain() if self.manager.inbox else []
        for task in self.manager.tasks():
            if self._persisted.get(task.id) != task.counters() or task.active:
                out.append(self._status(task))
        return out


_SET_REQUEST = ExchangeEvent.request_payload.__set__  # type: ignore[attr-defined]
_SET_RESPONSE = ExchangeEvent.response_payload.__set__  # type: ignore[attr-defined]


def _strip_payloads(event: ExchangeEvent) -> None:
    """Take the raw bytes off an exchange before the sinks see it.  In place, through the slots'
    descriptors: the event is a fresh object that only the pipeline holds (the L7 handler made it,
    the aggregator copied it), and ``attrs.evolve`` would cost ~5 µs per exchange."""
    _SET_REQUEST(event, None)
    _SET_RESPONSE(event, None)


def _server_side(event: ExchangeEvent) -> bool:
    return event.role != "client"


__all__ = ["Recorder", "RecordingManager", "RecordingUnavailable", "TaskConflict", "TaskNotFound"]
