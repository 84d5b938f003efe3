"""Training-step speed of both stages, side by side in one process, against the official step
structure and against the hardware's peak (MFU, infd/utils/mfu.py).

Stage 1 at the paper configuration (experiment=ae_ffhq_paper: VQ-f4, CLIF, LPIPS, the GAN with its
adaptive weight from the first step; P = 256, batch --batch, synthetic images). LPIPS' VGG is
random-init here (the pretrained weights cannot be downloaded): the same FLOPs, other values.
Rows:
  official    the official code's step structure built from our modules: plain torch, fp32, four
              Adams (encoder, decoder, renderer, discriminator), the adaptive weight by
              autograd.grad through the graph, and a second full encoder/decoder/renderer forward
              under no_grad for the discriminator step;
  ours        AutoencoderTask's step as it is by default (DeepSpeed ZeRO-2, 1 rank, fp32), which is
              the step at the commit before the speed switches existed;
  ours + X    one switch at a time (bf16 autocast, channels_last, fused Adam; compile with --compile);
  ours+all    the switches a user turns on for speed together.
Stage 2: the paper UNet (conf/unet/paper.yaml) on cached latents (3 x 64 x 64, batch --batch2), and
diffusers' UNet2DConditionModel at SD 1.5's widths (320, 640, 1280, 1280; cross-attention 768) on
4 x 64 x 64 latents with --sd-layers resnets per block (SD has 2; 1 on a CPU to fit the time), with
and without bf16 autocast; the paper UNet also with its activation checkpointing (unet.grad_checkpointing,
MFU from the model's FLOPs, without the recomputed forward).

Per row: seconds per step (best of --steps after the FLOP-counting step and --warmup more), samples/s,
MFU (the step's FLOPs from torch's FLOP counter over the device's measured peak in fp32, or in bf16 for
bf16 rows), peak memory (CPU: resident-set growth; GPU: max allocated) and, for stage 1, per-phase
seconds.

    python benchmarks/train_step.py                 # about 12 minutes on 2 CPU cores
    python benchmarks/train_step.py --tiny          # the tiny configurations, seconds (a smoke test)

Each row runs in its own process (DeepSpeed holds on to its engines, so rows built one after another in one
process kept the earlier rows' memory). Last line: one JSON object: stage1_speedup = ours over the fastest
switch row (named by stage1_fastest_switches: on a CPU channels_last slows the step, so "all" is not the
fastest there; stage1_all_speedup is ours over ours+all); stage1_ratio_vs_official = official over ours
(> 1: ours is faster); stage1_mfu is the fastest row's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_rows import official_stage1, stage1_batch  # noqa: E402
from infd.utils.memory import track_peak  # noqa: E402
from infd.utils.mfu import count_flops, measure_peak, mfu  # noqa: E402

STAGE1_ROWS = {"ours": {}, "ours+bf16": {"autocast": "bf16"}, "ours+channels_last": {"channels_last": True},
            "ours+fused_adam": {"impl": "fused"}, "ours+all": {"autocast": "bf16", "channels_last": True,
                                                                "impl": "fused"}}
COMPILE_ROW = {"ours+compile": {"compile": True}}  # with --compile


def compose(stage: str, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from infd.config import from_mapping, to_mapping
    from train.autoencoder import AutoencoderTrainConfig
    from train.diffusion import DiffusionTrainConfig

    cls = {"autoencoder": AutoencoderTrainConfig, "diffusion": DiffusionTrainConfig}[stage]
    ConfigStore.instance().store(name=f"{stage}_schema", node=to_mapping(cls()))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        raw = OmegaConf.to_container(hydra_compose(stage, overrides=overrides), resolve=True)
    raw.pop("hydra", None)
    return from_mapping(cls, raw)


def with_switches(cfg, switches: dict):
    trainer = replace(cfg.trainer, **{k: v for k, v in switches.items() if k != "impl"})
    impl = switches.get("impl", "default")
    out = replace(cfg, trainer=trainer, optim=replace(cfg.optim, impl=impl))
    return replace(out, disc_optim=replace(out.disc_optim, impl=impl)) if hasattr(out, "disc_optim") else out


def time_steps(step, steps: int, warmup: int, device) -> tuple[float, float]:
    """(best seconds per step, peak memory of the timed steps above what was resident, in MiB)."""
    for i in range(warmup):
        step(i)
    best = float("inf")
    with track_peak(device) as memory:
        for i in range(steps):
            start = time.perf_counter()
            step(warmup + i)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
    return best, memory["peak_bytes"] / 2**20


def stage1_row(name: str, args, info, peak) -> dict:
    from train.autoencoder import AutoencoderTask

    overrides = ["experiment=ae_cpu_tiny" if args.tiny else "experiment=ae_ffhq_paper", "data=synthetic",
                 "loss.lpips_backbone=random", "loss.disc_start=0", f"data.loader.batch_size={args.batch}"]
    if not args.tiny:
        overrides += ["data.synthetic.image_size=1024"]
    base = compose("autoencoder", overrides)
    batch = stage1_batch(base, info.device)
    if name == "official":
        row = official_stage1(base, batch, info.device)
        return measure(row.step, row.flops, peak, args, info, row.phases)
    task = AutoencoderTask(with_switches(base, {**STAGE1_ROWS, **COMPILE_ROW}[name]), info)
    task.phases.enabled = True
    flops = count_flops(lambda: task.train_step([batch], 0))
    task.phases.reset()
    return measure(lambda s: task.train_step([batch], s), flops, peak, args, info, task.phases)


def stage2_row(name: str, args, info, peak) -> dict:
    from train.diffusion import DiffusionTask

    kind, _, variant = name.partition("+")
    size = 8 if args.tiny else 64
    tiny = "experiment=diffusion_cpu_tiny"
    overrides = ([tiny if args.tiny else "experiment=diffusion_ffhq_paper", "text.kind=none", "unet.context_dim=0"]
                 if kind == "paper_unet" else [tiny])
    batch_size = args.batch_sd if kind == "sd_unet" else args.batch2
    cfg = compose("diffusion", [*overrides, "data=synthetic", "diffusion.latent_scale=1.0", "trainer.ema=false",
                                f"data.loader.batch_size={batch_size}"])
    if kind == "sd_unet":
        cfg = replace(cfg, unet=replace(cfg.unet, kind="diffusers", diffusers_config=sd15_widths(args)))
    if variant == "bf16":
        cfg = with_switches(cfg, {"autocast": "bf16"})
    if variant == "grad_ckpt":  # the UNet's activation checkpointing: memory for time
        cfg = replace(cfg, unet=replace(cfg.unet, grad_checkpointing=True))
    channels = 4 if kind == "sd_unet" else cfg.unet.in_channels
    task = DiffusionTask(cfg, info)
    batch = latent_batch(batch_size, channels, size)
    flops = count_flops(lambda: task.train_step([batch], 0))
    # MFU counts the model's FLOPs: a checkpointed row's recomputed forward is not useful work (the parent
    # passes the plain row's count).
    return measure(lambda s: task.train_step([batch], s), args.model_flops or flops, peak, args, info,
                   samples=batch_size)


def sd15_widths(args) -> dict:
    """Stable Diffusion 1.5's UNet2DConditionModel (widths, heads, block types) with --sd-layers resnets per
    block (SD: 2) and cross-attention from the tiny configuration's 512-wide random-init text tower (SD:
    768 from CLIP ViT-L; the projections are a small share of the FLOPs). --tiny: widths 32-64."""
    widths = [32, 64, 64, 64] if args.tiny else [320, 640, 1280, 1280]
    return {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
            "block_out_channels": widths, "layers_per_block": args.sd_layers,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "cross_attention_dim": 512, "attention_head_dim": 8, "norm_num_groups": 32}


def latent_batch(batch: int, channels: int, size: int):
    from infd.data.batches import LatentBatch

    g = torch.Generator().manual_seed(0)
    return LatentBatch(z=torch.randn(batch, channels, size, size, generator=g), labels=torch.full((batch,), -1),
                       keys=[str(i) for i in range(batch)], captions=["a photograph"] * batch)


def measure(step, flops: int, peak, args, info, phases=None, samples: int | None = None) -> dict:
    seconds, peak_mib = time_steps(step, args.steps, args.warmup, info.device)
    row = {"s_per_step": round(seconds, 4), "samples_per_s": round((samples or args.batch) / seconds, 4),
           "tflop_per_step": round(flops / 1e12, 4), "mfu": round(mfu(flops, seconds, peak), 4),
           "peak_tflops": round(peak.flops_per_s / 1e12, 4), "peak_mem_mib": round(peak_mib, 1)}
    if phases is not None:
        row["phases_s"] = {k: round(v / (args.steps + args.warmup), 3) for k, v in phases.reset().items()}  # mean
    return row


def child(args) -> None:
    """One row in this process: its dtype's peak, then the row; prints the row as one JSON line."""
    from train.dist import init_distributed, shutdown

    info = init_distributed()
    bf16 = "bf16" in args.row or STAGE1_ROWS.get(args.row, {}).get("autocast") == "bf16"
    peak = measure_peak(info.device, torch.bfloat16 if bf16 else torch.float32, size=512 if args.tiny else None)
    try:
        stage1 = args.row in STAGE1_ROWS or args.row in COMPILE_ROW or args.row == "official"
        row = (stage1_row if stage1 else stage2_row)(
            args.row, args, info, peak)
    finally:
        shutdown(keep_group=False, clean=True)
    print(json.dumps(row), flush=True)


def run_row(name: str, args, model_flops: int | None = None) -> dict:
    flags = [f"--batch={args.batch}", f"--batch2={args.batch2}", f"--batch-sd={args.batch_sd}", f"--steps={args.steps}",
             f"--warmup={args.warmup}",
             f"--sd-layers={args.sd_layers}", *(["--tiny"] if args.tiny else [])]
    if model_flops:
        flags.append(f"--model-flops={model_flops}")
    res = subprocess.run([sys.executable, __file__, "--row", name, *flags], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"row {name} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    print(name, json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="stage-1 batch (the paper's is 8 over its GPUs)")
    parser.add_argument("--batch2", type=int, default=4, help="stage-2 batch of latents")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per row (the best is kept)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps per row besides the FLOP-counting one")
    parser.add_argument("--batch-sd", type=int, default=1, help="batch of the SD-width rows (4 ran out of 24 GB "
                        "with ZeRO-2 fp32 Adam and 64x64 self-attention)")
    parser.add_argument("--sd-layers", type=int, default=1, help="resnets per block of the SD-width UNet (SD: 2)")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile row (minutes of compiling)")
    parser.add_argument("--tiny", action="store_true", help="the tiny configurations: checks the script, seconds")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--model-flops", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        return child(args)
    # Each row in its own process: DeepSpeed keeps references to its engines, so rows built one after another
    # in one process held the earlier rows' memory (measured: later rows slowed, the SD-width row was killed).
    stage1 = {name: run_row(name, args) for name in ["official", *STAGE1_ROWS]
              + (["ours+compile"] if args.compile else [])}
    stage2 = {name: run_row(name, args) for name in ("paper_unet", "paper_unet+bf16")}
    stage2["paper_unet+grad_ckpt"] = run_row("paper_unet+grad_ckpt", args,
                                             int(stage2["paper_unet"]["tflop_per_step"] * 1e12))
    stage2.update({name: run_row(name, args) for name in ("sd_unet", "sd_unet+bf16")})
    fastest = min((n for n in stage1 if n.startswith("ours+")), key=lambda n: stage1[n]["s_per_step"])
    result = {
        "device": "cuda" if torch.cuda.is_available() else "cpu", "tiny": args.tiny, "stage1_batch": args.batch,
        "stage2_batch": args.batch2, "stage1": stage1, "stage2": stage2,
        "stage1_fastest_switches": fastest,
        "stage1_speedup": round(stage1["ours"]["s_per_step"] / stage1[fastest]["s_per_step"], 3),
        "stage1_all_speedup": round(stage1["ours"]["s_per_step"] / stage1["ours+all"]["s_per_step"], 3),
        "stage1_ratio_vs_official": round(stage1["official"]["s_per_step"] / stage1["ours"]["s_per_step"], 3),
        "stage1_mfu": stage1[fastest]["mfu"],
        "stage2_mfu": stage2["paper_unet+bf16"]["mfu"],
        "stage2_sd_mfu": stage2["sd_unet+bf16"]["mfu"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
