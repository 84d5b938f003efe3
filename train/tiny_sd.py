"""A tiny Stable Diffusion diffusers folder with RANDOM-INIT weights, written by diffusers and
transformers themselves: for tests and `make demo-sd`, never for images worth looking at.

The layout is a real SD 1.x folder (model_index.json, vae/, unet/, text_encoder/, tokenizer/,
scheduler/) that `StableDiffusionPipeline.from_pretrained(root, local_files_only=True)` loads.
Only the sizes are tiny. The tokenizer is CLIP's real BPE (49408 tokens), built offline from
open_clip's bundled merges file the way OpenAI CLIP's SimpleTokenizer builds it, so prompts
tokenize as with SD's own tokenizer.

    python -m train.tiny_sd OUT_DIR [--seed 0] [--sample-size 8]
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import torch

from infd.utils.process_main import run_as_process

# SD 1.x's DDIM settings (runwayml/stable-diffusion-v1-5 with DDIMScheduler).
SD1_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                     timestep_spacing="leading")
SD_SCALING_FACTOR = 0.18215
MAX_LENGTH = 77  # CLIP's context length: SD's tokenizer model_max_length


def clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges "a b") of OpenAI CLIP's tokenizer, from open_clip's bundled BPE file.

    Same construction as CLIP's SimpleTokenizer: 256 byte characters, the same with '</w>', one
    token per merge (the first 49152 - 256 - 2 merges), then <|startoftext|>, <|endoftext|>.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # line 0 is a version header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer(folder: Path):
    """SD 1.x's CLIPTokenizer (pad = <|endoftext|>, 77 tokens) saved to `folder`; returns it."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"),
                              model_max_length=MAX_LENGTH)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_components(seed: int, sample_size: int) -> dict:
    """Random-init vae, unet, text_encoder and a DDIM scheduler; torch is seeded before each model."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=2 * sample_size,
                        scaling_factor=SD_SCALING_FACTOR)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    torch.manual_seed(seed + 2)
    text_cfg = CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                              vocab_size=49408, max_position_embeddings=MAX_LENGTH, bos_token_id=49406,
                              eos_token_id=49407, pad_token_id=49407)
    text_encoder = CLIPTextModel(text_cfg).eval()
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "scheduler": DDIMScheduler(**SD1_SCHEDULER)}


def write_tiny_sd(root: Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a complete random-init SD folder at `root` (latents 4 x sample_size^2, images twice
    that size) and return `root`."""
    from diffusers import StableDiffusionPipeline

    root = Path(root)
    tokenizer = write_tokenizer(root / "tokenizer")
    pipe = StableDiffusionPipeline(**tiny_components(seed, sample_size), tokenizer=tokenizer, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=True)  # model_index.json and every component folder
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-size", type=int, default=8)
    args = parser.parse_args(argv)
    print(write_tiny_sd(Path(args.out), args.seed, args.sample_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_as_process(main))
