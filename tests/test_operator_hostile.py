"""The operator against hostile or careless tenants' objects (issue 17): an object it cannot parse
fails alone, and names never reach outside the object's own namespace. `clora operator` runs as a
subprocess against the KMock emulator (no runtime processes), as the chart runs it: its recursion
limit is its own, not this test process's."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_fixtures import EXPERIMENTS, NS, RUNTIMES, Cluster, emulated_cluster, lora_runtime
from runtime_server import free_port

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(240)]

DEPTH = 1500


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


@contextlib.contextmanager
def deep_recursion_here() -> Iterator[None]:
    """The emulator (in this process) must store and serve the deep object, as an API server does."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(max(before, 20 * DEPTH))
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


@contextlib.contextmanager
def operator_process(cluster: Cluster, tmp_path: Path) -> Iterator[Path]:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig(tmp_path / "kubeconfig"))}
    args = ["--standalone", f"--liveness-port={free_port()}", "--metrics-port=0", "--reconcile-interval=1"]
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clora.cli", "operator", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            yield log_path
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def create_raw(cluster: Cluster, resource: str, text: str) -> None:
    """POSTs JSON text as it is (a client's json encoder would refuse this depth)."""
    rsp = await cluster.http.post(
        cluster.path(resource, NS), content=text, headers={"Content-Type": "application/json"}
    )
    rsp.raise_for_status()


async def test_a_deeply_nested_experiment_fails_alone(tmp_path: Path) -> None:
    """HIGH 1: a targetModules list nested 1500 deep used to crash kopf's watcher (Python's recursion
    limit) for every experiment; now that one fails naming the field and its neighbour is queued."""
    with deep_recursion_here():
        async with emulated_cluster(tmp_path) as cluster:
            await cluster.add_node("node-a")
            await cluster.create(RUNTIMES, lora_runtime("pool", capacity={"maxAdapters": 2, "maxRank": 16}))
            deep = json.dumps(experiment("deep", lora={"rank": 8, "targetModules": "@"}))
            await create_raw(cluster, EXPERIMENTS, deep.replace('"@"', "[" * DEPTH + "]" * DEPTH))
            with operator_process(cluster, tmp_path) as log:
                await cluster.create(EXPERIMENTS, experiment("good"))
                try:
                    await cluster.wait_for(
                        "good queued by the scheduler",
                        lambda: cluster.status("good").get("message") == "no runtime pod is ready",
                        timeout=90,
                    )
                    await cluster.wait_for(
                        "deep failed", lambda: cluster.status("deep").get("phase") == "Failed", timeout=30
                    )
                except AssertionError as e:
                    raise AssertionError(f"{e}\n{log.read_text()[-3000:]}") from None
                status = cluster.status("deep")
                assert "targetModules" in status["message"], status["message"]
                # The Event is posted after the status write it reports.
                await cluster.wait_for("the InvalidSpec event", lambda: cluster.events("deep", "InvalidSpec"))


async def in_process_operator(cluster: Cluster, tmp_path: Path) -> Any:
    from operator_fixtures import running_operator

    from clora_operator.config import OperatorConfig

    os.environ["KUBECONFIG"] = str(cluster.kubeconfig(tmp_path / "kubeconfig"))
    settings = {"standalone": True, "liveness_port": 0, "metrics_port": 0, "reconcile_interval": 1.0}
    return running_operator(OperatorConfig(**settings))


async def test_names_never_reach_outside_the_namespace(tmp_path: Path) -> None:
    """MEDIUM 4 (confused deputy): a path-like or cross-namespace name fails its experiment as an
    invalid spec, and the operator makes no request naming the other namespace."""
    async with emulated_cluster(tmp_path) as cluster:
        await cluster.add_node("node-a")
        await cluster.create(RUNTIMES, lora_runtime("pool", capacity={"maxAdapters": 2, "maxRank": 16}))
        for ns in ("victim",):
            await cluster.create(
                "v1/secrets",
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db-creds", "namespace": ns}},
            )
        hostile = "../../victim/secrets/db-creds"
        cases = {
            "cm": (
                {"task": {"name": "gsm8k", "dataset": {"configMap": {"name": hostile, "key": "k"}}}},
                "configMap",
            ),
            "rt": ({"runtime": "../victim/loraruntimes/pool"}, "runtime"),
            "secret": (
                {"task": {"name": "http", "verifier": {"url": "http://v", "tokenSecret": {"name": hostile}}}},
                "tokenSecret",
            ),
        }
        before = len(list(cluster.emulator))  # the test's own requests (the victim's Secret)
        async with await in_process_operator(cluster, tmp_path):
            for name, (spec, _) in cases.items():
                await cluster.create(EXPERIMENTS, experiment(name, **spec))
            for name, (_, field) in cases.items():
                await cluster.wait_for(
                    f"{name} failed", lambda n=name: cluster.status(n).get("phase") == "Failed"
                )
                status = cluster.status(name)
                assert field in status["message"], status["message"]
                assert {c["type"]: c["reason"] for c in status["conditions"]}["Failed"] == "InvalidSpec"
        paths = [str(request.url.path) for request in list(cluster.emulator)[before:]]
        assert paths and not [p for p in paths if "victim" in p], [p for p in paths if "victim" in p]


async def test_privileged_runtimes_and_planted_secrets_get_no_pods(tmp_path: Path) -> None:
    """MEDIUM 9: a hostPath or custom image (not allowed by the chart) and a token Secret clora did
    not create each leave their LoRARuntime without pods, its Ready condition naming why."""
    async with emulated_cluster(tmp_path) as cluster:
        await cluster.add_node("node-a")
        await cluster.create(
            "v1/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "planted-token", "namespace": NS},
                "stringData": {"token": "known-to-the-tenant"},
            },
        )
        await cluster.create(RUNTIMES, lora_runtime("host", checkpointVolume={"hostPath": {"path": "/"}}))
        await cluster.create(RUNTIMES, lora_runtime("image", image="evil.example.com/miner:latest"))
        await cluster.create(RUNTIMES, lora_runtime("planted"))
        await cluster.create(RUNTIMES, lora_runtime("fine"))
        async with await in_process_operator(cluster, tmp_path):
            await cluster.wait_for("fine's pod", lambda: cluster.get("v1/pods", NS, "fine-node-a"))
            expected = {
                "host": ("HostPathNotAllowed", "spec.checkpointVolume.hostPath"),
                "image": ("ImageNotAllowed", "spec.image"),
                "planted": ("TokenSecretNotOwned", "planted-token"),
            }
            for name, (reason, words) in expected.items():

                def ready(name: str = name) -> dict[str, Any]:
                    conds = cluster.runtime_status(name).get("conditions") or []
                    return next((c for c in conds if c["type"] == "Ready"), {})

                await cluster.wait_for(f"{name} refused", lambda r=reason, f=ready: f().get("reason") == r)
                assert ready()["status"] == "False" and words in ready()["message"], ready()
                await cluster.wait_for(f"the {reason} event", lambda n=name, r=reason: cluster.events(n, r))
            names = sorted(p["metadata"]["name"] for p in cluster.list("v1/pods"))
            assert names == ["fine-node-a"], names
            secret = cluster.get("v1/secrets", NS, "planted-token") or {}
            assert secret.get("stringData") == {"token": "known-to-the-tenant"}  # untouched
