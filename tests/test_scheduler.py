"""Table-driven tests of the pure scheduler: placement, limits, order, preemption, determinism."""

from __future__ import annotations

import random
import time

import pytest

from clora_operator.scheduler import (
    Decision,
    Need,
    Place,
    PodSnapshot,
    Policy,
    Preempt,
    Queue,
    Snapshot,
    admission_order,
    schedule,
)


def pod(name: str, *running: Need, slots: int = 4, rank: int = 64, tokens: int = 1000) -> PodSnapshot:
    return PodSnapshot(name=name, max_adapters=slots, max_rank=rank, tokens_per_tick=tokens, running=running)


def need(key: str, *, rank: int = 8, tokens: int = 100, priority: int = 0, created: float = 0.0) -> Need:
    return Need(key=key, rank=rank, tokens=tokens, priority=priority, created=created)


CASES: list[tuple[str, Snapshot, list[Decision]]] = [
    (
        "spread: each new experiment goes to the least loaded pod",
        Snapshot(
            pods=(pod("p1"), pod("p2")),
            waiting=(need("a", created=1), need("b", created=2), need("c", created=3)),
        ),
        [Place("a", "p1"), Place("b", "p2"), Place("c", "p1")],
    ),
    (
        "spread: an idle pod wins over a busy one even if the busy one sorts first",
        Snapshot(pods=(pod("p1", need("x")), pod("p2")), waiting=(need("a"),)),
        [Place("a", "p2")],
    ),
    (
        "spread: load is measured by token share first",
        Snapshot(
            pods=(pod("p1", need("x", tokens=600)), pod("p2", need("y", tokens=100), need("z", tokens=100))),
            waiting=(need("a"),),
        ),
        [Place("a", "p2")],
    ),
    (
        "pack: the most loaded pod that still fits",
        Snapshot(
            pods=(pod("p1"), pod("p2", need("x"))),
            waiting=(need("a", created=1), need("b", created=2)),
            policy=Policy.PACK,
        ),
        [Place("a", "p2"), Place("b", "p2")],
    ),
    (
        "pack: a full pod is skipped",
        Snapshot(
            pods=(pod("p1"), pod("p2", need("x"), slots=1)),
            waiting=(need("a"),),
            policy=Policy.PACK,
        ),
        [Place("a", "p1")],
    ),
    (
        "rank limit: only the pod with a large enough maxRank",
        Snapshot(pods=(pod("p1", rank=8), pod("p2", rank=64)), waiting=(need("a", rank=32),)),
        [Place("a", "p2")],
    ),
    (
        "rank limit: no pod at all",
        Snapshot(pods=(pod("p1", rank=8),), waiting=(need("a", rank=32),)),
        [Queue("a", "rank 32 is above every pod's maxRank")],
    ),
    (
        "token limit: the budget left decides, not the slots",
        Snapshot(
            pods=(pod("p1", need("x", tokens=900)), pod("p2", need("y", tokens=950))),
            waiting=(need("a", tokens=100), need("b", tokens=100)),
        ),
        [Place("a", "p1"), Queue("b", "no pod has 100 tokens per tick and a slot free")],
    ),
    (
        "token limit: larger than any pod",
        Snapshot(pods=(pod("p1"),), waiting=(need("a", tokens=5000),)),
        [Queue("a", "needs 5000 tokens per tick, more than any pod's tokensPerTick")],
    ),
    (
        "slots: full pods queue the rest with the reason",
        Snapshot(
            pods=(pod("p1", slots=1), pod("p2", slots=1)),
            waiting=(need("a", created=1), need("b", created=2), need("c", created=3)),
        ),
        [
            Place("a", "p1"),
            Place("b", "p2"),
            Queue("c", "all 2 runtime pods are full (no free adapter slot)"),
        ],
    ),
    (
        "no pods: everything waits",
        Snapshot(pods=(), waiting=(need("a"),)),
        [Queue("a", "no runtime pod is ready")],
    ),
    (
        "priority order: the higher priority gets the last slot even if younger",
        Snapshot(
            pods=(pod("p1", slots=1),),
            waiting=(need("old", created=1), need("vip", priority=5, created=9)),
        ),
        [Place("vip", "p1"), Queue("old", "all 1 runtime pods are full (no free adapter slot)")],
    ),
    (
        "FIFO among equal priorities",
        Snapshot(
            pods=(pod("p1", slots=1),),
            waiting=(need("young", created=5), need("old", created=1)),
        ),
        [Place("old", "p1"), Queue("young", "all 1 runtime pods are full (no free adapter slot)")],
    ),
    (
        "preemption: the lowest-priority running experiment makes room",
        Snapshot(
            pods=(
                pod("p1", need("lo", priority=1), need("mid", priority=3), slots=2),
                pod("p2", need("lo2", priority=2), need("mid2", priority=3), slots=2),
            ),
            waiting=(need("vip", priority=5),),
        ),
        [Preempt("lo", "p1", by="vip"), Place("vip", "p1")],
    ),
    (
        "preemption: equal priorities never preempt",
        Snapshot(pods=(pod("p1", need("x", priority=5), slots=1),), waiting=(need("a", priority=5),)),
        [Queue("a", "all 1 runtime pods are full (no free adapter slot)")],
    ),
    (
        "preemption: among equal victims, the youngest goes (least work lost)",
        Snapshot(
            pods=(
                pod("p1", need("older", created=1), slots=1),
                pod("p2", need("younger", created=7), slots=1),
            ),
            waiting=(need("vip", priority=1),),
        ),
        [Preempt("younger", "p2", by="vip"), Place("vip", "p2")],
    ),
    (
        "preemption: only where removing the victim frees enough tokens",
        Snapshot(
            pods=(
                pod("p1", need("small", tokens=100), need("big", tokens=800, priority=3), slots=2),
                pod("p2", need("mid", tokens=600, priority=2), slots=1),
            ),
            waiting=(need("vip", tokens=700, priority=5),),
        ),
        [Preempt("mid", "p2", by="vip"), Place("vip", "p2")],
    ),
    (
        "preemption: not on a pod whose maxRank is too small",
        Snapshot(
            pods=(pod("p1", need("lo"), slots=1, rank=8), pod("p2", need("lo2", priority=1), slots=1)),
            waiting=(need("vip", rank=32, priority=5),),
        ),
        [Preempt("lo2", "p2", by="vip"), Place("vip", "p2")],
    ),
    (
        "a victim is not placed again in the same pass, and the next waiting one still queues",
        Snapshot(
            pods=(pod("p1", need("lo"), slots=1),),
            waiting=(need("vip", priority=5, created=2), need("other", created=1)),
        ),
        [
            Preempt("lo", "p1", by="vip"),
            Place("vip", "p1"),
            Queue("other", "all 1 runtime pods are full (no free adapter slot)"),
        ],
    ),
]


@pytest.mark.parametrize(("snapshot", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_schedule(snapshot: Snapshot, expected: list[Decision]) -> None:
    assert schedule(snapshot) == expected


def test_admission_order_is_priority_then_fifo_then_key() -> None:
    needs = [
        need("b", created=1),
        need("a", created=1),
        need("c", priority=1, created=9),
        need("d", created=0),
    ]
    assert [n.key for n in admission_order(needs)] == ["c", "d", "a", "b"]


def random_snapshot(seed: int, n_pods: int, n_experiments: int) -> Snapshot:
    rng = random.Random(seed)
    pods = tuple(
        PodSnapshot(
            name=f"pod-{i:03d}",
            max_adapters=rng.choice([4, 8, 16]),
            max_rank=rng.choice([16, 64]),
            tokens_per_tick=rng.choice([16384, 65536]),
        )
        for i in range(n_pods)
    )
    waiting = tuple(
        Need(
            key=f"ns/exp-{i:04d}",
            rank=rng.choice([4, 8, 16, 32]),
            tokens=rng.choice([512, 2048, 8192]),
            priority=rng.choice([0, 0, 0, 1, 5]),
            created=float(rng.randrange(10_000)),
        )
        for i in range(n_experiments)
    )
    return Snapshot(pods=pods, waiting=waiting)


def test_deterministic_whatever_the_input_order() -> None:
    snap = random_snapshot(seed=7, n_pods=20, n_experiments=200)
    shuffled = Snapshot(
        pods=tuple(random.Random(1).sample(snap.pods, len(snap.pods))),
        waiting=tuple(random.Random(2).sample(snap.waiting, len(snap.waiting))),
    )
    first = schedule(snap)
    assert first == schedule(snap) == schedule(shuffled)


def test_never_exceeds_capacity() -> None:
    snap = random_snapshot(seed=3, n_pods=10, n_experiments=300)
    needs = {n.key: n for n in snap.waiting}
    by_pod: dict[str, list[Need]] = {}
    for d in schedule(snap):
        if isinstance(d, Place):
            by_pod.setdefault(d.pod, []).append(needs[d.key])
    pods = {p.name: p for p in snap.pods}
    assert by_pod, "something must have been placed"
    for name, placed in by_pod.items():
        p = pods[name]
        assert len(placed) <= p.max_adapters
        assert sum(n.tokens for n in placed) <= p.tokens_per_tick
        assert all(n.rank <= p.max_rank for n in placed)


def test_benchmark_1000_experiments_over_100_pods(capsys: pytest.CaptureFixture[str]) -> None:
    """Benchmark, not a timed assertion: prints the time; checks the decisions are complete."""
    snap = random_snapshot(seed=11, n_pods=100, n_experiments=1000)
    start = time.perf_counter()
    decisions = schedule(snap)
    elapsed = time.perf_counter() - start
    decided = {d.key for d in decisions if not isinstance(d, Preempt)}
    assert decided == {n.key for n in snap.waiting}
    with capsys.disabled():
        print(f"\nscheduler: 1000 experiments over 100 pods in {elapsed * 1000:.1f} ms")


def test_an_experiment_lost_with_its_pod_moves_to_another_node_while_one_fits() -> None:
    """The replacement pod on the lost node is emptiest (spread would pick it); another node is preferred,
    and the lost node is still used when nothing else fits."""
    lost = Need(key="ns/r1", rank=8, tokens=100, avoid_nodes=frozenset({"node-a"}))
    replacement = PodSnapshot(name="p-a", node="node-a", max_adapters=4, max_rank=64, tokens_per_tick=1000)
    other = PodSnapshot(
        name="p-b", node="node-b", max_adapters=4, max_rank=64, tokens_per_tick=1000, running=(need("ns/x"),)
    )
    assert schedule(Snapshot(pods=(replacement, other), waiting=(lost,))) == [Place(key="ns/r1", pod="p-b")]
    full = PodSnapshot(
        name="p-b", node="node-b", max_adapters=1, max_rank=64, tokens_per_tick=1000, running=(need("ns/x"),)
    )
    assert schedule(Snapshot(pods=(replacement, full), waiting=(lost,))) == [Place(key="ns/r1", pod="p-a")]
