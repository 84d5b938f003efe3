"""`infd eval-gen`: the same samples and metrics on 1 and 2 ranks, resume, real-set choice, labels."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from infd.cli import main
from infd.eval.real_set import choose_real_set, open_source
from tests.exports import save_ae, save_unet
from infd.models import NeuralFieldAutoencoder
from infd.models.unet import UNet, UNetConfig
from tests.images import build, write_folder
from tests.s3_server import free_port
from tests.test_models import tiny_cfg
from tests.training import ROOT, env

# Real images: (width, height); the 600x400 and 900x1200 ones are below 1024 and skipped.
REAL_SIZES = [(1100, 1030), (600, 400), (1024, 1024), (900, 1200), (1300, 1050)]
N = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_gen")
    torch.manual_seed(0)
    # A narrow renderer: a 1024 render costs ~0.3 s on a CPU core instead of 2 s.
    save_ae(NeuralFieldAutoencoder(tiny_cfg(net={"resolution": 64}, renderer={"hidden": 8})), root / "ae")
    unet = UNetConfig(ch=32, ch_mult=(1,), attn_ds=(), head_channels=16)
    save_unet(UNet(unet), root / "unet", autoencoder=str(root / "ae"))
    write_folder(root / "src", REAL_SIZES)
    build(root / "src", str(root / "shards"))
    return root


def args(root, out: str, *extra: str) -> list[str]:
    return ["eval-gen", "--unet", str(root / "unet"), "--data", str(root / "shards"), "--num-samples", str(N),
            "--steps", "2",
            "--features", "randinit", "--feature-dim", "8", "--stats-cache", str(root / "cache"),
            "--out", str(root / out), "--batch-size", "2", "--quiet", "--device", "cpu", *extra]


def run_in_process(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def tar_order_sizes(shard) -> list[tuple[int, int]]:
    with tarfile.open(shard) as tar:
        return [Image.open(tar.extractfile(m)).size for m in tar.getmembers() if m.name.endswith(".jpg")]


def test_real_set_is_the_first_large_images_in_tar_order(setup):
    in_tar = tar_order_sizes(setup / "shards" / "shard-000000.tar")
    large = [i for i, (w, h) in enumerate(in_tar) if min(w, h) >= 1024]
    real = choose_real_set(open_source([str(setup / "shards")]), 2, 1024)
    assert [real.read(p).size for p in range(len(real.ids))] == [in_tar[i] for i in large[:2]]
    assert real.skipped_small == large[1] - 1  # the small ones before the second large one
    everything = choose_real_set(open_source([str(setup / "shards")]), 100, 1024)
    assert len(everything.ids) == 3 and everything.skipped_small == 2
    # Another size rule is another real set: never the same statistics cache entry.
    assert choose_real_set(open_source([str(setup / "shards")]), 100, 256).index_id != everything.index_id


@pytest.mark.slow
def test_two_ranks_give_the_samples_and_metrics_of_one(setup, capsys):
    one = run_in_process(capsys, args(setup, "one"))
    # Its own statistics cache: the 2 ranks compute the real statistics too (sharded, summed).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "infd.cli", *args(setup, "two"), "--stats-cache",
           str(setup / "cache_two")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env(), timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, res.stdout  # one JSON object, from rank 0
    two = json.loads(lines[0])
    names = ["fid_256_randinit", "pfid_256_1k_randinit", "pfid_512_1k_randinit", "pfid_1k_1k_randinit"]
    assert set(names) <= set(one) and not [k for k in one if k.startswith(("fid", "pfid")) and k not in names]
    for name in names:
        assert abs(one[name] - two[name]) <= 1e-6 * max(abs(one[name]), 1e-12), (name, one[name], two[name])
        assert one[name] > 0
    assert (one["world_size"], two["world_size"], one["num_real"], one["real_skipped_small"]) == (1, 2, 3, 2)
    assert one["real_stats"] == two["real_stats"] == "computed"
    for size in (256, 1024):
        for i in range(N):
            a, b = (setup / run / "samples" / str(size) / f"{i:06d}.png" for run in ("one", "two"))
            assert a.read_bytes() == b.read_bytes(), (size, i)
            assert Image.open(a).size == (size, size)
    assert Image.open(setup / "two" / "grid.png").size[0] > 256
    assert json.loads((setup / "two" / "metrics.json").read_text()) == two


@pytest.mark.slow
def test_a_rerun_reuses_written_samples_and_refuses_other_options(setup, capsys):
    first = run_in_process(capsys, args(setup, "resume"))
    killed = setup / "resume" / "samples" / "1024" / "000002.png"
    killed.unlink()  # as if killed while writing batch [2, 3] (a .tmp left behind is ignored)
    killed.with_name(".000002.png.999.tmp").write_bytes(b"half a png")
    again = run_in_process(capsys, args(setup, "resume"))
    assert again["samples_reused"] == N - 2 and first["samples_reused"] == 0
    assert first["real_stats"] == "cache"  # the real statistics of the first test's run
    assert {k: v for k, v in again.items() if k != "samples_reused"} == \
        {k: v for k, v in first.items() if k != "samples_reused"}
    assert np.array_equal(np.asarray(Image.open(killed)), np.asarray(Image.open(setup / "one" / "samples" / "1024" /
                                                                                  "000002.png")))
    assert main(args(setup, "resume", "--seed", "5")) == 2  # other samples: refused, nothing overwritten
    assert "holds samples drawn with another model or other options" in capsys.readouterr().err
    weights = setup / "unet" / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # the export rewritten in place (trainer.export_every)
    assert main(args(setup, "resume")) == 2
    assert "holds samples drawn with another model" in capsys.readouterr().err


def tar_order_captions(shard, min_side: int) -> list[str]:
    """Captions of the images with short side >= min_side, in tar order, read from the tar itself."""
    with tarfile.open(shard) as tar:
        members = {m.name: m for m in tar.getmembers()}
        out = []
        for name in sorted(members, key=lambda n: members[n].offset):
            if name.endswith(".jpg") and min(Image.open(tar.extractfile(members[name])).size) >= min_side:
                out.append(json.load(tar.extractfile(members[name[:-4] + ".json"]))["caption"])
        return out


@pytest.mark.slow
def test_captions_are_the_prompts_of_a_text_model(setup, capsys, tmp_path):
    from infd.config import from_mapping
    from infd.text import FrozenOpenCLIPText, TextEncoderConfig

    text = from_mapping(TextEncoderConfig, {"kind": "openclip", "model": "ViT-S-32", "pretrained": None})
    width = FrozenOpenCLIPText(text).width
    torch.manual_seed(1)
    unet = UNetConfig(ch=32, ch_mult=(1,), attn_ds=(1,), head_channels=16, context_dim=width)
    model = UNet(unet)
    with torch.no_grad():  # its zero-init output layers (cross-attention's too) as after training: text counts
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    save_unet(model, tmp_path / "unet", autoencoder=str(setup / "ae"), text=text)
    # FID at 64 only, so every real image qualifies; a real set of 2: samples 0-3 answer captions 0, 1, 0, 1.
    small = ["--unet", str(tmp_path / "unet"), "--patches", "--fid-size", "64", "--num-real", "2", "--clip-model",
             "ViT-S-32", "--clip-pretrained", "none", "--stats-cache", str(tmp_path / "stats")]
    captions = tar_order_captions(setup / "shards" / "shard-000000.tar", 64)[:2]
    assert len(set(captions)) == 2
    captioned = run_in_process(capsys, args(setup, tmp_path / "captions", *small, "--captions"))
    assert captioned["num_real"] == 2 and captioned["prompts_empty"] == 0
    (tmp_path / "same.txt").write_text("\n".join(captions) + "\n")
    listed = run_in_process(capsys, args(setup, tmp_path / "listed", *small, "--prompts", str(tmp_path / "same.txt")))
    (tmp_path / "other.txt").write_text("\n".join(reversed(captions)) + "\n")
    other = run_in_process(capsys, args(setup, tmp_path / "other", *small, "--prompts", str(tmp_path / "other.txt")))
    png = {run: [(tmp_path / run / "samples" / "64" / f"{i:06d}.png").read_bytes() for i in range(N)]
           for run in ("captions", "listed", "other")}
    # --captions draws exactly what the same captions as a prompt file draw; other prompts draw others.
    assert png["captions"] == png["listed"] and png["other"][0] != png["captions"][0]
    assert captioned["clip_score_randinit"] == listed["clip_score_randinit"]
    assert captioned["fid_64_randinit"] == listed["fid_64_randinit"] != other["fid_64_randinit"]
    # Real images without captions cannot be the prompts: a clear error, not empty prompts.
    write_folder(tmp_path / "bare", REAL_SIZES, captions=False)
    build(tmp_path / "bare", str(tmp_path / "bare_shards"))
    assert main(args(setup, tmp_path / "bare_out", *small, "--captions", "--data", str(tmp_path / "bare_shards"))) == 2
    assert "the real images have no captions" in capsys.readouterr().err
    assert main(args(setup, tmp_path / "both", *small, "--captions", "--prompts", str(tmp_path / "same.txt"))) == 2
    assert "--prompts and --captions both given" in capsys.readouterr().err


def test_an_evaluation_abandoned_in_its_real_images_caches_nothing(setup, tmp_path):
    from infd.config import from_mapping
    from infd.eval.features import build_feature_extractor
    from infd.eval.generative import GenEvalConfig, cached_real_stats
    from infd.eval.real_set import EvaluationStopped

    cfg = from_mapping(GenEvalConfig, {"num_samples": 4, "patches": [], "fid_size": 64, "batch_size": 2,
                                       "features": {"kind": "randinit", "dim": 8}, "stats_cache": str(tmp_path)})
    real = choose_real_set(open_source([str(setup / "shards")]), 4, 64)
    extractor, cpu = build_feature_extractor(cfg.features), torch.device("cpu")
    checks = []
    with pytest.raises(EvaluationStopped):  # stopped before the second of 2 rounds of real images
        cached_real_stats(real, cfg, extractor, 0, 1, cpu, progress=False,
                          should_stop=lambda: checks.append(1) or len(checks) > 1)
    assert len(checks) == 2 and not list(tmp_path.iterdir())
    _, info = cached_real_stats(real, cfg, extractor, 0, 1, cpu, progress=False)
    assert info["real_stats"] == "computed" and list(tmp_path.iterdir())
