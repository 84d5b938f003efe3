"""Preemption: SIGTERM / SIGUSR1 / SIGUSR2 set a flag; the loop checkpoints at the next step boundary.

A handler that was there before (submitit's SIGUSR2 handler requeues a sweep job on its time
limit) is called afterwards, by `forward()`, once the checkpoint is saved and the group closed.
"""
from __future__ import annotations

import logging
import signal

log = logging.getLogger("train")


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)):
        self.raised, self.signum = False, None
        self.previous = {}
        for sig in signals:
            before = signal.signal(sig, self._handle)
            owner = getattr(before, "__self__", None)
            # A flag of an earlier job in this process (local sweeps): keep what it replaced.
            self.previous[sig] = owner.previous.get(sig) if isinstance(owner, PreemptionFlag) else before

    def _handle(self, signum, frame) -> None:
        log.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)
        self.raised, self.signum = True, signum

    def forward(self) -> None:
        """Call the handler the received signal had before ours, if it had a callable one."""
        handler = self.previous.get(self.signum)
        if self.raised and callable(handler):
            handler(self.signum, None)
