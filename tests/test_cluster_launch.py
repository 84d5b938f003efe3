"""SLURM and torchrun launch scripts (and benchmarks/*.sh): lint, command lines rendered from a fake SLURM
environment, and the requeue path, with the stand-in `srun`/`scontrol` of tests/fake_slurm on PATH."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.launch import torchrun_command
from train.slurm_env import SlurmEnvError, expand_nodelist, gpus_per_node, slurm_dist_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("cluster/**/*.sh"), *ROOT.glob("cluster/**/*.sbatch"), *ROOT.glob("benchmarks/*.sh")])
SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "infd-autoencoder", "SLURM_JOB_NODELIST": "gpu[001-002]",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64",
             "SLURM_SUBMIT_DIR": str(ROOT)}


def test_scripts_pass_bash_n_and_shellcheck():
    assert len(SCRIPTS) >= 5
    shellcheck = Path(sys.executable).parent / "shellcheck"
    for script in SCRIPTS:
        subprocess.run(["bash", "-n", str(script)], check=True)
    res = subprocess.run([str(shellcheck), "--severity=info", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu001", ["gpu001"]),
    ("gpu[001-003,007]", ["gpu001", "gpu002", "gpu003", "gpu007"]),
    ("a[8-10],login1", ["a8", "a9", "a10", "login1"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_gpu_count_from_slurm_forms():
    assert gpus_per_node({"SLURM_GPUS_ON_NODE": "4"}) == 4
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": "a100:8"}) == 8
    assert gpus_per_node({}) == 1
    with pytest.raises(SlurmEnvError, match="SLURM_GPUS_PER_NODE.*set NPROC_PER_NODE"):
        gpus_per_node({"SLURM_GPUS_PER_NODE": "many"})
    # sbatch --gpus-per-node=0, the override a CPU job has: one CPU process per node
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": "0", "SLURM_GPUS_ON_NODE": "0"}) == 1
    assert gpus_per_node({"SLURM_GPUS_PER_NODE": "0", "NPROC_PER_NODE": "2"}) == 2
    with pytest.raises(SlurmEnvError, match="NPROC_PER_NODE='0'"):
        gpus_per_node({"NPROC_PER_NODE": "0"})


def test_a_cpu_job_dry_run_renders_one_process_per_node():
    env = {**os.environ, **SLURM_JOB, "SLURM_GPUS_PER_NODE": "0", "SLURM_GPUS_ON_NODE": "0", "INFD_DRY_RUN": "1"}
    res = subprocess.run([sys.executable, "-m", "cluster.launch", "torchrun", "--stage", "autoencoder", "--",
                          "experiment=ae_cpu_tiny"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    assert "--nproc_per_node 1 " in res.stdout


def test_torchrun_command_of_the_second_node():
    env = {**SLURM_JOB, "SLURM_NODEID": "1", "RUN_ROOT": "/shared/runs"}
    cmd = torchrun_command(env, "autoencoder", ["experiment=ae_ffhq_paper"], max_restarts=2, python="python")
    line = shlex.join(cmd)
    assert line.startswith("python -m cluster.elastic --nnodes 2 --nproc_per_node 8 --node_rank 1 "
                           "--rdzv_backend c10d --rdzv_endpoint gpu001:24242 --rdzv_id 4242 --max_restarts 2")
    assert "SIGUSR1" in cmd[cmd.index("--signals_to_handle") + 1]
    assert cmd[cmd.index("-m", 2):] == ["-m", "train.autoencoder", "run.root=/shared/runs",
                                        "run.name=infd-autoencoder-4242", "experiment=ae_ffhq_paper"]
    # The user's own run.name wins; MASTER_PORT overrides the job-derived port.
    cmd = torchrun_command({**env, "MASTER_PORT": "29400"}, "diffusion", ["run.name=mine"], python="python")
    assert "gpu001:29400" in cmd and "train.diffusion" in cmd
    assert [a for a in cmd if a.startswith("run.name=")] == ["run.name=mine"]


def test_distributed_env_of_a_task_srun_started_directly():
    step = {**SLURM_JOB, "SLURM_STEP_NUM_TASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    assert slurm_dist_env(step) == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "gpu001",
                                    "MASTER_PORT": "24242"}
    assert slurm_dist_env(SLURM_JOB) is None  # the batch shell is not a training task
    assert slurm_dist_env({**step, "WORLD_SIZE": "16"}) is None  # torchrun already set it


FAKES = ROOT / "tests" / "fake_slurm"  # stand-in srun, sbatch, sacct and scontrol


def _fake_slurm(tmp_path, **extra):
    return dict(os.environ, **SLURM_JOB, PATH=f"{FAKES}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                FAKE_LOG=str(tmp_path), INFD_DRY_RUN="1", RUN_ROOT="/shared/runs", PYTHON=sys.executable, **extra)


def _spooled(tmp_path, name: str) -> str:
    """sbatch runs a copy of the script from its spool directory, away from the checkout."""
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    (spool / name).write_text((ROOT / "cluster" / "slurm" / name).read_text())
    return str(spool / name)


def test_sbatch_script_renders_one_torchrun_per_node(tmp_path):
    shards = 'data.loader.shards="s3://bucket/ffhq/{00000..00139}.tar"'
    res = subprocess.run(["bash", _spooled(tmp_path, "autoencoder.sbatch"), "experiment=ae_ffhq_paper", shards],
                         cwd=tmp_path, env=_fake_slurm(tmp_path), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    srun = (tmp_path / "srun_args").read_text()
    assert srun.startswith("--kill-on-bad-exit=1 --ntasks-per-node=1")
    assert "--cpus-per-task=64" in srun  # srun does not inherit it from sbatch
    assert "-m cluster.launch torchrun --stage autoencoder -- experiment=ae_ffhq_paper" in srun
    for node in (0, 1):
        cmd = shlex.split((tmp_path / f"task{node}").read_text())
        assert cmd[cmd.index("--node_rank") + 1] == str(node)
        assert cmd[cmd.index("--rdzv_endpoint") + 1] == "gpu001:24242"
        assert cmd[cmd.index("--nnodes") + 1] == "2" and cmd[cmd.index("--nproc_per_node") + 1] == "8"
        assert cmd[-6:] == ["-m", "train.autoencoder", "run.root=/shared/runs", "run.name=infd-autoencoder-4242",
                            "experiment=ae_ffhq_paper", shards]
    assert not (tmp_path / "scontrol").exists()  # no requeue without the time-limit signal


def test_bad_stage_is_refused_with_the_fix(tmp_path):
    env = _fake_slurm(tmp_path, STAGE="vae")
    res = subprocess.run(["bash", "cluster/torchrun/multinode.sh"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "NNODES": "1", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    assert res.returncode == 2 and "STAGE=vae: choose autoencoder or diffusion" in res.stderr


@pytest.mark.parametrize("stage", ["autoencoder", "diffusion"])
def test_submitit_slurm_launcher_config_composes(stage):
    import importlib

    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from infd.config import to_mapping

    module = importlib.import_module(f"train.{stage}")
    cls = module.AutoencoderTrainConfig if stage == "autoencoder" else module.DiffusionTrainConfig
    ConfigStore.instance().store(name=f"{stage}_schema", node=to_mapping(cls()))
    overrides = ["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
                 "hydra.launcher.partition=gpu", f"experiment={'ae' if stage == 'autoencoder' else stage}_cpu_tiny",
                 "run.root=/shared/runs", "run.name=sweep"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(stage, overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"  # the plugin is installed and imports
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)  # a task per GPU
    assert launcher.partition == "gpu" and launcher.max_num_timeout > 0
    assert OmegaConf.select(cfg, "hydra.sweep.dir") == "/shared/runs/sweep"
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra:job.num}"  # one directory per point
