"""Deep-zoom tiles of a neural field: a pyramid of levels over one canvas, each tile rendered on request.

Level L of a canvas of (H, W) pixels is the canvas at 2^(L - L_max) of its size (sides rounded up), L_max the
smallest level count whose level 0 fits in one tile; tile (L, x, y) is the box [y T, (y+1) T) x [x T, (x+1) T)
of level L clipped to it. A tile is `render_tiles(renderer, phi, level size, region=box)` (fp32 unless the
render options say bf16) from phi decoded once per latent (the last PHI_KEPT latents' phi are kept), quantised
to 8 bits (infd.image.tensor_to_pil) and encoded as a lossless PNG.

`TileCache` keeps PNGs in memory (LRU, bounded in bytes); `TileRenderer` bounds concurrent renders and keeps
a record of every tile it served (rendered or cached), which the tests and `/api/record` read.
"""
from __future__ import annotations

import io
import math
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

TILE = 256
PHI_KEPT = 8  # decoded latents kept (a paper-size phi is 64 MB in fp32)


class TileError(ValueError):
    """A request for a tile or region that does not exist; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Pyramid:
    """canvas: (H, W) of the finest level; tile: tile side in pixels."""

    canvas: tuple[int, int]
    tile: int = TILE

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.canvas) / self.tile)))

    def level_size(self, level: int) -> tuple[int, int]:
        """(H, W) of a level."""
        self.check_level(level)
        div = 2 ** (self.max_level - level)
        return tuple(max(1, math.ceil(n / div)) for n in self.canvas)

    def grid(self, level: int) -> tuple[int, int]:
        """(rows, columns) of tiles at a level."""
        return tuple(math.ceil(n / self.tile) for n in self.level_size(level))

    def check_level(self, level: int) -> None:
        if not 0 <= level <= self.max_level:
            raise TileError(f"level {level}: levels are 0..{self.max_level}")

    def box(self, level: int, x: int, y: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of tile (x, y) in level pixels; TileError outside the level."""
        rows, cols = self.grid(level)
        if not (0 <= x < cols and 0 <= y < rows):
            raise TileError(f"tile ({x}, {y}) of level {level}: the level has {cols} x {rows} tiles")
        h, w = self.level_size(level)
        t = self.tile
        return y * t, x * t, min(h, (y + 1) * t), min(w, (x + 1) * t)


class TileCache:
    """PNG bytes by key, least recently used evicted beyond `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key, data: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self.bytes -= len(old)


def png_bytes(image: Tensor) -> bytes:
    """(3, H, W) in [-1, 1] -> a lossless PNG of its 8-bit quantisation (infd.image.tensor_to_pil)."""
    from infd.image import tensor_to_pil

    buf = io.BytesIO()
    tensor_to_pil(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclass
class TileRecord:
    """One tile served: the latent's id, level, x, y, seconds it took, whether it came from the cache."""

    latent: int
    level: int
    x: int
    y: int
    seconds: float
    cached: bool
    at: float


@dataclass
class TileRenderer:
    """Renders tiles of latents through an autoencoder's decoder and renderer (fp32).

    ae: a NeuralFieldAutoencoder; pyramid: the canvas's levels; options: infd.render.RenderOptions;
    cache: a TileCache; max_renders: renders at once (the rest wait; `slot()` takes one for other renders)."""

    ae: nn.Module
    pyramid: Pyramid
    options: object = None
    cache: TileCache = field(default_factory=lambda: TileCache(256 << 20))
    max_renders: int = 2
    record: list[TileRecord] = field(default_factory=list)
    _phi: OrderedDict = field(default_factory=OrderedDict)
    _slots: threading.Semaphore = None

    def __post_init__(self):
        self._slots = threading.Semaphore(self.max_renders)
        self._lock = threading.Lock()
        self._inflight: dict = {}  # tile key -> the lock its renderer holds
        self._decoding: dict = {}  # latent id -> the lock its decoder holds
        self.started = time.perf_counter()

    @contextmanager
    def slot(self):
        """One of the max_renders render slots, for the block."""
        with self._slots:
            yield

    def phi(self, latent_id: int, z: Tensor) -> Tensor:
        """phi = D(z), decoded once per latent (other latents' tiles do not wait for it)."""
        with self._lock:
            if latent_id in self._phi:
                self._phi.move_to_end(latent_id)
                return self._phi[latent_id]
            decoding = self._decoding.setdefault(latent_id, threading.Lock())
        with decoding:
            with self._lock:
                phi = self._phi.get(latent_id)
            if phi is None:
                with torch.no_grad():
                    phi = self.ae.decode(z.to(next(self.ae.parameters()).device))
                with self._lock:
                    self._phi[latent_id] = phi
                    while len(self._phi) > PHI_KEPT:
                        self._phi.popitem(last=False)
        return phi

    def tile_png(self, latent_id: int, z: Tensor, level: int, x: int, y: int, cancelled=None) -> bytes | None:
        """The PNG of tile (level, x, y) of latent `latent_id` (z (1, C, h, w)); TileError if it does not exist.
        A tile asked for again while it renders is rendered once (the second request waits for the first).
        cancelled() -> True once a render slot is free: nothing is rendered, None returned (the asker left)."""
        box = self.pyramid.box(level, x, y)
        key = (latent_id, level, x, y)
        start = time.perf_counter()
        data = self.cache.get(key)
        rendered = False
        if data is None:
            with self._lock:
                same_tile = self._inflight.setdefault(key, threading.Lock())
            with same_tile:
                data = self.cache.get(key)
                if data is None:
                    with self._slots:
                        if cancelled is not None and cancelled():
                            data = None
                        else:
                            data = png_bytes(self.render(latent_id, z, self.pyramid.level_size(level), box)[0])
                    if data is not None:
                        self.cache.put(key, data)
                        rendered = True
            with self._lock:
                if self._inflight.get(key) is same_tile:
                    del self._inflight[key]
            if data is None:
                return None
        self._note(key, start, cached=not rendered)
        return data

    def render(self, latent_id: int, z: Tensor, size: tuple[int, int], box) -> Tensor:
        """render_tiles of the latent at `size` (H, W), region `box`: (1, 3, h, w) on the CPU."""
        from infd.render import render_tiles

        with torch.no_grad():
            return render_tiles(self.ae.renderer, self.phi(latent_id, z), size, region=box, options=self.options).cpu()

    def _note(self, key, start: float, cached: bool) -> None:
        now = time.perf_counter()
        with self._lock:
            self.record.append(TileRecord(*key, now - start, cached, now - self.started))
