"""Stage 2: train the latent diffusion model (on a latent cache, or encoding images on the fly).

    python -m train.diffusion experiment=diffusion_cpu_tiny data.loader.shards=LATENTS data.autoencoder=AE_EXPORT
    torchrun --nproc_per_node 8 -m train.diffusion experiment=diffusion_ffhq_paper data.loader.shards=...
        deepspeed=zero3

Every per-sample draw of a step (noise, timestep, caption and label dropout) is keyed by
(trainer.seed, step, the sample's index in the global batch): ranks draw independently, and the
losses do not depend on the number of ranks.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

import torch

from infd.config import ConfigError
from infd.data.batches import LatentBatch, PatchBatch
from infd.data.loader import DataConfig
from infd.data.transforms import PatchConfig
from infd.diffusion.align import alignment_loss, frozen
from infd.diffusion.schedule import DiffusionConfig, build_schedule, training_loss, training_prediction
from infd.diffusion.generate import LatentDiffusion, generate_latents, unet_fn
from infd.diffusion.spec import Conditioning, SamplingSpec, spec_of
from infd.export import load_export
from infd.keyed_random import KeyedRandom
from infd.losses import build_lpips
from infd.models import UNetConfig, build_unet
from infd.render import render_tiles
from infd.text import TextEncoderConfig, build_text_encoder
from infd.utils.process_main import run_as_process
from train.config import DataSourceConfig, DeepSpeedConfig, LoggerConfig, OptimConfig, RunConfig, TrainerConfig
from train.data import build_batches
from train.dist import DistInfo, all_reduce_mean, micro_batch_randoms, seed_rank_stream
from train.engines import build_engine, deepspeed_config
from train.speed import Speed
from train.periodic_eval import GenerativeEval, GenerativeEvalConfig, own_rng
from train.run_exports import export_model, stage_record
from train.loop import StepOutput
from train.warm_start import export_record, load_export_weights
from train.zero import GatheredEMA

log = logging.getLogger("train")


@dataclass(frozen=True)
class SamplePanelConfig(SamplingSpec):
    """The samples section: the sampling spec (sampler, steps, eta, spacing, cfg_scale) of the W&B
    panels and of trainer.eval_every, recorded in the UNet export as `infd sample`'s defaults, and
    what the panels draw."""

    prompts: list[str] = field(default_factory=lambda: ["a photograph", "a painting"])
    latent_size: int = 64


@dataclass
class DiffusionTrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="diffusion"))
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(ema=True, ema_decay=0.9999))
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9.6e-5, betas=(0.9, 0.999), weight_decay=0.01))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # On image shards the loader builds only the encoder inputs (patch.gt=true adds the GT patches).
    data: DataSourceConfig = field(default_factory=lambda: DataSourceConfig(
        kind="latents", loader=DataConfig(patch=PatchConfig(gt=False))))
    samples: SamplePanelConfig = field(default_factory=SamplePanelConfig)  # also how trainer.eval_every samples
    eval: GenerativeEvalConfig = field(default_factory=lambda: GenerativeEvalConfig(num_samples=64))
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def validate(self, prefix: str = "") -> None:
        if self.trainer.eval_every and not self.data.autoencoder:
            raise ConfigError("config key 'data.autoencoder' is empty but trainer.eval_every > 0: evaluation renders "
                              "samples with the autoencoder export; set it (or trainer.eval_every=0)")
        if self.data.kind == "shards" and not self.data.autoencoder:
            raise ConfigError("config key 'data.autoencoder' is empty: data.kind=shards encodes images on the fly "
                              "and needs an autoencoder export (or use data.kind=latents with a latent cache)")
        if self.diffusion.align.enabled and not (self.data.kind == "shards" and self.data.loader.patch.gt):
            raise ConfigError("config key 'diffusion.align.enabled': the alignment loss compares renders with GT "
                              "patches: set data=shards and data.loader.patch.gt=true")
        if self.diffusion.align.enabled and self.diffusion.objective == "rectified_flow":
            raise ConfigError("config key 'diffusion.align.enabled': the alignment loss needs an epsilon or v "
                              "objective (diffusion.objective)")
        if self.unet.lowres_channels and self.trainer.eval_every:
            raise ConfigError("config key 'trainer.eval_every': generative evaluation (FID of unconditional samples) "
                              "does not apply to a super-resolution UNet (unet.lowres_channels > 0); set it to 0")
        if self.unet.lowres_channels and not (self.data.kind == "shards" and self.data.loader.patch.lowres.enabled):
            raise ConfigError(f"config key 'unet.lowres_channels' = {self.unet.lowres_channels}: a super-resolution "
                              "UNet trains on image shards with their low-resolution views: set data=shards and "
                              "data.loader.patch.lowres.enabled=true")
        if self.text.kind != "none" and self.unet.kind == "infd" and self.unet.context_dim == 0:
            raise ConfigError(f"config key 'unet.context_dim' is 0 but text.kind={self.text.kind}: set it to the "
                              "text encoder's width (512 for OpenCLIP ViT-B-32, 768 for SD 1.x's CLIP ViT-L/14)")


def estimate_latent_scale(batches, ae, count: int, device) -> float:
    """1 / std of the first `count` latents of `batches` (LDM's scale factor: the diffusion model
    then sees unit-variance latents). Every rank reads the same batches, so every rank agrees."""
    latents, n = [], 0
    for batch in batches:
        z = batch.z if isinstance(batch, LatentBatch) else ae.encode(batch.to(device).enc).cpu()
        latents.append(z.float())
        n += z.shape[0]
        if n >= count:
            break
    return float(1.0 / torch.cat(latents)[:count].std().clamp_min(1e-6))


class DiffusionTask:
    def __init__(self, cfg: DiffusionTrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every rank
        # Weights from unet.pretrained unless an export starts the run; a diffusers_config alone trains from scratch.
        unet = build_unet(cfg.unet, load_pretrained=bool(cfg.unet.pretrained) and not cfg.trainer.init_from)
        if cfg.trainer.init_from:
            load_export_weights(unet, cfg.trainer.init_from)
        self.speed = Speed(cfg.trainer, info.device)
        unet = self.speed.prepare(unet.to(info.device))
        self.text = build_text_encoder(cfg.text)
        seed_rank_stream(cfg.trainer.seed, info)
        self.text = self.text.to(info.device) if self.text is not None else None
        self._empty_text = None  # embedding of "" (dropped captions), computed once
        self.unet = build_engine(unet, cfg.optim, deepspeed_config(cfg.deepspeed, cfg.data.loader.batch_size, info))
        self.engines = {"unet": self.unet}
        self.ema = GatheredEMA(self.unet.module, cfg.trainer.ema_decay) if cfg.trainer.ema else None
        self.schedule = build_schedule(cfg.diffusion)
        self.ae = frozen(load_export(cfg.data.autoencoder, info.device)[0]) if cfg.data.autoencoder else None
        align = cfg.diffusion.align
        self.align_lpips = None
        if align.enabled and align.lpips != "none":
            self.align_lpips = frozen(build_lpips(align.lpips).to(info.device))
        self.evaluator = None
        if cfg.trainer.eval_every:
            with own_rng(info.device):
                self.evaluator = GenerativeEval(cfg.eval, cfg.samples, info,
                                                cfg.data.loader.shards if cfg.data.kind == "shards" else [],
                                                text=self.text is not None)

    def _estimate_latent_scale(self) -> float:
        cfg = self.cfg.diffusion
        # The same first batches on every rank: rank 0's view of a one-rank loader. It reads its own
        # data and encodes deterministically: no RNG stream of the run moves.
        first = build_data(self.cfg, DistInfo(0, 0, 1, self.info.device), shuffle=False)
        with torch.no_grad():
            scale = estimate_latent_scale(islice(first, cfg.latent_scale_samples), self.ae,
                                          cfg.latent_scale_samples, self.info.device)
        log.info("latent scale factor %.5f (1 / std of %d latents)", scale, cfg.latent_scale_samples)
        return scale

    def _context(self, captions: list[str], cached, drop: torch.Tensor):
        """Text tokens (B, L, D) with dropped captions replaced by the empty caption's; None without text."""
        if self.text is None:
            return None
        if cached is None:
            return self.text(["" if d else c for c, d in zip(captions, drop.tolist())])
        if self._empty_text is None:
            self._empty_text = self.text([""])
        cached = cached.to(self.info.device)
        return torch.where(drop.to(cached.device)[:, None, None], self._empty_text.to(cached.dtype), cached)

    def _labels(self, labels, drop: torch.Tensor):
        """Class labels (B,), with the "no label" class (num_classes) for missing and dropped ones."""
        n = self.cfg.unet.num_classes
        if not n or labels is None:
            return None
        labels = torch.where(labels < 0, n, labels)
        return torch.where(drop.cpu(), n, labels).to(self.info.device)

    def _latents(self, batch: LatentBatch | PatchBatch) -> torch.Tensor:
        """z (B, C, h, w): the cached latents, or the encoder inputs (of a batch on the device) encoded."""
        if isinstance(batch, LatentBatch):
            return batch.z.to(self.info.device)
        with torch.no_grad():
            return self.ae.encode(batch.enc)

    def train_step(self, micro_batches: list[LatentBatch | PatchBatch], step: int) -> StepOutput:
        logs, timesteps = {"loss": 0.0}, []
        randoms = micro_batch_randoms(self.cfg.trainer.seed, step, micro_batches, self.info)
        fn = unet_fn(self.unet, self.schedule)
        for batch, rand in zip(micro_batches, randoms):
            with self.speed.autocast():  # the loss is reduced in fp32 (training_loss); the backward runs outside
                loss, t, parts = self._loss(batch, rand, fn)
            self.unet.backward(loss)
            self.unet.step()
            for name, value in {"loss": loss, **parts}.items():
                logs[name] = logs.get(name, 0.0) + all_reduce_mean(value.detach().float()).item() / len(micro_batches)
            timesteps += t.tolist()
        if self.ema is not None:
            self.ema.update(self.unet.module)
        return StepOutput(logs | {"latent_scale": self.latent_scale}, {"t": timesteps})

    def _loss(self, batch: LatentBatch | PatchBatch, rand: KeyedRandom, fn):
        """(the loss, t (B,), its parts to log)."""
        if isinstance(batch, PatchBatch):
            batch = batch.to(self.info.device)  # once: its images become float in [-1, 1] here
        z = self.speed.images(self._latents(batch) * self.latent_scale)
        # One draw drops the caption and the label together: guidance's unconditional branch has neither.
        conditioned = self.text is not None or self.cfg.unet.num_classes > 0
        drop = rand.rand("cond_dropout") < self.cfg.text.caption_dropout if conditioned else None
        cached = isinstance(batch, LatentBatch)  # only a latent cache holds text embeddings and labels
        cond = {"context": self._context(batch.captions or [""] * z.shape[0], batch.text if cached else None, drop),
                "labels": self._labels(batch.labels if cached else None, drop)}
        if self.cfg.unet.lowres_channels:
            cond |= self._lowres(batch, rand)
        align = self.cfg.diffusion.align
        if not align.enabled:
            loss, t = training_loss(lambda x, t: fn(x, t, cond), self.schedule, z, rand)
            return loss, t, {}
        pred, target, x_t, t = training_prediction(lambda x, t: fn(x, t, cond), self.schedule, z, rand)
        mse = (pred.float() - target.float()).pow(2).mean()
        z0_hat = self.schedule.to_x0_eps(pred, x_t, t)[0] / self.latent_scale
        aligned = alignment_loss(self.ae, z0_hat, t, batch.gt, batch.coords, batch.cells, align, self.align_lpips)
        return mse + align.weight * aligned, t, {"loss_mse": mse, "loss_align": aligned}

    def _lowres(self, batch: PatchBatch, rand: KeyedRandom) -> dict:
        """A super-resolution UNet's condition: the low-resolution view encoded by the frozen encoder (on the
        latent grid, scaled as z), plus Gaussian noise at a level drawn per sample from [0, lowres_noise]."""
        with torch.no_grad():
            c = self.ae.encode(batch.lowres) * self.latent_scale
        level = (rand.rand("lowres_level") * self.cfg.diffusion.lowres_noise).to(c.device)
        noise = rand.randn(c.shape[1:], "lowres_noise").to(c.device, c.dtype)
        return {"lowres": self.speed.images(c + level.view(-1, 1, 1, 1) * noise), "level": level}

    def resolved_cfg(self) -> DiffusionTrainConfig:
        """The config with diffusion.latent_scale a number: "auto" is estimated at its first use,
        unless a checkpoint restored the number before (load_state_dict: a resume reads no data for
        it). The config then keeps the number, for the loss, the panels, evaluation and exports."""
        if self.cfg.diffusion.latent_scale == "auto":
            self._set_latent_scale(self._estimate_latent_scale())
        return self.cfg

    @property
    def latent_scale(self) -> float:
        return float(self.resolved_cfg().diffusion.latent_scale)

    def _set_latent_scale(self, scale: float) -> None:
        self.cfg = replace(self.cfg, diffusion=replace(self.cfg.diffusion, latent_scale=scale))

    def state_dict(self) -> dict:
        """The latent scale the UNet trains with: a resumed run keeps it (not a new estimate)."""
        return {"latent_scale": self.latent_scale}

    def load_state_dict(self, state: dict) -> None:
        if "latent_scale" in state:
            self._set_latent_scale(float(state["latent_scale"]))

    def latent_diffusion(self, unet) -> LatentDiffusion:
        """`unet` (the engine's module, or its EMA copy) with the run's schedule and text encoder."""
        return LatentDiffusion(unet, self.resolved_cfg().diffusion, self.text)

    @torch.no_grad()
    def image_panels(self, batch) -> dict:
        """Sample grids at the autoencoder's size and twice it, for the configured prompts."""
        if self.ae is None:
            return {}
        s = self.cfg.samples
        prompts = list(s.prompts) or [""]
        c, h = self.cfg.unet.in_channels, s.latent_size
        cond, panels = Conditioning(prompts if self.text is not None else None), {}
        if self.cfg.unet.lowres_channels:  # super-resolution: the batch's low-resolution views as conditions
            low = batch.to(self.info.device).lowres[:len(prompts)]
            prompts = prompts[:len(low)]
            cond = Conditioning(prompts if self.text is not None else None, lowres=self.ae.encode(low))
            h = cond.lowres.shape[-1]
            panels["samples/lowres"] = (low.float().cpu(), prompts)
        z = generate_latents(self.latent_diffusion(self.unet.module), spec_of(s), cond, (len(prompts), c, h, h), 0)
        phi = self.ae.decode(z)
        base = self.ae.cfg.net.resolution
        renders = {f"samples/{n}": (render_tiles(self.ae.renderer, phi, (n, n)), prompts) for n in (base, 2 * base)}
        return panels | renders

    def evaluate(self, should_stop) -> dict:
        """FID-256 / pFID (eval section) of the EMA UNet's samples; rank 0 gets them."""
        with own_rng(self.info.device):
            return self.evaluator(self.latent_diffusion(self.unet.module), self.ema, self.ae, should_stop)

    def export(self, run_dir: Path, step: int) -> Path | None:
        record = stage_record(self.resolved_cfg(), "unet", step, self.ema is not None)
        return export_model(self.unet.module, self.ema, record, run_dir, self.info)


def build_data(cfg: DiffusionTrainConfig, info: DistInfo, shuffle: bool = True):
    """shuffle=False: no workers, no high-res stream (the latent-scale estimate)."""
    data = cfg.data
    if not shuffle:
        data = replace(data, loader=replace(data.loader, num_workers=0, p_hr=0.0))
    return build_batches(data, info, cfg.deepspeed.grad_accum, latent_channels=cfg.unet.in_channels)


def resolve_models(cfg: DiffusionTrainConfig) -> DiffusionTrainConfig:
    """The config with the UNet and schedule the run trains: trainer.init_from's export (its
    shape, schedule and latent scale), or a pretrained diffusers UNet's (unet.kind=diffusers: its
    config, and with diffusion.from_source its scheduler's betas, objective, timestep spacing and
    offset and its VAE's scaling factor). config.yaml records the result, so exports rebuild the
    UNet and sample with its schedule without the source folder."""
    if cfg.trainer.init_from:
        record = export_record(cfg.trainer.init_from, "unet")
        # Its architecture; a super-resolution run may add the low-resolution condition to a plain UNet.
        unet = replace(record.model, grad_checkpointing=cfg.unet.grad_checkpointing,
                       lowres_channels=cfg.unet.lowres_channels or record.model.lowres_channels)
        # The export's schedule; the training-only keys (noise augmentation, alignment) are this run's.
        diffusion = replace(record.diffusion or DiffusionConfig(), lowres_noise=cfg.diffusion.lowres_noise,
                            align=cfg.diffusion.align)
        return replace(cfg, unet=unet, diffusion=diffusion)
    if cfg.unet.kind != "diffusers":
        return cfg
    from infd.convert.stable_diffusion import read_sd_settings
    from infd.models.diffusers_unet import fill_unet_config

    settings = read_sd_settings(cfg.unet.pretrained)
    unet = fill_unet_config(cfg.unet)  # the source's in_channels, context_dim and diffusers_config
    if not cfg.diffusion.from_source:
        return replace(cfg, unet=unet)
    log.info("schedule and latent scale from %s: %s, timestep spacing %s", cfg.unet.pretrained,
             settings["diffusion"], settings["spacing"])
    return replace(cfg, unet=unet, diffusion=replace(cfg.diffusion, **settings["diffusion"]),
                   samples=replace(cfg.samples, spacing=settings["spacing"]))


def run(cfg: DiffusionTrainConfig, raw: dict) -> int:
    from train.app import run_stage

    try:
        cfg = resolve_models(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)  # every rank alike, before the process group
        sys.exit(2)
    return run_stage(cfg, raw, lambda info: DiffusionTask(cfg, info), lambda info: build_data(cfg, info))


def main() -> None:
    from train.app import hydra_main

    hydra_main("diffusion", DiffusionTrainConfig, run)


if __name__ == "__main__":
    sys.exit(run_as_process(main))
