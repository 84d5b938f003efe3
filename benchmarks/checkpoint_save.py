"""How long the paper configurations' checkpoints take against the disk they are written to, and what
a periodic background save costs the training around it.

Per configuration, in its own process (one rank, random LPIPS weights and synthetic batches: only
the model and optimizer sizes matter), after one training step:
  stop       the checkpoint a stop signal saves (`Checkpointer.save`, synchronous: gathered, written,
             every file fsynced, published) against the time this disk takes to write the same number
             of bytes of distinct data to one file, measured in the same process, buffered and with
             O_DIRECT (the faster median is the disk's time); --rounds of each, alternating, compared by
             their medians (stop_vs_disk_ratio); bytes per trained parameter
             (weights, Adam moments, the EMA where the run keeps one);
  periodic   N training steps with a background save taken before the first of them, against N steps
             without (the mean of N before and N after); the second background save of the process (the
             first fills the snapshot buffers that later ones reuse: its blocking time is reported beside):
             the added seconds as a fraction of the synchronous save's (periodic_slowdown_ratio; 0 = free,
             1 = as if the save had blocked).
             N is enough steps for the save to finish among them (--max-steps at most); what it had
             left after them is reported (`unfinished_s`), not counted. Beside it the control: the
             same N steps while another process writes the same bytes to the same disk the way the
             checkpoint writer does, with O_DIRECT (disk_writer_slowdown_ratio): what writing them costs a
             training on this machine at all.
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
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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


def disk_seconds(directory: Path, nbytes: int, direct: bool = False) -> float:
    """Seconds this disk takes to write `nbytes` of distinct data to one new file and fsync it (direct: with
    O_DIRECT, past the page cache, in whole 64 MiB blocks: nbytes rounded up). Each 64 MiB chunk is a random
    block XORed with the chunk's own 64-bit word (about 30 ms of the time): this machine's virtual disk stores
    repeated data once (a repeated 64 MiB buffer wrote at 1.14 GB/s, distinct data at about 0.1), so a probe
    that repeats itself would flatter the disk."""
    import mmap

    block = np.frombuffer(mmap.mmap(-1, 64 << 20), dtype=np.uint8)  # page-aligned (O_DIRECT)
    block[:] = np.frombuffer(os.urandom(64 << 20), dtype=np.uint8)
    words = block.view(np.uint64)
    path = directory / f"disk_probe_{os.getpid()}.bin"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
    try:
        for i in range(-(-nbytes // block.nbytes)):
            words ^= np.uint64((0x9E3779B97F4A7C15 * (i + 1)) % (1 << 64))
            data = memoryview(block)[:block.nbytes if direct else min(block.nbytes, nbytes - i * block.nbytes)]
            while data:
                data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def disk_writer(directory: Path, nbytes: int) -> subprocess.Popen:
    """Another process writing `nbytes` as disk_seconds does with O_DIRECT (as the checkpoint writer does):
    what writing alone costs a training beside it."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            f"from benchmarks.checkpoint_save import disk_seconds; "
            f"disk_seconds(Path({str(directory)!r}), {nbytes}, direct=True)")
    return subprocess.Popen([sys.executable, "-c", code])


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
        saver = Checkpointer(root, [EmaPart(task.ema), EnginesPart(task.engines), TaskPart(task), RngPart()], info,
                             keep_last=1)
        # This machine's virtual disk writes anywhere from 0.08 to 1.8 GB/s from one minute to the next: the
        # save and the probe alternate, and their medians are compared.
        saves, writes, probes, direct_probes = [], [], [], []
        for _ in range(args.rounds):
            path = saver.save(step)
            state = json.loads((path / "state.json").read_text())
            nbytes = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            saves.append(state["save_s"])
            writes.append(state["write_s"])
            probes.append(disk_seconds(root, nbytes))
            direct_probes.append(disk_seconds(root, nbytes, direct=True))
        # The disk's time is the faster of its two ways of writing (buffered, O_DIRECT): the harder yardstick.
        state["save_s"] = statistics.median(saves)
        disk_s = min(statistics.median(probes), statistics.median(direct_probes))
        periodic = {} if args.stop_only else measure_periodic(saver, train, lambda: step, state["save_s"], nbytes,
                                                              root, args)
    finally:
        shutdown(keep_group=False, clean=True)
    return {"params": params, "checkpoint_bytes": nbytes, "bytes_per_param": round(nbytes / params, 3),
            "stop_save_s": state["save_s"], "disk_s": round(disk_s, 3), "stop_save_s_rounds": saves,
            "disk_s_rounds": [round(x, 3) for x in probes],
            "disk_direct_s_rounds": [round(x, 3) for x in direct_probes], "write_s_rounds": writes,
            "disk_gb_per_s": round(nbytes / disk_s / 1e9, 3),
            "stop_vs_disk_ratio": round(state["save_s"] / disk_s, 3),
            "grace_fraction": {k: round(state["save_s"] / v, 3) for k, v in GRACE_S.items()},
            **periodic}


def measure_periodic(saver, train, current_step, save_s: float, nbytes: int, root: Path, args) -> dict:
    """N steps with a background save against N without, and beside another process writing `nbytes`."""
    step_s = train(1)
    # Enough steps for the background save to finish among them, as it does when ckpt_every is many steps.
    steps = args.steps or min(args.max_steps, math.ceil(1.2 * save_s / step_s) + 1)
    # A first background save fills the snapshot buffers (a run's first periodic save pays for their pages
    # once; the saves after it reuse them): the steady state is measured on the second.
    start = time.perf_counter()
    saver.save(current_step(), background=True)
    first_blocking_s = time.perf_counter() - start
    saver.wait()
    plain_s = train(steps)
    start = time.perf_counter()
    saver.save(current_step(), background=True)
    blocking_s = time.perf_counter() - start
    with_save_s = blocking_s + train(steps)
    start = time.perf_counter()
    saver.wait()
    unfinished_s = time.perf_counter() - start
    writer = disk_writer(root, nbytes)
    beside_writer_s = train(steps)
    writer.wait()
    plain_s = (plain_s + train(steps)) / 2  # before and after: this CPU's step times drift
    return {"steps": steps, "steps_s": round(plain_s, 3), "steps_with_background_save_s": round(with_save_s, 3),
            "background_blocking_s": round(blocking_s, 3), "first_background_blocking_s": round(first_blocking_s, 3),
            "unfinished_s": round(unfinished_s, 3),
            "periodic_slowdown_ratio": round((with_save_s - plain_s) / save_s, 3),
            "steps_beside_a_disk_writer_s": round(beside_writer_s, 3),
            "disk_writer_slowdown_ratio": round((beside_writer_s - plain_s) / save_s, 3)}


def run_config(name: str, args) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        cmd = [sys.executable, __file__, "--child", name, "--dir", tmp, f"--steps={args.steps}",
               f"--max-steps={args.max_steps}", f"--rounds={args.rounds}", f"--sd-layers={args.sd_layers}",
               *(["--stop-only"] if args.stop_only else [])]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        shutil.rmtree(tmp, ignore_errors=True)
    if res.returncode != 0:
        raise SystemExit(f"{name} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{name:22s} {row['params'] / 1e6:7.1f} M params  {row['checkpoint_bytes'] / 2**30:6.2f} GiB "
          f"({row['bytes_per_param']:.2f} B/param)  stop save {row['stop_save_s']:6.1f} s = "
          f"{row['stop_vs_disk_ratio']:.2f}x the disk's {row['disk_s']:.1f} s" + (
              f"  periodic slowdown {row['periodic_slowdown_ratio']:.2f} of a synchronous save"
              if "periodic_slowdown_ratio" in row else ""), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--steps", type=int, default=0, help="training steps timed with and without a background save "
                   "(0: enough for the save to finish among them, at most --max-steps)")
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3, help="stop saves and disk probes, alternating (medians)")
    p.add_argument("--sd-layers", type=int, default=1, help="resnets per block of the SD-width UNet (SD: 2)")
    p.add_argument("--stop-only", action="store_true", help="the stop checkpoint and the disk only (no training "
                   "beside a background save: a snapshot the size of the SD-width UNet's state does not fit 24 GiB)")
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
