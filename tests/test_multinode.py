"""Multi-node launch, restarts after a killed rank, and local sweeps, all in real processes.

"Nodes" are two torchrun invocations of cluster/torchrun/multinode.sh on this machine, meeting
through a c10d rendezvous on 127.0.0.1, one process each.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.images import build, write_folder
from tests.s3_server import free_port
from tests.training import ROOT, assert_close, env, metrics, sample_keys, train_cmd

AE = "train.autoencoder"
TINY = ("experiment=ae_cpu_tiny", "trainer.image_every=1000", "trainer.log_every=1")
COMPARED = ("loss_g", "l1", "lpips_randinit", "bottleneck", "gan_g", "adaptive_weight", "loss_d")


def _run_together(commands: list[list[str]], envs: list[dict]) -> None:
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, e in zip(commands, envs)]
    outs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * len(procs), "\n".join(o[-3000:] for o in outs)
    assert any("(2 ranks, cpu)" in out for out in outs)


@pytest.mark.slow
def test_slurm_sweep_through_submitit_runs_each_point_as_a_two_rank_job(tmp_path):
    """hydra/launcher=slurm end to end on this machine: hydra-submitit-launcher submits a job array,
    the stand-in sbatch and srun of tests/fake_slurm run it here with one task per "GPU", and the
    tasks take their ranks from SLURM's variables (no torchrun)."""
    fake_env = env(PATH=f"{ROOT / 'tests' / 'fake_slurm'}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path))
    res = subprocess.run([sys.executable, "-m", AE, "-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=2",
                          *TINY, f"run.root={tmp_path}", "run.name=sweep", "trainer.max_steps=1",
                          "optim.lr=1e-4,2e-4"], cwd=ROOT, env=fake_env, capture_output=True, text=True, timeout=600)
    tasks = "".join((tmp_path / f"task{t}").read_text() for t in (0, 1) if (tmp_path / f"task{t}").exists())
    assert res.returncode == 0, res.stderr[-3000:] + tasks[-3000:]
    for job, lr in ((0, 1e-4), (1, 2e-4)):
        assert f"run directory: {tmp_path / 'sweep' / str(job)} (2 ranks, cpu)" in tasks
        assert sorted(metrics(tmp_path / "sweep", str(job))) == [1]
        assert f"lr: {lr}" in (tmp_path / "sweep" / str(job) / "config.yaml").read_text()


def _shards(tmp_path):
    write_folder(tmp_path / "src", [(96 + 8 * (i % 5), 112) for i in range(24)], captions=False)
    build(tmp_path / "src", str(tmp_path / "shards"), "--min-side", "64", "--samples-per-shard", "6")
    return (f"data.loader.shards={tmp_path / 'shards'}", "data.kind=shards", "data.loader.num_workers=1",
            "data.loader.batch_size=2", "data.loader.patch.r_max=96")


def _rank_process(launcher: psutil.Process, rank: str) -> psutil.Process | None:
    for child in launcher.children():
        try:
            if child.environ().get("RANK") == rank:
                return child
        except psutil.Error:
            pass
    return None


@pytest.mark.slow
def test_two_nodes_and_a_killed_rank_restarted_from_its_checkpoint_train_what_one_node_trains(tmp_path):
    """The reference run is two "nodes" (cluster/torchrun/multinode.sh on each, one process per node, a c10d
    rendezvous); the other is one node of two processes whose rank 1 is killed after step 4 and restarted by
    torchrun from the latest checkpoint. Every step of the two equal to 1e-6 and the same samples: two nodes
    train what one node with two processes trains, and the restart loses and repeats nothing."""
    data = _shards(tmp_path)  # 24 samples: an epoch is 6 steps of 2 ranks x 2
    # The high-res fine-tuning switch (GT kept at its original size from the 6th step on) happens in
    # the workers, across the restart.
    switch = ("data.loader.patch.p_keep_late=1.0", "data.loader.patch.p_keep_late_step=5")
    common = (*TINY, *data, *switch, "trainer.max_steps=9", "trainer.ckpt_every=3", "trainer.sample_log=true")
    port = str(free_port())
    _run_together([["bash", "cluster/torchrun/multinode.sh", "run.name=straight", *common]] * 2,
                  [env(NNODES="2", NODE_RANK=str(node), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       RDZV_ID="two-nodes", MAX_RESTARTS="0", PYTHON=sys.executable, RUN_ROOT=str(tmp_path))
                   for node in (0, 1)])

    # A c10d rendezvous: each restart gets fresh store keys. (The static one of --master_addr/port
    # keeps its store, and restarted workers read the previous attempt's addresses.)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max_restarts", "1",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
           *train_cmd(AE, tmp_path, "killed", *common)[1:]]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_file, deadline, victim = tmp_path / "killed" / "metrics.jsonl", time.time() + 300, None
    while time.time() < deadline and victim is None:  # kill rank 1 once rank 0 logged step 4
        if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 4:
            victim = _rank_process(psutil.Process(proc.pid), "1")
        time.sleep(0.05)
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    killed_at = len(metrics_file.read_text().splitlines())
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-5000:]
    assert killed_at < 9, "the run ended before the kill; the test needs slower steps"
    resumed = re.search(r"resumed from \S+/step_(\d+) at step (\d+)", out)
    assert resumed and int(resumed.group(2)) in (3, 6), out[-3000:]  # a checkpoint before the kill

    straight, killed = metrics(tmp_path, "straight"), metrics(tmp_path, "killed")
    assert sorted(killed) == list(range(1, 10))  # each step once, none lost
    state = json.loads((tmp_path / "killed" / "checkpoints" / "step_0000009" / "state.json").read_text())
    assert state["step"] == 9 and state["optimizer_steps"]["generator"] == 9
    for step in killed:
        assert_close(straight[step], killed[step], COMPARED, rtol=1e-6)
        assert killed[step]["data/kept_frac"] == (1.0 if step >= 6 else 0.0)
    samples, reference = sample_keys(tmp_path, "killed"), sample_keys(tmp_path, "straight")
    assert samples == reference
    first_epoch = [k for step in range(1, 7) for k in samples[step]]
    assert len(first_epoch) == len(set(first_epoch)) == 24  # every sample exactly once
    second_epoch = [k for step in range(7, 10) for k in samples[step]]
    assert len(second_epoch) == len(set(second_epoch)) == 12


@pytest.mark.slow
def test_local_sweep_runs_each_point_in_its_own_directory(tmp_path):
    res = subprocess.run([sys.executable, "-m", AE, "-m", *TINY, f"run.root={tmp_path}", "run.name=grid",
                          "trainer.max_steps=2", "optim.lr=1e-4,2e-4", "loss.l1_weight=1.0,0.5"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    grid = {}
    for job in range(4):
        cfg = (tmp_path / "grid" / str(job) / "config.yaml").read_text()
        lr = float(cfg.split("optim:\n  lr: ")[1].split("\n")[0])
        l1 = float(cfg.split("l1_weight: ")[1].split("\n")[0])
        grid[(lr, l1)] = job
        assert sorted(metrics(tmp_path / "grid", str(job))) == [1, 2]
        assert (tmp_path / "grid" / str(job) / "export" / "autoencoder").is_dir()
    assert set(grid) == {(1e-4, 1.0), (1e-4, 0.5), (2e-4, 1.0), (2e-4, 0.5)}
    # Different points trained differently (the sweep values reached the jobs).
    losses = {job: metrics(tmp_path / "grid", str(job))[2]["loss_g"] for job in range(4)}
    assert len(set(losses.values())) == 4


def test_preemption_flag_hands_the_signal_on_after_the_checkpoint():
    """submitit requeues a sweep job from its own SIGUSR2 handler: the flag takes the signal first
    (the loop checkpoints), then forward() calls that handler; a second flag in the same process
    (the next job of a local sweep) still forwards to the original one."""
    from infd.data.workers import PREEMPTION_SIGNALS
    from infd.utils.signals import PreemptionFlag

    calls = []
    saved = {sig: signal.getsignal(sig) for sig in (*PREEMPTION_SIGNALS, signal.SIGCHLD)}
    signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        first, second = PreemptionFlag(), PreemptionFlag()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert second.raised and not first.raised and calls == []  # nothing handed on before the save
        second.forward()
        assert calls == [signal.SIGUSR2]
        PreemptionFlag().forward()  # not raised: nothing to hand on
        assert calls == [signal.SIGUSR2]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
