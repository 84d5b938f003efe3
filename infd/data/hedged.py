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

import os
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Callable, TypeVar

T = TypeVar("T")
HEDGES = {"fired": 0, "won": 0}
# Requests in flight per process, twins and stragglers included; threads are made only as needed.
POOL_THREADS = 64
_pools: dict[int, "_DaemonPool"] = {}
_lock = threading.Lock()


class _DaemonPool:
    """Up to `size` daemon threads running submitted calls: a request hanging at exit (a straggler whose
    twin already answered) does not hold the process, as ThreadPoolExecutor's joined threads would."""

    def __init__(self, size: int):
        self.size, self.threads, self.idle = size, 0, 0
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()

    def submit(self, fn: Callable[[], T]) -> Future:
        future: Future = Future()
        self.jobs.put((fn, future))
        with self.lock:
            if self.idle == 0 and self.threads < self.size:
                self.threads += 1
                threading.Thread(target=self._work, name="hedged-read", daemon=True).start()
            else:
                self.idle -= 1 if self.idle else 0
        return future

    def _work(self) -> None:
        while True:
            fn, future = self.jobs.get()
            try:
                future.set_result(fn())
            except BaseException as err:  # noqa: BLE001 (handed to the caller)
                future.set_exception(err)
            with self.lock:
                self.idle += 1


def _pool() -> _DaemonPool:
    """One pool per process (a forked loader worker must not use its parent's threads)."""
    pid = os.getpid()
    with _lock:
        if pid not in _pools:
            _pools[pid] = _DaemonPool(POOL_THREADS)
        return _pools[pid]


def hedged(fetch: Callable[[], T], hedge_after_s: float) -> T:
    """fetch(), and a second fetch() if the first has not returned after hedge_after_s (0: never)."""
    if hedge_after_s <= 0:
        return fetch()
    pool = _pool()
    first = pool.submit(fetch)
    done, _ = wait([first], timeout=hedge_after_s)
    if done:
        return first.result()
    with _lock:
        HEDGES["fired"] += 1
    second = pool.submit(fetch)
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
