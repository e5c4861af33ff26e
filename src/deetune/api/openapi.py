"""The OpenAPI 3.1 description of the agent's HTTP API (served at ``/openapi.json``).

Response shapes come from :class:`deetune.topology.model.TopologyQueries`: the fields named
there are required; stores may add more (objects allow additional properties).
"""

from __future__ import annotations

import copy
from typing import Any

from deetune import __version__

_NS = "nanoseconds since the Unix epoch (UTC)"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _param(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/parameters/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    "400": {"$ref": "#/components/responses/BadRequest"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "500": {"$ref": "#/components/responses/InternalError"},
}
_NOT_FOUND = {"404": {"$ref": "#/components/responses/NotFound"}}
_RANGE = [_param("since"), _param("until"), _param("window")]
#: /api/* needs the bearer token when the agent was given one; without one, nothing.
_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {}]

_INT_OR_NULL = {"type": ["integer", "null"]}
_NS_INT = {"type": "integer", "minimum": 0, "description": _NS}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "description": "Every error: a one-line message.",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
        "additionalProperties": False,
    },
    "Instance": {
        "type": "object",
        "description": "One running copy of a service (host + pid, + container).",
        "required": ["id"],
        "properties": {
            "id": {"type": "string", "description": "host:pid, plus :container-id-prefix in a container"},
            "service": {"type": "string"},
            "host": {"type": "string"},
            "pid": {"type": "integer"},
            "comm": {"type": "string"},
            "container_id": {"type": ["string", "null"]},
            "container_name": {"type": ["string", "null"]},
            "pod": {"type": ["string", "null"]},
            "namespace": {"type": ["string", "null"]},
            "first_seen": {"type": "integer", "description": _NS},
            "last_seen": {"type": "integer", "description": _NS},
        },
    },
    "Node": {
        "type": "object",
        "description": "A service in the graph.",
        "required": ["name", "instances", "external"],
        "properties": {
            "name": {"type": "string"},
            "instances": {"type": "array", "items": {"oneOf": [_ref("Instance"), {"type": "string"}]}},
            "external": {"type": "boolean", "description": "not running on a watched host (e.g. a remote address)"},
        },
    },
    "EdgeMetrics": {
        "type": "object",
        "description": "Counters of an edge over the time range; latencies in ns, null without samples.",
        "required": [
            "requests", "errors", "latency_p50_ns", "latency_p90_ns", "latency_p99_ns", "latency_avg_ns",
            "bytes_sent", "bytes_received", "connections_opened", "connections_failed", "retransmits", "resets",
        ],
        "properties": {
            "requests": {"type": "integer", "minimum": 0},
            "errors": {"type": "integer", "minimum": 0},
            "latency_p50_ns": _INT_OR_NULL,
            "latency_p90_ns": _INT_OR_NULL,
            "latency_p99_ns": _INT_OR_NULL,
            "latency_avg_ns": _INT_OR_NULL,
            "bytes_sent": {"type": "integer", "minimum": 0, "description": "client → server"},
            "bytes_received": {"type": "integer", "minimum": 0, "description": "server → client"},
            "connections_opened": {"type": "integer", "minimum": 0},
            "connections_failed": {"type": "integer", "minimum": 0},
            "retransmits": {"type": "integer", "minimum": 0},
            "resets": {"type": "integer", "minimum": 0},
        },
    },
    "Edge": {
        "description": "A directed dependency (client calls server) with its metrics.",
        "allOf": [
            {
                "type": "object",
                "required": ["client", "server", "protocol", "port"],
                "properties": {
                    "client": {"type": "string"},
                    "server": {"type": "string"},
                    "protocol": {"type": "string", "description": "http, redis, mysql …, or tcp when undecoded"},
                    "port": {"type": "integer", "minimum": 0, "maximum": 65535, "description": "the server's port"},
                },
            },
            _ref("EdgeMetrics"),
        ],
    },
    "Topology": {
        "type": "object",
        "required": ["nodes", "edges", "since", "until"],
        "properties": {
            "nodes": {"type": "array", "items": _ref("Node")},
            "edges": {"type": "array", "items": _ref("Edge")},
            "since": _NS_INT,
            "until": _NS_INT,
        },
    },
    "Service": {
        "type": "object",
        "description": "A service with its instances, first/last seen and requests in and out.",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "external": {"type": "boolean"},
            "instances": {"type": "array", "items": {"oneOf": [_ref("Instance"), {"type": "string"}]}},
            "first_seen": {"type": ["integer", "null"], "description": _NS},
            "last_seen": {"type": ["integer", "null"], "description": _NS},
            "requests_in": {"type": "integer", "minimum": 0},
            "requests_out": {"type": "integer", "minimum": 0},
        },
    },
    "ServiceList": {
        "type": "object",
        "required": ["since", "until", "services"],
        "properties": {"since": _NS_INT, "until": _NS_INT, "services": {"type": "array", "items": _ref("Service")}},
    },
    "Dependencies": {
        "type": "object",
        "required": ["service", "depth", "direction", "nodes", "edges"],
        "properties": {
            "service": {"type": "string"},
            "depth": {"type": "integer", "minimum": 1},
            "direction": {"enum": ["downstream", "upstream", "both"]},
            "nodes": {
                "type": "array",
                "description": "Services reached, each with its hop distance from `service` (0 for itself).",
                "items": {
                    "type": "object",
                    "required": ["name", "hops"],
                    "properties": {
                        "name": {"type": "string"},
                        "hops": {"type": "integer", "minimum": 0},
                        "external": {"type": "boolean"},
                    },
                },
            },
            "edges": {"type": "array", "items": _ref("Edge")},
        },
    },
    "EdgeList": {
        "type": "object",
        "required": ["since", "until", "edges"],
        "properties": {"since": _NS_INT, "until": _NS_INT, "edges": {"type": "array", "items": _ref("Edge")}},
    },
    "Exchange": {
        "type": "object",
        "description": "A decoded request and its response (the `request` event of the JSONL sink) "
                       "plus the service names of both ends.",
        "required": ["ts", "protocol", "method", "target", "status", "error", "latency_ns", "client", "server"],
        "properties": {
            "type": {"const": "request"},
            "ts": {"type": "integer", "description": f"first request byte, {_NS}"},
            "protocol": {"type": "string"},
            "role": {"enum": ["client", "server"]},
            "pid": {"type": "integer"},
            "comm": {"type": "string"},
            "laddr": {"type": "string"},
            "lport": {"type": "integer"},
            "raddr": {"type": "string"},
            "rport": {"type": "integer"},
            "method": {"type": "string", "description": "HTTP method, Redis command, MySQL command"},
            "target": {"type": "string", "description": "HTTP path and query, Redis key, MySQL statement"},
            "status": {"type": ["integer", "string", "null"]},
            "error": {"type": "boolean"},
            "error_message": {"type": ["string", "null"]},
            "latency_ns": _INT_OR_NULL,
            "duration_ns": _INT_OR_NULL,
            "request_bytes": {"type": "integer"},
            "response_bytes": {"type": "integer"},
            "attributes": {"type": "object"},
            "client": {"type": ["string", "null"], "description": "client service"},
            "server": {"type": ["string", "null"], "description": "server service"},
        },
    },
    "ExchangeList": {
        "type": "object",
        "required": ["exchanges"],
        "properties": {"exchanges": {"type": "array", "items": _ref("Exchange"), "description": "most recent first"}},
    },
    "Health": {
        "type": "object",
        "required": ["status", "version"],
        "properties": {"status": {"const": "ok"}, "version": {"type": "string"}},
    },
}

_TIME_DESCRIPTION = f"{_NS} (an integer), or an RFC 3339 time with its UTC offset (e.g. 2025-01-31T12:00:00Z)"

_PARAMETERS: dict[str, Any] = {
    "since": {
        "name": "since", "in": "query", "required": False,
        "description": f"Start of the time range: {_TIME_DESCRIPTION}. Default: `until` minus `window`. "
                       "Not with `window`.",
        "schema": {"anyOf": [{"type": "string", "pattern": "^[0-9]{1,18}$"}, {"type": "string", "format": "date-time"}]},
    },
    "until": {
        "name": "until", "in": "query", "required": False,
        "description": f"End of the time range: {_TIME_DESCRIPTION}. Default: now.",
        "schema": {"anyOf": [{"type": "string", "pattern": "^[0-9]{1,18}$"}, {"type": "string", "format": "date-time"}]},
    },
    "window": {
        "name": "window", "in": "query", "required": False,
        "description": "Length of the time range ending at `until`: a number and a unit, s, m, h or d "
                       "(30s, 5m, 1h, 1d; 1 to 4 digits). Default 15m. Not with `since`.",
        "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,3}[smhd]$", "default": "15m"},
    },
    "service": {
        "name": "service", "in": "query", "required": False,
        "description": "Only this service's edges (and their ends).",
        "schema": {"type": "string", "minLength": 1, "pattern": "\\S"},
    },
    "name": {
        "name": "name", "in": "path", "required": True,
        "description": "Service name (percent-encoded).",
        "schema": {"type": "string", "minLength": 1},
    },
}

_RESPONSES: dict[str, Any] = {
    "BadRequest": _json(_ref("Error"), "A bad parameter (unknown, repeated, malformed or out of range)."),
    "Unauthorized": {
        **_json(_ref("Error"), "The agent has a token and the request lacks `Authorization: Bearer <token>`."),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    "NotFound": _json(_ref("Error"), "No such endpoint, or no such service in the time range."),
    "InternalError": _json(_ref("Error"), "The store failed (details in the agent's log)."),
}

_PATHS: dict[str, Any] = {
    "/api/topology": {
        "get": {
            "operationId": "getTopology",
            "summary": "The service graph: services (nodes) and who calls whom (edges) with metrics",
            "parameters": [*_RANGE, _param("service")],
            "security": _SECURITY,
            "responses": {"200": _json(_ref("Topology"), "The graph over the time range."), **_ERRORS},
        }
    },
    "/api/services": {
        "get": {
            "operationId": "listServices",
            "summary": "Every service seen in the time range",
            "parameters": _RANGE,
            "security": _SECURITY,
            "responses": {"200": _json(_ref("ServiceList"), "The services."), **_ERRORS},
        }
    },
    "/api/services/{name}": {
        "get": {
            "operationId": "getService",
            "summary": "One service: instances, first/last seen, requests in and out",
            "parameters": [_param("name"), *_RANGE],
            "security": _SECURITY,
            "responses": {"200": _json(_ref("Service"), "The service."), **_ERRORS, **_NOT_FOUND},
        }
    },
    "/api/services/{name}/dependencies": {
        "get": {
            "operationId": "getDependencies",
            "summary": "What a service calls (downstream), who calls it (upstream), or both, to some depth",
            "parameters": [
                _param("name"),
                {
                    "name": "depth", "in": "query", "required": False, "description": "Hops to follow.",
                    "schema": {"type": "integer", "minimum": 1, "maximum": 10, "default": 1},
                },
                {
                    "name": "direction", "in": "query", "required": False,
                    "schema": {"enum": ["downstream", "upstream", "both"], "default": "downstream"},
                },
                *_RANGE,
            ],
            "security": _SECURITY,
            "responses": {"200": _json(_ref("Dependencies"), "The dependencies."), **_ERRORS, **_NOT_FOUND},
        }
    },
    "/api/edges": {
        "get": {
            "operationId": "listEdges",
            "summary": "Edges with their metrics over the time range",
            "parameters": [
                {
                    "name": "errors", "in": "query", "required": False,
                    "description": "Only edges with errors (`true`/`false`, `1`/`0`).",
                    "schema": {"type": "boolean", "default": False},
                },
                _param("service"),
                *_RANGE,
            ],
            "security": _SECURITY,
            "responses": {"200": _json(_ref("EdgeList"), "The edges."), **_ERRORS},
        }
    },
    "/api/exchanges": {
        "get": {
            "operationId": "listExchanges",
            "summary": "The most recent decoded exchanges (requests and their responses)",
            "parameters": [
                _param("service"),
                {
                    "name": "limit", "in": "query", "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                },
                {
                    **_PARAMETERS["since"],
                    "description": f"Only exchanges from this time on: {_TIME_DESCRIPTION}. Not with `window`.",
                },
                {
                    **_PARAMETERS["window"],
                    "description": "Only exchanges of this last period (30s, 5m, 1h, 1d). Not with `since`.",
                    "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,3}[smhd]$"},
                },
            ],
            "security": _SECURITY,
            "responses": {"200": _json(_ref("ExchangeList"), "The exchanges, most recent first."), **_ERRORS},
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "getOpenApi",
            "summary": "This document",
            "responses": {"200": _json({"type": "object"}, "The OpenAPI 3.1 document.")},
        }
    },
    "/healthz": {
        "get": {
            "operationId": "getHealth",
            "summary": "Liveness",
            "responses": {"200": _json(_ref("Health"), "The agent serves.")},
        }
    },
}

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "deetune agent API",
        "version": __version__,
        "description": "Service topology seen by the deetune eBPF agent. Times are nanoseconds since the "
                       "Unix epoch (UTC). Errors are `{\"error\": \"one line\"}`. When the agent is given a "
                       "token, every /api/* request needs `Authorization: Bearer <token>`.",
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    },
    "paths": _PATHS,
    "components": {
        "schemas": _SCHEMAS,
        "parameters": _PARAMETERS,
        "responses": _RESPONSES,
        "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
    },
}


def openapi_document() -> dict[str, Any]:
    """A fresh copy of the document (callers may change it)."""
    return copy.deepcopy(_DOCUMENT)
