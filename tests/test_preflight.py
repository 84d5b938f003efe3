"""Preflight checks: each problem found with the setting to change, and a failing job stops on
every rank (exit 2) instead of training wrongly or hanging."""
import json
import subprocess

import boto3
import pytest
import torch

from infd.data.loader import DataConfig
from tests.images import build, write_folder
from tests.s3_server import MotoServer, use_endpoint
from tests.training import ROOT, env, train_cmd
from train.config import TrainerConfig
from train.dist import DistInfo
from train.preflight import Findings, check_data, check_resume, check_s3, check_shared

CPU = torch.device("cpu")


def rank(r: int, world: int) -> DistInfo:
    return DistInfo(r, r, world, CPU)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    write_folder(root / "src", [(96, 96)] * 24, captions=False)
    build(root / "src", str(root / "shards"), "--min-side", "64", "--samples-per-shard", "6")
    return root / "shards"


def test_an_epoch_without_a_batch_is_an_error_naming_the_keys(shards):
    found = Findings()
    check_data(DataConfig(shards=[str(shards)], batch_size=13, num_workers=2), "data.loader", rank(0, 2), found)
    assert len(found.errors) == 1
    assert "24 samples per epoch for 2 ranks x data.loader.batch_size=13" in found.errors[0]
    ok = Findings()  # workers do not divide the data: 4 shards are enough for 2 ranks x 4 workers
    check_data(DataConfig(shards=[str(shards)], batch_size=12, num_workers=4), "data.loader", rank(0, 2), ok)
    assert ok.errors == [] and ok.warnings == []


def test_an_all_high_res_set_with_p_hr_says_why_there_is_nothing_to_train_on(shards):
    found = Findings()  # every image is 96 px: with --hr-threshold 64 all of them are high-res
    hr = shards.parent / "all_hr"
    build(shards.parent / "src", str(hr), "--min-side", "64", "--samples-per-shard", "6", "--hr-threshold", "64")
    check_data(DataConfig(shards=[str(hr)], batch_size=2, p_hr=0.5), "data.loader", rank(0, 2), found)
    assert len(found.errors) == 1 and "every sample of this set is high-res" in found.errors[0]
    assert "set data.loader.p_hr=0" in found.errors[0]


def test_missing_shards_and_index_are_named(tmp_path, shards):
    found = Findings()
    check_data(DataConfig(shards=[str(tmp_path / "none-{0..3}.tar")]), "data.loader", rank(0, 1), found)
    check_data(DataConfig(shards=[str(shards / "*.tar")], index=str(tmp_path / "x.json")), "data.loader",
               rank(0, 1), found)
    assert "cannot read the shard index" in found.errors[-1] and "data.loader.index" in found.errors[-1]


def test_the_shard_cache_folder_is_checked_for_room_and_write_access(tmp_path, shards):
    """read_mode=shard_cache (here on local shards): a bound larger than the disk is a warning naming the
    keys, a folder that cannot be made is an error."""
    found = Findings()
    cfg = DataConfig(shards=[str(shards)], read_mode="shard_cache", cache_dir=str(tmp_path / "c"), cache_gb=1e9)
    check_data(cfg, "data.loader", rank(0, 1), found)
    assert found.errors == [] and len(found.warnings) == 1
    assert "data.loader.cache_gb=1e+09" in found.warnings[0] and "data.loader.cache_dir" in found.warnings[0]
    (tmp_path / "file").write_text("")
    bad = Findings()
    check_data(DataConfig(shards=[str(shards)], read_mode="shard_cache", cache_dir=str(tmp_path / "file" / "c")),
               "data.loader", rank(0, 1), bad)
    assert len(bad.errors) == 1 and "data.loader.cache_dir" in bad.errors[0]
    fine = Findings()
    check_data(DataConfig(shards=[str(shards)], read_mode="shard_cache", cache_dir=str(tmp_path / "c"), cache_gb=0.001),
               "data.loader", rank(0, 1), fine)
    assert fine.errors == fine.warnings == []


def test_s3_reachability(monkeypatch):
    server = MotoServer()
    try:
        use_endpoint(monkeypatch, server.url)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="bucket")
        s3.put_object(Bucket="bucket", Key="shards/000.tar", Body=b"x")
        found = Findings()
        check_s3("s3://bucket/shards/000.tar", "data.loader.shards", found)
        assert found.errors == []
        check_s3("s3://bucket/shards/001.tar", "data.loader.shards", found)
        assert "cannot read s3://bucket/shards/001.tar" in found.errors[0] and server.url in found.errors[0]
    finally:
        server.stop()


def test_run_directory_not_shared_between_nodes(tmp_path):
    probes = tmp_path / ".preflight"
    probes.mkdir()
    (probes / "rank00000").write_text("job2 node-a")  # rank 1 wrote its probe on another machine's disk
    found = Findings()
    check_shared(probes, rank(0, 2), "job2", found)
    assert "is not shared" in found.errors[0] and "ranks [1]" in found.errors[0]
    (probes / "rank00001").write_text("job1 node-a")  # left by an earlier job: does not count
    found = Findings()
    check_shared(probes, rank(0, 2), "job2", found)
    assert "ranks [1]" in found.errors[0]
    (probes / "rank00001").write_text("job2 node-b")
    found = Findings()
    check_shared(probes, rank(0, 2), "job2", found)
    assert found.errors == []


def _checkpoint(root, world_size: int, portable: bool, save_s: float = 1.0):
    path = root / "step_0000004"
    (path / "portable").mkdir(parents=True)
    (path / "state.json").write_text(json.dumps({"step": 4, "world_size": world_size, "engines": ["generator"],
                                                 "save_s": save_s}))
    if portable:
        (path / "portable" / "generator.safetensors").write_bytes(b"")
    (root / "latest").write_text(path.name)


def test_checkpoint_world_size(tmp_path, monkeypatch):
    _checkpoint(tmp_path / "a", world_size=4, portable=False)
    found = Findings()
    check_resume(TrainerConfig(), tmp_path / "a", rank(0, 2), found)
    assert "written by 4 ranks and has no portable weights" in found.errors[0] and "resume it with 4" in found.errors[0]
    _checkpoint(tmp_path / "b", world_size=4, portable=True)
    found = Findings()
    check_resume(TrainerConfig(), tmp_path / "b", rank(0, 2), found)
    assert found.errors == [] and "re-partitioned" in found.warnings[0]
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    found = Findings()
    check_resume(TrainerConfig(resume="never"), tmp_path / "b", rank(0, 2), found)
    assert "trainer.resume=never under torchrun --max-restarts 3" in found.errors[0]


def test_a_checkpoint_slower_than_the_grace_period_is_warned(tmp_path):
    _checkpoint(tmp_path, world_size=2, portable=True, save_s=42.0)
    found = Findings()
    check_resume(TrainerConfig(grace_s=30), tmp_path, rank(0, 2), found)
    assert found.errors == [] and "took 42.0 s to save, more than trainer.grace_s=30" in found.warnings[0]
    found = Findings()
    check_resume(TrainerConfig(grace_s=60), tmp_path, rank(0, 2), found)
    assert found.warnings == []


@pytest.mark.slow
def test_failing_preflight_stops_every_rank(tmp_path, shards):
    cmd = train_cmd("train.autoencoder", tmp_path, "bad", "experiment=ae_cpu_tiny", "data=shards",
                    f"data.loader.shards={shards}", "data.loader.batch_size=16", "data.loader.num_workers=1", nproc=2)
    res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert out.count("preflight failed") == 1 and "for 2 ranks x data.loader.batch_size=16" in out
    assert "exitcode  : 2" in out and "step 1" not in out  # both ranks exited 2 before training
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_the_no_checkpoint_warning_counts_from_the_checkpoint_the_run_resumes_from(tmp_path):
    from types import SimpleNamespace

    from train.preflight import check_config, resume_step

    def warnings(max_steps: int, ckpt_every: int, start: int) -> list[str]:
        found = Findings()
        cfg = SimpleNamespace(trainer=TrainerConfig(max_steps=max_steps, ckpt_every=ckpt_every),
                              logger=SimpleNamespace(kind="jsonl"))
        check_config(cfg, found, start)
        return found.warnings

    assert resume_step(TrainerConfig(), tmp_path / "none") == 0
    _checkpoint(tmp_path, world_size=2, portable=True)
    assert resume_step(TrainerConfig(), tmp_path) == 4 and resume_step(TrainerConfig(resume="never"), tmp_path) == 0
    assert "a failure restarts from step 0." in warnings(8, 100, 0)[0]
    assert "a failure restarts from step 4, the checkpoint this run resumes from" in warnings(8, 100, 4)[0]
    assert warnings(12, 5, 4) == []  # step 5 is checkpointed before the end
    assert "between step 6 and the end" in warnings(12, 6, 6)[0]  # the next one would be at the end
