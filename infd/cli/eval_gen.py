"""`infd eval-gen`: FID at 256, pFID P/1K and CLIP score of a trained UNet (+ its autoencoder).

    infd eval-gen --unet EXPORT --data REAL_SHARDS --num-samples 10000 --out eval/
    torchrun --nproc_per_node 8 -m infd.cli eval-gen --unet EXPORT --data REAL_SHARDS --num-samples 50000 --out eval/

Sample i has noise seed --seed + i whatever the number of ranks; rank r draws samples r, r + W,
... and renders each at 1024 (tiled) and at --fid-size. --out keeps them as PNGs
(samples/<size>/<i>.png), a grid of the first 16 (grid.png) and the metrics (metrics.json); a
rerun with the same options reuses the samples already written, so a killed evaluation resumes.
stdout carries exactly one JSON object (rank 0); progress and notes go to stderr.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from infd.cli.common import add_render_flags, device, read_lines, render_options
from infd.cli.sample import (add_sampling_flags, check_sampling, grid, latent_diffusion, latent_size, load_unet,
                             open_ae, resolve_sampling)
from infd.config import ConfigError, from_mapping

GRID_SAMPLES = 16


def init_ranks(requested: str | None):
    """(rank, world size, device): a process group from torchrun's environment when WORLD_SIZE > 1
    (NCCL on GPUs, gloo on CPUs), each rank on its LOCAL_RANK's GPU."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device(requested)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(requested) if requested else (
        torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def finish_ranks(ok: bool) -> None:
    """Barrier and teardown; after an error no barrier (the other ranks may wait in a collective:
    torchrun stops them when this rank exits non-zero)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if ok:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def ranks(requested: str | None):
    """(rank, world size, device) of init_ranks for the block; finish_ranks after it (no barrier after an
    error)."""
    rank, world, dev = init_ranks(requested)
    ok = False
    try:
        yield rank, world, dev
        ok = True
    finally:
        finish_ranks(ok)


def note(text: str, rank: int) -> None:
    if rank == 0:
        print(text, file=sys.stderr, flush=True)


def eval_config(args):
    from infd.eval.generative import GenEvalConfig

    clip_pretrained = None if args.clip_pretrained.lower() in ("none", "null", "") else args.clip_pretrained
    cfg = from_mapping(GenEvalConfig, {
        "num_samples": args.num_samples, "num_real": args.num_real, "seed": args.seed, "patches": args.patches,
        "fid_size": args.fid_size,
        "batch_size": args.batch_size, "stats_cache": args.stats_cache, "clip_score": not args.no_clip_score,
        "features": {"kind": args.features, "dim": args.feature_dim, "weights": args.inception_weights or ""},
        "clip": {"model": args.clip_model, "pretrained": clip_pretrained}})
    cfg.validate("--")
    return cfg


def fingerprint(path: str) -> str:
    """Names the weights in an export or SD folder (every file's name, size and mtime): an export
    rewritten in place (trainer.export_every) is another model."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file())
    text = "\n".join(f"{p.relative_to(path)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()


def check_out_matches(out: Path, identity: dict, rank: int, dev) -> None:
    """Samples in --out are reused only if they were drawn the same way: rank 0 compares with the
    recorded identity (and records it, atomically), then tells every rank, which all refuse alike."""
    import torch

    from infd.eval.generative import all_reduce_sum

    path = out / "samples" / "identity.json"
    mismatch = 0.0
    if rank == 0:
        mismatch = float(path.is_file() and json.loads(path.read_text()) != identity)
        if not mismatch:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(identity, indent=1, sort_keys=True))
            os.replace(tmp, path)
    if all_reduce_sum(torch.tensor([mismatch], dtype=torch.float64), dev).item():
        raise ConfigError(f"--out {out} holds samples drawn with another model or other options ({path}): use a "
                          "new --out, or delete its samples/ folder to draw them again")


def build_sampler(args, cfg, real, dev, rank: int):
    """(ImageSampler, identity of the samples) from the command line; real: the RealSet (--captions)."""
    from infd.eval.samples import ImageSampler

    unet, record = load_unet(args.unet, dev)
    spec, source = resolve_sampling(args, record.sampling, record.schedule().objective == "rectified_flow")
    check_sampling(spec, record.schedule())
    ae, ae_path, _ = open_ae(args, record, dev)
    model = latent_diffusion(unet, record, dev)
    prompts = read_lines(args.prompts, "--prompts") if args.prompts else []
    captions = prompt_captions(args, real, model.text is not None, bool(prompts), rank)
    size = latent_size(args, unet, ae)
    note(f"sampler {spec.sampler}, {spec.steps} steps (unset options: {source}); autoencoder {ae_path}", rank)
    identity = {"unet": str(Path(args.unet).resolve()), "ae": str(Path(ae_path).resolve()), "seed": cfg.seed,
                "weights": {"unet": fingerprint(args.unet), "ae": fingerprint(ae_path)},
                "sampling": vars(spec) | {"latent_size": size, "tile": args.tile,
                                          "render_precision": args.render_precision},
                "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
                "captions": [real.index_id, len(real.ids)] if captions else None}
    sampler = ImageSampler(model, ae, spec, cfg.seed, size, prompts, captions, render_options(args))
    return sampler, identity


def prompt_captions(args, real, text: bool, prompts: bool, rank: int):
    """The RealSet whose captions are the prompts (--captions), or None (--prompts; unconditional)."""
    from infd.eval.real_set import require_captions

    if args.captions and prompts:
        raise ConfigError("--prompts and --captions both given: the prompts come from one of them")
    if not text:
        if args.captions or prompts:
            note("the UNet is not text-conditioned: --prompts / --captions are not used", rank)
        return None
    if not args.captions and not prompts:
        raise ConfigError("a text-conditioned UNet needs prompts: --captions (sample i takes real image i's "
                          "caption) or --prompts FILE (sample i takes line i mod lines)")
    if args.captions:
        require_captions(real, "--captions", "give --prompts FILE instead")
        return real
    return None


def write_grid(store, n: int, out: Path) -> Path:
    from infd.image import save_image

    indices = list(range(min(n, GRID_SAMPLES)))
    images = store.load(indices)[min(store.sizes)]
    return save_image(grid(list(images)), out / "grid.png")


def cmd_eval_gen(args) -> int:
    from infd.eval.generative import evaluate_generator
    from infd.eval.pfid import PFID_SIZE
    from infd.eval.real_set import choose_real_set, open_source
    from infd.eval.samples import SampleStore

    cfg = eval_config(args)  # user mistakes first, before any model loads or process group starts
    with ranks(args.device) as (rank, world, dev):
        out = Path(args.out)
        real = choose_real_set(open_source(args.data, args.index), cfg.real_count,
                               PFID_SIZE if cfg.patches else cfg.fid_size)
        sampler, identity = build_sampler(args, cfg, real, dev, rank)
        check_out_matches(out, identity, rank, dev)
        store = SampleStore(out / "samples", cfg.render_sizes())
        note(f"{cfg.num_samples} samples over {world} rank(s); real set: {len(real.ids)} of {cfg.real_count} images "
             f"({real.skipped_small} smaller ones skipped)", rank)
        result = evaluate_generator(sampler, real, cfg, dev, rank, world, store, progress=not args.quiet)
        if rank == 0:
            result["grid"] = str(write_grid(store, cfg.num_samples, out))
            (out / "metrics.json").write_text(json.dumps(result, indent=1))
            print(json.dumps(result), flush=True)
    return 0


def add_parser(sub, command, device_help: str) -> None:
    from infd.eval.pfid import FID_SIZE, PATCHES

    p = command(sub, "eval-gen", "FID-256, pFID P/1K and CLIP score of generated samples against real images "
                "(sharded over ranks under torchrun)", cmd_eval_gen)
    p.add_argument("--unet", required=True, help="UNet export, or a Stable Diffusion folder (with --ae)")
    p.add_argument("--ae", help="autoencoder export (default: the one the UNet export records)")
    p.add_argument("--data", required=True, nargs="+", help="real images: indexed shards (patterns, directories "
                   "or s3:// prefixes); the first --num-real with a short side >= 1024 are used")
    p.add_argument("--index", help="index directory of --data (default: beside the shards)")
    p.add_argument("--num-samples", type=int, default=10000, help="generated samples (metrics compare only at equal N)")
    p.add_argument("--num-real", type=int, default=0, help="real images (0: as many as --num-samples)")
    p.add_argument("--seed", type=int, default=0, help="sample i has noise seed --seed + i and crops keyed by it")
    p.add_argument("--patches", type=int, nargs="*", default=list(PATCHES), help="pFID P/1K for these crop sizes P")
    p.add_argument("--fid-size", type=int, default=FID_SIZE, help="FID on whole samples rendered at this size "
                   "(0: off)")
    p.add_argument("--features", choices=["inception", "randinit"], default="inception",
                   help="feature network: the standard FID Inception, or a random-init one (offline; metric "
                        "names then end in _randinit and are not FIDs)")
    p.add_argument("--feature-dim", type=int, default=2048, help="feature size (Inception: 64, 192, 768, 2048)")
    p.add_argument("--inception-weights", help="local Inception weights file (default: the torch hub cache, "
                   "where torch-fidelity downloads them)")
    p.add_argument("--stats-cache", default="~/.cache/infd/fid_stats", help="folder of cached real-image "
                   "statistics (\"\": recompute)")
    p.add_argument("--prompts", help="text models: file with one prompt per line; sample i takes line i mod lines")
    p.add_argument("--captions", action="store_true", help="text models: sample i takes the caption of real image "
                   "i mod the real set's size (the COCO protocol: FID and CLIP score on the real set's own captions)")
    p.add_argument("--no-clip-score", action="store_true", help="text models: skip the CLIP score")
    p.add_argument("--clip-model", default="ViT-B-32", help="OpenCLIP model of the CLIP score")
    p.add_argument("--clip-pretrained", default="laion2b_s34b_b79k", help="its OpenCLIP weights tag or file; "
                   "none = random init (offline; named clip_score_..._randinit)")
    add_sampling_flags(p)
    p.add_argument("--latent-size", type=int, help="side of the sampled latent (default: as infd sample)")
    p.add_argument("--batch-size", type=int, default=4, help="samples drawn at once per rank")
    add_render_flags(p)
    p.add_argument("--out", required=True, help="folder for samples/, grid.png and metrics.json (reused on rerun)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", help=device_help)
