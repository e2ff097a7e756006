"""Publishing to aibrix (spec.publish.aibrix): kopf in-process, the KMock emulator with aibrix's
ModelAdapter resource declared, a real runtime process. Every published version moves the
experiment's ModelAdapter to its copy; status.published, the Published condition and one Event per
version say so."""

from __future__ import annotations

import os
import re
from pathlib import Path

import kmock
import pytest
from operator_fixtures import (
    EXPERIMENTS,
    NS,
    RUNTIMES,
    emulated_cluster,
    local_kubelet,
    lora_runtime,
    running_operator,
)
from runtime_server import free_port

from clora_operator.config import OperatorConfig

pytestmark = [pytest.mark.slow, pytest.mark.asyncio, pytest.mark.timeout(600)]

MODEL_ADAPTERS = "model.aibrix.ai/v1alpha1/modeladapters"


async def test_published_versions_move_the_experiments_model_adapter(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    config = OperatorConfig(
        allow_host_path=True,  # the shared checkpoint folder of the local kubelet's pods
        standalone=True,
        liveness_port=free_port(),
        metrics_port=free_port(),
        poll_interval=1.0,
        reconcile_interval=1.0,
    )
    async with emulated_cluster(tmp_path) as cluster:
        cluster.emulator.resources[MODEL_ADAPTERS] = kmock.ResourceInfo(
            kind="ModelAdapter",
            singular="modeladapter",
            namespaced=True,
            verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
            subresources={"status"},
        )
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig(tmp_path / "kubeconfig"))
        async with local_kubelet(cluster, tmp_path, 180), running_operator(config):
            await cluster.add_node("node-a")
            volume = {"hostPath": {"path": str(checkpoints)}, "mountPath": str(checkpoints)}
            await cluster.create(
                RUNTIMES,
                lora_runtime("tiny", capacity={"maxAdapters": 2, "maxRank": 8}, checkpointVolume=volume),
            )
            experiment = {
                "apiVersion": "clora.dev/v1alpha1",
                "kind": "LoRAExperiment",
                "metadata": {"name": "served", "namespace": NS},
                "spec": {
                    "runtime": "tiny",
                    "task": {"name": "arithmetic"},
                    "lora": {"rank": 4, "alpha": 8},
                    "training": {"steps": 30, "promptsPerStep": 2, "groupSize": 2, "maxNewTokens": 4},
                    "checkpoint": {"everySteps": 10, "keep": 1},
                    "publish": {
                        "aibrix": {"podSelector": {"model.aibrix.ai/name": "tiny"}, "baseModel": "tiny"},
                        "everySteps": 20,
                    },
                },
            }
            await cluster.create(EXPERIMENTS, experiment)
            await cluster.wait_for(
                "served finished",
                lambda: cluster.status("served").get("phase") in ("Succeeded", "Failed"),
                timeout=300,
            )
            status = cluster.status("served")
            assert status["phase"] == "Succeeded", status
            # Published: step 20 (everySteps 20 past nothing), then the final step 30; 10 was not due.
            assert status["published"]["step"] == 30 and status["published"]["name"] == "served"
            cond = next(c for c in status["conditions"] if c["type"] == "Published")
            assert cond["status"] == "True" and cond["reason"] == "Published"

            # One Event per version the operator saw (a poll may see only the newest), none repeated.
            # Events are posted after the status write that they report, so wait for step 30's.
            def published_messages() -> list[str]:
                return [e["message"] for e in cluster.events("served", "Published")]

            await cluster.wait_for(
                "the step 30 Published event",
                lambda: any(m.startswith("step 30 ") for m in published_messages()),
            )
            messages = published_messages()
            assert len(messages) == len(set(messages)), messages

            def adapter() -> dict:
                return cluster.get(MODEL_ADAPTERS, NS, "served") or {}

            await cluster.wait_for(
                "the ModelAdapter at step 30",
                lambda: re.search(
                    r"/published/step-00000030-[0-9a-f]+$", adapter().get("spec", {}).get("artifactURL", "")
                ),
            )
            body = adapter()
            assert body["spec"]["podSelector"] == {"matchLabels": {"model.aibrix.ai/name": "tiny"}}
            assert body["spec"]["baseModel"] == "tiny"
            assert body["metadata"]["ownerReferences"][0]["name"] == "served"
            # The copy it points at is whole, and outlives checkpoint pruning (keep 1); the runtime
            # published twice, step 20 and the final step 30 (step 10 was not due), keeping both copies.
            assert (Path(body["spec"]["artifactURL"]) / "adapter_model.safetensors").is_file()
            folder = Path(body["spec"]["artifactURL"]).parent
            copies = sorted(p.name[: len("step-00000020")] for p in folder.iterdir())
            assert copies == ["step-00000020", "step-00000030"]  # named step-N-<run id>
