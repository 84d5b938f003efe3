"""infd upsample, infd eval-ae and infd sample on small exported models."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from infd.export import save_model
from infd.models import NeuralFieldAutoencoder
from tests.images import build, noise_image, write_folder
from tests.test_models import tiny_cfg


def infd(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "infd.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_upsample_by_scale_size_and_region(tmp_path):
    model = NeuralFieldAutoencoder(tiny_cfg(net={"resolution": 64}))
    save_model(model, tmp_path / "ae")
    noise_image(120, 80, 0).save(tmp_path / "in.png")
    res = infd("upsample", str(tmp_path / "in.png"), "--ckpt", str(tmp_path / "ae"), "--scale", "2.5",
               "--out", str(tmp_path / "x.png"))
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "x.png").size == (300, 200)
    res = infd("upsample", str(tmp_path / "in.png"), "--ckpt", str(tmp_path / "ae"), "--size", "700x500",
               "--out", str(tmp_path / "full.png"))
    assert res.returncode == 0, res.stderr
    res = infd("upsample", str(tmp_path / "in.png"), "--ckpt", str(tmp_path / "ae"), "--size", "700x500",
               "--region", "100,50,400,300", "--out", str(tmp_path / "crop.png"))
    assert res.returncode == 0, res.stderr
    full, crop = np.asarray(Image.open(tmp_path / "full.png")), np.asarray(Image.open(tmp_path / "crop.png"))
    assert crop.shape == (250, 300, 3)
    assert np.array_equal(crop, full[50:300, 100:400])  # strictly local renderer: a region is a crop
    res = infd("upsample", str(tmp_path / "in.png"), "--ckpt", str(tmp_path / "ae"), "--size", "7x",
               "--out", str(tmp_path / "bad.png"))
    assert res.returncode == 2 and "WIDTHxHEIGHT" in res.stderr


def test_eval_ae_reports_scales_lpips_label_and_skips(tmp_path):
    model = NeuralFieldAutoencoder(tiny_cfg(net={"resolution": 64}))
    save_model(model, tmp_path / "ae")
    write_folder(tmp_path / "src", [(300, 260), (140, 150), (100, 90)])
    build(tmp_path / "src", str(tmp_path / "shards"), "--min-side", "64")
    res = infd("eval-ae", "--ckpt", str(tmp_path / "ae"), "--data", str(tmp_path / "shards"), "--lpips", "random")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["images"] == 3
    assert {"psnr_1x", "psnr_2x", "psnr_4x", "lpips_1x_randinit", "scale_consistency_psnr_1x"} <= set(out)
    assert "lpips_1x" not in out  # a random-init LPIPS is never reported under the real name
    assert out["skipped_4x_too_small"] == 2  # 256 px needed: only the 300x260 image has it
    assert 0 < out["psnr_1x"] < 60


def test_sample_uses_the_exports_sampling_defaults_and_refuses_bad_options(tmp_path):
    from infd.models.unet import UNet, UNetConfig

    save_model(NeuralFieldAutoencoder(tiny_cfg(net={"resolution": 64})), tmp_path / "ae")
    recorded = {"sampler": "ddim", "steps": 4, "eta": 1.0, "spacing": "leading"}  # leading: t = 751, 501, 251, 1
    save_model(UNet(UNetConfig(ch=32, ch_mult=(1,), attn_ds=(), head_channels=16)), tmp_path / "unet", kind="unet",
               extra={"latent_scale": 1.0, "diffusion": {}, "sampling": recorded})
    common = ["sample", "--ae", str(tmp_path / "ae"), "--unet", str(tmp_path / "unet"), "--size", "48x32"]
    res = infd(*common, "--out", str(tmp_path / "s.png"))
    assert res.returncode == 0, res.stderr
    assert "sampler ddim, 4 steps, eta 1.0, spacing leading (unset options: the UNet export's defaults)" in res.stdout
    assert Image.open(tmp_path / "s.png").size == (48, 32)
    # Another sampler drops the recorded bundle; options it does not have end as one-line usage errors.
    res = infd(*common, "--sampler", "dpmpp", "--spacing", "leading", "--out", str(tmp_path / "x.png"))
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert res.stderr.startswith("infd sample: error: timestep spacing 'leading' applies to ddim and ddpm only")
    res = infd(*common, "--spacing", "bogus", "--out", str(tmp_path / "x.png"))
    assert res.returncode == 2 and "invalid choice: 'bogus'" in res.stderr
