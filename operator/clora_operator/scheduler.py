"""Placement of LoRAExperiments onto warm runtime pods: a pure function from a snapshot to decisions.

No I/O and no clocks here: the same snapshot always gives the same decisions, so the operator can
recompute them every pass and tests can state them as tables.

Rules (issue 5; per replica since issue 15, the fits/load rule shared with the pods in clora.placement):
- an experiment needs one adapter slot, rank <= maxRank, and its per-tick token budget
  (promptsPerStep x groupSize x maxNewTokens) out of tokensPerTick, all on one replica of a pod
  (capacity is per replica; a pod of R replicas has R x maxAdapters slots);
- waiting experiments are taken highest priority first, then oldest first (FIFO), then by key;
- among pods that fit: policy "spread" takes the least loaded pod, over all its replicas (an idle
  accelerator is the most expensive waste: a tick costs about the same for one adapter or eight),
  policy "pack" the most loaded pod that still fits (best fit, to leave whole pods free); within the
  pod, the replica is the pod's own choice (the least loaded that fits), which the pass predicts;
- when nothing fits, an experiment may preempt one strictly lower-priority running experiment on a
  replica where removing it makes room: the lowest priority first, then the youngest (least work to
  redo), then by pod and key. The victim is checkpointed and queued again by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from clora.placement import EngineCapacity, Occupancy, choose_replica, pod_load


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
    """One ready runtime pod: its capacity (per replica) and the experiments on it now."""

    name: str
    max_adapters: int
    """Adapter slots of each replica."""
    max_rank: int
    tokens_per_tick: int
    """Sampling budget of each replica."""
    running: tuple[Need, ...] = ()
    node: str = ""
    replicas: int = 1
    """Engines in the pod (spec.replicas), each with the capacity above."""
    replica_of: Mapping[str, int] = field(default_factory=dict)
    """key -> the replica the pod reports it on; a running experiment it has not reported yet is
    counted where the pod's own rule (clora.placement.choose_replica) puts it."""


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
    """A pod's remaining room, replica by replica, while one scheduling pass goes on."""

    snap: PodSnapshot
    replicas: list[Occupancy]
    running: dict[str, tuple[Need, int]] = field(default_factory=dict)
    """key -> (what it takes, its replica)."""

    @classmethod
    def of(cls, snap: PodSnapshot) -> _PodState:
        cap = EngineCapacity(snap.max_adapters, snap.max_rank, snap.tokens_per_tick)
        pod = cls(snap=snap, replicas=[Occupancy(cap) for _ in range(max(1, snap.replicas))])
        known = [n for n in snap.running if 0 <= snap.replica_of.get(n.key, -1) < len(pod.replicas)]
        for need in known:
            pod._put(need, snap.replica_of[need.key])
        for need in snap.running:
            if need.key not in pod.running:
                pod.add(need)
        return pod

    @property
    def free_slots(self) -> int:
        return sum(r.free_slots for r in self.replicas)

    def fits(self, need: Need) -> bool:
        """It fits one replica (replicas never share an experiment)."""
        return any(r.fits(need.rank, need.tokens) for r in self.replicas)

    def load(self) -> tuple[float, float]:
        return pod_load(self.replicas)

    def add(self, need: Need) -> None:
        """On the replica the pod itself will choose (an over-full one only for what already runs)."""
        chosen = choose_replica(self.replicas, need.rank, need.tokens)
        if chosen is None:
            chosen = min(range(len(self.replicas)), key=lambda i: (self.replicas[i].load(), i))
        self._put(need, chosen)

    def _put(self, need: Need, replica: int) -> None:
        self.running[need.key] = (need, replica)
        self.replicas[replica].add(need.tokens)

    def remove(self, key: str) -> Need:
        need, replica = self.running.pop(key)
        self.replicas[replica].remove(need.tokens)
        return need


def admission_order(needs: tuple[Need, ...] | list[Need]) -> list[Need]:
    """Highest priority first, then oldest, then by key (so equal snapshots sort equally)."""
    return sorted(needs, key=lambda n: (-n.priority, n.created, n.key))


def schedule(snapshot: Snapshot) -> list[Decision]:
    """Decide where each waiting experiment goes, whom it preempts, or why it waits."""
    pods = [_PodState.of(p) for p in sorted(snapshot.pods, key=lambda p: p.name)]
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
    """The single running experiment whose removal makes room on its replica, cheapest first; None if
    there is none."""
    best: tuple[tuple[int, float, str, str], _PodState, str] | None = None
    for pod in pods:
        if need.rank > pod.snap.max_rank or need.tokens > pod.snap.tokens_per_tick:
            continue
        for running, replica in pod.running.values():
            if running.priority >= need.priority:
                continue
            room = pod.replicas[replica]
            if room.free_slots + 1 < 1 or need.tokens > room.free_tokens + running.tokens:
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
    where = " on one replica" if any(p.snap.replicas > 1 for p in pods) else ""
    return f"no pod has {need.tokens} tokens per tick and a slot free{where}"
