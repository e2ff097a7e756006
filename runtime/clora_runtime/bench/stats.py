"""Pure summaries of benchmark results: arm figures, reward comparison and its noise."""

from __future__ import annotations

import math
import statistics
from typing import Any, TypeVar

from clora_runtime.bench.worker import WorkerResult

FINAL_WINDOW = 5  # final reward = mean of the last steps, less noisy than the very last one
BAND_Z = 1.96  # the reward curves' band: a 95% normal confidence interval of the per-step mean
T = TypeVar("T")

TICK_PHASES = ("sample", "reward", "train", "sync")


def final_reward(rewards: list[float]) -> float:
    tail = rewards[-FINAL_WINDOW:]
    return sum(tail) / len(tail) if tail else float("nan")


def final_reward_se(rewards: list[float], completions_per_step: int) -> float:
    """Standard error of final_reward from sampling alone: rewards in [0, 1] treated as Bernoulli."""
    tail = rewards[-FINAL_WINDOW:]
    if not tail:
        return float("nan")
    p = min(max(sum(tail) / len(tail), 0.0), 1.0)
    return math.sqrt(max(p * (1 - p), 1e-4) / (completions_per_step * len(tail)))


def arm_summary(results: list[tuple[WorkerResult, float]], n_experiments: int) -> dict[str, Any]:
    """Figures of one arm from its processes (result, wall seconds), run one after another."""
    arm_start = results[0][0].spawned_at
    wall = sum(w for _, w in results)
    experiments = [e for r, _ in results for e in r.experiments]
    ticks = [t for r, _ in results for t in r.ticks]
    phases = (
        {p: statistics.fmean(t["seconds"].get(p, 0.0) for t in ticks) for p in TICK_PHASES} if ticks else {}
    )
    durations = tick_seconds(ticks)
    return {
        "processes": len(results),
        "wallSeconds": wall,
        "experimentsPerHour": 3600 * n_experiments / wall,
        "meanCompletionSeconds": statistics.fmean(e.completed_at - arm_start for e in experiments),
        "coldStartSeconds": statistics.fmean(r.loaded_at - r.spawned_at for r, _ in results),
        "stepLatencySeconds": statistics.fmean(durations) if durations else None,
        "phaseSecondsPerTick": phases,
        "peakMemoryMB": max(r.peak_rss_mb for r, _ in results),
        "peakDeviceMemoryMB": max((r.peak_device_mb or 0.0) for r, _ in results) or None,
        "rewards": {e.key: e.rewards for e in experiments},
        "finalRewards": {e.key: final_reward(e.rewards) for e in experiments},
        "failed": {e.key: e.message for e in experiments if e.phase != "Succeeded"},
        "device": results[0][0].device,
    }


def reward_comparison(a: dict[str, Any], b: dict[str, Any], completions_per_step: int) -> dict[str, Any]:
    """Paired difference of final rewards, arm a minus arm b, against the noise of sampling.

    "No regression" means the mean paired difference is not below minus twice its standard error,
    where that error is what sampling alone gives (Bernoulli noise of each arm's final-window mean).
    """
    keys = sorted(set(a["rewards"]) & set(b["rewards"]))
    diffs = [a["finalRewards"][k] - b["finalRewards"][k] for k in keys]
    ses = [
        math.hypot(
            final_reward_se(a["rewards"][k], completions_per_step),
            final_reward_se(b["rewards"][k], completions_per_step),
        )
        for k in keys
    ]
    mean_diff = statistics.fmean(diffs) if diffs else float("nan")
    noise = math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else float("nan")
    return {
        "pairedDifferences": dict(zip(keys, diffs, strict=True)),
        "meanDifference": mean_diff,
        "noiseOfMeanDifference": noise,
        "perExperimentNoise": statistics.fmean(ses) if ses else float("nan"),
        "noRegression": bool(mean_diff >= -2 * noise) if diffs else None,
    }


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / sqrt(n); nan for fewer than two values)."""
    if not values:
        return float("nan"), float("nan")
    if len(values) < 2:
        return values[0], float("nan")
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def reward_band(curves: list[list[float]]) -> dict[str, Any]:
    """One arm's reward over independent runs: per-step mean with its standard error, and the final
    reward (mean of the last FINAL_WINDOW steps of each run) with its standard error over the runs."""
    steps = min((len(c) for c in curves), default=0)
    per_step = [mean_se([c[i] for c in curves]) for i in range(steps)]
    final, final_se = mean_se([final_reward(c) for c in curves])
    return {
        "runs": len(curves),
        "perStepMean": [m for m, _ in per_step],
        "perStepSe": [se for _, se in per_step],
        "bandZ": BAND_Z,
        "finalMean": final,
        "finalSe": final_se,
    }


def paired_final_difference(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, Any]:
    """Final reward of arm a minus arm b over runs paired by key (same spec, same seed index).

    No regression: the mean difference is not below minus two of its standard errors (the standard
    error of the mean of the paired differences, which are independent across runs).
    """
    keys = sorted(set(a) & set(b))
    diffs = [final_reward(a[k]) - final_reward(b[k]) for k in keys]
    mean, se = mean_se(diffs)
    return {
        "pairs": len(keys),
        "difference": mean,
        "standardError": se,
        "noRegression": bool(mean >= -2 * se) if len(diffs) > 1 else None,
        "rule": "no regression when difference >= -2 x standardError",
    }


def tick_seconds(ticks: list[dict[str, Any]]) -> list[float]:
    return [sum(t["seconds"].values()) for t in ticks]


def steady(ticks: list[T]) -> list[T]:
    """A process's ticks (or their durations) without its first, which pays one-off costs (allocator
    growth, lazy init)."""
    return ticks[1:] or ticks


def packing_yardsticks(
    n: int,
    steps: int,
    serial_wall: float,
    serial_steady: list[float],
    concurrent_wall: float,
    concurrent_ticks: list[float],
    limit_ticks: list[float],
) -> dict[str, Any]:
    """The measured packing ratios against the batching limit, with and without cold starts.

    Tick times in seconds: serial_steady are the one-experiment arm's ticks after each process's first;
    concurrent_ticks and limit_ticks are every tick of the packed arm (N adapters) and of the limit arm
    (ONE adapter at the packed batch), first tick first, over the same number of steps.

    - ratio = serial wall / concurrent wall: everything each arm pays, cold starts included.
    - batchingLimit: the same ratio with the concurrent arm's ticks replaced by the limit arm's, all
      else (the serial arm's N cold starts, the concurrent arm's one) as measured: what packing would
      reach if N adapters cost no more than one at the same batch.
    - steadyRatio = N x serial tick / concurrent tick (warm experiment-steps per second), and
      steadyBatchingLimit = N x serial tick / limit tick.
    - efficiency = ratio / batchingLimit (and the steady one): above 1 only by noise, given as one
      standard error propagated from the spread of the two arms' tick times.
    """
    conc_mean, conc_se = mean_se(steady(concurrent_ticks))
    limit_mean, limit_se = mean_se(steady(limit_ticks))
    serial_mean, _ = mean_se(serial_steady)
    limit_total = limit_ticks[0] + (steps - 1) * limit_mean if len(limit_ticks) < steps else sum(limit_ticks)
    overhead = concurrent_wall - sum(concurrent_ticks)  # the concurrent arm's cold start, admissions, exit
    ratio = serial_wall / concurrent_wall
    limit = serial_wall / (overhead + limit_total)
    steady_ratio = n * serial_mean / conc_mean
    steady_limit = n * serial_mean / limit_mean
    efficiency = ratio / limit
    steady_efficiency = steady_ratio / steady_limit
    se = [x if math.isfinite(x) else 0.0 for x in (conc_se, limit_se)]
    noise = math.hypot(steps * se[0], steps * se[1]) / concurrent_wall
    steady_noise = steady_efficiency * math.hypot(se[0] / conc_mean, se[1] / limit_mean)
    return {
        "ratio": ratio,
        "steadyRatio": steady_ratio,
        "batchingLimit": limit,
        "steadyBatchingLimit": steady_limit,
        "efficiency": efficiency,
        "efficiencyNoise": noise,
        "steadyEfficiency": steady_efficiency,
        "steadyEfficiencyNoise": steady_noise,
        "efficiencyWithinLimit": bool(
            efficiency <= 1 + 2 * noise and steady_efficiency <= 1 + 2 * steady_noise
        ),
        "tickSeconds": {"serial": serial_mean, "concurrent": conc_mean, "limit": limit_mean},
    }
