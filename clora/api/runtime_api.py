"""Wire types of the runtime's HTTP API (DESIGN.md, "Runtime HTTP API").

The runtime serves them and the operator reads them, so they live beside the resources and import
neither plane. Field names are camelCase on the wire, as in the resources.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from clora.api.base import SpecModel, StatusModel
from clora.api.experiment_types import CheckpointRef, LoRAExperimentSpec, PublishedRef, Reward
from clora.constants import MAX_DATASET_TEXT_BYTES

# What the runtime says of one experiment. Suspended: checkpointed and not stepping, slot not counted.
# Removing: a DELETE arrived while the experiment was in a running tick; its final checkpoint is written
# at the tick's end, after which it is gone and a DELETE answers 200 with that checkpoint.
RuntimePhase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed", "Removing"]


class PutExperimentRequest(SpecModel):
    """Body of PUT /v1/experiments/{namespace}/{name}: add, or update the mutable fields of, an experiment."""

    spec: LoRAExperimentSpec
    """The LoRAExperiment's spec."""
    resume_from: str | None = None
    """A checkpoint directory inside the pod to resume from, or null to start fresh."""
    verifier_token: str | None = Field(None, max_length=8192, repr=False)
    """task http: the value of spec.task.verifier.tokenSecret (the operator reads the Secret), sent to
    the verifier as a bearer token; a later PUT without one keeps it. Write-only: never in an answer, a
    log line or a metric."""
    dataset_text: str | None = Field(None, max_length=MAX_DATASET_TEXT_BYTES, repr=False)
    """spec.task.dataset.configMap: the value of that ConfigMap key, which the operator reads in the
    experiment's own namespace (the runtime pod mounts no ConfigMap); null for a path dataset. (The
    operator bounds its bytes; characters are never more than bytes.)"""


# Bounds of one pushed sample and of one push (docs/security.md). The runtime also bounds a prompt in
# tokens (EngineConfig.max_prompt_tokens) and the waiting queue (EngineConfig.max_queued_samples).
SAMPLE_PROMPT_MAX_CHARS = 16384
"""The longest pushed prompt, in characters (the user message, before the chat template)."""
SAMPLE_ANSWER_MAX_CHARS = 4096
"""The longest reference answer of a pushed sample, in characters."""
SAMPLE_METADATA_MAX_BYTES = 16384
"""The largest metadata of a pushed sample, as compact JSON, in bytes."""
SAMPLES_PER_PUSH_MAX = 1024
"""The most samples one POST .../samples carries."""


class Sample(SpecModel):
    """One prompt for a continual experiment, with its reference answer."""

    prompt: str = Field(min_length=1, max_length=SAMPLE_PROMPT_MAX_CHARS)
    """The user message."""
    answer: str = Field("", max_length=SAMPLE_ANSWER_MAX_CHARS)
    """The reference answer the reward compares against."""
    metadata: dict[str, Any] | None = None
    """task http: passed to the verifier with the completion, as it is (at most
    SAMPLE_METADATA_MAX_BYTES as JSON)."""

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            size = len(json.dumps(value, separators=(",", ":")).encode())
            if size > SAMPLE_METADATA_MAX_BYTES:
                raise ValueError(f"{size} bytes as JSON, above the limit of {SAMPLE_METADATA_MAX_BYTES}")
        return value


class PushSamplesRequest(SpecModel):
    """Body of POST /v1/experiments/{namespace}/{name}/samples."""

    samples: list[Sample] = Field(min_length=1, max_length=SAMPLES_PER_PUSH_MAX)
    """Prompts appended to the experiment's queue, in order."""


class PushSamplesResponse(StatusModel):
    """Answer to POST .../samples."""

    accepted: int
    """How many samples were appended."""
    queued: int
    """How many prompts now wait in the queue."""


class StepStats(StatusModel):
    """RL statistics of an experiment's last step, named as TRL logs them (clora/metrics.py documents
    each; null until the first step, kl null when klCoef is 0)."""

    loss: float | None = None
    """Policy loss (mean over the step's updates), the KL term included."""
    kl: float | None = None
    """Mean per-token KL (k3) of the policy to the base model; only when klCoef > 0."""
    grad_norm: float | None = None
    """Adapter gradient norm before clipping (mean over the step's updates)."""
    completion_length: float | None = None
    """Mean completion length in tokens."""
    frac_reward_zero_std: float | None = None
    """Fraction of groups whose rewards were all equal."""
    clip_fraction: float | None = None
    """Fraction of completion tokens whose probability ratio was clipped (mean over updates)."""
    entropy: float | None = None
    """Mean policy entropy (nats) at the sampled tokens, at the sampling temperature."""


class ExperimentState(StatusModel):
    """One experiment as the runtime sees it: what the operator polls."""

    namespace: str
    name: str
    phase: RuntimePhase
    step: int = 0
    total_steps: int | None = None
    reward: Reward = Field(default_factory=Reward)
    last_checkpoint: CheckpointRef | None = None
    started_at: datetime | None = None
    message: str = ""
    stats: StepStats = Field(default_factory=StepStats)
    """RL statistics of the last step."""
    spec_digest: str | None = None
    """`spec_digest` of the spec the runtime holds: how the operator sees that a changed spec has not
    reached the runtime yet, from the runtime's own answer."""
    replica: int | None = None
    """The replica of the pod (0-based; LoRARuntime spec.replicas) whose engine trains it."""
    published: PublishedRef | None = None
    """The adapter version serving now (spec.publish)."""
    publish_error: str = ""
    """Why the last publish failed ("" when it did not); it is retried, and training goes on."""


def spec_digest(spec: LoRAExperimentSpec) -> str:
    """A digest of what a runtime must know of a spec (suspend and priority are the operator's business)."""
    shown = spec.model_dump_json(by_alias=True, exclude={"suspend", "priority"})
    return hashlib.sha256(shown.encode()).hexdigest()[:16]


class RemovedExperiment(StatusModel):
    """An experiment that left the runtime, with its final checkpoint."""

    namespace: str
    name: str
    checkpoint: CheckpointRef | None = None
    """The final checkpoint (null when it had not stepped, or failed)."""


class ExperimentList(StatusModel):
    """Answer to GET /v1/experiments."""

    experiments: list[ExperimentState] = Field(default_factory=list)
    removed: list[RemovedExperiment] = Field(default_factory=list)
    """Experiments removed recently (newest last, bounded), with their final checkpoints: how a
    client that got 202 from DELETE, or lost its answer, learns the checkpoint path."""


class DeleteExperimentResponse(StatusModel):
    """Answer to DELETE /v1/experiments/{namespace}/{name}: 200 when removed (repeated DELETEs of a
    removed experiment answer the same), 202 while its final checkpoint waits for the running tick."""

    namespace: str
    name: str
    removed: bool = True
    """true: the slot is free and `checkpoint` is final; false (HTTP 202): phase Removing, the final
    checkpoint is written when the running tick ends: DELETE again (or read `removed` of GET
    /v1/experiments) to learn it."""
    checkpoint: CheckpointRef | None = None
    """The final checkpoint (null when the experiment had not stepped yet, or until removed)."""


class Rollout(StatusModel):
    """One sampled completion of one step, as it was trained on."""

    namespace: str
    name: str
    step: int
    """The step it was sampled for (0 is the first)."""
    prompt: str
    """The problem's prompt (the user message; the chat template is applied around it)."""
    completion: str
    """The completion text (special tokens dropped)."""
    tokens: int
    """Completion length in tokens."""
    reward: float
    advantage: float
    sampler_logprob: float | None = None
    """Sum of the sampler's log-probabilities of the completion's tokens, at the sampling temperature."""
    trainer_logprob: float | None = None
    """Sum of the trainer's log-probabilities of the same tokens at the first update (same weights as
    the sampler's, at the sampling temperature): equal to samplerLogprob up to rounding."""


class RolloutList(StatusModel):
    """Answer to GET /v1/experiments/{namespace}/{name}/rollouts."""

    rollouts: list[Rollout] = Field(default_factory=list)
    steps: list[int] = Field(default_factory=list)
    """The steps the runtime still keeps for this experiment (the last few), oldest first."""


class ErrorResponse(StatusModel):
    """Every error answer."""

    detail: str
    """What is wrong; for a bad field, its path."""
