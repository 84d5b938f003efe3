"""The training loader: one stateful object that owns the data position, whatever the samples are.

A source supplies samples (shards through their index: images or a latent cache; or synthetic
ones) and the loader decides which sample fills which slot (infd/data/epoch_plan.py): the order
is a function of (seed, epoch, slot), so that

- every main-stream sample appears once per epoch, all ranks get the same number of batches,
  and a fraction p_hr of every batch comes from the high-res stream (p_hr > 0);
- the position is (epoch, first unconsumed slot): `state_dict()` after any batch and
  `load_state_dict()` at any world size continue the epoch exactly where it was, each sample
  still seen once, and resuming costs what the next batches cost (no replay);
- randomness (crops, high-res draws) is keyed by (seed, epoch, slot), so a sample is prepared
  the same way by whichever rank and worker gets it.

Batches are built in DataLoader workers: rank batch j goes to worker j mod num_workers, each
sample one ranged read (in `read_threads` threads: S3 latency overlaps) and one decode. A sample
that cannot be used is counted and replaced by the next position's (the main stream) or by
another draw (the high-res stream), so positions never shift.

Step clock: batch j of the run feeds trainer step j // batches_per_step (grad_accum), so settings
that change with the step (patch.p_keep_late) switch at the same batch in a resumed run.
"""
from __future__ import annotations

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from infd.config import ConfigError
from infd.data.counters import SkipCounter, merge_counts
from infd.data.decode import SkipSample
from infd.data.batches import LatentBatch, LoaderNote, PatchBatch
from infd.data.hedged import HEDGES
from infd.data.image_samples import collate_patches, image_patch_sample
from infd.data.orders import ORDERS, RETRIES, epoch_order, resolve_order
from infd.data.shard_cache import CACHE
from infd.data.shard_source import READ_MODES, ShardSource
from infd.data.transforms import PatchConfig
from infd.data.urls import RANGE_READS
from infd.data.workers import init_worker, preemption_signals_held
from infd.utils.in_process import InProcess

log = logging.getLogger("infd.data")


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # brace patterns, directories or s3:// prefixes
    index: str | None = None  # the index directory (or its index.json); default: beside the shards
    batch_size: int = 8  # per rank
    num_workers: int = 2
    shuffle_block: int = 262_144  # samples permuted together (after the shard order is shuffled)
    order: str = "auto"  # "global": one block shuffle; "node": partitioned over canonical nodes; auto: per URL scheme
    canonical_nodes: int = 0  # order=node: partitions, constant for the run; 0: the first run's node count
    read_mode: str = "auto"  # "sample": a read per sample; "shard_cache": node-local chunk cache; auto: per scheme
    cache_dir: str | None = None  # shard_cache: the node-local folder (default $INFD_SHARD_CACHE, ~/.cache/infd/shards)
    cache_gb: float = 200.0  # shard_cache: the bound on the folder (docs/data.md sizes it)
    cache_chunk_mb: int = 16  # shard_cache: bytes per GET and per cached file
    read_threads: int = 8  # concurrent sample reads per worker (S3 latency)
    hedge_after_s: float = 0.3  # S3: a second GET for a sample still unanswered after this (0: never)
    request_timeout_s: float = 10.0  # S3: a request that receives nothing for this long is retried
    prefetch_factor: int = 2  # batches each loader worker prepares ahead
    p_hr: float = 0.0  # fraction of the samples that come from the high-res stream (paper: 0.5)
    seed: int = 0
    patch: PatchConfig = field(default_factory=PatchConfig)

    def validate(self, prefix: str = "") -> None:
        if not 0.0 <= self.p_hr < 1.0:
            raise ConfigError(f"config key '{prefix}p_hr' = {self.p_hr} must be in [0, 1)")
        for name in ("batch_size", "shuffle_block", "read_threads", "prefetch_factor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{prefix}{name}' must be >= 1")
        if self.order not in ("auto", *ORDERS):
            raise ConfigError(f"config key '{prefix}order' = {self.order!r}: use auto, {', '.join(ORDERS)}")
        if self.read_mode not in READ_MODES:
            raise ConfigError(f"config key '{prefix}read_mode' = {self.read_mode!r}: use one of "
                              f"{', '.join(READ_MODES)}")
        if self.cache_gb <= 0 or self.cache_chunk_mb < 1:
            raise ConfigError(f"config keys '{prefix}cache_gb' (> 0) and '{prefix}cache_chunk_mb' (>= 1; 8 or more on "
                              f"object storage) got {self.cache_gb}, {self.cache_chunk_mb}")
        if self.hedge_after_s < 0 or self.request_timeout_s <= 0:
            raise ConfigError(f"config keys '{prefix}hedge_after_s' (>= 0, 0 turns hedging off) and "
                              f"'{prefix}request_timeout_s' (> 0) are seconds: got {self.hedge_after_s}, "
                              f"{self.request_timeout_s}")


def start_position() -> dict:
    return {"epoch": 0, "slot": 0, "batches": 0}


class Loader:
    """Endless batches of `source` for one rank; `state_dict()` is the position after the last
    batch handed out. Iterating starts DataLoader workers from the current position."""

    def __init__(self, source, cfg: DataConfig, rank: int = 0, world_size: int = 1, batches_per_step: int = 1,
                 ranks_per_node: int = 1):
        self.source, self.rank, self.world_size = source, rank, world_size
        self.batches_per_step, self.ranks_per_node = batches_per_step, ranks_per_node
        self.configured = cfg
        self.cfg = resolve_order(cfg, source, max(1, world_size // ranks_per_node))
        self.position = start_position()
        self.skips: dict[int, dict] = {}
        self.reads: dict[int, dict] = {}
        check_plan(source, self.cfg, world_size, ranks_per_node)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world_size

    def slots(self, epoch: int) -> int | None:
        return epoch_order(self.source, self.cfg, epoch, self.global_batch).slots

    @property
    def batches_per_epoch(self) -> int:
        """Batches one rank gets in a whole epoch (epochs differ by at most one slot)."""
        if self.source.size is None:
            raise ValueError("an endless source has no epochs")
        return self.slots(0) // self.global_batch

    def state_dict(self) -> dict:
        """The position; with order=node also the canonical node count its epochs are planned with."""
        nodes = {"canonical_nodes": self.cfg.canonical_nodes} if self.cfg.order == "node" else {}
        return dict(self.position) | nodes

    def load_state_dict(self, state: dict) -> None:
        """state: a state_dict() (older checkpoints' positions are converted by infd.compat)."""
        saved = int(state.get("canonical_nodes", 0))
        if self.cfg.order == "node" and saved and saved != self.cfg.canonical_nodes:
            if self.configured.canonical_nodes:
                raise ConfigError(f"data.loader.canonical_nodes = {self.configured.canonical_nodes}, but the run being "
                                  f"resumed plans its epochs with {saved} canonical nodes: set "
                                  f"data.loader.canonical_nodes={saved} (or 0, which takes it from the checkpoint)")
            self.cfg = replace(self.cfg, canonical_nodes=saved)  # the first run's node count stays
            check_plan(self.source, self.cfg, self.world_size, self.ranks_per_node)
        self.position = {k: int(state[k]) for k in ("epoch", "slot", "batches")}

    def __iter__(self) -> Iterator[PatchBatch | LatentBatch]:
        stream = RankBatches(self.source, self.cfg, self.rank, self.world_size, dict(self.position),
                             self.batches_per_step, self.ranks_per_node)
        # Its own generator: creating an iterator draws a base seed, which must not consume the
        # global RNG (a resumed run creates one more iterator than the run it continues).
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.rank)
        workers = self.cfg.num_workers
        # Not persistent_workers: a worker's stream starts at the position it is made with, and every
        # iteration (a new epoch, a resume) starts from the loader's current position.
        loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                            pin_memory=torch.cuda.is_available(),
                            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
                            generator=generator, worker_init_fn=init_worker)
        with preemption_signals_held():  # see infd/data/workers.py
            batches = iter(loader)
        # Closing this generator (the trainer does, on every exit) drops `batches`: its workers stop.
        for batch, note in batches:
            self.position = note.position
            self.skips[note.worker], self.reads[note.worker] = note.skips, note.reads
            yield batch

    def epoch_batches(self) -> Iterator[PatchBatch | LatentBatch]:
        """The rest of the current epoch's batches, then stop (its workers too)."""
        left = (self.slots(self.position["epoch"]) - self.position["slot"]) // self.global_batch
        batches = iter(self)
        try:
            yield from itertools.islice(batches, left)
        finally:
            batches.close()

    def set_epoch(self, epoch: int) -> None:
        self.position = {"epoch": epoch, "slot": 0, "batches": self.position["batches"]}

    def skip_counts(self) -> dict:
        return merge_counts(self.skips)

    def bytes_read(self) -> int:
        """Bytes this rank's current workers had read from shards by their last batches (counted
        since the workers started: a resume starts from 0)."""
        return sum(r["bytes"] for r in self.reads.values())

    def hedges_fired(self) -> int:
        """Second GETs this rank's current workers sent for slow reads (counted like bytes_read)."""
        return sum(r.get("hedges", 0) for r in self.reads.values())

    def cache_evictions(self) -> int:
        """Chunks this rank's current workers evicted from the node's shard cache (counted like bytes_read)."""
        return sum(r.get("evicted", 0) for r in self.reads.values())


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, sample_fn=None, collate_fn=None,
                 batches_per_step: int = 1, ranks_per_node: int = 1) -> Loader:
    """A Loader over the shards of cfg (default samples: image patches)."""
    source = ShardSource(cfg, sample_fn or image_patch_sample, collate_fn or collate_patches)
    return Loader(source, cfg, rank, world_size, batches_per_step, ranks_per_node)


def check_plan(source, cfg: DataConfig, world_size: int, ranks_per_node: int = 1,
               key: str = "data") -> None:
    """Config errors that would otherwise hang or crash the workers, with the key and the fix
    (key: the DataConfig's dotted name in the config)."""
    if cfg.p_hr > 0 and source.hr_size == 0:
        raise ConfigError(f"{key}.p_hr > 0 but the index lists no high-res sample: set {key}.p_hr=0, or index "
                          "the shards with a lower --hr-threshold")
    if source.size is None:
        return
    cfg = resolve_order(cfg, source, max(1, world_size // ranks_per_node))
    if source.size == 0:
        why = (f" With {key}.p_hr > 0 the epoch is planned over the samples that are not high-res, and every "
               f"sample of this set is high-res: set {key}.p_hr=0 to train on them as one stream."
               if cfg.p_hr > 0 else "")
        raise ConfigError(f"the shards hold no trainable sample (the index excludes all of them).{why}")
    order = epoch_order(source, cfg, 0, cfg.batch_size * world_size)
    if cfg.order == "node":
        order.rank_slots(0, 0, world_size, ranks_per_node)  # the node counts' error, if any, now
    slots = order.slots
    if slots < cfg.batch_size * world_size:
        raise ConfigError(f"an epoch has no batch: {slots} samples per epoch for {world_size} ranks x "
                          f"{key}.batch_size={cfg.batch_size}: lower {key}.batch_size or add data")


class RankBatches(IterableDataset):
    """One rank's batches from `start` on, built in DataLoader workers (batch j by worker j mod n),
    each yielded as (batch, LoaderNote): the loader's position after it and the worker's counts."""

    def __init__(self, source, cfg: DataConfig, rank: int, world_size: int, start: dict, batches_per_step: int,
                 ranks_per_node: int = 1):
        self.source, self.cfg, self.rank, self.world_size = source, cfg, rank, world_size
        self.start, self.batches_per_step, self.ranks_per_node = start, batches_per_step, ranks_per_node
        # The config of batches from patch.p_keep_late_step on, built once (None: no switch).
        self.late_cfg = replace(cfg, patch=cfg.patch.late()) if cfg.patch.p_keep_late is not None else None
        self.counter = SkipCounter()
        self._epoch = None

    def plans(self) -> Iterator[tuple[int, int, int, dict]]:
        """(epoch, first slot of the global batch, run batch number, position after it), endlessly."""
        epoch, slot, batch = self.start["epoch"], self.start["slot"], self.start["batches"]
        G = self.cfg.batch_size * self.world_size
        while True:
            slots = self._epoch_order(epoch).slots
            if slots is not None and slots < G:
                raise ConfigError(f"epoch {epoch} has {slots} slots, fewer than one global batch ({G}): add data")
            while slots is None or slot + G <= slots:
                first, slot, batch = slot, slot + G, batch + 1
                after = ({"epoch": epoch, "slot": slot} if slots is None or slot + G <= slots
                         else {"epoch": epoch + 1, "slot": 0})
                yield epoch, first, batch - 1, after | {"batches": batch}
            epoch, slot = epoch + 1, 0

    def _epoch_order(self, epoch: int):
        """The epoch's order (infd/data/orders.py), the last one kept."""
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_order(self.source, self.cfg, epoch, self.cfg.batch_size * self.world_size))
        return self._epoch[1]

    def __iter__(self) -> Iterator[tuple[PatchBatch | LatentBatch, LoaderNote]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:  # a forked worker starts with its parent's counts
            RANGE_READS.update(bytes=0, reads=0)
            HEDGES.update(fired=0, won=0)
            CACHE.update(evicted=0)
        threads = self.cfg.read_threads
        with ThreadPoolExecutor(threads) if threads > 1 else InProcess() as pool:
            for j, (epoch, first, batch, after) in enumerate(self.plans()):
                if j % n_workers == worker:
                    slots = self._epoch_order(epoch).rank_slots(first, self.rank, self.world_size,
                                                                self.ranks_per_node)
                    samples = self._batch_samples(epoch, slots, self.batch_cfg(batch), pool)
                    yield self.source.collate_fn(samples), LoaderNote(after, worker, self.counter.as_dict(),
                                                                      self._reads())

    @staticmethod
    def _reads() -> dict:
        """This worker's object-store / file reads so far (with the shard cache: its chunk fills), hedges and
        the chunks it evicted from the node's cache."""
        return dict(RANGE_READS, hedges=HEDGES["fired"], evicted=CACHE["evicted"])

    def batch_cfg(self, batch: int) -> DataConfig:
        """The config that batch `batch` of the run is made with (see the module docstring)."""
        if self.late_cfg is None:
            return self.cfg
        return self.late_cfg if batch // self.batches_per_step >= self.cfg.patch.p_keep_late_step else self.cfg

    def _batch_samples(self, epoch: int, slots: list[int], cfg: DataConfig, pool) -> list[dict]:
        order = self._epoch_order(epoch)
        picks = [order.hr_picks(g) if order.is_hr(g) else order.main_picks(g) for g in slots]
        firsts = list(pool.map(self._read, [next(p) for p in picks]))
        samples = []
        for g, pick, first in zip(slots, picks, firsts):
            sample = self._decoded(itertools.chain([first], (self._read(i) for i in pick)),
                                   np.random.default_rng([self.cfg.seed, epoch, g]), cfg)
            sample["is_hr"] = order.is_hr(g)
            samples.append(sample)
        return samples

    def _read(self, sample_id: int):
        try:
            return self.source.read(sample_id)
        except SkipSample as err:
            return err

    def _decoded(self, raws: Iterator, rng: np.random.Generator, cfg: DataConfig) -> dict:
        """The first of `raws` that decodes; the others are counted."""
        for attempt, raw in enumerate(raws):
            try:
                if isinstance(raw, SkipSample):
                    raise raw
                sample = self.source.decode(raw, rng, cfg)
                if attempt:
                    self.counter.add("replaced_by_duplicate", f"by {raw['__key__']} after {attempt} unusable")
                return sample
            except SkipSample as err:
                where = f"{raw.get('__url__')}:{raw.get('__key__')}: " if isinstance(raw, dict) else ""
                self.counter.add(err.reason, f"{where}{err}")
        raise RuntimeError(f"{RETRIES} samples in a row were unusable: check the shards (skips so far: "
                           f"{self.counter.as_dict()})")

