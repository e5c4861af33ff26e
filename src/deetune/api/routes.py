"""API endpoints beyond :class:`~deetune.topology.model.TopologyQueries`, shared by the agent and
the fleet server (one UI for both).

``GET /api/series``
    RED over time of a service (``service=NAME``: what it serves) or an edge (``client``,
    ``server``, ``protocol``, ``port``), over the time range (``since``/``until``/``window``)
    in ``step``s (``30s``, ``5m``; default: the range in 60 steps, at least 10 s):
    ``{"since", "until", "step", "points": [{"t", "requests", "errors", "latency_p50_ns",
    "latency_p99_ns"}]}``, ``t`` the end of each step.  A data source with a ``series``
    method (the fleet server) answers itself; otherwise the edges of each step are asked of
    the store, and a service's latency is its slowest incoming edge's.
``GET /api/hosts``
    The hosts reporting, with their labels: a data source with ``host_list`` (the fleet)
    answers; an agent answers with its own place (:class:`AgentPlaceRoutes`).
``GET /api/cross-idc``
    The edges whose client and server hosts are in different IDCs (fleet only).

An extension's ``handle_api(parts, query, now_ns)`` returns the answer, or None when the path
is not one of its own.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from deetune.api.server import _TIME_PARAMS, HttpError, _bad, _parse_int, _Params, parse_window

NS = 1_000_000_000
MAX_POINTS = 1000
DEFAULT_POINTS = 60
MIN_STEP_NS = 10 * NS


def _step(params: _Params, since: int, until: int) -> int:
    text = params.get("step")
    if text is None:
        step = max(MIN_STEP_NS, -(-(until - since) // DEFAULT_POINTS))
        return -(-step // NS) * NS  # whole seconds
    step = parse_window(text, "step")
    if (until - since) // step > MAX_POINTS:
        raise _bad(f"step {text} makes more than {MAX_POINTS} points over the range")
    return step


def _edge_params(params: _Params) -> tuple[str, str, str, int] | None:
    names = ("client", "server", "protocol", "port")
    given = [params.get(n) for n in names]
    if all(v is None for v in given):
        return None
    if any(v is None or v == "" for v in given):
        raise _bad("an edge needs client, server, protocol and port")
    return given[0], given[1], given[2], _parse_int(given[3] or "", "port", 0, 65535)


def step_series(queries: Any, since: int, until: int, step: int, *, service: str | None,
                edge: tuple[str, str, str, int] | None) -> dict[str, Any]:
    """RED per step from a store's ``edges()`` (one query per step)."""
    points = []
    start = until - ((until - since) // step) * step
    for t in range(start + step, until + 1, step):
        edges = queries.edges(t - step, t, service=edge[1] if edge else service)
        if edge is not None:
            edges = [e for e in edges if (e["client"], e["server"], e["protocol"], e["port"]) == edge]
        else:
            edges = [e for e in edges if e["server"] == service]
        p50 = [e["latency_p50_ns"] for e in edges if e.get("latency_p50_ns") is not None]
        p99 = [e["latency_p99_ns"] for e in edges if e.get("latency_p99_ns") is not None]
        points.append({"t": t, "requests": sum(e["requests"] for e in edges), "errors": sum(e["errors"] for e in edges),
                       "latency_p50_ns": max(p50) if p50 else None, "latency_p99_ns": max(p99) if p99 else None})
    return {"since": since, "until": until, "step": step, "points": points}


class SharedRoutes:
    """``/api/series``, ``/api/hosts``, ``/api/cross-idc`` over any data source (module doc)."""

    def __init__(self, queries: Any) -> None:
        self.queries = queries

    def handle_api(self, parts: list[str], query: str, now: int) -> Any:
        q = self.queries
        if parts == ["series"]:
            params = _Params(query, (*_TIME_PARAMS, "step", "service", "client", "server", "protocol", "port"))
            since, until = params.time_range(now)
            step = _step(params, since, until)
            edge = _edge_params(params)
            service = params.service()
            if (edge is None) == (service is None):
                raise _bad("give service, or client, server, protocol and port")
            if hasattr(q, "series"):
                return q.series(since, until, step, service=service, edge=edge)
            return step_series(q, since, until, step, service=service, edge=edge)
        if parts == ["hosts"]:
            if not hasattr(q, "host_list"):  # an agent answers with its place (AgentPlaceRoutes) first
                raise HttpError(HTTPStatus.NOT_FOUND, "no hosts here: neither an agent's place nor a fleet")
            params = _Params(query, _TIME_PARAMS)
            since, until = params.time_range(now)
            return q.host_list(since, until)
        if parts == ["cross-idc"]:
            if not hasattr(q, "cross_idc"):
                raise HttpError(HTTPStatus.NOT_FOUND, "cross-IDC edges come from the fleet server (python -m deetune.server)")
            params = _Params(query, _TIME_PARAMS)
            since, until = params.time_range(now)
            return q.cross_idc(since, until)
        return None


class AgentPlaceRoutes:
    """``/api/hosts`` on an agent: itself, with its labels."""

    def __init__(self, place: Any) -> None:
        self.place = place

    def handle_api(self, parts: list[str], query: str, now: int) -> Any:
        if parts != ["hosts"]:
            return None
        params = _Params(query, _TIME_PARAMS)
        since, until = params.time_range(now)
        labels = self.place.label_dict
        return {"since": since, "until": until, "idc_label": "idc",
                "hosts": [{"name": self.place.host, "labels": labels, "idc": labels.get("idc"), "reporting": True}]}


def _range_params() -> list[dict[str, str]]:
    return [{"$ref": f"#/components/parameters/{name}"} for name in ("since", "until", "window")]


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


_ERRORS = {code: {"$ref": f"#/components/responses/{name}"}
           for code, name in (("400", "BadRequest"), ("401", "Unauthorized"), ("500", "InternalError"))}
_SECURITY = [{"bearerAuth": []}, {}]
_NULLABLE_INT = {"type": ["integer", "null"]}

#: These endpoints in the OpenAPI document (merged by deetune.api.openapi).
OPENAPI_PATHS: dict[str, Any] = {
    "/api/series": {"get": {
        "operationId": "getSeries",
        "summary": "RED over time of a service (what it serves) or of an edge",
        "parameters": [
            *_range_params(),
            _query("step", "Step: 1-4 digits and s, m, h or d; default the range in 60 steps (at least 10 s).",
                   {"type": "string", "pattern": "^[1-9][0-9]{0,3}[smhd]$"}),
            _query("service", "A service (or give the edge's four parameters).", {"type": "string", "minLength": 1}),
            _query("client", "The edge's client service.", {"type": "string", "minLength": 1}),
            _query("server", "The edge's server service.", {"type": "string", "minLength": 1}),
            _query("protocol", "The edge's protocol.", {"type": "string", "minLength": 1}),
            _query("port", "The edge's server port.", {"type": "integer", "minimum": 0, "maximum": 65535}),
        ],
        "security": _SECURITY,
        "responses": {"200": {"description": "One point per step, `t` its end.", "content": {"application/json": {
            "schema": {"type": "object", "required": ["since", "until", "step", "points"], "properties": {
                "since": {"type": "integer"}, "until": {"type": "integer"}, "step": {"type": "integer"},
                "points": {"type": "array", "items": {"type": "object",
                           "required": ["t", "requests", "errors", "latency_p50_ns", "latency_p99_ns"],
                           "properties": {"t": {"type": "integer"}, "requests": {"type": "integer"},
                                          "errors": {"type": "integer"}, "latency_p50_ns": _NULLABLE_INT,
                                          "latency_p99_ns": _NULLABLE_INT}}}}}}}},
                      **_ERRORS},
    }},
    "/api/hosts": {"get": {
        "operationId": "listHosts",
        "summary": "The hosts: an agent's own place, or every host of the fleet (docs/fleet.md)",
        "parameters": _range_params(),
        "security": _SECURITY,
        "responses": {"200": {"description": "Hosts with their labels.", "content": {"application/json": {
            "schema": {"type": "object", "required": ["hosts"], "properties": {"hosts": {"type": "array", "items": {
                "type": "object", "required": ["name", "labels", "reporting"],
                "properties": {"name": {"type": "string"}, "labels": {"type": "object"},
                               "idc": {"type": ["string", "null"]}, "reporting": {"type": "boolean"}}}}}}}}},
                      "404": {"$ref": "#/components/responses/NotFound"}, **_ERRORS},
    }},
    "/api/cross-idc": {"get": {
        "operationId": "listCrossIdcEdges",
        "summary": "Edges between IDCs (the fleet server; 404 on an agent)",
        "parameters": _range_params(),
        "security": _SECURITY,
        "responses": {"200": {"description": "The edges whose client and server hosts are in different IDCs.",
                              "content": {"application/json": {"schema": {
                                  "type": "object", "required": ["edges"],
                                  "properties": {"edges": {"type": "array", "items": {"type": "object"}}}}}}},
                      "404": {"$ref": "#/components/responses/NotFound"}, **_ERRORS},
    }},
}
