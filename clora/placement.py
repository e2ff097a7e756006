"""The one rule for whether an experiment fits an engine, and which engine it goes to.

An engine (one replica of a runtime pod) has adapter slots, a largest rank and a sampling budget per
tick. The operator's scheduler uses this rule to pick a pod (an experiment fits a pod when it fits one
of the pod's replicas) and to predict the replica the pod will choose; the pod uses the same rule to
place each new experiment on a replica. Pure: no I/O, no clocks, the same input gives the same answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineCapacity:
    """What one engine (replica) takes on: its LoRARuntime's spec.capacity."""

    max_adapters: int
    max_rank: int
    tokens_per_tick: int


@dataclass(slots=True)
class Occupancy:
    """One engine's room while decisions are made: capacity, and what its experiments take now."""

    capacity: EngineCapacity
    adapters: int = 0
    """Slot-holding experiments on it."""
    tokens: int = 0
    """Their per-tick sampling budgets (promptsPerStep x groupSize x maxNewTokens), summed."""

    @property
    def free_slots(self) -> int:
        return self.capacity.max_adapters - self.adapters

    @property
    def free_tokens(self) -> int:
        return self.capacity.tokens_per_tick - self.tokens

    def fits(self, rank: int, tokens: int) -> bool:
        """A slot free, the rank allowed, and the sampling budget left."""
        return self.free_slots >= 1 and rank <= self.capacity.max_rank and tokens <= self.free_tokens

    def load(self) -> tuple[float, float]:
        """Token share first (what a tick's duration grows with), then slot share."""
        cap = self.capacity
        return self.tokens / cap.tokens_per_tick, self.adapters / cap.max_adapters

    def add(self, tokens: int) -> None:
        self.adapters += 1
        self.tokens += tokens

    def remove(self, tokens: int) -> None:
        self.adapters -= 1
        self.tokens -= tokens


def pod_load(replicas: Sequence[Occupancy]) -> tuple[float, float]:
    """A pod's load over all its replicas, in the terms of Occupancy.load."""
    tokens = sum(r.tokens for r in replicas) / sum(r.capacity.tokens_per_tick for r in replicas)
    adapters = sum(r.adapters for r in replicas) / sum(r.capacity.max_adapters for r in replicas)
    return tokens, adapters


def choose_replica(replicas: Sequence[Occupancy], rank: int, tokens: int) -> int | None:
    """The replica of a pod a new experiment goes to: the least loaded one it fits (lowest index on a
    tie). When it fits none but one has a free slot and the rank, the least loaded of those: an engine
    time-shares its sampling budget, so tokens decide the preference, slots and rank the possibility.
    None when no replica has a slot for it.

    A pod always spreads over its replicas, whatever the operator's policy: every replica holds a
    device, so an idle one is pure waste; packing pays only across pods (a whole pod freed).
    """
    for usable in (
        [i for i, r in enumerate(replicas) if r.fits(rank, tokens)],
        [i for i, r in enumerate(replicas) if r.free_slots >= 1 and rank <= r.capacity.max_rank],
    ):
        if usable:
            return min(usable, key=lambda i: (replicas[i].load(), i))
    return None
