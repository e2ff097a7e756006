"""Pure checks an experiment must pass against its runtime before it is queued (DESIGN.md: bad
input is refused as early as possible; these are the checks the API server cannot do)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clora.api import LoRAExperimentSpec, LoRARuntime
from clora.constants import (
    MAX_DATASET_TEXT_BYTES,
    REASON_DATASET_TOO_LARGE,
    REASON_HOST_PATH_NOT_ALLOWED,
    REASON_IMAGE_NOT_ALLOWED,
    REASON_INVALID,
    REASON_MISSING_DATASET,
    REASON_RANK_TOO_HIGH,
    REASON_TOKEN_BUDGET_TOO_HIGH,
    REASON_UNKNOWN_RUNTIME,
)
from clora_operator.config import OperatorConfig


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
        return dataset_problem(ref.name, ref.key, configmap)
    return None


def dataset_text(configmap: Mapping[str, Any], key: str) -> str | None:
    """The value of a ConfigMap key (data, or an emulator's stringData), None when it has none."""
    for part in ("data", "stringData"):
        value = (configmap.get(part) or {}).get(key)
        if isinstance(value, str):
            return value
    return None


def dataset_problem(name: str, key: str, configmap: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when a ConfigMap dataset cannot be sent to the runtime: no such key, or a
    value over MAX_DATASET_TEXT_BYTES (the runtime PUT's datasetText)."""
    text = dataset_text(configmap, key)
    if text is None:
        return REASON_MISSING_DATASET, f"spec.task.dataset.configMap: ConfigMap {name} has no key {key}"
    size = len(text.encode())
    if size > MAX_DATASET_TEXT_BYTES:
        return (
            REASON_DATASET_TOO_LARGE,
            f"spec.task.dataset.configMap: key {key} of ConfigMap {name} holds {size} bytes, more than"
            f" the {MAX_DATASET_TEXT_BYTES} a ConfigMap dataset may have; use a dataset path on the"
            " checkpoint volume",
        )
    return None


def runtime_refusal(runtime: LoRARuntime, config: OperatorConfig) -> tuple[str, str] | None:
    """(reason, message) naming the field when a LoRARuntime asks for what amounts to a privileged
    pod the chart did not allow: a hostPath volume (the node's files) or an image other than the
    operator's runtime image (any code, with the runtime token). None when its pods may be built."""
    spec = runtime.spec
    if spec.checkpoint_volume.host_path is not None and not config.allow_host_path:
        return (
            REASON_HOST_PATH_NOT_ALLOWED,
            "spec.checkpointVolume.hostPath: this operator does not allow hostPath volumes (they reach"
            " the node's files); use a persistentVolumeClaim, or install the chart with"
            " runtime.allowHostPath=true",
        )
    image = spec.image
    if (
        image is not None
        and image != config.runtime_image
        and image not in config.allowed_images
        and "*" not in config.allowed_images
    ):
        return (
            REASON_IMAGE_NOT_ALLOWED,
            f"spec.image: {image[:200]} is not an allowed runtime image; leave it unset for"
            f" {config.runtime_image}, or add it to the chart's runtime.allowedImages",
        )
    return None
