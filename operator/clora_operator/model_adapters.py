"""The aibrix ModelAdapter of an experiment that publishes to aibrix (spec.publish.aibrix): a pure
builder from the experiment and its status.published, which the operator applies level-triggered on
every pass (created when missing, its spec patched when it points at an older version)."""

from __future__ import annotations

from typing import Any

from clora.api import LoRAExperimentSpec
from clora.constants import API_VERSION, EXPERIMENT_KIND, LABEL_MANAGED_BY, MANAGED_BY

AIBRIX_GROUP = "model.aibrix.ai"
AIBRIX_VERSION = "v1alpha1"
MODEL_ADAPTER_PLURAL = "modeladapters"


def model_adapter(
    namespace: str, name: str, uid: str | None, spec: LoRAExperimentSpec, published: dict[str, Any]
) -> dict[str, Any] | None:
    """The ModelAdapter for the version published; None when the experiment does not publish to aibrix."""
    target = spec.publish.aibrix if spec.publish is not None else None
    if target is None or not published.get("path") or published.get("target") != "aibrix":
        return None
    adapter_spec: dict[str, Any] = {
        "podSelector": {"matchLabels": dict(target.pod_selector)},
        "artifactURL": published["path"],  # the published copy on the shared checkpoint volume
    }
    if target.base_model:
        adapter_spec["baseModel"] = target.base_model
    return {
        "apiVersion": f"{AIBRIX_GROUP}/{AIBRIX_VERSION}",
        "kind": "ModelAdapter",
        "metadata": {
            "name": str(published["name"]),
            "namespace": namespace,
            "labels": {LABEL_MANAGED_BY: MANAGED_BY},
            # Deleted with its experiment by the garbage collector: nothing to clean up by hand.
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": EXPERIMENT_KIND,
                    "name": name,
                    "uid": uid or "",
                    "controller": True,
                }
            ],
        },
        "spec": adapter_spec,
    }
