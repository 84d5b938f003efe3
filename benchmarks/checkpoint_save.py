"""How long the paper configurations' checkpoints take to save, against the grace periods a stop
signal leaves before SIGKILL.

Each configuration trains one step in a real training process (one rank, synthetic data, random
LPIPS weights: only the model and optimizer sizes matter) and saves the checkpoint it would save
on a stop signal: DeepSpeed's own files, the portable full weights and Adam moments, the EMA.
The time is the one the trainer logs and keeps in state.json (`save_s`).

    python benchmarks/checkpoint_save.py [--configs ae_ffhq_paper,ae_laion_hr,diffusion_ffhq_paper]

Last line: JSON with, per configuration, the parameter count, checkpoint bytes, save_s, and the
fraction of each grace period (deepspeed launcher 30 s, torchrun default 30 s, cluster/ 240 s) it uses.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRACE_S = {"deepspeed_launcher": 30, "torchrun_default": 30, "cluster_torchrun": 240}
CONFIGS = {
    "ae_ffhq_paper": ("train.autoencoder", ["data=synthetic", "data.synthetic.image_size=256",
                                            "loss.lpips_backbone=random"]),
    "ae_laion_hr": ("train.autoencoder", ["data=synthetic", "data.synthetic.image_size=256",
                                          "loss.lpips_backbone=random", "data.loader.p_hr=0"]),
    "diffusion_ffhq_paper": ("train.diffusion", ["data=synthetic", "data.kind=synthetic",
                                                 "data.synthetic.latent_size=64", "data.loader.batch_size=1"]),
}


def measure(name: str, root: Path) -> dict:
    module, overrides = CONFIGS[name]
    cmd = [sys.executable, "-m", module, f"experiment={name}", *overrides, f"run.root={root}", f"run.name={name}",
           "trainer.max_steps=1", "trainer.ckpt_every=1", "trainer.log_every=1", "trainer.image_every=1000",
           "trainer.resume=never", "logger=none"]
    started = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    ckpt = root / name / "checkpoints" / "step_0000001"
    state = json.loads((ckpt / "state.json").read_text())
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    params = sum(_numel(p) for p in (ckpt / "portable").glob("*.safetensors") if ".optim." not in p.name)
    return {"params": params, "checkpoint_bytes": size, "save_s": state["save_s"],
            "grace_fraction": {k: round(state["save_s"] / v, 3) for k, v in GRACE_S.items()},
            "run_s": round(time.perf_counter() - started, 1)}


def _numel(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            results[name] = r = measure(name, Path(tmp))
            print(f"{name:22s} {r['params'] / 1e6:7.1f} M params  checkpoint {r['checkpoint_bytes'] / 2**30:6.2f} GiB  "
                  f"save {r['save_s']:6.1f} s  = {r['grace_fraction']['deepspeed_launcher']:.0%} of 30 s, "
                  f"{r['grace_fraction']['cluster_torchrun']:.0%} of 240 s", flush=True)
    print(json.dumps({"grace_s": GRACE_S, "results": results}))


if __name__ == "__main__":
    main()
