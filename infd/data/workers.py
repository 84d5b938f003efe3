"""DataLoader worker processes leave shutdown to their parent.

Clusters stop a job by signalling every process of it (SLURM signals the whole job step, torchrun
and the DeepSpeed launcher signal each rank's process group or tree). A worker that died of that
signal would take the parent's step down with it (PyTorch raises "DataLoader worker ... killed by
signal") before the parent could checkpoint. So workers ignore the preemption signals; the parent
finishes its step, checkpoints, and stops its workers itself. Workers still end with their parent:
PyTorch's watchdog notices within seconds, and on Linux the kernel kills them at once.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from contextlib import contextmanager

# What schedulers and launchers send to stop or warn a job (SIGUSR1/2: SLURM's --signal, submitit).
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1


def ignore_preemption_signals() -> None:
    for sig in PREEMPTION_SIGNALS:
        if sig != signal.SIGTERM:  # see exit_on_sigterm_from
            signal.signal(sig, signal.SIG_IGN)


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the thread that forked it exits (no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


@contextmanager
def preemption_signals_held():
    """Hold the preemption signals while workers are forked (wrap `iter(loader)`): a worker
    inherits them blocked and drops them once it ignores them, so a signal arriving at fork time
    cannot kill it; the parent receives its own copy when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def exit_on_sigterm_from(parent: int) -> None:
    """SIGTERM from `parent` ends this process; from anyone else it is dropped. The DataLoader
    terminates a worker that does not stop by itself with SIGTERM (and multiprocessing does at
    exit): that one must still work. Python handlers do not see the sender, so SIGTERM stays
    blocked in every thread and one thread takes it with sigwaitinfo, which does."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


def init_worker(worker_id: int) -> None:
    """`worker_init_fn` for every DataLoader of the system."""
    exit_on_sigterm_from(os.getppid())
    ignore_preemption_signals()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(PREEMPTION_SIGNALS) - {signal.SIGTERM})
    die_with_parent()
