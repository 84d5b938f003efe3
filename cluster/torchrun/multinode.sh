#!/usr/bin/env bash
# Plain multi-node torchrun, no scheduler: run this once on every node, with the same MASTER_ADDR.
#
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 STAGE=autoencoder cluster/torchrun/multinode.sh experiment=ae_ffhq_paper ...
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 STAGE=autoencoder cluster/torchrun/multinode.sh experiment=ae_ffhq_paper ...
#
# Knobs (environment): NNODES, NODE_RANK, MASTER_ADDR (a host every node reaches; it serves the
# c10d rendezvous), MASTER_PORT (29500), NPROC_PER_NODE (GPUs on the node, or 1 without GPUs),
# RDZV_ID (same on every node, unique per job), MAX_RESTARTS (3: a failed worker restarts the
# whole group from the latest checkpoint), STAGE (autoencoder | diffusion), PYTHON, RUN_ROOT
# (shared storage for checkpoints). Arguments are Hydra overrides for train.$STAGE.
set -euo pipefail

: "${NNODES:?set NNODES, the number of nodes}"
: "${NODE_RANK:?set NODE_RANK, the index of this node, 0..NNODES-1}"
: "${MASTER_ADDR:?set MASTER_ADDR, the host serving the rendezvous}"
STAGE=${STAGE:-autoencoder}
case "$STAGE" in
    autoencoder|diffusion) ;;
    *) echo "STAGE=$STAGE: choose autoencoder or diffusion" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
args=()
if [[ -n "${RUN_ROOT:-}" ]]; then
    args+=("run.root=$RUN_ROOT")
fi

# Each restart gets a fresh store (the shared one would hand restarted workers stale keys).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# cluster/elastic.py: torchrun in-process; a stop signal with its checkpoint saved exits 128 + the signal.
exec "$PYTHON" -m cluster.elastic \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" \
    --rdzv_id "${RDZV_ID:-infd-$STAGE}" --max_restarts "${MAX_RESTARTS:-3}" \
    -m "train.$STAGE" ${args[@]+"${args[@]}"} "$@"
