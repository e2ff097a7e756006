"""Unit tests of the operator's pure parts: status building, pod builders, admission checks,
configuration, and the permissions declared for the chart."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

import kubernetes_validate
import pytest

from clora.api import LoRARuntime
from clora.api.runtime_api import ExperimentState
from clora.constants import (
    ANNOTATION_POD_TEMPLATE_HASH,
    FINALIZER,
    REASON_MISSING_DATASET,
    REASON_RANK_TOO_HIGH,
    REASON_TOKEN_BUDGET_TOO_HIGH,
    REASON_UNKNOWN_RUNTIME,
    TOKEN_FILE_ENV,
)
from clora_operator import admission, config, k8s, pods, status
from clora_operator.scheduler import Policy

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPEC: dict[str, Any] = {"runtime": "pool", "task": {"name": "arithmetic"}, "training": {"steps": 10}}


def runtime(**spec: Any) -> LoRARuntime:
    return LoRARuntime.model_validate(
        {
            "metadata": {"name": "pool", "namespace": "ns", "uid": "u-1"},
            "spec": {"baseModel": "tiny", **spec},
        }
    )


# status.py


def running(step: int, **kw: Any) -> ExperimentState:
    return ExperimentState.model_validate(
        {
            "namespace": "ns",
            "name": "e",
            "phase": "Running",
            "step": step,
            "totalSteps": 10,
            "reward": {"mean": 0.5, "best": 0.7, "window": 0.4},
            **kw,
        }
    )


def test_running_status_from_the_runtime() -> None:
    obs = status.observe_runtime(running(3), "pool-a", "node-a")
    st = status.experiment_status({}, obs, spec=SPEC, generation=2, now=T0)
    assert st["phase"] == "Running"
    assert (st["runtimePod"], st["node"], st["step"], st["totalSteps"]) == ("pool-a", "node-a", 3, 10)
    assert st["reward"] == {"mean": 0.5, "best": 0.7, "window": 0.4}
    assert st["startTime"] == "2026-01-01T00:00:00Z"
    assert st["observedGeneration"] == 2
    conds = {c["type"]: c for c in st["conditions"]}
    assert set(conds) == {"Admitted", "Scheduled", "Running", "Checkpointed", "Succeeded", "Failed"}
    assert conds["Running"]["status"] == "True"
    assert conds["Scheduled"]["status"] == "True"
    assert conds["Succeeded"]["status"] == "False"
    assert all(c["observedGeneration"] == 2 for c in conds.values())


def test_last_transition_time_moves_only_when_status_flips() -> None:
    first = status.experiment_status(
        {}, status.observe_runtime(running(1), "p", "n"), spec=SPEC, generation=1, now=T0
    )
    later = T0 + timedelta(minutes=5)
    second = status.experiment_status(
        first, status.observe_runtime(running(2), "p", "n"), spec=SPEC, generation=1, now=later
    )
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times["Running"] == "2026-01-01T00:00:00Z"  # still True: kept
    done = ExperimentState.model_validate(
        {"namespace": "ns", "name": "e", "phase": "Succeeded", "step": 10, "totalSteps": 10}
    )
    third = status.experiment_status(
        second, status.observe_runtime(done, "p", "n"), spec=SPEC, generation=1, now=later
    )
    times = {c["type"]: c["lastTransitionTime"] for c in third["conditions"]}
    assert times["Running"] == "2026-01-01T00:05:00Z"  # flipped to False
    assert times["Succeeded"] == "2026-01-01T00:05:00Z"
    assert third["completionTime"] == "2026-01-01T00:05:00Z"
    assert third["startTime"] == first["startTime"]


def test_no_write_when_only_timestamps_change() -> None:
    obs = status.observe_runtime(running(4), "p", "n")
    first = status.experiment_status({}, obs, spec=SPEC, generation=1, now=T0)
    again = status.experiment_status(first, obs, spec=SPEC, generation=1, now=T0 + timedelta(hours=1))
    assert status.status_patch(first, again) is None
    moved = status.experiment_status(
        first, status.observe_runtime(running(5), "p", "n"), spec=SPEC, generation=1, now=T0
    )
    assert status.status_patch(first, moved) == {"step": 5}


def test_leaving_a_pod_removes_the_pod_fields_and_keeps_the_checkpoint() -> None:
    cp = {"step": 4, "path": "/ck/ns/e/step-4", "time": "2026-01-01T00:00:00Z"}
    on_pod = status.experiment_status(
        {}, status.observe_runtime(running(5, lastCheckpoint=cp), "p", "n"), spec=SPEC, generation=1, now=T0
    )
    lost = status.Observed(phase="Queued", reason="RuntimeLost", message="gone")
    queued = status.experiment_status(on_pod, lost, spec=SPEC, generation=1, now=T0)
    patch = status.status_patch(on_pod, queued)
    assert patch is not None
    assert patch["runtimePod"] is None and patch["node"] is None  # merge patch: removed
    assert "lastCheckpoint" not in patch  # unchanged: still there for the resume
    assert queued["step"] == 5
    conds = {c["type"]: c for c in queued["conditions"]}
    assert conds["Scheduled"]["status"] == "False" and conds["Scheduled"]["reason"] == "RuntimeLost"
    assert conds["Checkpointed"]["status"] == "True"


@pytest.mark.parametrize(
    ("reason", "admitted"),
    [(REASON_RANK_TOO_HIGH, "False"), ("TrainingFailed", "True")],
)
def test_failed_for_a_bad_spec_is_not_admitted(reason: str, admitted: str) -> None:
    st = status.experiment_status(
        {}, status.Observed(phase="Failed", reason=reason, message="m"), spec=SPEC, generation=1, now=T0
    )
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Admitted"]["status"] == admitted
    assert conds["Failed"] == {**conds["Failed"], "status": "True", "reason": reason}


def test_runtime_status_counts_ready_pods_and_slots() -> None:
    pod_list = [
        {"name": "b", "node": "n2", "ready": False, "experiments": [], "slotsFree": 2},
        {"name": "a", "node": "n1", "ready": True, "experiments": ["ns/x"], "slotsFree": 1},
    ]
    st = status.runtime_status({}, pod_list, slots_per_pod=2, generation=3, now=T0)
    assert (st["readyPods"], st["totalSlots"], st["usedSlots"]) == (1, 2, 1)
    assert [p["name"] for p in st["pods"]] == ["a", "b"]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Ready"]["status"] == "True"
    assert conds["Degraded"]["status"] == "True" and conds["Degraded"]["message"] == "b"


# pods.py


def test_runtime_pod_is_pinned_owned_and_configured() -> None:
    rt = runtime(
        capacity={"maxAdapters": 4, "maxRank": 32, "tokensPerTick": 1000},
        resources={"limits": {"nvidia.com/gpu": 1}},
        tolerations=[{"key": "gpu", "operator": "Exists"}],
        checkpointVolume={"persistentVolumeClaim": {"claimName": "ck"}, "mountPath": "/ck"},
    )
    pod = pods.build_runtime_pod(rt, "node-1", image="img:1")
    assert pod["metadata"]["name"] == "pool-node-1"
    assert pod["metadata"]["ownerReferences"][0] == {
        "apiVersion": "clora.dev/v1alpha1",
        "kind": "LoRARuntime",
        "name": "pool",
        "uid": "u-1",
        "controller": True,
        "blockOwnerDeletion": False,
    }
    spec = pod["spec"]
    assert spec["securityContext"] == {"fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}}
    assert spec["containers"][0]["securityContext"]["runAsNonRoot"] is True
    term = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchFields"][0]["values"] == ["node-1"]
    c = spec["containers"][0]
    assert c["image"] == "img:1"
    args = c["args"]
    assert args[0] == "runtime"
    for flag, value in [("--max-adapters", "4"), ("--max-rank", "32"), ("--tokens-per-tick", "1000")]:
        assert args[args.index(flag) + 1] == value
    assert args[args.index("--checkpoint-dir") + 1] == "/ck"
    assert args[args.index("--dataset-roots") + 1] == "/ck"  # datasets are read from that volume only
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 1, "memory": "32Gi"}}  # the default memory limit
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": TOKEN_FILE_ENV, "value": "/var/run/secrets/clora/token"} in c["env"]
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "ck", "readOnly": False}} in spec[
        "volumes"
    ]
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    info = pods.pod_info(pod)
    assert (info.node, info.runtime, info.ready, info.ip) == ("node-1", "pool", False, None)


def test_runtime_pod_has_a_memory_backed_dev_shm_sized_from_its_capacity() -> None:
    """The container default (64 MiB) cannot hold one vLLM adapter export of a 4B model."""

    def shm(rt: LoRARuntime) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        spec = pods.build_runtime_pod(rt, "n", image="i")["spec"]
        volume = next(v for v in spec["volumes"] if v["name"] == "dshm")
        mounts = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        return volume, mounts

    volume, mounts = shm(runtime(capacity={"maxAdapters": 4, "maxRank": 32}))
    # 1 GiB for NCCL and Ray + (4 + 1) adapters x rank 32 x 4 MiB
    assert volume == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1664Mi"}}
    assert mounts == [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert shm(runtime())[0]["emptyDir"]["sizeLimit"] == "3328Mi"  # the defaults: 8 adapters, rank 64
    assert shm(runtime(shmSize="16Gi"))[0]["emptyDir"]["sizeLimit"] == "16Gi"


def test_a_pod_of_replicas_gets_its_gpus_for_ray_and_shm_for_every_replica() -> None:
    rt = runtime(
        replicas=8, capacity={"maxAdapters": 8, "maxRank": 64}, resources={"limits": {"nvidia.com/gpu": 8}}
    )
    pod = pods.build_runtime_pod(rt, "n", image="i")
    args = pod["spec"]["containers"][0]["args"]
    parser = argparse.ArgumentParser()
    from clora_runtime.server.main import add_arguments

    add_arguments(parser)
    parsed = parser.parse_args(args[1:])
    assert (parsed.replicas, parsed.devices_per_replica, parsed.ray_gpus) == (8, 1, 8)
    assert parsed.max_adapters == "8"  # per replica: 64 slots in the pod
    assert rt.spec.slots_per_pod() == 64
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
    # 1 GiB + 8 replicas x (8 + 1) adapters x rank 64 x 4 MiB + 256 MiB for Ray's object store
    assert volume["emptyDir"]["sizeLimit"] == f"{1024 + 8 * 9 * 64 * 4 + 256}Mi"
    one = pods.build_runtime_pod(runtime(), "n", image="i")["spec"]["containers"][0]["args"]
    assert one[one.index("--replicas") + 1] == "1" and "--ray-gpus" not in one


def test_runtime_settings_reach_the_runtime_engine_config() -> None:
    """The pod's args, read by the runtime's own command line, give the engine the spec's settings;
    vLLM settings left unset stay unset there (the runtime picks them for its device)."""
    from clora_runtime.server.main import _engine_config, add_arguments

    def engine_config(rt: LoRARuntime) -> Any:
        args = pods.build_runtime_pod(rt, "n", image="i")["spec"]["containers"][0]["args"]
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return _engine_config(parser.parse_args(args[1:]))

    set_ = engine_config(
        runtime(
            sampler="vllm",
            dtype="bfloat16",
            attentionImplementation="eager",
            gpuMemoryUtilization=0.6,
            maxNumSeqs=1024,
            enforceEager=False,
        )
    )
    assert (set_.sampler, set_.dtype, set_.attn_implementation) == ("vllm", "bfloat16", "eager")
    assert (set_.vllm_gpu_memory_utilization, set_.vllm_max_num_seqs, set_.vllm_enforce_eager) == (
        0.6,
        1024,
        False,
    )
    unset = engine_config(runtime())
    assert (unset.vllm_gpu_memory_utilization, unset.vllm_max_num_seqs, unset.vllm_enforce_eager) == (
        None,
        None,
        None,
    )
    assert unset.attn_implementation == "auto"


def test_pod_names_are_valid_and_stable() -> None:
    long = pods.pod_name("a" * 40, "Node_With.Odd-CHARS-" + "x" * 40)
    assert len(long) <= 63 and long == pods.pod_name("a" * 40, "Node_With.Odd-CHARS-" + "x" * 40)
    assert long.replace("-", "").isalnum() and long.islower()


def test_token_secret_is_owned_by_the_runtime() -> None:
    secret = pods.build_token_secret(runtime(), "t0k")
    assert secret["metadata"]["name"] == "pool-token"
    assert secret["stringData"] == {"token": "t0k"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def _pod(rt: LoRARuntime, node: str, *, phase: str = "Running", stale: bool = False) -> pods.PodInfo:
    body = pods.build_runtime_pod(rt, node, image="img")
    if stale:
        body["metadata"]["annotations"][ANNOTATION_POD_TEMPLATE_HASH] = "old"
    body["status"] = {"phase": phase}
    return pods.pod_info(body)


def test_plan_one_pod_per_matching_node() -> None:
    rt = runtime(nodeSelector={"gpu": "yes"})
    nodes = [("n1", {"gpu": "yes"}), ("n2", {"gpu": "yes"}), ("n3", {})]
    plan = pods.plan_pods(rt, nodes, [_pod(rt, "n1"), _pod(rt, "n3")], image="img")
    assert [p["metadata"]["name"] for p in plan.create] == ["pool-n2"]
    assert plan.delete == ["pool-n3"]


def test_plan_replaces_finished_pods_and_stale_idle_ones_only() -> None:
    rt = runtime()
    nodes = [("n1", {}), ("n2", {}), ("n3", {})]
    current = [_pod(rt, "n1", phase="Failed"), _pod(rt, "n2", stale=True), _pod(rt, "n3", stale=True)]
    plan = pods.plan_pods(rt, nodes, current, image="img", busy=frozenset({"pool-n3"}))
    assert plan.delete == ["pool-n1", "pool-n2"]
    assert plan.create == []  # successors come once the old pods are gone


# admission.py

RT_BODY = {"metadata": {"name": "pool", "namespace": "ns"}, "spec": {"baseModel": "tiny"}}


@pytest.mark.parametrize(
    ("spec", "runtime_body", "configmap", "reason", "field"),
    [
        (SPEC, None, None, REASON_UNKNOWN_RUNTIME, "spec.runtime"),
        ({**SPEC, "lora": {"rank": 128}}, RT_BODY, None, REASON_RANK_TOO_HIGH, "spec.lora.rank"),
        (
            {**SPEC, "training": {"promptsPerStep": 64, "groupSize": 16, "maxNewTokens": 1024}},
            RT_BODY,
            None,
            REASON_TOKEN_BUDGET_TOO_HIGH,
            "spec.training",
        ),
        (
            {**SPEC, "task": {"name": "gsm8k", "dataset": {"configMap": {"name": "d", "key": "k"}}}},
            RT_BODY,
            None,
            REASON_MISSING_DATASET,
            "spec.task.dataset.configMap",
        ),
        (
            {**SPEC, "task": {"name": "gsm8k", "dataset": {"configMap": {"name": "d", "key": "k"}}}},
            RT_BODY,
            {"data": {"other": ""}},
            REASON_MISSING_DATASET,
            "has no key k",
        ),
    ],
)
def test_admission_refusals_name_the_field(
    spec: dict[str, Any], runtime_body: Any, configmap: Any, reason: str, field: str
) -> None:
    problem = admission.check(spec, "ns", runtime_body, configmap)
    assert problem is not None
    assert problem[0] == reason
    assert field in problem[1]


def test_admission_accepts_a_good_spec() -> None:
    spec = {**SPEC, "task": {"name": "gsm8k", "dataset": {"configMap": {"name": "d", "key": "k"}}}}
    assert admission.check(spec, "ns", RT_BODY, {"data": {"k": "{}"}}) is None


# config.py and k8s.py


def test_config_flags_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLORA_POLL_INTERVAL", "3.5")
    monkeypatch.setenv("CLORA_STANDALONE", "true")
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    cfg = config.from_args(parser.parse_args(["--namespace", "a", "--namespace", "b", "--policy", "pack"]))
    assert cfg.poll_interval == 3.5 and cfg.standalone is True
    assert cfg.namespaces == ["a", "b"] and cfg.policy is Policy.PACK
    with pytest.raises(ValueError, match="poll_interval"):
        config.from_args(parser.parse_args(["--poll-interval", "-1"]))


def test_required_permissions_cover_what_the_operator_touches() -> None:
    perms = {(p.api_group, p.resource): set(p.verbs) for p in k8s.REQUIRED_PERMISSIONS}
    assert {"create", "delete", "watch"} <= perms[("", "pods")]
    assert "patch" not in perms[("", "pods")]  # no finalizer or annotation is ever put on a pod
    assert perms[("", "secrets")] == {"get", "create"}
    assert perms[("", "events")] == {"create"}
    assert "patch" in perms[("clora.dev", "loraexperiments/status")]
    assert "patch" in perms[("clora.dev", "loraruntimes/status")]
    assert len(perms) == len(k8s.REQUIRED_PERMISSIONS)  # one rule per resource
    assert FINALIZER == "clora.dev/cleanup"


def test_published_versions_reach_the_status_a_condition_and_one_event_each() -> None:
    from clora.api.experiment_types import PublishedRef

    spec = {**SPEC, "publish": {"vllm": {"url": "http://vllm:8000"}}}

    def seen(step: int, published: int | None, error: str = "") -> status.Observed:
        ref = None
        if published is not None:
            ref = PublishedRef(
                step=published, name="ns-x", target="http://vllm:8000", path=f"/ck/p/{published}"
            )
        s = ExperimentState(
            namespace="ns", name="x", phase="Running", step=step, published=ref, publish_error=error
        )
        return status.observe_runtime(s, "pod-a", "node-a")

    def published_condition(st: dict[str, Any]) -> dict[str, Any]:
        return next(c for c in st["conditions"] if c["type"] == "Published")

    first = status.experiment_status({}, seen(1, None), spec=spec, generation=1, now=T0)
    assert first["published"] is None and published_condition(first)["status"] == "False"
    second = status.experiment_status(first, seen(2, 2), spec=spec, generation=1, now=T0)
    assert second["published"]["step"] == 2 and published_condition(second)["reason"] == "Published"
    events = status.transition_events(first, second, seen(2, 2))
    assert [e.reason for e in events] == ["Published"] and "step 2 published as ns-x" in events[0].message
    assert status.transition_events(second, second, seen(2, 2)) == []  # a repeated poll posts nothing
    failing = status.experiment_status(second, seen(4, 2, "publishing step 4 failed: HTTP 500"), spec=spec,
                                       generation=1, now=T0)  # fmt: skip
    cond = published_condition(failing)
    assert (cond["status"], cond["reason"]) == ("False", "PublishFailed") and "serving step 2" in cond[
        "message"
    ]
    assert failing["phase"] == "Running" and failing["published"]["step"] == 2  # training goes on
    # Without spec.publish there is no Published condition at all.
    plain = status.experiment_status({}, seen(1, None), spec=SPEC, generation=1, now=T0)
    assert all(c["type"] != "Published" for c in plain["conditions"])


def test_runtime_pod_is_locked_down() -> None:
    """LOW (issue 17): read-only root with a bounded emptyDir for each place the runtime writes,
    RuntimeDefault seccomp, no service-account token, no capabilities, a memory limit by default."""
    pod = pods.build_runtime_pod(runtime(), "node-1", image="img:1")
    spec = pod["spec"]
    (c,) = spec["containers"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert {"/tmp", "/home/clora", "/var/cache/clora", "/dev/shm", "/var/lib/clora/checkpoints"} <= set(
        mounts
    )
    for volume in spec["volumes"]:
        if "emptyDir" in volume:
            assert volume["emptyDir"].get("sizeLimit"), volume
    assert c["resources"]["limits"]["memory"] == "32Gi"
    big = runtime(resources={"requests": {"memory": "64Gi"}})
    assert pods.build_runtime_pod(big, "n", image="i")["spec"]["containers"][0]["resources"]["limits"] == {
        "memory": "64Gi"
    }
    chosen = runtime(resources={"limits": {"memory": "8Gi"}})
    assert pods.build_runtime_pod(chosen, "n", image="i")["spec"]["containers"][0]["resources"]["limits"] == {
        "memory": "8Gi"
    }
    assert pods.quantity_bytes("1Gi") == 2**30 and pods.quantity_bytes("500M") == 5e8
    assert pods.quantity_bytes("lots") is None
    for obj in (pod, pods.build_runtime_pod(big, "n", image="i")):
        kubernetes_validate.validate(obj, "1.30.0", strict=True)


def test_hostile_runtimes_are_refused_unless_allowed() -> None:
    """MEDIUM 9: a hostPath or another image makes a LoRARuntime a privileged pod: refused, naming
    the field, unless the operator (the chart) allows it."""
    cfg = config.OperatorConfig(runtime_image="clora:1")
    assert admission.runtime_refusal(runtime(), cfg) is None
    assert admission.runtime_refusal(runtime(image="clora:1"), cfg) is None
    host = runtime(checkpointVolume={"hostPath": {"path": "/etc"}})
    reason, message = admission.runtime_refusal(host, cfg) or ("", "")
    assert reason == "HostPathNotAllowed" and "spec.checkpointVolume.hostPath" in message
    assert admission.runtime_refusal(host, cfg.model_copy(update={"allow_host_path": True})) is None
    evil = runtime(image="evil:latest")
    reason, message = admission.runtime_refusal(evil, cfg) or ("", "")
    assert reason == "ImageNotAllowed" and "spec.image" in message
    assert admission.runtime_refusal(evil, cfg.model_copy(update={"allowed_images": ["evil:latest"]})) is None
    assert admission.runtime_refusal(evil, cfg.model_copy(update={"allowed_images": ["*"]})) is None


def test_a_token_secret_clora_did_not_create_is_not_adopted() -> None:
    rt = runtime()
    mine = pods.build_token_secret(rt, "t")
    assert pods.owns_token_secret(rt, mine)
    planted = {"metadata": {"name": mine["metadata"]["name"]}, "stringData": {"token": "known"}}
    assert not pods.owns_token_secret(rt, planted)
    labelled = {**planted, "metadata": {**planted["metadata"], "labels": mine["metadata"]["labels"]}}
    assert not pods.owns_token_secret(rt, labelled)  # labels alone are easy to copy
    other = runtime()
    other.metadata.uid = "u-other"
    assert not pods.owns_token_secret(other, mine)


def test_configmap_datasets_are_bounded() -> None:
    """MEDIUM 10: the value travels in the PUT (datasetText): a missing key or one over 1 MiB is
    refused, naming the field (an API server caps a ConfigMap near 1 MiB; this is the operator's own)."""
    ok = {"data": {"train": "{}"}}
    assert admission.dataset_problem("d", "train", ok) is None
    assert admission.dataset_text(ok, "train") == "{}"
    reason, message = admission.dataset_problem("d", "test", ok) or ("", "")
    assert reason == "MissingDataset" and "has no key test" in message
    big = {"data": {"train": "é" * (1024 * 1024 // 2 + 1)}}  # bytes, not characters
    reason, message = admission.dataset_problem("d", "train", big) or ("", "")
    assert reason == "DatasetTooLarge" and "spec.task.dataset.configMap" in message
