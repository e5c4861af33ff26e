"""Service topology: who calls whom, how much, how fast, how many errors.

- :mod:`deetune.services` names the service behind a process or an endpoint;
- :mod:`deetune.topology.aggregator` turns connection and exchange events into
  per-window edge statistics (a pipeline handler);
- :mod:`deetune.topology.store` keeps them in SQLite and answers queries;
- :mod:`deetune.api` serves the queries over HTTP with a web UI.
"""
