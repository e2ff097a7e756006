"""`clora bench ops` (the GPU-host-work issue): operator counts are deterministic, so the targets are
asserted here on the tiny model. Before the issue, a wrapped linear ran 97 top-level operators per
decode step with 8 adapters (docs/benchmarks/ops-before-cpu-tiny.json) and the sampler read the host
twice per decode step (its .tolist() and transformers' padding check)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from clora_runtime.bench import ops

# per wrapped linear per decode step at 8 adapters, measured on the code before the issue
BEFORE_PER_WRAPPED_LINEAR = 97


@pytest.fixture(scope="module")
def counts() -> dict[str, Any]:
    return ops.ops(model="tiny", adapters=[1, 2, 8], rows=16, steps=4, train_rows=8, rank=4)


def test_a_wrapped_linear_runs_a_third_of_the_operators_it_did(counts: dict[str, Any]) -> None:
    per_linear = counts["adapters"]["8"]["decode"]["perWrappedLinearPerDecodeStep"]
    assert per_linear <= BEFORE_PER_WRAPPED_LINEAR / 3, per_linear


def test_decode_operators_do_not_grow_with_the_adapters(counts: dict[str, Any]) -> None:
    by = {int(n): v["decode"] for n, v in counts["adapters"].items()}
    layers = counts["config"]["wrappedLinears"]
    # one adapter takes the loop of one segment; from two on, the grouped path's fixed operators
    assert by[8]["perDecodeStep"] - by[2]["perDecodeStep"] <= 1
    assert by[8]["perDecodeStep"] - by[1]["perDecodeStep"] <= 4 * layers
    # the CPU's sync_every is 1: one read of the EOS flags per step, nothing else
    assert all(v["hostSyncsPerDecodeStep"] == 1 / counts["config"]["syncEvery"] for v in by.values())
    train = counts["adapters"]["8"]["train"]
    assert train["perMicroBatch"] > 0 and train["wrappedLinearCalls"] > 0


def test_the_sampler_reads_the_host_only_at_its_sync_points() -> None:
    """sync_every = 4: 8 more decode steps cost 2 more host reads (one per sync point), where the
    sampler used to read the host twice per step."""
    from clora_runtime.config import EngineConfig
    from clora_runtime.device_defaults import DeviceSizes
    from clora_runtime.sampling.base import SampleRequest
    from clora_runtime.sampling.torch_sampler import TorchSampler

    base, bank = ops.build("tiny", "cpu", "auto", 2, 4)
    keys = ops._fill_bank(bank, 2, 4)
    sizes = replace(DeviceSizes.cpu(), decode_sync_every=4)
    sampler = TorchSampler(base, bank, EngineConfig(model="tiny", device="cpu"), sizes)
    assert sampler.eos  # EOS flags are read at the sync points

    def run(tokens: int) -> ops.OpCount:
        requests = [SampleRequest(keys[i % 2], [1, 50 + i, 60, 70], tokens, 1.0, i) for i in range(6)]
        assert not any(c.finished for c in sampler.generate(requests))  # every row runs every step
        return ops.profile(lambda: sampler.generate(requests), bank)

    extra = run(16).minus(run(8))
    assert extra.syncs == 8 // 4, extra.syncs
