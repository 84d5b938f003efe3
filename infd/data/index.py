"""index.json of a shard set: what the loader needs to plan epochs without scanning shards.

{
  "version": 1, "hr_threshold": 1024,
  "total_samples": N, "total_hr": M, "total_bytes": B,
  "shards": [{"name": "shard-000000.tar", "samples": n, "hr": k, "bytes": b}, ...],
  "resolution_histogram": {"edges": [0, 256, ...], "counts": [...]},   # long side, upright
  "hr_manifest": "hr_manifest.jsonl",   # one line per high-res sample, below
  "skipped": {"reason": count}, "converted": {"reason": count}
}
hr_manifest.jsonl lines: {"shard": name, "key": k, "ext": "jpg", "offset": o, "size": s,
"width": w, "height": h, "caption": c}: offset/size of the image member's data inside the tar, so a
high-res sample is one range read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from infd.data.urls import dirname_url, join_url, read_bytes

INDEX_NAME = "index.json"
HISTOGRAM_EDGES = [0, 256, 512, 1024, 2048, 4096, 8192, 16384]


@dataclass
class ShardInfo:
    url: str
    samples: int
    hr: int


@dataclass
class ShardIndex:
    shards: list[ShardInfo]
    hr_manifest: list[dict]  # each with "url" added
    raw: dict

    @property
    def hr_keys(self) -> set[tuple[str, str]]:
        return {(e["url"], e["key"]) for e in self.hr_manifest}


def histogram_bin(long_side: int) -> int:
    return max(i for i, edge in enumerate(HISTOGRAM_EDGES) if long_side >= edge)


def load_index(index_url: str, urls: list[str] | None = None) -> ShardIndex:
    """Read index.json (and its manifest); restrict to `urls` when given, in that order."""
    raw = json.loads(read_bytes(index_url))
    base = dirname_url(index_url)
    by_name = {s["name"]: s for s in raw["shards"]}
    if urls is None:
        urls = [join_url(base, s["name"]) for s in raw["shards"]]
    shards = []
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        if name not in by_name:
            raise ValueError(f"shard {url} is not in {index_url}; rebuild the index or fix data.shards")
        shards.append(ShardInfo(url, by_name[name]["samples"], by_name[name]["hr"]))
    manifest = []
    if raw.get("hr_manifest"):
        url_of = {s.url.rsplit("/", 1)[-1]: s.url for s in shards}
        for line in read_bytes(join_url(base, raw["hr_manifest"])).decode().splitlines():
            entry = json.loads(line)
            if entry["shard"] in url_of:
                manifest.append({**entry, "url": url_of[entry["shard"]]})
    return ShardIndex(shards, manifest, raw)
