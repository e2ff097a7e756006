"""The operator with one runtime pod gone slow: kopf in-process, the KMock emulator, two real runtime
processes, each behind a loopback proxy (operator_fixtures.DelayProxy) that the test makes slow.

- A DELETE whose answer comes after the client's timeout: the Succeeded experiment stays Succeeded,
  and its final checkpoint is recorded all the same.
- A pod that answers nothing for 15 s while the other trains: the healthy pod's statuses keep
  flowing, placements on it go on, and deleting an experiment on the hung pod counts its errors
  and gives up after delete_timeout, never holding anything else up.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
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
from test_operator_e2e import LONG, RUNTIME, Scenario, experiment, free_port

from clora_operator.config import OperatorConfig

pytestmark = [pytest.mark.slow, pytest.mark.asyncio, pytest.mark.timeout(600)]


async def test_a_slow_runtime_holds_up_nothing_else(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    config = OperatorConfig(
        allow_host_path=True,  # the shared checkpoint folder of the local kubelet's pods
        standalone=True,
        liveness_port=0,
        metrics_port=free_port(),
        poll_interval=1.0,
        reconcile_interval=2.0,
        unresponsive_after=120.0,  # the hung pod stays in the pool for the whole test
        delete_timeout=25.0,
    )
    measurements: dict[str, str] = {}
    async with emulated_cluster(tmp_path) as cluster:
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig(tmp_path / "kubeconfig"))
        kubelet = local_kubelet(cluster, tmp_path, 200, proxied=True)
        s = Scenario(cluster, kubelet)
        async with kubelet, running_operator(config):
            await cluster.add_node("node-a")
            await cluster.add_node("node-b")
            await cluster.create(
                RUNTIMES,
                lora_runtime(
                    RUNTIME,
                    capacity={"maxAdapters": 2, "maxRank": 8, "tokensPerTick": 4096},
                    checkpointVolume={"hostPath": {"path": str(checkpoints)}, "mountPath": str(checkpoints)},
                ),
            )
            await cluster.wait_for(
                "2 ready runtime pods", lambda: s.runtime_status().get("readyPods") == 2, timeout=180
            )

            # 1. A slow DELETE after success: Succeeded stays, the final checkpoint is recorded.
            await cluster.create(EXPERIMENTS, experiment("fin", steps=12, every=5))
            st = await s.wait_phase("fin", "Running")
            pod = st["runtimePod"]
            proxy = kubelet.proxies[pod]
            proxy.delete_delays.append(15.0)  # past the operator's 10 s client timeout
            await s.wait_phase("fin", "Succeeded", timeout=180)
            phases = set()
            deadline = time.monotonic() + 30
            final: dict[str, Any] = {}
            async with httpx.AsyncClient(timeout=5, headers={"Authorization": f"Bearer {s.token()}"}) as http:
                while time.monotonic() < deadline:
                    phases.add(s.phase("fin"))
                    removed = (await http.get(f"{kubelet.processes[pod].url}/v1/experiments")).json()[
                        "removed"
                    ]
                    final = next((r["checkpoint"] for r in removed if r["name"] == "fin"), None) or {}
                    deletes = [p for m, p in proxy.seen if m == "DELETE" and p.endswith("/fin")]
                    if final and s.c.status("fin").get("lastCheckpoint", {}).get("path") == final["path"]:
                        break
                    await asyncio.sleep(0.1)
            assert phases == {"Succeeded"}, phases
            assert final["step"] == 12
            assert s.c.status("fin")["lastCheckpoint"]["path"] == final["path"]
            assert s.c.status("fin")["step"] == 12
            assert deletes, "the runtime was asked to free fin's slot"
            await cluster.wait_for(
                "fin's slot freed", lambda: s.runtime_status().get("usedSlots") == 0, timeout=30
            )

            # 2. One pod hangs (15 s per answer) while the other trains.
            await cluster.create(EXPERIMENTS, experiment("live", steps=LONG, every=1000))
            await s.wait_phase("live", "Running")
            await cluster.create(EXPERIMENTS, experiment("stuck", steps=LONG, every=1000))
            await s.wait_phase("stuck", "Running")
            live_pod, stuck_pod = s.c.status("live")["runtimePod"], s.c.status("stuck")["runtimePod"]
            assert live_pod != stuck_pod  # spread: one each
            kubelet.proxies[stuck_pod].delay = 15.0
            deleted_at = time.monotonic()
            await cluster.delete(EXPERIMENTS, NS, "stuck")  # its DELETE goes to the hung pod
            await asyncio.sleep(12)  # the hung pod has missed a poll: no longer a place to go
            created = time.monotonic()
            await cluster.create(EXPERIMENTS, experiment("newbie", steps=LONG, every=1000))
            lags = []
            newbie_running: float | None = None
            live_url = kubelet.processes[live_pod].url
            async with httpx.AsyncClient(timeout=5, headers={"Authorization": f"Bearer {s.token()}"}) as http:
                while time.monotonic() - deleted_at < 40:
                    if newbie_running is None and s.phase("newbie") == "Running":
                        newbie_running = time.monotonic() - created
                    step = (await http.get(f"{live_url}/v1/experiments/{NS}/live")).json()["step"]
                    seen = time.monotonic()
                    await s.wait_step("live", step, timeout=30)
                    lags.append(time.monotonic() - seen)
                    await asyncio.sleep(0.5)
            st = await s.wait_phase("newbie", "Running", timeout=5)
            assert newbie_running is not None
            measurements["create -> Running on the healthy pod while the other hangs"] = (
                f"{newbie_running:.1f} s (sampled every 0.5 s or so)"
            )
            assert st["runtimePod"] == live_pod
            measurements["status lag of the healthy pod while the other hangs (poll 1 s)"] = (
                f"mean {statistics.mean(lags):.2f} s, max {max(lags):.2f} s over {len(lags)} samples"
            )
            assert max(lags) < 3.0, lags
            # The hung pod's DELETE: retried as a counted error, then given up after delete_timeout.
            await cluster.wait_for(
                "stuck gone", lambda: cluster.get(EXPERIMENTS, NS, "stuck") is None, timeout=60
            )
            event = await s.wait_event("stuck", "RuntimeLost")
            assert "did not answer within 25s" in event["message"]
            async with httpx.AsyncClient(timeout=5) as http:
                text = (await http.get(f"http://127.0.0.1:{config.metrics_port}/metrics")).text
            assert 'clora_reconcile_errors_total{kind="LoRAExperiment",reason="RuntimeUnavailable"}' in text
    print("\n" + "\n".join(f"{k}: {v}" for k, v in measurements.items()))
