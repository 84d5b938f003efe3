"""Run the training entry points in real processes (python or torchrun) and read their metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
