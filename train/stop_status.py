"""How a run that stopped on a signal tells its launcher: the exit status 128 + the signal's number
(143 for SIGTERM, 138 for SIGUSR1), the shell's convention for "ended by signal N", so a script
can tell a clean stop (checkpoint saved, the same command resumes) from a crash (1) and from a
finished run (0).

A rank under an elastic agent (torchrun) exits 0 instead: the agent would restart a rank that
exits non-zero. It writes a stop report for its launcher (run.stop_report), which exits with
the status: cluster/elastic.py for torchrun, cluster/deepspeed/launch.sh for DeepSpeed's.
"""
from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class StopReport:
    signal: str  # "SIGTERM"
    step: int  # the step the checkpoint holds
    checkpoint: str  # its directory

    @property
    def exit_status(self) -> int:
        return signal_exit_status(signal.Signals[self.signal].value)

    def write(self, path: str | Path) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: str | Path) -> StopReport | None:
        try:
            return cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError:
            return None


def clear_report(path: str | None) -> None:
    """A report left by an earlier run of this node (a requeued job reuses its paths)."""
    if path:
        Path(path).unlink(missing_ok=True)


def under_elastic_agent() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def signal_exit_status(signum: int) -> int:
    return 128 + signum
