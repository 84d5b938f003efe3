"""Preemption: SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next step boundary."""
from __future__ import annotations

import logging
import signal

log = logging.getLogger("train")


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.raised = False
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)
        self.raised = True
