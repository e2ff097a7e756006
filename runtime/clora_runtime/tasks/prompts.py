"""Task http's prompts: JSONL records of `prompt`, optional `answer` and `metadata` (the rewards come
from the experiment's verifier, tasks/verifier.py). Without a dataset it has none: a continual
experiment then trains on pushed samples only."""

from __future__ import annotations

import json

from clora_runtime.tasks.base import Problem
from clora_runtime.tasks.gsm8k import Gsm8kTask


def parse_prompt_records(text: str, origin: str) -> list[Problem]:
    problems: list[Problem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            metadata = record.get("metadata")
            if metadata is not None and not isinstance(metadata, dict):
                raise TypeError("metadata must be an object")
            problems.append(Problem(str(record["prompt"]), str(record.get("answer", "")), metadata))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{origin}:{number}: not a record with a prompt ({err})") from err
    if not problems:
        raise ValueError(f"{origin}: no records")
    return problems


class PromptsTask(Gsm8kTask):
    """The records in a seeded order, reshuffled every epoch (as gsm8k); none without a dataset."""

    def problems(self, step: int, count: int) -> list[Problem]:
        return super().problems(step, count) if self.records else []
