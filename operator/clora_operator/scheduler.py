"""Placement of LoRAExperiments onto warm runtime pods: a pure function from a snapshot to decisions.

No I/O and no clocks here: the same snapshot always gives the same decisions, so the operator can
recompute them every pass and tests can state them as tables.

Rules (issue 5):
- an experiment needs one adapter slot, rank <= the pod's maxRank, and its per-tick token budget
  (promptsPerStep x groupSize x maxNewTokens) out of the pod's tokensPerTick;
- waiting experiments are taken highest priority first, then oldest first (FIFO), then by key;
- among pods that fit: policy "spread" takes the least loaded pod (an idle accelerator is the most
  expensive waste: each pod's tick costs about the same whether it trains one adapter or eight),
  policy "pack" the most loaded pod that still fits (best fit, to leave whole pods free);
- when nothing fits, an experiment may preempt one strictly lower-priority running experiment on a
  pod where removing it makes room: the lowest priority first, then the youngest (least work to
  redo), then by pod and key. The victim is checkpointed and queued again by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Policy(StrEnum):
    """How a pod is picked among those that fit."""

    SPREAD = "spread"
    PACK = "pack"


@dataclass(frozen=True, slots=True)
class Need:
    """What one experiment takes from a pod, and how it ranks against the others."""

    key: str
    """namespace/name: unique, and the last tie-breaker."""
    rank: int
    tokens: int
    """Per-tick sampling budget: promptsPerStep x groupSize x maxNewTokens."""
    priority: int = 0
    created: float = 0.0
    """Creation time as a number (seconds since the epoch): older is admitted first."""
    avoid_nodes: frozenset[str] = frozenset()
    """Nodes whose runtime pod lost this experiment: a pod elsewhere is preferred while one fits."""


@dataclass(frozen=True, slots=True)
class PodSnapshot:
    """One ready runtime pod: its capacity and the experiments on it now."""

    name: str
    max_adapters: int
    max_rank: int
    tokens_per_tick: int
    running: tuple[Need, ...] = ()
    node: str = ""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the scheduler looks at: ready pods, and experiments waiting for a place."""

    pods: tuple[PodSnapshot, ...]
    waiting: tuple[Need, ...]
    policy: Policy = Policy.SPREAD


@dataclass(frozen=True, slots=True)
class Place:
    """Put the experiment on the pod."""

    key: str
    pod: str


@dataclass(frozen=True, slots=True)
class Preempt:
    """Checkpoint the victim and take it off its pod, to make room for `by` (which gets a Place)."""

    key: str
    pod: str
    by: str


@dataclass(frozen=True, slots=True)
class Queue:
    """No room now; the reason says why, for the experiment's status message."""

    key: str
    reason: str


Decision = Place | Preempt | Queue


@dataclass(slots=True)
class _PodState:
    """A pod's remaining room while one scheduling pass goes on."""

    snap: PodSnapshot
    running: list[Need] = field(default_factory=list)
    used_tokens: int = 0

    @property
    def free_slots(self) -> int:
        return self.snap.max_adapters - len(self.running)

    @property
    def free_tokens(self) -> int:
        return self.snap.tokens_per_tick - self.used_tokens

    def fits(self, need: Need) -> bool:
        return self.free_slots >= 1 and need.rank <= self.snap.max_rank and need.tokens <= self.free_tokens

    def load(self) -> tuple[float, float]:
        # Token share first: it is what a tick's duration grows with; slots break ties.
        return (
            self.used_tokens / self.snap.tokens_per_tick,
            len(self.running) / self.snap.max_adapters,
        )

    def add(self, need: Need) -> None:
        self.running.append(need)
        self.used_tokens += need.tokens

    def remove(self, key: str) -> Need:
        for i, need in enumerate(self.running):
            if need.key == key:
                del self.running[i]
                self.used_tokens -= need.tokens
                return need
        raise KeyError(key)


def admission_order(needs: tuple[Need, ...] | list[Need]) -> list[Need]:
    """Highest priority first, then oldest, then by key (so equal snapshots sort equally)."""
    return sorted(needs, key=lambda n: (-n.priority, n.created, n.key))


def schedule(snapshot: Snapshot) -> list[Decision]:
    """Decide where each waiting experiment goes, whom it preempts, or why it waits."""
    pods = [_PodState(snap=p) for p in sorted(snapshot.pods, key=lambda p: p.name)]
    for pod in pods:
        for need in pod.snap.running:
            pod.add(need)
    decisions: list[Decision] = []
    for need in admission_order(snapshot.waiting):
        fitting = [p for p in pods if p.fits(need)]
        # After a pod was lost, its replacement on the same node may be up again; move elsewhere first.
        fitting = [p for p in fitting if p.snap.node not in need.avoid_nodes] or fitting
        if fitting:
            pod = _pick(fitting, snapshot.policy)
            pod.add(need)
            decisions.append(Place(key=need.key, pod=pod.snap.name))
            continue
        victim = _preemption(pods, need)
        if victim is not None:
            pod, victim_key = victim
            pod.remove(victim_key)
            pod.add(need)
            decisions.append(Preempt(key=victim_key, pod=pod.snap.name, by=need.key))
            decisions.append(Place(key=need.key, pod=pod.snap.name))
            continue
        decisions.append(Queue(key=need.key, reason=_why_not(pods, need)))
    return decisions


def _pick(fitting: list[_PodState], policy: Policy) -> _PodState:
    if policy is Policy.PACK:
        # Most loaded first; name breaks ties (ascending) so the result is stable.
        return min(fitting, key=lambda p: (tuple(-x for x in p.load()), p.snap.name))
    return min(fitting, key=lambda p: (p.load(), p.snap.name))


def _preemption(pods: list[_PodState], need: Need) -> tuple[_PodState, str] | None:
    """The single running experiment whose removal makes room, cheapest first; None if there is none."""
    best: tuple[tuple[int, float, str, str], _PodState, str] | None = None
    for pod in pods:
        if need.rank > pod.snap.max_rank or need.tokens > pod.snap.tokens_per_tick:
            continue
        for running in pod.running:
            if running.priority >= need.priority:
                continue
            room_slots = pod.free_slots + 1
            room_tokens = pod.free_tokens + running.tokens
            if room_slots < 1 or need.tokens > room_tokens:
                continue
            # Lowest priority, then youngest (largest created: least work lost), then pod, key.
            cost = (running.priority, -running.created, pod.snap.name, running.key)
            if best is None or cost < best[0]:
                best = (cost, pod, running.key)
    if best is None:
        return None
    return best[1], best[2]


def _why_not(pods: list[_PodState], need: Need) -> str:
    if not pods:
        return "no runtime pod is ready"
    if all(need.rank > p.snap.max_rank for p in pods):
        return f"rank {need.rank} is above every pod's maxRank"
    if all(need.tokens > p.snap.tokens_per_tick for p in pods):
        return f"needs {need.tokens} tokens per tick, more than any pod's tokensPerTick"
    if all(p.free_slots < 1 for p in pods):
        return f"all {len(pods)} runtime pods are full (no free adapter slot)"
    return f"no pod has {need.tokens} tokens per tick and a slot free"
