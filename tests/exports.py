"""Exports of small models for tests, with the records a training run would write."""
from dataclasses import replace

from infd.diffusion.schedule import DiffusionConfig
from infd.export import ExportRecord, save_export


def save_ae(model, path):
    return save_export(model, ExportRecord("autoencoder", model.cfg), path)


def save_unet(model, path, diffusion: dict | None = None, **fields):
    """A UNet export with latent scale 1 and the default schedule changed by `diffusion`."""
    schedule = replace(DiffusionConfig(latent_scale=1.0), **(diffusion or {}))
    return save_export(model, ExportRecord("unet", model.cfg, diffusion=schedule, **fields), path)
