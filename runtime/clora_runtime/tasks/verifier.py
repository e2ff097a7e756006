"""Rewards from the user's own HTTP service (task http; the contract is in docs/verifier.md).

One POST per experiment step with every completion of the step; the answer is one reward per item.
Timeouts, connection errors and 5xx answers are retried with exponential backoff; after the last
retry, a 4xx, or a malformed answer (not JSON, wrong length, a non-number, NaN) the call raises
VerifierError, whose message names the URL and what was wrong, and that experiment alone fails.

The bearer token is only ever put in the request's header: it is not part of any message, log line,
state or metric (VerifierError's texts are built from the URL without its user info or query).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from clora.api.experiment_types import Verifier

BACKOFF_S = 0.5  # first retry after 0.5 s, then 1 s, 2 s, ...


class VerifierError(Exception):
    """The verifier could not score a step: the message says where and why."""


@dataclass(frozen=True)
class Item:
    prompt: str
    completion: str
    answer: str
    metadata: dict[str, Any] | None = None

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": self.prompt, "completion": self.completion, "answer": self.answer}
        if self.metadata is not None:
            out["metadata"] = self.metadata
        return out


def shown(url: str) -> str:
    """The URL as messages show it: no user info, no query (either may hold a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def rewards_from(answer: Any, expected: int) -> list[float]:
    """The rewards of a verifier's JSON answer; ValueError saying what is wrong with it."""
    if not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
        raise ValueError('the answer is not an object with a "rewards" list')
    rewards = answer["rewards"]
    if len(rewards) != expected:
        raise ValueError(f"{len(rewards)} rewards for {expected} items")
    out = []
    for i, r in enumerate(rewards):
        if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r):
            raise ValueError(f"rewards[{i}] is {r!r}, not a finite number")
        out.append(float(r))
    return out


def score(
    verifier: Verifier,
    token: str | None,
    experiment: dict[str, Any],
    items: Sequence[Item],
    *,
    client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> list[float]:
    """POST the step's items to the verifier and return its rewards (see the module's docstring)."""
    where = shown(verifier.url)
    body = {"experiment": experiment, "items": [item.wire() for item in items]}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = httpx.Timeout(verifier.timeout_seconds)
    own = client is None
    http = client or httpx.Client()
    try:
        last = ""
        for attempt in range(verifier.retries + 1):
            if attempt:
                sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                rsp = http.post(verifier.url, json=body, headers=headers, timeout=timeout)
            except httpx.TimeoutException:
                last = f"no answer within timeoutSeconds {verifier.timeout_seconds:g}"
                continue
            except httpx.TransportError as e:
                last = f"cannot connect ({type(e).__name__})"
                continue
            if rsp.status_code >= 500:
                last = f"HTTP {rsp.status_code}"
                continue
            if rsp.status_code >= 400:
                raise VerifierError(f"verifier {where} refused the step: HTTP {rsp.status_code}")
            try:
                return rewards_from(rsp.json(), len(items))
            except ValueError as e:  # also a body that is not JSON
                raise VerifierError(f"verifier {where} answered a malformed body: {e}") from None
        tries = verifier.retries + 1
        raise VerifierError(f"verifier {where} failed {tries} time{'s' if tries > 1 else ''}: {last}")
    finally:
        if own:
            http.close()
