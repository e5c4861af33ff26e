"""Pairing responses with requests after the framing was lost (shared by the built-in decoders).

A decoder that lost the framing of one direction cannot tell how many messages went by unseen.
It puts a *barrier* in its queue of requests waiting for a response: requests queued behind it
were seen after the loss.  A response then answers the first of the last requests written
together (in one chunk) that ended before the response started: in request/response traffic
that is the request it answers, and a response that started before any of them answers a
request that was not seen.  Requests behind the barrier passed over lost their responses.

That holds only for requests sent once every request before the barrier was answered: a client
that pipelines (more requests written before the responses to the first are read) may be sent
responses to the requests lost long after it wrote the next ones.  A request queued while others
waited ahead of the barrier is therefore never chosen (``eligible`` false): it is passed over.
Later barriers in the queue are passed over too (``end_of`` gives them -1, ``eligible`` false).
"""

from __future__ import annotations

from collections import deque
from typing import Callable, TypeVar

T = TypeVar("T")


def past_barrier(queue: deque[T], start_ns: int, end_of: Callable[[T], int | None],
                 eligible: Callable[[T], bool]) -> list[T] | None:  # fmt: skip
    """For a response that started at ``start_ns``, with a barrier at the head of ``queue``:
    remove the barrier and the requests passed over, and return those (the request answered is
    then at the head); None when the response answers none of the requests queued (it is left
    as it is)."""
    chosen = -1
    for index in range(1, len(queue)):
        end = end_of(queue[index])
        if end is None or end > start_ns:
            break
        if eligible(queue[index]):
            chosen = index
    if chosen < 0:
        return None
    end = end_of(queue[chosen])
    while chosen > 1 and end_of(queue[chosen - 1]) == end and eligible(queue[chosen - 1]):
        chosen -= 1
    queue.popleft()
    return [queue.popleft() for _ in range(chosen - 1)]
