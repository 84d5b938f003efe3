"""Property tests: coords and cells of a crop of a downsampled image address exactly that region."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from infd.geometry import coord_grid, crop_coord_grid, crop_queries, query_nearest


@st.composite
def image_and_crop(draw):
    h, w = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    top = draw(st.integers(0, h - 1))
    left = draw(st.integers(0, w - 1))
    bottom = draw(st.integers(top + 1, h))
    right = draw(st.integers(left + 1, w))
    return (h, w), (top, left, bottom, right)


@settings(max_examples=200, deadline=None)
@given(image_and_crop())
def test_crop_coords_are_the_full_grid_sliced(case):
    size, (top, left, bottom, right) = case
    crop = crop_coord_grid(size, (top, left, bottom, right))
    full = coord_grid(size)
    assert torch.equal(crop, full[top:bottom, left:right])


@settings(max_examples=200, deadline=None)
@given(st.integers(16, 2000), st.integers(16, 2000), st.data())
def test_crop_of_downsampled_image_covers_exact_region_of_original(h0, w0, data):
    # Downsample the original (h0, w0) to (h, w), cut a crop; the crop's cells tile exactly the
    # original's region [top * h0 / h, bottom * h0 / h) x [left * w0 / w, right * w0 / w).
    h, w = data.draw(st.integers(1, h0)), data.draw(st.integers(1, w0))
    p = data.draw(st.integers(1, min(h, w)))
    top, left = data.draw(st.integers(0, h - p)), data.draw(st.integers(0, w - p))
    coords, cells = crop_queries((h, w), (top, left, top + p, left + p))
    lo = (coords - cells / 2)[0].amin(dim=(0, 1))
    hi = (coords + cells / 2)[0].amax(dim=(0, 1))
    to_orig = lambda c, n: (c + 1) / 2 * n  # noqa: E731  whole-image units -> original pixels
    assert abs(to_orig(lo[0], h0) - top * h0 / h) < 1e-3
    assert abs(to_orig(hi[0], h0) - (top + p) * h0 / h) < 1e-3
    assert abs(to_orig(lo[1], w0) - left * w0 / w) < 1e-3
    assert abs(to_orig(hi[1], w0) - (left + p) * w0 / w) < 1e-3
    # Neighbouring cells touch without gap or overlap.
    if p > 1:
        step = coords[0, 1, 0, 0] - coords[0, 0, 0, 0]
        assert torch.allclose(step, cells[0, 0, 0, 0], atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 12), st.integers(1, 12), st.data())
def test_crop_pixels_are_the_area_means_of_the_original_pixels_they_address(k, h, w, data):
    # Integer-factor area downsampling: each crop pixel must be the mean of exactly the original
    # pixels whose centres fall inside its cell.
    orig = torch.rand(1, 1, h * k, w * k, dtype=torch.float64)
    down = F.avg_pool2d(orig, k)
    top, left = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    bottom, right = data.draw(st.integers(top + 1, h)), data.draw(st.integers(left + 1, w))
    coords, cells = crop_queries((h, w), (top, left, bottom, right))
    orig_coords = coord_grid((h * k, w * k)).double()
    crop = down[0, 0, top:bottom, left:right]
    for i in range(bottom - top):
        for j in range(right - left):
            c, s = coords[0, i, j].double(), cells[0, i, j].double()
            inside = ((orig_coords - c).abs() < s / 2).all(-1)
            assert inside.sum() == k * k
            assert torch.allclose(orig[0, 0][inside].mean(), crop[i, j])


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 90), st.integers(1, 90))
def test_query_nearest_picks_the_cell_containing_the_query(fh, fw, oh, ow):
    feat = torch.arange(fh * fw, dtype=torch.float32).view(1, 1, fh, fw)
    coords, cells = crop_queries((oh, ow), (0, 0, oh, ow))
    q, rel, rel_cell = query_nearest(feat, coords, cells)
    iy, ix = q[0, 0].long() // fw, q[0, 0].long() % fw
    centre = torch.stack([-1 + (2 * iy + 1) / fh, -1 + (2 * ix + 1) / fw], -1)
    # The query lies inside (or on the border of) the chosen cell, and rel_coord measures it.
    assert ((coords[0] - centre).abs() <= torch.tensor([1 / fh, 1 / fw]) + 1e-6).all()
    assert torch.allclose(rel[0].permute(1, 2, 0), (coords[0] - centre) * torch.tensor([fh, fw]), atol=1e-5)
    assert rel.abs().max() <= 1 + 1e-5
    assert torch.allclose(rel_cell[0, :, 0, 0], torch.tensor([2 * fh / oh, 2 * fw / ow]))


def test_query_nearest_shift_moves_to_the_neighbour_cell():
    feat = torch.arange(16.0).view(1, 1, 4, 4)
    coords = torch.tensor([[[[-0.6, -0.6]]]])  # inside cell (0, 0), centre -0.75
    cells = torch.full_like(coords, 0.1)
    q, rel, _ = query_nearest(feat, coords, cells, shift=(0.5, 0.5))
    assert q.item() == 5.0  # cell (1, 1)
    assert torch.allclose(rel.flatten(), torch.tensor([(-0.6 + 0.25) * 4] * 2))
