import torch

from infd.models.unet import UNet, UNetConfig, timestep_embedding


def tiny(**kw) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(ch=32, ch_mult=(1, 2), attn_ds=(2,), head_channels=16, **kw))


def test_paper_unet_size():
    with torch.device("meta"):
        params = sum(p.numel() for p in UNet(UNetConfig()).parameters())
    assert 270e6 < params < 300e6  # LDM-4 on FFHQ (224 channels) is about 274M


def test_shapes_conditioning_and_zero_init_output():
    u = tiny(context_dim=16, num_classes=5)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    assert torch.equal(u(x, t), torch.zeros_like(x))  # zero-initialised output layer
    for p in u.parameters():  # break the zero init: conditioning must now change the output
        p.data.add_(torch.randn_like(p) * 0.02)
    ctx = torch.randn(2, 7, 16)
    a, b = u(x, t, ctx), u(x, t, torch.randn(2, 7, 16))
    assert a.shape == x.shape and not torch.allclose(a, b)
    assert not torch.allclose(u(x, t, ctx, torch.tensor([0, 1])), u(x, t, ctx, torch.tensor([2, 3])))
    assert not torch.allclose(u(x, t, ctx), u(x, torch.tensor([4, 901]), ctx))


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([3, 900]), torch.randn(2, 4, 8)
    grads = []
    for ckpt in (False, True):
        u = tiny(context_dim=8, grad_checkpointing=ckpt)
        for p in u.parameters():
            p.data.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
        u(x, t, ctx).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in u.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_timestep_embedding_is_distinct_per_step():
    emb = timestep_embedding(torch.arange(1000), 64)
    assert emb.shape == (1000, 64) and torch.cdist(emb[:10], emb[:10]).add(torch.eye(10)).min() > 1e-3
