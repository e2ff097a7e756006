"""Pure summaries of benchmark results: arm figures, reward comparison and its noise."""

from __future__ import annotations

import math
import statistics
from typing import Any

from clora_runtime.bench.worker import WorkerResult

FINAL_WINDOW = 3  # final reward = mean of the last steps, less noisy than the very last one
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
    tick_seconds = [sum(t["seconds"].values()) for t in ticks]
    return {
        "processes": len(results),
        "wallSeconds": wall,
        "experimentsPerHour": 3600 * n_experiments / wall,
        "meanCompletionSeconds": statistics.fmean(e.completed_at - arm_start for e in experiments),
        "coldStartSeconds": statistics.fmean(r.loaded_at - r.spawned_at for r, _ in results),
        "stepLatencySeconds": statistics.fmean(tick_seconds) if tick_seconds else None,
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
