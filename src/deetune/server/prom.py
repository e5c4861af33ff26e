"""A small client of Prometheus's HTTP API (``/api/v1/query``, ``/api/v1/query_range``).

Queries go as POST forms (long label regexes fit), answers are parsed with orjson; several
queries run side by side (:meth:`Prometheus.many`, a few at a time), as Prometheus evaluates them
concurrently.
Any failure is a :class:`PrometheusError` with one line saying what and where.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

#: (labels, value) of one series of an instant vector.
Sample = tuple[dict[str, str], float]
#: (labels, [(unix seconds, value), …]) of one series of a range query.
Series = tuple[dict[str, str], list[tuple[float, float]]]
#: (labels, value at the first time or None, value at the second time or None) of one series.
Pair = tuple[dict[str, str], "float | None", "float | None"]


class PrometheusError(RuntimeError):
    """Prometheus could not be asked, or refused the query (one-line message)."""


def quote_regex(values: Any) -> str:
    """An anchored PromQL regex matching exactly these values (``a|b\\.c``), in a string literal."""
    return "|".join(re.escape(str(v)).replace("\\", "\\\\").replace('"', '\\"') for v in sorted(set(values)))


def quote(value: str) -> str:
    """A PromQL string literal's inside."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Prometheus:
    def __init__(self, url: str, *, timeout: float = 30.0, headers: dict[str, str] | None = None,
                 workers: int = 8, in_flight: int = 3) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"Prometheus URL must be http(s)://HOST:PORT, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.headers = dict(headers or {})
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deetune-promql")
        #: At most this many of one :meth:`many` call's queries asked at a time (see there).
        self.in_flight = max(1, in_flight)
        self._local = threading.local()  # .gate: the many() call's semaphore a pool thread asks under

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _post(self, path: str, form: dict[str, str]) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", data=urllib.parse.urlencode(form).encode(),
                                         headers={"Content-Type": "application/x-www-form-urlencoded", **self.headers})
        gate = getattr(self._local, "gate", None) or contextlib.nullcontext()
        try:
            with gate:  # released once the answer is in: the next query is asked while this one is parsed
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            body = orjson.loads(raw)
        except urllib.error.HTTPError as exc:
            try:
                detail = orjson.loads(exc.read()).get("error", "")
            except (ValueError, AttributeError):
                detail = ""
            raise PrometheusError(f"Prometheus at {self.url} answered {exc.code}: {detail or exc.reason}") from None
        except (OSError, ValueError) as exc:
            raise PrometheusError(f"cannot query Prometheus at {self.url}: {getattr(exc, 'reason', None) or exc}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"Prometheus at {self.url}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str, at: float) -> list[Sample]:
        """An instant query evaluated at ``at`` (Unix seconds): its series' labels and values."""
        data = self._post("/api/v1/query", {"query": expr, "time": f"{at:.3f}"})
        if data["resultType"] != "vector":
            raise PrometheusError(f"expected a vector from {expr!r}, got a {data['resultType']}")
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[Series]:
        data = self._post("/api/v1/query_range",
                          {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:.3f}"})
        return [(item["metric"], [(float(t), float(v)) for t, v in item["values"]]) for item in data["result"]]

    def query_pair(self, expr: str, first: float, second: float) -> list[Pair]:
        """``expr`` evaluated at ``first`` and at ``second`` (Unix seconds, to the millisecond), as
        two instant queries would be, but as one range query of two steps: Prometheus selects the
        series and sends their labels once.  A series absent at a time has None there."""
        texts = (f"{first:.3f}", f"{second:.3f}")
        start, end = (int(t.replace(".", "")) for t in texts)  # milliseconds, as Prometheus reads them
        if end <= start:  # one time, or backwards: two instant queries
            at_first, at_second = self.query(expr, first), self.query(expr, second)
            keyed: dict[tuple, list] = {}
            for index, result in enumerate((at_first, at_second)):
                for labels, value in result:
                    keyed.setdefault(tuple(sorted(labels.items())), [labels, None, None])[1 + index] = value
            return [tuple(entry) for entry in keyed.values()]  # type: ignore[misc]
        # The step as a duration in ms: a float of seconds could land a millisecond short of `second`.
        data = self._post("/api/v1/query_range", {"query": expr, "start": texts[0], "end": texts[1],
                                                  "step": f"{end - start}ms"})
        out: list[Pair] = []
        for item in data["result"]:
            values = item["values"]
            if len(values) == 2:  # the two steps, in time order
                out.append((item["metric"], float(values[0][1]), float(values[1][1])))
                continue
            at_first = at_second = None
            for t, v in values:
                if round(t * 1000) == start:
                    at_first = float(v)
                else:
                    at_second = float(v)
            out.append((item["metric"], at_first, at_second))
        return out

    def many(self, queries: dict[str, tuple], each: Any = None) -> dict[str, list]:
        """Several queries side by side: ``{name: (expr, at)}`` an instant query (its
        :data:`Sample` list), ``{name: (expr, first, second)}`` a :meth:`query_pair` (its
        :data:`Pair` list).  With ``each``, ``each(name, answer)`` is called in this thread as each
        answer arrives, and nothing is returned: the caller reads it while Prometheus evaluates the
        others, instead of reading them all after the last.

        At most :attr:`in_flight` asked at a time, the next asked as soon as one's answer is in
        (before it is parsed: parsing holds the GIL, and Prometheus would wait for it): a whole
        fleet's large answers then arrive one after another, each parsed here while Prometheus
        evaluates the next, instead of all at once after it evaluated them all side by side (and
        held them all in its memory).  On the benchmark's fleet (docs/performance.md) 3 beside
        Prometheus on 2 CPUs: 0.1 s faster than all 5 at once and a tenth less of Prometheus's CPU."""
        gate = threading.Semaphore(self.in_flight)
        if each is not None:
            return self._each(queries, each, gate)
        futures = {name: self._pool.submit(self._gated, gate, self.query if len(args) == 2 else self.query_pair, *args)
                   for name, args in queries.items()}
        for future in concurrent.futures.as_completed(futures.values()):
            if future.exception() is not None:
                for other in futures.values():
                    other.cancel()  # those not begun; the others asked already still end
                future.result()  # raises its error
        return {name: future.result() for name, future in futures.items()}

    def _each(self, queries: dict[str, tuple], each: Any, gate: threading.Semaphore) -> dict[str, list]:
        """:meth:`many` with ``each``: the answers go through a queue, not futures, so that each
        is let go once read (its objects freed while Prometheus evaluates the rest, not all after
        the last); nothing is returned.  An error of ``each`` is raised here, the queries not yet
        asked left unasked."""
        arrived: queue.SimpleQueue = queue.SimpleQueue()

        def ask(name: str, args: tuple) -> None:
            try:
                arrived.put((name, self._gated(gate, self.query if len(args) == 2 else self.query_pair, *args), None))
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
                arrived.put((name, None, exc))

        futures = [self._pool.submit(ask, name, args) for name, args in queries.items()]
        for _ in futures:
            try:
                name, answer, error = arrived.get()
                if error is not None:
                    raise error
                each(name, answer)
            except BaseException:
                for future in futures:
                    future.cancel()  # those not begun: nobody reads them (those begun still end)
                raise
            del answer
        return {}

    def _gated(self, gate: threading.Semaphore, fn: Any, *args: Any) -> Any:
        self._local.gate = gate
        try:
            return fn(*args)
        finally:
            self._local.gate = None
