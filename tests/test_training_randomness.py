"""Per-sample randomness keyed by (seed, step, global sample index), and the paper-fidelity
switches of the bottleneck and the diffusion config."""
import pytest
import torch

from infd.config import ConfigError, from_mapping
from infd.diffusion.schedule import DiffusionConfig, build_schedule, training_loss
from infd.keyed_random import KeyedRandom, global_batch_indices
from infd.models.bottleneck import Bottleneck, BottleneckConfig, VectorQuantizer


def test_draws_depend_on_the_sample_not_on_how_the_batch_is_split():
    whole = KeyedRandom(3, 7, range(4))
    halves = [KeyedRandom(3, 7, global_batch_indices(0, r, 2, 2)) for r in (0, 1)]
    assert torch.equal(whole.randn((2, 5), "noise"), torch.cat([h.randn((2, 5), "noise") for h in halves]))
    assert torch.equal(whole.randint(1000, "t"), torch.cat([h.randint(1000, "t") for h in halves]))
    # Different purposes, steps and samples draw differently.
    assert not torch.equal(whole.rand("a"), whole.rand("b"))
    assert not torch.equal(whole.rand("a"), KeyedRandom(3, 8, range(4)).rand("a"))
    assert len(set(whole.randint(10**9, "t").tolist())) == 4


def test_global_batch_indices_follow_the_synthetic_layout():
    # micro-batch m of the step, rank r of W, batch B: positions (m * W + r) * B ...
    assert global_batch_indices(0, 1, 2, 3) == [3, 4, 5]
    assert global_batch_indices(1, 0, 2, 3) == [6, 7, 8]


def test_diffusion_loss_of_a_split_batch_equals_the_whole():
    schedule = build_schedule(DiffusionConfig())
    x0 = torch.randn(4, 3, 8, 8)
    model = lambda x, t: x * 0.5 + t.view(-1, 1, 1, 1) * 1e-3  # noqa: E731
    whole, t = training_loss(model, schedule, x0, KeyedRandom(0, 1, range(4)))
    parts = [training_loss(model, schedule, x0[2 * r:2 * r + 2], KeyedRandom(0, 1, global_batch_indices(0, r, 2, 2)))
             for r in (0, 1)]
    assert torch.allclose(whole, (parts[0][0] + parts[1][0]) / 2, rtol=1e-6)
    assert torch.equal(t, torch.cat([p[1] for p in parts]))


def test_kl_sample_is_keyed_per_sample():
    torch.manual_seed(0)
    bott = Bottleneck(BottleneckConfig(kind="kl", embed_dim=3), z_channels=3).train()
    h = torch.randn(4, 6, 6, 6)  # encoder output: mean and log-variance channels
    whole = bott(h, KeyedRandom(0, 2, range(4))).z
    split = torch.cat([bott(h[:2], KeyedRandom(0, 2, [0, 1])).z, bott(h[2:], KeyedRandom(0, 2, [2, 3])).z])
    assert torch.allclose(whole, split, atol=1e-6)
    assert not torch.allclose(whole, bott(h, KeyedRandom(0, 3, range(4))).z)  # the next step draws anew


def vq_grads(legacy: bool):
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 3, beta=0.25, legacy=legacy)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    vq(z)[1].backward()
    return vq, z, z.grad, vq.codebook.weight.grad


def test_vq_legacy_form_pulls_the_encoder_four_times_harder():
    """legacy (taming legacy=True, the paper's code): mean((sg(zq) - z)^2) + beta * mean((zq - sg(z))^2)."""
    vq, z, dz_legacy, dbook_legacy = vq_grads(legacy=True)
    _, _, dz, dbook = vq_grads(legacy=False)
    unit = 2 * (z.detach() - vq.lookup(vq.codes(z.detach()))) / z.numel()  # d mean((z - zq)^2) / dz
    assert torch.allclose(dz_legacy, unit, atol=1e-7)  # the encoder term has weight 1
    assert torch.allclose(dz_legacy, 4 * dz, atol=1e-7)  # 1 / beta times the other form's
    assert torch.allclose(dbook_legacy, 0.25 * dbook, atol=1e-7)  # and the codebook beta times


def test_latent_scale_is_auto_or_a_positive_number():
    assert from_mapping(DiffusionConfig, {}).latent_scale == "auto"
    assert from_mapping(DiffusionConfig, {"latent_scale": 1}).latent_scale == 1.0
    for bad in ("automatic", -1.0):
        with pytest.raises(ConfigError, match="latent_scale"):
            from_mapping(DiffusionConfig, {"latent_scale": bad})
