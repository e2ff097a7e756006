#!/usr/bin/env bash
# The GPU arm in one go (under 8 minutes on one H100/H200): Qwen3-0.6B- and Qwen3-4B-shaped models
# built from their published configs (random weights, bf16), 1 and 8 experiments each: tick phases,
# peak memory, MFU against the measured matmul rate, packed-vs-alone isolation. Writes gpu-check.json
# and gpu-check.md under the output folder (default out/gpu-check).
#
#   scripts/gpu-check.sh [--model qwen3|tiny] [--device cuda|cpu] [--out DIR]
#   scripts/gpu-check.sh --model tiny --device cpu      # the CPU variant CI runs
#   scripts/gpu-check.sh --pack                         # here, before a machine without network
#
# Needs only a python ($PYTHON, default python3) with torch and transformers, and no network. A lent
# GPU machine lacks pydantic and the tokenizer the built models use (smollm2's): --pack, run where
# clora is installed, puts both into .gpu-carry/ (git-ignored); carry that folder, and this script
# uses it when present.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}

if [ "${1:-}" = "--pack" ]; then
  mkdir -p .gpu-carry/wheels .gpu-carry/cache/models
  tok=$("$python" -c 'from clora_runtime.models.loading import smollm2_dir; print(smollm2_dir())')
  dest=.gpu-carry/cache/models/$(basename "$tok")
  mkdir -p "$dest"
  find "$tok" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} "$dest"/ \;
  pins=$("$python" -m pip list --format=freeze | grep -iE '^(pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection)==')
  # shellcheck disable=SC2086
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu-carry/wheels $pins
  echo "packed into .gpu-carry: $(ls .gpu-carry/wheels | tr '\n' ' ')and $dest" >&2
  exit 0
fi

if [ -d .gpu-carry ]; then
  if [ -d .gpu-carry/wheels ] && ! "$python" -c "import pydantic" 2>/dev/null; then
    "$python" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/clora-gpu-site .gpu-carry/wheels/*.whl
    export PYTHONPATH=/tmp/clora-gpu-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export CLORA_CACHE_DIR=${CLORA_CACHE_DIR:-$root/.gpu-carry/cache}
fi
export PYTHONPATH="$root:$root/runtime${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$python" -m clora_runtime.bench.gpu_check "$@"
