"""Samples of a WebDataset tar: consecutive members sharing a key (path up to the first dot of
the file name) form one sample {"__key__": key, ext: bytes, ...}."""
from __future__ import annotations

import tarfile
from typing import Iterator

from infd.data.decode import SkipSample
from infd.data.urls import ShardReadError


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # image members, in the order a sample's image is chosen


def image_bytes(raw: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in raw:
            return raw[ext]
    raise SkipSample("no_image_member", f"{raw.get('__key__')}: members {sorted(k for k in raw if k[:2] != '__')}")


class TruncatedShard(Exception):
    """The tar ended or broke mid-way; samples before the break were yielded."""


def split_key(name: str) -> tuple[str, str]:
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def sample_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, extension, member) of the members that belong to samples, in tar order (files only;
    names starting with "__" and names without an extension are not samples)."""
    for member in tar:
        if not member.isfile():
            continue
        key, ext = split_key(member.name)
        if not key.startswith("__") and ext:
            yield key, ext, member


def iterate_tar(stream) -> Iterator[dict]:
    """Yield samples from a binary stream of a tar. Raises TruncatedShard on a broken tar.

    ShardReadError (I/O failure after retries) propagates unchanged.
    """
    sample: dict | None = None
    stream = CountingReader(stream)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for key, ext, member in sample_members(tar):
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is truncated")
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                if sample is None:
                    sample = {"__key__": key}
                sample[ext] = data
        # tarfile ends quietly at a cut inside a header; a tar is always whole 512-byte blocks.
        while stream.read(1 << 16):
            pass
        if stream.count % 512:
            raise tarfile.ReadError(f"tar is {stream.count} bytes, not whole 512-byte blocks: truncated")
    except ShardReadError:
        raise
    except (tarfile.TarError, EOFError, OSError) as err:
        raise TruncatedShard(str(err)) from None
    if sample is not None:
        yield sample


class CountingReader:
    """Counts the bytes read from a binary stream."""

    def __init__(self, stream):
        self.stream, self.count = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.count += len(data)
        return data

    def close(self) -> None:
        self.stream.close()
