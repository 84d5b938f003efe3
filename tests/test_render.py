"""Tiled rendering: what holds for strictly local renderers, and what holds with GroupNorm."""
import pytest
import torch

from infd.models.renderers import CLIF, LIIF, RendererConfig
from infd.render import RenderOptions, render_tiles, render_whole


def clif(norm: str, hidden: int = 32) -> CLIF:
    return CLIF(16, RendererConfig(kind="clif", hidden=hidden, n_blocks=2, norm=norm)).eval()


@pytest.fixture
def phi():
    return torch.randn(1, 16, 64, 64)


@pytest.mark.slow
def test_local_clif_tiled_1024_equals_whole_render(phi):
    r = clif("pixel")
    tiled = render_tiles(r, phi, (1024, 1024), options=RenderOptions(tile=256, pad=8))
    with torch.no_grad():
        whole = render_whole(r, phi, (1024, 1024))
    assert tiled.shape == whole.shape == (1, 3, 1024, 1024)
    assert (tiled - whole).abs().max() < 1e-5


def test_local_clif_tiles_need_pad_at_least_the_receptive_radius(phi):
    r = clif("pixel")
    assert r.receptive_radius == 6
    with pytest.raises(ValueError, match="receptive radius"):
        render_tiles(r, phi, (512, 512), options=RenderOptions(pad=4))
    # And the radius is real: zero padding changes pixels near tile borders.
    with torch.no_grad():
        whole = render_whole(r, phi, (512, 512))
    r.receptive_radius = 0
    unpadded = render_tiles(r, phi, (512, 512), options=RenderOptions(pad=0))
    assert (unpadded - whole).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("size", [(700, 900), (1000, 333)])
def test_local_clif_non_square_and_partial_tiles(phi, size):
    r = clif("pixel")
    with torch.no_grad():
        whole = render_whole(r, phi, size)
    assert (render_tiles(r, phi, size, options=RenderOptions(tile=200, pad=6)) - whole).abs().max() < 1e-5


@pytest.mark.parametrize("norm", ["pixel", "group"])
def test_region_render_equals_crop_of_full_render(phi, norm):
    r = clif(norm)
    size = (768, 640)
    full = render_tiles(r, phi, size)
    for region in [(100, 37, 400, 600), (0, 0, 1, 1), (767, 639, 768, 640), (256, 256, 512, 512)]:
        top, left, bottom, right = region
        part = render_tiles(r, phi, size, region=region)
        assert torch.equal(part, full[:, :, top:bottom, left:right]), region


def test_group_norm_clif_single_tile_equals_whole_and_larger_renders_differ(phi):
    # GroupNorm statistics span the rendered grid: a render at the training patch size (one tile)
    # is exactly the whole render; beyond one tile, tiles normalise over their own window, so
    # tiled != whole. The paper renders in tiles of the training patch size for that reason.
    r = clif("group")
    with torch.no_grad():
        whole256 = render_whole(r, phi, (256, 256))
        whole512 = render_whole(r, phi, (512, 512))
    assert (render_tiles(r, phi, (256, 256), options=RenderOptions(tile=256)) - whole256).abs().max() < 1e-5
    assert (render_tiles(r, phi, (512, 512), options=RenderOptions(tile=256)) - whole512).abs().max() > 1e-4


@pytest.mark.parametrize("ensemble", [True, False])
def test_liif_is_pointwise_so_tiles_equal_whole(phi, ensemble):
    r = LIIF(16, RendererConfig(kind="liif", mlp_hidden=(32, 32), local_ensemble=ensemble)).eval()
    assert r.receptive_radius == 0
    with torch.no_grad():
        whole = render_whole(r, phi, (300, 300))
    assert (render_tiles(r, phi, (300, 300), options=RenderOptions(tile=64, pad=0)) - whole).abs().max() < 1e-5


def test_liif_local_ensemble_is_continuous_across_feature_cells(phi):
    # Two queries a hair apart on either side of a feature-cell border.
    border = -1 + 2 * 10 / 64
    coords = torch.tensor([[[[0.1, border - 1e-5], [0.1, border + 1e-5]]]])
    cells = torch.full_like(coords, 2 / 1024)
    jumps = {}
    for ensemble in (True, False):
        r = LIIF(16, RendererConfig(kind="liif", mlp_hidden=(32,), local_ensemble=ensemble)).eval()
        with torch.no_grad():
            out = r(phi, coords, cells)
        jumps[ensemble] = (out[..., 0, 0] - out[..., 0, 1]).abs().max().item()
    assert jumps[True] < 1e-3 and jumps[False] > 0.05, jumps


def test_region_outside_the_image_is_a_clear_error(phi):
    with pytest.raises(ValueError, match="inside the output"):
        render_tiles(clif("pixel"), phi, (100, 100), region=(0, 0, 101, 50))


@pytest.mark.parametrize("images", [1, 2])
@pytest.mark.parametrize("kind", ["group", "liif"])
def test_tiles_batched_into_one_call_equal_one_tile_per_call(kind, images):
    """Several same-shape windows per renderer call (options.batch_pixels), one image (phi viewed per
    window) or two (phi copied per window): the pixels of one tile per call, partial tiles included."""
    torch.manual_seed(1)
    r = clif("group") if kind == "group" else LIIF(16, RendererConfig(kind="liif", mlp_hidden=(16,))).eval()
    phi = torch.randn(images, 16, 16, 16)
    size, region = (200, 150), (40, 0, 200, 130)  # windows of several shapes: edges and partial tiles
    one = RenderOptions(tile=64, pad=6, batch_pixels=1)
    many = RenderOptions(tile=64, pad=6, batch_pixels=6 * 76 * 76 * images)
    for reg in (None, region):
        assert (render_tiles(r, phi, size, reg, one) - render_tiles(r, phi, size, reg, many)).abs().max() < 1e-5


def test_bf16_render_is_close_to_fp32_and_not_equal():
    r, phi = clif("group"), torch.randn(1, 16, 64, 64)
    fp32 = render_tiles(r, phi, (300, 300), options=RenderOptions(tile=128))
    bf16 = render_tiles(r, phi, (300, 300), options=RenderOptions(tile=128, precision="bf16"))
    assert bf16.dtype == torch.float32 and 0 < (bf16 - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_bad_render_options_are_clear_errors():
    with pytest.raises(ValueError, match="batch_pixels >= 1"):
        RenderOptions(batch_pixels=0)
