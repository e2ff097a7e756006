#!/usr/bin/env bash
# Sets up everything (venv, packages, helm/kubectl binaries) and runs lint and the whole test suite.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "all,test"
# shellcheck disable=SC1091
. "${CLORA_VENV:-.venv}/bin/activate"
[ ! -f scripts/install-tools.sh ] || bash scripts/install-tools.sh
ruff check .
ruff format --check .
lint-imports
pytest "$@"
