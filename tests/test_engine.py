"""The Engine contract on the tiny model: desired state, ticks, failures isolated, rows independent."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from clora.api.runtime_api import Sample
from clora_runtime.engine import Engine, ExperimentConflict, ExperimentNotFound
from clora_runtime.sampling.base import SampleRequest
from clora_runtime.tasks import rewards as rewards_module
from clora_runtime.tasks.gsm8k import Gsm8kTask


def varied_reward(text: str, answer: str) -> float:
    """A deterministic reward with spread on the untrained tiny model, so that advantages are non-zero."""
    return (sum(map(ord, text)) % 5) / 4


def run_until_idle(engine: Engine, limit: int = 20) -> int:
    ticks = 0
    while engine.tick() is not None:
        ticks += 1
        assert ticks < limit
    return ticks


def test_contract_lifecycle(tiny_engine: Any, spec_factory: Any) -> None:
    engine = tiny_engine(max_adapters=2, max_rank=8)
    assert engine.ready and engine.free_slots == 2
    state = engine.upsert("ns", "a", spec_factory(checkpoint={"everySteps": 2, "keep": 1}))
    assert state.phase == "Running" and state.total_steps == 3  # admitted at once
    assert engine.upsert("ns", "a", spec_factory(checkpoint={"everySteps": 2, "keep": 1})).phase == "Running"
    assert engine.free_slots == 1
    with pytest.raises(ExperimentConflict, match=r"spec\.lora"):
        engine.upsert("ns", "a", spec_factory(lora={"rank": 2}))
    with pytest.raises(ExperimentConflict, match="maxRank"):
        engine.upsert("ns", "big", spec_factory(lora={"rank": 16}))
    with pytest.raises(ValueError, match=r"spec\.task\.dataset\.path"):
        engine.upsert(
            "ns", "g", spec_factory(task={"name": "gsm8k", "dataset": {"path": "/nonexistent.jsonl"}})
        )
    engine.upsert("ns", "b", spec_factory(training={"steps": 1}))
    with pytest.raises(ExperimentConflict, match="slots"):
        engine.upsert("ns", "c", spec_factory())
    with pytest.raises(ExperimentNotFound):
        engine.state("ns", "nope")

    report = engine.tick()
    assert report is not None and sorted(report.stepped) == ["ns/a", "ns/b"]
    assert set(report.seconds) == {"sample", "reward", "train", "sync"}
    assert report.tokens_sampled > 0 and report.tokens_trained == report.tokens_sampled
    assert engine.state("ns", "b").phase == "Succeeded"
    run_until_idle(engine)
    a = engine.state("ns", "a")
    assert (a.phase, a.step) == ("Succeeded", 3)
    assert a.last_checkpoint is not None and a.last_checkpoint.step == 3
    folder = Path(a.last_checkpoint.path)
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "state.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert len(list(folder.parent.glob("step-*"))) == 1  # keep: 1
    assert json.loads((folder / "state.json").read_text())["step"] == 3
    assert a.reward.mean is not None and a.reward.window is not None

    metrics = engine.metrics.registry
    assert metrics.get_sample_value("clora_experiment_step", {"namespace": "ns", "name": "a"}) == 3
    ref = engine.remove("ns", "a").checkpoint
    assert ref is not None and ref.step == 3
    assert engine.free_slots == 1
    assert metrics.get_sample_value("clora_experiment_step", {"namespace": "ns", "name": "a"}) is None
    assert metrics.get_sample_value("clora_tick_duration_seconds_count", {"phase": "train"}) == 3
    with pytest.raises(ExperimentNotFound):
        engine.state("ns", "a")
    assert engine.remove("ns", "a").checkpoint == ref  # a repeated DELETE answers the same checkpoint
    with pytest.raises(ExperimentNotFound):
        engine.remove("ns", "never")


def test_suspend_frees_the_slot_and_resumes_at_the_same_step(tiny_engine: Any, spec_factory: Any) -> None:
    engine = tiny_engine(max_adapters=1)
    engine.upsert("ns", "a", spec_factory(training={"steps": 4}))
    engine.tick()
    engine.upsert("ns", "a", spec_factory(training={"steps": 4}, suspend=True))
    assert engine.tick() is None
    state = engine.state("ns", "a")
    assert (state.phase, state.step, state.last_checkpoint.step) == ("Suspended", 1, 1)
    assert engine.free_slots == 1 and engine.bank.free_slots == 1
    engine.upsert("ns", "a", spec_factory(training={"steps": 4, "learningRate": 5e-4}))
    engine.tick()
    state = engine.state("ns", "a")
    assert (state.phase, state.step) == ("Running", 2)
    assert engine.bank.adapters["ns/a"].optimizer.param_groups[0]["lr"] == 5e-4


def test_continual_experiment_trains_on_pushed_samples_and_keeps_its_queue(
    tiny_engine: Any, spec_factory: Any, tmp_path: Path
) -> None:
    spec = spec_factory(training={"steps": None, "promptsPerStep": 2})
    engine = tiny_engine(checkpoint_dir=tmp_path / "ckpt")
    engine.upsert("ns", "live", spec)
    assert engine.tick() is None  # nothing queued: a continual experiment waits
    assert (
        engine.push_samples(
            "ns", "live", [Sample(prompt=f"What is {i} + 1?", answer=str(i + 1)) for i in range(3)]
        )
        == 3
    )
    assert engine.tick() is not None
    assert engine.tick() is not None  # the last queued sample alone
    assert engine.tick() is None
    assert engine.state("ns", "live").step == 2
    assert engine.push_samples("ns", "live", [Sample(prompt="What is 9 + 1?", answer="10")]) == 1
    with pytest.raises(ExperimentNotFound):
        engine.push_samples("ns", "other", [Sample(prompt="x")])
    # A new process on the same checkpoint folder, resuming the run from its checkpoint, finds what
    # was pushed and not yet trained on.
    engine.checkpoint_all()
    ref = engine.state("ns", "live").last_checkpoint
    restarted = tiny_engine(checkpoint_dir=tmp_path / "ckpt")
    restarted.upsert("ns", "live", spec, resume_from=ref.path)
    assert restarted.push_samples("ns", "live", [Sample(prompt="What is 2 + 2?", answer="4")]) == 2


def test_failures_stay_with_their_experiment(
    tiny_engine: Any, spec_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def raising_reward(text: str, answer: str) -> float:
        raise RuntimeError("reward exploded")

    def raising_problems(self: Gsm8kTask, step: int, count: int) -> list[Any]:
        raise OSError("dataset vanished")

    monkeypatch.setitem(rewards_module.REWARDS, "numeric", raising_reward)
    monkeypatch.setitem(rewards_module.REWARDS, "format-and-exact", lambda text, answer: math.nan)
    monkeypatch.setitem(rewards_module.REWARDS, "exact-match", varied_reward)
    monkeypatch.setattr(Gsm8kTask, "problems", raising_problems)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    engine = tiny_engine()
    engine.upsert("ns", "good", spec_factory())
    engine.upsert("ns", "bad-reward", spec_factory(task={"reward": "numeric"}))
    engine.upsert("ns", "nan-loss", spec_factory(task={"reward": "format-and-exact"}))
    engine.upsert("ns", "bad-task", spec_factory(task={"name": "gsm8k", "dataset": {"path": str(data)}}))
    report = engine.tick()
    assert report is not None and report.stepped == ["ns/good"]
    states = {s.name: s for s in engine.states()}
    assert states["good"].phase == "Running" and states["good"].step == 1
    assert states["bad-reward"].phase == "Failed" and "reward exploded" in states["bad-reward"].message
    assert states["nan-loss"].phase == "Failed" and "non-finite loss" in states["nan-loss"].message
    assert states["bad-task"].phase == "Failed" and "dataset vanished" in states["bad-task"].message
    for name in ("bad-reward", "nan-loss", "bad-task"):
        assert states[name].step == 0
    run_until_idle(engine)
    assert engine.state("ns", "good").phase == "Succeeded"
    b = engine.bank.adapters["ns/good"].b
    assert any(float(t.abs().max()) > 0 for t in b.values())  # it learned
    nan_b = engine.bank.adapters["ns/nan-loss"].b
    assert all(float(t.abs().max()) == 0 for t in nan_b.values())  # never stepped


def test_rows_do_not_depend_on_their_neighbours(tiny_engine: Any, spec_factory: Any) -> None:
    engine = tiny_engine()
    engine.upsert("ns", "a", spec_factory(lora={"rank": 4}))
    engine.upsert("ns", "b", spec_factory(lora={"rank": 8}, training={"seed": 3}))
    engine.tick()  # admits both and moves their B off zero
    sampler = engine.sampler
    row = SampleRequest("ns/a", [1, 520, 33, 34, 27], max_new_tokens=12, temperature=0.8, seed=11)
    alone = sampler.generate([row])[0]
    packed = sampler.generate(
        [
            SampleRequest("ns/b", [1, 2, 3, 4, 5, 6, 7, 8, 9], 5, 1.0, 1),
            row,
            SampleRequest("ns/a", [1, 44], 20, 1.0, 2),
            SampleRequest("ns/b", [1, 520, 33, 34, 27], 12, 0.8, 11),
        ]
    )
    assert (packed[1].token_ids, packed[1].finished) == (alone.token_ids, alone.finished)
    # padding beside other rows changes a row's numbers by rounding only
    torch.testing.assert_close(
        torch.tensor(packed[1].logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0
    )
    assert len(alone.token_ids) == 12 and not alone.finished


def test_low_temperature_sampling_follows_the_full_forward(tiny_engine: Any, spec_factory: Any) -> None:
    from clora_runtime.lora.layers import BatchPlan

    engine = tiny_engine()
    engine.upsert("ns", "a", spec_factory())
    engine.tick()
    prompt = [1, 520, 33, 34, 27, 1000]
    got = engine.sampler.generate([SampleRequest("ns/a", prompt, 8, 1e-4, 0)])[0].token_ids
    ids = list(prompt)
    slot = engine.bank.adapters["ns/a"].slot
    with torch.no_grad(), engine.bank.plan(BatchPlan.from_slots([slot])):
        for _ in range(8):
            ids.append(int(engine.bank.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[len(prompt) :]


def test_training_logprobs_equal_a_plain_forward_of_each_row(tiny_engine: Any, spec_factory: Any) -> None:
    """The trainer runs each group's prompt once and its completions on the shared cache, rows of
    several adapters padded together; each row must get what a forward of it alone gives."""
    from clora_runtime.lora.layers import BatchPlan
    from clora_runtime.training.trainer import TrainRow, _Prepared

    engine = tiny_engine()
    engine.upsert("ns", "a", spec_factory(lora={"rank": 4}))
    engine.upsert("ns", "b", spec_factory(lora={"rank": 8}, training={"seed": 3}))
    engine.tick()
    with torch.no_grad():  # B starts at zero: give it weight so the adapters matter
        for key in ("ns/a", "ns/b"):
            for b in engine.bank.adapters[key].b.values():
                b.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    rows = [
        TrainRow("ns/a", [1, 5, 9], [7, 8, 2], 0.0, 1.0),
        TrainRow("ns/a", [1, 5, 9], [4], 0.0, 1.0),
        TrainRow("ns/a", [1, 2, 3, 4, 5, 6], [11, 12], 0.0, 1.0),
        TrainRow("ns/b", [1, 5, 9], [7, 8, 2, 6, 6], 0.0, 1.0),
    ]
    slots = [engine.bank.adapters[r.key].slot for r in rows]
    prepared = _Prepared.build(rows, slots, torch.device("cpu"))
    with torch.no_grad():
        got, _ = prepared.token_logprobs(engine.bank, adapters_on=True)
        base, _ = prepared.token_logprobs(engine.bank, adapters_on=False)
        want, want_base = [], []
        for row, slot in zip(rows, slots, strict=True):
            ids = torch.tensor([row.prompt_ids + row.completion_ids])
            n = len(row.prompt_ids)
            for s, out in ((slot, want), (-1, want_base)):
                with engine.bank.plan(BatchPlan.from_slots([s])):
                    logits = engine.bank.model(input_ids=ids).logits[0, n - 1 : -1].log_softmax(-1)
                out.append(logits.gather(1, torch.tensor(row.completion_ids).unsqueeze(1)).squeeze(1))
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base, torch.cat(want_base), rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-4
