"""Evaluate a generator: FID at 256, pFID P/1K and CLIP score over N samples, sharded over ranks.

Rank r handles batches r, r + W, ... of samples and of real images (W ranks; a batch holds the
same indices at any W, so its floats match bit for bit) and adds their features to float64
moment sums (frechet.FeatureMoments) that one all-reduce combines: no rank holds every feature,
and the result does not depend on W beyond the float64 rounding of that sum. Real
statistics come from the cache (stats_cache, keyed by dataset, view, N and feature network) or
are computed once, sharded the same way, and stored by rank 0. Collective: every rank of the
default process group calls `evaluate_generator`; rank 0 gets the metrics, the others None.
`should_stop` (a collective callable, checked before every round of batches) abandons it with
EvaluationStopped: a training run's stop signal is not held up by an evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from infd.config import ConfigError
from infd.eval import stats_cache
from infd.eval.clip_score import ClipScoreConfig, ClipScorer, clip_metric_name
from infd.eval.features import FeatureConfig, build_feature_extractor, feature_id, metric_suffix
from infd.eval.frechet import FeatureMoments, frechet_distance
from infd.eval.pfid import FID_SIZE, PATCHES, PFID_SIZE, fid_name, pfid_crops, pfid_name, real_square
from infd.eval.real_set import RealSet, batches_of_rank, read_or_skip, stoppable_batches
from infd.eval.samples import ImageSampler, SampleStore, samples_of

METRIC_PREFIXES = ("fid_", "pfid_", "clip_score")  # the metrics in evaluate_generator's result; the rest is info
REAL_CROP_SEED = 0  # real crops are fixed (the cache key does not hold a seed); samples use cfg.seed


@dataclass
class GenEvalConfig:
    num_samples: int = 1000  # generated samples
    num_real: int = 0  # real images (0: as many as num_samples)
    seed: int = 0  # sample i: noise seed + i; its crops keyed by (seed, i, P)
    patches: list[int] = field(default_factory=lambda: list(PATCHES))  # pFID P/1K for these P; [] for none
    fid_size: int = FID_SIZE  # FID on whole images rendered at this size; 0 for none
    batch_size: int = 4  # samples drawn and rendered at once (per rank)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    clip_score: bool = False  # text models: CLIP score of each sample against its prompt
    clip: ClipScoreConfig = field(default_factory=ClipScoreConfig)
    stats_cache: str = "~/.cache/infd/fid_stats"  # real-image statistics; "" to recompute every time

    def validate(self, prefix: str = "") -> None:
        if self.num_samples < 2 or self.batch_size < 1:
            raise ConfigError(f"config key '{prefix}num_samples' = {self.num_samples} / "
                              f"'{prefix}batch_size' = {self.batch_size}: "
                              "FID needs num_samples >= 2 samples and batch_size >= 1")
        bad = [p for p in self.patches if not 0 < p <= PFID_SIZE]
        if bad:
            raise ConfigError(f"config key '{prefix}patches' = {self.patches}: each P must be in (0, {PFID_SIZE}]")
        if not self.patches and not self.fid_size:
            raise ConfigError(f"config keys '{prefix}patches' and '{prefix}fid_size' are both off: nothing to measure")
        self.features.validate(prefix + "features.")

    @property
    def real_count(self) -> int:
        return self.num_real or self.num_samples

    def views(self) -> dict[str, tuple[str, int]]:
        """metric base name -> ("whole", size) | ("crop", P)."""
        out = {fid_name(self.fid_size): ("whole", self.fid_size)} if self.fid_size else {}
        return out | {pfid_name(p): ("crop", p) for p in self.patches}

    def render_sizes(self) -> list[int]:
        return sorted(({PFID_SIZE} if self.patches else set()) | ({self.fid_size} if self.fid_size else set()))


def _features(extractor, views, images: dict[int, torch.Tensor], seed: int, indices: list[int], device) -> dict:
    """{view name: features (B, D)} of one batch. images: {size: (B, 3, S, S)}."""
    out = {}
    for name, (kind, size) in views.items():
        if kind == "whole":
            batch = images[size]
        else:
            batch = torch.stack([pfid_crops(img, seed, i, [size])[size] for img, i in zip(images[PFID_SIZE], indices)])
        out[name] = extractor(batch.to(device)).cpu()
    return out


def _progress(items, desc: str, rank: int, progress: bool):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", disable=not progress or rank != 0)


def generated_moments(sampler: ImageSampler, store: SampleStore | None, cfg: GenEvalConfig, extractor, rank: int,
                      world: int, device, progress: bool = True, clip: ClipScorer | None = None,
                      should_stop=None) -> tuple[dict, dict]:
    """({view: FeatureMoments}, {"clip_sum", "clip_count", "reused", "prompts_empty"}) of this rank's
    samples, all-reduced. prompts_empty: samples of a text model prompted with "" (a real image
    without a caption, or unreadable, under captions as prompts)."""
    views, sizes = cfg.views(), cfg.render_sizes()
    moments = {name: FeatureMoments(extractor.num_features) for name in views}
    totals = torch.zeros(4, dtype=torch.float64)  # clip score sum, clip count, samples reused, empty prompts
    batches = batches_of_rank(cfg.num_samples, cfg.batch_size, rank, world)
    bar = _progress(range(sum(map(len, batches))), "eval-gen samples", rank, progress)
    for indices in stoppable_batches(cfg.num_samples, cfg.batch_size, rank, world, should_stop):
        images, reused = samples_of(sampler, store, indices, sizes)
        for name, feats in _features(extractor, views, images, cfg.seed, indices, device).items():
            moments[name].add(feats)
        if clip is not None:
            scores = clip(images[max(sizes)], sampler.prompts(indices))
            totals[0] += float(scores.double().sum())
            totals[1] += len(indices)
        totals[2] += reused
        if sampler.model.text is not None:
            totals[3] += sum(not p for p in sampler.prompts(indices))
        bar.update(len(indices))
    bar.close()
    for m in moments.values():
        m.all_reduce(device)
    totals = all_reduce_sum(totals, device)
    return moments, {"clip_sum": float(totals[0]), "clip_count": int(totals[1]), "reused": int(totals[2]),
                     "prompts_empty": int(totals[3])}


def real_moments(real: RealSet, cfg: GenEvalConfig, views: dict, extractor, rank: int, world: int, device,
                 progress: bool = True, should_stop=None) -> tuple[dict, dict]:
    """({view: FeatureMoments}, skip counts) of the real set for `views`, all-reduced."""
    moments = {name: FeatureMoments(extractor.num_features) for name in views}
    skips: dict[str, int] = {}
    sizes = sorted({size if kind == "whole" else PFID_SIZE for kind, size in views.values()})
    batches = batches_of_rank(len(real.ids), cfg.batch_size, rank, world)
    bar = _progress(range(sum(map(len, batches))), "eval-gen real", rank, progress)
    for positions in stoppable_batches(len(real.ids), cfg.batch_size, rank, world, should_stop):
        kept = []
        for position in positions:
            squares = _real_squares(real, position, sizes, skips)
            if squares is not None:
                kept.append((position, squares))
        if kept:
            images = {s: torch.stack([sq[s] for _, sq in kept]) for s in sizes}
            for name, feats in _features(extractor, views, images, REAL_CROP_SEED, [p for p, _ in kept],
                                         device).items():
                moments[name].add(feats)
        bar.update(len(positions))
    bar.close()
    for m in moments.values():
        m.all_reduce(device)
    return moments, sum_counts(skips)


def _real_squares(real: RealSet, position: int, sizes: list[int], skips: dict) -> dict | None:
    """{size: (3, size, size)} centre squares of a real image, or None (counted in skips)."""
    img = read_or_skip(real, position, skips)
    if img is None:
        return None
    squares = {s: real_square(img, s) for s in sizes}
    if any(v is None for v in squares.values()):  # smaller than its index entry says: changed after indexing
        skips["smaller_than_indexed"] = skips.get("smaller_than_indexed", 0) + 1
        return None
    return squares


def sum_counts(counts: dict) -> dict:
    """{reason: count} summed over ranks (ranks see different reasons: gathered as objects)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return dict(counts)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for part in gathered:
        for reason, n in part.items():
            total[reason] = total.get(reason, 0) + n
    return total


def all_reduce_sum(t: torch.Tensor, device) -> torch.Tensor:
    """t summed over the ranks of the default process group (t itself without one), on the CPU;
    `device` is where the collective runs (a GPU for NCCL)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu()


def cached_real_stats(real: RealSet, cfg: GenEvalConfig, extractor, rank: int, world: int, device,
                      progress: bool = True, should_stop=None) -> tuple[dict, dict]:
    """({view: (mu, sigma)} on rank 0 ({} elsewhere), real-set info). Rank 0 alone reads the
    cache and tells the others which views miss (one all-reduce); those are computed by all ranks
    together and stored by rank 0."""
    fid = feature_id(cfg.features)
    keys = {name: stats_cache.cache_key(real.index_id, name, cfg.real_count, fid) for name in cfg.views()}
    folder = Path(cfg.stats_cache).expanduser() if cfg.stats_cache else None
    hits = {name: stats_cache.load(folder, key) if folder and rank == 0 else None for name, key in keys.items()}
    flags = [float(hits[n] is None) if rank == 0 else 0.0 for n in keys]
    missing = all_reduce_sum(torch.tensor(flags, dtype=torch.float64), device)
    todo = {name: cfg.views()[name] for name, miss in zip(keys, missing.tolist()) if miss}
    info = {"num_real": len(real.ids), "real_skipped_small": real.skipped_small, "real_index": real.index_id}
    stats = {}
    if todo:
        moments, skips = real_moments(real, cfg, todo, extractor, rank, world, device, progress, should_stop)
        info["real_skipped"] = skips
        for name, m in moments.items():
            meta = {"view": name, "n_requested": cfg.real_count, "n_used": m.count, "features": fid, **info}
            mu, sigma = m.stats()
            if rank == 0 and folder:
                stats_cache.save(folder, keys[name], mu, sigma, meta)
            stats[name] = (mu, sigma)
    for name in keys:
        if name not in stats and hits[name] is not None:
            stats[name] = hits[name][:2]
            info.setdefault("real_skipped", hits[name][2].get("real_skipped", {}))
    info["real_stats"] = "computed" if todo else "cache"
    return (stats if rank == 0 else {}), info


def build_networks(cfg: GenEvalConfig, text: bool, prefix: str = "") -> tuple:
    """(feature extractor, ClipScorer or None), on the CPU: built once, they serve many
    evaluations. The CLIP model only for a text-conditioned generator (text) with cfg.clip_score."""
    extractor = build_feature_extractor(cfg.features, prefix + "features.")
    return extractor, ClipScorer(cfg.clip, prefix + "clip.") if cfg.clip_score and text else None


def evaluate_generator(sampler: ImageSampler, real: RealSet, cfg: GenEvalConfig, device, rank: int = 0,
                       world: int = 1, store: SampleStore | None = None, progress: bool = True,
                       networks: tuple | None = None, should_stop=None) -> dict | None:
    """{metric name: value, ...} on rank 0 (None on the others). Names carry `_randinit` when
    the feature network (or the CLIP model) is random-init. networks: `build_networks(cfg)`'s
    result, moved to `device` here (built here when None)."""
    cfg.validate()
    if len(real.ids) < 2:
        raise ConfigError(f"the real set has {len(real.ids)} image(s) large enough ({real.skipped_small} smaller "
                          "ones skipped): evaluation needs at least 2")
    extractor, clip = networks or build_networks(cfg, text=sampler.model.text is not None)
    extractor = extractor.to(device)
    clip = clip.to(device) if clip is not None else None
    gen, totals = generated_moments(sampler, store, cfg, extractor, rank, world, device, progress, clip, should_stop)
    real_stats, info = cached_real_stats(real, cfg, extractor, rank, world, device, progress, should_stop)
    if rank != 0:
        return None
    suffix = metric_suffix(cfg.features)
    out = {name + suffix: frechet_distance(*gen[name].stats(), *real_stats[name]) for name in cfg.views()}
    if clip is not None:
        out[clip_metric_name(cfg.clip)] = totals["clip_sum"] / max(totals["clip_count"], 1)
    if sampler.model.text is not None:
        out["prompts_empty"] = totals["prompts_empty"]
    return out | {"num_samples": cfg.num_samples, "samples_reused": totals["reused"], "seed": cfg.seed,
                  "features": feature_id(cfg.features), "world_size": world} | info
