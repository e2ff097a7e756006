"""What a task is: a seeded source of problems (a prompt and its reference answer)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user message
    answer: str  # the reference answer the reward compares against
    metadata: dict[str, Any] | None = None  # task http: handed to the verifier as it is


class Task(ABC):
    """Problems for step `step` depend only on (the task's spec, its seed, step): resuming at step k
    draws exactly what an uninterrupted run would have drawn, with no RNG state to carry."""

    @abstractmethod
    def problems(self, step: int, count: int) -> list[Problem]: ...
