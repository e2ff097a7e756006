"""The RL core on the tiny model (the RL-core issue): log-probs at the sampling temperature, clipping
that acts, ticks that work on a snapshot, pushed samples trained exactly once, PUT and DELETE that
never wait for a tick, one tenant's fault failing it alone, and rollouts a user can inspect.

Ticks are held mid-sampling with the engine's fault hook (a test hook called before each sampling
call and training micro-batch), so that "while a tick runs" is a certainty, not a race."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from clora.api.runtime_api import Sample
from clora_runtime.engine import Engine, ExperimentConflict, ExperimentNotFound, TickReport
from clora_runtime.sampling.base import SampleRequest
from clora_runtime.tasks import build_task
from clora_runtime.tasks import rewards as rewards_module
from clora_runtime.training.grpo import group_advantages
from clora_runtime.training.trainer import TrainRow


def varied_reward(text: str, answer: str) -> float:
    return (sum(map(ord, text)) % 5) / 4  # spread on an untrained model, so advantages are non-zero


@pytest.fixture(autouse=True)
def _varied_rewards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(rewards_module.REWARDS, "exact-match", varied_reward)


def give_weight(engine: Engine, key: str, seed: int = 1) -> None:
    """B starts at zero (the adapter a no-op): give it weight so that the adapter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in engine.bank.adapters[key].b.values():
            b.normal_(0, 0.3, generator=gen)


class HeldTick:
    """Runs one engine.tick() on a thread and holds it inside its sampling until released."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.inside = threading.Event()
        self.release = threading.Event()
        self.report: TickReport | None = None
        self.error: BaseException | None = None
        self._armed = True
        engine.fault_hook = self._hook
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _hook(self, phase: str, keys: list[str]) -> None:
        if phase == "sample" and self._armed:
            self._armed = False
            self.inside.set()
            assert self.release.wait(60), "the test never released the tick"

    def _run(self) -> None:
        try:
            self.report = self.engine.tick()
        except BaseException as err:  # surfaced by join()
            self.error = err

    def __enter__(self) -> HeldTick:
        self._thread.start()
        assert self.inside.wait(60), "the tick never reached sampling"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._thread.join(60)
        self.engine.fault_hook = None
        if self.error is not None and exc[0] is None:
            raise self.error


def timed(call: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = call()
    return value, time.perf_counter() - started


# ---- item 1: log-probs at the sampling temperature ---------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.5])
def test_trainer_logprobs_are_the_samplers_at_the_sampling_temperature(
    tiny_engine: Any, spec_factory: Any, temperature: float
) -> None:
    engine = tiny_engine()
    engine.upsert("ns", "a", spec_factory())
    give_weight(engine, "ns/a")
    prompts = [[1, 520, 33, 34, 27], [1, 44, 45], [1, 2, 3, 4, 5, 6, 7]]
    requests = [SampleRequest("ns/a", p, 10, temperature, seed) for p in prompts for seed in (1, 2)]
    completions = engine.sampler.generate(requests)
    rows = [
        TrainRow("ns/a", r.prompt_ids, c.token_ids, 0.0, 1.0, temperature)
        for r, c in zip(requests, completions, strict=True)
    ]
    slots = {"ns/a": engine.bank.adapters["ns/a"].slot}
    trainer = engine.trainer.token_logprobs(rows, slots)
    at_one = engine.trainer.token_logprobs([_at(r, 1.0) for r in rows], slots)
    for c, mine, raw in zip(completions, trainer, at_one, strict=True):
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == mine.shape[0]
        torch.testing.assert_close(mine, torch.tensor(c.logprobs), atol=1e-5, rtol=0)
        assert (mine - raw).abs().max() > 1e-3  # temperature 1 would be another policy


def _at(row: TrainRow, temperature: float) -> TrainRow:
    return TrainRow(row.key, row.prompt_ids, row.completion_ids, row.advantage, row.token_weight, temperature)


# ---- item 2: advantages per loss type, clipping that acts -----------------------------------------------


def test_advantage_scaling_per_loss_type() -> None:
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    scaled = centred / (rewards.std(dim=1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, "grpo"), scaled)
    torch.testing.assert_close(group_advantages(rewards, "dapo"), scaled)  # DAPO keeps the std scaling
    torch.testing.assert_close(group_advantages(rewards, "dr_grpo"), centred)


def test_clipping_acts_from_the_second_update(tiny_engine: Any, spec_factory: Any) -> None:
    engine = tiny_engine()
    training = {"learningRate": 0.05, "clipEpsilon": 0.01, "clipEpsilonHigh": 0.02, "groupSize": 4}
    engine.upsert("ns", "one", spec_factory(training={**training, "updatesPerBatch": 1}))
    engine.upsert("ns", "two", spec_factory(training={**training, "updatesPerBatch": 3}))
    report = engine.tick()
    assert report is not None and sorted(report.stepped) == ["ns/one", "ns/two"]
    one, two = engine.state("ns", "one").stats, engine.state("ns", "two").stats
    assert one.clip_fraction == 0  # the first update's ratio is exactly 1
    assert two.clip_fraction is not None and two.clip_fraction > 0
    assert engine.state("ns", "two").step == 1  # one step, three optimizer updates


# ---- item 4: a tick works on the spec it started with -------------------------------------------------


def test_a_put_during_sampling_applies_from_the_next_tick(
    tiny_engine: Any, spec_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []

    def recording(text: str, answer: str) -> float:
        seen.append(answer)
        return varied_reward(text, answer)

    monkeypatch.setitem(rewards_module.REWARDS, "exact-match", recording)
    engine = tiny_engine()
    old = spec_factory(training={"steps": 5, "promptsPerStep": 2, "groupSize": 4})
    new = spec_factory(training={"steps": 5, "promptsPerStep": 3, "groupSize": 2})
    engine.upsert("ns", "x", old)
    with HeldTick(engine) as held:
        engine.upsert("ns", "x", new)  # lands between sampling and scoring
    first = held.report
    assert first is not None and len(first.completions["ns/x"]) == 2 * 4
    second = engine.tick()
    assert second is not None and len(second.completions["ns/x"]) == 3 * 2
    # no completion was scored against another prompt's answer
    task = build_task(old.task, old.training.seed)
    for report, step, (prompts, group) in ((first, 0, (2, 4)), (second, 1, (3, 2))):
        problems = task.problems(step, prompts)
        rollouts = report.rollouts["ns/x"]
        assert [r.prompt for r in rollouts] == [p.prompt for p in problems for _ in range(group)]
    want = [p.answer for p in task.problems(0, 2) for _ in range(4)]
    want += [p.answer for p in task.problems(1, 3) for _ in range(2)]
    assert seen == want


# ---- item 5: pushed samples trained exactly once --------------------------------------------------------


def test_pushed_samples_are_trained_exactly_once_in_order_across_a_restart(
    tiny_engine: Any, spec_factory: Any, tmp_path: Path
) -> None:
    spec = spec_factory(training={"steps": None, "promptsPerStep": 3, "groupSize": 2})
    ckpt = tmp_path / "ckpt"
    engine = tiny_engine(checkpoint_dir=ckpt)
    engine.upsert("ns", "live", spec)
    pushed = [f"What is {i} + 1?" for i in range(40)]
    trained: list[str] = []

    def record(report: TickReport | None) -> None:
        if report is not None:
            trained.extend(r.prompt for r in report.rollouts.get("ns/live", [])[::2])  # one per group

    def pusher(items: list[str]) -> None:
        for prompt in items:
            engine.push_samples("ns", "live", [Sample(prompt=prompt, answer="1")])
            time.sleep(0.002)

    # pushes land while ticks run (and between them)
    thread = threading.Thread(target=pusher, args=(pushed[:25],))
    thread.start()
    while thread.is_alive():
        record(engine.tick())
    thread.join()
    record(engine.tick())  # at most part of what is left
    assert trained == pushed[: len(trained)] and len(trained) < 25

    # a new process on the same folder, resuming the run from its checkpoint (a queue belongs to
    # its run: issue 17, item 6), trains what was left, and nothing twice
    engine.checkpoint_all()
    resume = engine.state("ns", "live").last_checkpoint.path
    engine = tiny_engine(checkpoint_dir=ckpt)
    engine.upsert("ns", "live", spec, resume_from=resume)
    thread = threading.Thread(target=pusher, args=(pushed[25:],))
    thread.start()
    while thread.is_alive():
        record(engine.tick())
    thread.join()
    while (report := engine.tick()) is not None:
        record(report)
    assert trained == pushed


# ---- items 6 and 7: PUT and DELETE never wait for a tick -------------------------------------------------


def test_put_and_delete_answer_while_a_tick_runs_and_lose_no_checkpoint(
    tiny_engine: Any, spec_factory: Any
) -> None:
    engine = tiny_engine(max_adapters=3)
    long = {"steps": 50}
    engine.upsert("ns", "veteran", spec_factory(training=long))
    engine.upsert("ns", "leaving", spec_factory(training=long))
    assert engine.tick() is not None  # both have stepped once
    with HeldTick(engine) as held:
        answer, seconds = timed(lambda: engine.remove("ns", "leaving"))
        assert seconds < 1.0 and answer.removed is False  # 202: the running tick holds it
        assert engine.state("ns", "leaving").phase == "Removing"
        assert engine.remove("ns", "leaving").removed is False  # asked again: still Removing
        state, seconds = timed(lambda: engine.upsert("ns", "newcomer", spec_factory(training=long)))
        assert seconds < 1.0 and state.phase == "Running" and "ns/newcomer" in engine.bank.adapters
        assert engine.free_slots == 0  # the leaving one keeps its slot until its tick ends
        with pytest.raises(ExperimentConflict, match="being removed"):
            engine.upsert("ns", "leaving", spec_factory(training={"steps": 60}))
    report = held.report
    assert report is not None
    # the held tick trained what it started with: the newcomer waits for the next tick
    assert sorted(report.stepped) == ["ns/leaving", "ns/veteran"]
    with pytest.raises(ExperimentNotFound):
        engine.state("ns", "leaving")  # gone at the tick's end, its final checkpoint written
    final = engine.remove("ns", "leaving")
    assert final.removed and final.checkpoint is not None and final.checkpoint.step == 2
    assert (Path(final.checkpoint.path) / "adapter_model.safetensors").is_file()
    assert [(r.name, r.checkpoint) for r in engine.removed()] == [("leaving", final.checkpoint)]
    nxt = engine.tick()
    assert nxt is not None and "ns/newcomer" in nxt.stepped
    # not held by a tick: removed at once, checkpoint in the answer
    answer = engine.remove("ns", "newcomer")
    assert answer.removed and answer.checkpoint is not None and answer.checkpoint.step == 1


# ---- item 8: one tenant can never take the runtime down --------------------------------------------------


@pytest.mark.parametrize("phase", ["sample", "train"])
def test_an_out_of_memory_in_one_experiments_rows_fails_it_alone(
    tiny_engine: Any, spec_factory: Any, phase: str
) -> None:
    engine = tiny_engine()
    engine.upsert("ns", "good", spec_factory())
    engine.upsert("ns", "greedy", spec_factory(training={"seed": 5}))
    engine.upsert("ns", "other", spec_factory(training={"seed": 6}))

    def oom(where: str, keys: list[str]) -> None:
        if where == phase and "ns/greedy" in keys:
            raise torch.OutOfMemoryError("CUDA out of memory (injected for ns/greedy's rows)")

    engine.fault_hook = oom
    report = engine.tick()  # does not raise
    assert report is not None and sorted(report.stepped) == ["ns/good", "ns/other"]
    greedy = engine.state("ns", "greedy")
    assert greedy.phase == "Failed" and "OutOfMemoryError" in greedy.message and greedy.step == 0
    assert all(float(b.abs().max()) == 0 for b in engine.bank.adapters["ns/greedy"].b.values())
    for _ in range(2):
        assert engine.tick() is not None
    assert engine.state("ns", "good").phase == "Succeeded"
    assert engine.state("ns", "other").phase == "Succeeded"


def test_a_fault_of_the_base_model_still_fails_the_tick(
    tiny_engine: Any, spec_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = tiny_engine()
    engine.upsert("ns", "a", spec_factory())
    engine.upsert("ns", "b", spec_factory(training={"seed": 2}))

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the base model is broken")

    monkeypatch.setattr(engine.base.model.get_decoder(), "forward", broken)
    monkeypatch.setattr(engine.base.model, "forward", broken)
    with pytest.raises(RuntimeError, match="base model is broken"):
        engine.tick()


def test_a_row_that_cannot_fit_a_micro_batch_is_refused_at_admission(
    tiny_engine: Any, spec_factory: Any
) -> None:
    engine = tiny_engine(micro_batch_tokens=256)
    with pytest.raises(ExperimentConflict, match="maxNewTokens"):
        engine.upsert("ns", "huge", spec_factory(training={"maxNewTokens": 300}))
    engine.upsert("ns", "fits", spec_factory(training={"maxNewTokens": 100}))
    with pytest.raises(ExperimentConflict, match="micro-batch"):  # a PUT that grows the row too
        engine.upsert("ns", "fits", spec_factory(training={"maxNewTokens": 300}))


# ---- item 9: rollouts --------------------------------------------------------------------------------------


def test_rollouts_record_each_completion_with_both_log_probs(tiny_engine: Any, spec_factory: Any) -> None:
    engine = tiny_engine(rollout_steps=2)
    spec = spec_factory(training={"steps": 4, "temperature": 0.7})
    engine.upsert("ns", "r", spec)
    for _ in range(4):
        engine.tick()
    kept = engine.rollouts("ns", "r")
    assert kept.steps == [2, 3]  # bounded: the last rollout_steps steps
    assert len(kept.rollouts) == 2 * 4 and {r.step for r in kept.rollouts} == {3}
    step2 = engine.rollouts("ns", "r", step=2).rollouts
    assert {r.step for r in step2} == {2}
    with pytest.raises(ExperimentNotFound, match="not kept"):
        engine.rollouts("ns", "r", step=0)
    for r in step2:
        assert r.tokens > 0 and r.completion is not None and r.prompt.startswith("What is")
        assert r.sampler_logprob is not None and r.trainer_logprob is not None
        assert abs(r.sampler_logprob - r.trainer_logprob) < 1e-4
    rewards = torch.tensor([[r.reward for r in step2[i : i + 4]] for i in (0, 4)])
    want = group_advantages(rewards, spec.training.loss_type).flatten().tolist()
    assert [r.advantage for r in step2] == pytest.approx(want)
