"""Shared pieces of the resource models: camelCase wire names, Kubernetes metadata, conditions."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from clora.constants import (
    DATA_KEY_PATTERN,
    DNS_LABEL_PATTERN,
    DNS_SUBDOMAIN_PATTERN,
    MAX_LABEL_LENGTH,
    MAX_MAP_ENTRIES,
    MAX_MESSAGE_LENGTH,
    MAX_NAME_LENGTH,
    MAX_REASON_LENGTH,
)

# A Kubernetes object name in the object's own namespace (DNS-1123 subdomain): never a path, never
# another namespace, so the operator cannot be made to read what the tenant could not.
ObjectName = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=DNS_SUBDOMAIN_PATTERN)]
# A key of a ConfigMap's or Secret's data.
DataKey = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=DATA_KEY_PATTERN)]
# A label value (and a nodeSelector's): at most 63 characters.
LabelValue = Annotated[str, Field(max_length=MAX_LABEL_LENGTH)]
# A label key: an optional DNS-subdomain prefix and "/", then a name of at most 63 characters.
MAX_LABEL_KEY_LENGTH = MAX_NAME_LENGTH + 1 + MAX_LABEL_LENGTH


def _short_keys(value: dict[str, Any]) -> dict[str, Any]:
    long = [k for k in value if len(k) > MAX_LABEL_KEY_LENGTH]
    if long:
        raise ValueError(f"keys must be at most {MAX_LABEL_KEY_LENGTH} characters: {long[0][:80]}...")
    return value


# The CEL rule on a string map: a structural schema has no propertyNames, so key lengths are a rule.
_SHORT_KEYS_RULE = {
    "rule": f"self.all(k, size(k) <= {MAX_LABEL_KEY_LENGTH})",
    "message": f"keys must be at most {MAX_LABEL_KEY_LENGTH} characters",
}


def string_map_field(*, min_entries: int = 0) -> Any:
    """A Field for a map of label-like keys to values: at most MAX_MAP_ENTRIES entries, short keys;
    required when it must have entries, else empty by default."""
    extra: dict[str, Any] = {"min_length": min_entries} if min_entries else {"default_factory": dict}
    return Field(
        **extra,
        max_length=MAX_MAP_ENTRIES,
        json_schema_extra={"x-kubernetes-validations": [_SHORT_KEYS_RULE]},
    )


LabelMap = Annotated[dict[str, LabelValue], AfterValidator(_short_keys)]


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

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=DNS_SUBDOMAIN_PATTERN)
    namespace: str = Field("default", min_length=1, max_length=MAX_LABEL_LENGTH, pattern=DNS_LABEL_PATTERN)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    resource_version: str | None = None
    uid: str | None = None
    creation_timestamp: datetime | None = None


class Condition(StatusModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str = Field(max_length=316)
    """The aspect this condition describes, e.g. Running."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field("", max_length=MAX_REASON_LENGTH)
    """A CamelCase word a program can match on."""
    message: str = Field("", max_length=MAX_MESSAGE_LENGTH)
    """What happened, for people."""
    last_transition_time: datetime | None = None
    """When status last changed (not when the message did)."""
    observed_generation: int | None = None
    """The metadata.generation this condition was computed from."""
