"""The LoRARuntime resource: a pool of warm runtime pods, one per matching node, sharing one base model."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from clora.api.base import (
    Condition,
    LabelMap,
    ObjectMeta,
    ObjectName,
    SpecModel,
    StatusModel,
    string_map_field,
)
from clora.constants import (
    API_VERSION,
    MAX_IMAGE_LENGTH,
    MAX_MAP_ENTRIES,
    MAX_MODEL_NAME_LENGTH,
    MAX_NAME_LENGTH,
    MAX_PATH_LENGTH,
    MAX_SHORT_TEXT,
    RUNTIME_KIND,
)

# A Kubernetes quantity: 1, "500m", "16Gi".
Quantity = Annotated[
    int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True, "maxLength": MAX_SHORT_TEXT})
]
# A directory inside the container: absolute.
AbsolutePath = Annotated[str, Field(min_length=1, max_length=MAX_PATH_LENGTH, pattern=r"^/")]

DEFAULT_CHECKPOINT_MOUNT = "/var/lib/clora/checkpoints"
GPU_RESOURCE = "nvidia.com/gpu"
# Replicas > 1 are Ray actors; Ray's object store lives in /dev/shm (see default_shm_size).
RAY_OBJECT_STORE_MIB = 256
TENSOR_PARALLEL_NOT_BUILT = (
    "devicesPerReplica > 1 (one base model over several GPUs: tensor parallel) is not built yet;"
    " use devicesPerReplica 1 with one replica per GPU (docs/multi-gpu.md has the design)"
)
GPU_LIMIT_MESSAGE = "resources.limits['nvidia.com/gpu'] must equal replicas x devicesPerReplica"
# /dev/shm of a runtime pod: room for NCCL and Ray, plus every adapter's export (see shm_size).
SHM_BASE_MIB = 1024
SHM_MIB_PER_RANK = 4


class Capacity(SpecModel):
    """How much one runtime pod takes on."""

    max_adapters: int = Field(8, ge=1, le=256)
    """Experiments (LoRA adapters) one pod trains at once: its number of adapter slots."""
    max_rank: int = Field(64, ge=1, le=512)
    """The largest LoRA rank an experiment on this pool may ask for."""
    tokens_per_tick: int = Field(65536, ge=1)
    """The pod's sampling budget per tick, in tokens. An experiment weighs
    promptsPerStep x groupSize x maxNewTokens against it when it is packed."""


class Toleration(SpecModel):
    """A pod toleration (core/v1 Toleration)."""

    key: str | None = Field(None, max_length=MAX_SHORT_TEXT)
    """The taint key the toleration applies to; empty with operator Exists matches every key."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (the default)."""
    value: str | None = Field(None, max_length=MAX_SHORT_TEXT)
    """The taint value the toleration matches, with operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """The taint effect to match; empty matches every effect."""
    toleration_seconds: int | None = None
    """How long a NoExecute taint is tolerated before eviction."""


class ResourceRequirements(SpecModel):
    """Container resources (core/v1 ResourceRequirements)."""

    limits: dict[str, Quantity] = string_map_field()
    """Resource limits, e.g. {nvidia.com/gpu: 1, memory: 40Gi}."""
    requests: dict[str, Quantity] = string_map_field()
    """Resource requests, e.g. {cpu: "4", memory: 32Gi}."""


class PersistentVolumeClaimSource(SpecModel):
    """A reference to a PersistentVolumeClaim in the runtime's namespace."""

    claim_name: ObjectName
    """The claim's name."""
    read_only: bool = False
    """Mount read-only (checkpoints then cannot be written)."""


class HostPathSource(SpecModel):
    """A directory on the node."""

    path: AbsolutePath
    """The directory's path on the node."""
    type: (
        Literal[
            "",
            "DirectoryOrCreate",
            "Directory",
            "FileOrCreate",
            "File",
            "Socket",
            "CharDevice",
            "BlockDevice",
        ]
        | None
    ) = None
    """The hostPath type, e.g. DirectoryOrCreate."""


class EmptyDirSource(SpecModel):
    """A scratch directory that lives as long as the pod."""

    medium: Literal["", "Memory"] | None = None
    """Empty for node disk, Memory for tmpfs."""
    size_limit: Quantity | None = None
    """The most the directory may hold."""


class CheckpointVolume(SpecModel):
    """Where adapter checkpoints are kept: exactly one volume source, mounted at mountPath."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "(has(self.persistentVolumeClaim) ? 1 : 0) + (has(self.hostPath) ? 1 : 0)"
                    " + (has(self.emptyDir) ? 1 : 0) <= 1",
                    "message": "set at most one of persistentVolumeClaim, hostPath, emptyDir",
                }
            ]
        }
    )

    persistent_volume_claim: PersistentVolumeClaimSource | None = None
    """Keep checkpoints on a PersistentVolumeClaim (survives pod and node loss when the storage does)."""
    host_path: HostPathSource | None = None
    """Keep checkpoints on the node's disk. Refused by the operator unless the chart allows it
    (runtime.allowHostPath): a hostPath reaches the node's files."""
    empty_dir: EmptyDirSource | None = None
    """Keep checkpoints in the pod's scratch space (lost with the pod)."""
    mount_path: AbsolutePath = DEFAULT_CHECKPOINT_MOUNT
    """Where the volume is mounted inside the runtime container; also the only directory the runtime
    reads dataset paths from (--dataset-roots)."""


class LoRARuntimeSpec(SpecModel):
    """The desired pool of warm runtime pods."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.devicesPerReplica == 1",
                    "message": TENSOR_PARALLEL_NOT_BUILT,
                    "fieldPath": ".devicesPerReplica",
                },
                {
                    "rule": "!has(self.resources) || !has(self.resources.limits) ||"
                    f" !('{GPU_RESOURCE}' in self.resources.limits) ||"
                    f" int(string(self.resources.limits['{GPU_RESOURCE}']))"
                    " == self.replicas * self.devicesPerReplica",
                    "message": GPU_LIMIT_MESSAGE,
                    "fieldPath": f".resources.limits['{GPU_RESOURCE}']",
                },
            ]
        }
    )

    base_model: str = Field(min_length=1, max_length=MAX_MODEL_NAME_LENGTH)
    """The base model: a Hugging Face model id, a path inside the pod, or a built-in name
    (smollm2: SmolLM2-135M-Instruct shipped with clora; tiny: a few-million-parameter test model)."""
    image: str | None = Field(None, min_length=1, max_length=MAX_IMAGE_LENGTH)
    """The runtime container image; defaults to the operator's own image. Another image is refused
    unless the chart allows it (runtime.allowedImages)."""
    node_selector: LabelMap = string_map_field()
    """Labels a node must carry to get a runtime pod."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=MAX_MAP_ENTRIES)
    """Taints the runtime pods tolerate, e.g. of GPU nodes."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """Container resources of each runtime pod, e.g. limits {nvidia.com/gpu: 1}."""
    capacity: Capacity = Field(default_factory=Capacity)
    """How many experiments, of what rank and sampling budget, each replica of a pod takes on: a pod
    has replicas x maxAdapters slots."""
    replicas: int = Field(1, ge=1, le=64)
    """Engines per pod, each a full copy of the base model with its own adapter slots, sampler and
    trainer on its own device(s): on a node of 8 GPUs, 8 replicas train 8 x maxAdapters experiments.
    An experiment runs on one replica. With more than 1 they are Ray actors inside the pod."""
    devices_per_replica: int = Field(1, ge=1, le=64)
    """GPUs each replica holds. Only 1 for now: a base model larger than one GPU (tensor parallel) is
    the next step (docs/multi-gpu.md). When resources.limits sets nvidia.com/gpu, it must equal
    replicas x devicesPerReplica."""
    sampler: Literal["torch", "vllm"] = "torch"
    """The sampling engine: torch (built in, any device) or vllm (GPU nodes)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The base model's dtype; auto is bfloat16 on a GPU and float32 on a CPU. float16 is not offered:
    training in it needs a gradient scaler."""
    attention_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    """The base model's attention kernels: auto is flash_attention_2 on a GPU when the image has the
    flash-attn package, else sdpa."""
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    """With sampler vllm: the share of each GPU's memory vLLM may take; the trainer uses the rest.
    Unset: 0.35."""
    max_num_seqs: int | None = Field(None, ge=1, le=65536)
    """With sampler vllm: the most sequences vLLM runs at once. Unset: the runtime's batch rows (512)."""
    enforce_eager: bool | None = None
    """With sampler vllm: run without CUDA graphs. Unset: false on a GPU (vLLM captures CUDA graphs,
    LoRA included), true on a CPU."""
    shm_size: Quantity | None = None
    """The size of the pod's memory-backed /dev/shm (vLLM's adapter exports, Ray and NCCL use it).
    Unset: 1Gi plus replicas x (maxAdapters + 1) x maxRank x 4Mi, room for every adapter's export at
    the largest rank for a model of about 4B parameters in bfloat16 (4 MiB per unit of rank), plus
    256Mi for Ray's object store when replicas > 1. The memory counts against the pod's memory only as
    far as it is used."""
    checkpoint_volume: CheckpointVolume = Field(default_factory=CheckpointVolume)
    """The volume adapter checkpoints are written to; with no source, the pod's scratch space."""

    @model_validator(mode="after")
    def _devices(self) -> LoRARuntimeSpec:
        if self.devices_per_replica != 1:
            raise ValueError(f"devicesPerReplica: {TENSOR_PARALLEL_NOT_BUILT}")
        gpus = self.resources.limits.get(GPU_RESOURCE)
        if gpus is not None and str(gpus) != str(self.replicas * self.devices_per_replica):
            raise ValueError(f"{GPU_LIMIT_MESSAGE}: {gpus} != {self.replicas} x {self.devices_per_replica}")
        return self

    def slots_per_pod(self) -> int:
        return self.replicas * self.capacity.max_adapters


def default_shm_size(capacity: Capacity, replicas: int = 1) -> str:
    """The /dev/shm size of a pod with this capacity (per replica) when spec.shmSize is unset."""
    exports = replicas * (capacity.max_adapters + 1) * capacity.max_rank * SHM_MIB_PER_RANK
    ray = RAY_OBJECT_STORE_MIB if replicas > 1 else 0
    return f"{SHM_BASE_MIB + exports + ray}Mi"


class RuntimePodStatus(StatusModel):
    """One runtime pod of the pool."""

    name: str = Field(max_length=MAX_NAME_LENGTH)
    """The pod's name."""
    node: str = Field("", max_length=MAX_NAME_LENGTH)
    """The node the pod runs on."""
    ready: bool = False
    """Whether the pod's runtime answers /readyz (base model loaded)."""
    experiments: list[str] = Field(default_factory=list)
    """The experiments placed on this pod, as namespace/name."""
    slots_free: int = 0
    """Adapter slots still free on this pod (over all its replicas)."""


class LoRARuntimeStatus(StatusModel):
    """What the pool looks like now."""

    ready_pods: int = 0
    """Runtime pods whose base model is loaded and that answer."""
    total_slots: int = 0
    """Adapter slots over all ready pods: ready pods x replicas x maxAdapters."""
    used_slots: int = 0
    """Adapter slots taken by experiments."""
    pods: list[RuntimePodStatus] = Field(default_factory=list)
    """Every runtime pod of the pool."""
    conditions: list[Condition] = Field(default_factory=list)
    """Ready and Degraded conditions of the pool."""
    observed_generation: int | None = None
    """The metadata.generation this status was computed from."""


class LoRARuntime(BaseModel):
    """A pool of warm runtime pods, one per matching node, all holding the same base model."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    api_version: Literal["clora.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["LoRARuntime"] = RUNTIME_KIND
    metadata: ObjectMeta
    spec: LoRARuntimeSpec
    status: LoRARuntimeStatus | None = None
