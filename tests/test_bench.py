"""`clora bench`: the pure summaries, and each benchmark run for real on the tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from clora_runtime.bench.ceiling import CeilingPoint, CeilingResult, ceiling_ratio
from clora_runtime.bench.scaling import counts
from clora_runtime.bench.stats import final_reward, reward_comparison
from clora_runtime.bench.workload import DEFAULT_TEMPLATE, bench_experiments, templates_from

EXAMPLES_LOCAL = Path(__file__).resolve().parent.parent / "examples" / "local"


def test_bench_experiments_differ_only_in_seed_and_keep_k_steps() -> None:
    exps = bench_experiments(3, 7, templates_from(None))
    assert [name for _, name, _ in exps] == ["exp-00", "exp-01", "exp-02"]
    assert len({spec.training.seed for _, _, spec in exps}) == 3
    for _, _, spec in exps:
        assert spec.training.steps == 7
        assert spec.checkpoint.every_steps > 7  # no arm pays for checkpoints
        assert spec.lora.rank == DEFAULT_TEMPLATE["lora"]["rank"]


def test_templates_from_examples_local() -> None:
    specs = templates_from(EXAMPLES_LOCAL)
    assert specs and all(s.task.name == "arithmetic" for s in specs)


def test_final_reward_is_the_mean_of_the_last_steps() -> None:
    assert final_reward([0.0, 0.0, 0.5, 1.0, 0.0]) == pytest.approx(0.5)
    assert math.isnan(final_reward([]))


def _arm(finals: dict[str, list[float]]) -> dict:
    return {"rewards": finals, "finalRewards": {k: final_reward(v) for k, v in finals.items()}}


def test_reward_comparison_flags_a_regression_beyond_the_noise_only() -> None:
    same = reward_comparison(
        _arm({"a": [0.5] * 3, "b": [0.4] * 3}), _arm({"a": [0.5] * 3, "b": [0.4] * 3}), 64
    )
    assert same["meanDifference"] == 0 and same["noRegression"] is True
    worse = reward_comparison(
        _arm({"a": [0.1] * 3, "b": [0.0] * 3}), _arm({"a": [0.9] * 3, "b": [0.8] * 3}), 64
    )
    assert worse["meanDifference"] == pytest.approx(-0.8) and worse["noRegression"] is False


def test_ceiling_ratio_from_raw_throughput() -> None:
    # Packing 4 experiments: the packed batch takes twice as long as one experiment's batch.
    result = CeilingResult(
        points=[
            CeilingPoint(rows=8, sample_seconds=1, train_seconds=1),
            CeilingPoint(rows=32, sample_seconds=2, train_seconds=2),
        ],
        prompt_tokens=40,
        new_tokens=16,
    )
    # serial: 4 x (10 + 5 x 2) = 80; concurrent: 10 + 5 x 4 = 30
    assert ceiling_ratio(result, 8, 4, 5, 10.0) == pytest.approx(80 / 30)


def test_scaling_counts() -> None:
    assert counts(16) == [1, 2, 4, 8, 16]
    assert counts(6) == [1, 2, 4, 6]


def _bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clora.cli",
            "bench",
            *args,
            "--model",
            "tiny",
            "--threads",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_throughput_runs_both_arms_side_by_side(tmp_path: Path) -> None:
    plot = tmp_path / "throughput.png"
    r = _bench(tmp_path, "throughput", "--experiments", "2", "--steps", "2", "--plot", str(plot))
    assert set(r["arms"]) == {"concurrent", "serial"}
    assert r["arms"]["concurrent"]["processes"] == 1 and r["arms"]["serial"]["processes"] == 2
    for arm in r["arms"].values():
        assert arm["failed"] == {}
        assert sorted(arm["rewards"]) == ["bench/exp-00", "bench/exp-01"]
        assert all(len(curve) == 2 for curve in arm["rewards"].values())
        assert arm["coldStartSeconds"] > 0 and arm["wallSeconds"] > arm["coldStartSeconds"]
        assert set(arm["phaseSecondsPerTick"]) == {"sample", "reward", "train", "sync"}
    assert r["throughputRatio"] == pytest.approx(
        r["arms"]["serial"]["wallSeconds"] / r["arms"]["concurrent"]["wallSeconds"]
    )
    # The same seeds train the same problems: the packed run's rewards match the serial ones.
    assert r["rewardComparison"]["noRegression"] is True
    assert r["ceiling"]["ratio"] > 0 and r["ceiling"]["efficiency"] > 0
    assert plot.stat().st_size > 10_000


@pytest.mark.slow
def test_bench_scaling_and_join(tmp_path: Path) -> None:
    s = _bench(tmp_path, "scaling", "--max-experiments", "2", "--steps", "2")
    assert [row["experiments"] for row in s["rows"]] == [1, 2]
    assert all(row["stepSeconds"] > 0 and row["peakMemoryMB"] > 0 for row in s["rows"])
    assert s["memoryPerExtraAdapterMB"] is not None
    j = _bench(tmp_path, "join", "--steps", "1", "--busy", "2", "--joins", "2")
    assert j["busyExperiments"] == 2 and len(j["joins"]) == 2 and j["busyTickSeconds"] > 0
    for timing in j["joins"]:
        assert 0 < timing["putToAdmittedSeconds"] <= timing["putToFirstStepSeconds"]
    assert j["warmPutToAdmittedSeconds"] <= j["warmPutToAdmittedMaxSeconds"]
    for timing in j["joins"]:
        assert 0 < timing["deleteAnswerSeconds"] <= timing["deleteToFinalCheckpointSeconds"]
    assert j["coldStartToReadySeconds"] < j["coldStartToFirstStepSeconds"]
