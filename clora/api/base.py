"""Shared pieces of the resource models: camelCase wire names, Kubernetes metadata, conditions."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class SpecModel(BaseModel):
    """A part of a spec: camelCase on the wire, unknown fields refused (the CRD would prune them)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
    )

    def wire(self) -> dict[str, Any]:
        """The JSON a client sends: camelCase names, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(SpecModel):
    """A part of a status: written by clora, so unknown fields are tolerated on read."""

    model_config = ConfigDict(extra="ignore")


class ObjectMeta(BaseModel):
    """The part of Kubernetes ObjectMeta that clora reads; everything else is kept as is."""

    model_config = ConfigDict(populate_by_name=True, alias_generator=to_camel, extra="allow")

    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    namespace: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    resource_version: str | None = None
    uid: str | None = None
    creation_timestamp: datetime | None = None


class Condition(StatusModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str
    """The aspect this condition describes, e.g. Running."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = ""
    """A CamelCase word a program can match on."""
    message: str = ""
    """What happened, for people."""
    last_transition_time: datetime | None = None
    """When status last changed (not when the message did)."""
    observed_generation: int | None = None
    """The metadata.generation this condition was computed from."""
