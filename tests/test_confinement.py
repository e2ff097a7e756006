"""Issue 17, items 6, 7 and 10 and the checkpoint LOWs on the tiny model: resumeFrom lies in the
experiment's own folder, a run's checkpoints and queue are its own, datasets are read outside the
engine's lock (a ConfigMap's from the PUT), and a checkpoint or queue file that is not whole is
refused or skipped as it should be."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from clora.api.runtime_api import Sample
from clora_runtime import checkpoint

RECORD = json.dumps({"question": "What is 2 + 3?", "answer": "#### 5"}) + "\n"


def continual(spec_factory: Any, keep: int = 2) -> Any:
    return spec_factory(
        training={"steps": None, "promptsPerStep": 2}, checkpoint={"everySteps": 1, "keep": keep}
    )


def samples(word: str, n: int) -> list[Sample]:
    return [Sample(prompt=f"{word} {i}: what is {i} + 1?", answer=str(i + 1)) for i in range(n)]


def digest(folder: str) -> str:
    return hashlib.sha256((Path(folder) / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_resume_from_must_lie_in_the_experiments_own_folder(tiny_engine: Any, spec_factory: Any) -> None:
    """Item 6: tenant A cannot resume from tenant B's checkpoint, by its path, by .. or by a symlink."""
    engine = tiny_engine()
    engine.upsert("tenant-b", "model", spec_factory(training={"steps": 1}))
    while engine.tick() is not None:
        pass
    theirs = engine.state("tenant-b", "model").last_checkpoint.path
    own = checkpoint.experiment_dir(engine.config.checkpoint_dir, "tenant-a", "thief")
    own.mkdir(parents=True)
    (own / "step-00000001").symlink_to(Path(theirs).resolve())
    for path in (
        theirs,
        str(own / ".." / ".." / "tenant-b" / "model" / Path(theirs).name),
        str(own / "step-00000001"),
    ):
        with pytest.raises(ValueError, match=r"resumeFrom: .* not a checkpoint of this experiment"):
            engine.upsert("tenant-a", "thief", spec_factory(), resume_from=path)
    assert [s.name for s in engine.states()] == ["model"]
    # Its own checkpoint, named as the runtime answered it, resumes.
    engine.remove("tenant-b", "model")
    state = engine.upsert("tenant-b", "model", spec_factory(training={"steps": 2}), resume_from=theirs)
    assert (state.phase, state.step) == ("Running", 1)


def test_a_phantom_registration_neither_prunes_nor_feeds_the_real_run(
    tiny_engine: Any, spec_factory: Any
) -> None:
    """Item 6: a PUT under B's name while B is away starts a run of its own: its keep-pruning leaves
    B's checkpoints alone and what it queues never reaches B's queue when B resumes."""
    engine = tiny_engine()
    engine.upsert("tenant-b", "model", continual(spec_factory))
    engine.push_samples("tenant-b", "model", samples("real", 4))
    assert engine.tick() is not None  # step 1: two of B's samples
    ref = engine.remove("tenant-b", "model").checkpoint
    assert ref is not None and ref.step == 1
    before = digest(ref.path)

    engine.upsert("tenant-b", "model", continual(spec_factory, keep=1))  # the phantom
    engine.push_samples("tenant-b", "model", samples("evil", 4))
    assert engine.tick() is not None and engine.tick() is not None  # steps 1 and 2, keep 1
    engine.remove("tenant-b", "model")

    assert digest(ref.path) == before  # not overwritten by the phantom's step 1, nor pruned
    state = engine.upsert("tenant-b", "model", continual(spec_factory), resume_from=ref.path)
    assert state.step == 1
    assert engine.push_samples("tenant-b", "model", samples("more", 1)) == 3  # B's two left + one
    report = engine.tick()
    assert report is not None
    prompts = [r.prompt for r in report.rollouts["tenant-b/model"]]
    assert prompts and all(p.startswith("real ") for p in prompts)
    meta = json.loads(
        (Path(engine.state("tenant-b", "model").last_checkpoint.path) / "state.json").read_text()
    )
    assert meta["runId"] == json.loads((Path(ref.path) / "state.json").read_text())["runId"] != ""


def test_a_torn_queue_line_is_skipped_and_stale_staging_is_removed(
    tiny_engine: Any, spec_factory: Any
) -> None:
    """LOW: a crash mid-append leaves a torn last line: the resume skips it (no permanent 422) and the
    next append starts on a line of its own; a crash mid-checkpoint leaves a staging folder, which
    the run's next checkpoint removes."""
    engine = tiny_engine()
    engine.upsert("ns", "live", continual(spec_factory))
    engine.push_samples("ns", "live", samples("q", 3))
    assert engine.tick() is not None
    ref = engine.remove("ns", "live").checkpoint
    folder = Path(ref.path).parent
    (queue,) = folder.glob("samples*.jsonl")
    with queue.open("a") as f:
        f.write('{"prompt": "torn by a cra')
    engine.upsert("ns", "live", continual(spec_factory), resume_from=ref.path)
    assert engine.push_samples("ns", "live", samples("next", 1)) == 2  # one left + one; torn skipped
    lines = queue.read_text().splitlines()
    assert len(lines) == 4 and all(Sample.model_validate_json(line) for line in lines)

    run = json.loads((Path(ref.path) / "state.json").read_text())["runId"]
    stale = folder / f".{checkpoint.folder_name(7, run)}.x1y2"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    assert engine.tick() is not None  # checkpoints (everySteps 1)
    assert not stale.exists()


def test_a_checkpoint_of_the_wrong_shape_or_step_is_refused(tiny_engine: Any, spec_factory: Any) -> None:
    """LOW: a tensor of another shape is an error on load, not a broadcast; a state.json whose step
    is not a count is refused naming resumeFrom."""
    engine = tiny_engine()
    engine.upsert("ns", "x", spec_factory(training={"steps": 1}))
    while engine.tick() is not None:
        pass
    ref = engine.remove("ns", "x").checkpoint
    weights = load_file(Path(ref.path) / "adapter_model.safetensors")
    name = next(k for k in weights if "lora_A" in k)
    weights[name] = torch.ones(1, weights[name].shape[1])  # would broadcast over the rank's rows
    save_file(weights, Path(ref.path) / "adapter_model.safetensors")
    state = engine.upsert("ns", "x", spec_factory(training={"steps": 2}), resume_from=ref.path)
    assert state.phase == "Failed" and "shape [1," in state.message and name in state.message
    engine.remove("ns", "x")

    meta_file = Path(ref.path) / "state.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "step": -3}))
    with pytest.raises(ValueError, match=r"resumeFrom: .*step is -3, not a count"):
        engine.upsert("ns", "x", spec_factory(training={"steps": 2}), resume_from=ref.path)


def test_datasets_are_read_outside_the_lock_and_configmaps_come_in_the_put(
    tiny_engine: Any, spec_factory: Any, tmp_path: Path
) -> None:
    """Items 7 and 10: a PUT reads its dataset without waiting for the engine's lock (here held by
    another thread); a ConfigMap dataset's records are the PUT's datasetText, required."""
    engine = tiny_engine()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer"}\n')
    held, release, done = threading.Event(), threading.Event(), threading.Event()
    errors: list[Exception] = []

    def hold() -> None:
        with engine._lock:
            held.set()
            release.wait()

    def put() -> None:
        try:
            engine.upsert("ns", "g", spec_factory(task={"name": "gsm8k", "dataset": {"path": str(bad)}}))
        except ValueError as err:
            errors.append(err)
        done.set()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    threading.Thread(target=put, daemon=True).start()
    answered = done.wait(60)
    release.set()
    holder.join()
    assert answered, "the PUT waited for the engine's lock to read its dataset"
    assert errors and "spec.task.dataset.path" in str(errors[0]) and "bad.jsonl:1" in str(errors[0])

    by_name = spec_factory(task={"name": "gsm8k", "dataset": {"configMap": {"name": "d", "key": "k"}}})
    with pytest.raises(ValueError, match=r"spec\.task\.dataset\.configMap"):
        engine.upsert("ns", "cm", by_name)
    state = engine.upsert("ns", "cm", by_name, dataset_text=RECORD * 2)
    assert state.phase == "Running"
    report = engine.tick()
    assert report is not None and {r.prompt for r in report.rollouts["ns/cm"]} == {"What is 2 + 3?"}
    with pytest.raises(
        ValueError, match=r"spec\.task\.dataset\.path: .* outside this runtime's dataset roots"
    ):
        engine.upsert("ns", "etc", spec_factory(task={"name": "gsm8k", "dataset": {"path": "/etc/hostname"}}))


def test_a_restarted_replica_resumes_the_run_it_trained_not_a_phantoms(spec_factory: Any) -> None:
    """The pod puts a lost replica's experiments back from the newest checkpoint of the run it last
    saw them in; with no checkpoint seen, from the start (never the newest folder of any run)."""
    from clora.api.experiment_types import CheckpointRef
    from clora.api.runtime_api import ExperimentState
    from clora_runtime.replicas.replica_set import _Placed, _run_of

    spec = spec_factory()
    seen = ExperimentState(
        namespace="ns",
        name="x",
        phase="Running",
        last_checkpoint=CheckpointRef(step=3, path="/ckpt/ns/x/step-00000003-aaaa0000"),
    )
    came = _Placed(spec=spec, resume_from="/ckpt/ns/x/step-00000001-cccc2222", replica=1)
    assert _run_of(seen, came) == "aaaa0000"
    assert _run_of(None, came) == "cccc2222"
    assert _run_of(None, _Placed(spec=spec, resume_from=None, replica=1)) is None
