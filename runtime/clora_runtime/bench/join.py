"""`clora bench join`: how soon a new experiment trains on a warm runtime, against a cold start.

Both are timed against a real `clora runtime` server process, through its HTTP API, as the operator
drives it. Cold: start the server process, wait for /readyz, PUT, until the first step is done (what a
one-experiment job pays every time). Warm: the server already trains `busy` experiments together; a
new one is PUT at a random moment of their tick (several times, one after another) and timed until it
is admitted (the PUT's answer: slot allocated, phase Running) and until its first step is done (it is
packed into the next tick). Then, at another random moment of a tick, it is DELETEd while it trains:
timed until DELETE answers (200, or 202 while the running tick holds it) and until its final
checkpoint is known (a repeated DELETE answers 200 with it).
"""

from __future__ import annotations

import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from clora.api import LoRAExperimentSpec
from clora.constants import TOKEN_ENV
from clora_runtime.bench.processes import free_port
from clora_runtime.bench.throughput import machine

POLL_S = 0.05  # a faster poll would steal the GIL from the tick it measures


@contextmanager
def runtime_server(
    model: str, device: str, max_adapters: int, max_rank: int, threads: int | None = None
) -> Iterator[tuple[httpx.Client, float]]:
    """A `clora runtime` process on a free loopback port; yields (client, spawn time)."""
    port, token = free_port(), secrets.token_hex(16)
    with (
        tempfile.TemporaryDirectory(prefix="clora-join-") as ckpt,
        open(Path(ckpt) / "server.log", "w+") as log,
    ):
        env = {**os.environ, TOKEN_ENV: token}
        spawned = time.time()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clora.cli",
                "runtime",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model",
                model,
                "--device",
                device,
                "--max-adapters",
                str(max_adapters),
                "--max-rank",
                str(max_rank),
                "--checkpoint-dir",
                ckpt,
                "--log-level",
                "warning",
                *(["--threads", str(threads)] if threads else []),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        try:
            yield client, spawned
        except Exception as err:
            log.seek(0)
            tail = "\n".join(log.read().strip().splitlines()[-10:])
            raise RuntimeError(f"{err}; runtime server log:\n{tail}") from err
        finally:
            client.close()
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_ready(client: httpx.Client, deadline_s: float = 600) -> float:
    end = time.time() + deadline_s
    while time.time() < end:
        try:
            if client.get("/readyz").status_code == 200:
                return time.time()
        except httpx.TransportError:
            pass
        time.sleep(POLL_S)
    raise TimeoutError("runtime did not become ready")


def _put(client: httpx.Client, name: str, spec: LoRAExperimentSpec) -> tuple[float, float]:
    """(sent, admitted): admitted is when the answer said Running, else when GET first says so."""
    at = time.time()
    r = client.put(f"/v1/experiments/bench/{name}", json={"spec": spec.wire(), "resumeFrom": None})
    r.raise_for_status()
    if r.json()["phase"] == "Running":
        return at, time.time()
    return at, _until(client, name, lambda s: s["phase"] == "Running")


def _until(client: httpx.Client, name: str, pred: Any, deadline_s: float = 600) -> float:
    end = time.time() + deadline_s
    while time.time() < end:
        state = client.get(f"/v1/experiments/bench/{name}").json()
        if state["phase"] == "Failed":
            raise RuntimeError(f"{name} failed: {state['message']}")
        if pred(state):
            return time.time()
        time.sleep(POLL_S)
    raise TimeoutError(f"{name} did not get there in time")


def _delete(client: httpx.Client, name: str) -> tuple[float, float]:
    """(seconds until DELETE answered, seconds until the final checkpoint was known)."""
    at = time.time()
    r = client.delete(f"/v1/experiments/bench/{name}", timeout=600)
    r.raise_for_status()
    answered = time.time()
    while r.status_code == 202:  # Removing: the running tick holds it; ask again
        time.sleep(POLL_S)
        r = client.delete(f"/v1/experiments/bench/{name}", timeout=600)
        r.raise_for_status()
    return answered - at, time.time() - at


def join(
    specs: list[LoRAExperimentSpec],
    model: str,
    device: str,
    threads: int | None,
    joins: int,
    seed: int = 0,
) -> dict[str, Any]:
    """specs[0] is the newcomer; specs[1:] keep the warm runtime busy meanwhile."""
    first = specs[0].model_copy(deep=True)
    first.training.steps = 1
    newcomer = specs[0].model_copy(deep=True)
    newcomer.training.steps = 10_000  # trains on until it is deleted
    busy = [s.model_copy(deep=True) for s in specs[1:]]
    for s in busy:
        s.training.steps = 10_000  # trains until the bench ends
    rank = max(s.lora.rank for s in specs)
    rng = random.Random(seed)
    with runtime_server(model, device, len(busy) + 1, rank, threads) as (client, spawned):
        ready = _wait_ready(client)
        put, _ = _put(client, "cold", first)
        cold_step = _until(client, "cold", lambda s: s["step"] >= 1)
        _delete(client, "cold")
        for i, spec in enumerate(busy):
            _put(client, f"busy-{i}", spec)
        if busy:  # one tick to start them all, then time a steady tick
            _until(client, "busy-0", lambda s: s["step"] >= 1)
            step = client.get("/v1/experiments/bench/busy-0").json()["step"]
            t0 = _until(client, "busy-0", lambda s: s["step"] >= step + 1)
            tick = _until(client, "busy-0", lambda s: s["step"] >= step + 2) - t0
        else:
            tick = cold_step - put
        timings = []
        for j in range(joins):
            delay = rng.uniform(0, tick)  # arrive anywhere in a tick: sampling or training
            time.sleep(delay)
            name = f"warm-{j}"
            at, admitted = _put(client, name, newcomer)
            stepped = _until(client, name, lambda s: s["step"] >= 1)
            time.sleep(rng.uniform(0, tick))  # delete it anywhere in a tick it trains in
            answered, checkpointed = _delete(client, name)
            timings.append(
                {
                    "delaySeconds": delay,
                    "putToAdmittedSeconds": admitted - at,
                    "putToFirstStepSeconds": stepped - at,
                    "deleteAnswerSeconds": answered,
                    "deleteToFinalCheckpointSeconds": checkpointed,
                }
            )
    admitted_s = [t["putToAdmittedSeconds"] for t in timings]
    stepped_s = [t["putToFirstStepSeconds"] for t in timings]
    deleted_s = [t["deleteAnswerSeconds"] for t in timings]
    return {
        "model": model,
        "machine": machine(),
        "busyExperiments": len(busy),
        "busyTickSeconds": tick,
        "coldStartToReadySeconds": ready - spawned,
        "coldStartToFirstStepSeconds": cold_step - spawned,
        "coldFirstStepAfterPutSeconds": cold_step - put,
        "joins": timings,
        "warmPutToAdmittedSeconds": statistics.median(admitted_s),
        "warmPutToAdmittedMaxSeconds": max(admitted_s),
        "warmPutToFirstStepSeconds": statistics.median(stepped_s),
        "warmPutToFirstStepMaxSeconds": max(stepped_s),
        "deleteAnswerSeconds": statistics.median(deleted_s),
        "deleteAnswerMaxSeconds": max(deleted_s),
        "deleteToFinalCheckpointMaxSeconds": max(t["deleteToFinalCheckpointSeconds"] for t in timings),
    }
