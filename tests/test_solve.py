"""Guided sampling through differentiable region renders (infd/solve/, `infd solve`), on random-init tiny
models: the region render's gradient, the VQ straight-through path, the guided sampler's effect."""
import copy

import pytest
import torch

from infd.diffusion.generate import LatentDiffusion, generate_latents
from infd.diffusion.schedule import DiffusionConfig
from infd.diffusion.spec import Conditioning, SamplingSpec
from infd.models import NeuralFieldAutoencoder
from infd.render import render_tiles
from infd.solve.conditions import ImageCondition, RegionGuide
from infd.solve.region import render_box
from tests.test_models import tiny_cfg

LIIF = {"kind": "liif", "mlp_hidden": [16, 16]}


def tiny_ae(renderer: dict | None = None, bottleneck: str = "none", dtype=torch.float32) -> NeuralFieldAutoencoder:
    torch.manual_seed(0)
    ae = NeuralFieldAutoencoder(tiny_cfg(bottleneck={"kind": bottleneck}, renderer=renderer or {}))
    return ae.eval().to(dtype)


@pytest.mark.parametrize("renderer", [{}, LIIF], ids=["clif", "liif"])
def test_region_render_gradient_matches_finite_differences(renderer):
    ae = tiny_ae(renderer, dtype=torch.float64)
    z = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)

    def box(z):  # a 12 x 20 box of a 48 x 40 canvas, rendered at 6 x 5: another scale than the canvas's
        return render_box(ae.renderer, ae.decode(z), (48, 40), (10, 4, 22, 24), (6, 5))

    assert torch.autograd.gradcheck(box, (z,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_region_render_at_the_box_size_equals_the_crop_of_the_canvas_render():
    """A box rendered at its own size is the crop of the tiled canvas render (the renderer's context
    included); in strips (checkpointed) it is the same."""
    ae = tiny_ae({"norm": "pixel"})  # strictly local: tiles equal the whole render
    z = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        phi = ae.decode(z)
        full = render_tiles(ae.renderer, phi, (64, 64))
        boxed = render_box(ae.renderer, phi, (64, 64), (5, 9, 37, 29), (32, 20))
        strips = render_box(ae.renderer, phi, (64, 64), (5, 9, 37, 29), (32, 20), tile_rows=7)
    torch.testing.assert_close(boxed, full[:, :, 5:37, 9:29], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(strips, boxed, atol=1e-6, rtol=1e-6)


def test_vq_gradient_is_the_identity_models_at_a_codebook_point():
    """With VQ the decoder path passes the gradient straight through: at a latent made of codebook vectors
    (where the quantiser changes nothing) it equals the gradient of the model without a quantiser."""
    ae = tiny_ae(bottleneck="vq")
    plain = copy.deepcopy(ae)
    plain.bottleneck.quantizer = None
    q = ae.bottleneck.quantizer
    with torch.no_grad():
        z = q.lookup(q.codes(torch.randn(1, 3, 4, 4)))
    grads = []
    for model in (ae, plain):
        x = z.clone().requires_grad_(True)
        rgb = render_box(model.renderer, model.decode(x), (32, 32), (0, 0, 32, 32), (16, 16))
        (g,) = torch.autograd.grad((rgb * torch.linspace(-1, 1, 16)).sum(), x)
        grads.append(g)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])
    with torch.no_grad():  # without a gradient the codes are used as they are
        torch.testing.assert_close(ae.decode(z + 0.01 * 0), plain.decode(z))


def test_a_box_outside_the_canvas_is_refused_with_the_rule():
    ae = tiny_ae()
    with pytest.raises(ValueError, match="outside the canvas"):
        RegionGuide(ae, (64, 64), [ImageCondition((0, 0, 65, 10), torch.zeros(3, 8, 8))])


def _tiny_diffusion():
    from infd.config import from_mapping
    from infd.models.unet import UNet, UNetConfig

    torch.manual_seed(1)
    unet = UNet(from_mapping(UNetConfig, {"in_channels": 3, "ch": 32, "ch_mult": [1, 2], "attn_ds": [],
                                          "num_res_blocks": 1}))
    for p in unet.parameters():  # the zero-initialised output layer would make eps independent of x
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    return LatentDiffusion(unet.eval(), DiffusionConfig(latent_scale=1.0))


def test_guided_sampling_moves_the_sample_towards_a_low_resolution_reference():
    """A whole-canvas 16 x 16 reference on a 64 x 64 canvas (super-resolution's condition, reachable: a
    render of another latent): both DPS variants lower the residual against the unguided sample of the same
    seeds, and they differ (one takes the gradient through the UNet). Random-init models: plumbing, not quality."""
    ae, model = tiny_ae(), _tiny_diffusion()
    with torch.no_grad():
        reference = render_box(ae.renderer, ae.decode(torch.randn(1, 3, 8, 8)), (64, 64), (0, 0, 64, 64), (16, 16))[0]
    guide = RegionGuide(ae, (64, 64), [ImageCondition((0, 0, 64, 64), reference)])
    shape, seeds = (2, 3, 8, 8), [3, 4]
    plain = generate_latents(model, SamplingSpec(sampler="ddim", steps=8), Conditioning(), shape, seeds)
    before, samples = guide.residuals(plain), []
    for grad in ("unet", "z0"):
        spec = SamplingSpec(sampler="ddim", steps=8, guide_scale=64.0, guide_grad=grad)
        samples.append(generate_latents(model, spec, Conditioning(guide=guide), shape, seeds))
        after = guide.residuals(samples[-1])
        assert (after < 0.9 * before).all(), (grad, before, after)
    assert not torch.allclose(samples[0], samples[1])


def test_infd_solve_writes_the_solution_layout_and_residuals_and_refuses_bad_specs(tmp_path, capsys):
    """`infd solve` end to end on tiny random-init exports: a low-resolution whole-canvas condition and a
    high-resolution box (the multi-scale case); then user mistakes exit 2 with the key named."""
    import json

    from PIL import Image

    from infd.models.unet import UNet, UNetConfig
    from tests.exports import save_ae, save_unet
    from tests.test_cli import run

    save_ae(tiny_ae(), tmp_path / "ae")
    save_unet(UNet(UNetConfig(ch=32, ch_mult=(1,), attn_ds=(), head_channels=16)), tmp_path / "unet")
    Image.new("RGB", (16, 12), (200, 40, 40)).save(tmp_path / "low.png")
    Image.new("RGB", (24, 24), (40, 40, 200)).save(tmp_path / "patch.png")
    spec = {"unet": str(tmp_path / "unet"), "ae": str(tmp_path / "ae"), "canvas": "64x48", "seeds": [0, 1],
            "latent_size": 8, "sampling": {"sampler": "ddim", "steps": 3, "guide_scale": 4.0},
            "conditions": [{"image": "low.png"}, {"image": "patch.png", "box": [8, 4, 32, 28], "weight": 2}],
            "out": str(tmp_path / "out")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    code, out, err = run(capsys, "solve", tmp_path / "spec.json")
    assert code == 0, err
    lines = [json.loads(line) for line in (tmp_path / "out" / "residuals.jsonl").read_text().splitlines()]
    assert [line["seed"] for line in lines] == [0, 1]
    assert [r["box"] for r in lines[0]["residuals"]] == [[0, 0, 64, 48], [8, 4, 32, 28]]
    assert all(r["residual"] > 0 for line in lines for r in line["residuals"])
    assert Image.open(tmp_path / "out" / "solution_0.png").size == (64, 48)
    assert Image.open(tmp_path / "out" / "layout_1.png").size == (64, 48)

    # A text condition on a box (the paper's layout-to-image), scored by a random-init CLIP: labelled so.
    text = {**spec, "seeds": [2], "conditions": [{"text": "a red car", "box": [0, 0, 32, 32]}],
            "clip": {"model": "ViT-S-32", "pretrained": None}, "sampling": {**spec["sampling"], "guide_grad": "z0"}}
    (tmp_path / "text.json").write_text(json.dumps(text))
    code, out, err = run(capsys, "solve", tmp_path / "text.json")
    assert code == 0, err
    assert "random-init CLIP" in out and '"kind": "text"' in out

    def error(**change) -> str:
        (tmp_path / "bad.json").write_text(json.dumps({**spec, **change}))
        code, _, err = run(capsys, "solve", tmp_path / "bad.json")
        assert code == 2 and err.startswith("infd solve: error: "), err
        return err

    assert "conditions[1].box" in error(conditions=[{"image": "low.png"}, {"image": "patch.png",
                                                                           "box": [40, 0, 80, 10]}])
    assert "conditions[0].image" in error(conditions=[{"image": "missing.png"}]) and "no such file" in error(
        conditions=[{"image": "missing.png"}])
    assert "has no text encoder" in error(prompt="a cat")


def test_masked_and_lpips_image_conditions_and_ddpm_steps():
    """A mask keeps only its pixels in the residual (an all-zero mask: nothing to match); an LPIPS condition
    (random-init VGG: plumbing) scores and guides; DDPM steps (eta 1) take the guidance too."""
    from infd.losses import build_lpips

    ae, model = tiny_ae(), _tiny_diffusion()
    with torch.no_grad():
        reference = render_box(ae.renderer, ae.decode(torch.randn(1, 3, 8, 8)), (64, 64), (0, 0, 64, 64), (16, 16))[0]
    z = torch.randn(1, 3, 8, 8)
    nothing = RegionGuide(ae, (64, 64), [ImageCondition((0, 0, 64, 64), reference, mask=torch.zeros(16, 16))])
    assert float(nothing.residuals(z)[0, 0]) == 0.0
    half = torch.zeros(16, 16)
    half[:, :8] = 1
    left = RegionGuide(ae, (64, 64), [ImageCondition((0, 0, 64, 64), reference, mask=half)])
    changed = reference.clone()
    changed[:, :, 8:] = 1.0  # only the masked-out half differs
    right_changed = RegionGuide(ae, (64, 64), [ImageCondition((0, 0, 64, 64), changed, mask=half)])
    torch.testing.assert_close(left.residuals(z), right_changed.residuals(z))
    lpips = RegionGuide(ae, (64, 64), [ImageCondition((0, 0, 64, 64), reference, loss="lpips")],
                        lpips=build_lpips("random"))
    assert float(lpips.residuals(z)[0, 0]) > 0
    shape, seeds = (1, 3, 8, 8), [5]
    plain = generate_latents(model, SamplingSpec(sampler="ddpm", steps=6), Conditioning(), shape, seeds)
    spec = SamplingSpec(sampler="ddpm", steps=6, guide_scale=64.0)
    guided = generate_latents(model, spec, Conditioning(guide=left), shape, seeds)
    assert left.residuals(guided)[0, 0] < left.residuals(plain)[0, 0]
