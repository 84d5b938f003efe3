"""Mixed-resolution training stream over WebDataset shards, for DataLoader workers.

Epoch plan (without resampling): shards in an order shuffled by (seed, epoch), the same on
every rank; their samples form one sequence, cut into `world_size` equal contiguous ranges and
each range into `num_workers` equal ranges. Every sample appears exactly once per epoch; the
remainder (fewer than world_size x num_workers x batch_size samples) waits for another epoch.
All ranks yield the same number of batches, so none hangs at the end of an epoch.

Determinism: everything a position p of a worker's stream does (high-res or not, which high-res
sample, the crop) draws from an RNG seeded by (seed, epoch, rank, worker, p); the shuffle
buffer has its own seeded RNG and sees only raw bytes. A bad sample at p is replaced by the
most recent decodable raw sample before it (counted), so positions never shift. Resuming at
batch k therefore replays the raw stream without decoding and continues exactly.
With resampled=True the stream is infinite; resuming reseeds from the batch count, so the
continuation is a fresh draw from the same distribution, not the uninterrupted run's samples.

Step clock (`set_step_clock`): each batch knows the trainer step it will feed, so settings that
change with the step (patch.p_keep_late from patch.p_keep_late_step on) switch inside the
running workers, at the same batch in a resumed run as in an uninterrupted one.
"""
from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from infd.config import ConfigError
from infd.data.counters import SkipCounter
from infd.data.decode import SkipSample
from infd.data.sample_index import CAPTION_JSON, CAPTION_TXT, INDEX_NAME, SampleIndex, open_index
from infd.data.tar_samples import TruncatedShard, image_bytes, iterate_tar
from infd.data.transforms import PatchConfig, make_patch_sample
from infd.data.urls import dirname_url, expand_urls, open_stream, read_range
from infd.data.workers import init_worker

HISTORY = 8  # recent raw samples a bad one may be replaced by
COALESCE_GAP = 64 << 10  # a caption member this close to its image member comes in the same read


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # brace patterns, directories, s3:// prefixes, pipe: commands
    index: str | None = None  # the index directory (or its index.json); default: beside the shards
    batch_size: int = 8  # per rank
    num_workers: int = 2
    shuffle_buffer: int = 256
    resampled: bool = False
    p_hr: float = 0.0  # probability that a sample comes from the high-res stream (paper: 0.5)
    seed: int = 0
    patch: PatchConfig = field(default_factory=PatchConfig)

    def validate(self, prefix: str = "") -> None:
        if not 0.0 <= self.p_hr < 1.0:
            raise ConfigError(f"config key '{prefix}p_hr' = {self.p_hr} must be in [0, 1)")
        if self.batch_size < 1:
            raise ConfigError(f"config key '{prefix}batch_size' must be >= 1")


def shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Reservoir-style shuffle buffer of `size` items."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = int(rng.integers(len(buf)))
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


class MixedResolutionDataset(IterableDataset):
    """Yields collated batches (see `collate`); use with DataLoader(batch_size=None)."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, sample_fn=None, collate_fn=None):
        """sample_fn(raw, cfg, rng) -> sample dict (default: the multi-scale image patch);
        collate_fn(samples, worker, skips) -> batch. Module-level functions (workers pickle them)."""
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.sample_fn, self.collate_fn = sample_fn or image_patch_sample, collate_fn or collate
        self.urls = expand_urls(cfg.shards)
        if not self.urls:
            raise ConfigError(f"config key 'shards' (data) = {cfg.shards!r} matches no shard: give shard patterns, "
                              "directories or s3:// prefixes")
        self.index = self._load_index()
        self._plan_shards()
        self.epoch, self.start_batch = 0, 0
        self.epoch_first_batch, self.batches_per_step = 0, 1
        # The config of batches from patch.p_keep_late_step on, built once (None: no switch).
        self.late_cfg = replace(cfg, patch=cfg.patch.late()) if cfg.patch.p_keep_late is not None else None
        self.counter = SkipCounter()

    def _load_index(self) -> SampleIndex | None:
        url = self.cfg.index or dirname_url(self.urls[0])
        url = dirname_url(url) if url.endswith(INDEX_NAME) else url
        try:
            return open_index(url)
        except FileNotFoundError:
            if self.cfg.resampled and self.cfg.p_hr == 0:
                return None
            raise ConfigError(f"no shard index at {url}: set data.index, index the shards with "
                              "data_prep.index_shards (or build them with data_prep.build_shards), or use "
                              "data.resampled=true with data.p_hr=0") from None

    def _plan_shards(self) -> None:
        """Per shard of data.shards (small arrays, one entry per shard): its id in the index and its
        main-stream count; the high-res sample ids of these shards."""
        if self.index is None:
            self.shard_ids, self.main_counts, self.hr_ids = None, None, np.zeros(0, np.int64)
            return
        ids = {name: i for i, name in enumerate(self.index.shard_names)}
        missing = [u for u in self.urls if u.rsplit("/", 1)[-1] not in ids]
        if missing:
            raise ConfigError(f"shard {missing[0]} is not in the index at {self.index.root} ({len(missing)} "
                              "missing): re-index the shards or fix data.shards")
        self.shard_ids = np.array([ids[u.rsplit("/", 1)[-1]] for u in self.urls], dtype=np.int64)
        rec = self.index.shards[self.shard_ids]
        self.main_counts = rec["samples"] - rec["excluded"] - (rec["hr"] if self.cfg.p_hr > 0 else 0)
        self.url_of = dict(zip(self.shard_ids.tolist(), self.urls))
        self.hr_ids = None  # all of the index's (read by position); an array for a subset of its shards
        if len(self.shard_ids) < len(ids):
            hr = np.asarray(self.index.hr_ids)
            self.hr_ids = hr[np.isin(self.index.samples["shard"][hr], self.shard_ids)]

    def _hr_count(self) -> int:
        return len(self.index.hr_ids if self.hr_ids is None else self.hr_ids)

    def _hr_id(self, i: int) -> int:
        return self.index.hr_id(i) if self.hr_ids is None else int(self.hr_ids[i])

    # ----- epoch plan ---------------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        """Batches one rank yields per epoch (the same on every rank)."""
        if self.cfg.resampled:
            raise ValueError("a resampled stream has no epochs: set trainer.max_steps")
        per_worker = self.samples_per_worker()
        return (per_worker // self.cfg.batch_size) * max(1, self.cfg.num_workers)

    def samples_per_epoch(self) -> int:
        """Samples of the main stream (all ranks together) that an epoch is planned over."""
        return int(self.main_counts.sum())

    def samples_per_worker(self) -> int:
        return self.samples_per_epoch() // self.world_size // max(1, self.cfg.num_workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_step_clock(self, epoch_first_batch: int, batches_per_step: int = 1) -> None:
        """Where this epoch sits in the trainer's steps: batch e of the epoch (counted from its
        batch 0, also after a resume) feeds step (epoch_first_batch + e) // batches_per_step.

        epoch_first_batch: batches this rank consumed, over all epochs, before this epoch's batch 0
        (trainer steps x grad_accum at the epoch start); batches_per_step: grad_accum.
        Default (never called): 0 and 1. Call it before creating the DataLoader iterator
        (`iter(loader)`, `for batch in loader`): the workers receive a pickled copy of the dataset
        then, and a later call does not reach them.
        """
        if epoch_first_batch < 0 or batches_per_step < 1:
            raise ValueError(f"set_step_clock({epoch_first_batch}, {batches_per_step}): need epoch_first_batch >= 0 "
                             "and batches_per_step >= 1")
        self.epoch_first_batch, self.batches_per_step = int(epoch_first_batch), int(batches_per_step)

    def batch_cfg(self, epoch_batch: int) -> DataConfig:
        """The config that batch `epoch_batch` of this epoch is made with (see set_step_clock)."""
        if self.late_cfg is None:
            return self.cfg
        step = (self.epoch_first_batch + epoch_batch) // self.batches_per_step
        return self.late_cfg if step >= self.cfg.patch.p_keep_late_step else self.cfg

    def state_dict(self, batches_done: int) -> dict:
        """Loader position after the trainer consumed `batches_done` batches of this epoch."""
        return {"epoch": self.epoch, "batches": batches_done, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.start_batch = state["epoch"], state["batches"]

    def _shard_order(self) -> list[int]:
        """Positions in data.shards, in this epoch's order."""
        order = list(range(len(self.urls)))
        random.Random(self.cfg.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def _worker_range(self, worker: int, n_workers: int) -> tuple[int, int]:
        per_worker = self.samples_per_worker()
        start = (self.rank * max(1, n_workers) + worker) * per_worker
        return start, start + per_worker

    # ----- raw streams ----------------------------------------------------------------------
    def _range_stream(self, start: int, stop: int) -> Iterator[dict]:
        """Raw samples [start, stop) of the epoch's sequence, without decoding."""
        offset = 0
        for pos in self._shard_order():
            count = int(self.main_counts[pos])
            lo, hi = max(start - offset, 0), min(stop - offset, count)
            offset += count
            if lo >= hi:
                continue
            seen = 0
            for raw in self._shard_samples(pos):
                if seen >= lo:
                    yield raw
                seen += 1
                if seen >= hi:
                    break
            if seen < hi:
                url = self.urls[pos]
                self.counter.add("missing_samples", f"{url}: {hi - seen} fewer than the index says", hi - seen)

    def _shard_samples(self, pos: int) -> Iterator[dict]:
        """The main-stream samples of shard `pos` of data.shards, in tar order: the index says which
        (not high-res when p_hr > 0, not excluded) and that the tar still holds what was indexed."""
        url = self.urls[pos]
        keep, first = None, 0
        if self.index is not None:
            sid = int(self.shard_ids[pos])
            keep = self.index.in_main_stream(sid, exclude_hr=self.cfg.p_hr > 0)
            first = int(self.index.shards[sid]["first"])
        stream = open_stream(url)
        try:
            for j, raw in enumerate(iterate_tar(stream)):
                if keep is not None and (j >= len(keep) or raw["__key__"] != self.index.key(first + j)):
                    self.counter.add("index_mismatch", f"{url}: sample {j} ({raw['__key__']}) is not the indexed one; "
                                     "re-index the shards")
                    return
                if keep is None or keep[j]:
                    raw["__url__"] = url
                    yield raw
        except TruncatedShard as err:
            self.counter.add("truncated_shard", f"{url}: {err}")
        finally:
            stream.close()

    def _resampled_stream(self, rng: np.random.Generator) -> Iterator[dict]:
        while True:
            yield from self._shard_samples(int(rng.integers(len(self.urls))))

    def read_indexed(self, sample_id: int) -> dict:
        """A raw sample by its index id: one ranged read of its image member, with its caption
        member when it lies close by (members of a sample are adjacent in the tar), else two."""
        rec = self.index.record(sample_id)
        url = self.url_of[int(rec["shard"])]
        start, end = int(rec["offset"]), int(rec["offset"] + rec["size"])
        raw = {"__key__": self.index.key(sample_id), "__url__": url}
        kind = int(rec["caption_kind"])
        if kind in (CAPTION_TXT, CAPTION_JSON):
            c_start, c_end = int(rec["caption_offset"]), int(rec["caption_offset"] + rec["caption_size"])
            lo, hi = min(start, c_start), max(end, c_end)
            if hi - lo <= end - start + COALESCE_GAP:
                data = read_range(url, lo, hi - lo)
                image, caption = data[start - lo:end - lo], data[c_start - lo:c_end - lo]
            else:
                image, caption = read_range(url, start, end - start), read_range(url, c_start, c_end - c_start)
            raw["txt" if kind == CAPTION_TXT else "json"] = caption
        else:
            image = read_range(url, start, end - start)
        raw[self.index.ext(sample_id)] = image
        return raw

    # ----- decoding -------------------------------------------------------------------------
    def _decode(self, raw: dict, rng: np.random.Generator, cfg: DataConfig) -> dict:
        sample = self.sample_fn(raw, cfg, rng)
        sample["key"] = raw["__key__"]
        return sample

    def _main_sample(self, raw: dict | None, history: deque, ahead: Lookahead, rng: np.random.Generator,
                     cfg: DataConfig) -> dict:
        """The sample at this position: `raw` decoded, or (bad or missing) the most recent decodable
        raw sample before it, or at the start of a range the next one after it (looked at, not
        consumed: every later position keeps its sample)."""
        if raw is not None:
            try:
                return self._decode(raw, rng, cfg)
            except SkipSample as err:
                self.counter.add(err.reason, f"{raw.get('__url__')}:{raw['__key__']}: {err}")
        else:
            self.counter.add("missing_samples", "stream ended before the planned count")
        for candidate in [*reversed(history), *ahead.peek(HISTORY)]:
            if candidate is raw:
                continue
            try:
                sample = self._decode(candidate, rng, cfg)
                self.counter.add("replaced_by_duplicate", f"by {candidate['__key__']}")
                return sample
            except SkipSample:
                continue
        raise RuntimeError(f"no decodable sample among the {HISTORY} before and after: check the shards "
                           f"(skips so far: {self.counter.as_dict()})")

    def _hr_sample(self, rng: np.random.Generator, cfg: DataConfig) -> dict:
        for _ in range(HISTORY):
            sample_id = self._hr_id(int(rng.integers(self._hr_count())))
            raw = self.read_indexed(sample_id)
            try:
                return self._decode(raw, rng, cfg)
            except SkipSample as err:
                self.counter.add(err.reason, f"high-res {raw['__url__']}:{raw['__key__']}: {err}")
        raise RuntimeError(f"{HISTORY} high-res draws in a row failed: check the shards")

    # ----- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # A new DataLoader asks worker 0 first; after k batches the next batch belongs to
        # logical worker k % n, so physical worker i plays logical worker (i + k) % n.
        worker = (physical + self.start_batch) % n_workers
        if self.index is not None and self.cfg.p_hr > 0 and not self._hr_count():
            raise ConfigError("data.p_hr > 0 but the index lists no high-res sample; lower data.p_hr")
        # Batches this worker already delivered: the DataLoader takes batches round-robin.
        skip = self.start_batch // n_workers + (1 if worker < self.start_batch % n_workers else 0)
        seed_epoch = self.epoch
        if self.cfg.resampled:
            seed_epoch, skip_raw = 1_000_000 + self.start_batch, 0  # reseed; see module docstring
            n_batches = None
            raw_stream = self._resampled_stream(np.random.default_rng([self.cfg.seed, seed_epoch, self.rank, worker, 1]))
            first = self.start_batch + physical  # epoch batch of local batch 0 (counted from the resume)
        else:
            start, stop = self._worker_range(worker, n_workers)
            n_batches = (stop - start) // self.cfg.batch_size
            raw_stream = self._range_stream(start, stop)
            skip_raw = skip
            first = worker  # local batch b (skipped ones included) is epoch batch b * n + worker
        buffer_rng = np.random.default_rng([self.cfg.seed, seed_epoch, self.rank, worker, 2])
        raws = shuffled(raw_stream, self.cfg.shuffle_buffer, buffer_rng)
        yield from self._batches(raws, worker, seed_epoch, n_batches, skip_raw, (first, n_workers))

    def _batches(self, raws: Iterator, worker: int, seed_epoch: int, n_batches: int | None, skip: int,
                 epoch_batch: tuple[int, int]):
        """epoch_batch (first, stride): local batch b is batch first + b * stride of the epoch."""
        history: deque = deque(maxlen=HISTORY)
        raws = Lookahead(raws)
        b = 0
        while n_batches is None or b < n_batches:
            batch, cfg = [], self.batch_cfg(epoch_batch[0] + b * epoch_batch[1])
            for i in range(self.cfg.batch_size):
                p = b * self.cfg.batch_size + i
                rng = np.random.default_rng([self.cfg.seed, seed_epoch, self.rank, worker, p, 0])
                is_hr = self.cfg.p_hr > 0 and rng.random() < self.cfg.p_hr
                raw = None if is_hr else next(raws, None)
                if raw is not None:
                    history.append(raw)
                if b < skip:
                    continue  # fast-forward after resume: replay the raw stream, no decode
                sample = self._hr_sample(rng, cfg) if is_hr else self._main_sample(raw, history, raws, rng, cfg)
                sample["is_hr"] = is_hr
                batch.append(sample)
            if b >= skip:
                yield self.collate_fn(batch, worker, self.counter.as_dict())
            b += 1


class Lookahead:
    """An iterator whose next items can be looked at without consuming them."""

    def __init__(self, items: Iterator):
        self.items, self.buffer = iter(items), deque()

    def __iter__(self):
        return self

    def __next__(self):
        return self.buffer.popleft() if self.buffer else next(self.items)

    def peek(self, n: int) -> list:
        while len(self.buffer) < n:
            item = next(self.items, None)
            if item is None:
                break
            self.buffer.append(item)
        return list(self.buffer)[:n]


def caption_of(raw: dict) -> str:
    """A sample's caption: its .txt member (img2dataset), else the "caption" of its .json, else ""."""
    if "txt" in raw:
        return raw["txt"].decode("utf-8", "replace").strip()
    try:
        return (json.loads(raw["json"]).get("caption") if "json" in raw else None) or ""
    except (ValueError, AttributeError):
        return ""


def image_patch_sample(raw: dict, cfg: DataConfig, rng: np.random.Generator) -> dict:
    sample = make_patch_sample(image_bytes(raw), cfg.patch, rng)
    sample["caption"] = caption_of(raw)
    return sample


def collate(samples: list[dict], worker: int, skips: dict) -> dict:
    """Stack samples: enc (B, 3, E, E) uint8, gt (B, 3, P, P) uint8, coords/cells (B, P, P, 2),
    r (B,), is_hr (B,), kept (B,), keys, captions; plus the worker id and its cumulative skip counts."""
    return {
        "enc": torch.stack([s["enc"] for s in samples]),
        "gt": torch.stack([s["gt"] for s in samples]),
        "coords": torch.stack([s["coords"] for s in samples]),
        "cells": torch.stack([s["cells"] for s in samples]),
        "r": torch.tensor([s["r"] for s in samples]),
        "is_hr": torch.tensor([s["is_hr"] for s in samples]),
        "kept": torch.tensor([s["kept"] for s in samples]),
        "keys": [s["key"] for s in samples],
        "captions": [s.get("caption", "") for s in samples],
        "worker": worker,
        "skips": skips,
    }


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, sample_fn=None, collate_fn=None) -> DataLoader:
    """DataLoader over MixedResolutionDataset; batching happens in the workers."""
    dataset = MixedResolutionDataset(cfg, rank, world_size, sample_fn, collate_fn)
    # Its own generator: creating an iterator draws a base seed, which must not consume the global
    # RNG (a resumed run creates one more iterator than the run it continues).
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available(),
                      prefetch_factor=2 if cfg.num_workers > 0 else None, generator=generator,
                      worker_init_fn=init_worker)
