"""`clora bench join`: how soon a new experiment trains on a warm runtime, against a cold start.

Both are timed against a real `clora runtime` server process, through its HTTP API, as the operator
drives it: warm = PUT on a server that is already up and training another experiment, until the new
experiment's first step is done; cold = starting the server process, waiting for /readyz, PUT, until the
first step is done (what a one-experiment job pays every time).
"""

from __future__ import annotations

import os
import secrets
import socket
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

POLL_S = 0.01


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def runtime_server(
    model: str, device: str, max_adapters: int, max_rank: int
) -> Iterator[tuple[httpx.Client, float]]:
    """A `clora runtime` process on a free loopback port; yields (client, spawn time)."""
    port, token = _free_port(), secrets.token_hex(16)
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


def _put(client: httpx.Client, name: str, spec: LoRAExperimentSpec) -> float:
    at = time.time()
    r = client.put(f"/v1/experiments/bench/{name}", json={"spec": spec.wire(), "resumeFrom": None})
    r.raise_for_status()
    return at


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


def join(spec: LoRAExperimentSpec, model: str, device: str) -> dict[str, Any]:
    continual = spec.model_copy(deep=True)
    continual.training.steps = 10_000  # keeps the runtime busy while the newcomer joins
    first = spec.model_copy(deep=True)
    first.training.steps = 1
    with runtime_server(model, device, 4, spec.lora.rank) as (client, spawned):
        ready = _wait_ready(client)
        put = _put(client, "cold", first)
        cold_step = _until(client, "cold", lambda s: s["step"] >= 1)
        _put(client, "busy", continual)
        _until(client, "busy", lambda s: s["step"] >= 1)
        warm_put = _put(client, "warm", first)
        admitted = _until(client, "warm", lambda s: s["phase"] != "Pending")
        warm_step = _until(client, "warm", lambda s: s["step"] >= 1)
    return {
        "model": model,
        "coldStartToReadySeconds": ready - spawned,
        "coldStartToFirstStepSeconds": cold_step - spawned,
        "coldFirstStepAfterPutSeconds": cold_step - put,
        "warmPutToAdmittedSeconds": admitted - warm_put,
        "warmPutToFirstStepSeconds": warm_step - warm_put,
    }
