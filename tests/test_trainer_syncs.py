"""The trainer's hot loop does not wait on the device (the trainer issue): Trainer.step holds no op
that needs a device value on the host inside the loops over micro-batches and adapters, so a GPU
never drains its launch queue there, and the host syncs of a step do not grow with either: one read
of the statistics per update (_apply) and one of the rows' log-prob sums per step. A non-finite loss
still fails only its adapter.

On the CPU nothing waits, so what would wait on a GPU is counted: with the profiler, the aten ops
that read a value (_local_scalar_dense: .item(), float(t), bool(t), `if t:`, repeat_interleave
without its output size) or whose output size depends on values (nonzero, boolean-mask indexing,
...); with a TorchFunctionMode, the reads that record no aten op on a CPU (tolist, numpy). Blocking
host-to-device copies do not show on a CPU at all: the trainer's go through _upload (pinned memory,
non_blocking on CUDA).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

from clora_runtime.lora.bank import AdapterBank, AdapterShape
from clora_runtime.lora.layers import BatchPlan
from clora_runtime.models.loading import load_model
from clora_runtime.training.trainer import (
    AdapterHyper,
    Trainer,
    TrainRow,
    _Prepared,
    shared_prefixes,
    unique_prompts,
)

SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::nonzero",
        "aten::masked_select",
        "aten::unique_consecutive",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::equal",
    }
)
# The optimizer's own scalar reads are of host tensors (non-fused AdamW keeps `step` on the CPU) or
# inside the CPU build of the fused kernel; fused AdamW on CUDA reads nothing back.
OPTIMIZER_RANGE = "Optimizer.step#"


def bank_with(adapters: int) -> AdapterBank:
    base = load_model("tiny", device="cpu")
    bank = AdapterBank(base.model, max_adapters=4, max_rank=8, fused_adamw=True)  # as on CUDA
    for i in range(adapters):
        bank.add(f"ns/a{i}", AdapterShape(4, 8, 0.1, "all-linear"), seed=i, learning_rate=1e-2)
        with torch.no_grad():  # B starts at zero: give it weight so the adapters matter
            for b in bank.adapters[f"ns/a{i}"].b.values():
                b.normal_(0, 0.3, generator=torch.Generator().manual_seed(i))
    return bank


def make_rows(keys: list[str], shared_head: bool) -> list[TrainRow]:
    """Per adapter two prompts of different lengths (a padded prompt stage), four completions each of
    different lengths (padded completions), at different temperatures. With shared_head the prompts
    of an adapter share 20 tokens, so the trainer runs its shared-prefix stage."""
    gen = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(5, 4000, (n,), generator=gen).tolist()

    head = list(range(100, 120)) if shared_head else []
    rows = []
    for key in keys:
        for p in range(2):
            prompt = [1, *head, *tokens(3 + 2 * p)]
            for r in range(4):
                rows.append(TrainRow(key, prompt, tokens(2 + r), r - 1.5, 1 / 28, 0.7 + 0.2 * r))
    return rows


def hyper_for(bank: AdapterBank, keys: list[str]) -> dict[str, AdapterHyper]:
    return {
        k: AdapterHyper(
            slot=bank.adapters[k].slot,
            clip_low=0.2,
            clip_high=0.28,
            kl_coef=0.05 if i % 2 == 0 else 0.0,  # the KL reference's pass too
            learning_rate=1e-2,
            dropout_seed=i,
            updates=2,  # the later update reuses the prepared micro-batches and old log-probs
        )
        for i, k in enumerate(keys)
    }


class HostReads(TorchFunctionMode):
    """Counts the reads of tensor values that record no aten op on a CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if getattr(func, "__name__", "") in ("tolist", "numpy", "__array__"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def sync_sites(
    trainer: Trainer, rows: list[TrainRow], hyper: dict[str, AdapterHyper], stack: bool = False
) -> tuple[Counter[str], int]:
    """The ops of one Trainer.step that would make the host wait for a GPU, by op and caller (the
    Python caller with stack=True, slower; else the enclosing ops); and its tolist/numpy reads."""
    reads = HostReads()
    with profile(activities=[ProfilerActivity.CPU], with_stack=stack) as prof, reads:
        result = trainer.step(rows, hyper)
    assert all(r.error is None and len(r.losses) == 2 for r in result.adapters.values())
    sites: Counter[str] = Counter()
    for event in prof.events():
        if event.name not in SYNC_OPS:
            continue
        callers: list[str] = []
        parent: Any = event.cpu_parent
        inside_optimizer = False
        while parent is not None:
            inside_optimizer |= parent.name.startswith(OPTIMIZER_RANGE)
            callers.append(parent.name)
            if stack and parent.stack:
                callers = [f for f in parent.stack if "site-packages/torch" not in f]
                break
            parent = parent.cpu_parent
        if not inside_optimizer:
            sites[f"{event.name} < {' < '.join(callers[:3])}"] += 1
    return sites, reads.count


@pytest.mark.parametrize(("shared_head", "micro_batch_tokens"), [(False, 40), (True, 100)])
def test_a_step_reads_nothing_back_inside_its_loops(shared_head: bool, micro_batch_tokens: int) -> None:
    """1 and 4 adapters, more micro-batches than adapters (or shared prefixes), two updates, the KL
    reference, padded prompts: no op of the step waits for the device, outside the optimizer (at
    1ac95a0: 25 for 1 adapter and 82 for 4, 12 and 40 with shared prefixes: per micro-batch a
    nonzero and three repeat_interleave, and transformers' padding check on each prompt pass), and
    the step reads values back three times: once per update and once at its end."""
    found: dict[int, Counter[str]] = {}
    reads: dict[int, int] = {}
    runs: dict[int, tuple[Trainer, list[TrainRow], dict[str, AdapterHyper]]] = {}
    for adapters in (1, 4):
        bank = bank_with(adapters)
        keys = sorted(bank.adapters)
        trainer = Trainer(bank, micro_batch_tokens=micro_batch_tokens)
        rows = make_rows(keys, shared_head)
        slots = {k: bank.adapters[k].slot for k in keys}
        batches = trainer.micro_batches(rows, slots, list(range(len(rows))))
        # the loops this is about: more micro-batches than adapters, or one per adapter with prefixes
        assert len(batches) == adapters if shared_head else len(batches) > adapters
        prefixed = [
            shared_prefixes(
                unique_prompts([slots[rows[i].key] for i in b], [rows[i].prompt_ids for i in b])[0]
            )
            for b in batches
        ]
        assert all(p is not None for p in prefixed) == shared_head
        found[adapters], reads[adapters] = sync_sites(trainer, rows, hyper_for(bank, keys))
        runs[adapters] = (trainer, rows, hyper_for(bank, keys))
    assert reads == {1: 3, 4: 3}
    totals = {n: sum(sites.values()) for n, sites in found.items()}
    if any(totals.values()):  # name the Python callers (slower)
        worst, _ = sync_sites(*runs[4], stack=True)
        detail = "\n".join(f"{n} x {site}" for site, n in worst.most_common())
        raise AssertionError(f"ops that wait for the device, per step: {totals} (1 and 4 adapters)\n{detail}")


def test_a_non_finite_loss_fails_only_its_adapter() -> None:
    """Losses stay on the device until the one read per update: the adapter whose loss is NaN is
    reported failed and left unchanged, the others step."""
    bank = bank_with(3)
    keys = sorted(bank.adapters)
    bad = keys[1]
    with torch.no_grad():
        next(iter(bank.adapters[bad].b.values())).fill_(float("nan"))
    before = {k: [p.detach().clone() for p in bank.adapters[k].parameters()] for k in keys}
    result = Trainer(bank, micro_batch_tokens=100).step(make_rows(keys, False), hyper_for(bank, keys))

    failed = result.adapters[bad]
    assert failed.error is not None and "non-finite" in failed.error
    assert len(failed.losses) == 1 and math.isnan(failed.losses[0])  # stopped after its first update
    for p, q in zip(bank.adapters[bad].parameters(), before[bad], strict=True):
        torch.testing.assert_close(p.detach(), q, equal_nan=True)  # never stepped
    for key in keys:
        if key == bad:
            continue
        assert result.adapters[key].error is None
        assert len(result.adapters[key].losses) == 2 and all(map(math.isfinite, result.adapters[key].losses))
        moved = max(
            (p.detach() - q).abs().max().item()
            for p, q in zip(bank.adapters[key].parameters(), before[key], strict=True)
        )
        assert moved > 0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_masks_built_on_the_host_give_each_rows_own_log_probs(attention: str) -> None:
    """The trainer hands transformers 4D masks (or none) built from the lengths: with padded prompts,
    shared prefixes and padded completions of two adapters, each row still gets what a forward of it
    alone gives."""
    base = load_model("tiny", device="cpu", attn_implementation=attention)
    bank = AdapterBank(base.model, max_adapters=2, max_rank=8)
    for i, key in enumerate(("ns/a", "ns/b")):
        bank.add(key, AdapterShape(4 * (i + 1), 8, 0.0, "all-linear"), seed=i, learning_rate=1e-2)
        with torch.no_grad():
            for b in bank.adapters[key].b.values():
                b.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
    rows = make_rows(["ns/a", "ns/b"], shared_head=True)[::3]  # prompts of both lengths, 3 widths
    rows += make_rows(["ns/b"], shared_head=False)[:2]  # a prompt without the shared head
    slots = {k: a.slot for k, a in bank.adapters.items()}
    rows.sort(key=lambda r: (slots[r.key], r.prompt_ids))
    prepared = _Prepared.build(rows, [slots[r.key] for r in rows], torch.device("cpu"))
    assert prepared.prefix_ids is not None and prepared.first_padded

    with torch.no_grad():
        got, _ = prepared.token_logprobs(bank, adapters_on=True)
        want = []
        for row in rows:
            ids = torch.tensor([row.prompt_ids + row.completion_ids])
            with bank.plan(BatchPlan.from_slots([slots[row.key]])):
                logits = bank.model(input_ids=ids).logits[0, len(row.prompt_ids) - 1 : -1]
            logp = (logits / row.temperature).log_softmax(-1)
            want.append(logp.gather(1, torch.tensor(row.completion_ids).unsqueeze(1)).squeeze(1))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)
