"""How long the paper configurations' checkpoints take against the disk they are written to, and what
a periodic background save costs the training around it.

Per configuration, in its own process (one rank, random LPIPS weights and synthetic batches: only
the model and optimizer sizes matter), after one training step:
  stop       the checkpoint a stop signal saves (`Checkpointer.save`, synchronous: gathered, written,
             every file fsynced, published) against the time this disk takes to write the same number
             of bytes, measured in the same process (one file, fsynced): stop_vs_disk_ratio;
             bytes per trained parameter (weights, Adam moments, the EMA where the run keeps one);
  periodic   N training steps with a background save taken before the first of them, against N steps
             without: the added seconds as a fraction of the synchronous save's (periodic_slowdown_ratio;
             0 = free, 1 = as if the save had blocked). What the background save had left to write
             after the N steps is reported (`unfinished_s`), not counted.
Configurations: diffusion_ffhq_paper (the paper UNet, EMA on), ae_ffhq_paper (VQ-f4 autoencoder and its
discriminator) and sd_unet (diffusers' UNet2DConditionModel at SD 1.5's widths with --sd-layers resnets
per block, reduced for this machine's memory: the full SD UNet with Adam and a snapshot does not fit 24 GiB).

    python benchmarks/checkpoint_save.py [--configs diffusion_ffhq_paper,ae_ffhq_paper,sd_unet] [--steps N]

Last line: JSON with per configuration the figures above, and at the top level the acceptance figures of
diffusion_ffhq_paper: stop_bytes_per_param, stop_vs_disk_ratio, periodic_slowdown_ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_step import compose, latent_batch, sd15_widths  # noqa: E402
from benchmarks.step_rows import stage1_batch  # noqa: E402

CONFIGS = ("diffusion_ffhq_paper", "ae_ffhq_paper", "sd_unet")
GRACE_S = {"deepspeed_launcher": 30, "torchrun_default": 30, "cluster_torchrun": 240}


def build(name: str, args, info):
    """(task, one batch) of configuration `name`, batch 1."""
    from dataclasses import replace

    if name == "ae_ffhq_paper":
        from train.autoencoder import AutoencoderTask

        cfg = compose("autoencoder", ["experiment=ae_ffhq_paper", "data=synthetic", "loss.lpips_backbone=random",
                                      "loss.disc_start=0", "data.loader.batch_size=1"])
        return AutoencoderTask(cfg, info), stage1_batch(cfg, info.device)
    from train.diffusion import DiffusionTask

    overrides = ["data=synthetic", "diffusion.latent_scale=1.0", "data.loader.batch_size=1"]
    if name == "diffusion_ffhq_paper":
        cfg = compose("diffusion", ["experiment=diffusion_ffhq_paper", "text.kind=none", "unet.context_dim=0",
                                    *overrides])
        return DiffusionTask(cfg, info), latent_batch(1, cfg.unet.in_channels, 64)
    cfg = compose("diffusion", ["experiment=diffusion_cpu_tiny", "trainer.ema=true", *overrides])
    args.tiny = False
    cfg = replace(cfg, unet=replace(cfg.unet, kind="diffusers", diffusers_config=sd15_widths(args)))
    return DiffusionTask(cfg, info), latent_batch(1, 4, 64)


def disk_seconds(directory: Path, nbytes: int) -> float:
    """Seconds this disk takes to write `nbytes` to one new file and fsync it."""
    block = os.urandom(1 << 20) * 64  # 64 MiB
    path = directory / "disk_probe.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(memoryview(block)[:min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def child(name: str, args) -> dict:
    from train.checkpoint import Checkpointer, EmaPart, RngPart, TaskPart
    from train.dist import init_distributed, shutdown
    from train.engine_state import EnginesPart

    info = init_distributed()
    root = Path(args.dir)
    try:
        task, batch = build(name, args, info)
        params = sum(p.numel() for e in task.engines.values() for p in e.module.parameters() if p.requires_grad)
        step = 0

        def train(n: int) -> float:
            nonlocal step
            start = time.perf_counter()
            for _ in range(n):
                task.train_step([batch], step)
                step += 1
            return time.perf_counter() - start

        train(1)
        saver = Checkpointer(root, [EnginesPart(task.engines), EmaPart(task.ema), TaskPart(task), RngPart()], info,
                             keep_last=1)
        path = saver.save(step)
        state = json.loads((path / "state.json").read_text())
        nbytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        disk_s = disk_seconds(root, nbytes)
        plain_s = train(args.steps)
        start = time.perf_counter()
        saver.save(step, background=True)
        blocking_s = time.perf_counter() - start
        with_save_s = blocking_s + train(args.steps)
        start = time.perf_counter()
        saver.wait()
        unfinished_s = time.perf_counter() - start
    finally:
        shutdown(keep_group=False, clean=True)
    return {"params": params, "checkpoint_bytes": nbytes, "bytes_per_param": round(nbytes / params, 3),
            "stop_save_s": state["save_s"], "disk_s": round(disk_s, 3),
            "disk_gb_per_s": round(nbytes / disk_s / 1e9, 3),
            "stop_vs_disk_ratio": round(state["save_s"] / disk_s, 3),
            "grace_fraction": {k: round(state["save_s"] / v, 3) for k, v in GRACE_S.items()},
            "steps": args.steps, "steps_s": round(plain_s, 3), "steps_with_background_save_s": round(with_save_s, 3),
            "background_blocking_s": round(blocking_s, 3), "unfinished_s": round(unfinished_s, 3),
            "periodic_slowdown_ratio": round((with_save_s - plain_s) / state["save_s"], 3)}


def run_config(name: str, args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        cmd = [sys.executable, __file__, "--child", name, "--dir", tmp, f"--steps={args.steps}",
               f"--sd-layers={args.sd_layers}"]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        shutil.rmtree(tmp, ignore_errors=True)
    if res.returncode != 0:
        raise SystemExit(f"{name} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{name:22s} {row['params'] / 1e6:7.1f} M params  {row['checkpoint_bytes'] / 2**30:6.2f} GiB "
          f"({row['bytes_per_param']:.2f} B/param)  stop save {row['stop_save_s']:6.1f} s = "
          f"{row['stop_vs_disk_ratio']:.2f}x the disk's {row['disk_s']:.1f} s  periodic slowdown "
          f"{row['periodic_slowdown_ratio']:.2f} of a synchronous save", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=3, help="training steps timed with and without a background save")
    p.add_argument("--sd-layers", type=int, default=1, help="resnets per block of the SD-width UNet (SD: 2)")
    p.add_argument("--tmp", default=None, help="folder for the checkpoints (default: the system's temp folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)), flush=True)
        return
    results = {name: run_config(name, args) for name in args.configs.split(",")}
    head = results.get("diffusion_ffhq_paper", {})
    print(json.dumps({"device": "cuda" if torch.cuda.is_available() else "cpu", "grace_s": GRACE_S,
                      "stop_bytes_per_param": head.get("bytes_per_param"),
                      "stop_vs_disk_ratio": head.get("stop_vs_disk_ratio"),
                      "periodic_slowdown_ratio": head.get("periodic_slowdown_ratio"), "results": results}))


if __name__ == "__main__":
    main()
