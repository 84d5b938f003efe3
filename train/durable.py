"""Files that are on disk when the call returns: safetensors written without a serialising copy,
and fsync of files and directories (a rename is durable only once its directory is synced).

`write_safetensors` writes the safetensors layout itself (8-byte little-endian header length, a
JSON header of dtype, shape and byte offsets per tensor padded to 8 bytes, then the tensors'
bytes in header order): `safetensors.torch.save_file` first copies every tensor into Python
bytes, which doubles a checkpoint's memory. The bytes are packed into a 64 MiB buffer per file and
written only in full buffers, whatever the tensors' sizes: on the development machine 4.6 GB took
23.3 s written tensor by tensor (1477 writes for the paper UNet) and 6.8 s packed, against 8.8 s for
the disk's own one-stream probe (medians of 3).

The file is opened with O_DIRECT where the file system takes it (the buffer is page-aligned, the last write
padded to the block and the file truncated back): the bytes go from the buffer to the disk without the
page cache, whose copy and later reclaim cost the training CPU time (development machine, 1.5 GiB of
distinct data: 0.13 s of CPU direct, 0.5-15 s buffered, as memory was free or not). Where O_DIRECT is
refused (tmpfs, some network file systems) the same bytes are written buffered.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import torch

STAGE_BYTES = 64 << 20
ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in multiples of the logical block (<= 4096)
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` (CPU, any of the common dtypes) to `path` and fsync it; returns the bytes written.
    Loadable by safetensors.torch.load_file / safe_open."""
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        t = t.detach().contiguous()
        if t.device.type != "cpu":
            raise ValueError(f"write_safetensors: tensor {name} is on {t.device}; move it to the CPU first")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        blobs.append(t.reshape(-1).view(torch.uint8).numpy() if size else None)
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    blobs = [np.frombuffer(struct.pack("<Q", len(text)) + text, dtype=np.uint8), *blobs]
    total = 8 + len(text) + offset
    stage_bytes = min(STAGE_BYTES, total + (-total % ALIGN))
    stage = np.frombuffer(mmap.mmap(-1, stage_bytes), dtype=np.uint8)  # page-aligned, as O_DIRECT needs
    try:
        _write_file(path, blobs, stage, total, direct=True)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        _write_file(path, blobs, stage, total, direct=False)  # O_DIRECT refused here
    return total


def _write_file(path: Path, blobs: list, stage: np.ndarray, total: int, direct: bool) -> None:
    """The blobs through `stage` into a new file of `total` bytes, fsynced; direct: with O_DIRECT (the last
    write padded to ALIGN with zeros, the file truncated back to `total`)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags, 0o644)
    try:
        _write_staged(fd, blobs, stage, ALIGN if direct else 1)
        if direct:
            os.ftruncate(fd, total)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_staged(fd: int, blobs: list, stage: np.ndarray, align: int = 1) -> None:
    """Write the blobs back to back through `stage`, which is written only when full (and once at the
    end, zero-padded to a multiple of `align`): every write but the last is the stage's length, whatever the
    tensors' sizes."""
    fill = 0
    for blob in blobs:
        pos, size = 0, 0 if blob is None else blob.nbytes
        while pos < size:
            n = min(stage.nbytes - fill, size - pos)
            stage[fill:fill + n] = blob[pos:pos + n]
            fill, pos = fill + n, pos + n
            if fill == stage.nbytes:
                _write_all(fd, memoryview(stage))
                fill = 0
    if fill:
        padded = fill + (-fill % align)
        stage[fill:padded] = 0
        _write_all(fd, memoryview(stage)[:padded])


def _write_all(fd: int, data: memoryview) -> None:
    """A write may take fewer bytes than given (a signal, a full disk's last blocks): write the rest."""
    while data:
        data = data[os.write(fd, data):]


def write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(src: Path, dst: Path) -> None:
    """os.replace, then the directory synced: after a power loss `dst` is the new one or the old one."""
    os.replace(src, dst)
    fsync_path(dst.parent)
