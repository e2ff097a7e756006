"""The LoRAExperiment resource: one RL fine-tuning run of one LoRA adapter on a shared runtime."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)

from clora.api.base import (
    Condition,
    DataKey,
    LabelMap,
    ObjectMeta,
    ObjectName,
    SpecModel,
    StatusModel,
    string_map_field,
)
from clora.constants import (
    API_VERSION,
    DNS_LABEL_PATTERN,
    EXPERIMENT_KIND,
    MAX_LABEL_LENGTH,
    MAX_MESSAGE_LENGTH,
    MAX_MODEL_NAME_LENGTH,
    MAX_MODULE_NAME_LENGTH,
    MAX_NAME_LENGTH,
    MAX_PATH_LENGTH,
    MAX_SYSTEM_PROMPT_CHARS,
    MAX_TARGET_MODULES,
    MAX_URL_LENGTH,
)

TaskName = Literal["gsm8k", "arithmetic", "http"]
RewardName = Literal["exact-match", "numeric", "format-and-exact"]
LossType = Literal["grpo", "dr_grpo", "dapo"]
Phase = Literal["Pending", "Queued", "Scheduled", "Running", "Suspended", "Succeeded", "Failed"]
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})

ALL_LINEAR = "all-linear"
TARGET_MODULES_MESSAGE = (
    f"must be [{ALL_LINEAR}] (or the string {ALL_LINEAR}) or a list of 1 to {MAX_TARGET_MODULES} module"
    f" names of letters, digits, '_' and '.', at most {MAX_MODULE_NAME_LENGTH} characters each"
)
_MODULE_NAME = re.compile(r"[A-Za-z0-9_.]+")


def _check_target_modules(value: Any) -> Any:
    """One clear message for every wrong shape. The scalar "all-linear" (clora run, objects written
    before the field was typed) and the list [all-linear] both mean every linear layer, and are kept
    as the string the runtime's adapter bank reads."""
    if value == ALL_LINEAR or value == [ALL_LINEAR]:
        return ALL_LINEAR
    if (
        isinstance(value, list)
        and 1 <= len(value) <= MAX_TARGET_MODULES
        and all(
            isinstance(m, str) and len(m) <= MAX_MODULE_NAME_LENGTH and _MODULE_NAME.fullmatch(m)
            for m in value
        )
    ):
        return value
    raise ValueError(TARGET_MODULES_MESSAGE)


def _target_modules_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


# In the CRD a list of strings: a structural schema cannot say "string or list", and the API server
# refuses CEL rules on an untyped node. [all-linear] stands for every linear layer, alone.
TargetModules = Annotated[
    Literal["all-linear"] | list[str],
    BeforeValidator(_check_target_modules),
    PlainSerializer(_target_modules_list, return_type=list[str]),
    WithJsonSchema(
        {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_TARGET_MODULES,
            "items": {
                "type": "string",
                "maxLength": MAX_MODULE_NAME_LENGTH,
                "pattern": rf"^({ALL_LINEAR}|[A-Za-z0-9_.]+)$",
            },
            "x-kubernetes-validations": [
                {
                    "rule": f"!('{ALL_LINEAR}' in self) || size(self) == 1",
                    "message": f"{ALL_LINEAR} stands for every linear layer and may only appear alone",
                }
            ],
        }
    ),
]


class ConfigMapKey(SpecModel):
    """A key of a ConfigMap in the experiment's namespace."""

    name: ObjectName
    """The ConfigMap's name (in the experiment's namespace; the operator reads it there)."""
    key: DataKey
    """The key whose value holds the JSONL records (at most 1 MiB, sent to the runtime by the operator)."""


class Dataset(SpecModel):
    """Where a task's records come from: a file inside the runtime pod, or a ConfigMap key."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.path) != has(self.configMap)",
                    "message": "set exactly one of path, configMap",
                }
            ]
        }
    )

    path: str | None = Field(None, min_length=1, max_length=MAX_PATH_LENGTH)
    """A JSONL file inside the runtime pod, one record per line."""
    config_map: ConfigMapKey | None = None
    """A ConfigMap key whose value is the JSONL records."""

    @model_validator(mode="after")
    def _one_source(self) -> Dataset:
        if (self.path is None) == (self.config_map is None):
            raise ValueError("set exactly one of path, configMap")
        return self


class SecretKeyRef(SpecModel):
    """A key of a Secret in the experiment's namespace."""

    name: ObjectName
    """The Secret's name (in the experiment's namespace; the operator reads it there)."""
    key: DataKey = "token"
    """The key whose value is used."""


class Verifier(SpecModel):
    """The user's HTTP service that scores completions (task http): docs/verifier.md has the contract.

    Each step's completions go in one POST {"experiment": {namespace, name, step}, "items": [{prompt,
    completion, answer, metadata}]}; the answer is {"rewards": [float, ...]}, one per item."""

    url: str = Field(min_length=1, max_length=MAX_URL_LENGTH, pattern=r"^https?://")
    """Where the completions are POSTed (http or https)."""
    token_secret: SecretKeyRef | None = None
    """A Secret key whose value is sent as `Authorization: Bearer <value>`; never shown in status,
    logs or metrics."""
    timeout_seconds: float = Field(30.0, gt=0, le=600)
    """How long one request may take before it is retried."""
    retries: int = Field(2, ge=0, le=10)
    """Retries after a timeout, a connection error or a 5xx answer (with backoff: 0.5 s, 1 s, 2 s, ...);
    after them, or on a malformed answer, the experiment fails, naming the URL and what was wrong."""


class Task(SpecModel):
    """What the experiment learns and how completions are scored."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.name != 'gsm8k' || has(self.dataset)",
                    "message": "dataset is required for task gsm8k",
                    "fieldPath": ".dataset",
                    "reason": "FieldValueRequired",
                },
                {
                    "rule": "self.name != 'http' || has(self.verifier)",
                    "message": "verifier is required for task http",
                    "fieldPath": ".verifier",
                    "reason": "FieldValueRequired",
                },
                {
                    "rule": "self.name == 'http' || !has(self.verifier)",
                    "message": "verifier is only for task http",
                    "fieldPath": ".verifier",
                },
            ]
        }
    )

    name: TaskName
    """The task: gsm8k (JSONL records of question and answer, the reference after ####), arithmetic
    (synthetic problems generated from the seed), or http (prompts from the dataset's records of
    prompt, answer and metadata, and from POST .../samples; rewards from `verifier`)."""
    dataset: Dataset | None = None
    """The task's records; required for gsm8k; for http optional (without it, a continual experiment
    trains on pushed samples only)."""
    difficulty: int = Field(1, ge=1, le=3)
    """arithmetic only: 1 one-digit sums, 2 two-digit sums and differences, 3 multi-step."""
    reward: RewardName = "exact-match"
    """How a completion is scored against the reference: exact-match (the last number equals it),
    numeric (closeness of the last number), format-and-exact (an answer in the asked format, and right)."""
    system_prompt: str = Field("", max_length=MAX_SYSTEM_PROMPT_CHARS)
    """A system message put before every prompt (at most 16384 characters)."""
    verifier: Verifier | None = None
    """task http: the HTTP service whose answer is each completion's reward (`reward` is unused)."""

    @model_validator(mode="after")
    def _dataset_for_gsm8k(self) -> Task:
        if self.name == "gsm8k" and self.dataset is None:
            raise ValueError("dataset is required for task gsm8k")
        if self.name == "http" and self.verifier is None:
            raise ValueError("verifier is required for task http")
        if self.name != "http" and self.verifier is not None:
            raise ValueError("verifier is only for task http")
        return self


class LoRAConfig(SpecModel):
    """The adapter's shape. Immutable once the experiment exists."""

    rank: int = Field(16, ge=1, le=512)
    """The LoRA rank r: the inner size of the low-rank update B @ A."""
    alpha: float = Field(32.0, gt=0)
    """The LoRA scaling numerator: the update is scaled by alpha / rank."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapter's input during training."""
    target_modules: TargetModules = Field(ALL_LINEAR, json_schema_extra={"default": [ALL_LINEAR]})
    """The modules that get an adapter: [all-linear] (every linear layer of the decoder but the LM head)
    or a list of module names such as [q_proj, v_proj]. Written with kubectl it is a list; clora run
    and clora validate also take the string all-linear."""


class Training(SpecModel):
    """The RL (GRPO-style policy gradient) hyper-parameters."""

    steps: int | None = Field(None, ge=1)
    """RL steps to train (one sampled batch each, trained with updatesPerBatch optimizer updates);
    omit for a continual experiment that runs until deleted."""
    learning_rate: float = Field(5.0e-5, gt=0)
    """AdamW learning rate of this adapter."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts sampled per step."""
    group_size: int = Field(8, ge=2)
    """Completions sampled per prompt; advantages are relative to the group."""
    max_new_tokens: int = Field(256, ge=1, le=32768)
    """The longest completion, in tokens."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature. The trainer takes every log-probability (policy, ratio, KL reference)
    from logits divided by it, so the gradient is that of the policy that sampled."""
    loss_type: LossType = "dr_grpo"
    """The policy loss, per token -min(ratio A, clip(ratio) A) (+ klCoef KL), normalised per type:
    grpo (DeepSeekMath, Shao et al. 2024, arXiv:2402.03300): A = (r - mean) / (std + 1e-4) within the
    group; each sequence's token losses averaged over its length, then over the sequences.
    dr_grpo (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783): A = r - mean (no std division); token losses
    summed and divided by sequences x maxNewTokens, removing GRPO's length and difficulty biases.
    dapo (DAPO, Yu et al. 2025, arXiv:2503.14476): A = (r - mean) / (std + 1e-4); token losses summed
    and divided by the step's completion tokens (token-level mean); pair with clipEpsilonHigh."""
    updates_per_batch: int = Field(1, ge=1, le=64)
    """Optimizer updates over one sampled batch (PPO epochs; TRL's num_iterations). The ratio's old
    log-probabilities are the sampling policy's, so the ratio is 1 on the first update and clipping
    acts from the second on."""
    clip_epsilon: float = Field(0.2, ge=0)
    """Lower clip of the probability ratio: ratios below 1 - clipEpsilon stop pushing down."""
    clip_epsilon_high: float | None = Field(None, ge=0)
    """Upper clip of the ratio, 1 + clipEpsilonHigh (DAPO's clip-higher, e.g. 0.28); unset: clipEpsilon."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the KL penalty to the base model (the model with the adapter off)."""
    seed: int = Field(0, ge=0)
    """Seeds the adapter's initialisation, the task's problems and the sampling."""

    @property
    def clip_high(self) -> float:
        """The upper clip: clipEpsilonHigh, or clipEpsilon when unset."""
        return self.clip_epsilon if self.clip_epsilon_high is None else self.clip_epsilon_high


class CheckpointPolicy(SpecModel):
    """When the adapter is checkpointed."""

    every_steps: int = Field(10, ge=1)
    """Checkpoint every this many steps (and always when the experiment leaves its runtime)."""
    keep: int = Field(3, ge=1)
    """How many checkpoints to keep; older ones are deleted."""


class VLLMServer(SpecModel):
    """A vLLM OpenAI-compatible server with runtime LoRA updating on (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True,
    --enable-lora): adapters are loaded with POST /v1/load_lora_adapter."""

    url: str = Field(min_length=1, max_length=MAX_URL_LENGTH, pattern=r"^https?://")
    """The server's base URL, e.g. http://vllm.serving.svc:8000."""
    adapter_name: str | None = Field(
        None, min_length=1, max_length=MAX_NAME_LENGTH, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$"
    )
    """The name clients ask for (`model` in a completion request); unset: <namespace>-<name>. Each new
    version replaces the previous one under this name (vLLM's in-place reload)."""


class AibrixAdapter(SpecModel):
    """An aibrix ModelAdapter (model.aibrix.ai/v1alpha1) the operator creates in the experiment's
    namespace and points at each published version; aibrix loads it on the serving pods it selects."""

    pod_selector: LabelMap = string_map_field(min_entries=1)
    """matchLabels of the serving pods (e.g. {model.aibrix.ai/name: qwen3-4b})."""
    base_model: str | None = Field(None, min_length=1, max_length=MAX_MODEL_NAME_LENGTH)
    """The base model the adapter attaches to (the ModelAdapter's baseModel)."""
    adapter_name: str | None = Field(
        None, min_length=1, max_length=MAX_LABEL_LENGTH, pattern=DNS_LABEL_PATTERN
    )
    """The ModelAdapter's name, which is also the name clients ask for; unset: the experiment's name."""


class PublishPolicy(SpecModel):
    """Where trained adapters go while training goes on, and how often (docs/publishing.md).
    Exactly one target. The adapter's files are read by the serving pods from the checkpoint
    volume, so they must mount it at the same path (a ReadWriteMany volume in a cluster)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "has(self.vllm) != has(self.aibrix)", "message": "set exactly one of vllm, aibrix"}
            ]
        }
    )

    vllm: VLLMServer | None = None
    """A vLLM server the runtime loads each version into."""
    aibrix: AibrixAdapter | None = None
    """An aibrix ModelAdapter the operator keeps pointed at the newest version."""
    every_steps: int | None = Field(None, ge=1)
    """Publish the newest checkpoint once it is at least this many steps past the published one;
    unset: every checkpoint. The final checkpoint (the experiment's last step) is always published."""

    @model_validator(mode="after")
    def _one_target(self) -> PublishPolicy:
        if (self.vllm is None) == (self.aibrix is None):
            raise ValueError("set exactly one of vllm, aibrix")
        return self


class PublishedRef(StatusModel):
    """The adapter version serving now."""

    step: int
    """The step of the checkpoint published."""
    name: str = Field(max_length=MAX_NAME_LENGTH)
    """The name it is served under."""
    target: str = Field(max_length=MAX_URL_LENGTH)
    """Where (the server's URL)."""
    path: str = Field(max_length=MAX_PATH_LENGTH)
    """The files the server loaded (a copy of the checkpoint that pruning never removes)."""
    time: datetime | None = None
    """When the server accepted it."""


class LoRAExperimentSpec(SpecModel):
    """One RL fine-tuning experiment: a task, an adapter shape and the training hyper-parameters."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.runtime == oldSelf.runtime",
                    "message": "runtime is immutable",
                    "fieldPath": ".runtime",
                },
                {"rule": "self.lora == oldSelf.lora", "message": "lora is immutable", "fieldPath": ".lora"},
            ]
        }
    )

    runtime: ObjectName
    """The LoRARuntime (same namespace) whose pods train this experiment. Immutable."""
    suspend: bool = False
    """true: checkpoint, leave the runtime and free the slot; false again: resume from the checkpoint."""
    priority: int = 0
    """Higher is admitted first and may preempt lower-priority experiments."""
    task: Task
    """What to learn and how it is scored."""
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    """The adapter's shape. Immutable."""
    training: Training = Field(default_factory=Training)
    """Training hyper-parameters."""
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)
    """Checkpoint policy."""
    publish: PublishPolicy | None = None
    """Send trained adapters to serving while training goes on (publishes checkpoints)."""

    def tokens_per_tick(self) -> int:
        """The sampling budget this experiment takes from its pod each tick."""
        t = self.training
        return t.prompts_per_step * t.group_size * t.max_new_tokens


class Reward(StatusModel):
    """Reward figures of the experiment."""

    mean: float | None = None
    """Mean reward of the last step."""
    best: float | None = None
    """The best step mean so far."""
    window: float | None = None
    """Mean reward of the last 10 steps."""


class CheckpointRef(StatusModel):
    """A checkpoint the runtime wrote."""

    step: int
    """The step it was taken at."""
    path: str = Field(max_length=MAX_PATH_LENGTH)
    """Its directory inside the runtime pod (on the checkpoint volume)."""
    time: datetime | None = None
    """When it was written."""


class LoRAExperimentStatus(StatusModel):
    """What the experiment is doing, written by the operator."""

    phase: Phase = "Pending"
    """Pending, Queued (waiting for room), Scheduled, Running, Suspended, Succeeded or Failed."""
    runtime_pod: str | None = Field(None, max_length=MAX_NAME_LENGTH)
    """The runtime pod training the experiment."""
    node: str | None = Field(None, max_length=MAX_NAME_LENGTH)
    """The node of that pod."""
    step: int = 0
    """Optimizer steps done."""
    total_steps: int | None = None
    """Steps asked for; empty for a continual experiment."""
    reward: Reward = Field(default_factory=Reward)
    """Reward figures."""
    last_checkpoint: CheckpointRef | None = None
    """The newest checkpoint."""
    published: PublishedRef | None = None
    """The adapter version published to spec.publish's server."""
    start_time: datetime | None = None
    """When training started."""
    completion_time: datetime | None = None
    """When the experiment Succeeded or Failed."""
    message: str = Field("", max_length=MAX_MESSAGE_LENGTH)
    """Why it is in its phase, for people."""
    observed_generation: int | None = None
    """The metadata.generation this status was computed from."""
    conditions: list[Condition] = Field(default_factory=list)
    """Admitted, Scheduled, Running, Checkpointed, Published, Succeeded and Failed conditions."""


class LoRAExperiment(BaseModel):
    """One RL LoRA fine-tuning experiment, trained on a warm shared runtime."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    api_version: Literal["clora.dev/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["LoRAExperiment"] = EXPERIMENT_KIND
    metadata: ObjectMeta
    spec: LoRAExperimentSpec
    status: LoRAExperimentStatus | None = None
