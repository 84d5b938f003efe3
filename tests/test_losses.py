import pytest
import torch

from infd.losses import Stage1Loss, Stage1LossConfig, VGG16_CACHE, adaptive_gan_weight, build_lpips, hinge_d_loss
from infd.models.discriminator import DiscriminatorConfig, PatchDiscriminator


def test_patch_discriminator_shape_and_norms():
    for norm in ("batch", "group"):
        d = PatchDiscriminator(DiscriminatorConfig(norm=norm))
        assert d(torch.randn(2, 3, 256, 256)).shape == (2, 1, 30, 30)


def test_hinge_loss_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0, 0.5] mean 0.25; relu(1 + fake) = [0, 1] mean 0.5
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(0.375))


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    y = layer(x)
    rec, gan = (y - 1).abs().mean(), -(y * torch.tensor([1.0, 2.0, 3.0])).mean()
    w = adaptive_gan_weight(rec, gan, layer.weight, 1e4)
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, layer.weight)[0]
    assert torch.isclose(w, g_rec.norm() / (g_gan.norm() + 1e-4))
    assert not w.requires_grad


def test_adaptive_weight_is_clamped():
    layer = torch.nn.Linear(2, 1)
    y = layer(torch.randn(3, 2))
    assert adaptive_gan_weight(y.sum(), 0 * y.sum(), layer.weight, 100.0) == 100.0


def test_stage1_loss_generator_and_discriminator(lpips_randinit):
    from infd.models.renderers import CLIF, RendererConfig
    from infd.geometry import crop_queries

    loss = Stage1Loss(Stage1LossConfig(lpips_backbone="random", disc_start=5), lpips_randinit)
    assert loss.lpips_name == "lpips_randinit"  # never reported as a real LPIPS
    renderer = CLIF(8, RendererConfig(hidden=32))
    disc = PatchDiscriminator(DiscriminatorConfig(ndf=8, n_layers=2))
    coords, cells = crop_queries((64, 64), (0, 0, 64, 64), batch=2)
    pred = renderer(torch.randn(2, 8, 16, 16), coords, cells)
    target = torch.rand(2, 3, 64, 64) * 2 - 1
    before, logs = loss.generator_loss(pred, target, torch.tensor(0.1), disc(pred), renderer.last_layer, step=0)
    assert "adaptive_weight" not in logs  # GAN term off before disc_start
    total, logs = loss.generator_loss(pred, target, torch.tensor(0.1), disc(pred), renderer.last_layer, step=5)
    assert logs["adaptive_weight"] > 0
    assert torch.isclose(total, before + 0.75 * logs["adaptive_weight"] * logs["gan_g"])
    total.backward()
    assert renderer.last_layer.grad is not None
    d_loss, d_logs = loss.discriminator_loss(disc(target), disc(pred.detach()))
    assert d_loss > 0 and "loss_d" in d_logs


def test_lpips_loads_vgg_weights_from_a_path(tmp_path):
    import torchvision

    vgg = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    net = build_lpips(str(path))
    assert not net.is_random_init
    assert torch.equal(getattr(net.net.slice5, "28").weight, vgg.features[28].weight)
    assert torch.equal(getattr(net.net.slice1, "0").bias, vgg.features[0].bias)


@pytest.mark.skipif(VGG16_CACHE.exists(), reason="pretrained VGG16 is cached on this machine")
def test_missing_pretrained_lpips_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="lpips_backbone=random"):
        build_lpips("pretrained")
