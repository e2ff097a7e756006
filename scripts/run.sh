#!/usr/bin/env bash
# The main job on a fresh machine: set up, then train every experiment of examples/local together on a
# local warm runtime (no cluster). Extra arguments go to `clora run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh runtime
# shellcheck disable=SC1091
. "${CLORA_VENV:-.venv}/bin/activate"
exec clora run -f examples/local "$@"
