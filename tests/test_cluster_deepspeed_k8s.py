"""cluster/deepspeed (hostfile, launch.sh) and cluster/k8s/pytorchjob.yaml, checked against the real
DeepSpeed and torchrun argument parsers and the real Hydra config."""
import os
import re
import shlex
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import yaml
import pytest

ROOT = Path(__file__).resolve().parents[1]
HOSTFILE = ROOT / "cluster" / "deepspeed" / "hostfile.example"
LAUNCH = ROOT / "cluster" / "deepspeed" / "launch.sh"
MANIFEST = ROOT / "cluster" / "k8s" / "pytorchjob.yaml"


def launch(*overrides, **env):
    """DRY_RUN launch.sh from another directory; returns (process, argv of the printed command)."""
    full = {**os.environ, "DRY_RUN": "1", "HOSTFILE": str(HOSTFILE), **env}
    res = subprocess.run(["bash", str(LAUNCH), *overrides], capture_output=True, text=True, env=full, cwd="/")
    lines = res.stdout.splitlines()
    return res, (shlex.split(lines[0]) if res.returncode == 0 and len(lines) == 1 else None)


def test_hostfile_example_parses_with_deepspeeds_parser():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(HOSTFILE))
    assert list(pool.items()) == [("node001", 8), ("node002", 8), ("node003", 8), ("node004", 8)]


def test_launch_dry_run_renders_a_command_deepspeed_accepts():
    from deepspeed.launcher.runner import parse_args

    res, argv = launch("trainer.max_steps=10", RUN_ROOT="/nfs/runs")
    assert res.returncode == 0, res.stderr
    assert argv[0] == "deepspeed"
    args = parse_args(argv[1:])  # DeepSpeed's own command line parser
    assert args.hostfile == str(HOSTFILE)
    assert args.master_addr == "node001" and args.master_port == 29500  # the first host
    assert args.launcher == "pdsh"
    assert args.module and args.no_local_rank
    assert args.user_script == "train.autoencoder"
    report = args.user_args[1]  # node-local: turns the script's exit status into 128 + a stop signal
    assert args.user_args == ["run.root=/nfs/runs", report, "trainer.max_steps=10"]
    assert re.fullmatch(r"run\.stop_report=/\S+/infd-stop-\d+\.json", report)


def test_launch_stage_selects_the_module_and_rejects_others():
    res, argv = launch(STAGE="diffusion", MASTER_ADDR="10.0.0.1", MASTER_PORT="6000")
    assert res.returncode == 0, res.stderr
    assert argv[argv.index("--module") + 1] == "train.diffusion"
    assert argv[argv.index("--master_addr") + 1] == "10.0.0.1"
    assert argv[argv.index("--master_port") + 1] == "6000"
    assert "run.root=/shared/runs" in argv
    res, argv = launch(STAGE="bogus")
    assert res.returncode != 0 and "STAGE" in res.stderr and res.stdout == ""
    res, argv = launch(HOSTFILE="/nonexistent/hostfile")  # deepspeed alone would run on this node only
    assert res.returncode != 0 and "HOSTFILE" in res.stderr


def test_launch_quotes_overrides_for_the_remote_shell_pdsh_uses(tmp_path):
    """pdsh hands the ranks' command line to a shell on each host: the overrides must reach Hydra intact."""
    from deepspeed.launcher.multinode_runner import PDSHRunner

    overrides = ['data.loader.shards="s3://b/{00000..00009}.tar"', "run.name=it's", "x=*",
                 'logger.tags=[a b, $HOME, `id`, "q", back\\slash]']
    res, argv = launch(*overrides)
    assert res.returncode == 0, res.stderr
    user_args = argv[argv.index("--module") + 2:]
    runner = PDSHRunner(Namespace(user_script="train.autoencoder", user_args=user_args), "")
    remote = "printf '%s\\n' " + " ".join(runner.parse_user_args())  # what each host's shell runs
    out = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, cwd=tmp_path).stdout
    assert out.splitlines() == ["run.root=/shared/runs", user_args[1], *overrides]
    # one host: DeepSpeed starts the ranks locally without a shell, so nothing is quoted
    (tmp_path / "one").write_text("# a single node\n\ngpu01 slots=4\n")
    res, argv = launch(*overrides, HOSTFILE=str(tmp_path / "one"))
    assert argv[argv.index("--module") + 2:] == ["run.root=/shared/runs", argv[argv.index("--module") + 3],
                                                 *overrides]
    assert argv[argv.index("--master_addr") + 1] == "gpu01"


def test_launch_script_is_clean_bash():
    assert subprocess.run(["bash", "-n", str(LAUNCH)]).returncode == 0
    res = subprocess.run([str(Path(sys.executable).parent / "shellcheck"), str(LAUNCH)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout
    code = [line for line in LAUNCH.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "WANDB_API_KEY" in line]  # only ever from the environment


def manifest():
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    assert len(docs) == 1
    return docs[0]


def containers(job):
    specs = job["spec"]["pytorchReplicaSpecs"]
    return {role: specs[role]["template"]["spec"]["containers"][0] for role in ("Master", "Worker")}


def test_pytorchjob_shape():
    job = manifest()
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    spec = job["spec"]
    specs = spec["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"}
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
    assert all(s["restartPolicy"] == "OnFailure" for s in specs.values())
    elastic = spec["elasticPolicy"]
    assert elastic["rdzvBackend"] == "c10d" and elastic["maxRestarts"] == 3
    assert elastic["minReplicas"] <= 1 + 3 <= elastic["maxReplicas"]
    assert spec["nprocPerNode"] == "8"
    for role, c in containers(job).items():
        assert c["name"] == "pytorch", role  # the operator only configures the container of this name
        assert c["command"][:5] == ["python", "-m", "cluster.elastic", "-m", "train.autoencoder"], role
        assert not [a for a in c["command"] if a.startswith("--")], role  # rendezvous comes from PET_*
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == int(spec["nprocPerNode"]), role
        # SIGTERM -> checkpoint: the pod's grace outlasts torchrun's, which the trainer's budget matches
        shutdown = int({e["name"]: e.get("value") for e in c["env"]}["PET_SHUTDOWN_TIMEOUT"])
        assert specs[role]["template"]["spec"]["terminationGracePeriodSeconds"] > shutdown, role
        assert f"trainer.grace_s={shutdown}" in c["command"], role


def test_pytorchjob_secrets_and_volumes():
    job = manifest()
    for role, c in containers(job).items():
        env = {e["name"]: e for e in c["env"]}
        assert "value" not in env["WANDB_API_KEY"], role
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "api-key"}, role
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[name]["valueFrom"], (role, name)
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["volumes"]}
        assert volumes[mounts["/shared"]]["persistentVolumeClaim"]["claimName"] == "infd-shared", role
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", role
    text = MANIFEST.read_text()
    assert not re.search(r"\b[0-9a-f]{40}\b", text)  # no W&B key (40 hex digits) anywhere
    assert not re.search(r"WANDB_API_KEY\s*[=:]\s*\S", text)


def test_torchrun_takes_the_operators_pet_variables(monkeypatch):
    """The manifest's command has no rendezvous flags; torchrun reads PET_<FLAG> for each one."""
    from torch.distributed.run import get_args_parser

    env = {"PET_NNODES": "4:4", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "ffhq-ae-master-0",
           "PET_MASTER_PORT": "23456", "PET_RDZV_BACKEND": "c10d", "PET_RDZV_ENDPOINT": "ffhq-ae-worker-0:23456",
           "PET_MAX_RESTARTS": "3"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    command = containers(manifest())["Worker"]["command"]
    args = get_args_parser().parse_args(command[3:])  # after `python -m cluster.elastic`
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("4:4", "8", 2)
    assert (args.master_addr, args.master_port) == ("ffhq-ae-master-0", 23456)
    assert (args.rdzv_backend, args.rdzv_endpoint, args.max_restarts) == ("c10d", "ffhq-ae-worker-0:23456", 3)
    assert args.module and args.training_script == "train.autoencoder"
    assert args.training_script_args == command[5:]


@pytest.mark.slow
def test_pytorchjob_overrides_compose_against_the_real_config():
    """The manifest's overrides as they are (--cfg job composes and prints; it reads no data)."""
    overrides = containers(manifest())["Master"]["command"][5:]
    res = subprocess.run([sys.executable, "-m", "train.autoencoder", *overrides, "--cfg", "job"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr + res.stdout
    cfg = yaml.safe_load(res.stdout)
    assert cfg["run"] == {"root": "/shared/runs", "name": "ffhq-ae", "stop_report": None}
    assert cfg["logger"]["kind"] == "wandb"
    assert cfg["data"]["kind"] == "shards"
    assert cfg["data"]["loader"]["shards"] == "s3://your-bucket/ffhq/{00000..00139}.tar"
