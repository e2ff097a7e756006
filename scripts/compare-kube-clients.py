"""Measures the two maintained Python Kubernetes clients the operator could use, side by side in one
run, against the KMock emulator the tests use (tests/operator_fixtures.py), on the operator's own
calls: read an experiment, merge-patch its status, list pods.

- kubernetes_asyncio (what clora_operator.k8s uses): native asyncio on aiohttp;
- kubernetes, the official client: synchronous, so an asyncio operator runs each call in a worker
  thread (asyncio.to_thread), as one would inside kopf.

Usage: .venv/bin/python scripts/compare-kube-clients.py [N]   (needs `pip install kubernetes`, which
clora itself does not depend on). Prints one JSON object: seconds per call, sequential and with N
calls in flight at once, per client.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import kubernetes  # noqa: E402
from kubernetes_asyncio import client as aclient  # noqa: E402
from kubernetes_asyncio import config as aconfig  # noqa: E402
from operator_fixtures import EXPERIMENTS, NS, emulated_cluster  # noqa: E402

from clora.constants import EXPERIMENT_PLURAL, GROUP, VERSION  # noqa: E402

ROUNDS = 3


async def timed(n: int, call: Callable[[int], Awaitable[Any]], *, concurrent: bool) -> float:
    """Seconds per call: n calls one after another, or all n in flight at once."""
    start = time.perf_counter()
    if concurrent:
        await asyncio.gather(*(call(i) for i in range(n)))
    else:
        for i in range(n):
            await call(i)
    return (time.perf_counter() - start) / n


async def main(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with emulated_cluster(Path(tmp)) as cluster:
            kubeconfig = cluster.kubeconfig(Path(tmp) / "kubeconfig")
            os.environ["KUBECONFIG"] = str(kubeconfig)
            await cluster.create(
                EXPERIMENTS,
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "LoRAExperiment",
                    "metadata": {"name": "x", "namespace": NS},
                    "spec": {"runtime": "r"},
                },
            )

            configuration = aclient.Configuration()
            await aconfig.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
            configuration.client_side_validation = False
            api = aclient.ApiClient(configuration)
            acustom, acore = aclient.CustomObjectsApi(api), aclient.CoreV1Api(api)

            sync_api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
            sync_api.configuration.client_side_validation = False
            scustom, score = kubernetes.client.CustomObjectsApi(sync_api), kubernetes.client.CoreV1Api(sync_api)

            def patch_body(i: int) -> dict[str, Any]:
                return {"status": {"step": i}}

            merge = "application/merge-patch+json"
            args = (GROUP, VERSION, NS, EXPERIMENT_PLURAL, "x")
            arms: dict[str, dict[str, Callable[[int], Awaitable[Any]]]] = {
                "kubernetes_asyncio": {
                    "get": lambda i: acustom.get_namespaced_custom_object(*args),
                    "patch_status": lambda i: acustom.patch_namespaced_custom_object_status(
                        *args, patch_body(i), _content_type=merge
                    ),
                    "list_pods": lambda i: acore.list_namespaced_pod(NS),
                },
                "kubernetes (to_thread)": {
                    "get": lambda i: asyncio.to_thread(scustom.get_namespaced_custom_object, *args),
                    "patch_status": lambda i: asyncio.to_thread(
                        scustom.patch_namespaced_custom_object_status, *args, patch_body(i), _content_type=merge
                    ),
                    "list_pods": lambda i: asyncio.to_thread(score.list_namespaced_pod, NS),
                },
            }
            out: dict[str, Any] = {"calls": n, "rounds": ROUNDS, "ms_per_call": {}}
            for arm, calls in arms.items():
                for op, call in calls.items():
                    await call(0)  # warm the connection pool
                    for concurrent in (False, True):
                        # Rounds interleave the arms' order so drift hits both alike.
                        samples = [await timed(n, call, concurrent=concurrent) for _ in range(ROUNDS)]
                        key = f"{op} ({'concurrent' if concurrent else 'sequential'})"
                        out["ms_per_call"].setdefault(key, {})[arm] = {
                            "median": round(1000 * statistics.median(samples), 3),
                            "min": round(1000 * min(samples), 3),
                        }
            await api.close()
            sync_api.close()
            return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)), indent=1))
