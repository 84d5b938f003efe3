"""The `infd view` web server (aiohttp): a deep-zoom page over latents, every tile rendered on request.

Routes (nothing maps a request path to a file: the page and its script are read from this package at start;
tile URLs carry this run's token, so a browser never shows a tile cached from another run):

    GET  /                                      the page
    GET  /viewer.js                             its script
    GET  /api/info                              canvas, tile size, levels, the latents, the run token, generate?
    GET  /tiles/{run}/{latent}/{level}/{x}_{y}.png   one tile (404 outside the pyramid)
    GET  /api/region?latent=&x0=&y0=&x1=&y1=&w=&h=   a box of the finest level (canvas pixels) rendered at w x h
    POST /api/generate  {"prompt": str, "seed": int} a new latent from the UNet (when there is one), one at a time
    GET  /api/record                            every tile served: level, x, y, seconds, cached; first-tile time

Renders run in a thread pool; `TileRenderer` bounds how many at once (region downloads take one of its slots,
one download at a time). A request the server cannot answer gets a 4xx with a one-line reason, and the server
goes on. Against other web pages in the same browser: /api/generate takes only application/json (a cross-site
form cannot send it without a CORS preflight, which is never granted), and a server bound to a loopback
address answers only requests whose Host is a loopback name (DNS rebinding).
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
MAX_LATENTS = 256  # drawn from the page; then the server says to restart
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
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
    text: bool = False  # generate takes the prompt (a text-conditioned UNet); else only the seed
    max_download: int = 4096 * 4096  # pixels of one /api/region answer (float32 render: 200 MB)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def latent(self, key: str) -> tuple[int, Latent]:
        if not (key.isascii() and key.isdigit()) or len(key) > 9 or int(key) >= len(self.latents):
            raise TileError(f"latent {key!r}: there are {len(self.latents)} (ids 0..{len(self.latents) - 1})")
        return int(key), self.latents[int(key)]

    def add(self, z: Tensor, label: str) -> int:
        with self.lock:
            if len(self.latents) >= MAX_LATENTS:
                raise TileError(f"{MAX_LATENTS} latents on show: restart infd view for more", 400)
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
    with state.renderer.slot():
        image = state.renderer.render(latent_id, state.latents[latent_id].z, size, region)
    return png_bytes(image[0])


def build_app(state: ViewerState, loopback_only: bool = True):
    """The aiohttp application; loopback_only: refuse requests whose Host is not a loopback name."""
    import secrets

    from aiohttp import web

    run = secrets.token_hex(4)
    one_download, one_generate = asyncio.Semaphore(1), asyncio.Semaphore(1)

    page = resources.files("infd.viewer").joinpath("static/index.html").read_bytes()
    script = resources.files("infd.viewer").joinpath("static/viewer.js").read_bytes()

    async def in_thread(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def tile(request):
        m = request.match_info
        if m["run"] != run:
            raise TileError("a tile of another run of infd view: reload the page")
        latent_id, latent = state.latent(m["latent"])

        def gone() -> bool:  # the page dropped the tile (it left the view) before a render slot came
            return request.transport is None or request.transport.is_closing()

        data = await in_thread(state.renderer.tile_png, latent_id, latent.z, int(m["level"]), int(m["x"]),
                               int(m["y"]), gone)
        if data is None:
            raise TileError("the request was cancelled", 499)
        return web.Response(body=data, content_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def info(request):
        p = state.renderer.pyramid
        return web.json_response({"canvas": list(p.canvas), "tile": p.tile, "max_level": p.max_level,
                                  "latents": [{"id": i, "label": x.label} for i, x in enumerate(state.latents)],
                                  "run": run, "generate": state.generate is not None, "text": state.text,
                                  "max_download": state.max_download})

    async def region(request):
        latent_id, _ = state.latent(request.query.get("latent", "0"))
        box, out = region_request(request.query, state.renderer.pyramid, state.max_download)
        async with one_download:
            data = await in_thread(region_image, state, latent_id, box, out)
        name = f"infd_{latent_id}_{box[1]}_{box[0]}_{box[3]}_{box[2]}_{out[1]}x{out[0]}.png"
        return web.Response(body=data, content_type="image/png",
                            headers={"Content-Disposition": f'attachment; filename="{name}"'})

    async def generate(request):
        if state.generate is None:
            raise TileError("this viewer has no UNet to draw from (start it with --unet)", 400)
        if request.content_type != "application/json":
            raise TileError("expected Content-Type: application/json", 415)
        prompt, seed = generate_request(await request.read())
        if one_generate.locked():
            raise TileError("a sample is being drawn: wait for it", 429)
        async with one_generate:
            z = await in_thread(state.generate, prompt, seed)
        label = f"{prompt!r}, seed {seed}" if state.text else f"seed {seed}"
        return web.json_response({"id": state.add(z, label)})

    async def record(request):
        r = state.renderer.record
        rendered = [x for x in r if not x.cached]
        return web.json_response({"tiles": [asdict(x) for x in r], "rendered": len(rendered),
                                  "first_tile_s": rendered[0].at if rendered else None})

    @web.middleware
    async def errors(request, handler):
        try:
            if loopback_only and request.host.rsplit(":", 1)[0] not in LOOPBACK_HOSTS:
                raise TileError(f"Host {request.host!r}: this server answers loopback names only", 421)
            return await handler(request)
        except TileError as err:
            return web.json_response({"error": str(err)}, status=err.status)

    async def index(request):
        return web.Response(body=page, content_type="text/html")

    async def viewer_js(request):
        return web.Response(body=script, content_type="application/javascript")

    app = web.Application(middlewares=[errors], client_max_size=64 << 10)
    app.add_routes([
        web.get("/", index), web.get("/viewer.js", viewer_js),
        web.get("/api/info", info), web.get("/api/region", region), web.post("/api/generate", generate),
        web.get("/api/record", record),
        web.get(r"/tiles/{run:[0-9a-f]{8}}/{latent:\d{1,9}}/{level:\d{1,3}}/{x:\d{1,9}}_{y:\d{1,9}}.png", tile),
    ])
    return app


def generate_request(body: bytes) -> tuple[str, int]:
    """(prompt, seed) of a /api/generate body, checked."""
    import json

    try:
        data = json.loads(body)
        prompt, seed = data.get("prompt", ""), data.get("seed", 0)
    except (ValueError, AttributeError):
        raise TileError('expected JSON {"prompt": "...", "seed": N}', 400) from None
    if not isinstance(prompt, str) or len(prompt) > MAX_PROMPT or not isinstance(seed, int) \
            or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise TileError(f"expected a prompt of at most {MAX_PROMPT} characters and an integer seed in [0, 2^63)", 400)
    return prompt, seed


def serve(state: ViewerState, host: str, port: int, on_start: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM); bound to a loopback address, only loopback Host names."""
    from aiohttp import web

    async def started(_app):
        if on_start is not None:
            on_start(f"http://{host}:{port}/")

    app = build_app(state, loopback_only=host in LOOPBACK_HOSTS)
    app.on_startup.append(started)
    web.run_app(app, host=host, port=port, print=None, handle_signals=True)
