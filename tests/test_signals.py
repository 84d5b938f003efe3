"""The stop flag against a repeat of the signal that arrives while the first is being handled."""
import logging
import signal

from infd.utils.signals import PreemptionFlag


class _RepeatOnFirstLog(logging.Handler):
    """Records the "train" logger's lines; while the first one is being emitted, raises the
    signal again, as slurmstepd's and torchrun's copies of one stop do on a real cluster."""

    def __init__(self, signum):
        super().__init__()
        self.signum, self.lines = signum, []

    def emit(self, record):
        self.lines.append(record.getMessage())
        if len(self.lines) == 1:
            signal.raise_signal(self.signum)


def test_a_repeat_during_the_first_handlers_log_call_is_a_repeat_and_sigchld_is_restored():
    sentinel = lambda signum, frame: None  # noqa: E731 -- the SIGCHLD handler PyTorch's loader would own
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGCHLD)}
    signal.signal(signal.SIGCHLD, sentinel)
    logger = logging.getLogger("train")
    handler, level = _RepeatOnFirstLog(signal.SIGUSR1), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        flag = PreemptionFlag(signals=(signal.SIGUSR1,))
        signal.raise_signal(signal.SIGUSR1)
        assert flag.raised and flag.signum == signal.SIGUSR1
        assert [line for line in handler.lines if "will checkpoint" in line] == [
            "received SIGUSR1: will checkpoint and stop after this step"], handler.lines
        assert len([line for line in handler.lines if "again" in line]) == 1, handler.lines
        assert signal.getsignal(signal.SIGCHLD) is not sentinel  # held while stopping
        flag.forward()
        assert signal.getsignal(signal.SIGCHLD) is sentinel
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        for sig, previous in saved.items():
            signal.signal(sig, previous)
