"""Every device-dependent default of the runtime, in one place, each with its reason.

EngineConfig fields left unset (None) take these values once the base model is loaded and the
device is known (Engine.load); a value the user sets always wins. Nothing else in the runtime picks
a size by device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from clora_runtime.config import EngineConfig
    from clora_runtime.models.loading import LoadedModel

# ---- CPU ---------------------------------------------------------------------------------------
# Padded tokens per training forward/backward on a CPU: measured on the 2-core machine with smollm2,
# larger micro-batches gained nothing and grew memory.
CPU_MICRO_BATCH_TOKENS = 2048
# Logit floats per LM-head chunk on a CPU (16 MiB): small enough to stay near the caches. Every chunk
# reads the whole head weight; on a CPU that costs little next to the chunk's matmul (27 rows at
# Qwen3's vocabulary, 85 at smollm2's 49152).
CPU_HEAD_CHUNK_ELEMENTS = 2**22
# A host sync costs nothing on a CPU, and a finished row that leaves the batch at once saves its
# compute; so the torch sampler checks for finished rows after every decode step.
CPU_DECODE_SYNC_EVERY = 1

# ---- CUDA --------------------------------------------------------------------------------------
# Activation bytes one token keeps per decoder layer for the backward, in units of hidden size x
# 2 bytes: 34 h for a 16-bit transformer layer without recomputation and with fused attention
# (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", the
# s*b*h*34 term; the 5*a*s/h attention-score term is absent with SDPA / flash attention).
ACTIVATION_BYTES_PER_HIDDEN = 34
# The share of the memory left free after the base model (and vLLM's share) that training
# activations may plan on: the rest is the LM-head chunks, the optimizer, fragmentation.
ACTIVATION_SHARE = 0.5
CUDA_MICRO_BATCH_TOKENS_RANGE = (2048, 32768)
# Logit floats per LM-head chunk on a GPU (1 GiB of float32): at Qwen3's 151936-token vocabulary
# that is 1766 rows, so the head weight (0.78 GB in bf16 for Qwen3-4B) is read 3 times for a
# micro-batch of 4096 completion tokens and 19 times at the range's top, not ~150 and ~1200 times as
# with the CPU's 27 rows. A chunk holds up to ~3 GiB at once (the logits, and for the entropy their
# exp and a product): part of what ACTIVATION_SHARE leaves over.
CUDA_HEAD_CHUNK_ELEMENTS = 2**28
# Decode steps between host syncs in the torch sampler on a GPU: a sync per token drains the launch
# queue; every 8 steps a finished row wastes at most 7 cheap decode steps.
CUDA_DECODE_SYNC_EVERY = 8

# ---- both --------------------------------------------------------------------------------------
# Completions generated together: bounds the torch sampler's KV cache; vLLM gets it as max_num_seqs
# (vLLM's own default, 256, would split a 512-row tick into two scheduler rounds).
MAX_BATCH_ROWS = 512
# vLLM's share of GPU memory: the training copy of the model and its activations share the device.
VLLM_GPU_MEMORY_UTILIZATION = 0.35


@dataclass(frozen=True)
class DeviceSizes:
    """The sizes and switches one runtime runs with, defaults resolved for its device."""

    micro_batch_tokens: int
    max_batch_rows: int
    head_chunk_elements: int
    decode_sync_every: int
    fused_adamw: bool  # one kernel for every parameter of an adapter (CUDA only)
    vllm_gpu_memory_utilization: float
    vllm_max_num_seqs: int
    vllm_enforce_eager: bool  # CUDA graphs off; vLLM's CPU build has none

    @classmethod
    def cpu(cls) -> DeviceSizes:
        return cls(
            micro_batch_tokens=CPU_MICRO_BATCH_TOKENS,
            max_batch_rows=MAX_BATCH_ROWS,
            head_chunk_elements=CPU_HEAD_CHUNK_ELEMENTS,
            decode_sync_every=CPU_DECODE_SYNC_EVERY,
            fused_adamw=False,
            vllm_gpu_memory_utilization=VLLM_GPU_MEMORY_UTILIZATION,
            vllm_max_num_seqs=MAX_BATCH_ROWS,
            vllm_enforce_eager=True,
        )

    @classmethod
    def resolve(cls, config: EngineConfig, base: LoadedModel) -> DeviceSizes:
        """Defaults for `base`'s device, overridden by whatever `config` sets."""
        cuda = base.device.type == "cuda"
        rows = config.max_batch_rows or MAX_BATCH_ROWS
        util = config.vllm_gpu_memory_utilization or VLLM_GPU_MEMORY_UTILIZATION
        micro = config.micro_batch_tokens
        if micro is None:
            micro = (
                cuda_micro_batch_tokens(base, util if config.sampler == "vllm" else 0.0)
                if cuda
                else CPU_MICRO_BATCH_TOKENS
            )
        return cls(
            micro_batch_tokens=micro,
            max_batch_rows=rows,
            head_chunk_elements=CUDA_HEAD_CHUNK_ELEMENTS if cuda else CPU_HEAD_CHUNK_ELEMENTS,
            decode_sync_every=CUDA_DECODE_SYNC_EVERY if cuda else CPU_DECODE_SYNC_EVERY,
            fused_adamw=cuda,
            vllm_gpu_memory_utilization=util,
            vllm_max_num_seqs=config.vllm_max_num_seqs or rows,
            vllm_enforce_eager=(not cuda) if config.vllm_enforce_eager is None else config.vllm_enforce_eager,
        )


def head_chunk_rows(chunk_elements: int, vocab: int) -> int:
    """Rows of logits per LM-head chunk: chunk_elements floats, at least one row."""
    return max(1, chunk_elements // vocab)


def activation_bytes_per_token(hidden_size: int, layers: int, dtype: torch.dtype) -> int:
    """Activation memory one trained token keeps until the backward (see ACTIVATION_BYTES_PER_HIDDEN)."""
    element = torch.empty((), dtype=dtype).element_size()
    return ACTIVATION_BYTES_PER_HIDDEN * hidden_size * layers * element // 2


def micro_batch_tokens_for(free_bytes: int, per_token: int) -> int:
    """Tokens per micro-batch that fit ACTIVATION_SHARE of `free_bytes`: a multiple of 1024 within
    CUDA_MICRO_BATCH_TOKENS_RANGE."""
    low, high = CUDA_MICRO_BATCH_TOKENS_RANGE
    tokens = int(free_bytes * ACTIVATION_SHARE) // max(per_token, 1)
    return max(low, min(high, tokens // 1024 * 1024))


def cuda_micro_batch_tokens(base: LoadedModel, vllm_share: float) -> int:
    """Sized from the device's free memory after the base model, less what vLLM will take."""
    free, total = torch.cuda.mem_get_info(base.device)
    free = max(0, int(free - vllm_share * total))
    cfg = base.model.config
    per_token = activation_bytes_per_token(int(cfg.hidden_size), int(cfg.num_hidden_layers), base.dtype)
    return micro_batch_tokens_for(free, per_token)
