"""The operator's status writes and decisions against the emulator and a real runtime process, driven
pass by pass (no kopf): optimistic concurrency, statuses edited by others corrected, decisions that
do not depend on the in-memory cache, terminal phases that stay, and the error steering of handlers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kopf
import pytest
import pytest_asyncio
from kopf._core.engines import posting
from operator_fixtures import EXPERIMENTS, NS, RUNTIMES, Cluster, emulated_cluster, lora_runtime
from prometheus_client import CollectorRegistry
from runtime_server import start_runtime_server

from clora.api import LoRAExperimentSpec, LoRARuntime
from clora.api.runtime_api import CheckpointRef, ExperimentState
from clora.constants import RUNTIME_PORT
from clora.metrics import OperatorMetrics
from clora_operator import k8s, pool
from clora_operator.config import OperatorConfig
from clora_operator.pods import build_runtime_pod, build_token_secret
from clora_operator.runtime_client import RuntimeClient, RuntimeUnavailable
from clora_operator.state import ExperimentRecord, OperatorState
from clora_operator.status import Observed, experiment_status, transition_events

pytestmark = [pytest.mark.timeout(300)]

NOW = datetime(2026, 1, 1, tzinfo=UTC)
log = __import__("logging").getLogger("test")


def experiment(name: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "clora.dev/v1alpha1",
        "kind": "LoRAExperiment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "runtime": "pool",
            "task": {"name": "arithmetic"},
            "lora": {"rank": 4},
            "training": {"steps": 10_000, "promptsPerStep": 2, "groupSize": 2, "maxNewTokens": 4},
        },
    }
    if status:
        body["status"] = status
    return body


class RecordingRuntimeClient(RuntimeClient):
    """The real client, keeping a log of the calls that change a runtime."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    async def put(self, base: str, token: str, namespace: str, name: str, *args: Any) -> ExperimentState:
        self.calls.append(("PUT", f"{namespace}/{name}"))
        return await super().put(base, token, namespace, name, *args)

    async def delete(self, base: str, token: str, namespace: str, name: str) -> Any:
        self.calls.append(("DELETE", f"{namespace}/{name}"))
        return await super().delete(base, token, namespace, name)


class RecordingKubeClient(k8s.KubeClient):
    """The real client, keeping a log of the experiment status patches."""

    patches: list[tuple[str, dict[str, Any]]]

    async def patch_experiment_status(self, namespace: str, name: str, patch: Any, *args: Any) -> Any:
        self.patches.append((f"{namespace}/{name}", dict(patch)))
        return await super().patch_experiment_status(namespace, name, patch, *args)


@pytest.fixture(autouse=True)
def kopf_context() -> None:
    """What kopf sets up for its handlers; Events are not posted here (the end-to-end tests read them)."""
    settings = kopf.OperatorSettings()
    settings.posting.enabled = False
    posting.settings_var.set(settings)


@pytest_asyncio.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with emulated_cluster(tmp_path) as c:
        os.environ["KUBECONFIG"] = str(c.kubeconfig(tmp_path / "kubeconfig"))
        yield c


async def operator_state(**config: Any) -> OperatorState:
    kube = await RecordingKubeClient.connect()
    assert isinstance(kube, RecordingKubeClient)
    kube.patches = []
    return OperatorState(
        config=OperatorConfig(standalone=True, **config),
        metrics=OperatorMetrics.create(CollectorRegistry()),
        kube=kube,
        runtime=RecordingRuntimeClient(),
    )


def record(cluster: Cluster, name: str) -> ExperimentRecord:
    """The experiment as kopf's index would hold it, read from the emulator now."""
    body = cluster.get(EXPERIMENTS, NS, name)
    assert body is not None
    return ExperimentRecord.from_body(body)


def errors(state: OperatorState, kind: str, reason: str) -> float:
    value = state.metrics.registry.get_sample_value(
        "clora_reconcile_errors_total", {"kind": kind, "reason": reason}
    )
    return value or 0.0


def running(step: int, checkpoint_step: int | None = None) -> Observed:
    ref = (
        CheckpointRef(step=checkpoint_step, path=f"/ckpt/step-{checkpoint_step}") if checkpoint_step else None
    )
    s = ExperimentState(namespace=NS, name="x", phase="Running", step=step, last_checkpoint=ref)
    return Observed(
        phase="Running", reason="Training", message="training", runtime_pod="p", node="n", state=s
    )


async def edit_status(cluster: Cluster, name: str, status: dict[str, Any]) -> None:
    """Someone else (a user, another controller) patches the status."""
    path = cluster.path(EXPERIMENTS, NS, name) + "/status"
    rsp = await cluster.http.patch(
        path, json={"status": status}, headers={"Content-Type": "application/merge-patch+json"}
    )
    rsp.raise_for_status()


@pytest.mark.asyncio
async def test_a_write_computed_from_a_stale_status_conflicts_and_is_counted(cluster: Cluster) -> None:
    await cluster.create(EXPERIMENTS, experiment("x", {"phase": "Running", "step": 3}))
    state = await operator_state()
    runtime_pool = state.pool(NS, "pool")
    try:
        stale = record(cluster, "x")
        await edit_status(cluster, "x", {"message": "edited meanwhile"})
        assert not await pool.write_status(state, runtime_pool, stale, running(5))
        assert errors(state, "LoRAExperiment", "Conflict") == 1
        assert cluster.status("x")["step"] == 3  # the stale write did not land
        # The conflict read the newer object: the next write, from the same stale record, lands.
        assert await pool.write_status(state, runtime_pool, stale, running(5))
        assert cluster.status("x")["step"] == 5
        assert cluster.status("x")["message"] == "training"

        # A handler's write raises instead, so kopf runs the handler again on the newer object.
        await cluster.create(EXPERIMENTS, experiment("y"))
        stale = record(cluster, "y")
        await edit_status(cluster, "y", {"message": "edited meanwhile"})
        with pytest.raises(k8s.Conflict):
            await pool.admit(state, runtime_pool, stale, None)
        await pool.admit(state, runtime_pool, record(cluster, "y"), None)
        assert cluster.status("y")["phase"] == "Queued"
    finally:
        await state.kube.close()
        await state.runtime.close()


@pytest.mark.asyncio
async def test_a_status_edited_by_someone_else_is_corrected(cluster: Cluster) -> None:
    await cluster.create(EXPERIMENTS, experiment("x", {"phase": "Running", "step": 3}))
    state = await operator_state()
    runtime_pool = state.pool(NS, "pool")
    try:
        assert await pool.write_status(state, runtime_pool, record(cluster, "x"), running(5))
        # The watch catches up; then someone overwrites the status.
        await edit_status(cluster, "x", {"phase": "Queued", "step": 0})
        # The runtime still says Running at step 5: the next write restores it from the cluster's
        # status, not from what this operator remembers having written.
        assert await pool.write_status(state, runtime_pool, record(cluster, "x"), running(5))
        assert (cluster.status("x")["phase"], cluster.status("x")["step"]) == ("Running", 5)
    finally:
        await state.kube.close()
        await state.runtime.close()


@pytest.mark.asyncio
async def test_errors_steer_kopf_retries_and_are_counted_by_reason() -> None:
    state = OperatorState(
        config=OperatorConfig(standalone=True, poll_interval=1.5),
        metrics=OperatorMetrics.create(CollectorRegistry()),
        kube=None,  # type: ignore[arg-type]
        runtime=None,  # type: ignore[arg-type]
    )
    with pytest.raises(kopf.TemporaryError) as e, state.handler_errors("LoRAExperiment"):
        raise RuntimeUnavailable("GET http://10.0.0.1: ConnectError")
    assert e.value.delay == 1.5
    with pytest.raises(kopf.TemporaryError), state.handler_errors("LoRAExperiment"):
        raise k8s.Conflict(409, "the object has been modified")
    with pytest.raises(kopf.PermanentError), state.handler_errors("LoRAExperiment"):
        LoRAExperimentSpec.model_validate({"runtime": "x", "lora": {"rank": -1}})
    # A bug is not hidden: counted, then kopf logs it with its traceback.
    with pytest.raises(ZeroDivisionError), state.handler_errors("LoRARuntime"):
        _ = 1 / 0
    # Raised on purpose: passed on, not counted.
    with pytest.raises(kopf.TemporaryError), state.handler_errors("LoRAExperiment"):
        raise kopf.TemporaryError("waiting", delay=1)
    assert errors(state, "LoRAExperiment", "RuntimeUnavailable") == 1
    assert errors(state, "LoRAExperiment", "Conflict") == 1
    assert errors(state, "LoRAExperiment", "InvalidSpec") == 1
    assert errors(state, "LoRARuntime", "ZeroDivisionError") == 1
    assert errors(state, "LoRAExperiment", "TemporaryError") == 0


@pytest.mark.asyncio
@pytest.mark.slow
async def test_dropping_the_cache_between_two_passes_changes_no_decision(
    cluster: Cluster, tmp_path: Path
) -> None:
    pid = os.getpid()
    ip = f"127.{150 + pid % 50}.{pid // 100 % 250}.2"
    server = start_runtime_server(tmp_path / "checkpoints", host=ip, port=RUNTIME_PORT)
    state = await operator_state(poll_interval=300.0)  # the test polls, not the pollers
    try:
        await cluster.add_node("node-a")
        await cluster.create(
            RUNTIMES,
            lora_runtime("pool", capacity={"maxAdapters": 1, "maxRank": 8, "tokensPerTick": 4096}),
        )
        runtime = LoRARuntime.model_validate(cluster.get(RUNTIMES, NS, "pool"))
        assert server.token is not None
        # The Secret as the operator would have created it (one it did not create is never adopted).
        await cluster.create("v1/secrets", build_token_secret(runtime, server.token))
        pod = build_runtime_pod(runtime, "node-a", image=state.config.runtime_image)
        pod["spec"]["nodeName"] = "node-a"
        pod["status"] = {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}
        await cluster.create("v1/pods", pod)
        for name in ("first", "second"):
            await cluster.create(EXPERIMENTS, experiment(name, {"phase": "Queued"}))

        def records() -> list[ExperimentRecord]:  # the index: the emulator's objects, always current
            return [ExperimentRecord.from_body(b) for b in cluster.list(EXPERIMENTS, NS)]

        runtime_pool = state.pool(NS, "pool")
        rt_client = state.runtime
        kube = state.kube
        assert isinstance(rt_client, RecordingRuntimeClient) and isinstance(kube, RecordingKubeClient)

        async def one_pass() -> tuple[list[tuple[str, str]], list[tuple[str, dict[str, Any]]]]:
            rt_client.calls.clear()
            kube.patches.clear()
            for view in list(runtime_pool.pods.values()):
                await pool.poll_pod(state, runtime_pool, view, records(), log)
            await pool.reconcile(state, runtime, records, log)
            pool.stop_pollers(runtime_pool)
            # Decisions: runtime calls, and patches that move an experiment (not its progress).
            moves = [(k, p) for k, p in kube.patches if {"phase", "runtimePod", "message"} & set(p)]
            return list(rt_client.calls), moves

        calls, moves = await one_pass()
        assert calls == [("PUT", f"{NS}/first")]  # one slot: the oldest is placed
        assert {k for k, _ in moves} == {f"{NS}/first", f"{NS}/second"}
        await one_pass()  # the first's Running arrives; things settle
        assert cluster.status("first")["phase"] == "Running"
        with_cache = await one_pass()
        runtime_pool.forget()
        without_cache = await one_pass()
        assert with_cache == without_cache == ([], [])
        assert cluster.get("v1/pods", NS, pod["metadata"]["name"]) is not None
        assert cluster.status("first")["phase"] == "Running"
        assert cluster.status("second")["phase"] == "Queued"
    finally:
        pool.stop_pollers(state.pool(NS, "pool"))
        await state.kube.close()
        await state.runtime.close()
        server.terminate()


def test_terminal_phases_stay_terminal_and_take_only_a_final_checkpoint() -> None:
    spec: dict[str, Any] = {"training": {"steps": 5}}
    done = experiment_status(
        None,
        Observed(phase="Succeeded", reason="Completed", message="trained 5 steps", state=running(5, 4).state),
        spec=spec,
        generation=1,
        now=NOW,
    )
    for later in (
        Observed(phase="Queued", reason="RuntimeLost", message="runtime pod p is gone"),
        Observed(phase="Failed", reason="TrainingFailed", message="nan"),
        running(7),
    ):
        assert experiment_status(done, later, spec=spec, generation=1, now=NOW) == done
    final = {"step": 5, "path": "/ckpt/step-5"}
    after = experiment_status(
        done, Observed(phase="Queued", reason="x", checkpoint=final), spec=spec, generation=1, now=NOW
    )
    assert after["phase"] == "Succeeded" and after["lastCheckpoint"] == final and after["step"] == 5
    assert after["message"] == done["message"]


def test_step_never_falls_below_the_recorded_checkpoint() -> None:
    spec: dict[str, Any] = {"training": {"steps": 50}}
    before = experiment_status(None, running(23, 20), spec=spec, generation=1, now=NOW)
    resumed = ExperimentState(namespace=NS, name="x", phase="Pending", step=0)
    obs = Observed(phase="Scheduled", reason="Scheduled", runtime_pod="q", node="m", state=resumed)
    after = experiment_status(before, obs, spec=spec, generation=1, now=NOW)
    assert after["step"] == 20 and after["lastCheckpoint"]["step"] == 20


def test_one_event_per_transition_and_none_for_progress() -> None:
    spec: dict[str, Any] = {"training": {"steps": 50}}
    queued = experiment_status(
        None,
        Observed(phase="Queued", reason="Admitted", message="admitted"),
        spec=spec,
        generation=1,
        now=NOW,
    )
    obs = Observed(phase="Scheduled", reason="Scheduled", message="placed", runtime_pod="p", node="n")
    scheduled = experiment_status(queued, obs, spec=spec, generation=1, now=NOW)
    assert [(e.reason, e.message) for e in transition_events(queued, scheduled, obs)] == [
        ("Scheduled", "placed on p (node n)")
    ]
    r5 = experiment_status(scheduled, running(5), spec=spec, generation=1, now=NOW)
    assert [e.reason for e in transition_events(scheduled, r5, running(5))] == ["Running"]
    r6 = experiment_status(r5, running(6), spec=spec, generation=1, now=NOW)
    assert transition_events(r5, r6, running(6)) == []  # progress: no Event
    r10 = experiment_status(r6, running(10, 10), spec=spec, generation=1, now=NOW)
    assert [(e.reason, e.message) for e in transition_events(r6, r10, running(10, 10))] == [
        ("Checkpointed", "checkpointed at step 10: /ckpt/step-10")
    ]
    assert transition_events(r10, r10, running(10, 10)) == []  # the same poll again: nothing
    lost = Observed(phase="Queued", reason="RuntimeLost", message="runtime pod p is gone")
    requeued = experiment_status(r10, lost, spec=spec, generation=2, now=NOW)
    events = transition_events(r10, requeued, lost)
    assert [(e.reason, e.warning) for e in events] == [("RuntimeLost", True)]
    assert events[0].message.startswith("requeued: runtime pod p is gone")
    assert all(c["observedGeneration"] == 2 for c in requeued["conditions"])
