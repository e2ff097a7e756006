"""`clora bench throughput`: N experiments on one warm runtime against the same N run one at a time."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from rich.console import Console

from clora.api import LoRAExperimentSpec
from clora_runtime.bench.ceiling import CeilingRequest, CeilingResult, ceiling_ratio
from clora_runtime.bench.processes import run_module
from clora_runtime.bench.stats import arm_summary, reward_comparison
from clora_runtime.bench.worker import WorkerRequest, WorkerResult

PROMPT_TOKENS_ESTIMATE = 40  # a chat-templated arithmetic prompt on smollm2's tokenizer


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpuCount": os.cpu_count(),
        "torch": torch.__version__,
        "torchThreads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_arm(
    kind: str,
    model: str,
    device: str,
    threads: int | None,
    exps: list[tuple[str, str, LoRAExperimentSpec]],
    console: Console,
) -> dict[str, Any]:
    """kind: concurrent (one process, all experiments) | serial (one process each) | trl (TRL, one each)."""
    results: list[tuple[WorkerResult, float]] = []
    if kind == "concurrent":
        with console.status(f"[bold]concurrent[/]: {len(exps)} experiments on one warm runtime"):
            request = WorkerRequest.of(model, device, threads, exps)
            results.append(run_module("clora_runtime.bench.worker", request, WorkerResult))
        console.log(f"concurrent: {results[0][1]:.1f} s")
    else:
        module = "clora_runtime.bench.worker" if kind == "serial" else "clora_runtime.bench.trl_worker"
        for i, exp in enumerate(exps, 1):
            with console.status(f"[bold]{kind}[/]: experiment {i}/{len(exps)} in a fresh process"):
                request = WorkerRequest.of(model, device, threads, [exp])
                results.append(run_module(module, request, WorkerResult))
            console.log(f"{kind} {i}/{len(exps)}: {results[-1][1]:.1f} s")
    return arm_summary(results, len(exps))


def measure_ceiling(
    model: str, device: str, threads: int | None, rows: int, new_tokens: int, ns: list[int], console: Console
) -> CeilingResult:
    request = CeilingRequest(
        model=model,
        device=device,
        threads=threads,
        batches=sorted({rows * n for n in [1, *ns]}),
        prompt_tokens=PROMPT_TOKENS_ESTIMATE,
        new_tokens=new_tokens,
    )
    with console.status("[bold]ceiling[/]: raw sampling and forward+backward throughput"):
        result, _ = run_module("clora_runtime.bench.ceiling", request, CeilingResult)
    return result


def throughput(
    exps: list[tuple[str, str, LoRAExperimentSpec]],
    model: str,
    device: str,
    baseline: str,
    threads: int | None,
    console: Console,
) -> dict[str, Any]:
    n = len(exps)
    steps = exps[0][2].training.steps or 1
    t = exps[0][2].training
    rows = t.prompts_per_step * t.group_size
    arms = {"concurrent": run_arm("concurrent", model, device, threads, exps, console)}
    arms["serial"] = run_arm("serial", model, device, threads, exps, console)
    if baseline == "trl":
        arms["trl"] = run_arm("trl", model, device, threads, exps, console)
    conc, serial = arms["concurrent"], arms["serial"]
    ceiling = measure_ceiling(model, device, threads, rows, t.max_new_tokens, [n], console)
    ratio = serial["wallSeconds"] / conc["wallSeconds"]
    ceil = ceiling_ratio(ceiling, rows, n, steps, serial["coldStartSeconds"])
    out: dict[str, Any] = {
        "machine": machine(),
        "model": model,
        "experiments": n,
        "steps": steps,
        "rowsPerExperimentStep": rows,
        "arms": arms,
        "throughputRatio": ratio,
        "rewardComparison": reward_comparison(conc, serial, rows),
        "ceiling": {
            "ratio": ceil,
            "efficiency": ratio / ceil,
            "points": [p.model_dump() for p in ceiling.points],
            "promptTokens": ceiling.prompt_tokens,
            "newTokens": ceiling.new_tokens,
        },
    }
    if "trl" in arms:
        out["trlRatio"] = arms["trl"]["wallSeconds"] / conc["wallSeconds"]
        out["rewardComparisonTrl"] = reward_comparison(conc, arms["trl"], rows)
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"concurrent": "-", "serial": "--", "trl": ":"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for arm, summary in arms.items():
        for i, (key, rewards) in enumerate(sorted(summary["rewards"].items())):
            left.plot(
                range(1, len(rewards) + 1),
                rewards,
                styles[arm],
                color=colors[i % len(colors)],
                label=f"{key.split('/')[-1]} ({arm})" if i < 4 else None,
            )
    left.set(xlabel="step", ylabel="mean reward", title="Reward per step (solid: concurrent, dashed: serial)")
    left.legend(fontsize=7)
    names = list(arms)
    right.bar(names, [arms[a]["wallSeconds"] for a in names], color=colors[: len(names)])
    right.set(
        ylabel="wall seconds",
        title=f"{result['experiments']} experiments x {result['steps']} steps: "
        f"{result['throughputRatio']:.2f}x (ceiling {result['ceiling']['ratio']:.2f}x)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
