"""Built-in tasks and rewards, and the chat prompt they are rendered into."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clora.api import Task as TaskSpec
from clora_runtime.tasks.arithmetic import ArithmeticTask
from clora_runtime.tasks.base import Problem, Task
from clora_runtime.tasks.gsm8k import Gsm8kTask, parse_records
from clora_runtime.tasks.prompts import PromptsTask, parse_prompt_records
from clora_runtime.tasks.rewards import FORMAT_INSTRUCTION, REWARDS, RewardFn, get_reward

__all__ = [
    "REWARDS",
    "DatasetSource",
    "Problem",
    "RewardFn",
    "Task",
    "build_task",
    "chat_prompt",
    "get_reward",
    "read_records",
]

PATH_FIELD = "spec.task.dataset.path"
CONFIG_MAP_FIELD = "spec.task.dataset.configMap"


@dataclass(frozen=True)
class DatasetSource:
    """Where and how much a runtime may read for a dataset (EngineConfig: dataset_roots,
    max_dataset_bytes, max_record_chars, checkpoint_dir), and a ConfigMap dataset's text (the PUT's
    datasetText)."""

    roots: list[Path] = field(default_factory=list)  # resolved; empty: the working directory
    checkpoint_dir: Path | None = None
    max_bytes: int = 256 * 1024 * 1024
    max_record_chars: int | None = None
    text: str | None = field(default=None, repr=False)


def confined_path(path: str, source: DatasetSource) -> Path:
    """The file `path` names, resolved (symlinks and .. followed), when it lies inside a dataset root
    and outside every experiment's folder of the checkpoint directory (<dir>/<namespace>/<name>/...:
    checkpoints and queued samples of any tenant); ValueError naming spec.task.dataset.path otherwise.
    Nothing is said of a path outside the roots but that it is outside: not whether it exists."""
    real = Path(path).resolve()
    roots = source.roots or [Path.cwd().resolve()]
    if not any(real.is_relative_to(root) for root in roots):
        shown = os.pathsep.join(str(r) for r in roots)
        raise ValueError(
            f"{PATH_FIELD}: {path} is outside this runtime's dataset roots ({shown}; --dataset-roots)"
        )
    if source.checkpoint_dir is not None:
        checkpoints = Path(source.checkpoint_dir).resolve()
        # Files at most one folder deep are the volume's own (e.g. /data/gsm8k/train.jsonl); deeper
        # ones are inside <namespace>/<name>/, where the runtime writes.
        if real.is_relative_to(checkpoints) and len(real.relative_to(checkpoints).parts) > 2:
            raise ValueError(
                f"{PATH_FIELD}: {path} is inside an experiment's folder of the checkpoint directory"
                f" {checkpoints}; datasets there may lie at most one folder deep"
            )
    if not real.is_file():
        raise ValueError(f"{PATH_FIELD}: {path} is not a file in this runtime")
    return real


def _file_lines(path: Path, shown: str, max_bytes: int) -> Iterator[str]:
    """The file's lines, streamed, never more than max_bytes in all (also for a file that grows)."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ValueError(
                f"{PATH_FIELD}: {shown} is {size} bytes, above this runtime's limit of {max_bytes}"
                " (--max-dataset-bytes)"
            )
        left = max_bytes
        number = 0
        while raw := f.readline(left + 1):
            number += 1
            left -= len(raw)
            if left < 0:
                raise ValueError(
                    f"{PATH_FIELD}: {shown} is above this runtime's limit of {max_bytes} bytes"
                    " (--max-dataset-bytes)"
                )
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{PATH_FIELD}: {shown}:{number}: not UTF-8 ({err.reason})") from None


def read_records(spec: TaskSpec, source: DatasetSource) -> list[Problem] | None:
    """The records of the task's dataset (None without one): a file read within `source`'s roots and
    limits, or a ConfigMap's text as the PUT brought it. ValueError naming the field otherwise.
    Slow for a large file: callers run it outside their locks."""
    dataset = spec.dataset
    if source.text is not None and (dataset is None or dataset.config_map is None):
        raise ValueError("datasetText: only for a spec.task.dataset.configMap dataset")
    if dataset is None or spec.name == "arithmetic":
        return None
    parse = parse_prompt_records if spec.name == "http" else parse_records
    if dataset.path is not None:
        path = confined_path(dataset.path, source)
        origin = f"{PATH_FIELD}: {dataset.path}"
        try:
            return parse(_file_lines(path, dataset.path, source.max_bytes), origin, source.max_record_chars)
        except OSError as err:  # e.g. not readable by the runtime's user: the spec's fault, a 422
            raise ValueError(f"{origin}: cannot be read ({err.strerror or err})") from None
    assert dataset.config_map is not None
    ref = dataset.config_map
    if source.text is None:
        raise ValueError(
            f"{CONFIG_MAP_FIELD}: the PUT carries no datasetText (the value of ConfigMap {ref.name},"
            f" key {ref.key}); this runtime mounts no ConfigMap"
        )
    origin = f"{CONFIG_MAP_FIELD}: {ref.name}/{ref.key}"
    return parse(source.text.splitlines(), origin, source.max_record_chars)


def build_task(spec: TaskSpec, seed: int, records: list[Problem] | None = None) -> Task:
    """The task object for a spec and its dataset's records (read_records); ValueError naming the
    field when it cannot be built."""
    instruction = FORMAT_INSTRUCTION if spec.reward == "format-and-exact" else ""
    if spec.name == "arithmetic":
        return ArithmeticTask(spec.difficulty, seed, instruction)
    if spec.name == "http" and spec.dataset is None:
        return PromptsTask([], seed)
    if spec.name not in ("gsm8k", "http"):
        raise ValueError(f"spec.task.name: unknown task {spec.name!r}")
    if spec.dataset is None:
        raise ValueError("spec.task.dataset: required for task gsm8k")
    if records is None:
        raise ValueError("spec.task.dataset: its records were not read")
    if spec.name == "http":
        return PromptsTask(records, seed)
    return Gsm8kTask(records, seed, instruction)


def chat_prompt(tokenizer: Any, user: str, system_prompt: str = "") -> list[int]:
    """Token ids of the model's chat template with an optional system message, ready for the reply."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    text = (f"{system_prompt}\n\n" if system_prompt else "") + f"Question: {user}\nAnswer:"
    return list(tokenizer(text).input_ids)
