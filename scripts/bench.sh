#!/usr/bin/env bash
# Runs every benchmark of docs/benchmarks.md on this machine and regenerates the page from the results.
# Usage: scripts/bench.sh [RESULTS_DIR]   (default docs/benchmarks; JSON and PNG files land there)
# Takes about two hours on two CPU cores, most of it in the 24 TRL runs of the reward comparison; run
# it on an otherwise idle machine: the throughput figures are timings. CLORA_BENCH_TRL=1 adds TRL as a
# timed arm of the throughput run (vsTrl; about 30 minutes more on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "runtime,bench,ray"
# shellcheck disable=SC1091
. "${CLORA_VENV:-.venv}/bin/activate"
out=${1:-docs/benchmarks}
model=${CLORA_BENCH_MODEL:-smollm2}
tag=${CLORA_BENCH_TAG:-cpu}
scaling_model=${CLORA_BENCH_SCALING_MODEL:-tiny}
baseline=$([ "${CLORA_BENCH_TRL:-0}" = 1 ] && echo trl || echo serial)
mkdir -p "$out"
commands=(
  "clora bench throughput --experiments 8 --steps 20 --model $model --from examples/local --baseline $baseline --json $out/throughput-$tag-$model.json --plot $out/throughput-$tag-$model.png"
  "clora bench rewards --experiments 8 --seeds 3 --steps 16 --jobs 2 --threads 1 --model $model --from examples/local --json $out/rewards-$tag-$model.json --plot $out/rewards-$tag-$model.png"
  "clora bench scaling --max-experiments 16 --steps 3 --model $scaling_model --from examples/local --json $out/scaling-$tag-$scaling_model.json --plot $out/scaling-$tag-$scaling_model.png"
  "clora bench join --model $model --from examples/local --json $out/join-$tag-$model.json"
  "clora bench ops --model tiny --json $out/ops-$tag-tiny.json"
  "clora bench replicas --model tiny --threads 2 --json $out/replicas-$tag-tiny.json --plot $out/replicas-$tag-tiny.png"
  "clora bench replicas --model tiny --threads 1 --kills 0 --json $out/replicas-$tag-tiny-1-thread.json"
  "clora bench verifier --model tiny --json $out/verifier-$tag-tiny.json"
)
for c in "${commands[@]}"; do
  echo "+ $c" >&2
  $c
done
python -m clora_runtime.bench.docs "$out" docs/benchmarks.md
echo "wrote docs/benchmarks.md" >&2
