"""A small client of Prometheus's HTTP API (``/api/v1/query``, ``/api/v1/query_range``).

Queries go as POST forms (long label regexes fit), answers are parsed with orjson; several
queries run side by side (:meth:`Prometheus.many`), as Prometheus evaluates them concurrently.
Any failure is a :class:`PrometheusError` with one line saying what and where.
"""

from __future__ import annotations

import concurrent.futures
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

#: (labels, value) of one series of an instant vector.
Sample = tuple[dict[str, str], float]
#: (labels, [(unix seconds, value), …]) of one series of a range query.
Series = tuple[dict[str, str], list[tuple[float, float]]]


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
                 workers: int = 8) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"Prometheus URL must be http(s)://HOST:PORT, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.headers = dict(headers or {})
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deetune-promql")

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def _post(self, path: str, form: dict[str, str]) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", data=urllib.parse.urlencode(form).encode(),
                                         headers={"Content-Type": "application/x-www-form-urlencoded", **self.headers})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = orjson.loads(response.read())
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

    def many(self, queries: dict[str, tuple[str, float]]) -> dict[str, list[Sample]]:
        """Several instant queries ``{name: (expr, at)}`` side by side."""
        futures = {name: self._pool.submit(self.query, expr, at) for name, (expr, at) in queries.items()}
        return {name: future.result() for name, future in futures.items()}
