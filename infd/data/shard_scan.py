"""One pass over a WebDataset / img2dataset tar that records, per sample, where its members are.

The tar is read once as a stream (local file or S3 object) and never rewritten: the index points
into it. Samples are grouped exactly as `iterate_tar` groups them (consecutive members sharing a
key), so sample j of the index is the j-th sample the loader reads from the tar.
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from infd.data.decode import SkipSample, open_image, oriented_size
from infd.data.histogram import HISTOGRAM_EDGES, histogram_bin
from infd.data.sample_index import CAPTION_JSON, CAPTION_NONE, CAPTION_TXT, EXCLUDED, HR, SAMPLE_DTYPE
from infd.data.tar_samples import IMAGE_EXTS, CountingReader, sample_members
from infd.data.urls import ShardReadError, open_stream


@dataclass
class ShardScan:
    """What one tar holds: records (SAMPLE_DTYPE; `shard` left 0, `ext` an index into the primary
    extensions, 255 for none), keys, the tar's size, skip reasons and the resolution histogram."""

    records: np.ndarray
    keys: list[bytes]
    bytes: int
    skipped: Counter = field(default_factory=Counter)
    histogram: list[int] = field(default_factory=list)


class _Sample:
    def __init__(self, key: str):
        self.key, self.members = key, {}  # ext -> (offset, size, data or None)


def scan_shard(url: str, hr_threshold: int, primary: tuple[str, ...] = IMAGE_EXTS) -> ShardScan:
    """hr_threshold: long side (upright) of a high-res sample. primary: the member a
    sample is indexed by, the first present of these extensions (IMAGE_EXTS: images, whose
    headers give the size; a latent cache uses ("latent.npy",) and records no size)."""
    records, keys, skipped = [], [], Counter()
    histogram = [0] * len(HISTOGRAM_EDGES)
    stream = CountingReader(open_stream(url))
    try:
        for sample in _samples(stream, skipped):
            records.append(_record(sample, hr_threshold, skipped, histogram, primary))
            keys.append(sample.key.encode())
    finally:
        stream.close()
    return ShardScan(np.array(records, dtype=SAMPLE_DTYPE), keys, stream.count, skipped, histogram)


def _samples(stream, skipped: Counter):
    sample = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for key, ext, member in sample_members(tar):
                if sample is not None and sample.key != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = _Sample(key)
                wanted = ext in IMAGE_EXTS or ext == "json"
                data = tar.extractfile(member).read() if wanted else None
                sample.members[ext] = (member.offset_data, member.size, data)
        while stream.read(1 << 16):  # the end-of-archive padding: count the whole tar
            pass
    except ShardReadError:
        raise
    except (tarfile.TarError, EOFError, OSError):
        skipped["truncated_shard"] += 1  # the samples before the break are indexed, as the loader reads them
    if sample is not None:
        yield sample


def _record(sample: _Sample, hr_threshold: int, skipped: Counter, histogram: list[int],
            primary: tuple[str, ...]) -> tuple:
    cap_kind, cap_off, cap_size = CAPTION_NONE, -1, 0
    if "txt" in sample.members:
        cap_kind, (cap_off, cap_size, _) = CAPTION_TXT, sample.members["txt"]
    elif "json" in sample.members and _json_has_caption(sample.members["json"][2]):
        cap_kind, (cap_off, cap_size, _) = CAPTION_JSON, sample.members["json"]
    ext = next((e for e in primary if e in sample.members), None)
    if ext is None:
        skipped["no_image_member" if primary == IMAGE_EXTS else f"no_{primary[0]}_member"] += 1
        return (0, 0, 0, 0, 0, EXCLUDED, 255, cap_off, cap_size, cap_kind)
    offset, size, data = sample.members[ext]
    if primary != IMAGE_EXTS:
        return (offset, size, 0, 0, 0, 0, primary.index(ext), cap_off, cap_size, cap_kind)
    try:
        width, height = oriented_size(open_image(data))
    except SkipSample as err:
        skipped[err.reason] += 1
        return (offset, size, 0, 0, 0, EXCLUDED, primary.index(ext), cap_off, cap_size, cap_kind)
    long_side = max(width, height)
    histogram[histogram_bin(long_side)] += 1
    flags = HR if long_side >= hr_threshold else 0
    return (offset, size, width, height, 0, flags, primary.index(ext), cap_off, cap_size, cap_kind)


def _json_has_caption(data: bytes | None) -> bool:
    try:
        return bool(json.loads(data or b"{}").get("caption"))
    except (ValueError, AttributeError):
        return False
