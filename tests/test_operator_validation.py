"""The operator (kopf, in-process) against the KMock emulator, without runtime processes:
invalid experiments fail with the right reason and Event and touch nothing else, and deleting an
experiment whose runtime is gone does not block."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from operator_fixtures import (
    EXPERIMENTS,
    NS,
    RUNTIMES,
    Cluster,
    emulated_cluster,
    lora_runtime,
    running_operator,
)

from clora.api import LoRARuntime
from clora_operator.config import OperatorConfig
from clora_operator.pods import build_runtime_pod

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(180)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def experiment(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "clora.dev/v1alpha1",
        "kind": "LoRAExperiment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "runtime": "pool",
            "task": {"name": "arithmetic"},
            "lora": {"rank": 8},
            "training": {"steps": 5, "promptsPerStep": 2, "groupSize": 2, "maxNewTokens": 8},
            **spec,
        },
    }


async def start(cluster: Cluster, tmp_path: Path, **config: Any) -> Any:
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig(tmp_path / "kubeconfig"))
    await cluster.add_node("node-a")
    await cluster.create(
        RUNTIMES,
        lora_runtime("pool", capacity={"maxAdapters": 2, "maxRank": 16, "tokensPerTick": 4096}),
    )
    settings = {"standalone": True, "liveness_port": 0, "metrics_port": 0, "reconcile_interval": 1.0}
    return running_operator(OperatorConfig(**{**settings, **config}))


async def test_invalid_experiments_fail_with_reason_and_event(tmp_path: Path) -> None:
    async with emulated_cluster(tmp_path) as cluster, await start(cluster, tmp_path):
        await cluster.create(EXPERIMENTS, experiment("good"))
        await cluster.wait_for(
            "good queued by the scheduler",
            lambda: cluster.status("good").get("message") == "no runtime pod is ready",
        )
        good_before = cluster.status("good")
        pods_before = sorted(p["metadata"]["name"] for p in cluster.list("v1/pods"))

        cases = {
            "no-runtime": ({"runtime": "missing"}, "UnknownRuntime", "spec.runtime"),
            "rank": ({"lora": {"rank": 64}}, "RankAboveMaxRank", "spec.lora.rank"),
            "tokens": (
                {"training": {"promptsPerStep": 16, "groupSize": 16, "maxNewTokens": 64}},
                "TokenBudgetAboveTokensPerTick",
                "spec.training",
            ),
            "no-dataset": (
                {"task": {"name": "gsm8k", "dataset": {"configMap": {"name": "gsm8k", "key": "train"}}}},
                "MissingDataset",
                "spec.task.dataset.configMap",
            ),
            "bad-spec": ({"training": {"groupSize": 1}}, "InvalidSpec", "groupSize"),
        }
        for name, (spec, _, _) in cases.items():
            await cluster.create(EXPERIMENTS, experiment(name, **spec))
        for name, (_, reason, field) in cases.items():
            await cluster.wait_for(
                f"{name} failed", lambda name=name: cluster.status(name).get("phase") == "Failed"
            )
            st = cluster.status(name)
            assert field in st["message"], st["message"]
            conds = {c["type"]: c for c in st["conditions"]}
            assert conds["Failed"]["status"] == "True" and conds["Failed"]["reason"] == reason
            assert conds["Admitted"]["status"] == "False"
            assert st.get("runtimePod") is None
            events = await cluster.wait_for(
                f"{name} event", lambda name=name, r=reason: cluster.events(name, r)
            )
            assert events[0]["type"] == "Warning" and field in events[0]["message"]

        # Nothing else was disturbed: the good one keeps its status, no pod came or went.
        assert cluster.status("good") == good_before
        assert sorted(p["metadata"]["name"] for p in cluster.list("v1/pods")) == pods_before

        # A ConfigMap with the key makes the same spec valid.
        await cluster.create(
            "v1/configmaps",
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "gsm8k", "namespace": NS},
                "data": {"train": '{"question": "1+1?", "answer": "#### 2"}'},
            },
        )
        spec = {"task": {"name": "gsm8k", "dataset": {"configMap": {"name": "gsm8k", "key": "train"}}}}
        await cluster.create(EXPERIMENTS, experiment("with-dataset", **spec))
        await cluster.wait_for("queued", lambda: cluster.status("with-dataset").get("phase") == "Queued")


async def test_delete_does_not_block_when_the_runtime_is_gone(tmp_path: Path) -> None:
    """A restarted operator finds an experiment on a pod whose runtime no longer answers."""
    async with emulated_cluster(tmp_path) as cluster:
        operator = await start(cluster, tmp_path, delete_timeout=2.0, unresponsive_after=600.0)
        runtime = LoRARuntime.model_validate(cluster.get(RUNTIMES, NS, "pool"))
        pod = build_runtime_pod(runtime, "node-a", image="img")
        pod["spec"]["nodeName"] = "node-a"
        # Ready at an address where nothing listens: its runtime died a moment ago.
        pod["status"] = {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        }
        await cluster.create("v1/pods", pod)
        name = pod["metadata"]["name"]
        body = experiment("orphan")
        body["status"] = {"phase": "Running", "runtimePod": name, "node": "node-a", "step": 3}
        await cluster.create(EXPERIMENTS, body)
        async with operator:
            await cluster.wait_for(
                "finalizer added",
                lambda: (
                    "clora.dev/cleanup"
                    in ((cluster.get(EXPERIMENTS, NS, "orphan") or {}).get("metadata") or {}).get(
                        "finalizers", []
                    )
                ),
            )
            await cluster.delete(EXPERIMENTS, NS, "orphan")
            await cluster.wait_for(
                "orphan gone", lambda: cluster.get(EXPERIMENTS, NS, "orphan") is None, timeout=60
            )
            event = await cluster.wait_for(
                "RuntimeLost event", lambda: cluster.events("orphan", "RuntimeLost")
            )
            assert "without a final checkpoint" in event[0]["message"]


async def test_clora_operator_command_runs_against_the_emulator(tmp_path: Path) -> None:
    """`clora operator` as the chart runs it: a subprocess with a kubeconfig, liveness and metrics."""
    async with emulated_cluster(tmp_path) as cluster:
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig(tmp_path / "kubeconfig"))}
        health, metrics = free_port(), free_port()
        args = ["--standalone", f"--liveness-port={health}", f"--metrics-port={metrics}"]
        log = (tmp_path / "operator.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "clora.cli", "operator", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            await cluster.add_node("node-a")
            await cluster.create(
                RUNTIMES,
                lora_runtime("pool"),
            )
            await cluster.wait_for(
                "token Secret", lambda: cluster.get("v1/secrets", NS, "pool-token"), timeout=60
            )
            await cluster.wait_for(
                "runtime pod", lambda: cluster.get("v1/pods", NS, "pool-node-a"), timeout=30
            )
            async with httpx.AsyncClient(timeout=5) as http:
                assert (await http.get(f"http://127.0.0.1:{health}/healthz")).status_code == 200
                text = (await http.get(f"http://127.0.0.1:{metrics}/metrics")).text
            assert "clora_runtime_pods_ready" in text
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, (tmp_path / "operator.log").read_text()[-3000:]
