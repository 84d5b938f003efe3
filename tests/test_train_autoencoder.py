"""Stage-1 training in real processes: distributed equivalence, exact resume, crash safety, W&B."""
import shutil
import signal
import subprocess

import pytest

from infd.data.sample_index import SampleIndex
from tests.images import build, write_folder
from tests.test_export import check_autoencoder_exports
from tests.training import (ROOT, assert_close, env, metrics, run, sample_keys, step_tree, train_cmd,
                            wait_for_step)
from tests.wandb_reader import history_and_config

AE = "train.autoencoder"
TINY = ("experiment=ae_cpu_tiny", "trainer.image_every=1000")
COMPARED = ("loss_g", "l1", "lpips_randinit", "bottleneck", "gan_g", "adaptive_weight", "loss_d")


@pytest.mark.slow
def test_two_ranks_zero2_match_one_process_and_export_their_checkpoints_as_the_run_does(tmp_path, capsys):
    """The 2-rank run also keeps an EMA and checkpoints and exports every 2 steps (neither changes
    its training): its checkpoints export to what the run itself exported (tests/test_export.py)."""
    steps = ("trainer.max_steps=4", "trainer.ckpt_every=100")
    run(AE, tmp_path, "one", *TINY, *steps, "data.loader.batch_size=4", "deepspeed=zero2")
    run(AE, tmp_path, "two", *TINY, *steps, "data.loader.batch_size=2", "deepspeed=zero2", "trainer.ckpt_every=2",
        "trainer.export_every=2", "trainer.ema=true", nproc=2)
    check_autoencoder_exports(tmp_path / "two", tmp_path / "step2_export", capsys)
    one, two = metrics(tmp_path, "one"), metrics(tmp_path, "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    # Steps 1-2 (the forward, lambda, and the first update): equal up to fp32 reduction order.
    for step in (1, 2):
        assert_close(one[step], two[step], COMPARED, rtol=1e-4)
    # Later, Adam's normalised updates amplify those 1e-7 rounding differences (a sum over a batch
    # of 4 vs two batches of 2 averaged by all-reduce); the losses still agree closely.
    for step in (3, 4):
        assert_close(one[step], two[step], ("loss_g", "l1", "lpips_randinit", "loss_d"), rtol=2e-3)


@pytest.mark.slow
def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    # Without the GAN term the objective is a plain mean, so 2 micro-batches of 2 must give the
    # update of one batch of 4. (With it, lambda is computed per micro-batch, as in the reference
    # code, and the two runs differ by about 1% after one update.)
    steps = ("trainer.max_steps=3", "trainer.ckpt_every=100", "loss.disc_start=100")
    run(AE, tmp_path, "big", *TINY, *steps, "data.loader.batch_size=4", "trainer.image_every=3", "logger=none")
    run(AE, tmp_path, "accum", *TINY, *steps, "data.loader.batch_size=2", "deepspeed.grad_accum=2")
    big, accum = metrics(tmp_path, "big"), metrics(tmp_path, "accum")
    for step in (1, 2, 3):
        assert_close(big[step], accum[step], ("l1", "lpips_randinit", "bottleneck"), rtol=1e-4)
    # Without W&B the image panels are files: PNGs per step and a page that shows them.
    images = tmp_path / "big" / "images"
    assert (images / "step_0000003" / "recon_256.png").exists() and "step_0000003/recon_256.png" in (
        images / "index.html").read_text()


@pytest.fixture(scope="module")
def epoch_shards(tmp_path_factory):
    """12 main-stream images and 4 high-res ones (long side 128 >= 125): with p_hr 0.5 an epoch is
    24 slots, 6 steps of a global batch of 4."""
    tmp = tmp_path_factory.mktemp("elastic")
    write_folder(tmp / "src", [(128 if i % 4 == 3 else 104, 112) for i in range(16)], captions=False)
    build(tmp / "src", str(tmp / "shards"), "--min-side", "64", "--samples-per-shard", "3", "--hr-threshold", "125")
    return tmp / "shards"


def _resume_from(tmp_path, source: str, step: int, name: str) -> None:
    """A new run directory `name` holding only run `source`'s checkpoint of `step`."""
    ckpts = tmp_path / name / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(tmp_path / source / "checkpoints" / f"step_{step:07d}", ckpts / f"step_{step:07d}")
    (ckpts / "latest").write_text(f"step_{step:07d}")


@pytest.mark.slow
def test_mid_epoch_checkpoints_resume_at_another_world_size_exactly(tmp_path, epoch_shards):
    """Three runs chained over the 6-step epoch and 2 steps of the next, each with the same global batch:
    2 ranks uninterrupted to step 6 ("two"); 1 rank from its step-4 checkpoint to step 8 ("one"); 2 ranks
    from the 1-rank run's step-6 checkpoint ("back", steps 7-8). Both directions (2 -> 1, 1 -> 2) continue
    exactly: the resumed steps equal the run they continue (the order and the crops do not depend on the
    world size), and the epoch trains on every main-stream sample exactly once."""
    common = (*TINY, "trainer.ckpt_every=2", "deepspeed=zero2", "trainer.sample_log=true",
              "data.kind=shards", f"data.loader.shards={epoch_shards}", "data.loader.num_workers=2",
              "data.loader.p_hr=0.5", "data.loader.patch.r_max=96",
              # Step 6 is also evaluated (4 held-out images, sharded over the ranks there are).
              "trainer.eval_every=6", f"eval.shards=[{epoch_shards}]", "eval.num_images=4", "eval.scales=[1]")
    run(AE, tmp_path, "two", *common, "trainer.max_steps=6", "data.loader.batch_size=2", nproc=2)
    _resume_from(tmp_path, "two", 4, "one")
    res = run(AE, tmp_path, "one", *common, "trainer.max_steps=8", "data.loader.batch_size=4", nproc=1)
    assert "written by 2 ranks" in res.stdout + res.stderr
    _resume_from(tmp_path, "one", 6, "back")
    res = run(AE, tmp_path, "back", *common, "trainer.max_steps=8", "data.loader.batch_size=2", nproc=2)
    assert "written by 1 ranks" in res.stdout + res.stderr
    two, one, back = metrics(tmp_path, "two"), metrics(tmp_path, "one"), metrics(tmp_path, "back")
    assert sorted(one) == [5, 6, 7, 8] and sorted(back) == [7, 8]
    for before, after, steps in ((two, one, (5, 6)), (one, back, (7, 8))):  # same batches, weights, moments
        for step in steps:
            assert_close(before[step], after[step], COMPARED, rtol=1e-4)
    assert_close(two[6], one[6], ["eval/psnr_1x", "eval/lpips_1x_randinit"], rtol=1e-4)  # 2 ranks, 1 rank
    keys = {name: sample_keys(tmp_path, name) for name in ("two", "one", "back")}
    for before, after, steps in (("two", "one", (5, 6)), ("one", "back", (7, 8))):
        assert {s: sorted(keys[after][s]) for s in steps} == {s: sorted(keys[before][s]) for s in steps}
    index = SampleIndex.open(epoch_shards)
    hr = {index.key(int(i)) for i in index.hr_ids}
    trained = [k for step in range(1, 7) for k in keys["two" if step <= 4 else "one"][step] if k not in hr]
    assert len(hr) == 4 and sorted(trained) == sorted({index.key(i) for i in range(16)} - hr)  # each once


@pytest.mark.slow
def test_killed_during_a_background_save_resumes_from_the_previous_checkpoint_exactly(tmp_path):
    """2 ranks save step 2 and step 4 in the background; step 4's writers stop after their first file
    (fault injection) while training goes on to step 5, and the whole process tree is killed (SIGKILL,
    as a node failure): `latest` stays on step 2, step 4 is never published, and the resumed run's
    steps 3-5 equal the killed run's bit for bit (the same world size)."""
    steps = (*TINY, "trainer.max_steps=6", "trainer.ckpt_every=2", "trainer.ema=true", "data.loader.batch_size=2",
             "deepspeed=zero2")
    ckpts, log = tmp_path / "kill" / "checkpoints", tmp_path / "kill" / "metrics.jsonl"
    proc = subprocess.Popen(train_cmd(AE, tmp_path, "kill", *steps, nproc=2), cwd=ROOT, start_new_session=True,
                            env=env(INFD_FAULT_INJECT="hold_background_save:4"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(log, 5, proc)  # step 5 trained while step 4's files were being written
        assert any((ckpts / "step_0000004.tmp").rglob("*.safetensors"))
    finally:
        for process in step_tree(proc.pid):  # torchrun starts each rank in a session of its own
            process.send_signal(signal.SIGKILL)
        proc.wait()
    assert (ckpts / "latest").read_text() == "step_0000002"
    assert not (ckpts / "step_0000004").exists()
    killed = metrics(tmp_path, "kill")
    run(AE, tmp_path, "kill", *steps, nproc=2)  # resume=auto picks step 2 and finishes
    resumed = metrics(tmp_path, "kill")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6] and (ckpts / "latest").read_text() == "step_0000006"
    assert not (ckpts / "step_0000004.tmp").exists()  # the cut-short save is cleared once a later one is published
    for step in (3, 4, 5):
        assert {k: resumed[step][k] for k in COMPARED} == {k: killed[step][k] for k in COMPARED}, step


@pytest.mark.slow
def test_wandb_offline_run_holds_scalars_and_image_panels(tmp_path):
    from tests.images import build, write_folder

    write_folder(tmp_path / "src", [(200 + 13 * i, 180) for i in range(12)])
    build(tmp_path / "src", str(tmp_path / "shards"), "--min-side", "64")
    run(AE, tmp_path, "wb", "experiment=ae_cpu_tiny", "logger=wandb", "data=shards",
        f"data.loader.shards={tmp_path / 'shards'}", "data.loader.num_workers=1", "data.loader.batch_size=2",
        "trainer.max_steps=2", "trainer.image_every=2", "trainer.ckpt_every=100", "data.loader.patch.r_max=128",
        "trainer.eval_every=2", f"eval.shards=[{tmp_path / 'shards'}]", "eval.num_images=2", "eval.scales=[1,2]")
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    history, config = history_and_config(next(runs[0].glob("*.wandb")))
    assert [row["_step"] for row in history] == [1, 2]
    last = history[-1]
    for key in ("loss_g", "l1", "lpips_randinit", "adaptive_weight", "loss_d", "grad_norm/generator",
                "grad_norm/discriminator", "lr/generator", "perf/samples_per_s", "perf/data_wait_frac",
                "data/skipped_total", "bottleneck/codes_used"):
        assert isinstance(last[key], (int, float)), key
    for panel, size in (("input", 64), ("recon_256", 256), ("recon_512", 512), ("recon_1024", 1024),
                        ("zoom_4096_center_256", 256)):
        assert last[f"images/{panel}/count"] == 2 and last[f"images/{panel}/width"] == size, panel
    # Reconstruction of 2 held-out images by the EMA model at 64 and 128 (the images' short side is 180).
    evals = sorted(k for k in last if k.startswith("eval/"))
    assert evals == ["eval/lpips_1x_randinit", "eval/psnr_1x", "eval/psnr_2x", "eval/scale_consistency_psnr_1x",
                     "eval/seconds"], evals
    assert 0 < last["eval/psnr_1x"] < 60 and 0 < last["eval/psnr_2x"] < 60
    media = list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert len(media) == 10  # 5 panels x 2 images
    assert config["loss"]["lpips_backbone"] == "random" and config["deepspeed"]["zero_stage"] == 2
    assert (tmp_path / "wb" / "export" / "autoencoder" / "model.safetensors").exists()


def test_config_secrets_are_redacted():
    from train.logger import redact

    cfg = {"logger": {"api_key": "abc", "project": "p"}, "s3": {"secret_access_key": "x", "token": ""}}
    assert redact(cfg) == {"logger": {"api_key": "<redacted>", "project": "p"},
                           "s3": {"secret_access_key": "<redacted>", "token": ""}}


@pytest.mark.slow
def test_zero3_is_refused_with_the_reason(tmp_path):
    res = run(AE, tmp_path, "z3", *TINY, "deepspeed=zero3", "trainer.max_steps=1", check=False)
    assert res.returncode == 2 and "deepspeed.zero_stage" in res.stderr and "adaptive GAN" in res.stderr


@pytest.mark.slow
def test_bad_override_names_the_key(tmp_path):
    res = run(AE, tmp_path, "bad", *TINY, "trainer.max_stepz=3", check=False)
    assert res.returncode != 0 and "max_stepz" in res.stderr
    res = run(AE, tmp_path, "bad", *TINY, "model.renderer.kind=clf", check=False)
    assert res.returncode == 2 and "model.renderer.kind" in res.stderr


def test_local_rank_argument_is_moved_to_the_environment(monkeypatch):
    from train.dist import strip_local_rank_arg

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank_arg(["prog", "--local_rank=3", "a=1"]) == ["prog", "a=1"]
    import os

    assert os.environ["LOCAL_RANK"] == "3"
    assert strip_local_rank_arg(["prog", "--local-rank", "5", "b=2"]) == ["prog", "b=2"]
