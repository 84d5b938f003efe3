"""Stage-2 training in real processes on a latent cache: 2 ranks x ZeRO-2, exact resume, W&B
sample panels, and sampling the export at any resolution."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from infd.export import save_model
from infd.models import NeuralFieldAutoencoder
from tests.images import build, write_folder
from tests.test_models import tiny_cfg
from tests.training import ROOT, assert_close, metrics, run
from tests.wandb_reader import history_and_config

DIFF = "train.diffusion"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    save_model(NeuralFieldAutoencoder(tiny_cfg(net={"resolution": 64})), tmp / "ae")
    write_folder(tmp / "src", [(80 + 3 * i, 70) for i in range(32)])
    build(tmp / "src", str(tmp / "shards"), "--min-side", "64", "--samples-per-shard", "8")
    subprocess.run([sys.executable, "-m", "data_prep.encode_latents", "--ae", str(tmp / "ae"), "--shards",
                    str(tmp / "shards"), "--output", str(tmp / "latents")], check=True, capture_output=True, cwd=ROOT)
    return tmp


def common(cache, *extra):
    return ("experiment=diffusion_cpu_tiny", f"data.loader.shards={cache / 'latents'}", f"data.autoencoder={cache / 'ae'}",
            "samples.latent_size=16", "trainer.image_every=1000", "diffusion.latent_scale_samples=16", *extra)


def sample_log(root, name: str, rank: int) -> dict[int, dict]:
    lines = (root / name / "samples" / f"rank{rank:05d}.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines)}


def test_two_ranks_match_one_process_and_draw_their_own_timesteps(tmp_path):
    # Synthetic latents: sample i depends only on (seed, i), so the global batch is the same at
    # any world size; noise, timesteps and caption dropout are keyed by the global sample index.
    # Class-conditional (labels dropped with p 0.5, keyed too); no text tower, to keep the test short.
    args = ("experiment=diffusion_cpu_tiny", "data=synthetic", "trainer.max_steps=3", "trainer.ckpt_every=100",
            "trainer.image_every=1000", "trainer.sample_log=true", "diffusion.latent_scale_samples=16",
            "text.kind=none", "unet.context_dim=0", "unet.num_classes=4", "text.caption_dropout=0.5")
    run(DIFF, tmp_path, "one", *args, "data.loader.batch_size=4")
    run(DIFF, tmp_path, "two", *args, "data.loader.batch_size=2", nproc=2)
    one, two = metrics(tmp_path, "one"), metrics(tmp_path, "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in (1, 2):  # the same global batch and draws: equal up to fp32 reduction order
        assert_close(one[step], two[step], ("loss",), rtol=1e-4)
    assert_close(one[3], two[3], ("loss",), rtol=2e-3)
    single, rank0, rank1 = (sample_log(tmp_path, n, r) for n, r in (("one", 0), ("two", 0), ("two", 1)))
    for step in (1, 2, 3):
        assert rank0[step]["t"] != rank1[step]["t"]  # ranks draw their own timesteps
        assert rank0[step]["keys"] + rank1[step]["keys"] == single[step]["keys"]
        assert rank0[step]["t"] + rank1[step]["t"] == single[step]["t"]  # each sample its own draw, any world size


def test_two_ranks_train_and_resume_exactly(tmp_path, cache):
    args = common(cache, "data.loader.batch_size=2", "deepspeed=zero2", "trainer.ckpt_every=3")
    run(DIFF, tmp_path, "straight", *args, "trainer.max_steps=6", nproc=2)
    run(DIFF, tmp_path, "resumed", *args, "trainer.max_steps=3", nproc=2)
    assert (tmp_path / "resumed" / "checkpoints" / "latest").read_text() == "step_0000003"
    run(DIFF, tmp_path, "resumed", *args, "trainer.max_steps=6", nproc=2)
    straight, resumed = metrics(tmp_path, "straight"), metrics(tmp_path, "resumed")
    assert sorted(resumed) == list(range(1, 7))
    for step in range(1, 7):
        assert_close(straight[step], resumed[step], ("loss",), rtol=1e-6)
    assert straight[1]["latent_scale"] == resumed[6]["latent_scale"] > 0
    extra = json.loads((tmp_path / "straight" / "export" / "unet" / "config.json").read_text())["extra"]
    assert extra["ema"] and extra["latent_scale"] == straight[1]["latent_scale"] and extra["text"]["kind"] == "openclip"


def test_wandb_sample_panels_and_sampling_the_export(tmp_path, cache):
    run(DIFF, tmp_path, "wb", *common(cache, "logger=wandb", "trainer.max_steps=2", "trainer.image_every=2",
                                      "trainer.ckpt_every=100", "diffusion.latent_scale=1.0"))
    history, config = history_and_config(next((tmp_path / "wb" / "wandb").glob("offline-run-*/*.wandb")))
    last = history[-1]
    assert isinstance(last["loss"], float) and last["samples/64/width"] == 64 and last["samples/128/width"] == 128
    assert last["latent_scale"] == 1.0  # the paper's raw latents, not the estimate
    assert last["samples/64/count"] == 2  # one image per prompt, captioned with it
    assert last["samples/64/captions"] == ["a photograph", "a painting"]
    assert config["unet"]["context_dim"] == 512
    unet = tmp_path / "wb" / "export" / "unet"
    assert json.loads((unet / "config.json").read_text())["extra"]["latent_scale"] == 1.0
    cmd = [sys.executable, "-m", "infd.cli", "sample", "--ae", str(cache / "ae"), "--unet", str(unet), "--prompt",
           "a photo", "--size", "300x200", "--steps", "4", "--seed", "7"]
    for name, extra in (("a.png", []), ("b.png", []), ("r.png", ["--region", "20,10,120,90"])):
        res = subprocess.run(cmd + ["--out", str(tmp_path / name), *extra], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-2000:]
    a, b, r = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png", "r.png"))
    assert a.shape == (200, 300, 3) and np.array_equal(a, b)  # same seed, same image
    assert np.array_equal(a[10:90, 20:120], r)  # a region is the crop of the full render
