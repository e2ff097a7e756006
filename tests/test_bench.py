"""`clora bench`: the pure summaries, and each benchmark run for real on the tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clora_runtime.bench.docs import render
from clora_runtime.bench.flops import ModelShape, model_shape, sample_flops, train_flops
from clora_runtime.bench.scaling import counts
from clora_runtime.bench.stats import (
    final_reward,
    packing_yardsticks,
    paired_final_difference,
    reward_band,
    reward_comparison,
)
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


def test_bench_experiments_replicates_keep_the_specs_and_change_every_seed() -> None:
    templates = templates_from(EXAMPLES_LOCAL)
    first, second = bench_experiments(8, 20, templates, 0), bench_experiments(8, 20, templates, 1)
    seeds = [s.training.seed for _, _, s in first + second]
    assert len(set(seeds)) == 16
    for (_, _, a), (_, _, b) in zip(first, second, strict=True):
        assert a.model_copy(update={"training": b.training}) == b
        assert a.training.model_copy(update={"seed": b.training.seed}) == b.training


def test_final_reward_is_the_mean_of_the_last_five_steps() -> None:
    assert final_reward([1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 1.0]) == pytest.approx(0.5)
    assert math.isnan(final_reward([]))


def test_reward_band_and_the_paired_difference_follow_the_textbook_formulas() -> None:
    curves = {"a": [0.0] * 5, "b": [0.2] * 5, "c": [0.4] * 5, "d": [0.6] * 5}
    band = reward_band(list(curves.values()))
    # mean 0.3; sample std of (0, .2, .4, .6) = sqrt(0.2/3); SE = std / 2
    se = math.sqrt(0.2 / 3) / 2
    assert band["perStepMean"] == pytest.approx([0.3] * 5)
    assert band["perStepSe"] == pytest.approx([se] * 5)
    assert band["finalMean"] == pytest.approx(0.3) and band["finalSe"] == pytest.approx(se)
    # b is a shifted by (0.1, 0.1, 0.2, 0.0): mean 0.1, SE = std(0.1, 0.1, 0.2, 0) / 2
    shifted = {k: [x + d for x in v] for (k, v), d in zip(curves.items(), (0.1, 0.1, 0.2, 0.0), strict=True)}
    diff = paired_final_difference(curves, shifted)
    assert diff["pairs"] == 4
    assert diff["difference"] == pytest.approx(-0.1)
    assert diff["standardError"] == pytest.approx(math.sqrt(0.02 / 3) / 2)
    assert diff["noRegression"] is False  # -0.1 < -2 x 0.0408
    assert paired_final_difference(shifted, curves)["noRegression"] is True


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


def test_packing_yardsticks_from_a_worked_example() -> None:
    # 4 experiments x 5 steps. Serial: 4 processes of 10 s cold start + 5 ticks of 2 s = 80 s.
    # Limit arm (one adapter, packed batch): 4 s a tick. Concurrent: 10 s + 5 ticks of 5 s = 35 s.
    y = packing_yardsticks(4, 5, 80.0, [2.0] * 16, 35.0, [5.0] * 5, [4.0] * 5)
    assert y["ratio"] == pytest.approx(80 / 35)
    assert y["batchingLimit"] == pytest.approx(80 / 30)  # the concurrent ticks at the limit's 4 s
    assert y["steadyRatio"] == pytest.approx(4 * 2 / 5)
    assert y["steadyBatchingLimit"] == pytest.approx(4 * 2 / 4)
    assert y["efficiency"] == pytest.approx(30 / 35) and y["steadyEfficiency"] == pytest.approx(0.8)
    assert y["efficiencyNoise"] == 0 and y["efficiencyWithinLimit"] is True
    # A limit arm run for fewer steps is extended from its steady ticks: 6 + 4 x 4 = 22 s.
    short = packing_yardsticks(4, 5, 80.0, [2.0] * 16, 35.0, [5.0] * 5, [6.0, 4.0, 4.0])
    assert short["batchingLimit"] == pytest.approx(80 / (10 + 22))
    # Ticks faster than the limit's are beyond it: the yardstick says so.
    beaten = packing_yardsticks(4, 5, 80.0, [2.0] * 16, 35.0, [5.0] * 5, [6.0] * 5)
    assert beaten["efficiency"] > 1 and beaten["efficiencyWithinLimit"] is False


def test_model_flops_count_from_the_shapes() -> None:
    """P_body and P_head of the tiny Llama counted by hand from its config, and the per-phase formulas
    written out: 2 FLOPs per weight per token forward, 2 more for the activation gradient, 4 more
    for LoRA's weight and activation gradients."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from clora_runtime.models.loading import TINY_SHAPE

    config = LlamaConfig(**{**TINY_SHAPE, "vocab_size": 1000})
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = h // config.num_attention_heads
    attention = h * h * 2 + 2 * h * config.num_key_value_heads * head_dim  # q, o; k, v
    body = layers * (attention + 3 * h * inter)  # + gate, up, down
    shape = model_shape(LlamaForCausalLM(config), [100, 300])
    assert shape == ModelShape(body, 1000 * h, 200.0)
    assert sample_flops(shape, prefilled=10, generated=5) == 2 * (body + 200) * 15 + 2 * 1000 * h * 5
    counts = {"body": 30, "head": 5, "referenceBody": 30, "referenceHead": 5}
    assert train_flops(shape, counts) == (
        (4 * body + 6 * 200) * 30 + 4 * 1000 * h * 5 + 2 * body * 30 + 2 * 1000 * h * 5
    )


def test_tick_token_counts_for_the_flop_accounting(tiny_engine, spec_factory) -> None:
    """The sampler prefills each group's prompt once (the shared head once per adapter); training runs
    those same positions plus every completion token; the KL reference repeats the forward."""
    engine = tiny_engine()
    engine.upsert("ns", "a", spec_factory(training={"klCoef": 0.1}))
    engine.upsert("ns", "b", spec_factory(training={"seed": 1, "promptsPerStep": 3}))
    report = engine.tick()
    c = report.train_counts
    assert report.tokens_prefilled > 0
    assert c.head == report.tokens_trained == report.tokens_sampled
    assert c.body == report.tokens_prefilled + c.head
    # the reference runs over each micro-batch that holds a row with a KL term: here the only one
    assert (c.reference_body, c.reference_head) == (c.body, c.head)
    engine.upsert("ns", "a", spec_factory(training={"klCoef": 0.0}))
    assert engine.tick().train_counts.reference_body == 0


def test_scaling_counts() -> None:
    assert counts(16) == [1, 2, 4, 8, 16]
    assert counts(6) == [1, 2, 4, 6]


def _bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{args[0]}-tiny.json"  # named as scripts/bench.sh names them, for docs.render
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
def test_bench_throughput_bounds_every_ratio_by_its_limit(tmp_path: Path) -> None:
    plot = tmp_path / "throughput.png"
    r = _bench(tmp_path, "throughput", "--experiments", "2", "--steps", "4", "--plot", str(plot))
    assert set(r["arms"]) == {"concurrent", "limit", "serial"}
    assert [r["arms"][a]["processes"] for a in ("concurrent", "limit", "serial")] == [1, 1, 2]
    for arm in r["arms"].values():
        assert arm["failed"] == {}
        assert all(len(curve) == 4 for curve in arm["rewards"].values())
        assert arm["coldStartSeconds"] > 0 and arm["wallSeconds"] > arm["coldStartSeconds"]
        assert set(arm["phaseSecondsPerTick"]) == {"sample", "reward", "train", "sync"}
    assert sorted(r["arms"]["concurrent"]["rewards"]) == ["bench/exp-00", "bench/exp-01"]
    assert list(r["arms"]["limit"]["rewards"]) == ["bench/packed-alone"]
    assert r["ratio"] == pytest.approx(
        r["arms"]["serial"]["wallSeconds"] / r["arms"]["concurrent"]["wallSeconds"]
    )
    # The limit: positive, and not beaten by much. The tiny model's ticks last milliseconds, so on a
    # shared 2-core machine the walls also carry scheduling noise that the tick-spread noise does not
    # see (CI once measured 1.08 against a 1.06 bound while another job ran): the bound here catches
    # a limit that is wrong, not a few percent; docs/benchmarks.md holds the measured efficiencies.
    assert r["batchingLimit"] > 0 and r["steadyBatchingLimit"] > 0 and r["steadyRatio"] > 0
    assert r["efficiency"] <= 1 + 2 * r["efficiencyNoise"] + 0.2
    assert r["steadyEfficiency"] <= 1 + 2 * r["steadyEfficiencyNoise"] + 0.2
    assert r["efficiency"] == pytest.approx(r["ratio"] / r["batchingLimit"])
    assert r["matmulGflops"] > 0
    assert 0 < r["mfu"]["sample"] < 1 and 0 < r["mfu"]["train"] < 1
    assert set(r["reward"]) == {"concurrent", "serial"} and r["reward"]["concurrent"]["runs"] == 2
    assert {"device", "cpuCount", "torch", "threads"} <= set(r["machine"])
    assert r["config"]["steps"] == 4 and len(r["config"]["specs"]) == 2
    # The same seeds train the same problems: packed and alone agree (the isolation check).
    assert r["isolationCheck"]["noRegression"] is True
    assert plot.stat().st_size > 10_000
    assert r["command"].startswith("clora bench throughput --experiments 2")
    page = render(tmp_path, tmp_path / "benchmarks.md")
    assert f"**{r['ratio']:.2f}x**" in page and f"{r['batchingLimit']:.2f}x" in page


@pytest.mark.slow
def test_bench_rewards_pairs_clora_and_trl_runs_over_seeds(tmp_path: Path) -> None:
    plot = tmp_path / "rewards.png"
    r = _bench(
        tmp_path,
        "rewards",
        "--experiments",
        "2",
        "--seeds",
        "2",
        "--steps",
        "2",
        "--jobs",
        "2",
        "--plot",
        str(plot),
    )
    assert r["failed"] == {}
    assert (
        sorted(r["curves"]["clora"])
        == sorted(r["curves"]["trl"])
        == [
            "r0/bench/exp-00",
            "r0/bench/exp-01",
            "r1/bench/exp-00",
            "r1/bench/exp-01",
        ]
    )
    for band in r["reward"].values():
        assert band["runs"] == 4 and len(band["perStepMean"]) == 2
    assert r["cloraMinusTrl"]["pairs"] == 4
    assert r["config"]["seeds"] == [[1000, 1001], [1002, 1003]]
    assert len(r["vsTrl"]["perReplicate"]) == 2 and r["vsTrl"]["mean"] > 0
    assert plot.stat().st_size > 10_000
    page = render(tmp_path, tmp_path / "benchmarks.md")
    assert f"{r['cloraMinusTrl']['difference']:+.3f}" in page


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_with_the_tiny_model(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu-check.sh"
    proc = subprocess.run(
        ["bash", str(script), "--model", "tiny", "--device", "cpu", "--out", str(tmp_path)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu-check.json").read_text())
    (model,) = r["models"]
    assert [run["experiments"] for run in model["runs"]] == [1, 8]
    for run in model["runs"]:
        assert run["tickSeconds"] > 0 and run["peakMemoryMB"] > 0
        assert 0 < run["mfu"]["sample"] < 1 and 0 < run["mfu"]["train"] < 1
    iso = model["isolation"]
    assert iso["trainedWeightsRelative"] <= 1e-3
    assert iso["otherSeedTrainedWeightsRelative"] >= 100 * iso["trainedWeightsRelative"]
    assert "| tiny | 8 |" in (tmp_path / "gpu-check.md").read_text()


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
