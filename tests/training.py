"""Run the training entry points in real processes (python or torchrun) and read their metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from tests.s3_server import free_port

ROOT = Path(__file__).resolve().parents[1]


def train_cmd(module: str, root: Path, name: str, *overrides: str, nproc: int = 1) -> list[str]:
    args = ["-m", module, f"run.root={root}", f"run.name={name}", "trainer.log_every=1", *overrides]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]


def env(**extra) -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    e.update(extra)
    return e


def run(module: str, root: Path, name: str, *overrides: str, nproc: int = 1, check: bool = True, **extra_env):
    res = subprocess.run(train_cmd(module, root, name, *overrides, nproc=nproc), capture_output=True, text=True,
                         cwd=ROOT, env=env(**extra_env), timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"training failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def metrics(root: Path, name: str) -> dict[int, dict]:
    lines = (root / name / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines)}


def assert_close(a: dict, b: dict, keys, rtol: float) -> None:
    for key in keys:
        x, y = a[key], b[key]
        assert abs(x - y) <= rtol * max(abs(x), abs(y), 1e-12), (key, x, y)


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_step(metrics_file: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    """Wait until metrics.jsonl holds n lines; returns the count seen just before the signal."""
    deadline = time.time() + timeout
    while line_count(metrics_file) < n:
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before the signal"
        time.sleep(0.02)
    return line_count(metrics_file)


def step_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def sample_keys(root: Path, name: str) -> dict[int, list[str]]:
    """step -> keys trained on at that step, over all ranks (trainer.sample_log=true)."""
    steps: dict[int, list[str]] = {}
    for path in sorted((root / name / "samples").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            steps.setdefault(entry["step"], []).extend(entry["keys"])
    return steps


class LineReader:
    """A process's output, read line by line on a thread, so a test can act on a line as soon as it is printed."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.seen = threading.Condition()
        self.reader = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.seen:
                self.lines.append(line)
                self.seen.notify_all()

    def wait_for(self, *parts: str, timeout: float = 60) -> bool:
        """Whether a line holding every one of `parts` is printed within `timeout` seconds."""
        with self.seen:
            return self.seen.wait_for(lambda: any(all(p in line for p in parts) for line in self.lines), timeout)

    def text(self, proc: subprocess.Popen, timeout: float) -> str:
        proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return "".join(self.lines)
