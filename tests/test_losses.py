import warnings

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


@pytest.mark.parametrize("kind", ["clif", "liif"])
def test_generator_objective_matches_direct_autograd(lpips_randinit, kind):
    # lambda from d loss / d rgb and the output layer's input must equal the paper's definition
    # (gradients w.r.t. the last layer's weight by a second backward), and backpropagating the
    # surrogate must give exactly the gradient of the loss.
    from infd.geometry import crop_queries
    from infd.models.renderers import RendererConfig, build_renderer

    loss = Stage1Loss(Stage1LossConfig(lpips_backbone="random", disc_start=5), lpips_randinit)
    assert loss.lpips_name == "lpips_randinit"  # never reported as a real LPIPS
    renderer = build_renderer(RendererConfig(kind=kind, hidden=32, mlp_hidden=(16, 16)), 8)
    disc = PatchDiscriminator(DiscriminatorConfig(ndf=8, n_layers=2, norm="group"))
    for p in disc.parameters():
        p.requires_grad_(False)
    phi = torch.randn(2, 8, 16, 16, requires_grad=True)
    coords, cells = crop_queries((64, 64), (0, 0, 64, 64), batch=2)
    target = torch.rand(2, 3, 64, 64) * 2 - 1
    bott = phi.pow(2).mean()

    rgb, head = renderer.forward_with_head_input(phi, coords, cells)
    value, grad_rgb, logs = loss.generator_objective(rgb, target, bott, step=5, disc=disc,
                                                     head_weight_grad=lambda g: renderer.head_weight_grad(head, g))
    ((rgb * grad_rgb).sum() + bott).backward()
    surrogate_grads = [p.grad.clone() for p in [phi, *renderer.parameters()]]

    for p in [phi, *renderer.parameters()]:
        p.grad = None
    rgb2, bott = renderer(phi, coords, cells), phi.pow(2).mean()
    rec, _ = loss.reconstruction_loss(rgb2, target)
    gan = -disc(rgb2).mean()
    direct_weight = adaptive_gan_weight(rec, gan, renderer.last_layer, 1e4)
    assert torch.allclose(logs["adaptive_weight"], direct_weight, rtol=1e-4)
    direct = rec + bott + 0.75 * direct_weight * gan
    assert torch.allclose(value, direct.detach(), rtol=1e-5)
    direct.backward()
    for a, b in zip(surrogate_grads, [p.grad for p in [phi, *renderer.parameters()]]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)

    before, _, logs = loss.generator_objective(rgb.detach(), target, bott.detach(), step=0, disc=disc,
                                               head_weight_grad=lambda g: renderer.head_weight_grad(head, g))
    assert "adaptive_weight" not in logs  # no GAN term before disc_start


def test_discriminator_hinge_loss_logs():
    loss = Stage1Loss(Stage1LossConfig(lpips_backbone="random"), torch.nn.Identity())
    d_loss, logs = loss.discriminator_loss(torch.tensor([0.5, 2.0]), torch.tensor([-0.5, 0.0]))
    assert torch.isclose(d_loss, torch.tensor(0.5 * (0.25 + 0.75))) and "loss_d" in logs


@pytest.mark.slow
def test_lpips_loads_vgg_weights_from_a_path_and_equals_the_lpips_package(tmp_path):
    """infd/lpips.py against the lpips package's own LPIPS, both on the same (random) torchvision VGG16
    weights read from a file, and the package's calibrated heads."""
    import lpips
    import torchvision

    vgg = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    net = build_lpips(str(path))
    assert not net.is_random_init and not any(p.requires_grad for p in net.parameters())
    assert torch.equal(net.features[28].weight, vgg.features[28].weight)
    assert torch.equal(net.features[0].bias, vgg.features[0].bias)
    with warnings.catch_warnings():  # torchvision's deprecation notes about the package's call style
        warnings.simplefilter("ignore", UserWarning)
        reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    slices = [reference.net.slice1, reference.net.slice2, reference.net.slice3, reference.net.slice4,
              reference.net.slice5]
    for index, module in ((int(n), m) for s in slices for n, m in s.named_children()):
        module.load_state_dict(vgg.features[index].state_dict())  # slices keep torchvision's indices
    a, b = torch.rand(2, 3, 64, 48) * 2 - 1, torch.rand(2, 3, 64, 48) * 2 - 1
    with torch.no_grad():
        ours, theirs = net(a, b), reference(a, b)
    assert ours.shape == theirs.shape == (2, 1, 1, 1)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7), (ours.flatten(), theirs.flatten())


def test_random_init_lpips_is_torchvisions_random_vgg16_under_its_fixed_seed():
    """The same network whatever the global random state (every rank, every process), which it leaves as it was."""
    import torchvision

    from infd.losses import RANDOM_LPIPS_SEED

    torch.manual_seed(3)
    net = build_lpips("random")
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))  # the global generator did not move
    torch.manual_seed(RANDOM_LPIPS_SEED)
    vgg = torchvision.models.vgg16(weights=None)
    assert net.is_random_init
    for ours, theirs in zip(net.features.state_dict().values(), vgg.features.state_dict().values()):
        assert torch.equal(ours, theirs)
    torch.manual_seed(7)
    assert torch.equal(build_lpips("random").features[0].weight, net.features[0].weight)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert net(x, x).abs().max() < 1e-6 and net(x, -x).item() > 0


@pytest.mark.skipif(VGG16_CACHE.exists(), reason="pretrained VGG16 is cached on this machine")
def test_missing_pretrained_lpips_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="lpips_backbone=random"):
        build_lpips("pretrained")
