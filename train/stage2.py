"""Stage 2: the latent-diffusion task for the shared loop (one DeepSpeed engine: the UNet)."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from infd.data.dataset import build_loader
from infd.data.latents import collate_latents, latent_sample, load_npy
from infd.data.tar_samples import iterate_tar
from infd.data.transforms import to_unit_range
from infd.data.urls import expand_urls, open_stream
from infd.diffusion.schedule import build_schedule, training_loss
from infd.ema import EMA
from infd.export import load_model, save_model
from infd.models.unet import UNet
from infd.render import render_tiles
from infd.sampling import generate_latents, unet_fn
from infd.text import build_text_encoder
from train.data import ShardBatches
from train.dist import DistInfo, all_reduce_mean
from train.engines import build_engine, deepspeed_config

log = logging.getLogger("train")


def estimate_latent_scale(cfg, ae, info: DistInfo) -> float:
    """1 / std of the first `data.scale_samples` latents of the data (read in shard order, the same
    on every rank), as LDM's scale factor: the diffusion model then sees unit-variance latents."""
    latents, n = [], cfg.data.scale_samples
    for url in expand_urls(cfg.data.loader.shards):
        stream = open_stream(url)
        try:
            for raw in iterate_tar(stream):
                if cfg.data.kind == "latents":
                    latents.append(torch.from_numpy(load_npy(raw["latent.npy"]).astype(np.float32)))
                else:
                    from infd.data.dataset import image_bytes
                    from infd.data.transforms import make_patch_sample

                    s = make_patch_sample(image_bytes(raw), cfg.data.loader.patch, np.random.default_rng(0))
                    with torch.no_grad():
                        latents.append(ae.encode(to_unit_range(s["enc"])[None].to(info.device))[0].cpu())
                if len(latents) >= n:
                    break
        finally:
            stream.close()
        if len(latents) >= n:
            break
    return float(1.0 / torch.stack(latents).std().clamp_min(1e-6))


class LatentBatches(ShardBatches):
    """The shard loader over the latent cache (same epochs, equal batches, exact resume)."""

    def __init__(self, cfg, info: DistInfo):
        self.loader = build_loader(cfg.loader, info.rank, info.world_size, latent_sample, collate_latents)
        self.dataset = self.loader.dataset
        self.epoch, self.batches_done, self.skips = 0, 0, {}


def gathered(module):
    """Full parameters inside the block, also under ZeRO-3 (collective: every rank enters it)."""
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


class EMAGathered(EMA):
    """EMA that also works when ZeRO-3 partitions the parameters: gathers them for each use."""

    def __init__(self, model, decay: float):
        with gathered(model):
            super().__init__(model, decay)

    def update(self, model) -> None:
        with gathered(model):
            super().update(model)


class Stage2Task:
    def __init__(self, cfg, info: DistInfo):
        self.cfg, self.info = cfg, info
        torch.manual_seed(cfg.trainer.seed)
        unet = UNet(cfg.unet).to(info.device)
        self.unet = build_engine(unet, cfg.optim, deepspeed_config(cfg.deepspeed, cfg.data.loader.batch_size, info))
        self.engines = {"unet": self.unet}
        self.ema = None
        if cfg.trainer.ema:
            self.ema = EMAGathered(self.unet.module, cfg.trainer.ema_decay)
        self.schedule = build_schedule(cfg.diffusion)
        self.text = build_text_encoder(cfg.text)
        self._empty_text = None  # embedding of "" (dropped captions), computed once
        if self.text is not None:
            self.text = self.text.to(info.device)
        self.ae = load_model(cfg.data.autoencoder, info.device) if cfg.data.autoencoder else None
        self.latent_scale = estimate_latent_scale(cfg, self.ae, info)
        log.info("latent scale factor %.5f (1 / std of %d latents)", self.latent_scale, cfg.data.scale_samples)

    def _context(self, captions: list[str], cached):
        if self.text is None:
            return None
        drop = (torch.rand(len(captions)) < self.cfg.text.caption_dropout).tolist()
        if cached is not None:
            if self._empty_text is None:
                self._empty_text = self.text([""])
            empty = self._empty_text.to(cached.dtype)
            cached = cached.to(self.info.device)
            return torch.where(torch.tensor(drop, device=cached.device)[:, None, None], empty, cached)
        return self.text(["" if d else c for c, d in zip(captions, drop)])

    def _labels(self, labels):
        """Class labels with the "no label" class (num_classes) for missing ones and, with the
        caption-dropout probability, for guidance."""
        n = self.cfg.unet.num_classes
        if not n or labels is None:
            return None
        labels = torch.where(labels < 0, n, labels)
        drop = torch.rand(labels.shape[0]) < self.cfg.text.caption_dropout
        return torch.where(drop, n, labels).to(self.info.device)

    def _latents(self, batch: dict) -> torch.Tensor:
        if "z" in batch:
            return batch["z"].to(self.info.device)
        with torch.no_grad():
            return self.ae.encode(to_unit_range(batch["enc"].to(self.info.device)))

    def step(self, micro_batches: list[dict], step: int) -> dict:
        total = 0.0
        for batch in micro_batches:
            z = self._latents(batch) * self.latent_scale
            cond = {"context": self._context(batch.get("captions") or [""] * z.shape[0], batch.get("text")),
                    "labels": self._labels(batch.get("labels"))}
            fn = unet_fn(self.unet, self.schedule)
            loss = training_loss(lambda x, t: fn(x, t, cond), self.schedule, z)
            self.unet.backward(loss)
            self.unet.step()
            total += all_reduce_mean(loss.detach().float()).item() / len(micro_batches)
        if self.ema is not None:
            self.ema.update(self.unet.module)
        return {"loss": total, "latent_scale": self.latent_scale}

    @torch.no_grad()
    def images(self, batch: dict) -> dict:
        """Sample grids at the autoencoder's size and twice it, for the configured prompts."""
        if self.ae is None:
            return {}
        prompts = list(self.cfg.samples.prompts) or [""]
        c, h = self.cfg.unet.in_channels, self.cfg.samples.latent_size
        z = generate_latents(self.unet.module, self.cfg.diffusion, self.latent_scale, (len(prompts), c, h, h),
                             prompts if self.text is not None else None, self.text, self.cfg.samples.cfg_scale,
                             self.cfg.samples.sampler, self.cfg.samples.steps, seed=0, device=self.info.device)
        phi = self.ae.decode(z)
        base = self.ae.cfg.net.resolution
        return {f"samples/{s}": (render_tiles(self.ae.renderer, phi, (s, s)), prompts) for s in (base, 2 * base)}

    def export(self, run_dir: Path, step: int) -> Path | None:
        """Collective (ZeRO-3 gathers the weights); rank 0 writes."""
        from infd.config import to_mapping

        with gathered(self.unet.module):
            state = {k: v.detach().cpu().clone() for k, v in self.unet.module.state_dict().items()}
        if not self.info.is_main:
            return None
        model = UNet(self.cfg.unet)
        model.load_state_dict(state)
        if self.ema is not None:
            self.ema.copy_to(model)
        extra = {"step": step, "ema": self.ema is not None, "latent_scale": self.latent_scale,
                 "diffusion": to_mapping(self.cfg.diffusion), "text": to_mapping(self.cfg.text),
                 "autoencoder": self.cfg.data.autoencoder}
        path = save_model(model, run_dir / "export" / "unet", kind="unet", extra=extra)
        print(f"exported the {'EMA ' if self.ema else ''}UNet to {path}", flush=True)
        return path
