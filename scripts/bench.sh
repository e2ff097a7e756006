#!/usr/bin/env bash
# Runs every benchmark of docs/benchmarks.md on this machine and regenerates the page from the results.
# Usage: scripts/bench.sh [RESULTS_DIR]   (default docs/benchmarks; JSON and PNG files land there)
# Takes about 15 minutes on two CPU cores (most of it in the one-at-a-time and TRL arms); run it on
# an otherwise idle machine: two torch threads on two busy cores slow down many times over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "runtime,bench"
# shellcheck disable=SC1091
. "${CLORA_VENV:-.venv}/bin/activate"
out=${1:-docs/benchmarks}
model=${CLORA_BENCH_MODEL:-smollm2}
tag=${CLORA_BENCH_TAG:-cpu}
mkdir -p "$out"
commands=(
  "clora bench throughput --experiments 8 --steps 3 --model $model --from examples/local --baseline trl --json $out/throughput-$tag-$model.json --plot $out/throughput-$tag-$model.png"
  "clora bench scaling --max-experiments 16 --steps 3 --model ${CLORA_BENCH_SCALING_MODEL:-tiny} --from examples/local --json $out/scaling-$tag-${CLORA_BENCH_SCALING_MODEL:-tiny}.json --plot $out/scaling-$tag-${CLORA_BENCH_SCALING_MODEL:-tiny}.png"
  "clora bench join --model $model --from examples/local --json $out/join-$tag-$model.json"
)
printf '%s\n' "${commands[@]}" > "$out/commands-$tag-$model.txt"
for c in "${commands[@]}"; do
  echo "+ $c" >&2
  $c
done
python -m clora_runtime.bench.docs "$out" docs/benchmarks.md
echo "wrote docs/benchmarks.md" >&2
