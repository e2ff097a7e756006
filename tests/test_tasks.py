"""Tasks and rewards: seeded problems, GSM8K parsing, the three rewards, the chat prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clora.api import Task as TaskSpec
from clora_runtime.tasks import DatasetSource, build_task, chat_prompt, get_reward, read_records
from clora_runtime.tasks.arithmetic import ArithmeticTask
from clora_runtime.tasks.gsm8k import Gsm8kTask, reference_answer
from clora_runtime.tasks.rewards import FORMAT_ONLY_CREDIT, last_number


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3 + 4 = 7.", 7.0),
        ("It is -12", -12.0),
        ("total 1,800 eggs", 1800.0),
        ("2.5 then 3.75", 3.75),
        ("none", None),
    ],
)
def test_last_number(text: str, value: float | None) -> None:
    assert last_number(text) == value


def test_exact_match() -> None:
    reward = get_reward("exact-match")
    assert reward("3 + 4 is 7", "7") == 1.0
    assert reward("7, no wait, 8", "7") == 0.0
    assert reward("no idea", "7") == 0.0
    assert reward("1,000", "1000") == 1.0


def test_numeric_is_graded() -> None:
    reward = get_reward("numeric")
    assert reward("100", "100") == 1.0
    assert reward("90", "100") == pytest.approx(0.9)
    assert 0.0 < reward("6", "7") < 1.0
    assert reward("5000", "7") == 0.0
    assert reward("nothing", "7") == 0.0


def test_format_and_exact() -> None:
    reward = get_reward("format-and-exact")
    assert reward("3 plus 4 makes 7.\nAnswer: 7", "7") == 1.0
    assert reward("Answer: 8", "7") == FORMAT_ONLY_CREDIT
    assert reward("7", "7") == 0.0


def test_unknown_reward_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"spec\.task\.reward"):
        get_reward("nope")


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_arithmetic_is_seeded_and_correct(difficulty: int) -> None:
    task = ArithmeticTask(difficulty, seed=3)
    first = task.problems(step=5, count=20)
    assert first == ArithmeticTask(difficulty, seed=3).problems(step=5, count=20)
    assert first != task.problems(step=6, count=20)
    assert first != ArithmeticTask(difficulty, seed=4).problems(step=5, count=20)
    for p in first:
        expression = p.prompt.removeprefix("What is ").removesuffix("?")
        assert eval(expression) == int(p.answer)  # the prompts are plain Python arithmetic
        if difficulty == 1:
            assert 0 <= int(p.answer) <= 18


def test_gsm8k_reads_the_answer_after_hashes(tmp_path: Path) -> None:
    assert reference_answer("She has 3 + 4 = 7 apples.\n#### 1,234") == "1234"
    records = [{"question": f"q{i}", "answer": f"work\n#### {i}"} for i in range(5)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    spec = TaskSpec.model_validate({"name": "gsm8k", "dataset": {"path": str(path)}})
    source = DatasetSource(roots=[tmp_path])
    task = build_task(spec, 0, read_records(spec, source))
    assert isinstance(task, Gsm8kTask)
    seen = task.problems(0, 5)
    assert sorted(p.prompt for p in seen) == [f"q{i}" for i in range(5)]  # one epoch covers every record
    assert all(p.answer == p.prompt[1:] for p in seen)
    assert task.problems(1, 3) == build_task(spec, 0, read_records(spec, source)).problems(1, 3)


def test_build_task_names_bad_fields(tmp_path: Path) -> None:
    source = DatasetSource(roots=[tmp_path])
    spec = TaskSpec.model_validate({"name": "gsm8k", "dataset": {"path": str(tmp_path / "missing.jsonl")}})
    with pytest.raises(ValueError, match=r"spec\.task\.dataset\.path"):
        read_records(spec, source)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"spec\.task\.dataset\.path: .*bad\.jsonl:1"):
        read_records(TaskSpec.model_validate({"name": "gsm8k", "dataset": {"path": str(bad)}}), source)
    fmt = build_task(TaskSpec.model_validate({"name": "arithmetic", "reward": "format-and-exact"}), seed=0)
    assert "Answer: <number>" in fmt.problems(0, 1)[0].prompt


def test_chat_prompt_uses_the_template_and_the_system_prompt() -> None:
    from clora_runtime.models.loading import load_tokenizer, smollm2_dir

    tokenizer = load_tokenizer(smollm2_dir())
    plain = tokenizer.decode(chat_prompt(tokenizer, "What is 2 + 2?"))
    assert "What is 2 + 2?" in plain and plain.rstrip().endswith("assistant")
    with_system = tokenizer.decode(chat_prompt(tokenizer, "What is 2 + 2?", "Answer with a number."))
    assert "Answer with a number." in with_system


def _gsm8k(path: Path | str) -> TaskSpec:
    return TaskSpec.model_validate({"name": "gsm8k", "dataset": {"path": str(path)}})


RECORD = json.dumps({"question": "What is 2 + 3?", "answer": "#### 5"}) + "\n"


def test_dataset_paths_are_confined_to_the_dataset_roots(tmp_path: Path) -> None:
    """Issue 17, item 7: a dataset path outside the roots (directly, by .., or by a symlink) is
    refused without saying whether it exists; so is one inside an experiment's checkpoint folder."""
    root, outside, checkpoints = tmp_path / "data", tmp_path / "secret", tmp_path / "data" / "runs"
    root.mkdir()
    outside.mkdir()
    (root / "train.jsonl").write_text(RECORD)
    (outside / "creds.jsonl").write_text(RECORD)
    (root / "link.jsonl").symlink_to(outside / "creds.jsonl")
    victim = checkpoints / "tenant-b" / "model" / "step-00000003"
    victim.mkdir(parents=True)
    (checkpoints / "tenant-b" / "model" / "samples.jsonl").write_text(json.dumps({"prompt": "q"}) + "\n")
    (checkpoints / "shared").mkdir()
    (checkpoints / "shared" / "train.jsonl").write_text(RECORD)  # a dataset on the checkpoint volume
    source = DatasetSource(roots=[root.resolve()], checkpoint_dir=checkpoints)

    assert read_records(_gsm8k(root / "train.jsonl"), source) is not None
    assert read_records(_gsm8k(checkpoints / "shared" / "train.jsonl"), source) is not None
    for path in (
        outside / "creds.jsonl",
        root / ".." / "secret" / "creds.jsonl",
        root / "link.jsonl",
        outside / "missing.jsonl",
        "/etc/passwd",
    ):
        with pytest.raises(
            ValueError, match=r"spec\.task\.dataset\.path: .* outside this runtime's dataset roots"
        ):
            read_records(_gsm8k(path), source)
    for path in (
        checkpoints / "tenant-b" / "model" / "samples.jsonl",
        victim / "state.json",
    ):
        with pytest.raises(ValueError, match=r"spec\.task\.dataset\.path: .* inside an experiment's folder"):
            read_records(_gsm8k(path), source)


def test_dataset_size_and_record_length_are_bounded(tmp_path: Path) -> None:
    """Issue 17, items 7 and 2: a file above max_bytes, a record above max_record_chars, and a
    ConfigMap dataset without its text are refused with the field named."""
    path = tmp_path / "train.jsonl"
    path.write_text(RECORD * 100)
    spec = _gsm8k(path)
    assert len(read_records(spec, DatasetSource(roots=[tmp_path], max_bytes=len(RECORD) * 100))) == 100
    with pytest.raises(ValueError, match=r"spec\.task\.dataset\.path: .* above this runtime's limit of 1000"):
        read_records(spec, DatasetSource(roots=[tmp_path], max_bytes=1000))
    long = tmp_path / "long.jsonl"
    long.write_text(RECORD + json.dumps({"question": "x" * 5000, "answer": "#### 1"}) + "\n")
    with pytest.raises(ValueError, match=r"long\.jsonl:2: its prompt is 5000 characters, above .* 4096"):
        read_records(_gsm8k(long), DatasetSource(roots=[tmp_path], max_record_chars=4096))
    assert len(read_records(_gsm8k(long), DatasetSource(roots=[tmp_path], max_record_chars=5000))) == 2

    by_name = TaskSpec.model_validate({"name": "gsm8k", "dataset": {"configMap": {"name": "d", "key": "k"}}})
    with pytest.raises(ValueError, match=r"spec\.task\.dataset\.configMap: the PUT carries no datasetText"):
        read_records(by_name, DatasetSource())
    records = read_records(by_name, DatasetSource(text=RECORD * 3))
    assert records is not None and [r.answer for r in records] == ["5"] * 3
    with pytest.raises(ValueError, match="datasetText"):
        read_records(spec, DatasetSource(roots=[tmp_path], text=RECORD))
