"""Runtime pods of several replicas (issue 15): real `clora runtime --replicas 2` processes, each with
a Ray instance of its own and two fake GPUs (`--ray-gpus 2`: Ray gives each replica its own device id;
the engines run on the CPU). The API suite against a 2-replica pod is tests/test_server.py's second
parametrization; here: placement and training, isolation across replicas, losing a replica, and a
1-replica pod that never imports ray.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from runtime_server import RuntimeServer, running_runtime_server, wait_for
from safetensors.torch import load_file

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

TWO_REPLICAS = ["--replicas", "2", "--ray-gpus", "2", "--max-adapters", "2"]


def spec(**training: Any) -> dict[str, Any]:
    base = {"steps": 3, "learningRate": 2e-3, "promptsPerStep": 2, "groupSize": 4, "maxNewTokens": 12}
    return {
        "runtime": "local",
        # smollm2 gets some of these right and some wrong: rewards spread, so adapters learn.
        "task": {"name": "arithmetic", "difficulty": 1, "reward": "numeric"},
        "lora": {"rank": 4, "alpha": 8},
        "training": {**base, "temperature": 1.0, **training},
        "checkpoint": {"everySteps": 1000, "keep": 2},
    }


def listed(api: httpx.Client) -> dict[str, dict[str, Any]]:
    r = api.get("/v1/experiments")
    assert r.status_code == 200, r.text
    return {e["name"]: e for e in r.json()["experiments"]}


def put(api: httpx.Client, name: str, body: dict[str, Any]) -> dict[str, Any]:
    r = api.put(f"/v1/experiments/ns/{name}", json={"spec": body})
    assert r.status_code == 200, r.text
    return r.json()


def finish(api: httpx.Client, names: list[str], timeout: float = 300) -> dict[str, dict[str, Any]]:
    done = wait_for(
        lambda: (e := listed(api)) and all(e[n]["phase"] in ("Succeeded", "Failed") for n in names) and e,
        timeout=timeout,
        what=f"{names} finished",
    )
    for name in names:
        assert done[name]["phase"] == "Succeeded", done[name]
    return done


def weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return load_file(Path(state["lastCheckpoint"]["path"]) / "adapter_model.safetensors")


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    diff = sum((a[k].double() - b[k].double()).pow(2).sum() for k in b)
    return float(torch.sqrt(diff) / torch.sqrt(sum(v.double().pow(2).sum() for v in b.values())))


def test_two_replicas_train_two_each_and_one_learns_what_it_learns_alone(tmp_path: Path) -> None:
    x = spec(seed=7)
    neighbours = {
        "n1": spec(seed=1, learningRate=5e-3),
        "n2": {**spec(seed=2, maxNewTokens=8), "lora": {"rank": 8, "alpha": 8}},
        "n3": spec(seed=3, groupSize=2, promptsPerStep=3),
    }
    pod = running_runtime_server(tmp_path / "pod", model="smollm2", extra_args=TWO_REPLICAS)
    with pod as server, server.client() as api:
        # Least loaded first: n1 -> 0, x -> 1, then n2 -> 0 (a tie: lowest index), n3 -> 1.
        for name in ("n1", "x", "n2", "n3"):
            put(api, name, neighbours.get(name, x))
        where = {name: e["replica"] for name, e in listed(api).items()}
        assert where == {"n1": 0, "x": 1, "n2": 0, "n3": 1}
        packed = finish(api, ["n1", "x", "n2", "n3"])
        assert all(e["step"] == 3 and e["reward"]["mean"] is not None for e in packed.values())
        assert {e["replica"] for e in packed.values()} == {0, 1}
    with running_runtime_server(tmp_path / "alone", model="smollm2") as single, single.client() as api:
        put(api, "x", x)
        alone = finish(api, ["x"])["x"]
        put(api, "x-reseeded", spec(seed=8))
        reseeded = finish(api, ["x-reseeded"])["x-reseeded"]
    assert alone["replica"] == 0
    assert packed["x"]["stats"]["fracRewardZeroStd"] < 1  # it had something to learn from
    difference = relative_difference(weights(packed["x"]), weights(alone))
    seed_change = relative_difference(weights(reseeded), weights(alone))
    print(f"\nreplica 2 of 2 vs alone: {difference:.2e}; another seed: {seed_change:.2e}")
    assert difference <= 1e-3
    assert difference * 100 <= seed_change


def replica_pid(server: RuntimeServer, replica: int) -> int:
    found = re.findall(rf"replica {replica} of \d+ running in pid (\d+)", server.log())
    assert found, server.log()[-2000:]
    return int(found[-1])


def test_a_killed_replica_resumes_from_checkpoints_while_the_other_keeps_ticking(tmp_path: Path) -> None:
    long = {**spec(steps=400, maxNewTokens=4, groupSize=2), "checkpoint": {"everySteps": 5, "keep": 2}}
    with running_runtime_server(tmp_path / "pod", extra_args=TWO_REPLICAS) as pod, pod.client() as api:
        for name in ("a", "b", "c", "d"):
            put(api, name, long)
        on = {r: sorted(n for n, e in listed(api).items() if e["replica"] == r) for r in (0, 1)}
        assert on == {0: ["a", "c"], 1: ["b", "d"]}
        wait_for(
            lambda: all(e["step"] >= 12 for e in listed(api).values()), what="every experiment at step 12"
        )
        victim = replica_pid(pod, 1)
        before = listed(api)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        # While replica 1 is down (/readyz 503), replica 0's experiments keep stepping.
        wait_for(lambda: httpx.get(f"{pod.url}/readyz").status_code == 503, what="/readyz 503", interval=0.05)
        during = listed(api)
        assert "restarting" in during["b"]["message"] and during["b"]["phase"] == "Running"
        advanced = wait_for(
            lambda: (
                all(listed(api)[n]["step"] > during[n]["step"] for n in on[0])
                and httpx.get(f"{pod.url}/readyz").status_code == 503
            ),
            timeout=60,
            interval=0.05,
            what="replica 0 stepping while replica 1 is down",
        )
        assert advanced
        wait_for(lambda: httpx.get(f"{pod.url}/readyz").status_code == 200, what="all replicas ready again")
        resumed = listed(api)
        back_after = time.monotonic() - killed_at
        assert replica_pid(pod, 1) != victim
        for name in on[1]:
            # Back from its newest checkpoint (steps since it are redone), never from step 0.
            assert resumed[name]["step"] >= before[name]["lastCheckpoint"]["step"], (name, resumed[name])
        for name in on[0]:
            assert resumed[name]["step"] > before[name]["step"]
        done = finish(api, ["a", "b", "c", "d"])
        assert all(e["step"] == 400 for e in done.values())
        assert "resumed" in pod.log()
        print(f"\nkill -9 of replica 1 to its experiments resumed: {back_after:.1f} s")


def test_sigterm_checkpoints_every_replica_and_exits_0(tmp_path: Path) -> None:
    long = {**spec(steps=10**6, maxNewTokens=4, groupSize=2)}
    args = [*TWO_REPLICAS, "--grace-period", "60"]
    with running_runtime_server(tmp_path / "runs", extra_args=args) as pod:
        with pod.client() as api:
            for name in ("a", "b", "c"):
                put(api, name, long)
            stepped = wait_for(
                lambda: (e := listed(api)) and all(x["step"] >= 2 for x in e.values()) and e,
                what="every experiment at step 2",
            )
            assert {e["replica"] for e in stepped.values()} == {0, 1}
            assert all(e["lastCheckpoint"] is None for e in stepped.values())  # everySteps is 1000
        assert pod.terminate(timeout=90) == 0
    for name, at in stepped.items():
        written = sorted((tmp_path / "runs" / "ns" / name).glob("step-*"))
        assert written, f"SIGTERM wrote no checkpoint of {name} (replica {at['replica']})"
        assert json.loads((written[-1] / "state.json").read_text())["step"] >= at["step"]
    assert "every experiment checkpointed" in pod.log()


def test_one_replica_never_imports_ray(tmp_path: Path) -> None:
    code = f"""
import sys, time
from clora_runtime.config import EngineConfig
from clora_runtime.server.main import Runtime
config = EngineConfig(model="tiny", device="cpu", checkpoint_dir={str(tmp_path)!r})
runtime = Runtime(config, token=None, host="127.0.0.1", port=0)
runtime.loop.start()
while not runtime.loop.ready:
    time.sleep(0.05)
print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"')) == []


def test_devices_per_replica_above_one_is_refused(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "clora.cli", "runtime", "--insecure-no-auth", "--devices-per-replica", "2"]
    done = subprocess.run(
        [*cmd, "--checkpoint-dir", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and "tensor parallel" in done.stderr and "docs/multi-gpu.md" in done.stderr


def test_bench_replicas_measures_both_pods_and_a_recovery() -> None:
    """The benchmark's plumbing on a short run (its figures come from scripts/bench.sh, not from here)."""
    from clora_runtime.bench.replicas import replicas_bench

    r = replicas_bench(experiments=2, threads=1, windows=2, window_s=1.0, kills=1)
    one, two = r["arms"]["1 replica"], r["arms"]["2 replicas"]
    assert one["rayInitSeconds"] is None and two["rayInitSeconds"] > 0
    assert one["stepsPerSecond"] > 0 and two["stepsPerSecond"] > 0 and r["twoOverOne"] > 0
    assert one["memoryMB"]["engines"] == 0 and two["memoryMB"]["engines"] > 0  # two engine processes
    recovery = two["recovery"]
    assert 0 < recovery["killToReadySeconds"] <= recovery["killToSteppingSeconds"]
