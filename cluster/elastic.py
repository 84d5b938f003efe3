"""torchrun, run in this process, ending the way train/stop_status.py says: 0 when training
finished, 128 + the signal's number when a stop signal ended it with its checkpoint saved (143
for SIGTERM, 138 for SIGUSR1), torchrun's own failure status (1) otherwise.

    python -m cluster.elastic [torchrun flags] -m train.<stage> [overrides]

Plain torchrun exits 1 after a signal it handled, with a SignalException traceback, the same as a
crash; and when only the ranks get the signal, it exits 0, the same as a finished run. The ranks
(which must exit 0 under an elastic agent, or it restarts them) write what ended them to a
node-local stop report (run.stop_report, added here), which this reads once torchrun returns.
The SLURM, torchrun and Kubernetes launches under cluster/ all run this.
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

from infd.utils.process_main import run_as_process
from train.stop_status import StopReport, clear_report, signal_exit_status


def with_stop_report(argv: list[str]) -> tuple[list[str], str]:
    """torchrun's arguments with run.stop_report set (the training overrides come last), and its path."""
    for arg in argv:
        if arg.startswith("run.stop_report="):
            return argv, arg.split("=", 1)[1]
    path = str(Path(tempfile.gettempdir()) / f"infd-stop-{os.getpid()}.json")
    return [*argv, f"run.stop_report={path}"], path


def exit_status(report: StopReport | None, launcher_signal: int | None) -> tuple[int, str | None]:
    """(status, message) once torchrun has returned or raised on `launcher_signal`."""
    if report is not None:
        return report.exit_status, (f"stopped at step {report.step} by {report.signal}: checkpoint "
                                    f"{report.checkpoint} saved; exit status {report.exit_status}")
    if launcher_signal is not None:
        name = signal.Signals(launcher_signal).name
        return signal_exit_status(launcher_signal), f"stopped by {name}; the ranks reported no checkpoint"
    return 0, None


def main(argv: list[str] | None = None) -> int:
    argv, report_path = with_stop_report(list(sys.argv[1:] if argv is None else argv))
    clear_report(report_path)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    launcher_signal = None
    try:
        torchrun(argv)
    except SignalException as err:  # torchrun has stopped its ranks (shutdown timeout, then SIGKILL)
        launcher_signal = int(err.sigval)
    status, message = exit_status(StopReport.read(report_path), launcher_signal)
    clear_report(report_path)
    if message:
        print(f"cluster.elastic: {message}", file=sys.stderr, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(run_as_process(main))
