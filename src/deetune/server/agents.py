"""Per-request detail stays on the agents: the server asks the agent that holds it.

An agent's API is found from what it exports: the address Prometheus scrapes it at (the
``instance`` label) and the port in ``deetune_agent_info{api_port}``.  Requests carry the
agents' bearer token (``--agent-token``, or ``$DEETUNE_AGENT_TOKEN``); agents on other hosts
serve their API only with one (docs/api.md).  Agents are asked side by side, each with a
timeout; one that fails is left out of the answer and its error kept for ``/api/hosts``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Iterable

import orjson

log = logging.getLogger("deetune.server")


class AgentError(RuntimeError):
    """An agent could not be asked (one-line message)."""


def api_base(target: str, api_port: int, scheme: str = "http") -> str | None:
    """``http://ADDRESS:API_PORT`` from a scrape target ``ADDRESS:PORT`` (IPv6 in brackets)."""
    if not api_port or not target:
        return None
    address = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    return f"{scheme}://{address}:{api_port}"


class Agents:
    def __init__(self, token: str | None = None, *, timeout: float = 10.0, scheme: str = "http",
                 workers: int = 16) -> None:
        self.token = token
        self.timeout = timeout
        self.scheme = scheme
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deetune-agents")
        self._lock = threading.Lock()
        #: host → the last error asking it (cleared by a success).
        self.errors: dict[str, str] = {}

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def get(self, base: str, path: str, params: dict[str, Any] | None = None) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
        url = f"{base}{path}" + (f"?{query}" if query else "")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=self.timeout) as response:
                return orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                detail = orjson.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                detail = ""
            raise AgentError(f"{url}: {exc.code} {detail or exc.reason}") from None
        except (OSError, ValueError) as exc:
            raise AgentError(f"{url}: {getattr(exc, 'reason', None) or exc}") from None

    def ask_all(self, hosts: Iterable[Any], path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """``{host name: answer}`` of every host with an API that answered."""
        futures = {}
        for host in hosts:
            base = api_base(host.target, host.api_port, self.scheme)
            if base is not None:
                futures[host.name] = self._pool.submit(self.get, base, path, params)
        answers = {}
        for name, future in futures.items():
            try:
                answers[name] = future.result()
            except AgentError as exc:
                log.warning("agent %s: %s", name, exc)
                with self._lock:
                    self.errors[name] = str(exc)
                continue
            with self._lock:
                self.errors.pop(name, None)
        return answers

    def exchanges(self, hosts: Iterable[Any], *, service: str | None, limit: int, since: int | None) -> list[dict]:
        """The most recent exchanges of every agent, newest first, each with its ``host``."""
        answers = self.ask_all(hosts, "/api/exchanges", {"service": service, "limit": limit, "since": since})
        merged = []
        for host, answer in answers.items():
            for exchange in answer.get("exchanges", []):
                merged.append({**exchange, "host": host})
        merged.sort(key=lambda x: x.get("ts") or 0, reverse=True)
        return merged[:limit]


class _Task:
    """What the API's recorded-exchange page reads of a task: its state and spec."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.state = status.get("state")
        spec = status.get("spec") or {}
        self.spec = type("Spec", (), {"server": spec.get("server"), "effective_protocol": spec.get("protocol")})()


class _Exchange:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def to_json(self) -> dict[str, Any]:
        return self.data


class FleetRecordings:
    """The agents' recording tasks seen from the fleet server (read only): the list of every
    agent's tasks with their ``host``; a task's status and its recorded exchanges (JSON pages)
    from the agent that holds it.  Tasks are started, stopped and exported (JSON Lines, HAR) on
    that agent (``python -m deetune.record --api http://HOST:PORT``)."""

    def __init__(self, agents: Agents, hosts: Any) -> None:
        self.agents = agents
        #: () → the reporting hosts with an API.
        self.hosts = hosts

    def _refuse(self, what: str) -> Exception:
        from deetune.recording.recorder import RecordingUnavailable

        return RecordingUnavailable(f"{what} a recording task on the agent that records "
                                    "(python -m deetune.record --api http://HOST:PORT); the fleet server only reads them")

    def create(self, data: Any) -> Any:
        raise self._refuse("create")

    def delete(self, task_id: str) -> Any:
        raise self._refuse("delete")

    def stop_task(self, task_id: str) -> Any:
        raise self._refuse("stop")

    def list(self) -> list[dict[str, Any]]:
        tasks = []
        for host, answer in self.agents.ask_all(self.hosts(), "/api/recordings").items():
            tasks += [{**task, "host": host} for task in answer.get("recordings", [])]
        return sorted(tasks, key=lambda t: (t.get("host"), str(t.get("id"))))

    def _holder(self, task_id: str) -> tuple[str, dict[str, Any]]:
        from deetune.recording.recorder import TaskNotFound

        for host in self.hosts():
            base = api_base(host.target, host.api_port, self.agents.scheme)
            if base is None:
                continue
            try:
                return base, {**self.agents.get(base, f"/api/recordings/{urllib.parse.quote(task_id)}"),
                              "host": host.name}
            except AgentError:
                continue
        raise TaskNotFound(task_id)

    def status(self, task_id: str) -> dict[str, Any]:
        return self._holder(task_id)[1]

    def get(self, task_id: str) -> _Task:
        return _Task(self.status(task_id))

    def count_exchanges(self, task_id: str) -> int:
        base, _ = self._holder(task_id)
        return int(self.agents.get(base, f"/api/recordings/{urllib.parse.quote(task_id)}/exchanges",
                                   {"limit": 1})["total"])

    def exchanges(self, task_id: str, *, limit: int | None = None, offset: int = 0, protocol: str | None = None) -> list:
        if limit is None:
            from deetune.recording.tasks import TaskError

            raise TaskError("the fleet server gives recorded exchanges as JSON pages; "
                            "JSON Lines and HAR come from the agent that recorded them")
        base, _ = self._holder(task_id)
        page = self.agents.get(base, f"/api/recordings/{urllib.parse.quote(task_id)}/exchanges",
                               {"limit": limit, "offset": offset})
        return [_Exchange(x) for x in page.get("exchanges", [])]
