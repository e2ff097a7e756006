"""Isolation (issue 3, item 7): an experiment packed with three others of other ranks, tasks and lengths
learns what it learns alone, up to float rounding; another seed differs by far more."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from clora_runtime.tasks import rewards as rewards_module


def varied_reward(text: str, answer: str) -> float:
    return (sum(map(ord, text)) % 5) / 4  # spread on an untrained model, so advantages are non-zero


STEPS = 3


def train(engine: Any, neighbours: dict[str, Any], spec: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Train ns/x with neighbours added around it; its first-step completion log-probs (the trainer's,
    summed per completion) and final weights."""
    names = list(neighbours)
    for name in names[:2]:
        engine.upsert("ns", name, neighbours[name])
    engine.upsert("ns", "x", spec)  # lands in a middle slot when packed
    for name in names[2:]:
        engine.upsert("ns", name, neighbours[name])
    first = engine.tick()
    assert first is not None and "ns/x" in first.stepped
    assert len(first.stepped) == 1 + len(neighbours)
    for _ in range(STEPS - 1):
        engine.tick()
    assert engine.state("ns", "x").step == STEPS
    logprobs = torch.tensor([r.trainer_logprob for r in first.rollouts["ns/x"]], dtype=torch.float64)
    return logprobs, engine.bank.peft_state_dict("ns/x")


def norm(tensors: dict[str, torch.Tensor], keys: list[str]) -> float:
    return float(torch.sqrt(sum(tensors[k].double().pow(2).sum() for k in keys)))


def diff_norm(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys: list[str]) -> float:
    return float(torch.sqrt(sum((a[k].double() - b[k].double()).pow(2).sum() for k in keys)))


def test_packed_experiment_learns_what_it_learns_alone(
    tiny_engine: Any, spec_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("exact-match", "numeric"):
        monkeypatch.setitem(rewards_module.REWARDS, name, varied_reward)
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What is {i} * 3?", "answer": f"#### {3 * i}"}) + "\n" for i in range(9)
        )
    )
    spec = spec_factory(lora={"rank": 4}, training={"seed": 7, "maxNewTokens": 6, "learningRate": 2e-3})
    neighbours = {
        "n1": spec_factory(
            lora={"rank": 8, "alpha": 8}, task={"difficulty": 2}, training={"maxNewTokens": 3, "seed": 1}
        ),
        "n2": spec_factory(
            lora={"rank": 2, "targetModules": ["q_proj", "v_proj"]},
            task={"name": "gsm8k", "dataset": {"path": str(data)}, "reward": "numeric"},
            training={"maxNewTokens": 9, "groupSize": 3, "seed": 2, "lossType": "dapo"},
        ),
        "n3": spec_factory(
            lora={"rank": 16}, training={"maxNewTokens": 5, "promptsPerStep": 3, "lossType": "grpo"}
        ),
    }
    alone_lp, alone = train(tiny_engine(checkpoint_dir=tmp_path / "alone"), {}, spec)
    packed_lp, packed = train(tiny_engine(checkpoint_dir=tmp_path / "packed"), neighbours, spec)
    other_seed = spec_factory(lora={"rank": 4}, training={"seed": 8, "maxNewTokens": 6, "learningRate": 2e-3})
    _, reseeded = train(tiny_engine(checkpoint_dir=tmp_path / "reseeded"), {}, other_seed)

    # Step 1: the same completions, and their log-probabilities within 1e-5 relative.
    assert alone_lp.shape == packed_lp.shape
    torch.testing.assert_close(packed_lp, alone_lp, rtol=1e-5, atol=0)

    keys = sorted(alone)
    trained = [k for k in keys if "lora_B" in k]  # B starts at zero: it holds what was learned
    assert norm(alone, trained) > 0
    packed_rel = diff_norm(packed, alone, keys) / norm(alone, keys)
    reseeded_rel = diff_norm(reseeded, alone, keys) / norm(alone, keys)
    lp_rel = float(((packed_lp - alone_lp) / alone_lp).abs().max())
    print(f"isolation: first-step log-prob max relative difference {lp_rel:.2e}")
    print(f"isolation: weights packed {packed_rel:.2e} vs reseeded {reseeded_rel:.2e} (relative norm)")
    assert packed_rel <= 1e-3
    assert reseeded_rel >= 100 * packed_rel
    # The same on the learned part alone, a stricter comparison than whole weights.
    packed_b = diff_norm(packed, alone, trained) / norm(alone, trained)
    reseeded_b = diff_norm(reseeded, alone, trained) / norm(alone, trained)
    assert packed_b <= 1e-3
    assert reseeded_b >= 100 * max(packed_b, 1e-9)
