"""Counting skipped and replaced samples, with rate-limited logging.

Long jobs must not stop on bad data, and must not hide it: every skip is counted by reason,
and a warning is logged at most once per `interval` seconds per reason.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger("infd.data")


class SkipCounter:
    def __init__(self, interval: float = 30.0):
        self.counts: Counter = Counter()
        self.interval = interval
        self._last_log: dict[str, float] = {}

    def add(self, reason: str, detail: str = "", n: int = 1) -> None:
        self.counts[reason] += n
        now = time.monotonic()
        if now - self._last_log.get(reason, -1e9) >= self.interval:
            self._last_log[reason] = now
            log.warning("skipped sample (%s, %d so far): %s", reason, self.counts[reason], detail[:300])

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)


def merge_counts(per_worker: dict[int, dict[str, int]]) -> dict[str, int]:
    """Totals over workers (each worker reports its cumulative counts)."""
    total: Counter = Counter()
    for counts in per_worker.values():
        total.update(counts)
    return dict(total)
