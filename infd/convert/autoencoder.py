"""Start a NeuralFieldAutoencoder from a Stable Diffusion / LDM first-stage autoencoder.

Paper section 5.6: the source's encoder and latent bottleneck (quant_conv, codebook) are kept,
its decoder is kept without the last GroupNorm / SiLU / RGB conv, so it outputs phi, and a new
renderer (random init, from cfg.renderer) replaces that tail.

    cfg.init.autoencoder = "sd-root"            diffusers: SD root with vae/, or the vae/ folder
    cfg.init.autoencoder = "v1-5.safetensors"   ldm: SD single file (first_stage_model.*) or a
                                                bare LDM first stage / VQ-f4 (.safetensors, .ckpt)

    model, report = build_autoencoder(cfg)      model.cfg = converted_config(cfg)

The shape of the model comes from the source (diffusers config.json; LDM files: the tensor
shapes), the renderer, resolution, freeze_encoder and init from cfg. Loading is strict: every
encoder / bottleneck / decoder weight must come from the source and every source weight must be
used, except the dropped decoder tail and keys that are not the autoencoder's (SD's UNet and text
encoder, LDM's training-only `loss.*`). safetensors and diffusers are imported lazily; loading a
diffusers folder needs neither diffusers nor transformers.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from infd.config import ConfigError
from infd.convert.autoencoder_keys import DROPPED_TAIL, key_map, rename_deprecated_attention
from infd.models.autoencoder import AutoencoderConfig, AutoencoderInitConfig, NeuralFieldAutoencoder

KEY = "model.init.autoencoder"
SD_PREFIX = "first_stage_model."  # the autoencoder inside a whole SD / LDM checkpoint
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.fp16.safetensors")
LDM_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class ConversionError(ConfigError):
    """The source autoencoder cannot be read or does not fit; the message names what was expected.
    A ConfigError (so a ValueError): the CLI and the trainers report it as a config mistake."""


@dataclass
class Source:
    """A located source autoencoder: where its weights are and how they are laid out."""

    path: Path  # what model.init.autoencoder names
    weights: Path  # the file holding the tensors
    format: str  # diffusers | ldm
    config: dict | None  # diffusers config.json (None for ldm)


def locate_source(init: AutoencoderInitConfig) -> Source:
    """Locate the weights (and config.json) of `init.autoencoder`; ConversionError if absent."""
    path = Path(init.autoencoder).expanduser()
    if not init.autoencoder or not path.exists():
        raise ConversionError(f"{KEY} = {init.autoencoder!r}: no such file or directory; expected a diffusers "
                              f"folder (SD root with vae/, or vae/ itself) or an LDM checkpoint file")
    fmt = init.format if init.format != "auto" else ("diffusers" if path.is_dir() else "ldm")
    if fmt == "ldm":
        if path.is_dir():
            raise ConversionError(f"{KEY} = {str(path)!r} is a directory, but format ldm expects one checkpoint "
                                  f"file ({', '.join(LDM_SUFFIXES)})")
        return Source(path, path, "ldm", None)
    folder = _diffusers_folder(path)
    weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
    if path.is_file():
        weights = path  # format diffusers given a weights file: config.json lies beside it
    if weights is None:
        raise ConversionError(f"{KEY} = {str(path)!r}: {folder} has config.json but none of {DIFFUSERS_WEIGHTS}")
    return Source(path, weights, "diffusers", json.loads((folder / "config.json").read_text()))


def _diffusers_folder(path: Path) -> Path:
    """The folder holding the VAE's config.json: path/vae (an SD root), path, or a file's parent."""
    candidates = [path.parent] if path.is_file() else [path / "vae", path]
    for folder in candidates:
        if (folder / "config.json").is_file():
            return folder
    raise ConversionError(f"{KEY} = {str(path)!r}: no diffusers autoencoder there; expected "
                          f"{' or '.join(str(c / 'config.json') for c in candidates)} (an SD root with vae/, "
                          f"or the vae/ folder itself), or set model.init.format: ldm for a checkpoint file")


def read_source(source: Source, shapes_only: bool = False) -> tuple[dict, dict]:
    """The autoencoder's state dict (source key -> tensor, or -> shape tuple when shapes_only:
    reads no tensor data from .safetensors) and the count of ignored keys per leading name.

    ldm: keys lose the `first_stage_model.` prefix; everything outside it (SD's UNet `model.*`,
    text encoder `cond_stage_model.*`, ...) and LDM's training-only `loss.*` are ignored."""
    raw = _read_file(source.weights, shapes_only)
    if source.format == "diffusers":
        return rename_deprecated_attention(raw), {}
    prefixed = any(k.startswith(SD_PREFIX) for k in raw)
    own, ignored = {}, Counter()
    for key, value in raw.items():
        if prefixed and not key.startswith(SD_PREFIX):
            ignored[key.split(".")[0]] += 1
            continue
        key = key[len(SD_PREFIX):] if prefixed else key
        if key.startswith("loss."):
            ignored["loss"] += 1
        else:
            own[key] = value
    return own, dict(ignored)


def _read_file(path: Path, shapes_only: bool) -> dict:
    """All tensors of a .safetensors or torch checkpoint file (a top-level `state_dict` unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) if shapes_only else f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors' own error types: a truncated or foreign file
            raise _unreadable(path, err) from err
    import torch

    try:  # weights_only: a checkpoint is never unpickled beyond tensors and plain containers
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # mmap needs the zip format; legacy files load without it
        data = _torch_load(path)
    except Exception as err:
        raise _unreadable(path, err) from err
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ConversionError(f"{KEY} = {str(path)!r}: expected a state dict (or {{'state_dict': ...}}), "
                              f"got {type(data).__name__}")
    return {k: tuple(v.shape) if shapes_only else v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _torch_load(path: Path):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise _unreadable(path, err) from err


def _unreadable(path: Path, err: Exception) -> ConversionError:
    how = "as safetensors" if path.suffix == ".safetensors" else "with torch.load(weights_only=True)"
    first_line = str(err).splitlines()[0] if str(err) else ""
    return ConversionError(f"{KEY} = {str(path)!r} cannot be read {how} ({type(err).__name__}: {first_line}); "
                           f"expected a state dict of tensors (re-save it as .safetensors)")


def converted_config(cfg: AutoencoderConfig) -> AutoencoderConfig:
    """A copy of cfg whose `net` and `bottleneck` describe the source at cfg.init.autoencoder;
    renderer, resolution, dropout, norm_groups (ldm), beta, freeze_encoder and init stay cfg's."""
    source = locate_source(cfg.init)
    if source.format == "diffusers":
        net, bottleneck = diffusers_fields(source.config, cfg)
    else:
        net, bottleneck = ldm_fields(read_source(source, shapes_only=True)[0], cfg)
    out = copy.deepcopy(cfg)
    out.net = dataclasses.replace(out.net, **net)
    out.bottleneck = dataclasses.replace(out.bottleneck, **bottleneck)
    out.net.validate("model.net.")
    out.bottleneck.validate("model.bottleneck.")
    if out.net.attn_resolutions and out.net.resolution % out.net.downsample_factor:
        # Our decoder finds its attention levels from resolution // f upwards: only exact for multiples.
        raise ConversionError(f"model.net.resolution = {out.net.resolution}: the source has attention at some "
                              f"levels, so it must be a multiple of the downsampling factor "
                              f"{out.net.downsample_factor}")
    return out


# diffusers config.json: fields that shape the model, fields without effect on it here, and fields
# whose other values we cannot represent.
_DIFFUSERS_KINDS = {"AutoencoderKL": "kl", "VQModel": "vq"}
_DIFFUSERS_USED = {"in_channels", "down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
                   "latent_channels", "norm_num_groups", "num_vq_embeddings", "vq_embed_dim"}
_DIFFUSERS_IGNORED = {"out_channels", "sample_size", "scaling_factor", "shift_factor", "latents_mean", "latents_std",
                      "force_upcast", "lookup_from_codebook"}
_DIFFUSERS_FIXED = {"act_fn": ("silu", "swish"), "mid_block_add_attention": (True,), "use_quant_conv": (True,),
                    "use_post_quant_conv": (True,), "norm_type": ("group",)}
_DOWN_TYPES = {"DownEncoderBlock2D": False, "AttnDownEncoderBlock2D": True}
_UP_TYPES = {"UpDecoderBlock2D": False, "AttnUpDecoderBlock2D": True}


def diffusers_fields(config: dict, cfg: AutoencoderConfig) -> tuple[dict, dict]:
    """ConvNetConfig and BottleneckConfig fields of a diffusers AutoencoderKL / VQModel config.json
    (defaults as in diffusers' constructors). Attention levels become attn_resolutions at cfg's resolution."""
    cls = config.get("_class_name", "AutoencoderKL")
    if cls not in _DIFFUSERS_KINDS:
        raise ConversionError(f"{KEY}: config.json _class_name = {cls!r}; expected one of {sorted(_DIFFUSERS_KINDS)}")
    for name, allowed in _DIFFUSERS_FIXED.items():
        if name in config and config[name] not in allowed:
            raise ConversionError(f"{KEY}: config.json {name} = {config[name]!r} cannot be represented; "
                                  f"expected {' or '.join(map(repr, allowed))}")
    unknown = sorted(k for k in config if not k.startswith("_")
                     and k not in _DIFFUSERS_USED | _DIFFUSERS_IGNORED | set(_DIFFUSERS_FIXED))
    if unknown:
        raise ConversionError(f"{KEY}: config.json fields {unknown} are unknown here; cannot tell whether they "
                              f"change the architecture")
    widths = list(config.get("block_out_channels", [64]))
    kl = _DIFFUSERS_KINDS[cls] == "kl"
    latent = config.get("latent_channels", 4 if kl else 3)
    net = {"in_channels": config.get("in_channels", 3), "ch": widths[0],
           "ch_mult": _multipliers(widths, "block_out_channels"), "num_res_blocks": config.get("layers_per_block", 1),
           "z_channels": latent, "norm_groups": config.get("norm_num_groups", 32),
           "attn_resolutions": _diffusers_attention(config, len(widths), cfg.net.resolution)}
    if kl:
        return net, {"kind": "kl", "embed_dim": latent}
    return net, {"kind": "vq", "embed_dim": config.get("vq_embed_dim") or latent,
                 "n_codes": config.get("num_vq_embeddings", 256)}


def _multipliers(widths: list, name: str) -> tuple[int, ...]:
    """Level widths -> ch_mult over the first width (ours is ch * ch_mult[i])."""
    if any(w % widths[0] for w in widths):
        raise ConversionError(f"{KEY}: {name} = {widths}: every level width must be a multiple of the first")
    return tuple(w // widths[0] for w in widths)


def _diffusers_attention(config: dict, levels: int, resolution: int) -> tuple[int, ...]:
    """Attention levels from down/up_block_types (up_blocks run from the lowest level up)."""
    down = list(config.get("down_block_types", ["DownEncoderBlock2D"]))
    up = list(config.get("up_block_types", ["UpDecoderBlock2D"]))
    for name, types, known in (("down_block_types", down, _DOWN_TYPES), ("up_block_types", up, _UP_TYPES)):
        if len(types) != levels or any(t not in known for t in types):
            raise ConversionError(f"{KEY}: config.json {name} = {types}: expected {levels} of {sorted(known)}")
    attn_down = [_DOWN_TYPES[t] for t in down]
    if attn_down != [_UP_TYPES[t] for t in reversed(up)]:
        raise ConversionError(f"{KEY}: config.json down_block_types {down} and up_block_types {up} put attention "
                              f"at different levels; one attn_resolutions serves both here")
    return tuple(resolution // 2 ** level for level, attn in enumerate(attn_down) if attn)


def ldm_fields(shapes: dict, cfg: AutoencoderConfig) -> tuple[dict, dict]:
    """ConvNetConfig and BottleneckConfig fields read off an LDM/CompVis state dict's shapes.
    norm_groups stays cfg's: LDM's GroupNorm(32) is fixed in code, not in the weights."""
    conv_in = _shape(shapes, "encoder.conv_in.weight")
    n_levels = 1 + max((int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")), default=-1)
    widths = [_shape(shapes, f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(max(n_levels, 1))]
    blocks = {k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")}
    attn_enc = [f"encoder.down.{i}.attn.0.norm.weight" in shapes for i in range(n_levels)]
    attn_dec = [any(k.startswith(f"decoder.up.{i}.attn.") for k in shapes) for i in range(n_levels)]
    if attn_enc != attn_dec:
        raise ConversionError(f"{KEY}: encoder attention levels {attn_enc} differ from the decoder's {attn_dec}")
    _shape(shapes, "encoder.mid.attn_1.q.weight")  # LDM always has mid attention; we cannot drop it
    net = {"in_channels": conv_in[1], "ch": conv_in[0], "ch_mult": _multipliers(widths, "encoder level widths"),
           "num_res_blocks": len(blocks), "z_channels": _shape(shapes, "decoder.conv_in.weight")[1],
           "attn_resolutions": tuple(cfg.net.resolution // 2 ** i for i, a in enumerate(attn_enc) if a)}
    embed_dim = _shape(shapes, "post_quant_conv.weight")[1]
    if "quantize.embedding.weight" in shapes:
        n_codes, embed_dim = shapes["quantize.embedding.weight"]
        return net, {"kind": "vq", "embed_dim": embed_dim, "n_codes": n_codes}
    if _shape(shapes, "quant_conv.weight")[0] == 2 * embed_dim:
        return net, {"kind": "kl", "embed_dim": embed_dim}
    raise ConversionError(f"{KEY}: quant_conv has {shapes['quant_conv.weight'][0]} output channels for "
                          f"embed_dim {embed_dim}: expected quantize.embedding.weight (vq) or 2 x embed_dim (kl)")


def _shape(shapes: dict, key: str) -> tuple:
    if key in shapes:
        return shapes[key]
    hint = ("; its keys look like diffusers' (down_blocks): set model.init.format: diffusers with config.json "
            "beside the file" if any(".down_blocks." in k or k.startswith("down_blocks") for k in shapes) else "")
    raise ConversionError(f"{KEY}: expected key {key!r} of the LDM/CompVis first-stage layout (bare or under "
                          f"{SD_PREFIX!r}), not found among {len(shapes)} keys{hint}")


def load_source_weights(model: NeuralFieldAutoencoder, init: AutoencoderInitConfig) -> dict:
    """Copy the source's encoder, bottleneck and decoder weights into `model` (built from
    converted_config); the renderer keeps its own init. Strict: ConversionError lists missing,
    unexpected and mis-shaped keys. Returns a report (format, source, loaded, dropped_tail, ...)."""
    source = locate_source(init)
    tensors, ignored = read_source(source)
    mapping = key_map(model, source.format)
    ours = model.state_dict()
    loaded, missing, mis_shaped = {}, [], []
    for key, names in mapping.items():
        absent = [n for n in names if n not in tensors]
        if absent:
            missing += absent
            continue
        value = _fit(key, [tensors[n] for n in names], tuple(ours[key].shape), mis_shaped)
        if value is not None:
            loaded[key] = value
    used = {n for names in mapping.values() for n in names}
    tail = sorted(k for k in tensors if k.startswith(DROPPED_TAIL[source.format]))
    unexpected = sorted(set(tensors) - used - set(tail))
    if missing or unexpected or mis_shaped:
        raise ConversionError(_mismatch_message(source, missing, unexpected, mis_shaped))
    full = dict(ours)
    full.update(loaded)
    model.load_state_dict(full, strict=True)  # strict: every key of ours, from the source or kept
    return {"format": source.format, "source": str(source.path), "weights": str(source.weights),
            "loaded": len(loaded), "dropped_tail": tail, "ignored": ignored, "renderer": "new (random init)"}


def _fit(key: str, parts: list, shape: tuple, mis_shaped: list):
    """Source tensor(s) for our `key`: concatenated along dim 0 (qkv), reshaped when only trailing
    size-1 dims differ (diffusers' Linear attention weights (C, C) -> our 1x1 conv (C, C, 1, 1))."""
    import torch

    if len({tuple(p.shape) for p in parts}) > 1:
        mis_shaped.append(f"{key}: source parts of shapes {[list(p.shape) for p in parts]}")
        return None
    value = parts[0] if len(parts) == 1 else torch.cat([p.reshape(p.shape[0], -1) for p in parts])
    if tuple(value.shape) != shape and _squeezed(value.shape) == _squeezed(shape):
        value = value.reshape(shape)
    if tuple(value.shape) != shape:
        mis_shaped.append(f"{key}: ours {list(shape)}, source {list(value.shape)}")
        return None
    return value


def _squeezed(shape) -> tuple:
    shape = tuple(shape)
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _mismatch_message(source: Source, missing: list, unexpected: list, mis_shaped: list) -> str:
    def listed(title: str, keys: list) -> str:
        more = f" ... and {len(keys) - 20} more" if len(keys) > 20 else ""
        return f"\n  {title} ({len(keys)}): {', '.join(keys[:20])}{more}"

    text = (f"{KEY} = {str(source.path)!r} ({source.format} layout, {source.weights.name}) does not match the "
            f"autoencoder its config describes:")
    for title, keys in (("missing source keys", missing), ("unexpected source keys", unexpected),
                        ("shape mismatches", mis_shaped)):
        if keys:
            text += listed(title, keys)
    if mis_shaped and source.format == "diffusers":
        text += ("\n  config.json does not describe these weights: check latent_channels, block_out_channels, "
                 "layers_per_block, in_channels")
    return text


def build_autoencoder(cfg: AutoencoderConfig) -> tuple[NeuralFieldAutoencoder, dict | None]:
    """The model cfg describes and its conversion report: with cfg.init.autoencoder, the source's
    encoder and decoder (model.cfg = converted_config(cfg), so exports rebuild it without the
    source) and a new renderer; without, a random init and None."""
    if not cfg.init.autoencoder:
        return NeuralFieldAutoencoder(cfg), None
    model = NeuralFieldAutoencoder(converted_config(cfg))
    return model, load_source_weights(model, cfg.init)


def source_summary(cfg: AutoencoderConfig) -> dict:
    """Where a converted config's weights come from, without reading tensor data where the
    format allows: path, format, weights file, the dropped decoder tail and ignored key counts."""
    source = locate_source(cfg.init)
    shapes, ignored = read_source(source, shapes_only=True)
    tail = sorted(k for k in shapes if k.startswith(DROPPED_TAIL[source.format]))
    return {"path": str(source.path), "format": source.format, "weights": str(source.weights),
            "class": source.config.get("_class_name", "AutoencoderKL") if source.config else "LDM/CompVis layout",
            "dropped_tail": tail, "ignored": ignored, "renderer": "new (random init)"}
