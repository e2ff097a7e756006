"""Task http's prompts: JSONL records of `prompt`, optional `answer` and `metadata` (the rewards come
from the experiment's verifier, tasks/verifier.py). Without a dataset it has none: a continual
experiment then trains on pushed samples only."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from clora_runtime.tasks.base import Problem
from clora_runtime.tasks.gsm8k import Gsm8kTask, parse_jsonl


def _problem(record: Any) -> Problem:
    metadata = record.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError("metadata must be an object")
    return Problem(str(record["prompt"]), str(record.get("answer", "")), metadata)


def parse_prompt_records(lines: Iterable[str], origin: str, max_chars: int | None = None) -> list[Problem]:
    return parse_jsonl(lines, origin, _problem, "a prompt", max_chars)


class PromptsTask(Gsm8kTask):
    """The records in a seeded order, reshuffled every epoch (as gsm8k); none without a dataset."""

    def problems(self, step: int, count: int) -> list[Problem]:
        return super().problems(step, count) if self.records else []
