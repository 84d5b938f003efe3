"""Reads that do not wait for their slowest request: a second, identical request after a delay, the
first answer wins (hedging, as in Dean & Barroso, "The Tail at Scale", 2013).

With 1000 synchronous ranks a step waits for the slowest of thousands of GETs: a read that one time in
10,000 takes seconds longer stalls a large share of the job's steps. A GET still unanswered after
`hedge_after_s` gets a twin on another connection; whichever answers first is used, and the other runs
on in the background until it ends or its request timeout stops it (its thread is not waited for).
An error of one of the two is ignored while the other may still succeed.

Counts per process (`HEDGES`): fired, won by the second request.
"""
from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Callable, TypeVar

from infd.utils.daemon import start_daemon

T = TypeVar("T")
HEDGES = {"fired": 0, "won": 0}
# Requests a process may have in flight (twins and stragglers included): the S3 connection pool's size.
REQUESTS_IN_FLIGHT = 64
_lock = threading.Lock()


def hedged(fetch: Callable[[], T], hedge_after_s: float) -> T:
    """fetch(), and a second fetch() if the first has not returned after hedge_after_s (0: never)."""
    if hedge_after_s <= 0:
        return fetch()
    # Each request on a daemon thread of its own (a thread start is microseconds against a GET's
    # milliseconds): a straggler still hanging when the process ends does not hold it.
    first = start_daemon(fetch, "hedged-read")
    done, _ = wait([first], timeout=hedge_after_s)
    if done:
        return first.result()
    with _lock:
        HEDGES["fired"] += 1
    second = start_daemon(fetch, "hedged-read")
    return _first_success(first, second)


def _first_success(first: Future, second: Future):
    """The first result of the two; an error only when both failed (the later error)."""
    pending = {first, second}
    while True:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        good = [f for f in done if f.exception() is None]
        if good:
            if second in good:
                with _lock:
                    HEDGES["won"] += 1
            return good[0].result()
        if not pending:
            return next(iter(done)).result()  # raises
