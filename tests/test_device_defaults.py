"""Device-dependent defaults (the trainer issue): the sizing functions of device_defaults, DeviceSizes
resolved for a CPU with and without the user's overrides, and the trainer and optimizer built from
them by Engine.load."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from clora_runtime import device_defaults as dd
from clora_runtime.config import EngineConfig
from clora_runtime.device_defaults import DeviceSizes
from clora_runtime.lora.bank import AdapterBank, AdapterShape
from clora_runtime.models.loading import load_model
from clora_runtime.training.trainer import Trainer, TrainRow

QWEN3_VOCAB = 151936


def test_activation_bytes_per_token_for_qwen3_4b() -> None:
    # 34 x hidden x layers bytes in 16 bits (Korthikanti et al.): about 3 MB per token for Qwen3-4B
    assert dd.activation_bytes_per_token(2560, 36, torch.bfloat16) == 34 * 2560 * 36 == 3_133_440
    assert dd.activation_bytes_per_token(2560, 36, torch.float32) == 2 * 3_133_440


def test_micro_batch_tokens_are_clamped_and_rounded_down_to_1024() -> None:
    low, high = dd.CUDA_MICRO_BATCH_TOKENS_RANGE
    per_token = dd.activation_bytes_per_token(2560, 36, torch.bfloat16)
    # half of 100 GB free after the weights: 15956 tokens of activations, rounded down
    assert dd.micro_batch_tokens_for(100 * 10**9, per_token) == 15 * 1024
    assert dd.micro_batch_tokens_for(10**9, per_token) == low  # 159 tokens fit: the floor
    assert dd.micro_batch_tokens_for(0, per_token) == low
    assert dd.micro_batch_tokens_for(10**13, per_token) == high
    assert dd.micro_batch_tokens_for(2 * 5000 * 1000, 1000) == 4096
    assert dd.micro_batch_tokens_for(10**9, 0) == high  # a zero estimate does not divide by zero


def test_lm_head_chunks_at_qwen3s_vocabulary() -> None:
    """Every chunk reads the whole head weight: on a GPU a micro-batch must take few chunks."""
    cuda_rows = dd.head_chunk_rows(dd.CUDA_HEAD_CHUNK_ELEMENTS, QWEN3_VOCAB)
    assert cuda_rows == 1766 and cuda_rows >= 1024
    assert math.ceil(4096 / cuda_rows) == 3
    assert math.ceil(dd.CUDA_MICRO_BATCH_TOKENS_RANGE[1] / cuda_rows) == 19
    # the CPU's 16 MiB chunks: 27 rows, ~152 reads of the weight for 4096 tokens (fine on a CPU)
    assert dd.head_chunk_rows(dd.CPU_HEAD_CHUNK_ELEMENTS, QWEN3_VOCAB) == 27
    assert dd.head_chunk_rows(dd.CPU_HEAD_CHUNK_ELEMENTS, 2**23) == 1  # never zero rows


def test_cpu_sizes() -> None:
    assert DeviceSizes.cpu() == DeviceSizes(
        micro_batch_tokens=2048,
        max_batch_rows=512,
        head_chunk_elements=2**22,
        decode_sync_every=1,
        fused_adamw=False,
        vllm_gpu_memory_utilization=0.35,
        vllm_max_num_seqs=512,
        vllm_enforce_eager=True,
    )


def test_resolve_on_a_cpu_takes_the_users_values_and_defaults_the_rest() -> None:
    base = load_model("tiny", device="cpu")
    assert DeviceSizes.resolve(EngineConfig(model="tiny", device="cpu"), base) == DeviceSizes.cpu()

    overridden = EngineConfig(
        model="tiny",
        device="cpu",
        micro_batch_tokens=4096,
        max_batch_rows=64,
        vllm_gpu_memory_utilization=0.5,
        vllm_max_num_seqs=32,
        vllm_enforce_eager=False,
    )
    sizes = DeviceSizes.resolve(overridden, base)
    assert (sizes.micro_batch_tokens, sizes.max_batch_rows) == (4096, 64)
    assert (sizes.vllm_gpu_memory_utilization, sizes.vllm_max_num_seqs, sizes.vllm_enforce_eager) == (
        0.5,
        32,
        False,
    )
    # not settable: the device's
    assert (sizes.head_chunk_elements, sizes.decode_sync_every, sizes.fused_adamw) == (2**22, 1, False)

    rows_only = DeviceSizes.resolve(EngineConfig(model="tiny", device="cpu", max_batch_rows=64), base)
    assert rows_only.vllm_max_num_seqs == 64  # vLLM's batch follows the rows unless set
    assert rows_only.micro_batch_tokens == dd.CPU_MICRO_BATCH_TOKENS


def test_engine_load_builds_the_trainer_and_bank_from_its_sizes(tiny_engine: Any) -> None:
    engine = tiny_engine()
    assert engine.sizes == DeviceSizes.cpu()
    assert engine.trainer.head_chunk_elements == engine.sizes.head_chunk_elements
    assert engine.trainer.micro_batch_tokens == engine.sizes.micro_batch_tokens
    assert engine.bank.fused_adamw == engine.sizes.fused_adamw

    engine = tiny_engine(micro_batch_tokens=512)
    assert engine.trainer.micro_batch_tokens == engine.sizes.micro_batch_tokens == 512


def test_fused_adamw_steps_on_the_cpu_too() -> None:
    """CUDA's choice (one kernel per adapter); torch's fused AdamW also runs on a CPU, so it is tested
    here."""
    base = load_model("tiny", device="cpu")
    bank = AdapterBank(base.model, max_adapters=2, max_rank=4, fused_adamw=True)
    adapter = bank.add("ns/a", AdapterShape(4, 8, 0.0, "all-linear"), seed=0, learning_rate=1e-2)
    assert all(group["fused"] for group in adapter.optimizer.param_groups)
    before = [p.detach().clone() for p in adapter.parameters()]
    for p in adapter.parameters():
        p.grad = torch.ones_like(p)
    adapter.optimizer.step()
    assert all((p.detach() - q).abs().min() > 0 for p, q in zip(adapter.parameters(), before, strict=True))

    plain = AdapterBank(load_model("tiny", device="cpu").model, max_adapters=2, max_rank=4)
    other = plain.add("ns/a", AdapterShape(4, 8, 0.0, "all-linear"), seed=0, learning_rate=1e-2)
    assert not any(group["fused"] for group in other.optimizer.param_groups)


@pytest.mark.parametrize("rows_per_chunk", [2, 5])
def test_the_trainer_chunks_the_lm_head_by_its_head_chunk_elements(rows_per_chunk: int) -> None:
    """The LM head runs ceil(tokens / rows) chunks per micro-batch (one max over the vocabulary each),
    rows = head_chunk_elements // vocab, and the chunking does not change the log-probs."""
    base = load_model("tiny", device="cpu")
    bank = AdapterBank(base.model, max_adapters=1, max_rank=4)
    bank.add("ns/a", AdapterShape(4, 8, 0.0, "all-linear"), seed=0, learning_rate=1e-2)
    vocab = base.model.get_output_embeddings().weight.shape[0]
    rows = [TrainRow("ns/a", [1, 5, 9, 40], list(range(20, 20 + n)), 0.0, 1.0, 0.8) for n in (3, 7, 4)]
    slots = {"ns/a": 0}
    whole = Trainer(bank, micro_batch_tokens=4096).token_logprobs(rows, slots)  # one chunk

    chunked = Trainer(bank, micro_batch_tokens=4096, head_chunk_elements=rows_per_chunk * vocab)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = chunked.token_logprobs(rows, slots)
    chunks = sum(1 for e in prof.events() if e.name == "aten::amax")
    assert chunks == math.ceil(14 / rows_per_chunk)  # 14 completion tokens, one micro-batch
    for a, b in zip(got, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
