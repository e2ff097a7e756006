"""Pure checks an experiment must pass against its runtime before it is queued (DESIGN.md: bad
input is refused as early as possible; these are the checks the API server cannot do)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clora.api import LoRAExperimentSpec, LoRARuntime
from clora.constants import (
    REASON_INVALID,
    REASON_MISSING_DATASET,
    REASON_RANK_TOO_HIGH,
    REASON_TOKEN_BUDGET_TOO_HIGH,
    REASON_UNKNOWN_RUNTIME,
)


def check(
    spec: Mapping[str, Any],
    namespace: str,
    runtime: Mapping[str, Any] | None,
    configmap: Mapping[str, Any] | None,
) -> tuple[str, str] | None:
    """(reason, message) naming the field at fault, or None when the experiment may be queued.

    `runtime` is the LoRARuntime named by spec.runtime (None: not found); `configmap` the
    ConfigMap named by spec.task.dataset.configMap (None: not found or not asked for)."""
    try:
        parsed = LoRAExperimentSpec.model_validate(spec)
    except ValueError as e:
        return REASON_INVALID, f"spec: {e}"
    except RecursionError:
        return REASON_INVALID, "spec: nested too deeply to read"
    if runtime is None:
        return (
            REASON_UNKNOWN_RUNTIME,
            f"spec.runtime: LoRARuntime {namespace}/{parsed.runtime} does not exist",
        )
    try:
        pool = LoRARuntime.model_validate(dict(runtime))
    except ValueError as e:
        return REASON_UNKNOWN_RUNTIME, f"spec.runtime: LoRARuntime {parsed.runtime} is invalid: {e}"
    cap = pool.spec.capacity
    if parsed.lora.rank > cap.max_rank:
        return (
            REASON_RANK_TOO_HIGH,
            f"spec.lora.rank: {parsed.lora.rank} is above LoRARuntime {parsed.runtime}'s"
            f" maxRank {cap.max_rank}",
        )
    if parsed.tokens_per_tick() > cap.tokens_per_tick:
        return (
            REASON_TOKEN_BUDGET_TOO_HIGH,
            f"spec.training: promptsPerStep x groupSize x maxNewTokens = {parsed.tokens_per_tick()}"
            f" is above LoRARuntime {parsed.runtime}'s tokensPerTick {cap.tokens_per_tick}",
        )
    dataset = parsed.task.dataset
    if dataset is not None and dataset.config_map is not None:
        ref = dataset.config_map
        if configmap is None:
            return REASON_MISSING_DATASET, f"spec.task.dataset.configMap: ConfigMap {ref.name} does not exist"
        data = configmap.get("data") or {}
        if ref.key not in data:
            return (
                REASON_MISSING_DATASET,
                f"spec.task.dataset.configMap: ConfigMap {ref.name} has no key {ref.key}",
            )
    return None
