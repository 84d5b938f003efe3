"""Stage-2 training in real processes on a latent cache: 2 ranks x ZeRO-2 and ZeRO-3 (stop signal and exact resume), W&B
sample panels, and sampling the export at any resolution."""
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from datetime import datetime

import numpy as np
import psutil
import pytest
from PIL import Image

from infd.export import read_record
from tests.exports import save_ae
from infd.models import NeuralFieldAutoencoder
from tests.images import build, write_folder
from tests.test_export import check_unet_exports
from tests.test_models import tiny_cfg
from tests.training import ROOT, LineReader, assert_close, env, metrics, run, sample_keys, step_tree, train_cmd
from tests.wandb_reader import history_and_config

DIFF = "train.diffusion"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    save_ae(NeuralFieldAutoencoder(tiny_cfg(net={"resolution": 64})), tmp / "ae")
    write_folder(tmp / "src", [(80 + 3 * i, 70) for i in range(32)])
    build(tmp / "src", str(tmp / "shards"), "--min-side", "64", "--samples-per-shard", "8")
    subprocess.run([sys.executable, "-m", "data_prep.encode_latents", "--ae", str(tmp / "ae"), "--shards",
                    str(tmp / "shards"), "--output", str(tmp / "latents")], check=True, capture_output=True, cwd=ROOT)
    return tmp


def common(cache, *extra):
    return ("experiment=diffusion_cpu_tiny", f"data.loader.shards={cache / 'latents'}",
            f"data.autoencoder={cache / 'ae'}",
            "samples.latent_size=16", "trainer.image_every=1000", "diffusion.latent_scale_samples=16", *extra)


def sample_log(root, name: str, rank: int) -> dict[int, dict]:
    lines = (root / name / "samples" / f"rank{rank:05d}.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines)}


@pytest.mark.slow
def test_two_ranks_match_one_process_draw_their_own_timesteps_and_export_checkpoints(tmp_path, cache):
    # Synthetic latents: sample i depends only on (seed, i), so the global batch is the same at
    # any world size; noise, timesteps and caption dropout are keyed by the global sample index.
    # Class-conditional (labels dropped with p 0.5, keyed too); no text tower, to keep the test short.
    args = ("experiment=diffusion_cpu_tiny", "data=synthetic", "trainer.max_steps=3", "trainer.ckpt_every=100",
            "trainer.image_every=1000", "trainer.sample_log=true", "diffusion.latent_scale_samples=16",
            "text.kind=none", "unet.context_dim=0", "unet.num_classes=4", "text.caption_dropout=0.5")
    # The 1-process run also checkpoints and exports at every step, without EMA: its checkpoints
    # export to what it exported itself (tests/test_export.py).
    run(DIFF, tmp_path, "one", *args, "data.loader.batch_size=4", "trainer.ckpt_every=1", "trainer.export_every=1",
        "trainer.ema=false")
    check_unet_exports(tmp_path / "one", tmp_path / "exports")
    # The 2-rank run also evaluates at step 2 (sharded, EMA weights): its training must not change.
    run(DIFF, tmp_path, "two", *args, "data.loader.batch_size=2", f"data.autoencoder={cache / 'ae'}",
        *eval_args(cache, tmp_path / "stats"), "eval.num_samples=6", nproc=2)
    one, two = metrics(tmp_path, "one"), metrics(tmp_path, "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert two[2]["eval/fid_64_randinit"] > 0 and "eval/fid_64_randinit" not in two[3]
    for step in (1, 2):  # the same global batch and draws: equal up to fp32 reduction order
        assert_close(one[step], two[step], ("loss",), rtol=1e-4)
    assert_close(one[3], two[3], ("loss",), rtol=2e-3)
    single, rank0, rank1 = (sample_log(tmp_path, n, r) for n, r in (("one", 0), ("two", 0), ("two", 1)))
    for step in (1, 2, 3):
        assert rank0[step]["t"] != rank1[step]["t"]  # ranks draw their own timesteps
        assert rank0[step]["keys"] + rank1[step]["keys"] == single[step]["keys"]
        assert rank0[step]["t"] + rank1[step]["t"] == single[step]["t"]  # each sample its own draw, any world size


@pytest.mark.slow
def test_stop_signal_to_every_process_then_resume_exactly(tmp_path, cache):
    """2 ranks x ZeRO-3 x 2 loader workers on the latent cache. SIGTERM goes to every process of the
    job (scancel's way: launcher, ranks, data workers) while they evaluate after step 1 (a long
    evaluation: 400 samples, captions as prompts), then again to the ranks every 50 ms until they
    exit, so that repeats land during the checkpoint. The evaluation is abandoned (nothing logged),
    the checkpoint of step 1 is whole, and resuming reproduces the uninterrupted run."""
    args = common(cache, "data.loader.batch_size=2", "data.loader.num_workers=2", "deepspeed=zero3",
                  "trainer.ckpt_every=100", "trainer.max_steps=6", "trainer.sample_log=true")
    evals = (f"eval.shards=[{cache / 'shards'}]", "eval.patches=[]", "eval.fid_size=64", "eval.num_samples=400",
             "eval.batch_size=2", "eval.features.kind=randinit", "eval.features.dim=8",
             f"eval.stats_cache={tmp_path / 'stats'}")
    run(DIFF, tmp_path, "straight", *args, nproc=2)
    proc = subprocess.Popen(train_cmd(DIFF, tmp_path, "stopped", *args, *evals, "trainer.eval_every=1", nproc=2),
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = LineReader(proc)
    if not output.wait_for("evaluating at step 1", timeout=300):
        for process in step_tree(proc.pid):
            process.kill()
        pytest.fail("no evaluation started: " + "".join(output.lines)[-4000:])
    tree = step_tree(proc.pid)
    ranks = psutil.Process(proc.pid).children()
    for process in tree:
        process.send_signal(signal.SIGTERM)
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks):
        for p in ranks:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        time.sleep(0.05)
    out = output.text(proc, timeout=60)
    stopped = re.search(r"stopped at step (\d+) by SIGTERM", out)
    assert stopped and int(stopped.group(1)) == 1, out[-4000:]
    assert "evaluation stopped by the stop signal: nothing logged for it" in out, out[-4000:]
    assert not [k for k in metrics(tmp_path, "stopped")[1] if k.startswith("eval/")]
    step = int(stopped.group(1))
    # A repeat reached rank 0 while it was writing the checkpoint (between its start and its log line).
    stamp = r"\[rank0\] (\S+ \S+) \w+ train\S*: "
    saved_at = _log_time(re.search(stamp + "saved checkpoint", out).group(1))
    save_s = json.loads(
        (tmp_path / "stopped" / "checkpoints" / f"step_{step:07d}" / "state.json").read_text())["save_s"]
    repeats = [_log_time(t) for t in re.findall(stamp + "received SIGTERM again", out)]
    assert any(saved_at - save_s - 0.01 <= t <= saved_at for t in repeats), (repeats, saved_at, save_s)
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == ["latest", f"step_{step:07d}"]
    run(DIFF, tmp_path, "stopped", *args, *evals, "trainer.eval_every=0", nproc=2)
    straight, resumed = metrics(tmp_path, "straight"), metrics(tmp_path, "stopped")
    assert sorted(resumed) == list(range(1, 7))
    for s in range(1, 7):
        assert_close(straight[s], resumed[s], ("loss",), rtol=1e-6)
    assert sample_keys(tmp_path, "stopped") == sample_keys(tmp_path, "straight")
    assert straight[1]["latent_scale"] == resumed[6]["latent_scale"] > 0
    record = read_record(tmp_path / "straight" / "export" / "unet")
    assert record.ema and record.latent_scale == straight[1]["latent_scale"] and record.text.kind == "openclip"


def _log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def eval_args(cache, stats) -> tuple[str, ...]:
    """In-training evaluation on the cache's source images (short side 70): FID at 64, 4 samples."""
    return ("trainer.eval_every=2", f"eval.shards=[{cache / 'shards'}]", "eval.patches=[]", "eval.fid_size=64",
            "eval.num_samples=4", "eval.batch_size=2", "eval.features.kind=randinit", "eval.features.dim=8",
            f"eval.stats_cache={stats}")


@pytest.mark.slow
def test_wandb_sample_panels_eval_metrics_and_sampling_the_export(tmp_path, cache):
    run(DIFF, tmp_path, "wb", *common(cache, "logger=wandb", "trainer.max_steps=2", "trainer.image_every=2",
                                      "trainer.ckpt_every=100", "diffusion.latent_scale=1.0",
                                      *eval_args(cache, tmp_path / "stats"), "eval.clip_score=true",
                                      "eval.clip.model=ViT-S-32", "eval.clip.pretrained=null"))
    history, config = history_and_config(next((tmp_path / "wb" / "wandb").glob("offline-run-*/*.wandb")))
    last = history[-1]
    # Evaluated at step 2 with the EMA UNet: random-init feature and CLIP networks, named so.
    evals = {k: v for k, v in last.items() if k.startswith("eval/")}
    assert sorted(evals) == ["eval/clip_score_randinit", "eval/fid_64_randinit", "eval/prompts_empty",
                             "eval/seconds"], evals
    assert evals["eval/prompts_empty"] == 0  # eval.prompts=captions: the real images' captions
    assert evals["eval/fid_64_randinit"] > 0 and 0 <= evals["eval/clip_score_randinit"] <= 100
    logged = metrics(tmp_path, "wb")
    assert "eval/fid_64_randinit" in logged[2] and not [k for k in logged[1] if k.startswith("eval/")]
    assert isinstance(last["loss"], float) and last["samples/64/width"] == 64 and last["samples/128/width"] == 128
    assert last["latent_scale"] == 1.0  # the paper's raw latents, not the estimate
    assert last["samples/64/count"] == 2  # one image per prompt, captioned with it
    assert last["samples/64/captions"] == ["a photograph", "a painting"]
    assert config["unet"]["context_dim"] == 512
    unet = tmp_path / "wb" / "export" / "unet"
    assert read_record(unet).latent_scale == 1.0
    cmd = [sys.executable, "-m", "infd.cli", "sample", "--ae", str(cache / "ae"), "--unet", str(unet), "--prompt",
           "a photo", "--size", "300x200", "--steps", "4", "--seed", "7"]
    for name, extra in (("a.png", []), ("b.png", []), ("r.png", ["--region", "20,10,120,90"])):
        res = subprocess.run(cmd + ["--out", str(tmp_path / name), *extra], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-2000:]
    a, b, r = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png", "r.png"))
    assert a.shape == (200, 300, 3) and np.array_equal(a, b)  # same seed, same image
    assert np.array_equal(a[10:90, 20:120], r)  # a region is the crop of the full render


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "superres"])
def test_stage2_on_image_shards_encodes_the_encoder_inputs_on_the_fly(tmp_path, cache, kind):
    """data.kind=shards: 2 ranks x 2 loader workers, p_hr 0.5; the loader builds no GT patches
    (patch.gt is off in stage 2), the autoencoder encodes the batches, the latent scale is
    estimated from the shards and checkpointed as the task's state. superres: a super-resolution UNet
    (unet.lowres_channels) conditioned on the encoded low-resolution views (blurred and JPEG-compressed at
    random, noise-augmented) with the alignment loss on GT patches, stopped mid-epoch and resumed: the same
    losses as the run straight through."""
    write_folder(tmp_path / "src", [(80 + 5 * i, 70) for i in range(16)])  # long side >= 120: 8 high-res
    build(tmp_path / "src", str(tmp_path / "shards"), "--min-side", "64", "--samples-per-shard", "4",
          "--hr-threshold", "120")
    args = ("experiment=diffusion_cpu_tiny", "data=shards", f"data.loader.shards={tmp_path / 'shards'}",
            f"data.autoencoder={cache / 'ae'}", "data.loader.num_workers=2", "data.loader.p_hr=0.5",
            "data.loader.batch_size=2", "data.loader.patch.encoder_size=64", "data.loader.patch.patch_size=64",
            "data.loader.patch.r_max=128", "trainer.image_every=1000",
            "diffusion.latent_scale_samples=8", "text.kind=none", "unet.context_dim=0")
    if kind == "superres":
        args += ("unet.lowres_channels=3", "data.loader.patch.lowres.enabled=true",
                 "data.loader.patch.lowres.blur_p=0.5", "data.loader.patch.lowres.jpeg_p=0.5", "trainer.ckpt_every=2",
                 # the alignment loss on GT patches (every t, random-init LPIPS: offline)
                 "data.loader.patch.gt=true", "diffusion.align.enabled=true", "diffusion.align.t_max=1000",
                 "diffusion.align.lpips=random")
    steps = 4 if kind == "superres" else 2  # an epoch: 8 main samples + 8 high-res slots over 2 ranks x 2
    run(DIFF, tmp_path, "img", *args, f"trainer.max_steps={steps}", nproc=2)
    logged = metrics(tmp_path, "img")
    assert sorted(logged) == list(range(1, steps + 1)) and all(np.isfinite(logged[s]["loss"]) for s in logged)
    state = json.loads((tmp_path / "img" / "checkpoints" / "step_0000002" / "state.json").read_text())
    assert state["task"] == {"latent_scale": logged[1]["latent_scale"]} and logged[1]["latent_scale"] != 1.0
    if kind == "superres":
        run(DIFF, tmp_path, "cut", *args, "trainer.max_steps=2", nproc=2)
        run(DIFF, tmp_path, "cut", *args, f"trainer.max_steps={steps}", nproc=2)
        resumed = metrics(tmp_path, "cut")
        assert sorted(resumed) == sorted(logged)
        for step in logged:
            assert_close(logged[step], resumed[step], ("loss", "loss_mse", "loss_align"), rtol=1e-6)
            assert logged[step]["loss_align"] > 0
