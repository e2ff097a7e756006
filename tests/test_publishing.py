"""spec.publish when serving is down: the runtime retries, says why in the experiment's state, and
training goes on to Succeeded (the vLLM target itself is tested against vllm serve in the vLLM suite)."""

from __future__ import annotations

import time
from typing import Any

from runtime_server import free_port

from clora_runtime import publishing


def test_a_server_that_is_down_fails_the_publish_not_the_training(
    tiny_engine: Any, spec_factory: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr(publishing, "BACKOFF_S", 0.05)  # the retries' waits, not their number
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    spec = spec_factory(training={"steps": 2}, checkpoint={"everySteps": 1})
    policy = publishing.PublishPolicy.model_validate({"vllm": {"url": url}})
    spec = spec.model_copy(update={"publish": policy})
    engine = tiny_engine()
    engine.upsert("ns", "x", spec)
    deadline = time.monotonic() + 120
    while engine.state("ns", "x").phase != "Succeeded" and time.monotonic() < deadline:
        engine.tick()
        time.sleep(0.02)
    state = engine.state("ns", "x")
    assert state.phase == "Succeeded" and state.step == 2  # training never waited on the server
    assert state.published is None
    assert state.publish_error.startswith(f"publishing step 2 to {url} failed:")


def test_publishing_prunes_only_copies_of_its_own_run(tmp_path: Any) -> None:
    """A phantom registration under the same name (another run) publishing its checkpoints never
    prunes the copies the real run's serving may still be loading."""
    from pathlib import Path

    from clora.api.experiment_types import CheckpointRef

    folder = Path(tmp_path) / "ns" / "x"
    policy = publishing.PublishPolicy.model_validate({"aibrix": {"podSelector": {"app": "serving"}}})
    publisher = publishing.Publisher()

    def publish(step: int, run: str) -> Path:
        source = folder / f"step-{step:08d}-{run}"
        source.mkdir(parents=True)
        (source / "adapter_model.safetensors").write_bytes(b"weights")
        ref = CheckpointRef(step=step, path=str(source))
        return Path(publisher._publish(publishing._Job("ns", "x", policy, ref)).path)

    real = [publish(1, "aaaa0000"), publish(2, "aaaa0000")]
    phantom = [publish(step, "bbbb1111") for step in (3, 4, 5)]
    assert all(p.is_dir() for p in real)  # the other run's copies are not this run's to prune
    assert [p.is_dir() for p in phantom] == [False, True, True]  # its own: the two newest kept
