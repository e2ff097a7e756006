"""The operator and task http: kopf in-process, the KMock emulator, a real runtime process and a real
verifier process. The verifier's bearer token comes from a Secret the operator reads: until it exists
the experiment waits (MissingSecret); then it trains with its verifier's rewards and succeeds, and the
token shows in no status or Event.
"""

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
from verifier_server import running_verifier, seen

from clora.constants import REASON_MISSING_SECRET
from clora_operator.config import OperatorConfig

pytestmark = [pytest.mark.slow, pytest.mark.asyncio, pytest.mark.timeout(600)]


async def test_the_verifier_token_comes_from_a_secret_and_nowhere_else(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(4)))
    config = OperatorConfig(
        standalone=True,
        liveness_port=free_port(),
        metrics_port=free_port(),
        poll_interval=1.0,
        reconcile_interval=1.0,
    )
    with running_verifier() as (url, token):
        async with emulated_cluster(tmp_path) as cluster:
            os.environ["KUBECONFIG"] = str(cluster.kubeconfig(tmp_path / "kubeconfig"))
            async with local_kubelet(cluster, tmp_path, 170), running_operator(config):
                await cluster.add_node("node-a")
                await cluster.create(
                    RUNTIMES, lora_runtime("tiny", capacity={"maxAdapters": 2, "maxRank": 8})
                )
                await cluster.wait_for(
                    "a ready pod",
                    lambda: cluster.runtime_status("tiny").get("readyPods") == 1,
                    timeout=180,
                )
                experiment = {
                    "apiVersion": "clora.dev/v1alpha1",
                    "kind": "LoRAExperiment",
                    "metadata": {"name": "judged", "namespace": NS},
                    "spec": {
                        "runtime": "tiny",
                        "task": {
                            "name": "http",
                            "dataset": {"path": str(prompts)},
                            "verifier": {
                                "url": f"{url}/score",
                                "tokenSecret": {"name": "verifier", "key": "t"},
                            },
                        },
                        "lora": {"rank": 4, "alpha": 8},
                        "training": {"steps": 6, "promptsPerStep": 2, "groupSize": 2, "maxNewTokens": 6},
                    },
                }
                await cluster.create(EXPERIMENTS, experiment)
                await cluster.wait_for(
                    "judged waiting for its Secret",
                    lambda: (
                        "waiting for Secret verifier with key t"
                        in cluster.status("judged").get("message", "")
                    ),
                    timeout=60,
                )
                assert cluster.status("judged")["phase"] == "Queued"
                assert any(
                    c.get("reason") == REASON_MISSING_SECRET for c in cluster.status("judged")["conditions"]
                )
                assert "/score" not in seen(url)  # nothing was sent without the token

                secret = {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": "verifier", "namespace": NS},
                    "stringData": {"t": token},
                }
                await cluster.create("v1/secrets", secret)
                await cluster.wait_for(
                    "judged finished",
                    lambda: cluster.status("judged").get("phase") in ("Succeeded", "Failed"),
                    timeout=240,
                )
                status = cluster.status("judged")
                assert status["phase"] == "Succeeded", status
                assert status["step"] == 6 and status["reward"]["mean"] is not None
                assert seen(url)["/score"]["posts"] >= 6  # every step scored, with the right token
                shown = json.dumps(status) + json.dumps(cluster.events("judged"))
                assert token not in shown
