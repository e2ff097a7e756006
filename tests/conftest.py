"""Shared fixtures: a loaded engine on the tiny model, and a compact way to write experiment specs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


SMALL_SPEC: dict[str, Any] = {
    "runtime": "local",
    "task": {"name": "arithmetic", "difficulty": 1},
    "lora": {"rank": 4, "alpha": 8},
    "training": {"steps": 3, "learningRate": 1e-3, "promptsPerStep": 2, "groupSize": 4, "maxNewTokens": 6},
}


def make_spec(**overrides: Any) -> Any:
    """A small LoRAExperimentSpec; keyword arguments are camelCase sections merged into SMALL_SPEC,
    e.g. make_spec(training={"seed": 1}, lora={"rank": 8})."""
    from clora.api import LoRAExperimentSpec

    return LoRAExperimentSpec.model_validate(_merge(SMALL_SPEC, overrides))


@pytest.fixture
def spec_factory() -> Callable[..., Any]:
    return make_spec


@pytest.fixture
def tiny_engine(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """make(**EngineConfig fields) -> a loaded Engine on the tiny model, checkpoints under tmp_path."""
    from clora.metrics import RuntimeMetrics
    from clora_runtime.config import EngineConfig
    from clora_runtime.engine import Engine

    def make(**fields: Any) -> Engine:
        fields.setdefault("checkpoint_dir", tmp_path / "checkpoints")
        fields.setdefault("dataset_roots", [tmp_path])  # where the tests write their datasets
        engine = Engine(EngineConfig(model="tiny", device="cpu", **fields), RuntimeMetrics.create())
        engine.load()
        return engine

    yield make
