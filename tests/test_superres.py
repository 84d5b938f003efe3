"""Super-resolution (issue 28): the low-resolution condition of the UNets (infd/models/lowres_cond.py)."""
import pytest
import torch

from infd.models import UNetConfig, build_unet
from infd.models.lowres_cond import widen_weight
from infd.models.unet import UNet

TINY = dict(ch=32, ch_mult=(1, 2), attn_ds=(2,), head_channels=16, context_dim=8)


def _inputs(channels: int = 3, size: int = 8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, size, size, generator=g)
    return (x, torch.tensor([10, 700]), torch.randn(2, 5, 8, generator=g),
            torch.randn(2, channels, size, size, generator=g), torch.tensor([0.0, 0.3]))


def test_our_unet_with_the_condition_added_computes_what_the_unet_without_it_did():
    """A UNet's weights loaded into its super-resolution version (first convolution widened with zeros): the
    output is exactly the original's whatever the condition and level; once the new weights move, the
    condition changes the output."""
    torch.manual_seed(0)
    plain = UNet(UNetConfig(**TINY)).eval()
    for p in plain.parameters():  # a "trained" UNet: its zero-initialised output layer is not zero
        p.data.add_(0.01 * torch.randn_like(p))
    sr = UNet(UNetConfig(**TINY, lowres_channels=3)).eval()
    state = plain.state_dict()
    state["conv_in.weight"] = widen_weight(state["conv_in.weight"], 6)
    missing, unexpected = sr.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("level_emb.") for k in missing)
    x, t, context, lowres, level = _inputs()
    with torch.no_grad():
        ref = plain(x, t, context)
        assert torch.equal(sr(x, t, context, lowres=lowres, level=level), ref)
        assert torch.equal(sr(x, t, context, lowres=torch.zeros_like(lowres)), ref)
        for p in (*sr.level_emb.parameters(), sr.conv_in.weight):
            p.add_(0.05 * torch.randn_like(p))
        a = sr(x, t, context, lowres=lowres, level=level)
        assert not torch.allclose(a, sr(x, t, context, lowres=lowres.flip(0), level=level))
        assert not torch.allclose(a, sr(x, t, context, lowres=lowres, level=level.flip(0)))
    with pytest.raises(ValueError, match="needs the low-resolution latent"):
        sr(x, t, context)
    with pytest.raises(ValueError, match="takes no low-resolution condition"):
        plain(x, t, context, lowres=lowres)


def test_a_pretrained_diffusers_unet_is_unchanged_by_the_zero_initialised_condition(tmp_path):
    """Stable Diffusion's UNet2DConditionModel (a tiny random one in its layout) loaded with
    unet.lowres_channels: the same output as without, exactly, for any condition and level."""
    from train.tiny_sd import write_tiny_sd

    root = write_tiny_sd(tmp_path / "tiny-sd", seed=0, sample_size=8)
    plain = build_unet(UNetConfig(kind="diffusers", pretrained=str(root)), load_pretrained=True).eval()
    sr = build_unet(UNetConfig(kind="diffusers", pretrained=str(root), lowres_channels=4), load_pretrained=True).eval()
    x, t, _, lowres, level = _inputs(4)
    context = torch.randn(2, 5, plain.cfg.context_dim)
    with torch.no_grad():
        assert torch.equal(sr(x, t, context, lowres=lowres, level=level), plain(x, t, context))
        for p in sr.level_emb.parameters():
            p.add_(0.05 * torch.randn_like(p))
        assert not torch.allclose(sr(x, t, context, lowres=lowres, level=level), plain(x, t, context))
