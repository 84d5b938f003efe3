"""Samples of WebDataset shards read by their index entries: every sample is one ranged read
(a local pread or an S3 range GET) of its span of the tar, so any sample is reachable without
reading the ones before it (see infd/data/epoch_plan.py for the order).

A sample's span runs from the header of its first indexed member to the header of the next
sample's, and is parsed as a tar fragment: all its members come back (image, caption, .json,
a latent cache's several .npy), and a member whose key is not the indexed one (shards rewritten
after indexing) is counted as `index_mismatch` instead of being trained on.
"""
from __future__ import annotations

import io
import tarfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from infd.config import ConfigError
from infd.data.decode import SkipSample
from infd.data.epoch_plan import BlockOrder
from infd.data.sample_index import CAPTION_NONE, HR, INDEX_NAME, SampleIndex, open_index
from infd.data.shard_cache import CacheOptions, ShardCache, default_cache_dir
from infd.data.tar_samples import sample_members
from infd.data.urls import ReadOptions, ShortRead, dirname_url, expand_urls, join_url, read_range

HEADER = 512
NEXT_RECORDS = 16  # records read past a sample to find where the next one starts
# Where the next sample's start is not known (the shard's last sample, or unindexed ones follow), the
# read ends this far past the sample's last indexed member: room for its other members (.json, .cls,
# a latent cache's extra arrays), never the rest of a multi-GB tar.
SPAN_SLACK = 1 << 20
READ_MODES = ("auto", "sample", "shard_cache")


class ShardSource:
    """The samples of `cfg.shards` (a DataConfig), through their index.

    sample_fn(raw, cfg, rng) -> sample dict; collate_fn(samples) -> a typed batch (infd.data.batches)
    (module-level functions: workers pickle them). Attributes: size (main-stream samples of an
    epoch), hr_size (high-res samples), main_counts (per shard of data.shards)."""

    def __init__(self, cfg, sample_fn, collate_fn):
        self.sample_fn, self.collate_fn = sample_fn, collate_fn
        self.read_options = ReadOptions(cfg.hedge_after_s, cfg.request_timeout_s)
        prefix = _single_s3_prefix(cfg)
        if prefix is not None:
            # The index beside the shards names them: no listing. (1000 ranks each listing a prefix of
            # 10,000 shards at start is 10,000 LIST pages at once.)
            self.index = self._open_index(cfg, prefix)
            self.urls = [join_url(prefix, name) for name in self.index.shard_names]
        else:
            self.urls = expand_urls(cfg.shards)
        if not self.urls:
            raise ConfigError(f"config key 'shards' (data) = {cfg.shards!r} matches no shard: give shard patterns, "
                              "directories or s3:// prefixes")
        if any(u.startswith("pipe:") for u in self.urls):
            raise ConfigError("pipe: shard URLs cannot be read by offset, which the loader needs (a global shuffled "
                              "order and constant-time resume): give local paths or s3:// URLs in data.shards")
        if prefix is None:
            self.index = self._open_index(cfg, cfg.index or dirname_url(self.urls[0]))
        self._plan(exclude_hr=cfg.p_hr > 0)
        self._ids_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.cache = shard_cache(cfg, self.urls, self.read_options)

    def _open_index(self, cfg, url: str) -> SampleIndex:
        url = dirname_url(url) if url.endswith(INDEX_NAME) else url
        try:
            return open_index(url)
        except FileNotFoundError:
            raise ConfigError(f"no shard index at {url}: set data.index, or index the shards with "
                              "python -m data_prep.index_shards SHARDS --output DIR (data_prep.build_shards "
                              "writes one)") from None

    def _plan(self, exclude_hr: bool) -> None:
        """Per shard of data.shards: its id in the index and main-stream count; the high-res ids."""
        ids = {name: i for i, name in enumerate(self.index.shard_names)}
        missing = [u for u in self.urls if u.rsplit("/", 1)[-1] not in ids]
        if missing:
            raise ConfigError(f"shard {missing[0]} is not in the index at {self.index.root} ({len(missing)} "
                              "missing): re-index the shards or fix data.shards")
        self.shard_ids = np.array([ids[u.rsplit("/", 1)[-1]] for u in self.urls], dtype=np.int64)
        rec = self.index.shards[self.shard_ids]
        self.main_counts = rec["samples"] - rec["excluded"] - (rec["hr"] if exclude_hr else 0)
        self.exclude_hr = exclude_hr
        self.url_of = dict(zip(self.shard_ids.tolist(), self.urls))
        self.hr_ids = None  # all of the index's (read by position); an array for a subset of its shards
        if len(self.shard_ids) < len(ids):
            hr = np.asarray(self.index.hr_ids)
            self.hr_ids = hr[np.isin(self.index.samples["shard"][hr], self.shard_ids)]

    @property
    def size(self) -> int:
        return int(self.main_counts.sum())

    @property
    def hr_size(self) -> int:
        return len(self.index.hr_ids if self.hr_ids is None else self.hr_ids)

    def hr_id(self, k: int) -> int:
        return self.index.hr_id(k) if self.hr_ids is None else int(self.hr_ids[k])

    def main_ids(self, i: int) -> np.ndarray:
        """The main-stream sample ids of shard i of data.shards, in tar order (a few cached)."""
        def make() -> np.ndarray:
            sid = int(self.shard_ids[i])
            keep = self.index.in_main_stream(sid, exclude_hr=self.exclude_hr)
            return int(self.index.shards[sid]["first"]) + np.flatnonzero(keep)

        return self._cached(("main", i), make)

    def hr_counts(self, shards: np.ndarray) -> np.ndarray:
        """High-res samples of shards `shards` (positions in data.shards)."""
        return self.index.shards[self.shard_ids[shards]]["hr"].astype(np.float64)

    def hr_ids_of(self, i: int) -> np.ndarray:
        """The high-res sample ids of shard i of data.shards (a few cached: the node order draws from the
        shards of one block again and again)."""
        def make() -> np.ndarray:
            rec = self.index.shards[int(self.shard_ids[i])]
            flags = self.index.records(int(rec["first"]), int(rec["samples"]))["flags"]
            return int(rec["first"]) + np.flatnonzero(flags & HR)

        return self._cached(("hr", i), make)

    def _cached(self, key: tuple, make) -> np.ndarray:
        if key not in self._ids_cache:
            self._ids_cache[key] = make()
            if len(self._ids_cache) > 64:
                self._ids_cache.popitem(last=False)
        return self._ids_cache[key]

    def order(self, seed: int, epoch: int, block: int) -> BlockOrder:
        """An epoch's main order (main position -> sample id)."""
        return BlockOrder(self.main_counts, self.main_ids, block, seed, epoch)

    # ----- reading ----------------------------------------------------------------------------
    def read(self, sample_id: int) -> dict:
        """A raw sample {"__key__", "__url__", ext: bytes, ...} by one ranged read of its span.
        Raises SkipSample (truncated_shard, index_mismatch)."""
        rec, start, end = self._located(sample_id)
        shard = int(rec["shard"])
        url, key = self.url_of[shard], self.index.key(sample_id)
        try:
            span = self._read_span(url, shard, start, end - start)
        except ShortRead as err:
            raise SkipSample("truncated_shard", str(err)) from None
        raw = {"__key__": key, "__url__": url} | members_of(span, key)
        ext = self.index.meta["exts"][int(rec["ext"])]
        if ext not in raw:
            raise SkipSample("index_mismatch", f"{url}: no {key}.{ext} where the index says; the shard changed "
                             "after indexing: re-index the shards")
        return raw

    def span(self, sample_id: int) -> tuple[int, int, int]:
        """(shard id in the index, first byte, end byte) of the one read that fetches a sample: from its
        first indexed member's header to the next sample's."""
        rec, start, end = self._located(sample_id)
        return int(rec["shard"]), start, end

    def _located(self, sample_id: int) -> tuple[np.void, int, int]:
        """(the sample's index record, first byte, end byte of its read)."""
        records = self.index.records(sample_id, NEXT_RECORDS + 1)
        rec = records[0]
        start = span_start(rec)
        end = next((span_start(r) for r in records[1:] if r["shard"] == rec["shard"] and span_start(r) >= 0), None)
        if end is None:  # the shard's last sample, or unindexed ones follow: a bounded read
            end = min(int(self.index.shards[int(rec["shard"])]["bytes"]), span_end(rec) + SPAN_SLACK)
        return rec, start, end

    def _read_span(self, url: str, shard: int, offset: int, length: int) -> bytes:
        """One ranged read of the shard (index id `shard`): directly, or through the node's shard cache."""
        if self.cache is None:
            return read_range(url, offset, length, self.read_options)
        shard_bytes = int(self.index.shards[shard]["bytes"])
        data = self.cache.read(url, shard_bytes, offset, length)
        if len(data) != length:
            raise ShortRead(f"{url}: wanted {length} bytes at {offset}, the index gives the shard {shard_bytes}")
        return data

    def decode(self, raw: dict, rng: np.random.Generator, cfg) -> dict:
        sample = self.sample_fn(raw, cfg, rng)
        sample["key"] = raw["__key__"]
        return sample


def shard_cache(cfg, urls: list[str], read_options: ReadOptions) -> ShardCache | None:
    """The node's shard cache when data.loader.read_mode asks for it (auto: for shards on object storage)."""
    mode = cfg.read_mode
    if mode == "sample" or (mode == "auto" and not urls[0].startswith("s3://")):
        return None
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    return ShardCache(CacheOptions(root, int(cfg.cache_gb * 1e9), cfg.cache_chunk_mb << 20), read_options)


def _single_s3_prefix(cfg) -> str | None:
    """data.shards when it is one s3:// prefix ('s3://bucket/set/') holding its index (data.index unset
    or the same folder); else None."""
    spec = cfg.shards if isinstance(cfg.shards, str) else (cfg.shards[0] if len(cfg.shards) == 1 else "")
    if not (spec.startswith("s3://") and spec.endswith("/")) or any(c in spec for c in " {,"):
        return None
    index = cfg.index.removesuffix(INDEX_NAME) if cfg.index else spec
    return spec if index.rstrip("/") == spec.rstrip("/") else None


def span_start(rec: np.void) -> int:
    """Offset of the header of a record's first indexed member, -1 when it has none."""
    starts = [int(rec["offset"])] if rec["size"] > 0 else []
    if rec["caption_kind"] != CAPTION_NONE:
        starts.append(int(rec["caption_offset"]))
    return min(starts) - HEADER if starts else -1


def span_end(rec: np.void) -> int:
    """Offset just past the data of a record's indexed members (padded to the tar's 512-byte blocks)."""
    ends = [int(rec["offset"]) + int(rec["size"])]
    if rec["caption_kind"] != CAPTION_NONE:
        ends.append(int(rec["caption_offset"]) + int(rec["caption_size"]))
    end = max(ends)
    return end + (-end % HEADER)


def members_of(span: bytes, key: str) -> dict:
    """{ext: bytes} of the members of `key` in a tar fragment (headers and data, no end marker)."""
    out = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(span), mode="r:") as tar:
            for k, ext, member in sample_members(tar):
                if k == key:
                    out[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError) as err:
        if not out:
            raise SkipSample("corrupt_tar", f"{key}: {err}") from None
    return out

