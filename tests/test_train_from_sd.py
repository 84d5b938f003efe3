"""Both stages started from a (tiny, random-init) Stable Diffusion folder, in real processes:
stage 1 converts its VAE and trains the decoder and a new renderer with the encoder frozen (2 ranks
x ZeRO-2, loader workers, p_hr 0.5); a warm start from that export; stage 2 fine-tunes diffusers'
UNet2DConditionModel with the folder's CLIP text encoder on a latent cache and resumes exactly;
`infd sample` renders a prompt at any size from the result."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from infd.config import from_mapping
from infd.export import read_record
from infd.convert.autoencoder import build_autoencoder
from infd.models import AutoencoderConfig
from tests.images import build, write_folder
from tests.training import ROOT, assert_close, env, metrics, run, sample_keys
from train.tiny_sd import write_tiny_sd

AE, DIFF = "train.autoencoder", "train.diffusion"
STEPS = 30
FROZEN = ("encoder.", "bottleneck.quant_conv.")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """The tiny SD folder, 12 main-stream + 4 high-res images in shards, and a 30-step stage-1 run
    (2 ranks, ZeRO-2, 2 workers, p_hr 0.5, EMA; no GAN, so the loss is the reconstruction's alone)."""
    tmp = tmp_path_factory.mktemp("from_sd")
    sd = write_tiny_sd(tmp / "sd")
    write_folder(tmp / "src", [(128 if i % 4 == 3 else 104, 112) for i in range(16)])
    build(tmp / "src", str(tmp / "shards"), "--min-side", "64", "--samples-per-shard", "3", "--hr-threshold", "125")
    args = ("experiment=ae_cpu_tiny", f"model.init.autoencoder={sd}", "model.freeze_encoder=true", "data.kind=shards",
            f"data.loader.shards={tmp / 'shards'}", "data.loader.num_workers=2", "data.loader.p_hr=0.5",
            "data.loader.patch.r_max=96", "data.loader.batch_size=2", "deepspeed=zero2", f"trainer.max_steps={STEPS}",
            "trainer.ckpt_every=100", "trainer.image_every=1000", "loss.disc_start=100000", "trainer.ema=true")
    res = run(AE, tmp, "convert", *args, nproc=2)
    return tmp, sd, res.stdout + res.stderr


@pytest.mark.slow
def test_converted_vae_trains_its_decoder_and_renderer_with_the_encoder_frozen(stage1):
    tmp, sd, out = stage1
    assert "converted" in out and "renderer" in out
    loss = metrics(tmp, "convert")
    assert sorted(loss) == list(range(1, STEPS + 1))
    first = sum(loss[s]["l1"] for s in range(1, 6)) / 5
    last = sum(loss[s]["l1"] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first, (first, last)
    # The encoder and the latent conv are the source's, bit for bit; the decoder and renderer moved.
    export = tmp / "convert" / "export" / "autoencoder"
    trained = load_file(str(export / "model.safetensors"))
    meta = json.loads((export / "config.json").read_text())
    cfg = from_mapping(AutoencoderConfig, meta["config"])
    assert cfg.init.autoencoder == str(sd) and cfg.freeze_encoder and cfg.net.z_channels == 4
    source, _ = build_autoencoder(cfg)
    start = source.state_dict()
    frozen = [k for k in start if k.startswith(FROZEN)]
    assert frozen and all(torch.equal(trained[k], start[k]) for k in frozen)
    assert not torch.equal(trained["decoder.conv_in.weight"], start["decoder.conv_in.weight"])


@pytest.mark.slow
def test_init_from_an_export_starts_from_its_weights(stage1, tmp_path):
    """trainer.init_from: the model's shape and weights come from the export (no model.init, no
    model section needed); with lr 0 the run's own export equals the one it started from."""
    tmp, _, _ = stage1
    export = tmp / "convert" / "export" / "autoencoder"
    run(AE, tmp_path, "warm", "experiment=ae_cpu_tiny", f"trainer.init_from={export}", "trainer.max_steps=1",
        "optim.lr=0", "trainer.image_every=1000")
    again = tmp_path / "warm" / "export" / "autoencoder"
    before, after = load_file(str(export / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    bad = run(AE, tmp_path, "bad", "experiment=ae_cpu_tiny", f"trainer.init_from={tmp_path}", check=False)
    assert bad.returncode == 2 and "trainer.init_from" in bad.stderr


@pytest.mark.slow
def test_stage2_fine_tunes_the_sd_unet_resumes_exactly_and_samples_at_any_size(stage1, tmp_path):
    tmp, sd, _ = stage1
    ae = tmp / "convert" / "export" / "autoencoder"
    subprocess.run([sys.executable, "-m", "data_prep.encode_latents", "--ae", str(ae), "--shards", str(tmp / "shards"),
                    "--output", str(tmp_path / "latents")], check=True, capture_output=True, cwd=ROOT, env=env())
    args = ("experiment=diffusion_from_sd", f"unet.pretrained={sd}", f"data.loader.shards={tmp_path / 'latents'}",
            f"data.autoencoder={ae}", "deepspeed=zero2", "data.loader.batch_size=2", "data.loader.num_workers=2",
            "trainer.ckpt_every=2", "trainer.image_every=1000", "trainer.sample_log=true", "optim.lr=1e-3",
            "samples.steps=2")
    run(DIFF, tmp_path, "straight", *args, "trainer.max_steps=4", nproc=2)
    # A new run directory holding only the checkpoint of step 2 resumes to step 4.
    ckpts = tmp_path / "split" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoints" / "step_0000002", ckpts / "step_0000002")
    (ckpts / "latest").write_text("step_0000002")
    run(DIFF, tmp_path, "split", *args, "trainer.max_steps=4", nproc=2)
    straight, split = metrics(tmp_path, "straight"), metrics(tmp_path, "split")
    assert sorted(split) == [3, 4]
    for step in (3, 4):  # the UNet, its Adam moments, EMA, data position and the keyed draws all resumed
        assert_close(straight[step], split[step], ("loss",), rtol=1e-6)
    keys = sample_keys(tmp_path, "straight")
    assert sample_keys(tmp_path, "split") == {3: keys[3], 4: keys[4]}
    assert straight[1]["loss"] != straight[4]["loss"]
    unet = tmp_path / "straight" / "export" / "unet"
    record = read_record(unet)
    # The schedule and latent scale are the folder's, recorded for sampling without it.
    assert record.latent_scale == pytest.approx(0.18215)
    assert record.diffusion.beta_schedule == "scaled_linear" and not record.diffusion.set_alpha_to_one
    assert record.sampling.spacing == "leading"
    out = tmp_path / "fox.png"
    res = subprocess.run([sys.executable, "-m", "infd.cli", "sample", "--unet", str(unet), "--prompt",
                          "a red fox in the snow, 4k, high definition", "--steps", "4", "--cfg", "5", "--size",
                          "320x192", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, env=env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert Image.open(out).size == (320, 192)
    # The SD folder's UNet as it is, with the converted autoencoder: a region of a 4096 render.
    res = subprocess.run([sys.executable, "-m", "infd.cli", "sample", "--unet", str(sd), "--ae", str(ae), "--prompt",
                          "a red fox, 4k", "--steps", "2", "--size", "4096x4096", "--region", "0,0,96,64", "--out",
                          str(out)], capture_output=True, text=True, cwd=ROOT, env=env())
    assert res.returncode == 0 and "spacing leading" in res.stdout, res.stderr[-3000:]
    assert Image.open(out).size == (96, 64)
