"""Join points: an experiment added while a tick runs takes its first step inside that tick, computes
exactly what it computes alone, leaves the running experiments' numbers untouched, and waits for the
next tick when the tick's sampling budget has no room for it."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from clora_runtime.engine import Engine, TickReport
from clora_runtime.tasks import rewards as rewards_module
from clora_runtime.training import trainer as trainer_module


def varied_reward(text: str, answer: str) -> float:
    return (sum(map(ord, text)) % 5) / 4  # spread on an untrained model, so advantages are non-zero


@pytest.fixture(autouse=True)
def _varied_rewards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(rewards_module.REWARDS, "exact-match", varied_reward)


def busy_spec(spec_factory: Any) -> Any:
    # Long enough that the newcomer is recorded while its sampling runs (hundreds of decode steps).
    return spec_factory(
        training={"steps": 2, "promptsPerStep": 4, "groupSize": 8, "maxNewTokens": 160, "seed": 3}
    )


def newcomer_spec(spec_factory: Any) -> Any:
    return spec_factory(lora={"rank": 8}, training={"steps": 2, "seed": 11, "learningRate": 3e-3})


def join_while_sampling(engine: Engine, newcomer: Any) -> TickReport:
    """Run one tick on a thread; add ns/new from this thread as soon as the tick is sampling."""
    out: list[TickReport | None] = []
    thread = threading.Thread(target=lambda: out.append(engine.tick()))
    thread.start()
    deadline = time.monotonic() + 60
    while engine.state("ns", "busy").phase != "Running":  # Running: admitted, its step under way
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.001)
    engine.upsert("ns", "new", newcomer)
    thread.join(120)
    assert out and out[0] is not None
    return out[0]


def join_while_training(engine: Engine, newcomer: Any) -> TickReport:
    """Run one tick; add ns/new when its training phase begins (it joins at a layer's forward)."""
    assert engine.trainer is not None
    real = engine.trainer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        engine.trainer.step = real  # type: ignore[method-assign]
        engine.upsert("ns", "new", newcomer)
        return real(*args, **kwargs)

    engine.trainer.step = step  # type: ignore[method-assign]
    report = engine.tick()
    assert report is not None
    return report


def join_during_backward(engine: Engine, newcomer: Any) -> TickReport:
    """Run one tick; add ns/new after the forward of its only training micro-batch: the sole join
    points left in the tick are the layers' backward hooks."""
    real = trainer_module.token_losses
    added: list[bool] = []

    def token_losses(*args: Any, **kwargs: Any) -> Any:
        if not added:
            added.append(True)
            engine.upsert("ns", "new", newcomer)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "token_losses", token_losses)
        report = engine.tick()
    assert report is not None and added
    return report


def weights(engine: Engine, key: str) -> dict[str, torch.Tensor]:
    return engine.bank.peft_state_dict(key)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("join", "micro_batch_tokens"),
    [(join_while_sampling, 256), (join_while_training, 256), (join_during_backward, 65536)],
)
def test_newcomer_steps_inside_the_running_tick(
    tiny_engine: Any, spec_factory: Any, join: Any, micro_batch_tokens: int
) -> None:
    config = {"max_adapters": 4, "max_rank": 8, "micro_batch_tokens": micro_batch_tokens}
    engine = tiny_engine(**config)
    engine.upsert("ns", "busy", busy_spec(spec_factory))
    report = join(engine, newcomer_spec(spec_factory))
    assert sorted(report.stepped) == ["ns/busy", "ns/new"] and report.joined == ["ns/new"]
    assert engine.state("ns", "new").step == 1 and engine.state("ns", "busy").step == 1
    assert set(report.rewards) == {"ns/busy", "ns/new"} and not report.failed
    joined_new, joined_busy = weights(engine, "ns/new"), weights(engine, "ns/busy")
    assert any(float(t.abs().sum()) > 0 for k, t in joined_new.items() if "lora_B" in k)

    alone_new = tiny_engine(**config, checkpoint_dir=engine.config.checkpoint_dir / "a")
    alone_new.upsert("ns", "new", newcomer_spec(spec_factory))
    alone_new.tick()
    assert_same(joined_new, weights(alone_new, "ns/new"))

    alone_busy = tiny_engine(**config, checkpoint_dir=engine.config.checkpoint_dir / "b")
    alone_busy.upsert("ns", "busy", busy_spec(spec_factory))
    alone_busy.tick()
    assert_same(joined_busy, weights(alone_busy, "ns/busy"))

    # From then on the newcomer is packed with the others, in one batch.
    nxt = engine.tick()
    assert nxt is not None and sorted(nxt.stepped) == ["ns/busy", "ns/new"] and nxt.joined == []
    assert engine.state("ns", "new").phase == "Succeeded"


def test_newcomer_waits_when_the_tick_budget_is_spent(tiny_engine: Any, spec_factory: Any) -> None:
    busy = busy_spec(spec_factory)
    engine = tiny_engine(max_adapters=4, max_rank=8, tokens_per_tick=busy.tokens_per_tick())
    engine.upsert("ns", "busy", busy)
    report = join_while_sampling(engine, newcomer_spec(spec_factory))
    assert report.stepped == ["ns/busy"]
    # Admitted at the join point (slot taken, Running), its first step in the next tick.
    assert engine.state("ns", "new").phase == "Running" and engine.state("ns", "new").step == 0
    nxt = engine.tick()
    assert nxt is not None and "ns/new" in nxt.stepped


def test_newcomer_between_ticks_steps_first_and_alone(tiny_engine: Any, spec_factory: Any) -> None:
    engine = tiny_engine(max_adapters=4, max_rank=8)
    engine.upsert("ns", "busy", busy_spec(spec_factory))
    engine.upsert("ns", "other", newcomer_spec(spec_factory))
    first = engine.tick()
    assert first is not None and first.joined == []  # all new at once: packed together
    engine.upsert("ns", "new", newcomer_spec(spec_factory))
    report = engine.tick()
    assert report is not None and report.joined == ["ns/new"]
    assert sorted(report.stepped) == ["ns/busy", "ns/new", "ns/other"]
