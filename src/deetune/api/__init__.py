"""The agent's HTTP API (JSON, described by OpenAPI 3.1) and web UI.

:class:`~deetune.api.server.ApiServer` serves any
:class:`~deetune.topology.model.TopologyQueries` (the topology store) from a background
thread; the UI (``static/``) draws the live topology with cytoscape, which ``make ui``
fetches from npm into ``static/vendor/``.
"""

from deetune.api.openapi import openapi_document
from deetune.api.server import ApiServer

__all__ = ["ApiServer", "openapi_document"]
