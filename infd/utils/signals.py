"""Preemption: a stop signal sets a flag; the loop checkpoints at the next step boundary and exits 0.

The signals are the ones schedulers and launchers send (SIGTERM, SIGINT, SIGHUP, SIGUSR1,
SIGUSR2; see infd/data/workers.py, whose DataLoader workers ignore the same set). Repeats are
logged and change nothing: the checkpoint being written is not interrupted.

A handler that was there before (submitit's SIGUSR2 handler requeues a sweep job on its time
limit) is called afterwards, by `forward()`, once the checkpoint is saved and the group closed.
"""
from __future__ import annotations

import logging
import signal

from infd.data.workers import PREEMPTION_SIGNALS

log = logging.getLogger("train")


class PreemptionFlag:
    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.raised, self.signum = False, None
        self.previous = {}
        self._child_handler = None
        for sig in signals:
            before = signal.signal(sig, self._handle)
            owner = getattr(before, "__self__", None)
            # A flag of an earlier job in this process (local sweeps): keep what it replaced.
            self.previous[sig] = owner.previous.get(sig) if isinstance(owner, PreemptionFlag) else before

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.raised:
            log.warning("received %s again: still stopping after the checkpoint (SIGKILL aborts without one)", name)
            return
        # Everything that must happen once happens before the log call: a repeat (SLURM signals every
        # process of the step and torchrun forwards it too) can land inside that call, and must then
        # find the flag raised and the SIGCHLD handler already saved.
        self.raised, self.signum = True, signum
        self._hold_child_exits()
        log.warning("received %s: will checkpoint and stop after this step", name)

    def _hold_child_exits(self) -> None:
        """From now on a data worker that dies anyway (a SIGKILL, or a signal that reached it
        before it could ignore it) must not abort the step in progress: PyTorch's SIGCHLD handler
        would raise inside it, at any point between two collectives. The loop stops fetching data
        and checkpoints; the worker's death is only logged."""
        if hasattr(signal, "SIGCHLD"):
            self._child_handler = signal.signal(signal.SIGCHLD, _log_child_exit)

    def forward(self) -> None:
        """Restore the SIGCHLD handler, then call the handler the received signal had before
        ours, if it had a callable one."""
        if self._child_handler is not None:
            signal.signal(signal.SIGCHLD, self._child_handler)
            self._child_handler = None
        handler = self.previous.get(self.signum)
        if self.raised and callable(handler):
            handler(self.signum, None)


def _log_child_exit(signum, frame) -> None:
    log.debug("a child process exited while stopping (the loader's workers end here too)")
