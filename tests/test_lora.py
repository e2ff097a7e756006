"""Multi-LoRA layers and the adapter bank: segments equal a per-row loop, slots are independent, and an
exported adapter loads in PEFT with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from clora_runtime.lora.bank import AdapterBank, AdapterShape
from clora_runtime.lora.layers import BatchPlan, LoRAContext, MultiLoRALinear, SlotWeights


def test_segments_match_a_per_row_loop() -> None:
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ctx = LoRAContext()
    layer = MultiLoRALinear(base, max_adapters=3, context=ctx)
    weights = {}
    for slot, rank in ((0, 2), (2, 5)):
        w = SlotWeights(a=torch.randn(rank, 16), b=torch.randn(12, rank), scale=2.0 / rank, dropout=0.0)
        layer.set_lora(slot, w)
        weights[slot] = w
    x = torch.randn(5, 3, 16)
    row_slots = [0, 0, -1, 2, 2]
    ctx.plan = BatchPlan.from_slots(row_slots)
    got = layer(x)
    for row, slot in enumerate(row_slots):
        want = base(x[row])
        if slot >= 0:
            w = weights[slot]
            want = want + w.scale * (x[row] @ w.a.T) @ w.b.T
        torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-6)
    ctx.plan = None
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize("path", ["grouped", "segments"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_no_grad_paths_match_a_per_row_loop(path: str, tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without gradients the layer reads stacked compute copies, grouped or segment by segment (the
    cost rule picks; here it is pinned): the same numbers as the per-row loop, for an adapter in two
    segments, a row without adapter and a slot with no rows; a slot whose weights turn NaN spoils its
    own rows only; and the copies follow in-place weight changes."""
    from clora_runtime.lora import layers

    monkeypatch.setitem(layers.OPERATOR_COST_MACS, "cpu", 10**12 if path == "grouped" else 0)
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ctx = LoRAContext()
    layer = MultiLoRALinear(base, max_adapters=5, context=ctx)
    weights = {}
    for slot, rank in ((0, 2), (2, 5), (3, 3), (4, 4)):
        w = SlotWeights(a=torch.randn(rank, 16), b=torch.randn(12, rank), scale=3.0 / rank, dropout=0.0)
        layer.set_lora(slot, w)
        weights[slot] = w
    x = torch.randn(7, tokens, 16)
    row_slots = [0, 0, -1, 2, 2, 0, 3]  # slot 4 has no rows

    def want(row: int) -> torch.Tensor:
        out = base(x[row])
        slot = row_slots[row]
        if slot >= 0:
            w = weights[slot]
            out = out + w.scale * (x[row] @ w.a.T) @ w.b.T
        return out

    for _ in range(2):
        ctx.plan = BatchPlan.from_slots(row_slots)
        with torch.no_grad():
            got = layer(x)
        for row in range(len(row_slots)):
            torch.testing.assert_close(got[row], want(row), rtol=1e-5, atol=1e-5)
        (cost,) = ctx.plan.layouts.values()
        assert (cost.index is not None) == (path == "grouped")
        with torch.no_grad():  # an optimizer-like in-place write: the copies must follow it
            weights[2].b.mul_(-2.0)
    with torch.no_grad():
        weights[3].a.fill_(float("nan"))
        ctx.plan = BatchPlan.from_slots(row_slots)
        got = layer(x)
    assert bool(got[6].isnan().all())
    for row in range(6):
        torch.testing.assert_close(got[row], want(row), rtol=1e-5, atol=1e-5)


def test_plan_segments_and_selection() -> None:
    plan = BatchPlan.from_slots([1, 1, 0, 0, 0, -1, 1])
    assert plan.segments == [(1, 0, 2), (0, 2, 5), (-1, 5, 6), (1, 6, 7)]
    assert plan.select([0, 6, 3]).segments == [(1, 0, 2), (0, 2, 3)]


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    from clora_runtime.models.loading import tiny_dir

    return tiny_dir()


def _tiny(tiny_dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def test_add_and_remove_touch_no_other_adapter(tiny_dir: Path) -> None:
    bank = AdapterBank(_tiny(tiny_dir), max_adapters=3, max_rank=8)
    first = bank.add("ns/a", AdapterShape(4, 8.0, 0.0, "all-linear"), seed=1, learning_rate=1e-3)
    before = {n: t.clone() for n, t in bank.peft_state_dict("ns/a").items()}
    bank.add("ns/b", AdapterShape(8, 16.0, 0.0, ["q_proj", "v_proj"]), seed=2, learning_rate=1e-3)
    bank.remove("ns/b")
    bank.add("ns/c", AdapterShape(2, 4.0, 0.0, "all-linear"), seed=3, learning_rate=1e-3)
    after = bank.peft_state_dict("ns/a")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert bank.adapters["ns/a"].slot == first.slot == 0
    assert bank.adapters["ns/c"].slot == 1  # the freed slot is reused
    assert bank.free_slots == 1
    # the same seed gives the same initialisation, another seed another one
    bank.add("ns/d", AdapterShape(4, 8.0, 0.0, "all-linear"), seed=1, learning_rate=1e-3)
    same = bank.peft_state_dict("ns/d")
    assert all(torch.equal(same[n], after[n]) for n in after)
    with pytest.raises(ValueError, match="maxRank"):
        AdapterBank(_tiny(tiny_dir), 2, 8).add("x/y", AdapterShape(16, 1.0, 0.0, "all-linear"), 0, 1e-3)
    with pytest.raises(ValueError, match="targetModules"):
        AdapterBank(_tiny(tiny_dir), 2, 8).add("x/y", AdapterShape(4, 1.0, 0.0, ["nope"]), 0, 1e-3)


def test_export_peft_loads_in_peft_with_the_same_logits(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    bank = AdapterBank(_tiny(tiny_dir), max_adapters=2, max_rank=16)
    bank.add("ns/other", AdapterShape(8, 16.0, 0.0, "all-linear"), seed=5, learning_rate=1e-3)
    adapter = bank.add("ns/exp", AdapterShape(4, 12.0, 0.0, ["q_proj", "v_proj", "down_proj"]), 7, 1e-3)
    with torch.no_grad():  # B starts at zero; give it weight so the adapter changes the logits
        gen = torch.Generator().manual_seed(0)
        for name in adapter.modules:
            adapter.b[name].copy_(torch.randn(adapter.b[name].shape, generator=gen) * 0.5)
    bank.export_peft("ns/exp", tmp_path / "adapter")
    ids = torch.tensor([[1, 17, 9000, 42, 7, 3000], [5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        with bank.plan(BatchPlan.from_slots([adapter.slot, adapter.slot])):
            ours = bank.model(input_ids=ids).logits
        with bank.plan(None):
            base_logits = bank.model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(_tiny(tiny_dir), str(tmp_path / "adapter")).eval()
        theirs = peft_model(input_ids=ids).logits
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_chunked_target_logprobs_match_plain_autograd() -> None:
    """The trainer's LM-head function (chunked, never holding [tokens, vocab] logits) gives the same
    values, entropies and hidden-state gradients as log_softmax over the full logits divided by each
    row's temperature."""
    import torch

    from clora_runtime.training.trainer import target_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=False).requires_grad_(False)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (37,))
    weights = torch.randn(37)
    temperatures = torch.rand(37) + 0.4

    chunk = 10 * 1000  # 10 rows a chunk: 4 chunks
    ours, entropy = target_logprobs(
        hidden, head, targets, temperatures, with_entropy=True, chunk_elements=chunk
    )
    (ours * weights).sum().backward()
    grad_ours = hidden.grad.clone()
    hidden.grad = None
    full = torch.log_softmax(head(hidden) / temperatures[:, None], -1)
    plain = full.gather(1, targets[:, None]).squeeze(1)
    (plain * weights).sum().backward()

    assert torch.allclose(ours, plain, atol=1e-5)
    assert torch.allclose(grad_ours, hidden.grad, atol=1e-5)
    assert entropy is not None
    assert torch.allclose(entropy, -(full.exp() * full).sum(-1).detach(), atol=1e-5)
