import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infd.config import from_mapping, load_mapping
from infd.geometry import crop_queries
from infd.models import AutoencoderConfig, NeuralFieldAutoencoder
from infd.models.bottleneck import VectorQuantizer

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(**overrides) -> AutoencoderConfig:
    raw = load_mapping(ROOT / "conf/model/cpu_tiny.yaml")
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return from_mapping(AutoencoderConfig, raw)


@pytest.mark.slow
def test_paper_config_matches_the_paper_through_the_cli():
    out = subprocess.run([sys.executable, "-m", "infd.cli", "describe", str(ROOT / "conf/model/infd_paper.yaml"),
                          "--json"], capture_output=True, text=True, check=True, cwd=ROOT)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    params = info["params"]
    assert abs(params["renderer"] / 2.7e6 - 1) < 0.05, params
    assert abs((params["decoder"] + params["renderer"]) / 35.7e6 - 1) < 0.05, params
    assert params["total"] == sum(params[k] for k in ("encoder", "bottleneck", "decoder", "renderer"))
    assert info["latent_shape"] == [3, 64, 64]
    assert info["phi_shape"] == [128, 256, 256]


@pytest.mark.slow
def test_describe_cli_names_a_bad_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("renderer:\n  kind: clf\n")
    out = subprocess.run([sys.executable, "-m", "infd.cli", "describe", str(bad)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 2 and "renderer.kind" in out.stderr


@pytest.mark.parametrize("kind", ["vq", "kl", "none"])
def test_bottlenecks_train_path_and_encode_decode_agree(kind):
    model = NeuralFieldAutoencoder(tiny_cfg(bottleneck={"kind": kind}))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    coords, cells = crop_queries((96, 96), (10, 20, 42, 52), batch=2)
    out = model(x, coords, cells)
    assert out.rgb.shape == (2, 3, 32, 32)
    assert out.phi.shape == (2, 32, 64, 64)
    assert out.bottleneck.loss.ndim == 0 and torch.isfinite(out.bottleneck.loss)
    z = model.encode(x)
    assert z.shape == (2, 3, 16, 16)
    model.eval()  # KL: eval uses the mean, so both paths see the same latent
    with torch.no_grad():
        phi_train_path = model.decoder(model.bottleneck(model.encoder(x)).z)
        # VQ straight-through z + (zq - z) rounds differently from zq by a few ulp.
        assert torch.allclose(model.decode(z), phi_train_path, atol=1e-4)
    (out.rgb.mean() + out.bottleneck.loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # gradient reaches the encoder


def test_vq_straight_through_and_usage_statistics():
    vq = VectorQuantizer(n_codes=4, dim=2, beta=0.25)
    vq.codebook.weight.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    z = torch.tensor([[0.1, 0.9], [0.2, 0.1]]).t().reshape(1, 2, 1, 2).requires_grad_()  # near codes 2 and 0
    zq, loss, stats = vq(z)
    assert torch.equal(vq.codes(z), torch.tensor([[[2, 0]]]))
    assert torch.allclose(zq, torch.tensor([[0.0, 0.0], [1.0, 0.0]]).reshape(1, 2, 1, 2))
    expected = 1.25 * ((z.detach() - zq.detach()) ** 2).mean()
    assert torch.allclose(loss, expected)
    zq.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # straight-through: identity gradient
    assert stats["vq/codes_used"] == 0.5 and torch.isclose(stats["vq/perplexity"], torch.tensor(2.0))


def test_vq_nearest_code_matches_brute_force_over_chunks():
    vq = VectorQuantizer(n_codes=300, dim=3, beta=0.25)
    vq.codebook.weight.data.normal_()
    z = torch.randn(2, 3, 50, 50)  # 5000 positions: more than one chunk
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    brute = torch.cdist(flat, vq.codebook.weight).argmin(1).view(2, 50, 50)
    assert (vq.codes(z) == brute).float().mean() > 0.999  # ties within float error only


def test_paper_decoder_and_renderer_run_on_a_small_latent():
    cfg = from_mapping(AutoencoderConfig, load_mapping(ROOT / "conf/model/infd_paper.yaml"))
    model = NeuralFieldAutoencoder(cfg).eval()
    with torch.no_grad():
        phi = model.decode(torch.randn(1, 3, 8, 8))
        assert phi.shape == (1, 128, 32, 32)
        coords, cells = crop_queries((48, 48), (0, 0, 48, 48))
        assert model.render(phi, coords, cells).shape == (1, 3, 48, 48)


def test_norm_groups_set_every_groupnorm_of_encoder_and_decoder():
    model = NeuralFieldAutoencoder(tiny_cfg(net={"norm_groups": 4}))
    norms = [m for part in (model.encoder, model.decoder) for m in part.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 4 for m in norms)
    # Groups that do not divide a width fall back to its largest divisor below them.
    model = NeuralFieldAutoencoder(tiny_cfg(net={"norm_groups": 24}))
    assert {m.num_groups for m in model.encoder.modules() if isinstance(m, torch.nn.GroupNorm)} == {16}
