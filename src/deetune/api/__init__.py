"""The agent's HTTP API (JSON, described by OpenAPI 3.1) and web UI.

:class:`~deetune.api.server.ApiServer` serves any
:class:`~deetune.topology.model.TopologyQueries` (the topology store) from a background
thread; the UI (``static/``) draws the live topology with cytoscape, which ``make ui``
fetches from npm into ``static/vendor/``.
"""

#: Where ``--api`` alone serves: loopback only, no token needed.
DEFAULT_API_HOST, DEFAULT_API_PORT = "127.0.0.1", 9477

__all__ = ["ApiServer", "openapi_document", "DEFAULT_API_HOST", "DEFAULT_API_PORT"]


def __getattr__(name: str):
    # Imported on first use: an agent without --api (and the recording CLI, which
    # only needs the defaults above) does not load the HTTP server's modules.
    if name == "ApiServer":
        from deetune.api.server import ApiServer

        return ApiServer
    if name == "openapi_document":
        from deetune.api.openapi import openapi_document

        return openapi_document
    raise AttributeError(f"module 'deetune.api' has no attribute {name!r}")
