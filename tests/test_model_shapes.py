"""The Qwen3-shaped built-in models: the published sizes, and the engine trains on a Qwen3 model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from clora_runtime.models.loading import QWEN3_SHAPES, built_dir


@pytest.mark.parametrize(
    ("name", "total_billions", "non_embedding_billions"),
    # As the model cards state them: Qwen3-0.6B 0.6B (0.44B non-embedding), Qwen3-4B 4.0B (3.6B).
    [("qwen3-0.6b-shaped", 0.6, 0.44), ("qwen3-4b-shaped", 4.0, 3.6)],
)
def test_qwen3_shapes_have_the_published_sizes(
    name: str, total_billions: float, non_embedding_billions: float
) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):  # shapes only: nothing allocated
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_SHAPES[name]))
    total = sum(p.numel() for p in model.parameters())  # the tied head is counted once
    embedding = model.get_input_embeddings().weight.numel()
    digits = len(str(non_embedding_billions).split(".")[1])
    assert round(total / 1e9, 1) == total_billions
    assert round((total - embedding) / 1e9, digits) == non_embedding_billions


def test_engine_trains_on_a_qwen3_model(
    tmp_path: Path, spec_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Qwen3 cut down to two narrow layers, built the way the shaped models are (same vocabulary,
    bfloat16 on disk): the adapter bank wraps its layers and a tick samples, scores and trains."""
    from clora_runtime.config import EngineConfig
    from clora_runtime.engine import Engine
    from clora_runtime.tasks import rewards

    # spread on an untrained model, so that advantages, and so gradients, are not zero
    monkeypatch.setitem(rewards.REWARDS, "exact-match", lambda text, answer: (sum(map(ord, text)) % 5) / 4)
    small = {
        **QWEN3_SHAPES["qwen3-0.6b-shaped"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
    }
    path = built_dir("qwen3", small, 0, torch.bfloat16)
    engine = Engine(EngineConfig(model=str(path), device="cpu", checkpoint_dir=tmp_path, max_rank=8))
    engine.load()
    assert engine.base is not None and engine.base.model.config.model_type == "qwen3"
    assert engine.base.model.get_output_embeddings().weight.shape[0] == 151936
    engine.upsert("ns", "a", spec_factory(training={"steps": 1}))
    report = engine.tick()
    assert report is not None and report.stepped == ["ns/a"] and not report.failed
    assert engine.bank is not None
    learned = [t for k, t in engine.bank.peft_state_dict("ns/a").items() if "lora_B" in k]
    assert len(learned) == 7 * 2 and any(float(t.abs().sum()) > 0 for t in learned)  # B starts at 0
    assert engine.state("ns", "a").phase == "Succeeded"
