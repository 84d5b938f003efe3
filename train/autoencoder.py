"""Stage 1: train the neural-field autoencoder.

    python -m train.autoencoder experiment=ae_cpu_tiny trainer.max_steps=100 run.name=ae_tiny
    torchrun --nproc_per_node 8 -m train.autoencoder experiment=ae_ffhq_paper data.loader.shards=...
    deepspeed --num_gpus 8 --no_local_rank -m train.autoencoder experiment=ae_laion_hr

One step: the generator (encoder, bottleneck, decoder, renderer) then the discriminator, which
reuses the generator's rendered output (detached), so the autoencoder runs once per step. The
adaptive GAN weight uses gradients averaged over ranks.
"""
from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from infd.config import ConfigError
from infd.data.batches import PatchBatch
from infd.convert.autoencoder import ConversionError, build_autoencoder, converted_config
from infd.losses import Stage1Loss, Stage1LossConfig
from infd.models import AutoencoderConfig, NeuralFieldAutoencoder
from infd.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from infd.models.sync_batchnorm import synchronise_batchnorm
from infd.render import render_tiles
from infd.utils.mfu import Phases
from infd.utils.process_main import run_as_process
from train.config import DataSourceConfig, DeepSpeedConfig, LoggerConfig, OptimConfig, RunConfig, TrainerConfig
from train.data import build_batches
from train.dist import DistInfo, all_reduce_mean, micro_batch_randoms, seed_rank_stream
from train.engines import build_engine, deepspeed_config
from train.periodic_eval import ReconstructionEval, ReconstructionEvalConfig, own_rng
from train.run_exports import export_model, stage_record
from train.speed import Speed
from train.loop import StepOutput
from train.warm_start import export_model_config, load_export_weights
from train.zero import GatheredEMA

log = logging.getLogger("train")


@dataclass
class AutoencoderTrainConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(name="autoencoder"))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: Stage1LossConfig = field(default_factory=Stage1LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    disc_optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataSourceConfig = field(default_factory=DataSourceConfig)
    eval: ReconstructionEvalConfig = field(default_factory=ReconstructionEvalConfig)  # trainer.eval_every
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def validate(self, prefix: str = "") -> None:
        if self.data.loader.patch.encoder_size != self.model.net.resolution:
            raise ConfigError(
                f"config key 'data.loader.patch.encoder_size' = {self.data.loader.patch.encoder_size} differs from "
                f"'model.net.resolution' = {self.model.net.resolution}: the encoder is built for, and exported "
                "with, its input size; set both to the same value")
        if self.data.kind == "latents":
            raise ConfigError("config key 'data.kind' = latents: stage 1 trains on images; use shards or synthetic")
        if not self.data.loader.patch.gt:
            raise ConfigError("config key 'data.loader.patch.gt' = false: stage 1 trains on the GT patches; set it "
                              "true")
        if self.deepspeed.zero_stage == 3:
            raise ConfigError(
                "config key 'deepspeed.zero_stage' = 3 is not supported for the autoencoder: the adaptive GAN "
                "weight needs the full gradient of the renderer's last layer on every rank before the "
                "generator's backward, which ZeRO-3 partitions away. Use zero_stage 1 or 2 (the model is 58M "
                "parameters; ZeRO-2 already partitions its optimizer states and gradients).")


@contextmanager
def frozen(module: torch.nn.Module):
    """No parameter gradients (and so no ZeRO gradient hooks) for `module` inside the block."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class AutoencoderTask:
    def __init__(self, cfg: AutoencoderTrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        torch.manual_seed(cfg.trainer.seed)  # the same initial weights on every rank (random-init LPIPS too)
        self.speed = Speed(cfg.trainer, info.device)
        model = self.speed.prepare(self._model(cfg).to(info.device))
        disc = PatchDiscriminator(cfg.disc).to(info.device)
        if cfg.disc.norm == "sync_batch":
            disc = synchronise_batchnorm(disc)  # again on the device: torch's SyncBatchNorm on CUDA
        disc = self.speed.prepare(disc)
        self.loss = Stage1Loss(cfg.loss).to(info.device)
        if self.loss.lpips is not None:
            self.speed.prepare(self.loss.lpips)
        seed_rank_stream(cfg.trainer.seed, info)
        micro = cfg.data.loader.batch_size
        self.gen = build_engine(model, cfg.optim, deepspeed_config(cfg.deepspeed, micro, info))
        self.disc = build_engine(disc, cfg.disc_optim, deepspeed_config(cfg.deepspeed, micro, info))
        self.engines = {"generator": self.gen, "discriminator": self.disc}
        self.ema = GatheredEMA(model, cfg.trainer.ema_decay) if cfg.trainer.ema else None
        self.evaluator = None
        if cfg.trainer.eval_every:
            self.evaluator = ReconstructionEval(cfg.eval, cfg.model.net.resolution, info)
        self.phases = Phases(info.device)  # per-phase seconds when enabled (benchmarks/train_step.py)

    def _model(self, cfg: AutoencoderTrainConfig) -> NeuralFieldAutoencoder:
        """The model with its starting weights: an export's (trainer.init_from), a converted
        autoencoder's encoder and decoder (model.init.autoencoder, new renderer), or random."""
        if cfg.trainer.init_from:
            model = NeuralFieldAutoencoder(cfg.model)
            load_export_weights(model, cfg.trainer.init_from)
            return model
        model, report = build_autoencoder(cfg.model)
        if report is not None and self.info.is_main:
            log.info("converted %s", report)
        return model

    def train_step(self, micro_batches: list[PatchBatch], step: int) -> StepOutput:
        totals: dict[str, float] = {}
        randoms = micro_batch_randoms(self.cfg.trainer.seed, step, micro_batches, self.info)
        for batch, rand in zip(micro_batches, randoms):
            # Share of GT patches at the image's original resolution (patch.p_keep, p_keep_late).
            kept = {"data/kept_frac": batch.kept.float().mean()}
            logs = self._micro_step(batch.to(self.info.device), step, rand, kept)
            for k, v in logs.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(micro_batches)
        if self.ema is not None:
            self.ema.update(self.gen.module)
        return StepOutput(totals)

    def _micro_step(self, b: PatchBatch, step: int, rand, logs_in: dict) -> dict:
        enc, gt, phase = self.speed.images(b.enc), self.speed.images(b.gt), self.phases
        with phase("forward"), self.speed.autocast():  # forward passes only; the backward runs outside
            out = self.gen(enc, b.coords, b.cells, rand=rand)
        renderer = self.gen.module.renderer
        with phase("loss"), frozen(self.disc.module), self.speed.autocast():
            # The discriminator module itself, not its engine: no engine hook sees this graph. The loss
            # sees the output in fp32 (its reductions and the adaptive weight's gradients stay fp32).
            loss_g, grad_rgb, logs = self.loss.generator_objective(
                out.rgb.float(), gt, out.bottleneck.loss, step, disc=self.disc.module,
                head_weight_grad=lambda g: renderer.head_weight_grad(out.head_input, g), reduce_grad=all_reduce_mean)
        with phase("backward"):
            surrogate = (out.rgb * grad_rgb).sum() + self.loss.cfg.bottleneck_weight * out.bottleneck.loss
            self.gen.backward(surrogate)
        with phase("optimizer"):
            self.gen.step()
        if self.loss.gan_active(step):
            with phase("discriminator"):
                fake = out.rgb.detach()
                with self.speed.autocast():
                    loss_d, dlogs = self.loss.discriminator_loss(self.disc(gt), self.disc(fake))
                self.disc.backward(loss_d)
                self.disc.step()
            logs.update(dlogs)
        logs.update(logs_in)
        logs.update({f"bottleneck/{k.split('/')[-1]}": v for k, v in out.bottleneck.stats.items()})
        # Every rank saw its own shard of the batch: report global means (equal to a 1-process run),
        # in one all-reduce rather than one per scalar.
        keys = sorted(logs)
        values = torch.stack([torch.as_tensor(logs[k], device=self.info.device, dtype=torch.float32) for k in keys])
        return dict(zip(keys, all_reduce_mean(values).tolist()))

    @torch.no_grad()
    def image_panels(self, batch: PatchBatch, n: int = 2) -> dict:
        """Input, reconstructions rendered at 256, 512 and 1024, and a zoomed crop of a 4096 render."""
        model = self.gen.module
        was_training = model.training
        model.eval()
        x = batch.to(self.info.device).enc[:n]
        phi = model.decode(model.encode(x))
        panels = {"images/input": x.cpu()}
        for size in (256, 512, 1024):
            panels[f"images/recon_{size}"] = render_tiles(model.renderer, phi, (size, size))
        panels["images/zoom_4096_center_256"] = render_tiles(model.renderer, phi, (4096, 4096),
                                                             region=(1920, 1920, 2176, 2176))
        model.train(was_training)
        return panels

    def evaluate(self, should_stop) -> dict:
        """Reconstruction PSNR at eval.scales, LPIPS (the loss's network) and scale consistency of
        the EMA autoencoder on the held-out eval.shards; rank 0 gets them."""
        with own_rng(self.info.device):
            return self.evaluator(self.gen.module, self.ema, self.loss.lpips, should_stop)

    def state_dict(self) -> dict:
        return {}  # everything stage 1 needs to resume is in its engines, EMA and data position

    def load_state_dict(self, state: dict) -> None:
        pass

    def export(self, run_dir: Path, step: int) -> Path | None:
        record = stage_record(self.cfg, "autoencoder", step, self.ema is not None)
        return export_model(self.gen.module, self.ema, record, run_dir, self.info)


def build_data(cfg: AutoencoderTrainConfig, info: DistInfo):
    return build_batches(cfg.data, info, cfg.deepspeed.grad_accum)


def resolve_model(cfg: AutoencoderTrainConfig) -> AutoencoderTrainConfig:
    """The config with the model the run builds: the shape of trainer.init_from's export, or of
    the autoencoder model.init.autoencoder converts (its encoder and decoder, with this config's
    renderer). The run directory's config.yaml records this one, so exports rebuild the model."""
    if cfg.trainer.init_from:
        model = export_model_config(cfg.trainer.init_from, "autoencoder", freeze_encoder=cfg.model.freeze_encoder)
    elif cfg.model.init.autoencoder:
        model = converted_config(cfg.model)
    else:
        return cfg
    resolved = replace(cfg, model=model)
    resolved.validate()
    return resolved


def run(cfg: AutoencoderTrainConfig, raw: dict) -> int:
    from train.app import run_stage

    try:
        cfg = resolve_model(cfg)
    except (ConfigError, ConversionError) as err:
        print(f"config error: {err}", file=sys.stderr)  # every rank alike, before the process group
        sys.exit(2)
    return run_stage(cfg, raw, lambda info: AutoencoderTask(cfg, info), lambda info: build_data(cfg, info))


def main() -> None:
    from train.app import hydra_main

    hydra_main("autoencoder", AutoencoderTrainConfig, run)


if __name__ == "__main__":
    sys.exit(run_as_process(main))
