"""A real one-node SLURM cluster on this machine for tests: munged, slurmctld and slurmd from
Debian's slurm-wlm and munge, with their own key, sockets, ports, state and logs in a temporary
folder (nothing of the system's is read or changed), stopped by PID at the end. Clients (sbatch,
scontrol, ...) find it through SLURM_CONF.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psutil

from tests.s3_server import free_port

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
# A requeued job waits for the credential lifetime before it may start again (120 s by default).
CRED_EXPIRE_S = 5


def missing_daemons() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]


def install_or_skip_reason() -> str | None:
    """Install slurm-wlm and munge with apt where this runs as root; the reason to skip otherwise."""
    if not missing_daemons():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return (f"real SLURM needs {', '.join(missing_daemons())}: run `apt-get install {' '.join(PACKAGES)}` "
                "as root (the tests install them themselves when they run as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        res = subprocess.run(install, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{res.stderr[-3000:]}")
    return None


def _daemon(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]  # slurmd finds its NodeName this way
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self, **extra: str) -> dict[str, str]:
        """This environment (the venv first on PATH: tests/conftest.py) with the cluster's config."""
        return dict(os.environ, SLURM_CONF=str(self.conf), **extra)

    def start(self) -> None:
        munge = self.root / "munge"
        for sub in ("state", "spool", "logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        munge.mkdir(mode=0o711, exist_ok=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.conf.write_text(self._config(munge / "socket"))
        logs = self.root / "logs"
        self._spawn("munged", [_daemon("munged"), "--foreground", "--force", f"--socket={munge / 'socket'}",
                               f"--key-file={key}", f"--log-file={logs / 'munged.log'}",
                               f"--pid-file={munge / 'pid'}", f"--seed-file={munge / 'seed'}"])
        self._wait(lambda: (munge / "socket").exists(), "munged did not create its socket")
        self._spawn("slurmctld", [_daemon("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_daemon("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._node_idle, "the node did not become idle")

    def stop(self) -> None:
        """By PID, daemons in reverse order; each daemon's children (job steps) go with it."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            tree = [proc, *psutil.Process(proc.pid).children(recursive=True)] if proc.poll() is None else []
            for p in tree:
                p.terminate()
            _, alive = psutil.wait_procs([psutil.Process(p.pid) for p in tree if psutil.pid_exists(p.pid)],
                                         timeout=10)
            for p in alive:
                p.kill()

    def run(self, *cmd: str, **env: str) -> str:
        res = subprocess.run(cmd, capture_output=True, text=True, env=self.env(**env), cwd=self.root)
        if res.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr}\n{self.logs()}")
        return res.stdout

    def sbatch(self, *args: str, **env: str) -> int:
        return int(self.run("sbatch", "--parsable", *args, **env).strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as key -> value (no accounting database: finished jobs stay MinJobAge)."""
        out = self.run("scontrol", "show", "job", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_for(self, job_id: int, states: tuple[str, ...], timeout: float = 300) -> dict[str, str]:
        deadline = time.time() + timeout
        while True:
            job = self.job(job_id)
            if job["JobState"] in states:
                return job
            if time.time() > deadline:
                raise AssertionError(f"job {job_id} still {job['JobState']} after {timeout} s\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "logs").glob("*.log")))

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "logs" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            start_new_session=True)

    def _node_idle(self) -> bool:
        res = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env())
        return res.returncode == 0 and res.stdout.strip() == "idle"

    def _wait(self, ready, message: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"{message} ({', '.join(dead) or 'timeout'})\n{self.logs()}")
            time.sleep(0.2)

    def _config(self, munge_socket: Path) -> str:
        cpus = os.cpu_count() or 1
        memory_mb = int(psutil.virtual_memory().total / 2**20 * 0.9)
        r = self.root
        return f"""# One node, this machine, for tests (tests/slurm_cluster.py)
ClusterName=infdtest
SlurmctldHost={self.host}(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'logs' / 'slurmctld.log'}
SlurmdLogFile={r / 'logs' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobRequeue=1
KillWait=30
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# A requeued job starts once its credential expires; look for it every 2 s, not every 30-60 s.
SchedulerParameters=sched_interval=2,bf_interval=2
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
InactiveLimit=0
MinJobAge=600
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""
