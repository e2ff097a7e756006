"""The two clora resources. These Pydantic models are the single source of truth: the CRDs in crds/
are generated from them, and the operator, the runtime and `clora validate` all parse with them."""

from clora.api.base import Condition, ObjectMeta
from clora.api.experiment_types import (
    TERMINAL_PHASES,
    CheckpointPolicy,
    CheckpointRef,
    ConfigMapKey,
    Dataset,
    LoRAConfig,
    LoRAExperiment,
    LoRAExperimentSpec,
    LoRAExperimentStatus,
    Reward,
    Task,
    Training,
)
from clora.api.runtime_types import (
    Capacity,
    CheckpointVolume,
    LoRARuntime,
    LoRARuntimeSpec,
    LoRARuntimeStatus,
    RuntimePodStatus,
)

__all__ = [
    "TERMINAL_PHASES",
    "Capacity",
    "CheckpointPolicy",
    "CheckpointRef",
    "CheckpointVolume",
    "Condition",
    "ConfigMapKey",
    "Dataset",
    "LoRAConfig",
    "LoRAExperiment",
    "LoRAExperimentSpec",
    "LoRAExperimentStatus",
    "LoRARuntime",
    "LoRARuntimeSpec",
    "LoRARuntimeStatus",
    "ObjectMeta",
    "Reward",
    "RuntimePodStatus",
    "Task",
    "Training",
]
