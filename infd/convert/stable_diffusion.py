"""Stable Diffusion (diffusers folders) as stage 2: its settings.

A diffusers SD folder (SD 1.x and 2.x) holds model_index.json, scheduler/scheduler_config.json,
vae/config.json, unet/ (config.json + diffusion_pytorch_model.safetensors), text_encoder/ and
tokenizer/. With our encoder frozen to SD's latent space, SD's UNet and text encoder stay valid
for stage 2 (paper section 5.6); this module turns the folder into our objects:

read_sd_settings(path)      -> {"diffusion": DiffusionConfig keys, "spacing", "unet_config"}

Its UNet, behind our UNet's call, is infd.models.diffusers_unet's (fill_unet_config,
build_diffusers_unet); its text encoder infd.text's (kind hf_clip).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from infd.config import ConfigError
from infd.diffusion.samplers import SPACINGS

SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
VAE_CONFIG = "vae/config.json"
# diffusers' DDIMScheduler defaults, for keys a folder's scheduler config lacks: what
# DDIMScheduler.from_config(folder's config) would sample with.
DDIM_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                 "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon",
                 "timestep_spacing": "leading"}
OBJECTIVES = {"epsilon": "epsilon", "v_prediction": "v"}


def read_json(path: Path, what: str) -> dict:
    """A JSON file of a diffusers folder; ConfigError naming `what` when it is missing."""
    if not path.is_file():
        raise ConfigError(f"{what}: expected the file {path}, which does not exist")
    return json.loads(path.read_text())


def sd_folders(path: str | Path, key: str = "path") -> tuple[Path, Path]:
    """(SD root, unet folder) of `path`: an SD root with unet/config.json, or a unet folder
    (config.json) whose parent is the root. ConfigError naming `key` otherwise."""
    path = Path(path)
    if (path / "unet" / "config.json").is_file():
        return path, path / "unet"
    if (path / "config.json").is_file():
        return path.parent, path
    raise ConfigError(f"{key} = {str(path)!r}: expected a diffusers Stable Diffusion folder (with "
                      "unet/config.json) or its unet/ folder (with config.json)")


def read_sd_settings(path: str | Path) -> dict:
    """The sampling settings of an SD diffusers folder (root or its unet/ folder).

    Returns {"diffusion": {objective, timesteps, beta_start, beta_end, beta_schedule, steps_offset,
    set_alpha_to_one, latent_scale} (DiffusionConfig keys), "spacing": the scheduler's
    timestep_spacing, "unet_config": unet/config.json as a dict}.
    """
    root, unet = sd_folders(path)
    scheduler = read_json(root / SCHEDULER_CONFIG, f"the noise schedule of {path}")
    vae = read_json(root / VAE_CONFIG, f"the latent scale (scaling_factor) of {path}")
    diffusion, spacing = scheduler_settings(scheduler, str(root / SCHEDULER_CONFIG))
    diffusion["latent_scale"] = vae_latent_scale(vae, str(root / VAE_CONFIG))
    return {"diffusion": diffusion, "spacing": spacing,
            "unet_config": read_json(unet / "config.json", f"the UNet config of {path}")}


def scheduler_settings(sched: dict, where: str) -> tuple[dict, str]:
    """(DiffusionConfig keys, timestep spacing) of a diffusers scheduler config; ConfigError for
    what our samplers cannot reproduce, naming the key and the file `where`."""
    s = {**DDIM_DEFAULTS, **{k: v for k, v in sched.items() if v is not None}}
    if s["prediction_type"] not in OBJECTIVES:
        raise ConfigError(f"{where}: prediction_type {s['prediction_type']!r} is not supported; "
                          f"choose one of {list(OBJECTIVES)}")
    if s["beta_schedule"] not in ("linear", "scaled_linear"):
        raise ConfigError(f"{where}: beta_schedule {s['beta_schedule']!r} is not supported; "
                          "choose one of ['linear', 'scaled_linear']")
    for key in ("trained_betas", "rescale_betas_zero_snr"):  # both change the schedule itself
        if s.get(key):
            raise ConfigError(f"{where}: {key} = {s[key]!r} is not supported (only beta_start/beta_end schedules)")
    for key in ("clip_sample", "thresholding"):  # sampling-time tricks: the schedule is still right
        if s.get(key):
            warnings.warn(f"{where}: {key} = true is ignored: our samplers neither clip nor threshold x0",
                          stacklevel=3)
    if s["timestep_spacing"] not in SPACINGS:
        raise ConfigError(f"{where}: timestep_spacing {s['timestep_spacing']!r}: choose one of {list(SPACINGS)}")
    diffusion = {"objective": OBJECTIVES[s["prediction_type"]], "timesteps": int(s["num_train_timesteps"]),
                 "beta_start": float(s["beta_start"]), "beta_end": float(s["beta_end"]),
                 "beta_schedule": s["beta_schedule"], "steps_offset": int(s["steps_offset"]),
                 "set_alpha_to_one": bool(s["set_alpha_to_one"])}
    return diffusion, s["timestep_spacing"]


def vae_latent_scale(vae: dict, where: str) -> float:
    """The VAE's scaling_factor (SD: 0.18215): diffusion runs on z * scaling_factor."""
    if vae.get("shift_factor") not in (None, 0, 0.0) or vae.get("latents_mean") is not None:
        raise ConfigError(f"{where}: latents shifted before scaling (shift_factor / latents_mean) are not "
                          "supported; only scaling_factor is")
    return float(vae.get("scaling_factor", 0.18215))  # AutoencoderKL's default is SD's value
