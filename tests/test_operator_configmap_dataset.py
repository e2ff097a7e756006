"""A ConfigMap dataset end to end (issue 17, MEDIUM 10): the runtime pod mounts no ConfigMap, so the
operator reads the key in the experiment's own namespace and sends its value in the PUT's datasetText.
kopf in-process, the KMock emulator and a real runtime process; the records exist nowhere on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


async def test_a_configmap_dataset_reaches_the_runtime_in_the_put(tmp_path: Path) -> None:
    records = "".join(
        json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(6)
    )
    config = OperatorConfig(
        standalone=True, liveness_port=free_port(), metrics_port=0, poll_interval=1.0, reconcile_interval=1.0
    )
    async with emulated_cluster(tmp_path) as cluster:
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig(tmp_path / "kubeconfig"))
        async with local_kubelet(cluster, tmp_path, 171), running_operator(config):
            await cluster.add_node("node-a")
            await cluster.create(RUNTIMES, lora_runtime("tiny", capacity={"maxAdapters": 2, "maxRank": 8}))
            await cluster.create(
                "v1/configmaps",
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": "sums", "namespace": NS},
                    "data": {"train.jsonl": records},
                },
            )
            await cluster.wait_for(
                "a ready pod", lambda: cluster.runtime_status("tiny").get("readyPods") == 1, timeout=180
            )
            experiment = {
                "apiVersion": "clora.dev/v1alpha1",
                "kind": "LoRAExperiment",
                "metadata": {"name": "from-configmap", "namespace": NS},
                "spec": {
                    "runtime": "tiny",
                    "task": {
                        "name": "gsm8k",
                        "dataset": {"configMap": {"name": "sums", "key": "train.jsonl"}},
                    },
                    "lora": {"rank": 4, "alpha": 8},
                    "training": {"steps": 3, "promptsPerStep": 2, "groupSize": 2, "maxNewTokens": 6},
                },
            }
            await cluster.create(EXPERIMENTS, experiment)
            await cluster.wait_for(
                "from-configmap finished",
                lambda: cluster.status("from-configmap").get("phase") in ("Succeeded", "Failed"),
                timeout=240,
            )
            status = cluster.status("from-configmap")
            assert status["phase"] == "Succeeded", status
            assert status["step"] == 3
