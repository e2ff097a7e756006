"""Rewards: plain callables `(completion_text, reference_answer) -> float`, registered per name.

A reward that raises fails its experiment alone (the engine catches it); one that returns a non-finite
number makes that experiment's loss non-finite, which fails it the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable

RewardFn = Callable[[str, str], float]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# The format the prompts ask for when the reward is format-and-exact: a last line "Answer: <number>".
ANSWER_LINE = re.compile(r"answer\s*:\s*(-?\d[\d,]*(?:\.\d+)?)\s*\.?\s*$", re.IGNORECASE)
FORMAT_INSTRUCTION = "End your reply with a line of the form 'Answer: <number>'."
FORMAT_ONLY_CREDIT = 0.1


def parse_number(text: str) -> float | None:
    """'1,234' -> 1234.0; None when it is not a number."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def last_number(text: str) -> float | None:
    """The last number in a text, e.g. 'so 3 + 4 = 7.' -> 7.0."""
    matches = _NUMBER.findall(text)
    return parse_number(matches[-1]) if matches else None


def exact_match(completion: str, answer: str) -> float:
    """1 when the completion's last number equals the reference, else 0."""
    got, want = last_number(completion), parse_number(answer.strip())
    return 1.0 if got is not None and want is not None and got == want else 0.0


def numeric(completion: str, answer: str) -> float:
    """Closeness of the last number: 1 - |got - want| / max(1, |want|), floored at 0; 0 with no number."""
    got, want = last_number(completion), parse_number(answer.strip())
    if got is None or want is None:
        return 0.0
    return max(0.0, 1.0 - abs(got - want) / max(1.0, abs(want)))


def format_and_exact(completion: str, answer: str) -> float:
    """1 for a last line 'Answer: N' with the right N; FORMAT_ONLY_CREDIT for the format alone; else 0."""
    match = ANSWER_LINE.search(completion.strip())
    if match is None:
        return 0.0
    got, want = parse_number(match.group(1)), parse_number(answer.strip())
    return 1.0 if got is not None and got == want else FORMAT_ONLY_CREDIT


REWARDS: dict[str, RewardFn] = {
    "exact-match": exact_match,
    "numeric": numeric,
    "format-and-exact": format_and_exact,
}


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"spec.task.reward: unknown reward {name!r} (known: {sorted(REWARDS)})") from None
