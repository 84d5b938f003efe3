"""The latent cache: encode_latents resumes without duplicates or gaps, and the latents come back
through the epoch-planned loader."""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import pytest

from infd.config import from_mapping
from infd.data.loader import DataConfig, build_loader
from infd.data.latents import collate_latents, latent_sample, load_npy
from tests.exports import save_ae
from infd.models import NeuralFieldAutoencoder
from tests.images import build, write_folder
from tests.test_models import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


def setup_cache_inputs(tmp_path, n=24, per_shard=4):
    save_ae(NeuralFieldAutoencoder(tiny_cfg(net={"resolution": 64})), tmp_path / "ae")
    write_folder(tmp_path / "src", [(80 + 3 * i, 70) for i in range(n)])
    build(tmp_path / "src", str(tmp_path / "shards"), "--min-side", "64", "--samples-per-shard", str(per_shard))


def encode_cmd(tmp_path, out):
    return [sys.executable, "-m", "data_prep.encode_latents", "--ae", str(tmp_path / "ae"), "--shards",
            str(tmp_path / "shards"), "--output", str(out), "--flip", "--batch-size", "3", "--workers", "2"]


def cache_contents(out: Path) -> dict:
    latents = {}
    for tar_path in sorted(out.glob("latents-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".latent.npy"):
                    key = m.name.split(".")[0]
                    assert key not in latents, f"duplicate {key}"
                    latents[key] = load_npy(tar.extractfile(m).read())
    return latents


def _finished(out: Path) -> int:
    return len(list(out.glob("latents-*.json")))


@pytest.mark.slow
def test_stopped_killed_and_restarted_encoding_has_no_duplicate_and_no_gap(tmp_path):
    """2 decoding workers. SIGTERM to the whole process group (workers included) ends the run with
    exit 0 after the batch in progress; SIGKILL ends it anywhere; each rerun continues."""
    setup_cache_inputs(tmp_path, per_shard=2)  # 12 shards
    clean = tmp_path / "clean"
    subprocess.run(encode_cmd(tmp_path, clean), check=True, capture_output=True, cwd=ROOT)
    out = tmp_path / "interrupted"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(encode_cmd(tmp_path, out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        before, deadline = _finished(out), time.time() + 120
        while time.time() < deadline and _finished(out) < before + 2:
            time.sleep(0.02)
        os.killpg(proc.pid, sig)
        output, _ = proc.communicate(timeout=60)
        assert not (out / "index.json").exists(), output  # it really was interrupted
        if sig == signal.SIGTERM:
            assert proc.returncode == 0 and "stopped by SIGTERM" in output, output[-3000:]
            assert "killed by signal" not in output and not list(out.glob("*.tmp"))
    subprocess.run(encode_cmd(tmp_path, out), check=True, capture_output=True, cwd=ROOT)
    a, b = cache_contents(clean), cache_contents(out)
    assert sorted(a) == sorted(b) == [f"{i:09d}" for i in range(24)]
    for key in a:
        assert np.array_equal(a[key], b[key]) and a[key].dtype == np.float16 and a[key].shape == (3, 16, 16)
    assert not list(out.glob("*.tmp"))
    assert json.loads((out / "index.json").read_text())["total_samples"] == 24


@pytest.mark.slow
def test_latents_come_back_exactly_once_per_epoch_through_the_loader(tmp_path):
    setup_cache_inputs(tmp_path, n=16)
    subprocess.run(encode_cmd(tmp_path, tmp_path / "lat"), check=True, capture_output=True, cwd=ROOT)
    cfg = from_mapping(DataConfig, {"shards": str(tmp_path / "lat"), "batch_size": 2, "num_workers": 2})
    seen = Counter()
    for rank in (0, 1):
        for batch in build_loader(cfg, rank, 2, latent_sample, collate_latents).epoch_batches():
            assert batch.z.shape == (2, 3, 16, 16) and batch.z.dtype == torch.float32
            assert all(c.startswith("caption ") for c in batch.captions)
            seen.update(batch.keys)
    assert len(seen) == 16 and max(seen.values()) == 1


@pytest.mark.slow
def test_random_init_text_encoder_embeds_captions():
    from infd.text import TextEncoderConfig, build_text_encoder

    before = torch.random.get_rng_state()
    enc = build_text_encoder(TextEncoderConfig(kind="openclip", pretrained=None))
    assert enc.is_random_init
    out = enc(["a photo of a cat", ""])
    assert out.shape == (2, 77, enc.width) and not torch.allclose(out[0], out[1])
    assert build_text_encoder(TextEncoderConfig(kind="none")) is None
    # Seeded, on a forked RNG: a rebuild from the export's config (infd sample) is the tower the UNet
    # trained with, and the caller's RNG is untouched.
    torch.rand(3)
    again = build_text_encoder(TextEncoderConfig(kind="openclip", pretrained=None))
    assert torch.equal(again(["a photo of a cat", ""]), out)
    torch.random.set_rng_state(before)
    expected = torch.rand(3)
    torch.random.set_rng_state(before)
    build_text_encoder(TextEncoderConfig(kind="openclip", pretrained=None))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.slow
def test_class_labels_flow_from_sidecars_to_batches_and_guide_sampling(tmp_path):
    from infd.diffusion.schedule import DiffusionConfig
    from infd.models.unet import UNet, UNetConfig
    from infd.diffusion.generate import LatentDiffusion, generate_latents
    from infd.diffusion.spec import Conditioning, SamplingSpec

    save_ae(NeuralFieldAutoencoder(tiny_cfg(net={"resolution": 64})), tmp_path / "ae")
    paths = write_folder(tmp_path / "src", [(90, 80)] * 6)
    for i, path in enumerate(paths):
        if i != 5:  # the last image has no label
            path.with_suffix(".json").write_text(json.dumps({"label": i % 3}))
    build(tmp_path / "src", str(tmp_path / "shards"), "--min-side", "64")
    subprocess.run([sys.executable, "-m", "data_prep.encode_latents", "--ae", str(tmp_path / "ae"), "--shards",
                    str(tmp_path / "shards"), "--output", str(tmp_path / "lat")], check=True, capture_output=True,
                   cwd=ROOT)
    cfg = from_mapping(DataConfig, {"shards": str(tmp_path / "lat"), "batch_size": 6, "num_workers": 0})
    batch = next(iter(build_loader(cfg, 0, 1, latent_sample, collate_latents)))
    by_source = dict(zip(batch.keys, batch.labels.tolist()))
    order = sorted(paths)  # keys follow the sorted file list
    for key, label in by_source.items():
        path = order[int(key)]
        expected = (json.loads(path.with_suffix(".json").read_text())["label"]
                    if path.with_suffix(".json").exists() else -1)
        assert label == expected
    torch.manual_seed(0)
    unet = UNet(UNetConfig(ch=32, ch_mult=(1,), attn_ds=(), head_channels=16, num_classes=3))
    for p in unet.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    shape = (1, 3, 8, 8)
    model, spec = LatentDiffusion(unet, DiffusionConfig(latent_scale=1.0)), SamplingSpec(steps=4, cfg_scale=3.0)
    z = {k: generate_latents(model, spec, Conditioning(labels=torch.tensor([k])), shape, 0) for k in (0, 1)}
    assert not torch.allclose(z[0], z[1])  # the label (with guidance) changes the sample
