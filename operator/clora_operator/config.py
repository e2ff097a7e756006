"""The operator's settings: one Pydantic model that also builds the `clora operator` command line."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from clora_operator.scheduler import Policy

DEFAULT_RUNTIME_IMAGE = "ghcr.io/clora-dev/clora:0.1.0"


class OperatorConfig(BaseModel):
    """How the operator runs. Each field is a flag of `clora operator` (and an env var, CLORA_<NAME>)."""

    model_config = ConfigDict(extra="forbid")

    namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces (or glob patterns) to watch; none means the whole cluster.",
    )
    standalone: bool = Field(
        False, description="Run without peering: only for a single replica (and for tests)."
    )
    peering: str = Field(
        "clora",
        description="The kopf peering object shared by the replicas: one of them is active at a time.",
    )
    priority: int | None = Field(
        None,
        ge=0,
        description="kopf peering priority of this replica; the highest one is active. Default: a random"
        " one per process, since kopf pauses every replica when the highest priority is shared.",
    )
    liveness_port: int = Field(8081, ge=0, le=65535, description="Port of /healthz (0: none).")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Port of the Prometheus /metrics (0: none).")
    poll_interval: float = Field(
        2.0, gt=0, description="Seconds between two polls of one runtime pod's GET /v1/experiments."
    )
    reconcile_interval: float = Field(
        5.0, gt=0, description="Longest pause between two passes over a LoRARuntime's pool and queue."
    )
    unresponsive_after: float = Field(
        20.0,
        gt=0,
        description="A runtime pod that has not answered for this long is lost: its experiments move.",
    )
    delete_timeout: float = Field(
        30.0,
        gt=0,
        description="How long deleting an experiment waits for its runtime's checkpoint before giving up.",
    )
    runtime_image: str = Field(
        DEFAULT_RUNTIME_IMAGE, description="Runtime pod image when a LoRARuntime names none."
    )
    allow_host_path: bool = Field(
        False,
        description="Let a LoRARuntime keep checkpoints on a hostPath volume (it reaches the node's"
        " files: whoever may create a LoRARuntime could read or write them). Off: such a runtime is refused.",
    )
    allowed_images: list[str] = Field(
        default_factory=list,
        description="Images a LoRARuntime may name in spec.image besides runtime_image (exact"
        " references; '*' allows any). A custom image runs with the pod's rights and the runtime token;"
        " empty: only runtime_image.",
    )
    policy: Policy = Field(
        Policy.SPREAD, description="Pod choice among those that fit: spread (least loaded) or pack."
    )
    verbose: bool = Field(False, description="Debug logging.")


def _env(name: str) -> str | None:
    return os.environ.get(f"CLORA_{name.upper()}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per OperatorConfig field, defaulting to its CLORA_* env var, then to the model."""
    for name, info in OperatorConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default: Any = _env(name)
        if name in ("namespaces", "allowed_images"):
            # A list: the flag repeated (--namespace=a --namespace=b), or its env var comma-separated.
            parser.add_argument(
                "--namespace" if name == "namespaces" else "--allowed-image",
                dest=name,
                action="append",
                default=default.split(",") if default else None,
                help=info.description,
            )
        elif info.annotation is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=default.lower() in ("1", "true", "yes") if default else None,
                help=info.description,
            )
        else:
            parser.add_argument(flag, default=default, help=f"{info.description} (default: {info.default})")


def from_args(args: argparse.Namespace) -> OperatorConfig:
    values = {k: v for k in OperatorConfig.model_fields if (v := getattr(args, k, None)) is not None}
    return OperatorConfig.model_validate(values)
