#!/usr/bin/env bash
# The wheels an accelerator machine of the device tool lacks, for benchmarks/gpu_smoke.sh, into .whl/.
#
# That machine has its own Python 3.12 and torch 2.11 with numpy, transformers, timm, safetensors, pyarrow,
# scikit-image, huggingface-hub and the like (/work/.library/device/KINDS.md lists them), but not DeepSpeed,
# Hydra, diffusers, open_clip or LPIPS, and it reaches no package registry. This downloads those (and what
# they need that the machine lacks) at the versions `make install` put in .venv, as wheels for Python 3.12;
# the two published only as source (deepspeed, antlr4) are built into pure-Python wheels here (DeepSpeed's
# ops are built on first use on the GPU machine, which has nvcc and ninja). About 14 MiB; the device tool
# carries at most 64 MiB. gpu_smoke.sh installs them with --no-deps into /tmp.
#
#   make install && bash benchmarks/gpu_wheels.sh     # once, here
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
# Import-time needs of infd/, train/ and benchmarks/ on the smoke's paths, less what the machine has.
PACKAGES=(deepspeed hjson pydantic pydantic_core annotated-types typing-inspection hydra-core omegaconf
          antlr4-python3-runtime diffusers importlib_metadata open_clip_torch ftfy wcwidth lpips braceexpand)
PLATFORMS=()
for n in 17 24 27 28 31 34; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

rm -rf "$DEST"
mkdir -p "$DEST"
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "from importlib.metadata import version; print(version('$name'))")
  if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLATFORMS[@]}" -d "$DEST" "$name==$version" 2>/dev/null; then
    # Source only on PyPI: build the wheel here (pure Python; DS_BUILD_OPS=0 builds no DeepSpeed op).
    DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$name==$version"
  fi
done
if [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
  echo '/.whl/' >> .git/info/exclude  # never committed; the device tool carries it by name
fi
du -sh "$DEST"
ls "$DEST"
