"""The one resampling rule (Lanczos through infd.image.resize_antialiased) and the accuracy of the
loader's reduced-size JPEG decode against a full decode resampled with that same rule."""
import io

import numpy as np
import pytest
from PIL import Image

from infd.data.transforms import DECODE_OVERSAMPLE, PatchConfig, make_patch_sample, plan_patch
from infd.image import resize_antialiased

P, E, R_MAX = 256, 256, 1024


def photo_jpeg(name: str, size: tuple[int, int], texture: str | None = None, **save) -> bytes:
    """A scikit-image photo upscaled to `size` (W, H), optionally with a fine luminance texture
    (a scikit-image texture tiled at its native scale), as a q90 JPEG (4:2:0)."""
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.BICUBIC)
    if texture is not None:
        tex = getattr(skimage.data, texture)().astype(np.float32) / 255
        reps = (-(-size[1] // tex.shape[0]), -(-size[0] // tex.shape[1]))
        tex = np.tile(tex, reps)[: size[1], : size[0], None]
        img = Image.fromarray(np.clip(np.asarray(img) * (0.75 + 0.5 * tex), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


# Short sides just above 4 x 2 x 256 (a 1/2 decode's worst case for r = 256 with the faithful GT, and
# 2 x 3 x 256 for the encoder input), odd sizes (a partial last decoded pixel), smooth and textured content.
PHOTOS = {
    "astronaut": ("astronaut", (2400, 2400), None),
    "coffee+gravel": ("coffee", (3105, 2070), "gravel"),
    "chelsea+grass": ("chelsea", (3083, 2051), "grass"),
}


@pytest.fixture(scope="module")
def photos():
    return {key: photo_jpeg(*args) for key, args in PHOTOS.items()}


def reference(data: bytes, plan, cfg: PatchConfig) -> tuple[np.ndarray, np.ndarray]:
    """The plan from a full decode: the square resized to r, the P x P crop; the square resized to E."""
    full = Image.open(io.BytesIO(data)).convert("RGB")
    (top, left, side), r, (ct, cl) = plan.square, plan.r, plan.crop
    def box(t, win_left, b, rr):  # a window of the r x r image -> PIL box in the full image
        return (left + side * win_left / r, top + side * t / r, left + side * rr / r, top + side * b / r)

    window = box(ct, cl, ct + cfg.patch_size, cl + cfg.patch_size)
    gt = resize_antialiased(full, (cfg.patch_size,) * 2, box=window, reducing_gap=None)  # the exact filter
    enc = resize_antialiased(full, (cfg.encoder_size,) * 2, box=box(0, 0, r, r), reducing_gap=None)
    return np.asarray(gt, dtype=np.int16), np.asarray(enc, dtype=np.int16)


def seeds_with_r(size: tuple[int, int], cfg: PatchConfig, r: int, count: int) -> list[int]:
    """Seeds whose plan draws this r (r = r_max is one draw in ~770)."""
    found = (s for s in range(200_000) if plan_patch(*size, cfg, np.random.default_rng(s)).r == r)
    return [next(found) for _ in range(count)]


def fast_errors(data: bytes, r: int, **patch) -> dict[str, tuple[float, int]]:
    """Worst (mean, max) abs difference, 0-255 levels, of make_patch_sample's gt and enc to the
    same plans computed from a full decode with the exact Lanczos."""
    cfg = PatchConfig(patch_size=P, r_max=R_MAX, encoder_size=E, **patch)
    size = Image.open(io.BytesIO(data)).size
    errors = {"gt": [], "enc": []}
    for seed in seeds_with_r(size, cfg, r, 2):
        fast = make_patch_sample(data, cfg, np.random.default_rng(seed))
        plan = plan_patch(*size, cfg, np.random.default_rng(seed))
        assert fast["r"] == plan.r == r and fast["square"] == plan.square
        for key, ref in zip(("gt", "enc"), reference(data, plan, cfg)):
            diff = np.abs(fast[key].permute(1, 2, 0).numpy().astype(np.int16) - ref)
            errors[key].append((diff.mean(), diff.max()))
    return {k: (max(e[0] for e in v), max(e[1] for e in v)) for k, v in errors.items()}


@pytest.mark.parametrize("r", [P, R_MAX])
@pytest.mark.parametrize("photo", list(PHOTOS))
def test_reduced_decode_matches_full_decode_with_the_exact_filter(photos, photo, r):
    default = fast_errors(photos[photo], r)
    faithful = fast_errors(photos[photo], r, gt_decode_oversample=4.0)
    for name, errs in (("default", default), ("gt_decode_oversample=4", faithful)):
        print(f"{photo} r={r} {name}: " + ", ".join(f"{k} mean {m:.3f} max {x}" for k, (m, x) in errs.items()))
    for mean, peak in (default["enc"], faithful["enc"], faithful["gt"]):
        # the encoder input (one rule everywhere, from whichever decode), and the GT as the
        # official code makes it when asked for: within 1 / 4 levels of the exact filter
        assert mean <= 1.0 and peak <= 4, (mean, peak)
    assert default["gt"][0] <= 4.0  # the fast default GT: libjpeg's DCT scaling does the downsampling


def test_the_reduced_decode_is_used_where_the_oversampling_allows(photos):
    # The accuracy test above must exercise the reduced path: a 2070-px square is decoded at 1/2
    # for the encoder input (1035 px >= DECODE_OVERSAMPLE x 256) and for a GT of r <= 1035.
    from infd.data import transforms

    data = photos["coffee+gravel"]
    img = transforms.open_image(data)
    assert transforms._dct_scale(img, 2070, 256, PatchConfig(), DECODE_OVERSAMPLE) == 2
    assert transforms._dct_scale(img, 2070, 1024, PatchConfig(), 1.0) == 2
    assert transforms._dct_scale(img, 2070, 1024, PatchConfig(), 4.0) == 1
    assert transforms._dct_scale(img, 2070, 256, PatchConfig(fast_decode=False), DECODE_OVERSAMPLE) == 1


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_reduced_decode_of_exif_rotated_jpegs_stays_aligned(orientation):
    # Rotations put the decode's partial last pixel first on some axes: every position shifts by
    # its missing part (ignoring that misplaces the crop by up to d - 1 pixels: errors of 10-40).
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = photo_jpeg("chelsea", (1051, 841), exif=exif.tobytes())
    kw = dict(patch_size=64, r_max=96, encoder_size=64)  # 841 / 2 >= 4 x 96: decoded at 1/2
    for seed in range(3):
        fast = make_patch_sample(data, PatchConfig(**kw), np.random.default_rng(seed))
        full = make_patch_sample(data, PatchConfig(**kw, fast_decode=False), np.random.default_rng(seed))
        assert fast["size"] == full["size"] == ((841, 1051) if orientation in (6, 8) else (1051, 841))
        for key in ("gt", "enc"):
            diff = (fast[key].int() - full[key].int()).abs()
            assert diff.float().mean() <= 1.0 and diff.max() <= 4, (orientation, key, diff.max())


def lanczos_two_pass(img: Image.Image, size: tuple[int, int], box) -> np.ndarray:
    """PIL Lanczos, horizontal pass over the whole image, then vertical: the rule by definition."""
    (h, w), (x0, y0, x1, y1) = size, box
    rows = img.resize((w, img.height), Image.LANCZOS, box=(x0, 0, x1, img.height))
    return np.asarray(rows.resize((w, h), Image.LANCZOS, box=(0, y0, w, y1)))


def test_resize_antialiased_is_two_pass_lanczos_both_ways_and_a_box_is_a_window_of_the_whole_resize():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 300, 3), dtype=np.uint8))
    cases = [((90, 120), (0, 0, 300, 400)), ((800, 600), (0, 0, 300, 400)), ((64, 48), (10.5, 20.25, 200.5, 300.75))]
    for size, box in cases:
        assert np.array_equal(np.asarray(resize_antialiased(img, size, box)), lanczos_two_pass(img, size, box))
    whole = np.asarray(resize_antialiased(img, (200, 150)))
    window = np.asarray(resize_antialiased(img, (32, 48), box=(40 * 2, 50 * 2, 88 * 2, 82 * 2)))
    assert np.array_equal(window, whole[50:82, 40:88])


def test_loader_encoder_input_is_the_latent_cache_one_away_from_the_squares_cut_edges():
    # data_prep.encode_latents / infd.eval.reconstruction / infd upsample: centre square, then resize_antialiased.
    # The loader resamples the square's box in the whole image: identical except within the
    # kernel's reach (3 px at 256) of the two edges where the square is cut out of a wider image.
    from infd.eval.reconstruction import centre_square

    data = photo_jpeg("coffee", (900, 600))
    full = Image.open(io.BytesIO(data)).convert("RGB")
    cache = np.asarray(resize_antialiased(centre_square(full), (E, E)), dtype=np.int16)
    for fast in (False, True):
        s = make_patch_sample(data, PatchConfig(square="center", fast_decode=fast), np.random.default_rng(0))
        diff = np.abs(s["enc"].permute(1, 2, 0).numpy().astype(np.int16) - cache)
        assert diff[:, 3:-3].max() == 0 and diff.mean() < 0.05  # 900 / 2 < 4 x 256: full decode
