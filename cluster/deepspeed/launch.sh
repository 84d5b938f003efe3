#!/usr/bin/env bash
# Multi-node training with DeepSpeed's own launcher: run this once, on the first host of the
# hostfile (or any host that reaches all of them by passwordless ssh); it starts every rank on
# every host listed there.
#
#   cp cluster/deepspeed/hostfile.example cluster/deepspeed/hostfile    # then list your nodes
#   STAGE=autoencoder cluster/deepspeed/launch.sh experiment=ae_ffhq_paper run.name=ffhq-ae \
#       logger=wandb 'data.loader.shards="s3://bucket/ffhq/{00000..00139}.tar"'
#   DRY_RUN=1 STAGE=diffusion cluster/deepspeed/launch.sh experiment=diffusion_ffhq_paper ...   # print only
#
# Knobs (environment, default in brackets):
#   STAGE        autoencoder | diffusion: every rank runs python -m train.$STAGE  [autoencoder]
#   HOSTFILE     `<host> slots=<GPUs>` lines, see hostfile.example  [cluster/deepspeed/hostfile];
#                `local`: this machine alone, NPROC_PER_NODE ranks, no ssh
#   NPROC_PER_NODE  ranks to start with HOSTFILE=local
#   MASTER_ADDR  address of node rank 0, must resolve on every host  [first host of HOSTFILE]
#   MASTER_PORT  [29500]
#   RUN_ROOT     run directories go to $RUN_ROOT/<run.name>  [/shared/runs]. Must be storage every
#                host sees at the same path: every rank writes its part of each checkpoint there
#                and reads it back on resume.
#   LAUNCHER     deepspeed --launcher: pdsh | openmpi | mpich | impi | mvapich | slurm  [pdsh]
#   DRY_RUN=1    print the deepspeed command (one line, shell-quoted) instead of running it
# Arguments are Hydra overrides for train.$STAGE. A value with braces, like a shard pattern, needs
# Hydra's own quotes inside the shell's ('key="a/{0..9}.tar"'); with pdsh this script adds the
# extra layer of quoting that pdsh's remote shell takes off again.
#
# Environment of the ranks: pdsh starts them through ssh, so they do NOT inherit this shell's
# environment. DeepSpeed forwards only variables whose names start with NCCL, PYTHON, UCX, MV2 or
# MLFLOW, plus every KEY=VALUE line of a `.deepspeed_env` file read from $HOME and then from the
# checkout root (this script runs deepspeed from there; DS_ENV_FILE renames the file, and an
# absolute path works). Put there what the ranks need and this shell has:
#   WANDB_API_KEY                                      with logger=wandb
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION,
#   AWS_ENDPOINT_URL                                   for s3:// shards
#   INFD_S3_RETRIES                                    S3 read retries per shard (default 5)
# The file holds literal values, secrets included, so write it from the environment when you
# launch, readable only by you, and never commit it. No blank lines or comments: DeepSpeed reads
# every line as KEY=VALUE. For example:
#   (umask 077; for v in WANDB_API_KEY AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY INFD_S3_RETRIES; do
#       [[ -n "${!v:-}" ]] && printf '%s=%s\n' "$v" "${!v}"; done > ~/.deepspeed_env)
# WANDB_API_KEY is only ever read from the environment; it is never written in this script.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

STAGE=${STAGE:-autoencoder}
case "$STAGE" in
    autoencoder|diffusion) MODULE=train.$STAGE ;;
    *) echo "STAGE=$STAGE: choose autoencoder or diffusion" >&2; exit 2 ;;
esac

HOSTFILE=${HOSTFILE:-$ROOT/cluster/deepspeed/hostfile}
if [[ "$HOSTFILE" == local ]]; then
    # This machine alone, without ssh: DeepSpeed insists on reaching every hostfile host by ssh.
    : "${NPROC_PER_NODE:?HOSTFILE=local needs NPROC_PER_NODE, the number of ranks (GPUs) to start here}"
    hosts=localhost
    where=(--num_gpus "$NPROC_PER_NODE")
else
    [[ "$HOSTFILE" == /* ]] || HOSTFILE=$PWD/$HOSTFILE  # relative to where you call it from
    if [[ ! -f "$HOSTFILE" ]]; then
        # deepspeed itself would only warn and train on this machine's GPUs alone
        echo "HOSTFILE=$HOSTFILE does not exist: copy cluster/deepspeed/hostfile.example there and edit it" \
            "(or HOSTFILE=local with NPROC_PER_NODE for this machine alone)" >&2
        exit 2
    fi
    hosts=$(awk '!/^[[:space:]]*(#|$)/ { print $1 }' "$HOSTFILE")
    if [[ -z "$hosts" ]]; then
        echo "HOSTFILE=$HOSTFILE lists no hosts (expected lines like: node001 slots=8)" >&2
        exit 2
    fi
    where=(--hostfile "$HOSTFILE")
fi
MASTER_ADDR=${MASTER_ADDR:-$(head -n 1 <<<"$hosts")}
MASTER_PORT=${MASTER_PORT:-29500}
RUN_ROOT=${RUN_ROOT:-/shared/runs}
LAUNCHER=${LAUNCHER:-pdsh}

# pdsh hands the training command line to each host's shell, which would expand braces and globs
# and strip quotes before Hydra sees them. DeepSpeed double-quotes arguments with spaces itself,
# so escape what stays special inside double quotes there and single-quote the others. (With one
# host DeepSpeed starts the ranks locally, and the other launchers exec them, without a shell.)
# Local rank 0 of each host writes this (a node-local path) when a stop signal ends training with its
# checkpoint saved; it turns this script's exit status into 128 + the signal (train/stop_status.py).
report=${TMPDIR:-/tmp}/infd-stop-$$.json
overrides=("run.root=$RUN_ROOT" "run.stop_report=$report" "$@")
pdsh_hosts=0  # several hosts reached through pdsh's remote shell
[[ "${LAUNCHER,,}" == pdsh && $(wc -l <<<"$hosts") -gt 1 ]] && pdsh_hosts=1
if (( pdsh_hosts )); then
    for i in "${!overrides[@]}"; do
        arg=${overrides[$i]}
        if [[ "$arg" == *" "* ]]; then
            arg=${arg//\\/\\\\}
            arg=${arg//\$/\\\$}
            arg=${arg//\`/\\\`}
        elif [[ "$arg" =~ [^[:alnum:]_@%+=:,./-] ]]; then
            arg="'${arg//\'/\'\\\'\'}'"
        fi
        overrides[i]=$arg
    done
fi

# --no_local_rank: Hydra parses argv, so no --local_rank=N there (the ranks read LOCAL_RANK).
cmd=(deepspeed "${where[@]}" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     --launcher "$LAUNCHER" --no_local_rank --module "$MODULE" "${overrides[@]}")

cd "$ROOT"  # pdsh runs the ranks in this directory on every host; .deepspeed_env is read here too
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf -v line '%q ' "${cmd[@]}"
    echo "${line% }"
    exit 0
fi
if ! command -v deepspeed >/dev/null; then
    echo "deepspeed is not on PATH: activate the environment infd is installed in" >&2
    exit 2
fi
rm -f "$report"
# Not exec: DeepSpeed's launch process exits 1 after a signal it handled, the same as a crash; this
# shell passes each stop signal on, then reads the report for the status.
"${cmd[@]}" &
pid=$!
# With several hosts DeepSpeed's runner passes a signal on to pdsh and the remote launchers itself;
# with one it has no handler, and its child (the launch process of this host) takes the signal.
for sig in TERM INT HUP USR1 USR2; do
    # shellcheck disable=SC2064  # expand $sig and $pid now
    if (( pdsh_hosts )); then
        trap "kill -s $sig $pid 2>/dev/null || true" "$sig"
    else
        trap "pkill -$sig -P $pid || true" "$sig"
    fi
done
status=0
while true; do
    wait "$pid" && status=0 || status=$?
    kill -0 "$pid" 2>/dev/null || break  # still running: wait returned for a trapped signal
done
if [[ -f "$report" ]]; then
    sig=$(sed -n 's/.*"signal": "SIG\([A-Z0-9]*\)".*/\1/p' "$report")
    step=$(sed -n 's/.*"step": \([0-9]*\).*/\1/p' "$report")
    rm -f "$report"
    status=$((128 + $(kill -l "$sig")))
    echo "stopped at step $step by SIG$sig: checkpoint saved; exit status $status" >&2
fi
exit "$status"
