"""clora.metrics: the pod-wide families of several replicas, and series refresh and removal."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clora.api.experiment_types import Reward
from clora.api.runtime_api import ExperimentState
from clora.metrics import PER_REPLICA_METRICS, REPLICA_LABEL, RUNTIME_METRICS, RuntimeMetrics, label_replicas


def replica(free: int, experiment: str, step: int) -> RuntimeMetrics:
    m = RuntimeMetrics.create()
    m.free_slots.set(free)
    m.tick_duration.labels("sample").observe(0.2)
    m.refresh(lambda: [ExperimentState(namespace="ns", name=experiment, phase="Running", step=step)])
    return m


def test_per_replica_series_get_a_replica_label_and_per_experiment_ones_do_not() -> None:
    assert set(RUNTIME_METRICS) >= PER_REPLICA_METRICS
    merged = label_replicas(
        [list(replica(1, "a", 3).registry.collect()), list(replica(2, "b", 5).registry.collect())]
    )

    class Fixed:
        def collect(self):  # type: ignore[no-untyped-def]
            return merged

    registry = CollectorRegistry()
    registry.register(Fixed())  # type: ignore[arg-type]
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("clora_free_slots", ((REPLICA_LABEL, "0"),))] == 1
    assert samples[("clora_free_slots", ((REPLICA_LABEL, "1"),))] == 2
    assert samples[("clora_tick_duration_seconds_count", (("phase", "sample"), (REPLICA_LABEL, "1")))] == 1
    assert samples[("clora_experiment_step", (("name", "a"), ("namespace", "ns")))] == 3
    assert samples[("clora_experiment_step", (("name", "b"), ("namespace", "ns")))] == 5
    # One family per name (a valid exposition), every sample of a per-replica family labelled.
    names = [f.name for f in merged]
    assert len(names) == len(set(names))
    for family in merged:
        assert all(
            (REPLICA_LABEL in s.labels) == (family.name in PER_REPLICA_METRICS) for s in family.samples
        )


def test_forgotten_series_are_not_brought_back_by_a_refresh_without_them() -> None:
    m = RuntimeMetrics.create()
    state = ExperimentState(namespace="ns", name="x", phase="Running", step=2, reward=Reward(mean=0.5))
    m.refresh(lambda: [state])
    assert b'clora_experiment_reward{name="x",namespace="ns"} 0.5' in generate_latest(m.registry)
    m.forget_experiment("ns", "x")
    assert b'name="x"' not in m.exposition(lambda: [])
