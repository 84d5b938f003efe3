"""A trainer stand-in: iterate a 2-worker loader, send the preemption signals to the workers, keep
iterating; print the worker pids and "survived", then wait to be killed (the test checks that the
workers die with this process)."""
import signal
import subprocess
import sys
import time

import psutil

from infd.config import from_mapping
from infd.data.loader import DataConfig, build_loader
from infd.data.workers import PREEMPTION_SIGNALS


def main() -> None:
    cfg = from_mapping(DataConfig, {"shards": sys.argv[1], "batch_size": 2, "num_workers": 2,
                                    "patch": {"patch_size": 32, "r_max": 64, "encoder_size": 32}})
    batches = iter(build_loader(cfg))
    next(batches)
    workers = [child.pid for child in psutil.Process().children()]  # the DataLoader's workers
    assert len(workers) == 2, workers
    for sig in PREEMPTION_SIGNALS:  # sent by another process, as launchers and schedulers do
        subprocess.run(["kill", f"-{sig.name[3:]}", *map(str, workers)], check=True)
    time.sleep(0.5)
    for _ in range(6):
        next(batches)  # every worker still delivers
    print(" ".join(map(str, workers)), "survived", flush=True)
    if sys.argv[2:] == ["exit"]:  # leave with the workers still up: multiprocessing terminates them
        sys.exit(0)
    signal.pause()


if __name__ == "__main__":
    main()
