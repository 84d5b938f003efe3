"""DeepSpeed engines from typed config: one model, one torch optimizer, optional LR warmup."""
from __future__ import annotations

import torch

from infd.config import ConfigError
from train.config import DeepSpeedConfig, OptimConfig
from train.dist import DistInfo


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested in ("bf16", "fp16") and device.type != "cuda":
            raise ConfigError(f"config key 'deepspeed.precision' = {requested} needs a GPU; use auto or fp32 on CPU")
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deepspeed_config(cfg: DeepSpeedConfig, micro_batch: int, info: DistInfo) -> dict:
    precision = resolve_precision(cfg.precision, info.device)
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch * cfg.grad_accum * info.world_size,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch Adam: DeepSpeed's fused Adam would compile ops first
        "steps_per_print": 1 << 30,
    }
    if cfg.grad_clip > 0:
        config["gradient_clipping"] = cfg.grad_clip
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0}
    return config


def build_engine(module: torch.nn.Module, optim: OptimConfig, ds_config: dict):
    params = [p for p in module.parameters() if p.requires_grad]
    cls = torch.optim.AdamW if optim.weight_decay > 0 else torch.optim.Adam
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[optim.impl]
    optimizer = cls(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, **impl)
    scheduler = None
    if optim.warmup_steps > 0:
        warmup = optim.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    import deepspeed

    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine
