"""The fleet server: ``python -m deetune.server`` (docs/fleet.md).

It builds the topology of every host that runs an agent from a Prometheus that scrapes them
all (:mod:`deetune.server.fleet`), keeps no per-request state, and serves the agent's API and
web UI over the whole fleet; per-request detail is fetched from the agent that holds it
(:mod:`deetune.server.agents`).  :mod:`deetune.server.scrape` writes the Prometheus config.
"""

DEFAULT_SERVER_HOST, DEFAULT_SERVER_PORT = "127.0.0.1", 9478
