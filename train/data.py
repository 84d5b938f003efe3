"""The trainers' data: one `Loader` (infd/data/loader.py) over the source the config names.

The loader owns the position (state_dict()/load_state_dict(), valid at any world size); the
sources are image shards, a latent cache, or synthetic images/latents, and the batches typed
(infd.data.batches: PatchBatch, LatentBatch), each with its own move to a device.
"""
from __future__ import annotations

from infd.data.image_samples import collate_patches, image_patch_sample
from infd.data.latents import collate_latents, latent_sample
from infd.data.loader import Loader
from infd.data.shard_source import ShardSource
from infd.data.synthetic import synthetic_images, synthetic_latents
from train.config import DataSourceConfig
from train.dist import DistInfo, ranks_per_node


def build_batches(cfg: DataSourceConfig, info: DistInfo, grad_accum: int = 1, latent_channels: int = 0) -> Loader:
    """The loader of a stage: image patches (kind shards), cached latents (kind latents), or
    synthetic images (latent_channels 0: stage 1) or latents of that many channels (stage 2)."""
    loader, syn = cfg.loader, cfg.synthetic
    if cfg.kind == "synthetic":
        source = (synthetic_latents(syn.seed, latent_channels, syn.latent_size) if latent_channels else
                  synthetic_images(syn.seed, syn.image_size, loader.patch))
    elif cfg.kind == "latents":
        source = ShardSource(loader, latent_sample, collate_latents)
    else:
        source = ShardSource(loader, image_patch_sample, collate_patches)
    return Loader(source, loader, info.rank, info.world_size, grad_accum, ranks_per_node())

