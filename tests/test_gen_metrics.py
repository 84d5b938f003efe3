"""Generative metrics (infd/eval): Frechet distance, feature networks, pFID crops, CLIP score,
the real-statistics cache. Offline: every network here has random weights, and says so."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from infd.eval import stats_cache
from infd.eval.clip_score import ClipScoreConfig, ClipScorer, clip_metric_name, clip_score
from infd.eval.features import (INCEPTION_FILE, FeatureConfig, build_feature_extractor, feature_id, metric_suffix,
                                torchmetrics_fid)
from infd.eval.frechet import FeatureMoments, feature_stats, frechet_distance
from infd.eval.pfid import PATCHES, PFID_SIZE, crop, fid_name, pfid_crops, pfid_name, random_crop_box, real_square
from infd.image import pil_to_tensor
from tests.images import noise_image

METHODS = ("eigh", "sqrtm")


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("diagonal", [True, False])
def test_frechet_of_gaussians_matches_closed_form(method, diagonal):
    # Diagonal covariances, or covariances sharing eigenvectors Q (they commute):
    # d^2 = |mu1 - mu2|^2 + sum(a + b - 2 sqrt(a b)) over the eigenvalues a, b.
    rng = np.random.default_rng(1)
    q = np.eye(6) if diagonal else np.linalg.qr(rng.normal(size=(6, 6)))[0]
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert rel(frechet_distance(mu1, s1, mu2, s2, method=method), expected) < 1e-9
    assert abs(frechet_distance(mu1, s1, mu1, s1, method=method)) < 1e-9


def test_feature_stats_and_input_checks():
    feats = torch.randn(50, 5, dtype=torch.float64)
    mu, sigma = feature_stats(feats)
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (5,) and sigma.shape == (5, 5)
    np.testing.assert_allclose(mu, feats.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, torch.cov(feats.T, correction=1).numpy(), rtol=1e-10)
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(2), np.diag([1.0, np.nan]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


class _Identity(nn.Module):
    """A 'feature network' whose inputs already are the features: torchmetrics' hook, bare."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")  # clean-fid on SciPy 1.17
def test_frechet_on_random_features_equals_torchmetrics_torch_fidelity_and_clean_fid():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torchmetrics.image.fid import FrechetInceptionDistance

    gen = torch.Generator().manual_seed(3)
    mix = torch.randn(64, 64, generator=gen, dtype=torch.float64) / 8
    real = torch.randn(600, 64, generator=gen, dtype=torch.float64) @ mix
    fake = (torch.randn(600, 64, generator=gen, dtype=torch.float64) * 1.2 + 0.05) @ mix + 0.1
    (mu1, s1), (mu2, s2) = feature_stats(real), feature_stats(fake)
    ours = {m: frechet_distance(mu1, s1, mu2, s2, method=m) for m in METHODS}

    tm = FrechetInceptionDistance(feature=_Identity(64))
    tm.update(real, real=True)
    tm.update(fake, real=False)
    tfid = fid_statistics_to_metric(fid_features_to_statistics(real), fid_features_to_statistics(fake), verbose=False)
    theirs = {"torchmetrics": float(tm.compute()), "torch-fidelity": tfid["frechet_inception_distance"]}
    from cleanfid.fid import frechet_distance as clean_fid_distance  # a test dependency

    theirs["clean-fid"] = float(clean_fid_distance(mu1, s1, mu2, s2))
    for ours_value in ours.values():
        for value in theirs.values():
            assert rel(ours_value, value) < 1e-5, (ours, theirs)


def test_randinit_features_through_torchmetrics_hook_give_our_distance():
    extractor = build_feature_extractor(FeatureConfig(kind="randinit", dim=8, seed=1))
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(20, 3, 32, 32, generator=gen) * 2 - 1
    fake = (torch.rand(20, 3, 32, 32, generator=gen) * 2 - 1) * 0.5
    fr, ff = extractor(real), extractor(fake)
    ours = frechet_distance(*feature_stats(fr), *feature_stats(ff))
    metric = torchmetrics_fid(extractor)
    metric.update(real[:7], real=True)  # other batching: features do not depend on it
    metric.update(real[7:], real=True)
    metric.update(fake, real=False)
    assert rel(ours, float(metric.compute())) < 1e-5


def test_randinit_extractor_is_seeded_batch_independent_and_labelled():
    cfg = FeatureConfig(kind="randinit", dim=32, seed=5)
    a, b = build_feature_extractor(cfg), build_feature_extractor(cfg)
    other = build_feature_extractor(FeatureConfig(kind="randinit", dim=32, seed=6))
    images = torch.rand(3, 3, 40, 48) * 2 - 1
    fa = a(images)
    assert fa.shape == (3, 32) and fa.dtype == torch.float32
    assert torch.equal(fa, b(images))  # every rank builds the same net
    assert not torch.allclose(fa, other(images))
    torch.testing.assert_close(torch.cat([a(images[i:i + 1]) for i in range(3)]), fa, rtol=1e-5, atol=1e-6)
    assert metric_suffix(cfg) == "_randinit" and metric_suffix(FeatureConfig()) == ""
    assert metric_suffix(FeatureConfig(dim=768)) == "_d768"  # not pool3: not the standard FID
    assert feature_id(cfg) != feature_id(FeatureConfig(kind="randinit", dim=32, seed=6)) != feature_id(FeatureConfig())


def test_inception_without_weights_says_where_to_put_them_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(FileNotFoundError) as err:
        build_feature_extractor(FeatureConfig(kind="inception"), prefix="eval.features.")
    message = str(err.value)
    assert INCEPTION_FILE in message and str(tmp_path / "torch_home" / "hub" / "checkpoints") in message
    assert "eval.features.weights" in message and "randinit" in message
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE):
        build_feature_extractor(FeatureConfig(kind="inception", weights=str(tmp_path / "nowhere.pth")))


@pytest.mark.slow
def test_inception_loads_a_local_weights_file_randinit_weights(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with monkeypatch.context() as patch:  # a random-init state dict stands in for the TF Inception's
        patch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        state = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    torch.save(state, tmp_path / INCEPTION_FILE)
    extractor = build_feature_extractor(FeatureConfig(kind="inception", weights=str(tmp_path)))  # its folder
    feats = extractor(torch.rand(1, 3, 64, 48) * 2 - 1)
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all() and extractor.num_features == 2048
    torch.save({"net": SimpleNamespace(code="not a tensor")}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="plain state dict"):  # never unpickled the unsafe way
        build_feature_extractor(FeatureConfig(kind="inception", weights=str(tmp_path / "unsafe.pth")))


def test_pfid_crops_are_inside_keyed_by_seed_and_index():
    image = torch.rand(3, 1024, 1024) * 2 - 1
    for patch in PATCHES:
        boxes = [random_crop_box(1024, patch, seed=7, index=i) for i in range(40)]
        for top, left in boxes:
            assert 0 <= top <= 1024 - patch and 0 <= left <= 1024 - patch
        assert boxes == [random_crop_box(1024, patch, seed=7, index=i) for i in range(40)]  # any batching
        if patch < 1024:
            assert len(set(boxes)) > 30  # differ across indices
            assert boxes != [random_crop_box(1024, patch, seed=8, index=i) for i in range(40)]
        box = boxes[3]
        patch_img = crop(image, box, patch)
        assert patch_img.shape == (3, patch, patch)
        assert torch.equal(patch_img, image[:, box[0]:box[0] + patch, box[1]:box[1] + patch])
    assert random_crop_box(1024, 1024, seed=7, index=5) == (0, 0)
    crops = pfid_crops(image, seed=7, index=5)  # the 1024 render -> one crop per P
    assert {p: c.shape[-1] for p, c in crops.items()} == {256: 256, 512: 512, 1024: 1024}
    assert torch.equal(crops[1024], image)
    with pytest.raises(ValueError):
        pfid_crops(torch.zeros(3, 512, 1024), seed=0, index=0)
    with pytest.raises(ValueError):
        crop(image, (900, 0), 256)
    assert [pfid_name(p) for p in PATCHES] == ["pfid_256_1k", "pfid_512_1k", "pfid_1k_1k"]
    assert pfid_name(512, "_randinit") == "pfid_512_1k_randinit"
    assert fid_name() == "fid_256" and fid_name(suffix="_randinit") == "fid_256_randinit"


def test_real_images_below_1024_are_skipped():
    small, big, exact = noise_image(1200, 900, seed=1), noise_image(1100, 1300, seed=2), noise_image(1024, 1024, seed=3)
    assert real_square(small, PFID_SIZE) is None  # skipped (eval-gen counts it: tests/test_eval_gen.py)
    square = real_square(big, PFID_SIZE)
    assert square.shape == (3, 1024, 1024) and square.min() >= -1 and square.max() <= 1
    assert torch.equal(real_square(exact, PFID_SIZE), pil_to_tensor(exact))  # already 1024: untouched
    assert real_square(small, 256).shape == (3, 256, 256)  # FID-256 alone would keep it


@pytest.fixture(scope="module")
def clip_randinit():
    return ClipScorer(ClipScoreConfig(model="ViT-S-32", pretrained=None, seed=0))  # smallest OpenCLIP config


def test_clip_score_randinit_is_per_pair_in_range(clip_randinit):
    images = torch.rand(3, 3, 64, 80) * 2 - 1
    prompts = ["a red square", "a photo of a mountain", "two cats on a sofa"]
    scores = clip_score(clip_randinit, images, prompts)
    assert scores.shape == (3,) and (scores >= 0).all() and (scores <= 100).all()
    with torch.no_grad():  # all image x prompt cosines, computed separately
        img = clip_randinit.model.encode_image(clip_randinit.preprocess(images), normalize=True)
        txt = clip_randinit.model.encode_text(clip_randinit.tokenizer(prompts), normalize=True)
    table = img @ txt.T
    torch.testing.assert_close(clip_randinit.cosine(images, prompts), table.diagonal(), rtol=1e-4, atol=1e-6)
    shuffled = [prompts[i] for i in (2, 0, 1)]
    cos_shuffled = clip_randinit.cosine(images, shuffled)
    torch.testing.assert_close(cos_shuffled, table[torch.arange(3), torch.tensor([2, 0, 1])], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(cos_shuffled, table.diagonal())
    torch.testing.assert_close(scores, 100 * table.diagonal().clamp(min=0), rtol=1e-4, atol=1e-4)
    assert clip_metric_name(ClipScoreConfig(pretrained=None)) == "clip_score_randinit"
    assert clip_metric_name(ClipScoreConfig()) == "clip_score"


def test_clip_randinit_is_seeded_and_leaves_global_rng_alone(clip_randinit):
    before = torch.get_rng_state()
    again = ClipScorer(ClipScoreConfig(model="ViT-S-32", pretrained=None, seed=0))
    assert torch.equal(torch.get_rng_state(), before)
    for (name, p), (_, q) in zip(clip_randinit.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), name


class _TorchmetricsAdapter(nn.Module):
    """Our OpenCLIP model behind the interface torchmetrics' clip_score calls (an HF CLIPModel's)."""

    def __init__(self, scorer, sign: float):
        super().__init__()
        self.scorer, self.sign, self.config = scorer, sign, SimpleNamespace()

    def get_image_features(self, pixel_values):
        return self.scorer.model.encode_image(pixel_values)

    def get_text_features(self, input_ids, attention_mask):
        return self.sign * self.scorer.model.encode_text(input_ids)

    def processor(self, images=None, text=None, **kwargs):
        if images is not None:
            return {"pixel_values": self.scorer.preprocess(torch.stack(images))}
        tokens = self.scorer.tokenizer(text)
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}


def test_clip_score_formula_matches_torchmetrics(clip_randinit):
    # torchmetrics gives max(100 cos, 0) for one pair; with the text embedding negated it gives
    # max(-100 cos, 0), so the difference is 100 cos: our cosine and clamp are both checked.
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    images, prompts = torch.rand(2, 3, 48, 48) * 2 - 1, ["a dog", "a city at night"]
    ours = clip_randinit(images, prompts)
    raw = 100 * clip_randinit.cosine(images, prompts)
    for i in range(2):
        tm = {}
        for sign in (1.0, -1.0):
            adapter = _TorchmetricsAdapter(clip_randinit, sign)
            tm[sign] = float(tm_clip_score(images[i:i + 1], [prompts[i]], lambda a=adapter: (a, a.processor)))
        assert abs(tm[1.0] - float(ours[i])) < 1e-3
        assert abs((tm[1.0] - tm[-1.0]) - float(raw[i])) < 1e-3


def test_cache_key_is_filename_safe_readable_and_exact():
    key_of = stats_cache.cache_key
    key = key_of("s3://bucket/laion 2b/{000..099}.tar", "pfid_256_1k", 50000, "inception-d2048")
    assert all(c.isalnum() or c in "._-" for c in key), key
    assert "pfid-256-1k" in key and "n50000" in key and "inception" in key
    assert key == key_of("s3://bucket/laion 2b/{000..099}.tar", "pfid_256_1k", 50000, "inception-d2048")
    others = {key_of("s3://bucket/laion_2b/{000..099}.tar", "pfid_256_1k", 50000, "inception-d2048"),  # same readable
              key_of("s3://bucket/laion 2b/{000..099}.tar", "pfid_512_1k", 50000, "inception-d2048"),
              key_of("s3://bucket/laion 2b/{000..099}.tar", "fid_256", 50000, "inception-d2048"),
              key_of("s3://bucket/laion 2b/{000..099}.tar", "pfid_256_1k", 5000, "inception-d2048"),
              key_of("s3://bucket/laion 2b/{000..099}.tar", "pfid_256_1k", 50000, "randinit-v1-d2048-s0")}
    assert key not in others and len(others) == 5


def test_load_or_compute_computes_once_and_writes_atomically(tmp_path):
    calls = []
    mu, sigma = np.arange(3.0), np.eye(3) * 2

    def compute():
        calls.append(1)
        return mu, sigma, {"used": 10, "skipped": 2}

    key = stats_cache.cache_key("photos", "pfid_256_1k", 10, "randinit-v1-d3-s0")
    first = stats_cache.load_or_compute(tmp_path / "cache", key, compute)
    second = stats_cache.load_or_compute(tmp_path / "cache", key, compute)
    assert len(calls) == 1
    for got in (first, second):
        np.testing.assert_array_equal(got[0], mu)
        np.testing.assert_array_equal(got[1], sigma)
        assert got[2]["used"] == 10 and got[2]["skipped"] == 2 and got[2]["key"] == key
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"{key}.json", f"{key}.npz"]  # no temp files
    assert json.loads((tmp_path / "cache" / f"{key}.json").read_text())["dim"] == 3

    (tmp_path / "cache" / f"{key}.json").unlink()  # an entry without its meta is incomplete: recomputed
    stats_cache.load_or_compute(tmp_path / "cache", key, lambda: (mu, sigma))
    assert stats_cache.load(tmp_path / "cache", key) is not None

    with pytest.raises(ZeroDivisionError):  # a computation that dies leaves no entry
        stats_cache.load_or_compute(tmp_path / "cache", "other", lambda: 1 / 0)
    assert stats_cache.load(tmp_path / "cache", "other") is None



def test_moment_sums_give_the_statistics_of_the_stacked_features():
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(300, 16, generator=gen, dtype=torch.float64) * 3 + 2
    moments = FeatureMoments(16)
    for part in feats.split([7, 100, 193]):  # any split into batches (ranks) adds up to the same
        moments.add(part)
    mu, sigma = moments.stats()
    ref_mu, ref_sigma = feature_stats(feats)
    assert moments.count == 300
    np.testing.assert_allclose(mu, ref_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, ref_sigma, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureMoments(4).stats()


def test_batches_of_ranks_cover_each_index_once_and_stop_at_the_same_round():
    from infd.eval.real_set import EvaluationStopped, batches_of_rank, stoppable_batches

    count, size, world = 7, 2, 3
    mine = [batches_of_rank(count, size, r, world) for r in range(world)]
    assert sorted(i for batches in mine for b in batches for i in b) == list(range(count))
    assert mine[0] == [[0, 1], [6]] and mine[2] == [[4, 5]]  # the same batches at any world size
    for rank in range(world):
        calls = []
        got = list(stoppable_batches(count, size, rank, world, lambda: calls.append(1) and False))
        assert got == mine[rank] and len(calls) == 2  # every rank checks once per round, batch or not
        stop_at = iter([False, True])
        seen = []
        with pytest.raises(EvaluationStopped):
            for batch in stoppable_batches(count, size, rank, world, lambda: next(stop_at)):
                seen.append(batch)
        assert seen == mine[rank][:1]
