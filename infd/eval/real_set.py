"""The real images of an evaluation: chosen from the shard index, read one by one by offset.

The real set of N images is the first N indexed samples (shard order of `shards`, tar order
within a shard) whose upright short side is at least the evaluation size (1024 for pFID P/1K):
the index records every sample's size, so the choice reads no image and costs one pass over the
records of the shards it needs. Smaller images are skipped and counted (the paper evaluates
fixed high-resolution images). Rank r reads batches r, r + W, ... of the chosen list, each image by
one ranged read (local pread or S3 range GET): no process reads the whole set, and which images
are used does not depend on the number of ranks.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

from infd.config import ConfigError, from_mapping
from infd.data.decode import SkipSample, decode_rgb, open_image
from infd.data.tar_samples import image_bytes

log = logging.getLogger(__name__)


@dataclass
class RealSet:
    """ids: int64 (n,) sample ids of the chosen images, in order; skipped_small: samples passed
    over for their size before the n-th; index_id: names the dataset and the choice (its shards,
    index and min_side) for the statistics cache."""

    source: object  # an infd.data.shard_source.ShardSource
    ids: np.ndarray
    skipped_small: int
    index_id: str
    requested: int

    def read(self, position: int) -> Image.Image:
        """The RGB image at `position` of the set (upright). Raises SkipSample if it is unreadable."""
        raw = self.source.read(int(self.ids[position]))
        return decode_rgb(open_image(image_bytes(raw)))

    def read_caption(self, position: int) -> str:
        """The caption of the image at `position` ("" if it has none). Raises SkipSample if its
        sample is unreadable. One ranged read of the whole sample (the image too)."""
        from infd.data.image_samples import caption_of

        return caption_of(self.source.read(int(self.ids[position])))

    def caption(self, position: int) -> str:
        """read_caption, or "" when the sample cannot be read (the image is then skipped, and
        counted, in the real statistics too; a warning names it). Evaluations count empty prompts."""
        try:
            return self.read_caption(position)
        except SkipSample as err:
            log.warning("real image %d (sample %d) is unreadable (%s): its caption is taken as ''", position,
                        int(self.ids[position]), err.reason)
            return ""


@dataclass
class FolderSet:
    """The image files of a folder (sorted by name), read like a RealSet: ids are positions."""

    paths: list

    @property
    def ids(self) -> np.ndarray:
        return np.arange(len(self.paths), dtype=np.int64)

    def read(self, position: int) -> Image.Image:
        """The RGB image at `position` (upright). Raises SkipSample if it is unreadable."""
        with open(self.paths[position], "rb") as f:
            return decode_rgb(open_image(f.read()))


def image_folder(folder: str, limit: int) -> FolderSet:
    """The first `limit` image files of a folder (by name)."""
    from infd.data.decode import image_files

    return FolderSet(image_files(folder)[:limit])


def require_captions(real: RealSet, what: str, fix: str) -> None:
    """Refuse captions as prompts when the real images have none (checked on the first one)."""
    if not len(real.ids):
        return
    try:
        text = real.read_caption(0)
    except SkipSample as err:
        raise ConfigError(f"{what}: the first real image's sample cannot be read ({err.reason}: {err}); check the "
                          f"shards and their index; {fix}") from None
    if not text:
        raise ConfigError(f"{what}: the real images have no captions (a .txt member, or \"caption\" in the .json; "
                          f"the first one's is empty), so they cannot be the prompts; {fix}")


def open_source(shards: list[str], index: str | None = None):
    """A ShardSource over `shards` with every indexed sample (no high-res stream split)."""
    from infd.data.loader import DataConfig
    from infd.data.shard_source import ShardSource

    cfg = from_mapping(DataConfig, {"shards": list(shards), "index": index, "p_hr": 0.0})
    return ShardSource(cfg, None, None)


def dataset_id(source) -> str:
    """The index's folder name plus a hash of its metadata and of the shards used: a rebuilt or
    re-selected dataset never reuses another's cached statistics."""
    names = [source.index.shard_names[int(i)] for i in source.shard_ids]
    meta = json.dumps(source.index.meta, sort_keys=True, default=str)
    digest = hashlib.sha256((meta + "\n" + "\n".join(names)).encode()).hexdigest()[:12]
    return f"{source.index.root.name}-{digest}"


def choose_real_set(source, n: int, min_side: int) -> RealSet:
    """The first n samples of `source` whose short side >= min_side (fewer if the shards hold fewer)."""
    if n < 1:
        raise ConfigError(f"the real set needs at least 1 image, got n={n}")
    chosen, skipped = [], 0
    for i in range(len(source.shard_ids)):
        ids = source.main_ids(i)
        if not len(ids):
            continue
        records = source.index.records(int(ids[0]), int(ids[-1] - ids[0]) + 1)[ids - ids[0]]
        large = np.minimum(records["width"], records["height"]) >= min_side
        need = n - sum(len(c) for c in chosen)
        take = ids[large][:need]
        last = np.flatnonzero(large)[need - 1] if len(take) == need else len(ids) - 1
        skipped += int((~large[: last + 1]).sum())
        chosen.append(take)
        if len(take) == need:
            break
    ids = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return RealSet(source, ids.astype(np.int64), skipped, f"{dataset_id(source)}-min{min_side}", n)


def batches_of_rank(count: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Positions 0..count-1 in fixed batches [0, B), [B, 2B), ...; rank r takes batches r, r + W, ...

    A batch holds the same positions at any world size, so batched computations (whose float
    results can depend on the batch, e.g. CPU convolutions at B = 1 vs B = 4) match bit for bit.
    """
    starts = range(rank * batch_size, count, world_size * batch_size)
    return [list(range(s, min(s + batch_size, count))) for s in starts]


class EvaluationStopped(Exception):
    """`should_stop()` said to stop (a training run's stop signal): the evaluation is abandoned."""


def stoppable_batches(count: int, batch_size: int, rank: int, world_size: int, should_stop=None):
    """This rank's batches_of_rank, one per round of W batches, with `should_stop()` called before
    each round on every rank alike (a collective, e.g. an all-reduce of a stop flag; a rank without
    a batch in the last round still calls it). Raises EvaluationStopped when it returns True, on
    every rank at the same round."""
    mine = batches_of_rank(count, batch_size, rank, world_size)
    rounds = -(-count // (batch_size * world_size))
    for r in range(rounds):
        if should_stop is not None and should_stop():
            raise EvaluationStopped
        if r < len(mine):
            yield mine[r]


def read_or_skip(real: RealSet, position: int, skips: dict) -> Image.Image | None:
    """real.read(position), or None with skips[reason] += 1 (a corrupt file in a long evaluation)."""
    try:
        return real.read(position)
    except SkipSample as err:
        skips[err.reason] = skips.get(err.reason, 0) + 1
        return None

