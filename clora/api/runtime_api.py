"""Wire types of the runtime's HTTP API (DESIGN.md, "Runtime HTTP API").

The runtime serves them and the operator reads them, so they live beside the resources and import
neither plane. Field names are camelCase on the wire, as in the resources.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from clora.api.base import SpecModel, StatusModel
from clora.api.experiment_types import CheckpointRef, LoRAExperimentSpec, Reward

# What the runtime says of one experiment. Suspended: checkpointed and not stepping, slot not counted.
RuntimePhase = Literal["Pending", "Running", "Suspended", "Succeeded", "Failed"]


class PutExperimentRequest(SpecModel):
    """Body of PUT /v1/experiments/{namespace}/{name}: add, or update the mutable fields of, an experiment."""

    spec: LoRAExperimentSpec
    """The LoRAExperiment's spec."""
    resume_from: str | None = None
    """A checkpoint directory inside the pod to resume from, or null to start fresh."""


class Sample(SpecModel):
    """One prompt for a continual experiment, with its reference answer."""

    prompt: str = Field(min_length=1)
    """The user message."""
    answer: str = ""
    """The reference answer the reward compares against."""


class PushSamplesRequest(SpecModel):
    """Body of POST /v1/experiments/{namespace}/{name}/samples."""

    samples: list[Sample] = Field(min_length=1, max_length=100_000)
    """Prompts appended to the experiment's queue, in order."""


class PushSamplesResponse(StatusModel):
    """Answer to POST .../samples."""

    accepted: int
    """How many samples were appended."""
    queued: int
    """How many prompts now wait in the queue."""


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


class ExperimentList(StatusModel):
    """Answer to GET /v1/experiments."""

    experiments: list[ExperimentState] = Field(default_factory=list)


class DeleteExperimentResponse(StatusModel):
    """Answer to DELETE /v1/experiments/{namespace}/{name}."""

    namespace: str
    name: str
    checkpoint: CheckpointRef | None = None
    """The checkpoint written on removal (null when the experiment had not stepped yet)."""


class ErrorResponse(StatusModel):
    """Every error answer."""

    detail: str
    """What is wrong; for a bad field, its path."""
