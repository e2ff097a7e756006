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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import kubernetes
from kubernetes_asyncio import client as aclient
from kubernetes_asyncio import config as aconfig
from operator_fixtures import EXPERIMENTS, NS, emulated_cluster

from clora.constants import EXPERIMENT_PLURAL, GROUP, VERSION

ROUNDS = 4


async def timed(n: int, call: Callable[[int], Awaitable[Any]], *, concurrent: bool) -> tuple[float, float]:
    """(wall seconds, client CPU seconds) per call: n calls one after another, or all n at once.
    The emulator runs in another process, so this process's CPU time is the client's alone."""
    start, cpu = time.perf_counter(), time.process_time()
    if concurrent:
        await asyncio.gather(*(call(i) for i in range(n)))
    else:
        for i in range(n):
            await call(i)
    return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n


async def serve(url_file: Path) -> None:
    """The emulator, in its own process: its work must not count as the clients'."""
    async with emulated_cluster(url_file.parent) as cluster:
        await cluster.create(
            EXPERIMENTS,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "LoRAExperiment",
                "metadata": {"name": "x", "namespace": NS},
                "spec": {"runtime": "r"},
            },
        )
        cluster.kubeconfig(url_file)
        await asyncio.Event().wait()


async def main(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(kubeconfig)])
        try:
            while not kubeconfig.exists() or not kubeconfig.read_text():
                await asyncio.sleep(0.1)
            return await measure(n, kubeconfig)
        finally:
            server.terminate()
            server.wait()


async def measure(n: int, kubeconfig: Path) -> dict[str, Any]:
    configuration = aclient.Configuration()
    await aconfig.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    configuration.client_side_validation = False
    api = aclient.ApiClient(configuration)
    acustom, acore = aclient.CustomObjectsApi(api), aclient.CoreV1Api(api)

    sync_api = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
    sync_api.configuration.client_side_validation = False
    scustom, score = (
        kubernetes.client.CustomObjectsApi(sync_api),
        kubernetes.client.CoreV1Api(sync_api),
    )

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
                scustom.patch_namespaced_custom_object_status,
                *args,
                patch_body(i),
                _content_type=merge,
            ),
            "list_pods": lambda i: asyncio.to_thread(score.list_namespaced_pod, NS),
        },
    }
    out: dict[str, Any] = {"calls": n, "rounds": ROUNDS, "ms_per_call": {}}
    names = list(arms)
    for op in arms[names[0]]:
        for arm in names:
            await arms[arm][op](0)  # warm the connection pools
        for concurrent in (False, True):
            samples: dict[str, list[tuple[float, float]]] = {arm: [] for arm in names}
            for r in range(ROUNDS):
                # Arms alternate within each round: the emulator slows as objects change,
                # and that drift must hit both alike.
                for arm in names if r % 2 == 0 else names[::-1]:
                    samples[arm].append(await timed(n, arms[arm][op], concurrent=concurrent))
            key = f"{op} ({'concurrent' if concurrent else 'sequential'})"
            out["ms_per_call"][key] = {
                arm: {
                    "wall_median": round(1000 * statistics.median(w for w, _ in v), 2),
                    "client_cpu_median": round(1000 * statistics.median(c for _, c in v), 2),
                }
                for arm, v in samples.items()
            }
    await api.close()
    sync_api.close()
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    asyncio.run(serve(Path(sys.argv[2])))
elif __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 50)), indent=1))
