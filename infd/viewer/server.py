"""The `infd view` web server (aiohttp): a deep-zoom page over latents, every tile rendered on request.

Routes (nothing maps a request path to a file: the page and its script are read from this package at start):

    GET  /                                      the page
    GET  /viewer.js                             its script
    GET  /api/info                              canvas, tile size, levels, the latents (id and label), text model?
    GET  /tiles/{latent}/{level}/{x}_{y}.png    one tile (404 outside the pyramid)
    GET  /api/region?latent=&x0=&y0=&x1=&y1=&w=&h=   a box of the finest level (canvas pixels) rendered at w x h
    POST /api/generate  {"prompt": str, "seed": int} a new latent from the text model (when there is one)
    GET  /api/record                            every tile served: level, x, y, seconds, cached; first-tile time

Renders run in a thread pool; `TileRenderer` bounds how many at once. A request the server cannot answer gets
a 4xx with a one-line reason, and the server goes on.
"""
from __future__ import annotations

import asyncio
import math
import threading
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Callable

from torch import Tensor

from infd.viewer.tiles import Pyramid, TileError, TileRenderer, png_bytes

MAX_PROMPT = 1000
MAX_ZOOM = 16  # a region is rendered at most 16x finer than the canvas (float32 coordinates stay exact)


@dataclass
class Latent:
    """z (1, C, h, w) in the autoencoder's units, and what the page calls it."""

    z: Tensor
    label: str


@dataclass
class ViewerState:
    """The latents on show and how to make more: generate(prompt, seed) -> z, or None (no text model)."""

    renderer: TileRenderer
    latents: list[Latent]
    generate: Callable[[str, int], Tensor] | None = None
    max_download: int = 8192 * 8192  # pixels of one /api/region answer
    lock: threading.Lock = field(default_factory=threading.Lock)

    def latent(self, key: str) -> tuple[int, Latent]:
        if not key.isdigit() or int(key) >= len(self.latents):
            raise TileError(f"latent {key!r}: there are {len(self.latents)} (ids 0..{len(self.latents) - 1})")
        return int(key), self.latents[int(key)]

    def add(self, z: Tensor, label: str) -> int:
        with self.lock:
            self.latents.append(Latent(z, label))
            return len(self.latents) - 1


def _int(query, name: str) -> int:
    try:
        return int(query[name])
    except KeyError:
        raise TileError(f"missing parameter {name}", 400) from None
    except ValueError:
        raise TileError(f"parameter {name}={query[name]!r}: expected an integer", 400) from None


def region_request(query, pyramid: Pyramid, max_pixels: int) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """((top, left, bottom, right) in canvas pixels, output (H, W)) of an /api/region query, checked."""
    x0, y0, x1, y1, w, h = (_int(query, k) for k in ("x0", "y0", "x1", "y1", "w", "h"))
    height, width = pyramid.canvas
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise TileError(f"box ({x0}, {y0}, {x1}, {y1}): expected 0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height}",
                        400)
    if w < 1 or h < 1 or w * h > max_pixels:
        raise TileError(f"output {w}x{h}: expected at least 1x1 and at most {max_pixels} pixels", 400)
    if w > MAX_ZOOM * (x1 - x0) or h > MAX_ZOOM * (y1 - y0):
        raise TileError(f"output {w}x{h} of a {x1 - x0}x{y1 - y0} box: at most {MAX_ZOOM}x the canvas's pixels", 400)
    return (y0, x0, y1, x1), (h, w)


def region_image(state: ViewerState, latent_id: int, box, out: tuple[int, int]) -> bytes:
    """The box of the canvas rendered at `out` (H, W): the canvas scaled so the box spans `out`."""
    top, left, bottom, right = box
    sy, sx = out[0] / (bottom - top), out[1] / (right - left)
    size = (math.ceil(state.renderer.pyramid.canvas[0] * sy), math.ceil(state.renderer.pyramid.canvas[1] * sx))
    scaled = (round(top * sy), round(left * sx))
    region = (*scaled, min(size[0], scaled[0] + out[0]), min(size[1], scaled[1] + out[1]))
    return png_bytes(state.renderer.render(latent_id, state.latents[latent_id].z, size, region)[0])


def build_app(state: ViewerState):
    from aiohttp import web

    page = resources.files("infd.viewer").joinpath("static/index.html").read_bytes()
    script = resources.files("infd.viewer").joinpath("static/viewer.js").read_bytes()

    async def in_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def tile(request):
        m = request.match_info
        latent_id, latent = state.latent(m["latent"])
        data = await in_thread(state.renderer.tile_png, latent_id, latent.z, int(m["level"]), int(m["x"]),
                               int(m["y"]))
        return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def info(request):
        p = state.renderer.pyramid
        return web.json_response({"canvas": list(p.canvas), "tile": p.tile, "max_level": p.max_level,
                                  "latents": [{"id": i, "label": x.label} for i, x in enumerate(state.latents)],
                                  "text": state.generate is not None, "max_download": state.max_download})

    async def region(request):
        latent_id, _ = state.latent(request.query.get("latent", "0"))
        box, out = region_request(request.query, state.renderer.pyramid, state.max_download)
        data = await in_thread(region_image, state, latent_id, box, out)
        name = f"infd_{latent_id}_{box[1]}_{box[0]}_{box[3]}_{box[2]}_{out[1]}x{out[0]}.png"
        return web.Response(body=data, content_type="image/png",
                            headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def generate(request):
        if state.generate is None:
            raise TileError("this viewer has no text model (start it with --unet)", 400)
        try:
            body = await request.json()
            prompt, seed = str(body.get("prompt", "")), int(body.get("seed", 0))
        except (ValueError, TypeError, AttributeError):
            raise TileError('expected JSON {"prompt": "...", "seed": N}', 400) from None
        if len(prompt) > MAX_PROMPT or not 0 <= seed < 2**63:
            raise TileError(f"prompt of at most {MAX_PROMPT} characters and a seed in [0, 2^63)", 400)
        z = await in_thread(state.generate, prompt, seed)
        return web.json_response({"id": state.add(z, f"{prompt!r}, seed {seed}")})

    async def record(request):
        r = state.renderer.record
        rendered = [x for x in r if not x.cached]
        return web.json_response({"tiles": [asdict(x) for x in r], "rendered": len(rendered),
                                  "first_tile_s": rendered[0].at if rendered else None})

    @web.middleware
    async def errors(request, handler):
        try:
            return await handler(request)
        except TileError as err:
            return web.json_response({"error": str(err)}, status=err.status)

    app = web.Application(middlewares=[errors], client_max_size=64 << 10)
    app.add_routes([
        web.get("/", lambda r: web.Response(body=page, content_type="text/html")),
        web.get("/viewer.js", lambda r: web.Response(body=script, content_type="application/javascript")),
        web.get("/api/info", info), web.get("/api/region", region), web.post("/api/generate", generate),
        web.get("/api/record", record),
        web.get(r"/tiles/{latent:\d{1,9}}/{level:\d{1,3}}/{x:\d{1,9}}_{y:\d{1,9}}.png", tile),
    ])
    return app


def serve(state: ViewerState, host: str, port: int, on_start: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM)."""
    from aiohttp import web

    async def started(_app):
        if on_start is not None:
            on_start(f"http://{host}:{port}/")

    app = build_app(state)
    app.on_startup.append(started)
    web.run_app(app, host=host, port=port, print=None, handle_signals=True)
