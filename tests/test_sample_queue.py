"""The pushed-sample queue on disk (clora_runtime.sample_queue), and its compaction on the engine:
a continual experiment's queue file keeps only what waits once a checkpoint has counted the rest,
and a runtime resuming from that checkpoint goes on with exactly the samples after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clora.api.runtime_api import Sample
from clora_runtime import sample_queue


def samples(first: int, n: int) -> list[Sample]:
    return [Sample(prompt=f"What is {i} + 1?", answer=str(i + 1)) for i in range(first, first + n)]


def test_a_queue_reads_back_what_was_appended_and_consumed(tmp_path: Path) -> None:
    path = sample_queue.queue_path(tmp_path / "ns" / "exp", "run1")
    assert path.name == "samples-run1.jsonl"
    assert sample_queue.read(path, "ns/exp") == sample_queue.StoredQueue([], 0, 0)
    sample_queue.append(path, samples(0, 3))
    sample_queue.append(path, samples(3, 2))
    sample_queue.write_consumed(path, 2)
    stored = sample_queue.read(path, "ns/exp")
    assert stored.samples == samples(0, 5) and stored.base == 0 and stored.consumed == 2
    sample_queue.write_consumed(path, 99)  # a count past the file (lost lines) is clamped to it
    assert sample_queue.read(path, "ns/exp").consumed == 5


def test_a_torn_last_line_is_skipped_and_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "samples-r.jsonl"
    sample_queue.append(path, samples(0, 2))
    with path.open("a") as f:
        f.write('{"prompt": "What is 9')  # a crash in the middle of an append
    stored = sample_queue.read(path, "ns/exp")
    assert stored.samples == samples(0, 2)
    sample_queue.append(path, samples(2, 1))  # the next append starts on a line of its own
    assert sample_queue.read(path, "ns/exp").samples == samples(0, 3)


def test_compaction_keeps_the_waiting_samples_and_those_pushed_while_it_ran(tmp_path: Path) -> None:
    path = tmp_path / "samples-r.jsonl"
    sample_queue.append(path, samples(0, 6))
    sample_queue.write_consumed(path, 4)
    staging = sample_queue.start_compaction(path, 4, samples(4, 2))
    assert len(path.read_text().splitlines()) == 6  # the old file is whole until it is replaced
    sample_queue.append(path, samples(6, 1))  # a push while the waiting samples were written
    sample_queue.finish_compaction(staging, path, samples(6, 1))
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"dropped": 4} and len(lines) == 4
    stored = sample_queue.read(path, "ns/exp")
    assert stored.base == 4 and stored.samples == samples(4, 3) and stored.consumed == 4
    sample_queue.write_consumed(path, 1)  # a count below what was dropped starts at the first kept
    assert sample_queue.read(path, "ns/exp").consumed == 4
    # Appends after a compaction go on after it.
    sample_queue.append(path, samples(7, 1))
    assert sample_queue.read(path, "ns/exp").samples == samples(4, 4)


def test_a_compaction_a_crash_interrupted_leaves_the_old_queue(tmp_path: Path) -> None:
    path = tmp_path / "samples-r.jsonl"
    sample_queue.append(path, samples(0, 3))
    staging = sample_queue.start_compaction(path, 2, samples(2, 1))  # ... and the process died
    stored = sample_queue.read(path, "ns/exp")
    assert stored.samples == samples(0, 3) and stored.base == 0
    assert not staging.exists()


def test_the_engine_compacts_a_continual_queue_after_a_checkpoint_and_resumes_past_it(
    tiny_engine: Any, spec_factory: Any, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    spec = spec_factory(
        training={"steps": None, "promptsPerStep": 2, "groupSize": 2, "maxNewTokens": 4},
        checkpoint={"everySteps": 2, "keep": 1},
    )
    engine = tiny_engine(checkpoint_dir=runs, queue_compact_samples=4)
    engine.upsert("ns", "learner", spec)
    engine.push_samples("ns", "learner", samples(0, 10))
    for _ in range(3):  # 6 consumed; checkpoints at steps 2 (4 counted: compacted) and ...
        report = engine.tick()
        assert report is not None and report.stepped == ["ns/learner"], report
    engine.push_samples("ns", "learner", samples(10, 2))
    state = engine.state("ns", "learner")
    assert state.step == 3 and state.last_checkpoint is not None and state.last_checkpoint.step == 2
    (path,) = (runs / "ns" / "learner").glob("samples-*.jsonl")
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"dropped": 4}  # the 4 the step-2 checkpoint counted are gone
    assert [Sample.model_validate_json(line) for line in lines[1:]] == samples(4, 8)

    # A runtime resuming from the step-2 checkpoint trains again on samples 4 and 5 (step 3's, which
    # no checkpoint had counted), then on what was pushed after them.
    again = tiny_engine(checkpoint_dir=runs, queue_compact_samples=4)
    again.upsert("ns", "learner", spec, resume_from=state.last_checkpoint.path)
    assert again.state("ns", "learner").step == 2
    trained = []
    for _ in range(4):
        report = again.tick()
        assert report is not None and report.stepped == ["ns/learner"], report
        trained.append(sorted({r.prompt for r in report.rollouts["ns/learner"]}))
    assert trained == [sorted(s.prompt for s in samples(i, 2)) for i in (4, 6, 8, 10)]
    assert again.tick() is None  # all consumed: a continual experiment waits for more
    lines = path.read_text().splitlines()  # compacted again at step 4 (8 counted) and step 6 (12)
    assert json.loads(lines[0]) == {"dropped": 12} and lines[1:] == []
