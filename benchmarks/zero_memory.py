"""Per-rank optimizer-state bytes of the paper's autoencoder under ZeRO 0, 1, 2 and 3 at 2 ranks.

For each stage, 2 processes (torchrun) build the paper's autoencoder (conf/model/infd_paper.yaml)
as a DeepSpeed engine with torch Adam, take one step on a small input so Adam creates its state,
and count on each rank:
  optimizer_bytes: Adam's state tensors held by that rank (exp_avg, exp_avg_sq, step);
  master_bytes:    the separate fp32 master copy of the parameters ZeRO keeps (0 at stage 0, where
                   the module's own fp32 parameters are the master).
ZeRO 0 is the baseline run side by side (same model, same step). CPU/gloo here, NCCL on GPUs.

    python benchmarks/zero_memory.py [--stages 0 1 2 3]

Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


class RenderedRGB(torch.nn.Module):
    """The autoencoder returning a plain tensor: ZeRO-3's hooks only see tensors in module outputs."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, coords, cells):
        return self.inner(x, coords, cells).rgb


def worker(stage: int, out: Path) -> None:
    import torch.distributed as dist

    from infd.config import from_mapping, load_mapping
    from infd.geometry import crop_queries
    from infd.models import AutoencoderConfig, NeuralFieldAutoencoder
    from train.config import DeepSpeedConfig, OptimConfig
    from train.dist import init_distributed, shutdown
    from train.engines import build_engine, deepspeed_config

    info = init_distributed()
    torch.manual_seed(0)
    model = RenderedRGB(NeuralFieldAutoencoder(from_mapping(AutoencoderConfig,
                                                           load_mapping(ROOT / "conf/model/infd_paper.yaml"))))
    engine = build_engine(model, OptimConfig(lr=1e-4), deepspeed_config(DeepSpeedConfig(zero_stage=stage), 1, info))
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    coords, cells = crop_queries((64, 64), (0, 0, 32, 32))
    loss = (engine(x, coords, cells) - x[..., :32, :32]).abs().mean()
    engine.backward(loss)
    engine.step()
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optimizer_bytes = tensor_bytes(t for state in base.state.values() for t in state.values())
    zero = engine.optimizer
    masters = (getattr(zero, "single_partition_of_fp32_groups", None)
               or getattr(zero, "fp32_partitioned_groups_flat", []))
    result = {"rank": info.rank, "optimizer_bytes": optimizer_bytes, "master_bytes": tensor_bytes(masters),
              "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())}
    (out / f"stage{stage}_rank{info.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--worker-stage", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_stage is not None:
        return worker(args.worker_stage, Path(args.out))
    per_rank, master, params = {}, {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(29600 + stage), __file__, "--worker-stage", str(stage), "--out", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if res.returncode != 0:
                print(f"stage {stage} failed:\n{res.stderr[-3000:]}", file=sys.stderr)
                continue
            ranks = [json.loads((Path(tmp) / f"stage{stage}_rank{r}.json").read_text()) for r in (0, 1)]
            per_rank[stage] = max(r["optimizer_bytes"] for r in ranks)
            master[stage] = max(r["master_bytes"] for r in ranks)
            params = ranks[0]["params"]
            print(f"ZeRO-{stage}: optimizer state {per_rank[stage] / 2**20:8.1f} MB/rank, "
                  f"fp32 master copy {master[stage] / 2**20:8.1f} MB/rank", flush=True)
    result = {"params": params, "world_size": 2, "optimizer_bytes_per_rank": per_rank,
              "master_bytes_per_rank": master}
    if 0 in per_rank:
        result["ratio_vs_zero0"] = {s: round(b / per_rank[0], 3) for s, b in per_rank.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
