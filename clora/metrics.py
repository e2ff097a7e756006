"""Every Prometheus metric clora exports, named and documented in one place.

The runtime and the operator each build their own set on their own registry; the Grafana dashboard
(charts/clora/dashboards/) queries exactly these names, and a test checks both directions.

Per-experiment RL statistics (EXPERIMENT_STATS) are named as TRL users know them; each is one gauge
`clora_experiment_<stat>` (labels namespace, name) holding the value of the experiment's last step,
the same number as the `stats` object of the runtime's GET /v1/experiments answer and of
`clora run`'s summary JSON. docs/metrics.md explains each in words.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

PREFIX = "clora_"

# name -> help text. Counters are listed without the _total suffix prometheus-client adds.
RUNTIME_METRICS: dict[str, str] = {
    "clora_experiment_step": "Optimizer steps an experiment has done (labels namespace, name).",
    "clora_experiment_reward": "Mean reward of an experiment's last step (labels namespace, name).",
    "clora_tick_duration_seconds": "Time of one tick, by phase: sample, reward, train, sync.",
    "clora_tokens_sampled": "Completion tokens sampled, all experiments together.",
    "clora_tokens_trained": "Tokens that went through a training forward/backward.",
    "clora_active_adapters": "Experiments (adapters) loaded on this runtime.",
    "clora_free_slots": "Adapter slots still free on this runtime.",
    "clora_checkpoint_duration_seconds": "Time to write one adapter checkpoint.",
}
# stat key (camelCase, as in the API's `stats` object) -> (gauge name, help text).
EXPERIMENT_STATS: dict[str, tuple[str, str]] = {
    "loss": (
        "clora_experiment_loss",
        "Policy loss of an experiment's last step (mean over its updates), the KL term included.",
    ),
    "kl": (
        "clora_experiment_kl",
        "Mean per-token KL (k3 estimate) of the policy to the base model at the last step;"
        " only when klCoef > 0.",
    ),
    "gradNorm": (
        "clora_experiment_grad_norm",
        "Gradient norm of the adapter before clipping at the last step (mean over its updates).",
    ),
    "completionLength": (
        "clora_experiment_completion_length",
        "Mean completion length in tokens of the last step's samples.",
    ),
    "fracRewardZeroStd": (
        "clora_experiment_frac_reward_zero_std",
        "Fraction of the last step's groups whose rewards were all equal (no learning signal).",
    ),
    "clipFraction": (
        "clora_experiment_clip_fraction",
        "Fraction of completion tokens whose probability ratio was clipped at the last step"
        " (0 with updatesPerBatch 1: the ratio is 1 on the first update).",
    ),
    "entropy": (
        "clora_experiment_entropy",
        "Mean entropy (nats) of the policy at the last step's sampled tokens, at the sampling temperature.",
    ),
}
RUNTIME_METRICS.update({gauge: text for gauge, text in EXPERIMENT_STATS.values()})
OPERATOR_METRICS: dict[str, str] = {
    "clora_experiments": "LoRAExperiments by phase (label phase).",
    "clora_admission_wait_seconds": "Time from creating an experiment to its first placement on a pod.",
    "clora_scheduling_decisions": "Scheduler decisions, by kind: place, queue, preempt.",
    "clora_runtime_pods_ready": "Ready runtime pods per LoRARuntime (labels namespace, runtime).",
    "clora_reconcile_errors": "Handler errors, by resource kind and reason (RuntimeUnavailable, Conflict,"
    " APIUnavailable, HTTP<status>, InvalidSpec, or the exception's type).",
}
# A pod of several replicas (LoRARuntime spec.replicas > 1) labels these with `replica` (0-based): they
# describe one engine. Per-experiment series need no label: an experiment lives on one replica.
REPLICA_LABEL = "replica"
PER_REPLICA_METRICS = frozenset(
    {
        "clora_tick_duration_seconds",
        "clora_tokens_sampled",
        "clora_tokens_trained",
        "clora_active_adapters",
        "clora_free_slots",
        "clora_checkpoint_duration_seconds",
    }
)
TICK_PHASES = ("sample", "reward", "train", "sync")
_SECONDS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass
class RuntimeMetrics:
    """The runtime's metrics, on a registry of its own (one per server, so tests can run several)."""

    registry: CollectorRegistry
    experiment_step: Gauge
    experiment_reward: Gauge
    tick_duration: Histogram
    tokens_sampled: Counter
    tokens_trained: Counter
    active_adapters: Gauge
    free_slots: Gauge
    checkpoint_duration: Histogram
    experiment_stats: dict[str, Gauge]  # EXPERIMENT_STATS key -> gauge
    # Refreshing an experiment's series and dropping them must not interleave, or a scrape could bring
    # a removed experiment's series back.
    _series_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> RuntimeMetrics:
        r = registry or CollectorRegistry()
        m = RUNTIME_METRICS
        return cls(
            registry=r,
            experiment_step=Gauge(
                "clora_experiment_step", m["clora_experiment_step"], ["namespace", "name"], registry=r
            ),
            experiment_reward=Gauge(
                "clora_experiment_reward", m["clora_experiment_reward"], ["namespace", "name"], registry=r
            ),
            tick_duration=Histogram(
                "clora_tick_duration_seconds",
                m["clora_tick_duration_seconds"],
                ["phase"],
                buckets=_SECONDS,
                registry=r,
            ),
            tokens_sampled=Counter("clora_tokens_sampled", m["clora_tokens_sampled"], registry=r),
            tokens_trained=Counter("clora_tokens_trained", m["clora_tokens_trained"], registry=r),
            active_adapters=Gauge("clora_active_adapters", m["clora_active_adapters"], registry=r),
            free_slots=Gauge("clora_free_slots", m["clora_free_slots"], registry=r),
            checkpoint_duration=Histogram(
                "clora_checkpoint_duration_seconds",
                m["clora_checkpoint_duration_seconds"],
                buckets=_SECONDS,
                registry=r,
            ),
            experiment_stats={
                key: Gauge(gauge, text, ["namespace", "name"], registry=r)
                for key, (gauge, text) in EXPERIMENT_STATS.items()
            },
        )

    def set_experiment_stats(self, namespace: str, name: str, stats: Mapping[str, float | None]) -> None:
        """One experiment's RL statistics of its last step; a missing or non-finite value drops its series."""
        for key, gauge in self.experiment_stats.items():
            value = stats.get(key)
            if value is not None and math.isfinite(value):
                gauge.labels(namespace, name).set(value)
            else:
                with contextlib.suppress(KeyError):
                    gauge.remove(namespace, name)

    def forget_experiment(self, namespace: str, name: str) -> None:
        """Drop an experiment's series once it leaves the runtime."""
        with self._series_lock:
            for gauge in (self.experiment_step, self.experiment_reward, *self.experiment_stats.values()):
                with contextlib.suppress(KeyError):
                    gauge.remove(namespace, name)

    def refresh(self, states: Callable[[], Iterable[_Progress]] | None) -> None:
        """Step and reward of every experiment `states()` lists (the engine's, once it is loaded): also
        covers an experiment resumed from a checkpoint that has not stepped here yet."""
        if states is None:
            return
        with self._series_lock:
            for s in states():
                self.experiment_step.labels(s.namespace, s.name).set(s.step)
                if s.reward.mean is not None and math.isfinite(s.reward.mean):
                    self.experiment_reward.labels(s.namespace, s.name).set(s.reward.mean)

    def exposition(self, states: Callable[[], Iterable[_Progress]] | None) -> bytes:
        """The registry in the Prometheus text format, refreshed first (see refresh)."""
        self.refresh(states)
        return generate_latest(self.registry)


class _Reward(Protocol):
    mean: float | None


class _Progress(Protocol):
    """What exposition() reads of an experiment (clora.api.runtime_api.ExperimentState)."""

    namespace: str
    name: str
    step: int
    reward: _Reward


def label_replicas(per_replica: Sequence[Iterable[Metric]]) -> list[Metric]:
    """One pod's metric families from those of its replicas (index = replica): PER_REPLICA_METRICS get
    a `replica` label, the rest (per-experiment series) are merged as they are."""
    merged: dict[str, Metric] = {}
    for replica, families in enumerate(per_replica):
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type)
            labelled = family.name in PER_REPLICA_METRICS
            for sample in family.samples:
                labels = {**sample.labels, REPLICA_LABEL: str(replica)} if labelled else sample.labels
                into.add_sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar)
    return list(merged.values())


@dataclass
class OperatorMetrics:
    """The operator's metrics."""

    registry: CollectorRegistry
    experiments: Gauge
    admission_wait: Histogram
    scheduling_decisions: Counter
    runtime_pods_ready: Gauge
    reconcile_errors: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> OperatorMetrics:
        r = registry or CollectorRegistry()
        m = OPERATOR_METRICS
        return cls(
            registry=r,
            experiments=Gauge("clora_experiments", m["clora_experiments"], ["phase"], registry=r),
            admission_wait=Histogram(
                "clora_admission_wait_seconds",
                m["clora_admission_wait_seconds"],
                buckets=_SECONDS,
                registry=r,
            ),
            scheduling_decisions=Counter(
                "clora_scheduling_decisions", m["clora_scheduling_decisions"], ["decision"], registry=r
            ),
            runtime_pods_ready=Gauge(
                "clora_runtime_pods_ready",
                m["clora_runtime_pods_ready"],
                ["namespace", "runtime"],
                registry=r,
            ),
            reconcile_errors=Counter(
                "clora_reconcile_errors", m["clora_reconcile_errors"], ["kind", "reason"], registry=r
            ),
        )
