"""State-dict key maps from LDM/CompVis and diffusers first-stage autoencoders onto ours.

Our Encoder/Decoder keep LDM's architecture but hold each side's blocks in one flat
nn.Sequential (`encoder.down.N`, `decoder.up.N`) and fuse attention's q, k, v into one 1x1 conv.
The maps are derived by walking the built model, so they follow whatever config it was built
from: every ResBlock, AttnBlock and resampler is numbered per resolution level, the way both
source layouts number them.

    ours                      ldm (CompVis, SD single file)    diffusers (AutoencoderKL, VQModel)
    encoder.down.N (ResBlock) encoder.down.{i}.block.{j}       encoder.down_blocks.{i}.resnets.{j}
    encoder.down.N (Attn)     encoder.down.{i}.attn.{j}        encoder.down_blocks.{i}.attentions.{j}
    encoder.down.N.conv       encoder.down.{i}.downsample.conv encoder.down_blocks.{i}.downsamplers.0.conv
    encoder.mid.res1/attn/res2 encoder.mid.block_1/attn_1/block_2  encoder.mid_block.resnets.0/attentions.0/resnets.1
    decoder.up.N              decoder.up.{i}...                decoder.up_blocks.{L-1-i}...  (i = resolution level)
    ResBlock.shortcut         nin_shortcut                     conv_shortcut
    AttnBlock.norm/qkv/proj   norm / cat(q,k,v) / proj_out     group_norm / cat(to_q,to_k,to_v) / to_out.0
    bottleneck.quantizer.codebook  quantize.embedding
"""
from __future__ import annotations

import re

from torch import nn

from infd.models.blocks import AttnBlock, ResBlock

LAYOUTS = ("ldm", "diffusers")

# The decoder's last GroupNorm and RGB conv: replaced by the renderer, so never loaded.
DROPPED_TAIL = {"ldm": ("decoder.norm_out.", "decoder.conv_out."),
                "diffusers": ("decoder.conv_norm_out.", "decoder.conv_out.")}

# Per layout: names inside a resolution level, of the mid block, and of our renamed parts.
_NAMES = {
    "ldm": {"levels": {"encoder": "encoder.down", "decoder": "decoder.up"},
            "res": "block", "attn": "attn", "resample": {"encoder": "downsample.conv", "decoder": "upsample.conv"},
            "mid": {"res1": "mid.block_1", "attn": "mid.attn_1", "res2": "mid.block_2"},
            "norm_out": "norm_out", "shortcut": "nin_shortcut", "attn_norm": "norm",
            "qkv": ("q", "k", "v"), "proj": "proj_out"},
    "diffusers": {"levels": {"encoder": "encoder.down_blocks", "decoder": "decoder.up_blocks"},
                  "res": "resnets", "attn": "attentions",
                  "resample": {"encoder": "downsamplers.0.conv", "decoder": "upsamplers.0.conv"},
                  "mid": {"res1": "mid_block.resnets.0", "attn": "mid_block.attentions.0",
                          "res2": "mid_block.resnets.1"},
                  "norm_out": "conv_norm_out", "shortcut": "conv_shortcut", "attn_norm": "group_norm",
                  "qkv": ("to_q", "to_k", "to_v"), "proj": "to_out.0"},
}

# Diffusers checkpoints saved before 0.14 name the VAE attention query/key/value/proj_attn.
_DEPRECATED_ATTENTION = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)(\.(?:weight|bias))$")
_NEW_ATTENTION_NAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_deprecated_attention(state: dict) -> dict:
    """Diffusers state dict with the pre-0.14 attention names (query, ...) renamed to to_q, ..."""
    def rename(key: str) -> str:
        return _DEPRECATED_ATTENTION.sub(lambda m: m[1] + _NEW_ATTENTION_NAME[m[2]] + m[3], key)
    return {rename(k): v for k, v in state.items()}


def module_map(model: nn.Module, layout: str) -> list[tuple[str, str, str]]:
    """(our module path, source module path, kind) for every module of the encoder, bottleneck
    and decoder that holds weights; kind is res | attn | plain (parameter names kept)."""
    names = _NAMES[layout]
    n_levels = len(model.cfg.net.ch_mult)
    out = [("encoder.conv_in", "encoder.conv_in", "plain")]
    out += _level_modules(model.encoder.down, "encoder", layout, n_levels)
    out += [(f"encoder.mid.{ours}", f"encoder.{src}", _kind(ours)) for ours, src in names["mid"].items()]
    out += [("encoder.norm_out", f"encoder.{names['norm_out']}", "plain"),
            ("encoder.conv_out", "encoder.conv_out", "plain"),
            ("bottleneck.quant_conv", "quant_conv", "plain"),
            ("bottleneck.post_quant_conv", "post_quant_conv", "plain")]
    if model.bottleneck.quantizer is not None:
        out.append(("bottleneck.quantizer.codebook", "quantize.embedding", "plain"))
    out.append(("decoder.conv_in", "decoder.conv_in", "plain"))
    out += [(f"decoder.mid.{ours}", f"decoder.{src}", _kind(ours)) for ours, src in names["mid"].items()]
    out += _level_modules(model.decoder.up, "decoder", layout, n_levels)
    return out


def _kind(mid_part: str) -> str:
    return "attn" if mid_part == "attn" else "res"


def _level_modules(seq: nn.Sequential, side: str, layout: str, n_levels: int) -> list[tuple[str, str, str]]:
    """Number the flat Sequential's blocks per resolution level. The encoder walks levels
    0..L-1, the decoder L-1..0; a Downsample/Upsample closes its level."""
    names = _NAMES[layout]
    level, step = (0, 1) if side == "encoder" else (n_levels - 1, -1)
    counts = {"res": 0, "attn": 0}
    ours_base = f"{side}.{'down' if side == 'encoder' else 'up'}"
    out = []
    for index, module in enumerate(seq):
        # diffusers numbers decoder up_blocks in application order (k = L-1-level), ldm by level.
        block = level if layout == "ldm" or side == "encoder" else n_levels - 1 - level
        source = f"{names['levels'][side]}.{block}"
        if isinstance(module, (ResBlock, AttnBlock)):
            kind = "res" if isinstance(module, ResBlock) else "attn"
            out.append((f"{ours_base}.{index}", f"{source}.{names[kind]}.{counts[kind]}", kind))
            counts[kind] += 1
        else:  # Downsample / Upsample: its conv, then the next level starts
            out.append((f"{ours_base}.{index}.conv", f"{source}.{names['resample'][side]}", "plain"))
            level, counts = level + step, {"res": 0, "attn": 0}
    return out


def key_map(model: nn.Module, layout: str) -> dict[str, tuple[str, ...]]:
    """Our state-dict key -> the source keys it is made of (several: concatenated along dim 0,
    AttnBlock.qkv = q, k, v). Covers every encoder, bottleneck and decoder key of `model`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    modules = dict(model.named_modules())
    mapping = {}
    for ours, source, kind in module_map(model, layout):
        for name in modules[ours].state_dict():
            head, _, tail = name.partition(".")
            sources = _param_sources(layout, kind, head, tail)
            mapping[f"{ours}.{name}"] = tuple(f"{source}.{s}" for s in sources)
    covered = [k for k in model.state_dict() if k.split(".")[0] in ("encoder", "bottleneck", "decoder")]
    uncovered = sorted(set(covered) - set(mapping))
    if uncovered:  # a block type the walk does not know: a bug here, not in the user's input
        raise RuntimeError(f"key map does not cover {uncovered[:10]}")
    return mapping


def _param_sources(layout: str, kind: str, head: str, tail: str) -> tuple[str, ...]:
    """Source parameter names (relative to the module) for our `head.tail` (e.g. qkv.weight)."""
    names = _NAMES[layout]
    if kind == "res" and head == "shortcut":
        return (f"{names['shortcut']}.{tail}",)
    if kind == "attn":
        if head == "qkv":
            return tuple(f"{n}.{tail}" for n in names["qkv"])
        head = {"norm": names["attn_norm"], "proj": names["proj"]}[head]
    return (f"{head}.{tail}" if tail else head,)
