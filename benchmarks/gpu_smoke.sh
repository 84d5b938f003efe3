#!/usr/bin/env bash
# `make gpu-smoke`: both paper configurations train a few steps (bf16 autocast, ZeRO-2, one GPU), then the
# speed benchmarks run at GPU sizes, and one table is printed (benchmarks/smoke_table.py): figure, baseline,
# ratio, MFU, peak memory. Sized for about 8 minutes on one H100/H200.
#
# On the device tool's accelerator machine (its own Python 3.12 and torch 2.11, no registry):
#   here, once:   make install && bash benchmarks/gpu_wheels.sh      # .whl/, about 14 MiB
#   device run:   command "bash benchmarks/gpu_smoke.sh", carry [".whl"], timeout_s 600
#                 the logs and the table come back from $OUT
# On a machine set up with `make install`: make gpu-smoke (GPU_SMOKE_PY=.venv/bin/python).
# GPU_SMOKE_QUICK=1 runs every part at its smallest size: checks this script on a CPU in a few minutes.
#
# Every part has its own time limit and a failure does not stop the rest: the table says which failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${GPU_SMOKE_PY:-python3}
LOGS=${OUT:-$(mktemp -d -t infd-gpu-smoke-XXXX)}
RUNS=$(mktemp -d -t infd-gpu-smoke-runs-XXXX)
trap 'rm -rf "$RUNS"' EXIT
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HYDRA_FULL_ERROR=1
if [ -d .whl ] && ! "$PY" -c "import deepspeed, hydra, diffusers, open_clip, lpips" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/infd-site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/infd-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "${GPU_SMOKE_QUICK:-0}" = 1 ]; then
  STEPS=2 LIMIT_SCALE=4 TRAIN_STEP=(--tiny) RENDER=(--size 512 --config conf/model/cpu_tiny.yaml)
  SAMPLE=(--small --sizes 256 --steps 2) CKPT=(--configs diffusion_ffhq_paper --rounds 1 --max-steps 2)
else
  # Per GPU: the paper's stage-1 batch is 8 over 4 GPUs, its stage-2 batch 48 over 4; SD's UNet at full depth.
  STEPS=5 TRAIN_STEP=(--batch 2 --batch2 12 --batch-sd 8 --sd-layers 2 --steps 3 --warmup 2)
  RENDER=(--size 4096) SAMPLE=(--sizes 1024 2048 4096) CKPT=(--sd-layers 2 --rounds 1)
fi

part() {  # part NAME LIMIT_S COMMAND...: its output in $LOGS/NAME.log, its status in the table
  local name=$1 limit=$(($2 * ${LIMIT_SCALE:-1}))
  shift 2
  echo "== $name (at most ${limit} s): $*"
  local start=$SECONDS
  timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start)) s" | tee -a "$LOGS/status.txt"
  tail -n 3 "$LOGS/$name.log"
}

: > "$LOGS/status.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$LOGS/device.txt"

COMMON=(data.kind=synthetic trainer.autocast=bf16 deepspeed=zero2 trainer.log_every=1 trainer.image_every=100000
        "trainer.max_steps=$STEPS" "trainer.ckpt_every=$STEPS" "run.root=$RUNS")
part stage1_train 75 "$PY" -m train.autoencoder experiment=ae_ffhq_paper loss.lpips_backbone=random "${COMMON[@]}" \
  run.name=ae
part stage2_train 75 "$PY" -m train.diffusion experiment=diffusion_ffhq_paper text.kind=none unet.context_dim=0 \
  diffusion.latent_scale=1.0 "${COMMON[@]}" run.name=unet
part train_step 150 "$PY" benchmarks/train_step.py "${TRAIN_STEP[@]}"
part render_throughput 45 "$PY" benchmarks/render_throughput.py "${RENDER[@]}"
part sample_throughput 45 "$PY" benchmarks/sample_throughput.py "${SAMPLE[@]}"
part checkpoint_save 120 "$PY" benchmarks/checkpoint_save.py --tmp "$RUNS" "${CKPT[@]}"
"$PY" benchmarks/smoke_table.py "$LOGS" | tee "$LOGS/table.txt"
