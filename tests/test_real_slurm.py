"""The cluster scripts on a real SLURM (Debian's slurm-wlm, one node: this machine; tests/slurm_cluster.py),
submitted as docs/clusters.md tells a CPU user: `--gpus-per-node=0` with NPROC_PER_NODE=2 (2 ranks),
logs under the run root. Training runs with 2 loader workers per rank on real shards with p_hr > 0.

- The time limit's stop (`--signal=B:USR1@N` sends USR1 to the batch shell: `scancel --batch
  --signal=USR1`) checkpoints, requeues the job, and the requeued job resumes to the losses and
  samples of the uninterrupted run, every step logged once.
- `scancel --signal=TERM` (to every process of the job's steps) leaves a checkpoint and ends the job
  FAILED with exit code 143 (128 + SIGTERM), which `scontrol show job` tells from a crash's 1.
  (Resuming it is the time-limit test's resume: the same command in the same run directory.)
- cluster/slurm/index_shards.sbatch as an array plus a dependent merge writes the one-pass index.
"""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, install_or_skip_reason
from tests.test_preemption import ae_args, shards  # noqa: F401 -- the module fixture of the same shards
from tests.test_train_autoencoder import AE, COMPARED
from tests.training import ROOT, assert_close, metrics, run, sample_keys

pytestmark = [pytest.mark.real_slurm, pytest.mark.slow]
STEPS = 8
FIXTURE = ROOT / "tests" / "fixtures" / "img2dataset" / "shards"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = install_or_skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def straight(shards):  # noqa: F811
    root = Path(shards).parent / "straight_slurm"
    run(AE, root, "straight", *ae_args(shards), nproc=2)
    return root


def submit(slurm: SlurmCluster, root: Path, name: str, shards: Path) -> int:  # noqa: F811
    """The documented CPU submission: logs under the run root, 2 ranks on one node."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    script = str(ROOT / "cluster" / "slurm" / "autoencoder.sbatch")
    return slurm.sbatch("--gpus-per-node=0", "--nodes=1", "--cpus-per-task=2", "--mem=6G",
                        f"--output={root / 'logs'}/%x-%j.out", script, *ae_args(shards), "trainer.log_every=1",
                        INFD_ROOT=str(ROOT), RUN_ROOT=str(root), RUN_NAME=name, NPROC_PER_NODE="2",
                        PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")


def wait_for_training(slurm: SlurmCluster, job: int, metrics_file: Path, n: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while not metrics_file.exists() or len(metrics_file.read_text().splitlines()) < n:
        state = slurm.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, slurm.logs())
        assert time.time() < deadline, slurm.logs()
        time.sleep(0.1)
    return len(metrics_file.read_text().splitlines())


def assert_resumed_exactly(root: Path, name: str, straight: Path) -> None:
    expected, resumed = metrics(straight, "straight"), metrics(root, name)
    lines = (root / name / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS and sorted(resumed) == list(range(1, STEPS + 1))  # every step once
    for step in resumed:
        assert_close(expected[step], resumed[step], COMPARED, rtol=1e-6)
    assert sample_keys(root, name) == sample_keys(straight, "straight")


def test_time_limit_signal_checkpoints_requeues_and_resumes_exactly(slurm, shards, straight, tmp_path):  # noqa: F811
    job = submit(slurm, tmp_path, "limit", shards)
    seen = wait_for_training(slurm, job, tmp_path / "limit" / "metrics.jsonl", 3)
    slurm.run("scancel", "--batch", "--signal=USR1", str(job))  # what --signal=B:USR1@N sends
    final = slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=400)
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", (final, log[-4000:])
    assert "time limit near: asking the workers to checkpoint, then requeueing job" in log
    stopped = re.search(r"stopped at step (\d+) by SIGUSR1: checkpoint saved", log)
    assert stopped and int(stopped.group(1)) in (seen, seen + 1), log[-4000:]
    assert f"finished at step {STEPS}" in log and "Traceback" not in log
    assert_resumed_exactly(tmp_path, "limit", straight)


def test_scancel_term_leaves_a_checkpoint_and_exit_code_143(slurm, shards, straight, tmp_path):  # noqa: F811
    job = submit(slurm, tmp_path, "term", shards)
    seen = wait_for_training(slurm, job, tmp_path / "term" / "metrics.jsonl", 2)
    slurm.run("scancel", "--signal=TERM", str(job))
    final = slurm.wait_for(job, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300)
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.out"))
    assert (final["JobState"], final["ExitCode"]) == ("FAILED", "143:0"), (final, log[-4000:])
    stopped = re.search(r"stopped at step (\d+) by SIGTERM: checkpoint saved", log)
    assert stopped and int(stopped.group(1)) in (seen, seen + 1), log[-4000:]
    assert "exit status 143" in log and "Traceback" not in log and "SignalException" not in log
    step = int(stopped.group(1))
    assert (tmp_path / "term" / "checkpoints" / "latest").read_text() == f"step_{step:07d}"
    # The steps before the stop are the uninterrupted run's (resuming it exactly: the time-limit test).
    logged, expected = metrics(tmp_path, "term"), metrics(straight, "straight")
    assert sorted(logged) == list(range(1, step + 1))
    for s in logged:
        assert_close(expected[s], logged[s], COMPARED, rtol=1e-6)


def test_index_array_and_dependent_merge_write_the_one_pass_index(slurm, tmp_path):
    script = str(ROOT / "cluster" / "slurm" / "index_shards.sbatch")
    knobs = dict(SHARDS=str(FIXTURE), INDEX_DIR=str(tmp_path / "index"), PYTHON=sys.executable, INFD_ROOT=str(ROOT))
    logs = tmp_path / "logs"
    logs.mkdir()
    parts = slurm.sbatch("--array=0-1", "--cpus-per-task=1", "--mem=1G", f"--output={logs}/%x-%A_%a.out", script,
                         **knobs)
    merge = slurm.sbatch(f"--dependency=afterok:{parts}", "--cpus-per-task=1", "--mem=1G",
                         f"--output={logs}/%x-merge-%j.out", script, MERGE="1", **knobs)
    final = slurm.wait_for(merge, ("COMPLETED", "FAILED", "CANCELLED"), timeout=300)
    assert final["JobState"] == "COMPLETED", (final, *(p.read_text() for p in logs.iterdir()))
    subprocess.run([sys.executable, "-m", "data_prep.index_shards", str(FIXTURE), "--output", str(tmp_path / "one"),
                    "--workers", "1"], check=True, capture_output=True, cwd=ROOT)
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "index").iterdir() if p.name != "parts")
    for name in names:
        assert (tmp_path / "index" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert sorted(p.name for p in logs.iterdir()) == [f"infd-index-{parts}_0.out", f"infd-index-{parts}_1.out",
                                                        f"infd-index-merge-{merge}.out"]
