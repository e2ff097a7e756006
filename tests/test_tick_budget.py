"""The tick's budget and fairness (issue 17, items 2, 3 and 5) on the engine with the tiny model.

Prompt tokens count in tokensPerTick; a step whose rows do not fit one tick (the budget, an
experiment's share of it while others wait, maxTickNewTokens) goes on in the next ticks and samples
exactly what it would have in one; a prompt too long for the runtime is skipped for its experiment
alone, and stays consumed after a restart; pushed samples and held experiments are bounded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from clora.api.runtime_api import Sample

# About 600 tokens of system prompt on the tiny model's tokenizer: 4 rows cost far more than 1500.
LONG_SYSTEM = "Answer with the number only. " * 100


def completions_of(engine: Any, key: str, max_ticks: int = 40) -> tuple[list[Any], list[Any]]:
    """Tick until `key` takes its first step: (the reports, its first step's rollouts)."""
    reports = []
    for _ in range(max_ticks):
        report = engine.tick()
        assert report is not None and not report.failed, report and report.failed
        reports.append(report)
        if key in report.stepped:
            return reports, report.rollouts[key]
    raise AssertionError(f"{key} did not step in {max_ticks} ticks")


def test_prompt_tokens_count_in_the_tick_budget(tiny_engine: Any, spec_factory: Any, tmp_path: Path) -> None:
    spec = spec_factory(
        task={"systemPrompt": LONG_SYSTEM}, training={"promptsPerStep": 2, "groupSize": 2, "maxNewTokens": 4}
    )
    # 16 generated tokens a step: the old budget (generation only) fitted it in one tick many times.
    assert spec.tokens_per_tick() == 16
    small = tiny_engine(checkpoint_dir=tmp_path / "small", tokens_per_tick=1500)
    small.upsert("ns", "a", spec)
    reports, split = completions_of(small, "ns/a")
    assert len(reports) > 1, "the step's prompts (about 2500 tokens) were not counted"
    for report in reports:
        assert report.tick_tokens["ns/a"] <= 1500
        assert report.tick_tokens["ns/a"] > 16 * len(report.tick_tokens)  # prompts counted
    assert "ns/a" in reports[0].sampling

    # Split over ticks, the step samples what it samples in one tick, row for row.
    whole = tiny_engine(checkpoint_dir=tmp_path / "whole", tokens_per_tick=100_000)
    whole.upsert("ns", "a", spec)
    reports, at_once = completions_of(whole, "ns/a")
    assert len(reports) == 1
    assert [r.completion for r in split] == [r.completion for r in at_once]
    assert [r.sampler_logprob for r in split] == pytest.approx([r.sampler_logprob for r in at_once])


def test_a_long_generation_does_not_starve_its_neighbour(
    tiny_engine: Any, spec_factory: Any, tmp_path: Path
) -> None:
    """maxNewTokens 48 against maxTickNewTokens 8: the big experiment's step spans ticks, and its
    neighbour steps in every tick meanwhile; no tick decodes more than 8 tokens."""
    big = spec_factory(training={"steps": 2, "maxNewTokens": 48, "promptsPerStep": 4, "groupSize": 4})
    small = spec_factory(training={"steps": 100, "maxNewTokens": 4})
    config = {"tokens_per_tick": big.tokens_per_tick(), "max_tick_new_tokens": 8, "max_tick_share": 0.5}
    engine = tiny_engine(checkpoint_dir=tmp_path / "packed", **config)
    engine.upsert("ns", "big", big)
    engine.upsert("ns", "small", small)
    reports, packed = completions_of(engine, "ns/big")
    assert len(reports) >= 48 // 8  # its step took several ticks ...
    assert all("ns/small" in r.stepped for r in reports)  # ... and the neighbour stepped in each
    assert all(r.decode_steps <= 8 for r in reports)
    for report in reports:  # neither took more than its share while the other waited
        assert all(tokens <= config["tokens_per_tick"] // 2 for tokens in report.tick_tokens.values())
    assert max(r.tokens for r in packed) > 8  # completions still grow to maxNewTokens, in parts

    # Alone, it samples the same completions: the parts depend on maxTickNewTokens, not on neighbours.
    alone = tiny_engine(checkpoint_dir=tmp_path / "alone", **config)
    alone.upsert("ns", "big", big)
    _, by_itself = completions_of(alone, "ns/big")
    assert [r.completion for r in packed] == [r.completion for r in by_itself]


def test_a_poison_sample_is_skipped_for_its_experiment_alone_and_stays_consumed(
    tiny_engine: Any, spec_factory: Any, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    continual = spec_factory(
        training={"steps": None, "promptsPerStep": 2}, checkpoint={"everySteps": 1, "keep": 3}
    )
    clock = spec_factory(training={"steps": 1000})
    poison = Sample(prompt="hi " * 5000, answer="0")  # within the character bound, far above the tokens'
    good = [Sample(prompt=f"What is {i} + 1?", answer=str(i + 1)) for i in range(3)]

    engine = tiny_engine(checkpoint_dir=runs)
    engine.upsert("ns", "clock", clock)
    engine.upsert("ns", "learner", continual)
    engine.push_samples("ns", "learner", good[:2])
    report = engine.tick()
    assert report is not None and report.stepped == ["ns/clock", "ns/learner"]
    before_poison = engine.state("ns", "learner").last_checkpoint
    assert before_poison is not None and before_poison.step == 1
    engine.push_samples("ns", "learner", [poison, good[2]])
    for _ in range(2):
        report = engine.tick()
        assert report is not None and not report.failed and "ns/clock" in report.stepped
    learner = engine.state("ns", "learner")
    assert learner.phase == "Running" and learner.step == 2  # [good, good], then [poison, good]
    assert "skipped 1 prompt(s)" in learner.message and "pushed sample 2" in learner.message
    assert [r.prompt for r in engine.rollouts("ns", "learner", 1).rollouts] == [good[2].prompt] * 4
    after_poison = learner.last_checkpoint
    assert after_poison is not None and after_poison.step == 2

    # The queue is persisted. A runtime resuming from before the poison reads it again: skipped
    # again, for the learner alone, while the loop runs on.
    again = tiny_engine(checkpoint_dir=runs)
    again.upsert("ns", "clock", clock)
    again.upsert("ns", "learner", continual, resume_from=before_poison.path)
    report = again.tick()
    assert report is not None and report.stepped == ["ns/clock", "ns/learner"] and not report.failed
    assert [r.prompt for r in report.rollouts["ns/learner"]] == [good[2].prompt] * 4
    assert "skipped 1 prompt(s)" in again.state("ns", "learner").message

    # Resuming from after it, the poison stays consumed: nothing is left to train on.
    third = tiny_engine(checkpoint_dir=runs)
    third.upsert("ns", "clock", clock)
    third.upsert("ns", "learner", continual, resume_from=after_poison.path)
    for _ in range(2):
        report = third.tick()
        assert report is not None and report.stepped == ["ns/clock"] and not report.failed
    assert third.state("ns", "learner").step == 2


def test_a_queue_of_only_poison_is_consumed_without_a_step(
    tiny_engine: Any, spec_factory: Any, tmp_path: Path
) -> None:
    engine = tiny_engine(checkpoint_dir=tmp_path / "runs")
    engine.upsert("ns", "learner", spec_factory(training={"steps": None, "promptsPerStep": 2}))
    engine.push_samples("ns", "learner", [Sample(prompt="hi " * 5000)] * 3)
    assert engine.tick() is None and engine.tick() is None  # two then one consumed, nothing sampled
    assert engine.tick() is None
    state = engine.state("ns", "learner")
    assert state.phase == "Running" and "skipped 3 prompt(s)" in state.message
    (consumed,) = (tmp_path / "runs" / "ns" / "learner").glob("samples-*.consumed")  # this run's
    assert consumed.read_text() == "3"


def test_an_over_long_system_prompt_is_refused_naming_the_field(
    tiny_engine: Any, spec_factory: Any, tmp_path: Path
) -> None:
    engine = tiny_engine(max_prompt_tokens=256)
    with pytest.raises(
        ValueError, match=r"spec\.task\.systemPrompt: .* above this runtime's maxPromptTokens 256"
    ):
        engine.upsert("ns", "a", spec_factory(task={"systemPrompt": LONG_SYSTEM}))
    assert engine.states() == []


def test_the_waiting_queue_and_the_experiments_held_are_bounded(tiny_engine: Any, spec_factory: Any) -> None:
    from clora_runtime.engine import ExperimentConflict

    engine = tiny_engine(max_queued_samples=3, max_adapters=1, max_experiments=2)
    engine.upsert("ns", "a", spec_factory(training={"steps": None}))
    assert engine.push_samples("ns", "a", [Sample(prompt="1 + 1?", answer="2")] * 2) == 2
    with pytest.raises(ValueError, match=r"samples: ns/a has 2 pushed samples waiting; 2 more .* 3"):
        engine.push_samples("ns", "a", [Sample(prompt="1 + 1?", answer="2")] * 2)
    report = engine.tick()  # trains on the two (promptsPerStep 2): room again
    assert report is not None and report.stepped == ["ns/a"]
    assert engine.push_samples("ns", "a", [Sample(prompt="1 + 1?", answer="2")] * 3) == 3

    engine.upsert("ns", "s1", spec_factory(suspend=True))  # suspended: no slot, still a record
    with pytest.raises(ExperimentConflict, match="maxExperiments 2"):
        engine.upsert("ns", "s2", spec_factory(suspend=True))
