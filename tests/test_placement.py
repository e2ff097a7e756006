"""The shared fits/load rule (clora.placement) and the scheduler over pods of several replicas."""

from __future__ import annotations

import random

from clora.placement import EngineCapacity, Occupancy, choose_replica
from clora_operator.scheduler import Need, Place, PodSnapshot, Preempt, Queue, Snapshot, schedule

CAP = EngineCapacity(max_adapters=2, max_rank=16, tokens_per_tick=1000)


def need(key: str, *, tokens: int = 100, rank: int = 8, priority: int = 0, created: float = 0.0) -> Need:
    return Need(key=key, rank=rank, tokens=tokens, priority=priority, created=created)


def replicas(*used: tuple[int, int]) -> list[Occupancy]:
    return [Occupancy(CAP, adapters=a, tokens=t) for a, t in used]


def test_choose_replica_least_loaded_that_fits() -> None:
    assert choose_replica(replicas((0, 0), (0, 0)), 8, 100) == 0  # a tie: the lowest index
    assert choose_replica(replicas((1, 100), (0, 0)), 8, 100) == 1
    assert choose_replica(replicas((0, 0), (1, 50)), 8, 100) == 0  # tokens before slots
    # 950 used leaves 50: only the other fits, though it has fewer free slots.
    assert choose_replica(replicas((0, 950), (1, 100)), 8, 100) == 1


def test_choose_replica_falls_back_to_a_free_slot_then_none() -> None:
    # Nowhere with the budget left: the least loaded replica with a slot (the engine time-shares).
    assert choose_replica(replicas((1, 990), (1, 950)), 8, 100) == 1
    assert choose_replica(replicas((2, 200), (1, 950)), 8, 100) == 1
    assert choose_replica(replicas((2, 0), (2, 0)), 8, 100) is None  # no slot
    assert choose_replica(replicas((0, 0), (0, 0)), 32, 100) is None  # rank above maxRank


def pod(name: str, *running: Need, n: int = 2, where: dict[str, int] | None = None) -> PodSnapshot:
    return PodSnapshot(
        name=name,
        max_adapters=CAP.max_adapters,
        max_rank=CAP.max_rank,
        tokens_per_tick=CAP.tokens_per_tick,
        running=running,
        replicas=n,
        replica_of=where or {},
    )


def test_capacity_is_per_replica() -> None:
    waiting = tuple(need(f"e{i}", created=i) for i in range(5))
    decisions = schedule(Snapshot(pods=(pod("p"),), waiting=waiting))
    assert decisions[:4] == [Place(f"e{i}", "p") for i in range(4)]  # 2 replicas x 2 slots
    assert isinstance(decisions[4], Queue) and "full" in decisions[4].reason


def test_an_experiment_fits_a_pod_only_if_it_fits_one_replica() -> None:
    # 150 tokens free in all, but 100 and 50 per replica: 120 fits neither.
    running = (need("a", tokens=900), need("b", tokens=950))
    full = pod("p", *running, where={"a": 0, "b": 1})
    decisions = schedule(Snapshot(pods=(full,), waiting=(need("c", tokens=120),)))
    assert decisions == [Queue("c", "no pod has 120 tokens per tick and a slot free on one replica")]
    assert schedule(Snapshot(pods=(full,), waiting=(need("c", tokens=100),))) == [Place("c", "p")]


def test_the_reported_replica_counts_and_unreported_ones_are_predicted() -> None:
    # a and b both reported on replica 0: it is full, so c (rank fits) must go to replica 1 and the
    # pod still has room for exactly one more after it.
    p = pod("p", need("a"), need("b"), where={"a": 0, "b": 0})
    decisions = schedule(Snapshot(pods=(p,), waiting=(need("c", created=1), need("d", created=2))))
    assert decisions == [Place("c", "p"), Place("d", "p")]
    p = pod("p", need("a"), need("b"), need("c"), where={"a": 0, "b": 0})  # c unreported: replica 1
    decisions = schedule(Snapshot(pods=(p,), waiting=(need("d", created=1), need("e", created=2))))
    assert decisions[0] == Place("d", "p") and isinstance(decisions[1], Queue)


def test_preemption_frees_room_on_the_victims_replica() -> None:
    # Replica 0: low-priority x (800 tokens); replica 1: y (priority 5, 900 tokens). A priority-3
    # need of 500 tokens fits only once x leaves: x is the victim, y (higher) is never touched.
    p = pod("p", need("x", tokens=800), need("y", tokens=900, priority=5), where={"x": 0, "y": 1})
    decisions = schedule(Snapshot(pods=(p,), waiting=(need("hi", tokens=500, priority=3),)))
    assert decisions == [Preempt("x", "p", by="hi"), Place("hi", "p")]


def test_never_exceeds_a_replica() -> None:
    rng = random.Random(5)
    pods = tuple(pod(f"p{i}", n=rng.choice([1, 2, 4])) for i in range(6))
    waiting = tuple(
        need(f"e{i:03d}", tokens=rng.choice([100, 300, 600]), rank=rng.choice([4, 8, 32]), created=i)
        for i in range(80)
    )
    # Replay the decisions with the pods' own rule: every placement must fit the replica it lands on.
    rooms = {p.name: [Occupancy(CAP) for _ in range(p.replicas)] for p in pods}
    by_key = {n.key: n for n in waiting}
    placed = 0
    for d in schedule(Snapshot(pods=pods, waiting=waiting)):
        if isinstance(d, Place):
            n = by_key[d.key]
            chosen = choose_replica(rooms[d.pod], n.rank, n.tokens)
            assert chosen is not None and rooms[d.pod][chosen].fits(n.rank, n.tokens), d
            rooms[d.pod][chosen].add(n.tokens)
            placed += 1
    assert 0 < placed < len(waiting)  # some fit, some (rank 32, or no room) wait
