"""Traffic recording tasks and replay.

A recording task selects exchanges between two services (as the topology
names them); the agent keeps their full request and response bytes (up to a
limit, redacted) in the store; ``python -m deetune.replay`` re-sends the
requests to a new build and compares the responses.
"""
