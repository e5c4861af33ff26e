"""The agent's HTTP API (JSON, described by OpenAPI 3.1) and web UI.

:class:`~deetune.api.server.ApiServer` serves any
:class:`~deetune.topology.model.TopologyQueries` (the topology store) from a background
thread; the UI (``static/``) draws the live topology with cytoscape, which ``make ui``
fetches from npm into ``static/vendor/``.
"""

import os

#: Where ``--api`` alone serves: loopback only.
DEFAULT_API_HOST, DEFAULT_API_PORT = "127.0.0.1", 9477
#: The token an agent with the default store makes at its first start (``STORE.api-token``).
DEFAULT_TOKEN_FILE = "/var/lib/deetune/deetune.db.api-token"

__all__ = ["ApiServer", "openapi_document", "DEFAULT_API_HOST", "DEFAULT_API_PORT", "DEFAULT_TOKEN_FILE",
           "default_token"]


def default_token(token_file: str | None = None) -> str | None:
    """The token a client of the API uses when given none: ``$DEETUNE_API_TOKEN``, else the
    first line of ``token_file`` (default: the agent's with the default store), when readable."""
    token = os.environ.get("DEETUNE_API_TOKEN")
    if token:
        return token
    try:
        with open(token_file or DEFAULT_TOKEN_FILE, encoding="ascii") as file:
            return file.readline().strip() or None
    except (OSError, UnicodeDecodeError):
        if token_file is not None:
            raise
        return None


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
