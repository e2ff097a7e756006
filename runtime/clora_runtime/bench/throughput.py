"""`clora bench throughput`: N experiments on one warm runtime against the same N run one at a time,
each figure beside the limit that bounds it, all measured in one run:

- concurrent: one process trains the N experiments together (packed, as a runtime does);
- serial: N processes, one experiment each, one after another (each pays its cold start, as jobs do);
- limit: one process trains ONE adapter at the packed batch (N x promptsPerStep x groupSize rows):
  what the ticks would cost if N adapters cost no more than one (the batching limit);
- trl (with --baseline trl): TRL's GRPOTrainer, one experiment per process, one after another.

The concurrent process also measures the device's dense matmul rate, against which each phase's
model FLOP/s give its MFU (clora_runtime.bench.flops).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from rich.console import Console

from clora.api import LoRAExperimentSpec
from clora_runtime.bench.flops import ModelShape, phase_rates
from clora_runtime.bench.processes import run_module
from clora_runtime.bench.stats import (
    arm_summary,
    packing_yardsticks,
    paired_final_difference,
    reward_band,
    reward_comparison,
    steady,
    tick_seconds,
)
from clora_runtime.bench.worker import WorkerRequest, WorkerResult

# The stable keys of `clora bench throughput --json` (tests and downstream tools read them).
KEYS: dict[str, str] = {
    "ratio": "experiments/hour, concurrent over serial, cold starts included (serial wall / concurrent wall)",
    "steadyRatio": "warm experiment-steps/s, concurrent over serial (N x serial tick / concurrent tick)",
    "batchingLimit": "the ratio if the concurrent ticks cost what ONE adapter's ticks cost at the packed"
    " batch, cold starts as measured",
    "steadyBatchingLimit": "N x serial tick / one-adapter packed tick",
    "efficiency": "ratio / batchingLimit (<= 1 + noise); steadyEfficiency likewise; *Noise: one standard"
    " error; efficiencyWithinLimit: both within two",
    "matmulGflops": "this device's dense matmul rate in the run's dtype and threads (torch.mm, best of 5)",
    "mfu": "{sample, train}: the concurrent arm's model FLOP/s per phase over matmulGflops",
    "phaseRates": "per arm and phase: model FLOPs, seconds, GFLOP/s, MFU",
    "vsTrl": "serial TRL wall / concurrent wall (with --baseline trl)",
    "reward": "per arm: perStepMean, perStepSe, finalMean, finalSe (final: mean of the last 5 steps)",
    "isolationCheck": "packed vs alone, same seeds: equal by construction; not a regression test",
    "machine": "device, cpuCount, torch, threads, dtype, platform",
    "config": "model, device, threads, experiments, steps, baseline, specs, matmul, modelShape",
    "arms": "per arm: processes, wall, cold start, tick phases, memory, per-experiment rewards",
    "command": "the command line that produced the file",
}


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
) -> tuple[dict[str, Any], list[WorkerResult]]:
    """kind: concurrent (one process, all experiments) | limit (one process, one experiment at the
    packed batch) | serial (one process each) | trl (TRL, one each). Its summary and its processes."""
    results: list[tuple[WorkerResult, float]] = []
    if kind in ("concurrent", "limit"):
        what = (
            f"{len(exps)} experiments on one warm runtime"
            if kind == "concurrent"
            else "one adapter, packed batch"
        )
        with console.status(f"[bold]{kind}[/]: {what}"):
            request = WorkerRequest.of(model, device, threads, exps)
            request.measure_matmul = kind == "concurrent"
            results.append(run_module("clora_runtime.bench.worker", request, WorkerResult))
        console.log(f"{kind}: {results[0][1]:.1f} s")
    else:
        module = "clora_runtime.bench.worker" if kind == "serial" else "clora_runtime.bench.trl_worker"
        for i, exp in enumerate(exps, 1):
            with console.status(f"[bold]{kind}[/]: experiment {i}/{len(exps)} in a fresh process"):
                request = WorkerRequest.of(model, device, threads, [exp])
                results.append(run_module(module, request, WorkerResult))
            console.log(f"{kind} {i}/{len(exps)}: {results[-1][1]:.1f} s")
    return arm_summary(results, len(exps)), [r for r, _ in results]


def packed_alone(exps: list[tuple[str, str, LoRAExperimentSpec]]) -> tuple[str, str, LoRAExperimentSpec]:
    """The batching limit's one experiment: the first spec with N x its prompts per step, so ONE adapter
    samples and trains the packed batch (N x promptsPerStep x groupSize rows, same lengths)."""
    namespace, _, spec = exps[0]
    spec = spec.model_copy(deep=True)
    spec.training.prompts_per_step *= len(exps)
    return namespace, "packed-alone", spec


def arm_mfu(processes: list[WorkerResult], gflops: float) -> dict[str, Any]:
    """Per phase: model FLOPs per second over the steady ticks of the arm's processes, and its MFU."""
    totals: dict[str, dict[str, float]] = {}
    for r in processes:
        for phase, rate in phase_rates(steady(r.ticks), ModelShape.from_json(r.shape)).items():
            t = totals.setdefault(phase, {"flops": 0.0, "seconds": 0.0})
            t["flops"] += rate["flops"]
            t["seconds"] += rate["seconds"]
    out: dict[str, Any] = {}
    for phase, t in totals.items():
        achieved = t["flops"] / t["seconds"] / 1e9 if t["seconds"] else 0.0
        out[phase] = {
            "gflops": achieved,
            "mfu": achieved / gflops,
            "flops": t["flops"],
            "seconds": t["seconds"],
        }
    return out


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
    processes: dict[str, list[WorkerResult]] = {}
    arms: dict[str, dict[str, Any]] = {}
    for kind, arm_exps in (
        ("concurrent", exps),
        ("limit", [packed_alone(exps)]),
        ("serial", exps),
        *((("trl", exps),) if baseline == "trl" else ()),
    ):
        arms[kind], processes[kind] = run_arm(kind, model, device, threads, arm_exps, console)
    conc, serial = arms["concurrent"], arms["serial"]
    (packed,) = processes["concurrent"]
    (limit,) = processes["limit"]
    assert packed.matmul is not None
    gflops = packed.matmul["gflops"]
    yardsticks = packing_yardsticks(
        n,
        steps,
        serial["wallSeconds"],
        [x for r in processes["serial"] for x in tick_seconds(steady(r.ticks))],
        conc["wallSeconds"],
        tick_seconds(packed.ticks),
        tick_seconds(limit.ticks),
    )
    phases = {kind: arm_mfu(processes[kind], gflops) for kind in ("concurrent", "limit", "serial")}
    rows = exps[0][2].training.prompts_per_step * exps[0][2].training.group_size
    out: dict[str, Any] = {
        **yardsticks,
        "matmulGflops": gflops,
        "mfu": {phase: rate["mfu"] for phase, rate in phases["concurrent"].items()},
        "phaseRates": phases,
        "reward": {
            kind: reward_band(list(arms[kind]["rewards"].values())) for kind in arms if kind != "limit"
        },
        "isolationCheck": {
            "what": "concurrent vs serial: packed and alone compute the same numbers (an isolation check,"
            " not evidence of no regression: see clora bench rewards)",
            **reward_comparison(conc, serial, rows),
        },
        "machine": {**machine(), "device": packed.device, "dtype": packed.dtype, "threads": threads},
        "config": {
            "model": model,
            "device": device,
            "threads": threads,
            "experiments": n,
            "steps": steps,
            "baseline": baseline,
            "specs": [s.model_dump(mode="json", by_alias=True) for _, _, s in exps],
            "matmul": packed.matmul,
            "modelShape": packed.shape,
        },
        "arms": arms,
    }
    if "trl" in arms:
        out["vsTrl"] = arms["trl"]["wallSeconds"] / conc["wallSeconds"]
        out["rewardVsTrl"] = paired_final_difference(conc["rewards"], arms["trl"]["rewards"])
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Left: the measured ratios beside their batching limits. Right: each arm's model GFLOP/s per
    phase against the measured matmul rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    bars = {
        "ratio\n(cold starts)": result["ratio"],
        "batching limit\n(cold starts)": result["batchingLimit"],
        "steady ratio": result["steadyRatio"],
        "steady\nbatching limit": result["steadyBatchingLimit"],
    }
    if "vsTrl" in result:
        bars["vs TRL\n(cold starts)"] = result["vsTrl"]
    colors = ["C0", "C7", "C0", "C7", "C2"][: len(bars)]
    left.bar(list(bars), list(bars.values()), color=colors)
    for i, v in enumerate(bars.values()):
        left.text(i, v, f"{v:.2f}x", ha="center", va="bottom")
    c = result["config"]
    left.set(
        ylabel="experiments/hour over the one-at-a-time arm",
        title=f"{c['experiments']} experiments x {c['steps']} steps on {c['model']}: "
        f"efficiency {result['efficiency']:.2f} (steady {result['steadyEfficiency']:.2f})",
    )
    arms = list(result["phaseRates"])
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        rates = result["phaseRates"][arm]
        phases = list(rates)
        right.bar(
            [j + i * width for j in range(len(phases))],
            [rates[p]["gflops"] for p in phases],
            width,
            label=arm,
        )
    right.axhline(result["matmulGflops"], color="k", linestyle="--", label="torch.mm rate")
    right.set_xticks([j + width * (len(arms) - 1) / 2 for j in range(len(phases))], phases)
    right.set(ylabel="model GFLOP/s", title="Arithmetic rate per tick phase (MFU = bar / dashed line)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
