"""The one export path of both stages: the trained module (or its EMA) as safetensors + JSON."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from infd.export import save_model
from train.dist import DistInfo
from train.zero import gathered


def export_model(module: nn.Module, ema, kind: str, run_dir: Path, step: int, info: DistInfo,
                 extra: dict | None = None) -> Path | None:
    """Write run_dir/export/<kind>/ with the EMA weights when there is an EMA. Collective (ZeRO-3
    gathers the weights on every rank); rank 0 writes and returns the path, the others None."""
    with gathered(module):
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if not info.is_main:
        return None
    model = type(module)(module.cfg)  # a fresh copy on the CPU: the EMA is written into it, not the engine's
    model.load_state_dict(state)
    if ema is not None:
        ema.copy_to(model)
    path = save_model(model, run_dir / "export" / kind, kind=kind,
                      extra={"step": step, "ema": ema is not None, **(extra or {})})
    print(f"exported the {'EMA ' if ema is not None else ''}{kind} to {path}", flush=True)
    return path
