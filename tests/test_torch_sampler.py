"""The torch sampler's decode loop (the GPU-host-work issue): rows that finish between host syncs get
nothing after their EOS, whatever the sync interval; compute-dtype copies of the adapters follow
every optimizer step; the two-level inverse-CDF draw samples softmax(logits / T)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from clora_runtime.config import EngineConfig
from clora_runtime.device_defaults import DeviceSizes
from clora_runtime.lora.bank import AdapterBank, AdapterShape
from clora_runtime.lora.layers import BatchPlan
from clora_runtime.models.loading import LoadedModel, load_model
from clora_runtime.sampling.base import SampleRequest
from clora_runtime.sampling.torch_sampler import VOCAB_BLOCK, TorchSampler
from clora_runtime.training.trainer import AdapterHyper, Trainer, TrainRow


def _setup(dtype: str, adapters: int = 2, fused: bool = False) -> tuple[LoadedModel, AdapterBank, list[str]]:
    base = load_model("tiny", "cpu", dtype)
    bank = AdapterBank(base.model, max_adapters=adapters, max_rank=8, fused_adamw=fused)
    keys = []
    for i in range(adapters):
        key = f"ns/a{i}"
        adapter = bank.add(
            key, AdapterShape(4 + 4 * (i % 2), 16.0, 0.0, "all-linear"), seed=i, learning_rate=1e-3
        )
        with torch.no_grad():  # B starts at zero: give it weight so the adapters matter
            for b in adapter.b.values():
                b.normal_(0, 0.3, generator=torch.Generator().manual_seed(10 + i))
        keys.append(key)
    return base, bank, keys


def _sampler(base: LoadedModel, bank: AdapterBank, sync_every: int) -> TorchSampler:
    sizes = replace(DeviceSizes.cpu(), decode_sync_every=sync_every)
    return TorchSampler(base, bank, EngineConfig(model="tiny", device="cpu"), sizes)


def test_rows_that_finish_between_syncs_stop_at_their_eos() -> None:
    """EOS tokens chosen among what the rows draw, so that rows finish at different steps, inside the
    sync windows: every sync interval gives each row exactly its no-EOS tokens cut after the first EOS
    (included), finished, with the same log-probabilities."""
    base, bank, keys = _setup("float32")
    requests = [
        SampleRequest(keys[i % 2], [1, 520 + i, 33, 34, 27][: 3 + i % 3], 6 + i % 7, 0.9 + 0.1 * (i % 3), i)
        for i in range(10)
    ]
    free = _sampler(base, bank, 1)
    free.eos = []  # nothing stops a row but its max_new_tokens
    whole = free.generate(requests)
    assert all(len(c.token_ids) == r.max_new_tokens for c, r in zip(whole, requests, strict=True))
    # the third token of some rows and the fifth of others: finishes at several steps
    eos = sorted({whole[0].token_ids[2], whole[3].token_ids[4], whole[6].token_ids[1]})
    expected = []
    for c in whole:
        first = next((j for j, t in enumerate(c.token_ids) if t in eos), None)
        cut = len(c.token_ids) if first is None else first + 1
        expected.append((c.token_ids[:cut], first is not None, c.logprobs[:cut]))
    assert sum(f for _, f, _ in expected) >= 3
    for sync_every in (1, 3, 8):
        sampler = _sampler(base, bank, sync_every)
        sampler.eos = eos
        got = sampler.generate(requests)
        for c, (tokens, finished, logprobs) in zip(got, expected, strict=True):
            assert (c.token_ids, c.finished) == (tokens, finished), sync_every
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(logprobs), atol=1e-5, rtol=0)


TOLERANCE = 0.01  # bfloat16: a KV-cached batch against one forward of the whole sequence (seen: 2e-6)


def _plain_logprobs(
    bank: AdapterBank, slot: int, prompt: list[int], completion: list[int], temp: float
) -> torch.Tensor:
    """log p of each completion token from one forward of the whole sequence with gradients on: the
    training path, which reads the float32 master weights themselves."""
    ids = torch.tensor([prompt + completion])
    with torch.enable_grad(), bank.plan(BatchPlan.from_slots([slot]) if slot >= 0 else None):
        logits = bank.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temp
    logp = logits.log_softmax(-1).gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1)
    return logp.detach()


@pytest.mark.parametrize("fused", [False, True])
def test_compute_copies_follow_each_optimizer_step(fused: bool) -> None:
    """bfloat16 on the CPU: sample (the copies are built), take an optimizer step, sample again. The
    second sampling's log-probs are those of the stepped master weights, with or without the engine's
    sync_adapters call, and the step moved them far more than bfloat16 rounding. Also with the fused
    AdamW of GPUs, which writes the weights without moving their version counters."""
    base, bank, keys = _setup("bfloat16", adapters=2, fused=fused)
    sampler = _sampler(base, bank, 4)
    trainer = Trainer(bank, micro_batch_tokens=4096)
    key, slot = keys[0], bank.adapters[keys[0]].slot
    requests = [SampleRequest(key, [1, 520, 33, 34, 27], 8, 1.0, seed) for seed in range(4)]
    requests.append(SampleRequest(keys[1], [1, 44, 45], 8, 1.0, 9))
    hyper = {
        k: AdapterHyper(
            slot=bank.adapters[k].slot,
            clip_low=0.2,
            clip_high=0.2,
            kl_coef=0.0,
            learning_rate=0.05,
            dropout_seed=0,
        )
        for k in keys
    }

    def step(completions: list[Any]) -> None:
        rows = [
            TrainRow(r.adapter_key, r.prompt_ids, c.token_ids, 1.0 if i % 2 else -1.0, 1.0 / len(c.token_ids))
            for i, (r, c) in enumerate(zip(requests, completions, strict=True))
        ]
        result = trainer.step(rows, hyper)
        assert all(a.error is None for a in result.adapters.values())

    adapter = bank.adapters[key]
    for sync in (False, True):
        old = [(adapter.a[n].detach().clone(), adapter.b[n].detach().clone()) for n in adapter.modules]
        step(sampler.generate(requests))  # sampling builds (or refreshes) the copies first
        if sync:
            sampler.sync_adapters(keys)
            for layer in bank.layers.values():  # refreshed now, before any forward
                stacked = layer._stacked
                assert stacked is not None
                assert stacked.version_total == sum(w.a._version + w.b._version for _, w in layer._present)
        after = sampler.generate(requests)
        fresh = [
            _plain_logprobs(bank, slot, r.prompt_ids, c.token_ids, 1.0)
            for r, c in zip(requests[:4], after[:4], strict=True)
        ]
        for c, want in zip(after, fresh, strict=False):
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=TOLERANCE, rtol=0)
        # what stale copies would have given: the same tokens under the weights before the step
        new = [(adapter.a[n].detach().clone(), adapter.b[n].detach().clone()) for n in adapter.modules]
        _load(adapter, old)
        stale = [
            _plain_logprobs(bank, slot, r.prompt_ids, c.token_ids, 1.0)
            for r, c in zip(requests[:4], after[:4], strict=True)
        ]
        _load(adapter, new)
        assert max(float((f - s).abs().max()) for f, s in zip(fresh, stale, strict=True)) > 10 * TOLERANCE


def _load(adapter: Any, weights: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for name, (a, b) in zip(adapter.modules, weights, strict=True):
            adapter.a[name].copy_(a)
            adapter.b[name].copy_(b)


@pytest.mark.parametrize("vocab", [600, 512])
def test_the_draw_samples_softmax_at_the_temperature(vocab: int) -> None:
    """Empirical frequencies of many draws from one row of logits match softmax(logits / T) (a short
    last block included), and each draw's log-probability is the log-softmax of its token."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(vocab, generator=gen) * 2
    logits[7] = -float("inf")  # a token of zero mass is never drawn
    temp = 0.7
    rows = 40_000
    u = torch.rand(rows, generator=gen)
    u[0] = 0.0
    tokens, logp = TorchSampler._draw(
        logits.repeat(rows, 1), torch.full((rows, 1), temp), u, torch.arange(VOCAB_BLOCK)
    )
    want = torch.softmax(logits / temp, -1)
    freq = torch.bincount(tokens, minlength=vocab).double() / rows
    assert int((tokens == 7).sum()) == 0
    # within 5 standard errors per token, or an absolute floor for the rarest
    se = (want.double() * (1 - want.double()) / rows).sqrt()
    assert bool(((freq - want.double()).abs() <= 5 * se + 2e-4).all())
    torch.testing.assert_close(logp, torch.log_softmax(logits / temp, -1)[tokens], atol=1e-5, rtol=0)
