"""`infd view` (infd/viewer/): a real server process, a real headless Chromium on its page.

The browser check needs playwright and a chromium on PATH; `make test` installs the browser with apt when it
runs as root, so there (CI) a missing browser fails the test instead of skipping it."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from infd.viewer.tiles import Pyramid
from tests.s3_server import free_port
from tests.training import ROOT, env

CANVAS = (2048, 2048)  # levels 0..3


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from infd.models import NeuralFieldAutoencoder
    from tests.exports import save_ae
    from tests.test_models import tiny_cfg

    root = tmp_path_factory.mktemp("viewer")
    torch.manual_seed(0)  # an 8 x 8 latent, a narrow renderer: a tile in tens of milliseconds
    cfg = tiny_cfg(net={"resolution": 32}, renderer={"hidden": 8}, bottleneck={"kind": "none"})
    save_ae(NeuralFieldAutoencoder(cfg).eval(), root / "ae")
    torch.save(torch.randn(2, 3, 8, 8), root / "z.pt")
    port = free_port()
    cmd = [sys.executable, "-m", "infd.cli", "view", "--ae", str(root / "ae"), "--latents", str(root / "z.pt"),
           "--canvas", f"{CANVAS[1]}x{CANVAS[0]}", "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            get(url + "api/info")
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"infd view did not start:\n{proc.stdout.read()}")
            time.sleep(0.2)
    run = json.loads(get(url + "api/info")[1])["run"]
    yield url, root, run
    proc.terminate()  # SIGTERM, as a launcher stops it: a clean exit
    assert proc.wait(timeout=30) == 0, proc.stdout.read()


def test_bad_requests_answer_4xx_and_the_server_keeps_serving(server):
    url, _, run = server
    bad = [f"tiles/{run}/0/0/1_0.png",  # outside the canvas: level 0 is one tile
           f"tiles/{run}/0/3/8_0.png", f"tiles/{run}/0/9/0_0.png", f"tiles/{run}/0/-1/0_0.png",
           f"tiles/{run}/5/0/0_0.png", f"tiles/{run}/0/1/a_0.png", "tiles/0123abcd/0/0/0_0.png",  # another run's
           "tiles/../../../etc/passwd", "..%2f..%2fetc%2fpasswd", "static/../setup.py", "api/region?x0=0",
           "api/region?latent=%C2%B2&x0=0&y0=0&x1=4&y1=4&w=8&h=8",  # a digit that int() refuses
           "api/region?latent=0&x0=0&y0=0&x1=2048&y1=2048&w=100000&h=100000",  # an absurd size
           "api/region?latent=0&x0=0&y0=0&x1=4&y1=4&w=4096&h=4096",  # far finer than the canvas
           "api/region?latent=0&x0=10&y0=0&x1=5&y1=4&w=8&h=8"]
    for path in bad:
        status, body = get(url + path)
        assert 400 <= status < 500, (path, status)
        assert b"root:" not in body and b"setup(" not in body
    req = urllib.request.Request(url + "api/generate", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400  # no UNet behind this server
    req = urllib.request.Request(url + "api/info", headers={"Host": "attacker.example:80"})
    with pytest.raises(urllib.error.HTTPError) as err:  # DNS rebinding: a loopback server answers loopback names
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 421
    status, body = get(url + "api/info")
    assert status == 200 and json.loads(body)["max_level"] == 3


def test_a_served_tile_is_the_quantised_render_exactly(server):
    """A tile decoded from the server's PNG equals the 8-bit quantisation of render_tiles of the same latent at
    that level's size and box (the server renders with OMP_NUM_THREADS=1; so does this reference)."""
    from infd.export import load_export
    from infd.render import RenderOptions, render_tiles

    url, root, run = server
    ae, _ = load_export(root / "ae", "cpu")
    z = torch.load(root / "z.pt")[1:2]
    pyramid = Pyramid(CANVAS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for level, x, y in [(0, 0, 0), (2, 3, 1), (3, 7, 7)]:
            status, body = get(url + f"tiles/{run}/1/{level}/{x}_{y}.png")
            assert status == 200
            served = np.asarray(Image.open(io.BytesIO(body)))
            with torch.no_grad():
                ref = render_tiles(ae.renderer, ae.decode(z), pyramid.level_size(level),
                                   region=pyramid.box(level, x, y), options=RenderOptions())[0]
            quantised = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert served.shape == quantised.shape and np.array_equal(served, quantised), (level, x, y)
    finally:
        torch.set_num_threads(threads)


def _canvas_box(pyramid: Pyramid, tile: dict) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of a recorded tile in canvas pixels, and one tile's side there."""
    h, w = pyramid.level_size(tile["level"])
    top, left, bottom, right = pyramid.box(tile["level"], tile["x"], tile["y"])
    fy, fx = CANVAS[0] / h, CANVAS[1] / w
    return left * fx, top * fy, right * fx, bottom * fy


def _check_in_view(pyramid: Pyramid, tiles: list[dict], vp: dict) -> None:
    """Every tile intersects the viewport grown by one tile of its level; the finest level's the viewport."""
    for tile in tiles:
        assert tile["level"] <= vp["level"], (tile, vp)
        x0, y0, x1, y1 = _canvas_box(pyramid, tile)
        margin = 0 if tile["level"] == vp["level"] else pyramid.tile * CANVAS[1] / pyramid.level_size(tile["level"])[1]
        assert x0 < vp["x1"] + margin and x1 > vp["x0"] - margin and y0 < vp["y1"] + margin \
            and y1 > vp["y0"] - margin, (tile, vp)


def test_the_page_renders_only_tiles_in_view_as_it_zooms(server):
    from infd.viewer import browser

    reason = browser.missing()
    if reason:
        if os.geteuid() == 0:  # make test installs the browser as root: on CI this must run
            pytest.fail(f"the viewer's browser test cannot run: {reason}")
        pytest.skip(reason)
    url, _, _ = server
    pyramid = Pyramid(CANVAS)

    def record() -> list[dict]:
        return [t for t in json.loads(get(url + "api/record")[1])["tiles"] if t["latent"] == 0]

    with browser.open_page(url, 800, 600) as page:
        first = page.evaluate("window.viewer.viewport()")
        loaded = record()
        _check_in_view(pyramid, loaded, first)
        assert {t["level"] for t in loaded} == {0, first["level"]}
        vp = browser.zoom(page, 520, 260, 12.0)
        zoomed = record()[len(loaded):]
        assert vp["level"] == pyramid.max_level > first["level"]
        assert vp["x1"] - vp["x0"] < CANVAS[1] / 8  # a region, not the whole canvas
        finest = [t for t in zoomed if t["level"] == vp["level"]]
        assert finest and len(finest) <= 3 * 3  # 800 x 600 screen pixels at most 4 canvas pixels each
        _check_in_view(pyramid, zoomed, vp)
        page.keyboard.press("ArrowRight")  # keyboard panning moves the view and brings its tiles
        browser.wait_settled(page)
        assert page.evaluate("window.viewer.viewport()")["x0"] > vp["x0"]
        assert "download the visible region at 800 x" in page.inner_text("#download")


def test_drawing_from_the_page_checks_its_requests_and_draws_one_at_a_time(server):
    """/api/generate with a real (tiny, unconditional) UNet export, in process: malformed bodies, seeds that are
    not integers, another content type (a cross-site form) and another Host are refused; a good request adds
    a latent the page can show."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from infd.cli import build_parser
    from infd.cli.view import _generator
    from infd.models.unet import UNet, UNetConfig
    from infd.viewer.server import Latent, ViewerState, build_app
    from infd.viewer.tiles import TileRenderer
    from tests.exports import save_unet

    _, root, _ = server
    save_unet(UNet(UNetConfig(ch=32, ch_mult=(1,), attn_ds=(), head_channels=16)), root / "unet",
              autoencoder=str(root / "ae"))
    args = build_parser().parse_args(["view", "--unet", str(root / "unet"), "--steps", "2"])
    ae, generate, text = _generator(args, "cpu")
    state = ViewerState(TileRenderer(ae, Pyramid((512, 512))), [Latent(generate("", 0), "seed 0")], generate, text)

    async def exchange():
        async with TestClient(TestServer(build_app(state))) as client:
            statuses = []
            for body in ("{not json", '{"seed": 1e400}', '{"seed": "3"}', '{"seed": true}', '{"seed": -1}',
                         '{"prompt": 5}', '{"prompt": "%s"}' % ("x" * 1001), "[1, 2]"):
                res = await client.post("/api/generate", data=body, headers={"Content-Type": "application/json"})
                statuses.append(res.status)
            res = await client.post("/api/generate", data='{"seed": 3}', headers={"Content-Type": "text/plain"})
            statuses.append(res.status)
            res = await client.get("/api/info", headers={"Host": "example.com"})
            statuses.append(res.status)
            good = await client.post("/api/generate", json={"prompt": "", "seed": 3})
            body = await good.json()
            two = await asyncio.gather(*(client.post("/api/generate", json={"seed": s}) for s in (4, 5)))
            info = await (await client.get("/api/info")).json()
            return statuses + sorted(r.status for r in two), good.status, body, info

    statuses, status, body, info = asyncio.run(exchange())
    assert statuses == [400] * 8 + [415, 421] + [200, 429]  # the second of two at once waits its turn: refused
    assert status == 200 and body == {"id": 1}
    assert not text and not info["text"] and info["generate"]
    assert [x["label"] for x in info["latents"]][:2] == ["seed 0", "seed 3"] and len(info["latents"]) == 3
    assert not torch.equal(state.latents[0].z, state.latents[1].z)
