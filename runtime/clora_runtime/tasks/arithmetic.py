"""Synthetic arithmetic: 1 one-digit sums, 2 two-digit sums and differences, 3 multi-step expressions."""

from __future__ import annotations

import random

from clora_runtime.tasks.base import Problem, Task


class ArithmeticTask(Task):
    def __init__(self, difficulty: int, seed: int, instruction: str = "") -> None:
        if difficulty not in (1, 2, 3):
            raise ValueError(f"spec.task.difficulty: {difficulty} is not 1, 2 or 3")
        self.difficulty = difficulty
        self.seed = seed
        self.instruction = instruction

    def problems(self, step: int, count: int) -> list[Problem]:
        rng = random.Random(f"arithmetic/{self.difficulty}/{self.seed}/{step}")
        return [self._one(rng) for _ in range(count)]

    def _one(self, rng: random.Random) -> Problem:
        if self.difficulty == 1:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            expr, value = f"{a} + {b}", a + b
        elif self.difficulty == 2:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if rng.random() < 0.5:
                expr, value = f"{a} + {b}", a + b
            else:
                expr, value = f"{a} - {b}", a - b
        else:
            a, b, c = rng.randint(2, 20), rng.randint(2, 9), rng.randint(1, 30)
            form = rng.randrange(3)
            if form == 0:
                expr, value = f"{a} * {b} + {c}", a * b + c
            elif form == 1:
                expr, value = f"({a} + {c}) * {b}", (a + c) * b
            else:
                expr, value = f"{a} * {b} - {c}", a * b - c
        prompt = f"What is {expr}?"
        if self.instruction:
            prompt = f"{prompt} {self.instruction}"
        return Problem(prompt=prompt, answer=str(value))
