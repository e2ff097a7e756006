"""GSM8K-style JSONL: records with `question` and `answer`, the reference answer after `####`."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from typing import Any

from clora_runtime.tasks.base import Problem, Task


def reference_answer(answer: str) -> str:
    """'... so 18 eggs.\\n#### 1,800' -> '1800'."""
    if "####" not in answer:
        return answer.strip().replace(",", "")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def parse_jsonl(
    lines: Iterable[str],
    origin: str,
    problem: Callable[[Any], Problem],
    what: str,
    max_chars: int | None = None,
) -> list[Problem]:
    """One Problem per JSONL line (`problem` reads a record); ValueError naming the line otherwise,
    also for a prompt or an answer longer than `max_chars` (a record no step could afford)."""
    problems: list[Problem] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = problem(json.loads(line))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{origin}:{number}: not a record with {what} ({err})") from err
        if max_chars is not None:
            for part, text in (("prompt", record.prompt), ("answer", record.answer)):
                if len(text) > max_chars:
                    raise ValueError(
                        f"{origin}:{number}: its {part} is {len(text)} characters, above this runtime's"
                        f" limit of {max_chars} per record (--max-record-chars)"
                    )
        problems.append(record)
    if not problems:
        raise ValueError(f"{origin}: no records")
    return problems


def parse_records(lines: Iterable[str], origin: str, max_chars: int | None = None) -> list[Problem]:
    return parse_jsonl(
        lines,
        origin,
        lambda r: Problem(prompt=str(r["question"]), answer=reference_answer(str(r["answer"]))),
        "question and answer",
        max_chars,
    )


class Gsm8kTask(Task):
    """Walks the records in a seeded order, reshuffled every epoch."""

    def __init__(self, records: list[Problem], seed: int, instruction: str = "") -> None:
        self.records = records
        self.seed = seed
        self.instruction = instruction

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        random.Random(f"gsm8k/{self.seed}/{epoch}").shuffle(order)
        return order

    def problems(self, step: int, count: int) -> list[Problem]:
        out: list[Problem] = []
        n = len(self.records)
        for i in range(step * count, step * count + count):
            record = self.records[self._order(i // n)[i % n]]
            if self.instruction:
                record = Problem(prompt=f"{record.prompt} {self.instruction}", answer=record.answer)
            out.append(record)
        return out
