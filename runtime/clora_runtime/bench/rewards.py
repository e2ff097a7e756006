"""`clora bench rewards`: clora against TRL's GRPOTrainer on the same specs over several seeds.

Reward only: nothing here is timed, so the processes may run side by side (`jobs`). Per replicate (a
set of seeds for the same N specs), the clora arm is one process training all N together (packed, as
a runtime trains them) and the TRL arm is N processes, one GRPOTrainer each. Each (replicate, spec)
is one independent run; the two arms' runs are paired by it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from clora.api import LoRAExperimentSpec
from clora_runtime.bench.processes import run_module
from clora_runtime.bench.stats import mean_se, paired_final_difference, reward_band
from clora_runtime.bench.worker import WorkerRequest, WorkerResult

Experiments = list[tuple[str, str, LoRAExperimentSpec]]
ARM_MODULES = {"clora": "clora_runtime.bench.worker", "trl": "clora_runtime.bench.trl_worker"}


def _jobs(replicates: list[Experiments]) -> list[tuple[str, int, Experiments]]:
    """(arm, replicate, experiments) per process: clora packs a replicate, TRL runs each alone.
    Interleaved so that both arms advance together and a cut-short run still compares like with like."""
    out: list[tuple[str, int, Experiments]] = []
    for r, exps in enumerate(replicates):
        out.append(("clora", r, exps))
        out.extend(("trl", r, [e]) for e in exps)
    return out


def rewards(
    replicates: list[Experiments],
    model: str,
    device: str,
    threads: int | None,
    jobs: int,
    console: Console,
) -> dict[str, Any]:
    from clora_runtime.bench.throughput import machine

    curves: dict[str, dict[str, list[float]]] = {"clora": {}, "trl": {}}
    failed: dict[str, str] = {}
    processes: list[dict[str, Any]] = []
    work = _jobs(replicates)
    with Progress(console=console) as progress, ThreadPoolExecutor(max_workers=jobs) as pool:
        task = progress.add_task("clora and TRL runs", total=len(work))
        futures = {
            pool.submit(
                run_module, ARM_MODULES[arm], WorkerRequest.of(model, device, threads, exps), WorkerResult
            ): (
                arm,
                r,
            )
            for arm, r, exps in work
        }
        for future in as_completed(futures):
            arm, r = futures[future]
            result, wall = future.result()
            processes.append(
                {
                    "arm": arm,
                    "replicate": r,
                    "experiments": len(result.experiments),
                    "wallSeconds": wall,
                    "coldStartSeconds": result.loaded_at - result.spawned_at,
                }
            )
            for e in result.experiments:
                key = f"r{r}/{e.key}"
                curves[arm][key] = e.rewards
                if e.phase != "Succeeded":
                    failed[f"{arm}:{key}"] = e.message
            progress.advance(task)
            console.log(f"{arm} replicate {r}: {len(result.experiments)} run(s) in {wall:.0f} s")
    first = replicates[0]
    return {
        "machine": machine(),
        "config": {
            "model": model,
            "device": device,
            "threads": threads,
            "jobs": jobs,
            "experiments": len(first),
            "replicates": len(replicates),
            "steps": first[0][2].training.steps,
            "specs": [s.model_dump(mode="json", by_alias=True) for _, _, s in first],
            "seeds": [[s.training.seed for _, _, s in exps] for exps in replicates],
        },
        "curves": curves,
        "reward": {arm: reward_band(list(c.values())) for arm, c in curves.items()},
        "cloraMinusTrl": paired_final_difference(curves["clora"], curves["trl"]),
        "vsTrl": wall_ratio(processes, len(replicates)),
        "processes": processes,
        "failed": failed,
    }


def wall_ratio(processes: list[dict[str, Any]], replicates: int) -> dict[str, Any]:
    """Per replicate, the TRL arm's wall seconds (its N processes, cold starts included) over the clora
    arm's (one process): processes of both arms ran side by side under the same conditions."""
    ratios = []
    for r in range(replicates):
        walls = {
            arm: sum(p["wallSeconds"] for p in processes if p["arm"] == arm and p["replicate"] == r)
            for arm in ("clora", "trl")
        }
        if walls["clora"] > 0 and walls["trl"] > 0:
            ratios.append(walls["trl"] / walls["clora"])
    mean, se = mean_se(ratios)
    return {
        "perReplicate": ratios,
        "mean": mean,
        "standardError": se,
        "what": "TRL wall seconds over clora's for the same N experiments, per replicate: every process"
        " at the same threads, `jobs` processes at a time, in this run",
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """Per-step mean reward of each arm with its 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, band in result["reward"].items():
        steps = range(1, len(band["perStepMean"]) + 1)
        mean, se, z = band["perStepMean"], band["perStepSe"], band["bandZ"]
        ax.plot(steps, mean, label=f"{arm} ({band['runs']} runs)")
        ax.fill_between(
            steps,
            [m - z * s for m, s in zip(mean, se, strict=True)],
            [m + z * s for m, s in zip(mean, se, strict=True)],
            alpha=0.25,
        )
    d = result["cloraMinusTrl"]
    c = result["config"]
    ax.set(
        xlabel="step",
        ylabel="mean reward",
        title=f"{c['experiments']} specs x {c['replicates']} seeds on {c['model']}: final clora - TRL "
        f"{d['difference']:+.3f} ± {d['standardError']:.3f}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
