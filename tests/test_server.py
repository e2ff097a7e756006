"""The runtime server as the operator drives it: a real `clora runtime` process on the tiny model.

One server serves the module (lifecycle, error answers, metrics, failure isolation); each test uses
its own namespace so what one leaves behind cannot satisfy another's assertions. The suite runs twice:
against a pod of one engine, and against a pod of two replicas (Ray actors on two fake GPUs) with the
same slots in all, which must answer every call the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from runtime_server import RuntimeServer, running_runtime_server, start_runtime_server, wait_for
from safetensors.torch import load_file, save_file

from clora.constants import TOKEN_ENV, TOKEN_FILE_ENV
from clora.metrics import EXPERIMENT_STATS, REPLICA_LABEL, RUNTIME_METRICS

MAX_ADAPTERS = 6  # the pod's, over all its replicas
MAX_RANK = 8
TOKENS_PER_TICK = 512


def spec(**training: Any) -> dict[str, Any]:
    """A small wire-format spec that steps fast on the tiny model; training fields override."""
    base = {"steps": 1000, "learningRate": 1e-3, "promptsPerStep": 2, "groupSize": 2, "maxNewTokens": 4}
    return {
        "runtime": "local",
        "task": {"name": "arithmetic", "difficulty": 1},
        "lora": {"rank": 4, "alpha": 8},
        "training": {**base, **training},
        "checkpoint": {"everySteps": 1000, "keep": 2},
    }


@pytest.fixture(
    scope="module", params=[1, pytest.param(2, marks=pytest.mark.ray)], ids=["1-replica", "2-replicas"]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RuntimeServer]:
    replicas: int = request.param
    args = ["--max-adapters", str(MAX_ADAPTERS // replicas), "--max-rank", str(MAX_RANK)]
    args += ["--tokens-per-tick", str(TOKENS_PER_TICK)]
    if replicas > 1:
        args += ["--replicas", str(replicas), "--ray-gpus", str(replicas)]
    with running_runtime_server(tmp_path_factory.mktemp("runtime"), extra_args=args) as s:
        yield s


@pytest.fixture
def api(server: RuntimeServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def state(api: httpx.Client, ns: str, name: str) -> dict[str, Any]:
    r = api.get(f"/v1/experiments/{ns}/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def listed(api: httpx.Client, ns: str) -> dict[str, dict[str, Any]]:
    r = api.get("/v1/experiments")
    assert r.status_code == 200, r.text
    return {e["name"]: e for e in r.json()["experiments"] if e["namespace"] == ns}


def step_of(api: httpx.Client, ns: str, name: str) -> int:
    return int(state(api, ns, name)["step"])


def wait_steps(api: httpx.Client, ns: str, name: str, at_least: int) -> dict[str, Any]:
    return wait_for(
        lambda: (s := state(api, ns, name))["step"] >= at_least and s, what=f"{ns}/{name} step >= {at_least}"
    )


def put(api: httpx.Client, ns: str, name: str, body_spec: dict[str, Any], **extra: Any) -> httpx.Response:
    return api.put(f"/v1/experiments/{ns}/{name}", json={"spec": body_spec, **extra})


def delete(api: httpx.Client, ns: str, name: str) -> httpx.Response:
    """DELETE, repeated while it answers 202 (Removing: the running tick holds the experiment) until
    it answers 200 with the final checkpoint."""
    r = api.delete(f"/v1/experiments/{ns}/{name}")
    while r.status_code == 202:
        assert r.json()["removed"] is False
        time.sleep(0.05)
        r = api.delete(f"/v1/experiments/{ns}/{name}")
    return r


def metrics(api: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the server's /metrics; series of several replicas
    (label `replica`) are summed into the pod's."""
    r = api.get("/metrics")
    assert r.status_code == 200, r.text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != REPLICA_LABEL))
            out[(sample.name, labels)] = out.get((sample.name, labels), 0.0) + sample.value
    return out


def replicas_of(server: RuntimeServer) -> int:
    return int(server.args[server.args.index("--replicas") + 1]) if "--replicas" in server.args else 1


def test_lifecycle(api: httpx.Client, server: RuntimeServer) -> None:
    ns = "life"
    for name in ("a", "b", "c"):
        r = put(api, ns, name, spec())
        assert r.status_code == 200, r.text
        assert r.json()["totalSteps"] == 1000
    # Spread over the replicas, each reported in GET (the least loaded first: a, c on 0 and b on 1).
    where = {name: e["replica"] for name, e in listed(api, ns).items()}
    assert where == ({"a": 0, "b": 1, "c": 0} if replicas_of(server) == 2 else {"a": 0, "b": 0, "c": 0})
    for name in ("a", "b", "c"):
        s = wait_steps(api, ns, name, 2)
        assert s["phase"] == "Running"
        assert s["reward"]["mean"] is not None and s["reward"]["window"] is not None
        assert s["startedAt"] is not None

    # Idempotent: the same spec again changes nothing (no restart, no reset).
    before = state(api, ns, "a")
    r = put(api, ns, "a", spec())
    assert r.status_code == 200
    assert r.json()["startedAt"] == before["startedAt"] and r.json()["step"] >= before["step"]

    # A mutable change applies at the next tick: b keeps stepping with the new learning rate.
    r = put(api, ns, "b", spec(learningRate=2.5e-4))
    assert r.status_code == 200, r.text
    changed_at = step_of(api, ns, "b")
    wait_steps(api, ns, "b", changed_at + 2)

    # DELETE answers the checkpoint it wrote; the experiment is gone.
    r = delete(api, ns, "a")
    assert r.status_code == 200, r.text
    checkpoint = r.json()["checkpoint"]
    assert checkpoint["step"] >= 2
    assert (Path(checkpoint["path"]) / "adapter_model.safetensors").is_file()
    assert api.get(f"/v1/experiments/{ns}/a").status_code == 404
    assert "a" not in listed(api, ns)

    # The learning-rate change reached the optimizer: b's checkpoint has the new lr.
    r = delete(api, ns, "b")
    assert r.status_code == 200, r.text
    optimizer = torch.load(Path(r.json()["checkpoint"]["path"]) / "optimizer.pt", weights_only=True)
    assert {g["lr"] for g in optimizer["param_groups"]} == {2.5e-4}

    # Re-added with that checkpoint, a resumes at the step it left: the PUT's answer already says so
    # (never step 0 until a tick), and so does a resume parked as suspended. Another experiment
    # cannot resume from it (issue 17, item 6).
    parked = {**spec(), "suspend": True}
    r = put(api, ns, "parked", parked, resumeFrom=checkpoint["path"])
    assert r.status_code == 422 and "resumeFrom" in r.json()["detail"], r.text
    r = put(api, ns, "a", parked, resumeFrom=checkpoint["path"])
    assert r.status_code == 200, r.text
    assert (r.json()["phase"], r.json()["step"]) == ("Suspended", checkpoint["step"])
    assert r.json()["lastCheckpoint"]["path"] == checkpoint["path"]
    assert delete(api, ns, "a").json()["checkpoint"]["path"] == checkpoint["path"]
    r = put(api, ns, "a", spec(), resumeFrom=checkpoint["path"])
    assert r.status_code == 200, r.text
    assert r.json()["step"] == checkpoint["step"]
    assert r.json()["lastCheckpoint"]["step"] == checkpoint["step"]
    resumed = wait_for(lambda: (s := state(api, ns, "a"))["phase"] != "Pending" and s, what="a admitted")
    assert resumed["step"] >= checkpoint["step"]
    assert resumed["reward"]["mean"] is not None  # its reward history came back too
    wait_steps(api, ns, "a", checkpoint["step"] + 1)
    for name in ("a", "c"):
        assert delete(api, ns, name).status_code == 200


def test_auth(server: RuntimeServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for path in ("/healthz", "/readyz"):
            assert anonymous.get(path).status_code == 200
        for method, path in [
            ("GET", "/v1/experiments"),
            ("GET", "/v1/experiments/ns/x"),
            ("PUT", "/v1/experiments/ns/x"),
            ("DELETE", "/v1/experiments/ns/x"),
            ("POST", "/v1/experiments/ns/x/samples"),
            ("GET", "/metrics"),
            ("GET", "/openapi.json"),
        ]:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {server.token}"},
            ):
                r = anonymous.request(method, path, headers=headers, json={"spec": spec()})
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                assert r.json()["detail"]
        # The token's scheme is case-insensitive (RFC 6750).
        assert anonymous.get(
            "/v1/experiments", headers={"Authorization": f"bearer {server.token}"}
        ).is_success


def test_not_found(api: httpx.Client) -> None:
    for method, path in [
        ("GET", "/v1/experiments/nf/missing"),
        ("DELETE", "/v1/experiments/nf/missing"),
    ]:
        r = api.request(method, path)
        assert r.status_code == 404 and "nf/missing" in r.json()["detail"]
    r = api.post("/v1/experiments/nf/missing/samples", json={"samples": [{"prompt": "1+1?", "answer": "2"}]})
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"spec": spec(groupSize=1)}, "spec.training.groupSize: must be >= 2"),
        ({"spec": spec(learningRate=0)}, "spec.training.learningRate: must be > 0"),
        ({"spec": {**spec(), "colour": "red"}}, "spec.colour: unknown field"),
        ({"spec": {**spec(), "task": {"name": "chess"}}}, "spec.task.name: must be one of"),
        ({"spec": {**spec(), "task": {"name": "gsm8k"}}}, "dataset is required for task gsm8k"),
        (
            {"spec": {**spec(), "task": {"name": "gsm8k", "dataset": {"path": "/no/such/file.jsonl"}}}},
            "spec.task.dataset.path",
        ),
        (
            {"spec": {**spec(), "lora": {"rank": 4, "targetModules": ["nope_proj"]}}},
            "spec.lora.targetModules",
        ),
        (
            {"spec": {**spec(), "task": {"name": "gsm8k", "dataset": {"path": "/etc/hostname"}}}},
            "spec.task.dataset.path: /etc/hostname is outside this runtime's dataset roots",
        ),
        (
            {
                "spec": {
                    **spec(),
                    "task": {"name": "gsm8k", "dataset": {"configMap": {"name": "d", "key": "k"}}},
                }
            },
            "spec.task.dataset.configMap: the PUT carries no datasetText",
        ),
        ({}, "spec: required"),
        ({"spec": spec(), "resumeFrom": 3}, "resumeFrom"),
        ({"spec": spec(), "resumeFrom": "/no/such/checkpoint"}, "resumeFrom"),
    ],
)
def test_put_422_names_the_field(api: httpx.Client, body: dict[str, Any], detail: str) -> None:
    r = api.put("/v1/experiments/bad/x", json=body)
    assert r.status_code == 422, r.text
    assert detail in r.json()["detail"]
    assert api.get("/v1/experiments/bad/x").status_code == 404  # nothing was added


def test_other_422(api: httpx.Client) -> None:
    r = api.put("/v1/experiments/bad/x", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "invalid JSON" in r.json()["detail"]
    r = api.put("/v1/experiments/bad/Upper_Case", json={"spec": spec()})
    assert r.status_code == 422 and r.json()["detail"].startswith("name: must match")
    assert put(api, "bad", "s", spec()).status_code == 200
    r = api.post("/v1/experiments/bad/s/samples", json={"samples": []})
    assert r.status_code == 422 and r.json()["detail"] == "samples: must have at least 1 items"
    r = api.post("/v1/experiments/bad/s/samples", json={"samples": [{"prompt": ""}]})
    assert r.status_code == 422 and r.json()["detail"].startswith("samples[0].prompt:")
    assert delete(api, "bad", "s").status_code == 200


def test_pushed_samples_and_prompts_are_bounded(api: httpx.Client) -> None:
    """Issue 17: over-long or too many samples, and an over-long system prompt, answer 422 naming the
    field; nothing is queued or added."""
    # The documented defaults (clora/api/runtime_api.py), spelled out so the test reads the contract.
    prompt_chars, metadata_bytes, per_push = 16384, 16384, 1024
    ns = "bounds"
    assert put(api, ns, "q", {**spec(), "suspend": True}).status_code == 200  # suspended: keeps its queue
    url = f"/v1/experiments/{ns}/q/samples"
    refused = {
        "samples[0].prompt: ": [{"prompt": "x" * (prompt_chars + 1)}],
        "samples[0].answer: ": [{"prompt": "1 + 1?", "answer": "2" * 5000}],
        "samples[1].metadata: ": [
            {"prompt": "a"},
            {"prompt": "b", "metadata": {"k": "v" * metadata_bytes}},
        ],
        "samples: ": [{"prompt": "1 + 1?"}] * (per_push + 1),
    }
    for detail, samples in refused.items():
        r = api.post(url, json={"samples": samples})
        assert r.status_code == 422 and r.json()["detail"].startswith(detail), r.text
    # The waiting queue is bounded too (maxQueuedSamples, 4096 by default).
    for _ in range(4):
        assert api.post(url, json={"samples": [{"prompt": "1 + 1?"}] * per_push}).status_code == 200
    r = api.post(url, json={"samples": [{"prompt": "1 + 1?"}]})
    assert r.status_code == 422 and "maxQueuedSamples 4096" in r.json()["detail"], r.text
    assert r.json()["detail"].startswith("samples: ")
    assert delete(api, ns, "q").status_code == 200

    # About 5000 tokens of system prompt, within any character bound, above maxPromptTokens 4096.
    r = put(api, ns, "long", {**spec(), "task": {"name": "arithmetic", "systemPrompt": "hi " * 5000}})
    assert r.status_code == 422 and r.json()["detail"].startswith("spec.task.systemPrompt: "), r.text
    assert api.get(f"/v1/experiments/{ns}/long").status_code == 404


def test_conflicts(api: httpx.Client) -> None:
    ns = "conflict"
    r = put(api, ns, "big", {**spec(), "lora": {"rank": MAX_RANK * 2, "alpha": 8}})
    assert r.status_code == 409 and "maxRank" in r.json()["detail"]
    r = put(api, ns, "hungry", spec(promptsPerStep=64, groupSize=8, maxNewTokens=64))
    assert r.status_code == 409 and "tokensPerTick" in r.json()["detail"]

    assert put(api, ns, "x", spec()).status_code == 200
    r = put(api, ns, "x", {**spec(), "lora": {"rank": 8, "alpha": 8}})
    assert r.status_code == 409 and "lora is immutable" in r.json()["detail"]
    r = put(api, ns, "x", {**spec(), "runtime": "other"})
    assert r.status_code == 409 and "runtime is immutable" in r.json()["detail"]

    fillers = []
    free = int(metrics(api)[("clora_free_slots", ())])
    for i in range(free):
        fillers.append(f"fill-{i}")
        assert put(api, ns, fillers[-1], spec()).status_code == 200
    r = put(api, ns, "one-too-many", spec())
    assert r.status_code == 409 and "slots" in r.json()["detail"]
    for name in ["x", *fillers]:
        assert delete(api, ns, name).status_code == 200
    assert put(api, ns, "one-too-many", spec()).status_code == 200  # room again
    assert delete(api, ns, "one-too-many").status_code == 200


def test_metrics(api: httpx.Client) -> None:
    ns = "metrics"
    assert put(api, ns, "m1", spec()).status_code == 200
    assert put(api, ns, "m2", spec(klCoef=0.05)).status_code == 200  # kl is reported with klCoef > 0
    wait_steps(api, ns, "m1", 2)
    wait_steps(api, ns, "m2", 2)
    m = metrics(api)
    names = {name for name, _labels in m}
    for metric in RUNTIME_METRICS:
        assert any(n == metric or n.startswith(metric + "_") for n in names), metric

    labels = lambda name: (("name", name), ("namespace", ns))  # noqa: E731
    for name in ("m1", "m2"):
        assert 2 <= m[("clora_experiment_step", labels(name))] <= step_of(api, ns, name)
        assert 0.0 <= m[("clora_experiment_reward", labels(name))] <= 1.0
    held = len(listed(api, ns)) + sum(
        1 for e in api.get("/v1/experiments").json()["experiments"] if e["namespace"] != ns
    )
    assert m[("clora_free_slots", ())] == MAX_ADAPTERS - held
    assert m[("clora_active_adapters", ())] == held
    assert m[("clora_tokens_sampled_total", ())] > 0
    assert m[("clora_tokens_trained_total", ())] > 0
    # The RL statistics: in GET's `stats` and as clora_experiment_* gauges (RL-core issue, item 10).
    for name in ("m1", "m2"):
        stats = state(api, ns, name)["stats"]
        assert set(stats) == set(EXPERIMENT_STATS)
        assert stats["completionLength"] > 0 and stats["gradNorm"] >= 0 and stats["entropy"] > 0
        assert 0 <= stats["fracRewardZeroStd"] <= 1 and stats["clipFraction"] == 0  # one update: ratio 1
        for key, (gauge, _) in EXPERIMENT_STATS.items():
            assert (m.get((gauge, labels(name))) is not None) == (stats[key] is not None), (name, key)
    assert state(api, ns, "m1")["stats"]["kl"] is None and state(api, ns, "m2")["stats"]["kl"] >= 0

    # Rollouts of the kept steps (RL-core issue, item 9), in the OpenAPI document too.
    r = api.get(f"/v1/experiments/{ns}/m1/rollouts")
    assert r.status_code == 200, r.text
    kept = r.json()
    newest = kept["steps"][-1]
    assert len(kept["rollouts"]) == 2 * 2 and {x["step"] for x in kept["rollouts"]} == {newest}
    for x in kept["rollouts"]:
        assert x["name"] == "m1" and x["tokens"] > 0 and abs(x["samplerLogprob"] - x["trainerLogprob"]) < 1e-4
    assert api.get(f"/v1/experiments/{ns}/m1/rollouts", params={"step": kept["steps"][0]}).status_code == 200
    assert api.get(f"/v1/experiments/{ns}/m1/rollouts", params={"step": 10**6}).status_code == 404
    assert api.get(f"/v1/experiments/{ns}/m1/rollouts", params={"step": -1}).status_code == 422
    assert "/v1/experiments/{namespace}/{name}/rollouts" in api.get("/openapi.json").json()["paths"]
    for phase in ("sample", "reward", "train", "sync"):
        assert m[("clora_tick_duration_seconds_count", (("phase", phase),))] >= 2
        assert m[("clora_tick_duration_seconds_sum", (("phase", phase),))] >= 0

    r = delete(api, ns, "m1")
    assert r.status_code == 200
    m = metrics(api)
    assert ("clora_experiment_step", labels("m1")) not in m
    assert ("clora_experiment_reward", labels("m1")) not in m
    assert not any(labels("m1") == key[1] for key in m)  # every per-experiment series went with it
    assert ("clora_experiment_step", labels("m2")) in m
    assert m[("clora_checkpoint_duration_seconds_count", ())] >= 1
    assert m[("clora_free_slots", ())] == MAX_ADAPTERS - held + 1
    assert delete(api, ns, "m2").status_code == 200


def test_failures_stay_alone(api: httpx.Client, tmp_path: Path) -> None:
    ns = "fail"
    assert put(api, ns, "neighbour", spec()).status_code == 200
    wait_steps(api, ns, "neighbour", 1)

    # A broken dataset is refused when it is read, at the PUT, naming its line.
    dataset = tmp_path / "gsm8k.jsonl"
    dataset.write_text('{"question": "What is 2 + 3?"}\n')  # no answer
    gsm8k = {**spec(), "task": {"name": "gsm8k", "dataset": {"path": str(dataset)}}}
    r = put(api, ns, "bad-task", gsm8k)
    assert r.status_code == 422 and "spec.task.dataset.path" in r.text and "gsm8k.jsonl:1" in r.text, r.text

    # A non-finite loss: resumed from a checkpoint whose adapter weights are NaN.
    assert put(api, ns, "donor", spec()).status_code == 200
    wait_steps(api, ns, "donor", 1)
    donor = Path(delete(api, ns, "donor").json()["checkpoint"]["path"])
    poisoned = donor.parent.parent / "nan-loss" / donor.name  # its own folder: resumeFrom lies there
    shutil.copytree(donor, poisoned)
    weights = load_file(poisoned / "adapter_model.safetensors")
    save_file(
        {k: torch.full_like(v, float("nan")) for k, v in weights.items()},
        poisoned / "adapter_model.safetensors",
    )
    assert put(api, ns, "nan-loss", spec(), resumeFrom=str(poisoned)).status_code == 200

    nan_loss = wait_for(
        lambda: (s := state(api, ns, "nan-loss"))["phase"] == "Failed" and s, what="loss failure"
    )
    assert "non-finite" in nan_loss["message"]

    # The neighbour was not disturbed: it keeps stepping after both failures.
    after = step_of(api, ns, "neighbour")
    wait_steps(api, ns, "neighbour", after + 2)
    assert state(api, ns, "neighbour")["phase"] == "Running"
    assert httpx.get(f"{api.base_url}/readyz").status_code == 200
    for name in ("neighbour", "nan-loss"):
        assert delete(api, ns, name).status_code == 200


def test_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, TOKEN_FILE_ENV)}
    cmd = [sys.executable, "-m", "clora.cli", "runtime", "--model", "tiny", "--checkpoint-dir", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert TOKEN_ENV in done.stderr and "--insecure-no-auth" in done.stderr


def test_a_dead_engine_is_neither_ready_nor_healthy(tmp_path: Path) -> None:
    # The token comes from a file here (a mounted Secret); the base model cannot be loaded.
    server = start_runtime_server(
        tmp_path / "runs",
        model=str(tmp_path / "no-such-model"),
        token_file=tmp_path / "token",
        wait_ready=False,
    )
    try:

        def dead() -> httpx.Response | None:
            try:
                r = httpx.get(f"{server.url}/healthz")
            except httpx.ConnectError:  # not listening yet
                return None
            return r if r.status_code == 503 else None

        health = wait_for(dead, what="/healthz to answer 503")
        assert health.json()["status"] == "dead"
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 503 and "loading the base model failed" in ready.json()["detail"]
        with server.client() as api:
            assert api.get("/v1/experiments").status_code == 503
            assert api.put("/v1/experiments/ns/x", json={"spec": spec()}).status_code == 503
        assert httpx.get(f"{server.url}/v1/experiments").status_code == 401
        assert server.terminate(timeout=60) == 0
    finally:
        server.kill()


def test_sigterm_checkpoints_and_exits_0(tmp_path: Path) -> None:
    with running_runtime_server(tmp_path / "runs", extra_args=["--grace-period", "60"]) as server:
        with server.client() as api:
            assert put(api, "term", "t", spec()).status_code == 200
            stepped = wait_steps(api, "term", "t", 2)["step"]
            assert state(api, "term", "t")["lastCheckpoint"] is None  # everySteps is 1000
        assert server.terminate(timeout=90) == 0
    written = sorted((tmp_path / "runs" / "term" / "t").glob("step-*"))
    assert written, "SIGTERM wrote no checkpoint"
    meta = json.loads((written[-1] / "state.json").read_text())
    assert meta["step"] >= stepped


def test_continual_trains_on_pushed_samples_and_its_queue_survives_a_restart(tmp_path: Path) -> None:
    ns, runs = "cont", tmp_path / "runs"
    continual = spec(steps=None)
    del continual["training"]["steps"]
    samples = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(6)]

    with running_runtime_server(runs) as server, server.client() as api:
        assert put(api, ns, "clock", spec()).status_code == 200
        assert put(api, ns, "learner", continual).status_code == 200
        # The clock experiment steps every tick; the learner has no prompts, so it must not.
        start = wait_steps(api, ns, "clock", 1)["step"]
        wait_steps(api, ns, "clock", start + 3)
        learner = state(api, ns, "learner")
        assert learner["step"] == 0 and learner["totalSteps"] is None

        r = api.post(f"/v1/experiments/{ns}/learner/samples", json={"samples": samples[:2]})
        assert r.status_code == 200 and r.json() == {"accepted": 2, "queued": 2}
        wait_steps(api, ns, "learner", 1)  # promptsPerStep is 2: one step, then it waits again
        clock = step_of(api, ns, "clock")
        wait_steps(api, ns, "clock", clock + 3)
        assert step_of(api, ns, "learner") == 1

        # Suspend it (checkpoint, out of its slot), queue 4 more prompts, and stop the server.
        assert put(api, ns, "learner", {**continual, "suspend": True}).status_code == 200
        wait_for(lambda: state(api, ns, "learner")["phase"] == "Suspended", what="suspended")
        r = api.post(f"/v1/experiments/{ns}/learner/samples", json={"samples": samples[2:]})
        assert r.status_code == 200 and r.json()["queued"] == 4
        checkpoint = state(api, ns, "learner")["lastCheckpoint"]
        assert checkpoint["step"] == 1
        assert server.terminate(timeout=90) == 0

    with running_runtime_server(runs) as server, server.client() as api:
        assert put(api, ns, "clock", spec()).status_code == 200
        assert put(api, ns, "learner", continual, resumeFrom=checkpoint["path"]).status_code == 200
        # The 4 queued prompts make two more steps, then it waits.
        wait_steps(api, ns, "learner", 3)
        clock = wait_steps(api, ns, "clock", 1)["step"]
        wait_steps(api, ns, "clock", clock + 3)
        assert step_of(api, ns, "learner") == 3
