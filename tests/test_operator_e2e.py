"""End to end: the operator (kopf, in-process) against the KMock Kubernetes emulator, with real
`clora runtime` processes (tiny model) started by a kubelet stand-in for the pods it creates.

One LoRARuntime over two emulated nodes, two adapter slots per pod, checkpoints on one shared
directory (what a ReadWriteMany volume gives in a cluster). The scenario runs in order:
five experiments (one waits: four slots) all succeed with steps and rewards; a sixth with a
higher priority preempts the youngest running one, which later resumes from its checkpoint; one
suspended mid-run is checkpointed, frees its slot, and resumes; one deleted mid-run leaves a
checkpoint and frees its slot; an operator restart keeps every placement; killing one runtime
process moves its experiments to the other pod, where they resume from their checkpoints and
succeed. Measurements are printed (no timed assertions).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
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
    Cluster,
    Kubelet,
    emulated_cluster,
    local_kubelet,
    lora_runtime,
    running_operator,
)

from clora.constants import LABEL_KUEUE_QUEUE, RUNTIME_PORT
from clora_operator.config import OperatorConfig

pytestmark = [pytest.mark.slow, pytest.mark.asyncio, pytest.mark.timeout(600)]

RUNTIME = "tiny"
# Experiments start long, so nothing finishes before the scenario is done with it on any machine;
# then `finish_soon` lowers spec.training.steps (a mutable field the runtime applies in place).
LONG = 100_000
# Steps beyond the last status: more than the runtime can do within one status poll.
MARGIN = 80


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def experiment(
    name: str,
    *,
    steps: int = 60,
    priority: int = 0,
    suspend: bool = False,
    every: int = 10,
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "clora.dev/v1alpha1",
        "kind": "LoRAExperiment",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
        "spec": {
            "runtime": RUNTIME,
            "priority": priority,
            "suspend": suspend,
            "task": {"name": "arithmetic", "difficulty": 1},
            "lora": {"rank": 4, "alpha": 8},
            "training": {
                "steps": steps,
                "promptsPerStep": 2,
                "groupSize": 2,
                "maxNewTokens": 8,
                "learningRate": 1e-3,
                "seed": 1,
            },
            "checkpoint": {"everySteps": every, "keep": 2},
        },
    }


class Scenario:
    """Shortcuts over the cluster for the assertions below."""

    def __init__(self, cluster: Cluster, kubelet: Kubelet) -> None:
        self.c = cluster
        self.kubelet = kubelet

    def phase(self, name: str) -> str | None:
        return self.c.status(name).get("phase")

    async def wait_phase(self, name: str, *phases: str, timeout: float = 120) -> dict[str, Any]:
        await self.c.wait_for(
            f"{name} in {phases} (now {self.phase(name)}: {self.c.status(name).get('message')})",
            lambda: self.phase(name) in phases,
            timeout=timeout,
        )
        return self.c.status(name)

    async def wait_step(self, name: str, step: int, timeout: float = 120) -> dict[str, Any]:
        await self.c.wait_for(
            f"{name} at step >= {step} (now {self.c.status(name).get('step')}, {self.phase(name)})",
            lambda: self.c.status(name).get("step", 0) >= step,
            timeout=timeout,
        )
        return self.c.status(name)

    async def finish_soon(self, name: str) -> int:
        """Lowers the experiment's step budget to a little beyond where it is; returns the target."""
        target = self.c.status(name).get("step", 0) + MARGIN
        await self.c.patch(EXPERIMENTS, NS, name, {"spec": {"training": {"steps": target}}})
        await self.c.wait_for(f"{name} totalSteps", lambda: self.c.status(name).get("totalSteps") == target)
        return target

    def reasons(self, name: str) -> list[str]:
        return [e["reason"] for e in self.c.events(name)]

    async def wait_event(self, name: str, reason: str, timeout: float = 30) -> dict[str, Any]:
        """Events are posted in the background, just after the status change they report."""
        events = await self.c.wait_for(
            f"event {reason} on {name} (has {self.reasons(name)})",
            lambda: self.c.events(name, reason),
            timeout=timeout,
        )
        return events[0]

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next(c for c in self.c.status(name).get("conditions", []) if c["type"] == type_)

    def token(self) -> str:
        secret = self.c.get("v1/secrets", NS, f"{RUNTIME}-token")
        assert secret is not None
        return secret["stringData"]["token"]

    async def runtime_answers(self) -> dict[str, list[str]]:
        """pod -> experiments its runtime reports, asked directly."""
        out: dict[str, list[str]] = {}
        async with httpx.AsyncClient(timeout=5) as http:
            for pod, proc in self.kubelet.processes.items():
                if proc.process.poll() is not None:
                    continue
                rsp = await http.get(
                    f"http://{proc.ip}:{RUNTIME_PORT}/v1/experiments",
                    headers={"Authorization": f"Bearer {self.token()}"},
                )
                out[pod] = sorted(e["name"] for e in rsp.json()["experiments"])
        return out

    async def everywhere(self) -> set[str]:
        """Every experiment any runtime reports."""
        return {name for names in (await self.runtime_answers()).values() for name in names}

    def pod_finalizers(self, *, with_empty: bool = False) -> dict[str, list[str]]:
        """Runtime pod -> its finalizers (pods without any left out unless `with_empty`)."""
        out = {
            p["metadata"]["name"]: p["metadata"].get("finalizers") or [] for p in self.c.list("v1/pods", NS)
        }
        return {k: v for k, v in out.items() if v or with_empty}

    def count_events(self, name: str, *reasons: str) -> list[int]:
        return [len(self.c.events(name, reason)) for reason in reasons]

    def runtime_status(self) -> dict[str, Any]:
        return (self.c.get(RUNTIMES, NS, RUNTIME) or {}).get("status") or {}


async def test_operator_end_to_end(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"  # shared by both pods, like a ReadWriteMany PVC
    checkpoints.mkdir()
    liveness_port = free_port()
    config = OperatorConfig(
        allow_host_path=True,  # the shared checkpoint folder of the local kubelet's pods
        standalone=True,
        liveness_port=liveness_port,
        metrics_port=free_port(),
        poll_interval=2.0,
        reconcile_interval=2.0,
        unresponsive_after=6.0,
        delete_timeout=10.0,
    )
    measurements: dict[str, str] = {}
    async with emulated_cluster(tmp_path) as cluster:
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig(tmp_path / "kubeconfig"))
        kubelet = local_kubelet(cluster, tmp_path, 100)
        s = Scenario(cluster, kubelet)
        async with kubelet:
            await cluster.add_node("node-a", {"accelerator": "cpu"})
            await cluster.add_node("node-b", {"accelerator": "cpu"})
            await cluster.add_node("node-c", {"accelerator": "none"})  # not selected: no pod there
            operator = running_operator(config)
            await operator.__aenter__()
            try:
                await cluster.create(
                    RUNTIMES,
                    lora_runtime(
                        RUNTIME,
                        nodeSelector={"accelerator": "cpu"},
                        capacity={"maxAdapters": 2, "maxRank": 8, "tokensPerTick": 4096},
                        checkpointVolume={
                            "hostPath": {"path": str(checkpoints)},
                            "mountPath": str(checkpoints),
                        },
                    ),
                )
                # The pool: one pod per selected node, a token Secret, both ready.
                await cluster.wait_for(
                    "2 ready runtime pods", lambda: s.runtime_status().get("readyPods") == 2, timeout=180
                )
                rt = s.runtime_status()
                assert rt["totalSlots"] == 4
                assert s.pod_finalizers() == {}  # watched with an event handler only
                assert sorted(p["node"] for p in rt["pods"]) == ["node-a", "node-b"]
                assert next(c for c in rt["conditions"] if c["type"] == "Ready")["status"] == "True"
                token = s.token()

                # Five experiments over four slots: spread 2 + 2, the fifth waits (FIFO).
                for i in range(5):
                    await cluster.create(EXPERIMENTS, experiment(f"exp-{i}", steps=LONG))
                    await asyncio.sleep(1.05)  # creationTimestamp has second precision: FIFO order
                for i in range(4):
                    await s.wait_phase(f"exp-{i}", "Scheduled", "Running", "Succeeded")
                # Admitted as Queued, then told why on the operator's next pass; never a slot while all
                # four are taken.
                await cluster.wait_for(
                    "exp-4 queued on full runtimes",
                    lambda: s.phase("exp-4") == "Queued" and "full" in s.c.status("exp-4").get("message", ""),
                    timeout=60,
                )
                assert s.condition("exp-4", "Scheduled")["status"] == "False"
                nodes = [s.c.status(f"exp-{i}")["node"] for i in range(4)]
                assert sorted(nodes) == ["node-a", "node-a", "node-b", "node-b"], nodes

                # A sixth, higher priority: preempts the youngest of the lowest priority (exp-3).
                await s.wait_step("exp-3", 10)
                await cluster.create(EXPERIMENTS, experiment("vip", steps=LONG, priority=10))
                vip = await s.wait_phase("vip", "Scheduled", "Running", "Succeeded")
                victim = await s.wait_phase("exp-3", "Queued", "Scheduled", "Running", "Succeeded")
                preempted = await s.wait_event("exp-3", "Preempted")
                assert "vip" in preempted["message"]
                assert victim.get("lastCheckpoint", {}).get("step", 0) >= 10
                assert vip["runtimePod"] is not None

                # Everything of the first wave succeeds; the victim resumed from its checkpoint.
                wave = ["exp-0", "exp-1", "exp-2", "exp-3", "exp-4", "vip"]
                targets = {name: await s.finish_soon(name) for name in wave}
                for name in wave:
                    st = await s.wait_phase(name, "Succeeded", "Failed", timeout=240)
                    assert st["phase"] == "Succeeded", (name, st)
                    assert st["step"] == st["totalSteps"] == targets[name]
                    assert st["reward"].get("mean") is not None
                    assert st["completionTime"] and st["startTime"]
                    assert st["lastCheckpoint"]["path"].startswith(str(checkpoints))
                    assert s.condition(name, "Succeeded")["status"] == "True"
                    await s.wait_event(name, "Succeeded")
                await s.wait_event("exp-3", "ResumedFromCheckpoint")
                # One Event per transition, none repeated by polls.
                assert s.count_events("exp-0", "Admitted", "Scheduled", "Running", "Succeeded") == [
                    1,
                    1,
                    1,
                    1,
                ]
                assert s.count_events("exp-3", "Preempted", "Scheduled", "Running") == [1, 2, 2]
                for name in wave:
                    checkpointed = [e["message"] for e in s.c.events(name, "Checkpointed")]
                    assert checkpointed and len(checkpointed) == len(set(checkpointed)), checkpointed
                await cluster.wait_for("slots freed", lambda: s.runtime_status().get("usedSlots") == 0)

                # Time from creation to Running on a warm pod, and status lag runtime -> CR.
                t0 = time.monotonic()
                await cluster.create(EXPERIMENTS, experiment("warm", steps=LONG, every=10))
                await s.wait_phase("warm", "Scheduled", "Running")
                measurements["create -> Scheduled (PUT answered)"] = f"{time.monotonic() - t0:.2f} s"
                await s.wait_phase("warm", "Running")
                measurements["create -> Running in status (warm pod, poll 2 s)"] = (
                    f"{time.monotonic() - t0:.2f} s"
                )
                pod = s.c.status("warm")["runtimePod"]
                ip = kubelet.processes[pod].ip
                lags = []
                async with httpx.AsyncClient(timeout=5) as http:
                    for _ in range(5):
                        rsp = await http.get(
                            f"http://{ip}:{RUNTIME_PORT}/v1/experiments/{NS}/warm",
                            headers={"Authorization": f"Bearer {token}"},
                        )
                        seen, step = time.monotonic(), rsp.json()["step"]
                        await s.wait_step("warm", step, timeout=30)
                        lags.append(time.monotonic() - seen)
                        await asyncio.sleep(0.7)
                measurements["status lag runtime step -> CR (poll 2 s)"] = (
                    f"mean {statistics.mean(lags):.2f} s, max {max(lags):.2f} s over {len(lags)} samples"
                )

                # Suspend mid-run: checkpointed, slot freed; resume continues from the checkpoint.
                await s.wait_step("warm", 20)
                await cluster.patch(EXPERIMENTS, NS, "warm", {"spec": {"suspend": True}})
                st = await s.wait_phase("warm", "Suspended")
                suspended_step = st["lastCheckpoint"]["step"]
                assert suspended_step >= 20
                assert s.condition("warm", "Scheduled")["status"] == "False"
                await cluster.wait_for("slot freed", lambda: s.runtime_status().get("usedSlots") == 0)
                assert "warm" not in await s.everywhere()
                await cluster.patch(EXPERIMENTS, NS, "warm", {"spec": {"suspend": False}})
                await s.wait_phase("warm", "Scheduled", "Running")
                await s.wait_event("warm", "ResumedFromCheckpoint")
                st = await s.wait_step("warm", suspended_step)
                assert st["step"] >= suspended_step  # resumed, not restarted
                # A changed step budget reaches the runtime on its pod (a re-PUT, no restart).
                target = await s.finish_soon("warm")

                # Kueue: created suspended with a queue label, it waits until Kueue flips suspend.
                await cluster.create(
                    EXPERIMENTS,
                    experiment("kueued", steps=20, suspend=True, labels={LABEL_KUEUE_QUEUE: "team-a"}),
                )
                st = await s.wait_phase("kueued", "Suspended")
                assert s.condition("kueued", "Admitted")["reason"] == "WaitingForKueue"
                await asyncio.sleep(3)
                assert s.phase("kueued") == "Suspended"
                assert "kueued" not in await s.everywhere()
                await cluster.patch(EXPERIMENTS, NS, "kueued", {"spec": {"suspend": False}})
                await s.wait_phase("kueued", "Succeeded", timeout=120)

                # Delete mid-run: a checkpoint is left, the slot is freed, the object goes.
                await cluster.create(EXPERIMENTS, experiment("doomed", steps=LONG, every=5))
                await s.wait_step("doomed", 6)
                doomed_pod = s.c.status("doomed")["runtimePod"]
                await cluster.delete(EXPERIMENTS, NS, "doomed")
                await cluster.wait_for("doomed gone", lambda: cluster.get(EXPERIMENTS, NS, "doomed") is None)
                assert "doomed" not in (await s.runtime_answers()).get(doomed_pod, [])
                left = sorted((checkpoints / NS / "doomed").glob("step-*"))
                assert left, "deleting must leave a checkpoint"
                await s.wait_event("doomed", "Checkpointed")

                # Operator restart: placements are adopted, none duplicated or lost. An experiment
                # deleted while the operator is down is checkpointed and freed before it goes.
                await cluster.create(EXPERIMENTS, experiment("r1", steps=LONG))
                await cluster.create(EXPERIMENTS, experiment("r2", steps=LONG))
                await s.wait_phase("r1", "Running")
                await s.wait_phase("r2", "Running")
                await s.wait_step("r1", 3)
                before = {n: s.c.status(n)["runtimePod"] for n in ("warm", "r1", "r2")}
                await operator.__aexit__(None, None, None)
                await cluster.create(EXPERIMENTS, experiment("r3", steps=LONG))  # no operator: Pending
                await cluster.delete(EXPERIMENTS, NS, "r1")
                operator = running_operator(config)
                await operator.__aenter__()
                await cluster.wait_for(
                    "r1 gone", lambda: cluster.get(EXPERIMENTS, NS, "r1") is None, interval=0.02, timeout=60
                )
                assert "r1" not in await s.everywhere()
                await s.wait_event("r1", "Checkpointed")
                assert any(p.name.startswith("step-") for p in (checkpoints / NS / "r1").iterdir())
                del before["r1"]
                await s.wait_phase("r3", "Running")
                await asyncio.sleep(3 * config.poll_interval)
                answers = await s.runtime_answers()
                for name, pod in before.items():
                    holders = [p for p, names in answers.items() if name in names]
                    if s.phase(name) != "Succeeded":
                        assert holders == [pod], (name, answers)
                    assert s.c.status(name)["runtimePod"] == pod

                # Kill the runtime process under r2: its experiments move to the other pod,
                # resume from their checkpoints and succeed. (Once warm is done, the other pod has
                # room for whatever was on the killed one.) Their status.step never falls below the
                # checkpoint they resume from.
                st = await s.wait_phase("warm", "Succeeded", "Failed", timeout=240)
                assert (st["phase"], st["step"]) == ("Succeeded", target), st
                await s.wait_step("r2", 20)
                await s.wait_step("r3", 20)
                killed = s.c.status("r2")["runtimePod"]
                killed_node = s.c.status("r2")["node"]
                moved = [n for n in ("r2", "r3") if s.c.status(n).get("runtimePod") == killed]
                checkpoint_steps = {n: s.c.status(n)["lastCheckpoint"]["step"] for n in moved}
                steps_at_kill = {n: s.c.status(n)["step"] for n in moved}
                lowest = dict(steps_at_kill)

                async def watch_steps() -> None:
                    while True:
                        for n in moved:
                            lowest[n] = min(lowest[n], s.c.status(n).get("step", 0))
                        await asyncio.sleep(0.05)

                watcher = asyncio.create_task(watch_steps())
                killed_at = time.monotonic()
                kubelet.kill(killed)
                for name in moved:
                    await s.c.wait_for(
                        f"{name} moved off {killed_node}",
                        lambda name=name: (
                            s.c.status(name).get("node") not in (None, killed_node)
                            and s.phase(name) in ("Scheduled", "Running", "Succeeded")
                        ),
                        timeout=240,
                    )
                    await s.wait_event(name, "RuntimeLost")
                    await s.wait_event(name, "ResumedFromCheckpoint")
                measurements["runtime killed -> its experiments placed on the other pod"] = (
                    f"{time.monotonic() - killed_at:.1f} s (unresponsive after 6 s)"
                )
                measurements["steps redone after the kill (status step - checkpoint step)"] = str(
                    {n: steps_at_kill[n] - checkpoint_steps[n] for n in moved}
                )
                targets = {name: await s.finish_soon(name) for name in ("r2", "r3")}
                watcher.cancel()
                for name in moved:
                    assert lowest[name] >= checkpoint_steps[name], (lowest, checkpoint_steps)
                measurements["lowest status.step after the kill vs checkpoint step"] = str(
                    {n: (lowest[n], checkpoint_steps[n]) for n in moved}
                )
                for name in ("r2", "r3"):
                    st = await s.wait_phase(name, "Succeeded", "Failed", timeout=240)
                    assert st["phase"] == "Succeeded", (name, st)
                    assert st["step"] == st["totalSteps"] == targets[name]
                for name in moved:
                    # Steps lost are at most checkpoint.everySteps: it resumed at its checkpoint.
                    assert checkpoint_steps[name] >= 10
                # The broken pod was replaced and the pool is whole again.
                await cluster.wait_for(
                    "pool whole again", lambda: s.runtime_status().get("readyPods") == 2, timeout=180
                )

                # Liveness endpoint and metrics.
                async with httpx.AsyncClient(timeout=5) as http:
                    assert (await http.get(f"http://127.0.0.1:{liveness_port}/healthz")).status_code == 200
                    text = (await http.get(f"http://127.0.0.1:{config.metrics_port}/metrics")).text
                # A fresh registry since the restart: the kill's re-placement is counted.
                assert 'clora_scheduling_decisions_total{decision="place"}' in text
                assert 'clora_runtime_pods_ready{namespace="clora-test",runtime="tiny"} 2.0' in text

                # No finalizer on any runtime pod: with the operator stopped, one is deleted at once.
                assert s.pod_finalizers() == {}
                await operator.__aexit__(None, None, None)
                operator = contextlib.nullcontext()
                pod = sorted(s.pod_finalizers(with_empty=True))[0]
                await cluster.delete("v1/pods", NS, pod)
                assert cluster.get("v1/pods", NS, pod) is None
            finally:
                await operator.__aexit__(None, None, None)
    print("\n" + "\n".join(f"{k}: {v}" for k, v in measurements.items()))
