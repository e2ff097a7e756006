"""`clora bench verifier`: what scoring through an HTTP verifier (task http) adds to a tick.

One engine in this process; the same problems scored two ways, in alternating runs: by the built-in
exact-match reward, and by examples/continual/verifier.py (the same rule, behind HTTP on loopback).
The reward phase of each tick (decode the completions, score them) is compared, for 1 experiment and
for N, whose verifier calls run concurrently. Mean ± standard error over the ticks after the first.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from clora.api import LoRAExperimentSpec
from clora_runtime.bench.processes import free_port
from clora_runtime.bench.throughput import machine

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "continual" / "verifier.py"


def _spec(task: dict[str, Any], seed: int) -> LoRAExperimentSpec:
    return LoRAExperimentSpec.model_validate(
        {
            "runtime": "bench",
            "task": task,
            "lora": {"rank": 8, "alpha": 16},
            "training": {
                "steps": 10**6,
                "promptsPerStep": 4,
                "groupSize": 4,
                "maxNewTokens": 16,
                "seed": seed,
            },
            "checkpoint": {"everySteps": 10**6, "keep": 1},
        }
    )


def _reward_seconds(engine: Any, specs: list[LoRAExperimentSpec], ticks: int, tag: str) -> list[float]:
    for i, spec in enumerate(specs):
        engine.upsert("bench", f"{tag}-{i}", spec)
    seconds = []
    for t in range(ticks + 1):
        report = engine.tick()
        assert report is not None and not report.failed, report.failed if report else "idle"
        if t:  # the first tick warms caches up
            seconds.append(report.seconds["reward"])
    for i in range(len(specs)):
        engine.remove("bench", f"{tag}-{i}")
    return seconds


def verifier_bench(
    model: str = "tiny",
    experiments: int = 8,
    ticks: int = 10,
    rounds: int = 3,
    console: Console | None = None,
) -> dict[str, Any]:
    from clora.metrics import RuntimeMetrics
    from clora_runtime.config import EngineConfig
    from clora_runtime.engine import Engine
    from clora_runtime.tasks.arithmetic import ArithmeticTask

    console = console or Console(stderr=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/score"
    server = subprocess.Popen([sys.executable, str(EXAMPLE)], env={"PORT": str(port)})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.post(url, json={"experiment": {}, "items": []}, timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        with tempfile.TemporaryDirectory(prefix="clora-bench-verifier-") as tmp:
            # The arithmetic task's own problems, as a dataset of task http: the same prompts and answers.
            problems = ArithmeticTask(1, 0).problems(0, 4 * (ticks + 1) * experiments)
            data = Path(tmp) / "problems.jsonl"
            data.write_text(
                "".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems)
            )
            engine = Engine(
                EngineConfig(
                    model=model,
                    device="cpu",
                    checkpoint_dir=Path(tmp) / "ck",
                    max_adapters=experiments,
                    dataset_roots=[Path(tmp)],
                ),
                RuntimeMetrics.create(),
            )
            engine.load()
            builtin = {"name": "arithmetic", "difficulty": 1, "reward": "exact-match"}
            http = {"name": "http", "dataset": {"path": str(data)}, "verifier": {"url": url}}
            arms: dict[str, dict[str, list[float]]] = {}
            for n in sorted({1, experiments}):
                arms[str(n)] = {"builtin": [], "verifier": []}
                for r in range(rounds):
                    for arm, task in (("builtin", builtin), ("verifier", http)):
                        console.log(f"{n} experiment(s), {arm}, round {r + 1} of {rounds}")
                        specs = [_spec(task, seed=i) for i in range(n)]
                        arms[str(n)][arm] += _reward_seconds(engine, specs, ticks, f"{arm}-{r}")
    finally:
        server.kill()
        server.wait()

    def summary(xs: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(xs), "se": statistics.stdev(xs) / len(xs) ** 0.5}

    out: dict[str, Any] = {}
    for n, a in arms.items():
        b, v = summary(a["builtin"]), summary(a["verifier"])
        out[n] = {
            "builtinRewardSeconds": b,
            "verifierRewardSeconds": v,
            "overheadMsPerTick": (v["mean"] - b["mean"]) * 1000,
            "overheadMsPerTickSe": (v["se"] ** 2 + b["se"] ** 2) ** 0.5 * 1000,
        }
    return {
        "config": {
            "model": model,
            "experiments": experiments,
            "ticks": ticks,
            "rounds": rounds,
            "itemsPerStep": 16,
        },
        "experiments": out,
        "machine": machine(),
    }
