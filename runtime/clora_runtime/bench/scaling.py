"""`clora bench scaling`: step time, experiment throughput and memory for N = 1, 2, 4, ... experiments."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from clora.api import LoRAExperimentSpec
from clora_runtime.bench.processes import run_module
from clora_runtime.bench.stats import steady, tick_seconds
from clora_runtime.bench.throughput import machine
from clora_runtime.bench.worker import WorkerRequest, WorkerResult


def counts(max_experiments: int) -> list[int]:
    out, n = [], 1
    while n <= max_experiments:
        out.append(n)
        n *= 2
    if out[-1] != max_experiments:
        out.append(max_experiments)
    return out


def scaling(
    exps: list[tuple[str, str, LoRAExperimentSpec]],
    model: str,
    device: str,
    threads: int | None,
    console: Console,
) -> dict[str, Any]:
    rows = []
    for n in counts(len(exps)):
        with console.status(f"[bold]scaling[/]: {n} experiments together"):
            result, wall = run_module(
                "clora_runtime.bench.worker", WorkerRequest.of(model, device, threads, exps[:n]), WorkerResult
            )
        # The first tick pays one-off costs (allocator growth, lazy init); steady state is what scales.
        step = statistics.fmean(tick_seconds(steady(result.ticks)))
        rows.append(
            {
                "experiments": n,
                "stepSeconds": step,
                "experimentStepsPerSecond": n / step,
                "wallSeconds": wall,
                "coldStartSeconds": result.loaded_at - result.spawned_at,
                "peakMemoryMB": result.peak_rss_mb,
                "peakDeviceMemoryMB": result.peak_device_mb,
            }
        )
        console.log(
            f"N={n}: step {step:.2f} s, {n / step:.2f} experiment-steps/s, {result.peak_rss_mb:.0f} MB"
        )
    base = rows[0]
    for r in rows:
        r["speedupPerExperimentStep"] = r["experimentStepsPerSecond"] / base["experimentStepsPerSecond"]
    mem_key = "peakDeviceMemoryMB" if base["peakDeviceMemoryMB"] else "peakMemoryMB"
    ns = [r["experiments"] for r in rows]
    mems = [r[mem_key] for r in rows]
    slope = _slope(ns, mems) if len(rows) > 1 else None
    return {
        "machine": machine(),
        "model": model,
        "rows": rows,
        "memoryPerExtraAdapterMB": slope,
        "memoryMeasure": mem_key,
    }


def _slope(xs: list[int], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def table(result: dict[str, Any]) -> Table:
    t = Table(title=f"scaling on {result['model']}")
    for col in ("N", "step s", "exp-steps/s", "speed-up", "peak MB"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        mem = r["peakDeviceMemoryMB"] or r["peakMemoryMB"]
        t.add_row(
            str(r["experiments"]),
            f"{r['stepSeconds']:.2f}",
            f"{r['experimentStepsPerSecond']:.2f}",
            f"{r['speedupPerExperimentStep']:.2f}x",
            f"{mem:.0f}",
        )
    return t


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["experiments"] for r in result["rows"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ns, [r["stepSeconds"] for r in result["rows"]], "o-")
    a.set(xlabel="experiments together", ylabel="seconds per step", xscale="log", title="Step time")
    b.plot(ns, [r["experimentStepsPerSecond"] for r in result["rows"]], "o-", label="measured")
    b.plot(ns, [n * result["rows"][0]["experimentStepsPerSecond"] for n in ns], ":", label="linear")
    b.set(
        xlabel="experiments together",
        ylabel="experiment-steps / s",
        xscale="log",
        yscale="log",
        title="Experiment throughput",
    )
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
