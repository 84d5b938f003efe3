#!/usr/bin/env bash
# Body of the SLURM batch scripts (autoencoder.sbatch, diffusion.sbatch): one srun task per node,
# each running that node's torchrun (rendered by cluster/launch.py from the SLURM environment).
#
# Knobs (environment):
#   STAGE          autoencoder | diffusion (set by the .sbatch script)
#   INFD_ROOT      checkout to run from (default: the directory sbatch was called from)
#   PYTHON         interpreter with infd installed (default: python on PATH, e.g. an activated venv)
#   RUN_ROOT       where run directories go; must be storage every node shares (checkpoints)
#   RUN_NAME       run name (default <job name>-<job id>: a requeued job resumes in the same directory)
#   MAX_RESTARTS   torchrun restarts after a worker failure, each resuming from the latest checkpoint
#   NPROC_PER_NODE processes per node (default: the GPUs SLURM allocated on the node)
#   WANDB_API_KEY, AWS_*  read from the environment sbatch was called with; never written here
# Near the time limit SLURM sends USR1 (--signal=B:USR1@300): the workers checkpoint at the next step
# boundary and exit, and the job requeues itself to continue from that checkpoint.
set -euo pipefail

: "${STAGE:?STAGE must be autoencoder or diffusion}"
INFD_ROOT=${INFD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python}
export RUN_ROOT=${RUN_ROOT:-$INFD_ROOT/runs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export PYTHONUNBUFFERED=1
cd "$INFD_ROOT"

if [[ " $* " == *" logger=wandb "* && -z "${WANDB_API_KEY:-}" && "${WANDB_MODE:-}" != offline ]]; then
    echo "logger=wandb but WANDB_API_KEY is not set: export it before sbatch (or WANDB_MODE=offline)" >&2
    exit 2
fi

requeue=0
# shellcheck disable=SC2329  # invoked by the trap below
on_time_limit() {
    echo "time limit near: asking the workers to checkpoint, then requeueing job ${SLURM_JOB_ID}"
    requeue=1
    kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap on_time_limit USR1

# srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): pass it on, or the node's
# ranks and their data workers would share one CPU.
cpus=()
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpu-bind=none "${cpus[@]}" \
    "$PYTHON" -m cluster.launch torchrun --stage "$STAGE" -- "$@" &
srun_pid=$!
status=0
# `wait` returns early when the trap fires; wait again for the checkpoint to be written.
wait "$srun_pid" || status=$?
if (( requeue )); then
    wait "$srun_pid" || status=$?
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
