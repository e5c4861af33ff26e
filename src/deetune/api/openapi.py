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
_RECORDING_ERRORS = {
    **_ERRORS,
    "404": {"$ref": "#/components/responses/NoRecording"},
    "405": {"$ref": "#/components/responses/NotAllowed"},
}
_RANGE = [_param("since"), _param("until"), _param("window")]
#: Topology reads: the bearer token, except on a loopback-bound API (docs/api.md).
_SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}, {}]
#: Payload content and recording tasks: the bearer token always.
_TOKEN: list[dict[str, list[str]]] = [{"bearerAuth": []}]

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
            "decoded", "unparsed", "unsolicited",
        ],
        "properties": {
            "requests": {"type": "integer", "minimum": 0,
                         "description": "every exchange, counted in the kernel (exact, never sampled)"},
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
            "decoded": {"type": "integer", "minimum": 0,
                        "description": "exchanges decoded in detail (sampled under load): the detail's coverage "
                                       "is decoded / requests"},
            "unparsed": {"type": "integer", "minimum": 0,
                         "description": "chunks the kernel's counting could not follow: requests is then a lower bound"},
            "unsolicited": {"type": "integer", "minimum": 0,
                            "description": "replies no request asked for (pub/sub messages, older connections)"},
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
        "properties": {
            "status": {"enum": ["ok", "degraded"],
                       "description": "degraded: the store cannot write now, or did not persist everything"},
            "version": {"type": "string"},
            "store": {
                "type": "object",
                "description": "the agent's store writer (absent without one)",
                "properties": {
                    "writing": {"type": "boolean"}, "failed_commits": {"type": "integer"},
                    "pending_events": {"type": "integer"}, "dropped_events": {"type": "integer"},
                    "lost_events": {"type": "integer"}, "unwritten_exchanges": {"type": "integer"},
                    "last_error": {"type": ["string", "null"]},
                },
            },
        },
    },
    "RecordingTask": {
        "type": "object",
        "description": "What a recording task records (docs/recording.md). Only `server` is required. An endpoint "
                       "filter implies its protocol: `method`/`path` http, `command` redis, `statement` mysql.",
        "required": ["server"],
        "additionalProperties": False,
        "properties": {
            "server": {"type": "string", "minLength": 1, "maxLength": 256, "pattern": "\\S",
                       "description": "the server service, as the topology names it"},
            "client": {"type": ["string", "null"], "minLength": 1, "maxLength": 256, "pattern": "\\S",
                       "description": "only exchanges from this client service"},
            "protocol": {"type": ["string", "null"], "pattern": "^[a-z][a-z0-9_.-]{0,31}$",
                         "description": "http, redis, mysql, or a plugin's protocol"},
            "method": {"type": ["string", "null"], "pattern": "^[A-Za-z][A-Za-z_-]{0,31}$",
                       "description": "HTTP method"},
            "path": {"type": ["string", "null"], "minLength": 1, "maxLength": 1024,
                     "description": "HTTP path glob (fnmatch, the path without its query)"},
            "command": {"type": ["string", "null"], "pattern": "^[A-Za-z][A-Za-z0-9_.|-]{0,63}$",
                        "description": "Redis command"},
            "statement": {"type": ["string", "null"], "minLength": 0, "maxLength": 1024,
                          "description": "MySQL statement: a regular expression searched in the statement text"},
            "duration": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 2592000,
                         "description": "stop after this many seconds running"},
            "count": {"type": ["integer", "null"], "minimum": 1, "maximum": 10000000,
                      "description": "stop after this many exchanges recorded"},
            "limit": {"type": ["integer", "null"], "minimum": 1, "maximum": 65536, "default": 65536,
                      "description": "bytes kept per message (request, response)"},
            "sample": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1,
                       "description": "fraction of the matching exchanges recorded (deterministic)"},
            "webhook": {"type": ["string", "null"], "format": "uri", "pattern": "^https?://[^/?#]+",
                        "maxLength": 2048, "description": "POSTed the task's status when it ends"},
            "redact": {
                "type": ["object", "null"],
                "additionalProperties": False,
                "properties": {
                    "defaults": {"type": "boolean", "default": True,
                                 "description": "the built-in rules (Authorization, Cookie, Set-Cookie, MySQL and "
                                                "Redis authentication)"},
                    "headers": {"type": "array", "maxItems": 32,
                                "items": {"type": "string", "pattern": "^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$"}},
                    "json": {"type": "array", "maxItems": 32,
                             "items": {"type": "string", "pattern": "^(\\*\\*\\.)?[^.\\s]+(\\.[^.\\s]+)*$",
                                       "maxLength": 512}},
                    "patterns": {"type": "array", "maxItems": 32,
                                 "items": {"type": "string", "minLength": 1, "maxLength": 512}},
                },
            },
        },
    },
    "Recording": {
        "type": "object",
        "description": "A recording task's status.",
        "required": ["id", "state", "spec", "created", "started", "ended", "matched", "recorded", "dropped",
                     "dropped_by", "bytes", "ports", "error", "webhook_status"],
        "properties": {
            "id": {"type": "string", "pattern": "^rec-[0-9a-f]{12}$"},
            "state": {"enum": ["pending", "running", "completed", "stopped", "failed"]},
            "spec": {"type": "object", "description": "the task as given, with defaults filled in"},
            "created": _NS_INT,
            "started": {"type": ["integer", "null"], "description": _NS},
            "ended": {"type": ["integer", "null"], "description": _NS},
            "matched": {"type": "integer", "minimum": 0},
            "recorded": {"type": "integer", "minimum": 0},
            "dropped": {"type": "integer", "minimum": 0},
            "dropped_by": {
                "type": "object",
                "required": ["sampling", "capture", "queue"],
                "properties": {"sampling": {"type": "integer"}, "capture": {"type": "integer"},
                               "queue": {"type": "integer"}},
            },
            "bytes": {"type": "integer", "minimum": 0, "description": "payload bytes recorded"},
            "ports": {"type": "array", "items": {"type": "integer"}, "description": "server ports recorded"},
            "error": {"type": ["string", "null"]},
            "webhook_status": {"type": ["string", "null"]},
        },
    },
    "RecordingList": {
        "type": "object",
        "required": ["recordings"],
        "properties": {"recordings": {"type": "array", "items": _ref("Recording")}},
    },
    "RecordedExchange": {
        "type": "object",
        "description": "A recorded exchange (deetune.recording.model.RecordedExchange.to_json): bytes in base64.",
        "required": ["task_id", "seq", "ts", "protocol", "client", "server", "method", "target", "status", "error",
                     "request", "response", "request_size", "response_size", "request_truncated",
                     "response_truncated", "redactions"],
        "properties": {
            "task_id": {"type": "string"},
            "seq": {"type": "integer", "minimum": 0},
            "ts": _NS_INT,
            "protocol": {"type": "string"},
            "client": {"type": "string"},
            "server": {"type": "string"},
            "method": {"type": "string"},
            "target": {"type": "string"},
            "status": {"type": ["integer", "string", "null"]},
            "error": {"type": "boolean"},
            "request": {"type": "string", "contentEncoding": "base64"},
            "response": {"type": "string", "contentEncoding": "base64"},
            "request_size": {"type": "integer"},
            "response_size": {"type": "integer"},
            "request_truncated": {"type": "boolean"},
            "response_truncated": {"type": "boolean"},
            "latency_ns": _INT_OR_NULL,
            "duration_ns": _INT_OR_NULL,
            "error_message": {"type": ["string", "null"]},
            "server_address": {"type": "string"},
            "server_port": {"type": "integer"},
            "attributes": {"type": "object"},
            "redactions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "RecordedExchangePage": {
        "type": "object",
        "required": ["task", "state", "total", "offset", "limit", "exchanges"],
        "properties": {
            "task": {"type": "string"},
            "state": {"type": "string"},
            "total": {"type": "integer", "minimum": 0},
            "offset": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer", "minimum": 1},
            "exchanges": {"type": "array", "items": _ref("RecordedExchange")},
        },
    },
    "Har": {
        "type": "object",
        "description": "HAR 1.2 (http://www.softwareishard.com/blog/har-12-spec/)",
        "required": ["log"],
        "properties": {
            "log": {
                "type": "object",
                "required": ["version", "creator", "entries"],
                "properties": {
                    "version": {"const": "1.2"},
                    "creator": {"type": "object", "required": ["name", "version"]},
                    "entries": {"type": "array", "items": {
                        "type": "object",
                        "required": ["startedDateTime", "time", "request", "response", "cache", "timings"],
                    }},
                },
            },
        },
    },
    "Deleted": {
        "type": "object",
        "required": ["deleted"],
        "properties": {"deleted": {"type": "string"}},
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
    "task": {
        "name": "id", "in": "path", "required": True,
        "description": "Recording task id (`rec-` and 12 hex digits).",
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
    "NoRecording": _json(_ref("Error"), "No such recording task, or recording is not available on this agent "
                                        "(it runs without the payload probe or without a store)."),
    "NotAllowed": {
        **_json(_ref("Error"), "The method is not one this path takes."),
        "headers": {"Allow": {"schema": {"type": "string"}}},
    },
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
            "summary": "The most recent decoded exchanges the store kept: every error and, per edge and window, the most recent others (--exchanges-per-edge)",
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
            "security": _TOKEN,
            "responses": {"200": _json(_ref("ExchangeList"), "The exchanges, most recent first."), **_ERRORS},
        }
    },
    "/api/recordings": {
        "get": {
            "operationId": "listRecordings",
            "summary": "Every recording task with its status",
            "security": _TOKEN,
            "responses": {"200": _json(_ref("RecordingList"), "The tasks, oldest first."), **_RECORDING_ERRORS},
        },
        "post": {
            "operationId": "createRecording",
            "summary": "Start a recording task (it takes effect at once, without restarting the agent)",
            "security": _TOKEN,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("RecordingTask")}}},
            "responses": {
                "201": {**_json(_ref("Recording"), "The task, pending until the pipeline picks it up (at once)."),
                        "headers": {"Location": {"schema": {"type": "string"}}}},
                "403": _json(_ref("Error"), "A browser's cross-origin request."),
                "413": _json(_ref("Error"), "The body is larger than 64 KiB."),
                "415": _json(_ref("Error"), "The body is not application/json."),
                **_RECORDING_ERRORS,
            },
        },
    },
    "/api/recordings/{id}": {
        "get": {
            "operationId": "getRecording",
            "summary": "A recording task's status: state, counters, ports",
            "parameters": [_param("task")],
            "security": _TOKEN,
            "responses": {"200": _json(_ref("Recording"), "The task."), **_RECORDING_ERRORS},
        },
        "delete": {
            "operationId": "deleteRecording",
            "summary": "Delete a task and its exchanges (a running task stops first)",
            "parameters": [_param("task")],
            "security": _TOKEN,
            "responses": {"200": _json(_ref("Deleted"), "Deleted."),
                          "403": _json(_ref("Error"), "A browser's cross-origin request."),
                          **_RECORDING_ERRORS},
        },
    },
    "/api/recordings/{id}/stop": {
        "post": {
            "operationId": "stopRecording",
            "summary": "Stop a pending or running task (its exchanges stay)",
            "parameters": [_param("task")],
            "security": _TOKEN,
            "responses": {"200": _json(_ref("Recording"), "The task, stopped."),
                          "403": _json(_ref("Error"), "A browser's cross-origin request."),
                          "409": _json(_ref("Error"), "The task has ended already."),
                          **_RECORDING_ERRORS},
        },
    },
    "/api/recordings/{id}/exchanges": {
        "get": {
            "operationId": "listRecordedExchanges",
            "summary": "A task's recorded exchanges: a JSON page, JSON Lines (what replay reads) or HAR 1.2",
            "parameters": [
                _param("task"),
                {"name": "format", "in": "query", "required": False,
                 "description": "`json` (a page), `jsonl` (one RecordedExchange a line, streamed), `har` (HTTP).",
                 "schema": {"enum": ["json", "jsonl", "har"], "default": "json"}},
                {"name": "limit", "in": "query", "required": False,
                 "description": "Exchanges at most: json 1–1000 (default 100); jsonl and har 1–10000000 "
                                "(default: all).",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 10000000}},
                {"name": "offset", "in": "query", "required": False, "description": "Exchanges skipped first.",
                 "schema": {"type": "integer", "minimum": 0, "maximum": 9223372036854775807, "default": 0}},
            ],
            "security": _TOKEN,
            "responses": {
                "200": {"description": "The exchanges in sequence order.", "content": {
                    "application/json": {"schema": {"oneOf": [_ref("RecordedExchangePage"), _ref("Har")]}},
                    "application/x-ndjson": {"schema": {"type": "string"}},
                }},
                **_RECORDING_ERRORS,
            },
        },
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
        "description": "Service topology seen by the deetune eBPF agent, and its traffic recording tasks. "
                       "Times are nanoseconds since the Unix epoch (UTC). Errors are "
                       "`{\"error\": \"one line\"}`. When the agent is given a token, every /api/* request "
                       "needs `Authorization: Bearer <token>`.",
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
    from deetune.api.routes import OPENAPI_PATHS  # the endpoints the agent and the fleet server share

    document = copy.deepcopy(_DOCUMENT)
    document["paths"].update(copy.deepcopy(OPENAPI_PATHS))
    return document
