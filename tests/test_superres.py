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


def test_low_resolution_views_are_keyed_by_slot_at_any_world_size(tmp_path):
    """data.loader.patch.lowres: the degraded view of each sample (scale, blur, JPEG drawn per slot) is the
    same whether 1 rank or 2 build the batches, and switching it on moves no other draw (the GT crops)."""
    from infd.data.loader import build_loader
    from tests.test_loader import SMALL_PATCH, data_cfg, small_shards

    shards = small_shards(tmp_path, [(96 + 7 * i, 80 + 5 * i) for i in range(16)], per_shard=4)
    lowres = {"enabled": True, "scale_min": 2, "scale_max": 6, "blur_p": 0.5, "jpeg_p": 0.5}

    def views(world: int, **patch_kw) -> dict:
        out = {}
        for rank in range(world):
            cfg = data_cfg(shards, batch_size=4 // world, num_workers=1, patch={**SMALL_PATCH, **patch_kw})
            for batch in build_loader(cfg, rank, world).epoch_batches():
                for i, key in enumerate(batch.keys):
                    out[key] = (batch.lowres[i] if batch.lowres is not None else None,
                                None if batch.lowres_scale is None else float(batch.lowres_scale[i]), batch.gt[i])
        return out

    one, two, off = views(1, lowres=lowres), views(2, lowres=lowres), views(1)
    assert sorted(one) == sorted(two) == sorted(off) and len(one) == 16
    for key in one:
        (low1, s1, gt1), (low2, s2, gt2), (none, _, gt0) = one[key], two[key], off[key]
        assert torch.equal(low1, low2) and s1 == s2 and 2 <= s1 <= 6
        assert none is None and torch.equal(gt1, gt0) and torch.equal(gt1, gt2)  # the crops do not move
    assert len({s for _, s, _ in one.values()}) == 16  # a scale per sample


def test_infd_upsample_with_a_superres_unet_samples_per_seed_and_refuses_a_plain_unet(tmp_path, capsys):
    """`infd upsample --unet`: a folder of inputs, two seeds each, rendered at 2x; a UNet without the
    condition and an image path as --out for several results exit 2 naming the fix."""
    import numpy as np
    from PIL import Image

    from tests.exports import save_ae, save_unet
    from tests.test_cli import run
    from tests.test_solve import tiny_ae

    save_ae(tiny_ae(), tmp_path / "ae")
    torch.manual_seed(0)
    sr = UNet(UNetConfig(ch=32, ch_mult=(1,), attn_ds=(), head_channels=16, lowres_channels=3))
    for p in sr.parameters():  # past initialisation: the condition and the noise matter
        p.data.add_(0.02 * torch.randn_like(p))
    save_unet(sr, tmp_path / "sr")
    save_unet(UNet(UNetConfig(ch=32, ch_mult=(1,), attn_ds=(), head_channels=16)), tmp_path / "plain")
    (tmp_path / "in").mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(
            tmp_path / "in" / f"im{i}.png")
    (tmp_path / "in" / "broken.jpg").write_text("not a JPEG")  # skipped and counted, the others go on
    common = ["upsample", tmp_path / "in", "--ckpt", tmp_path / "ae", "--scale", "2", "--steps", "3"]
    code, out, err = run(capsys, *common, "--unet", tmp_path / "sr", "--num-images", "2", "--out", tmp_path / "out")
    assert code == 0, err
    assert "broken.jpg: not an image format PIL can read" in out and "1 of 3 inputs skipped" in out
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["im0_0.png", "im0_1.png", "im1_0.png", "im1_1.png"]
    a, b = (np.asarray(Image.open(tmp_path / "out" / n)) for n in ("im0_0.png", "im0_1.png"))
    assert a.shape == (48, 64, 3) and not np.array_equal(a, b)  # another seed, another result
    code, _, err = run(capsys, *common, "--unet", tmp_path / "plain", "--out", tmp_path / "x")
    assert code == 2 and "not a super-resolution UNet" in err
    code, _, err = run(capsys, *common, "--out", tmp_path / "x.png")
    assert code == 2 and "give a folder path" in err


def test_the_alignment_loss_reaches_the_unet_and_not_the_frozen_autoencoder():
    """diffusion.align (infd/diffusion/align.py): the decoded clean-latent prediction against GT patches; the
    gradient flows through the frozen decoder and renderer to the UNet, none lands on the autoencoder;
    samples above t_max contribute nothing."""
    from infd.diffusion.align import AlignConfig, alignment_loss, frozen
    from infd.diffusion.schedule import DiffusionConfig, build_schedule, training_prediction
    from infd.geometry import crop_queries
    from infd.keyed_random import KeyedRandom
    from tests.test_solve import tiny_ae

    ae = frozen(tiny_ae())
    torch.manual_seed(0)
    unet = UNet(UNetConfig(ch=32, ch_mult=(1,), attn_ds=(), head_channels=16))
    for p in unet.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    schedule = build_schedule(DiffusionConfig(latent_scale=1.0))
    z = torch.randn(2, 3, 8, 8)
    pred, _, x_t, t = training_prediction(lambda x, t: unet(x, t), schedule, z, KeyedRandom(0, 0, [0, 1]))
    z0_hat = schedule.to_x0_eps(pred, x_t, t)[0]
    coords, cells = crop_queries((48, 48), (8, 8, 24, 24), batch=2)
    gt = torch.rand(2, 3, 16, 16) * 2 - 1
    loss = alignment_loss(ae, z0_hat, t, gt, coords, cells, AlignConfig(enabled=True, t_max=1000), None)
    loss.backward()
    assert unet.conv_in.weight.grad.abs().sum() > 0 and unet.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in ae.parameters())
    above = alignment_loss(ae, z0_hat.detach(), t, gt, coords, cells, AlignConfig(t_max=int(t.min()) - 1), None)
    assert float(above) == 0.0
    assert t[0] != t[1]  # one sample below the bound, one above: the loss is the one below's alone
    low = int(t.argmin())
    with torch.no_grad():
        mixed = alignment_loss(ae, z0_hat, t, gt, coords, cells, AlignConfig(t_max=int(t.min())), None)
        alone = alignment_loss(ae, z0_hat[low:low + 1], t[low:low + 1], gt[low:low + 1], coords[low:low + 1],
                               cells[low:low + 1], AlignConfig(t_max=1000), None)
    assert torch.allclose(mixed, alone, rtol=1e-6) and mixed > 0


def test_a_superres_unet_starts_from_a_plain_unet_export_computing_what_it_did(tmp_path):
    """trainer.init_from with unet.lowres_channels: the plain export's weights load (first convolution widened
    with zeros, the level embedding left at its zero init) and the output is the plain UNet's."""
    from tests.exports import save_unet
    from train.warm_start import load_export_weights

    torch.manual_seed(0)
    plain = UNet(UNetConfig(**TINY)).eval()
    for p in plain.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    save_unet(plain, tmp_path / "plain")
    sr = UNet(UNetConfig(**TINY, lowres_channels=3)).eval()
    load_export_weights(sr, str(tmp_path / "plain"))
    x, t, context, lowres, level = _inputs()
    with torch.no_grad():
        assert torch.equal(sr(x, t, context, lowres=lowres, level=level), plain(x, t, context))


def test_eval_sr_measures_every_method_alike_on_one_and_two_ranks(tmp_path, capsys):
    """`infd eval-sr`: bicubic, the autoencoder alone, the super-resolution UNet (and with its condition zeroed)
    and guided sampling with a plain UNet, at two scales; 2 ranks under torchrun give the one-rank metrics
    (the same images, seeds and batches), exactly up to the float64 all-reduce."""
    import json
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from tests.exports import save_ae, save_unet
    from tests.s3_server import free_port
    from tests.test_cli import run
    from infd.models import NeuralFieldAutoencoder
    from tests.test_models import tiny_cfg
    from tests.training import ROOT, env

    torch.manual_seed(0)  # an 8 x 8 latent and a narrow renderer: seconds on a CPU
    ae = tiny_cfg(net={"resolution": 32}, renderer={"hidden": 8}, bottleneck={"kind": "none"})
    save_ae(NeuralFieldAutoencoder(ae).eval(), tmp_path / "ae")
    small = dict(ch=32, ch_mult=(1,), attn_ds=(), head_channels=16)
    sr = UNet(UNetConfig(**small, lowres_channels=3))
    for p in sr.parameters():  # past initialisation: the condition matters
        p.data.add_(0.02 * torch.randn_like(p))
    save_unet(sr, tmp_path / "sr")
    save_unet(UNet(UNetConfig(**small)), tmp_path / "plain")
    (tmp_path / "held_out").mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 36), (32, 48), (20, 20), (36, 36)]):  # the 20 px one is below --size
        smooth = rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)
        Image.fromarray(smooth).resize((w, h), Image.BICUBIC).save(tmp_path / "held_out" / f"im{i}.png")
    argv = ["eval-sr", "--ae", tmp_path / "ae", "--unet", tmp_path / "sr", "--guided-unet", tmp_path / "plain",
            "--images", tmp_path / "held_out", "--methods", "bicubic", "ae", "diffusion", "diffusion_nocond",
            "guided", "--scales", "2", "4", "--size", "32", "--num-images", "4", "--batch-size", "2", "--steps", "2",
            "--lpips", "random", "--features", "randinit", "--feature-dim", "8", "--quiet", "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): the same float reductions
    try:
        code, out, err = run(capsys, *argv, "--out", tmp_path / "one")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    one = json.loads(out.strip().splitlines()[-1])
    assert (one["num_images"], one["skipped"], one["world_size"]) == (3, {"smaller_than_size": 1}, 1)
    rows = [row for method in one["methods"].values() for row in method.values()]
    assert len(rows) == 10 and all(set(r) == {"psnr", "lr_rmse", "lpips_randinit", "fid_randinit"} for r in rows)
    assert all(np.isfinite([r["psnr"], r["lr_rmse"], r["lpips_randinit"], r["fid_randinit"]]).all() for r in rows)
    bicubic = one["methods"]["bicubic"]
    assert bicubic["x2"]["lr_rmse"] < 0.1 and bicubic["x2"]["psnr"] > bicubic["x4"]["psnr"]  # smooth images
    assert one["methods"]["diffusion"]["x2"] != one["methods"]["diffusion_nocond"]["x2"]
    assert Image.open(tmp_path / "one" / "examples_x4.png").size[0] > 7 * 32  # input, 5 methods, original
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "infd.cli", *map(str, argv)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, res.stdout  # one JSON object, from rank 0
    two = json.loads(lines[0])
    assert two["world_size"] == 2 and two["skipped"] == one["skipped"]
    for method, table in one["methods"].items():
        for scale, row in table.items():
            for key, value in row.items():
                assert abs(two["methods"][method][scale][key] - value) <= 1e-7 * max(abs(value), 1), (method, key)
    code, _, err = run(capsys, "eval-sr", "--ae", tmp_path / "ae", "--images", tmp_path / "held_out", "--methods",
                       "guided")
    assert code == 2 and "--methods guided needs --guided-unet" in err
