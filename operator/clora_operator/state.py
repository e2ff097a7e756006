"""What the operator keeps in memory (in kopf's memo): per LoRARuntime, its pods and placements.

Nothing here is the source of truth across restarts: placements are written into each
experiment's status (runtimePod), and a restarted operator adopts them again from there and
checks them against the runtimes' answers (pool.py, `_recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from clora.api import LoRAExperimentSpec
from clora.api.runtime_api import ExperimentState
from clora.metrics import OperatorMetrics
from clora_operator.config import OperatorConfig
from clora_operator.k8s import KubeClient
from clora_operator.pods import PodInfo
from clora_operator.runtime_client import RuntimeClient


def experiment_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def spec_hash(spec: Mapping[str, Any]) -> str:
    """Hash of what the runtime must know of a spec; suspend and priority are the operator's business."""
    shown = {k: v for k, v in spec.items() if k not in ("suspend", "priority")}
    return hashlib.sha256(json.dumps(shown, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class ExperimentRecord:
    """One LoRAExperiment as the index last saw it (a copy, not a live view)."""

    namespace: str
    name: str
    uid: str
    spec: dict[str, Any]
    status: dict[str, Any]
    labels: dict[str, str]
    created: float
    generation: int | None
    deleting: bool
    parsed: LoRAExperimentSpec | None
    """The spec parsed by the models; None when it does not parse (the handler fails it)."""
    problem: str = ""

    @property
    def key(self) -> str:
        return experiment_key(self.namespace, self.name)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ExperimentRecord:
        raw = json.loads(json.dumps(dict(body), default=str))
        meta = raw.get("metadata") or {}
        spec = raw.get("spec") or {}
        parsed: LoRAExperimentSpec | None = None
        problem = ""
        try:
            parsed = LoRAExperimentSpec.model_validate(spec)
        except ValueError as e:
            problem = str(e)
        created = meta.get("creationTimestamp")
        return cls(
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            spec=spec,
            status=raw.get("status") or {},
            labels=meta.get("labels") or {},
            created=_epoch(created),
            generation=meta.get("generation"),
            deleting=bool(meta.get("deletionTimestamp")),
            parsed=parsed,
            problem=problem,
        )


def _epoch(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


@dataclass(slots=True)
class PodView:
    """A runtime pod: its object, and what its runtime last answered."""

    info: PodInfo
    answer: dict[str, ExperimentState] | None = None
    answered_at: float = 0.0
    """time.monotonic() of the last good answer."""
    failures: int = 0
    """Polls in a row that got no answer."""
    removed: frozenset[str] = frozenset()
    """Experiments the runtime lists as removed (a DELETE finished after answering 202)."""


@dataclass(slots=True)
class Placement:
    """An experiment the operator put on a pod."""

    pod: str
    spec_hash: str
    since: float
    """time.monotonic() when it was put there (0 for one adopted after a restart)."""


@dataclass
class Pool:
    """One LoRARuntime's pods, placements and the statuses this operator wrote last."""

    namespace: str
    name: str
    placements: dict[str, Placement] = field(default_factory=dict)
    pods: dict[str, PodView] = field(default_factory=dict)
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    """key -> the status as last written here: newer than the index until the watch catches up."""
    avoid_nodes: dict[str, frozenset[str]] = field(default_factory=dict)
    """key -> nodes whose runtime pod lost that experiment (the scheduler prefers other nodes)."""
    token: str | None = None
    recovered: bool = False
    kick: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while placements change or statuses are written, so pollers and the scheduler agree."""
    status: dict[str, Any] = field(default_factory=dict)

    def status_of(self, record: ExperimentRecord) -> dict[str, Any]:
        return self.written.get(record.key) or record.status

    def wake(self) -> None:
        self.kick.set()

    async def nap(self, seconds: float, stopped: Any = None) -> None:
        """Sleeps until woken, until `stopped` (an awaitable flag) is set, or `seconds` pass."""

        async def until_stopped() -> None:
            await stopped.wait()

        waiters = [asyncio.ensure_future(self.kick.wait())]
        if stopped is not None:
            waiters.append(asyncio.ensure_future(until_stopped()))
        _, pending = await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        for waiter in pending:
            waiter.cancel()
        self.kick.clear()


@dataclass
class OperatorState:
    """Everything the handlers share, kept in kopf's memo under MEMO_KEY."""

    config: OperatorConfig
    metrics: OperatorMetrics
    kube: KubeClient
    runtime: RuntimeClient
    pools: dict[tuple[str, str], Pool] = field(default_factory=dict)
    phase_counts: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    closing: bool = False
    """Set when the operator stops, before its clients close."""

    @contextlib.contextmanager
    def counting_errors(self, kind: str) -> Iterator[None]:
        """Counts an exception escaping a handler (then lets it go on to kopf's retries)."""
        try:
            yield
        except Exception:
            self.metrics.reconcile_errors.labels(kind).inc()
            raise

    def reset_pool(self, namespace: str, runtime: str) -> Pool:
        self.pools[(namespace, runtime)] = Pool(namespace=namespace, name=runtime)
        return self.pools[(namespace, runtime)]

    def pool(self, namespace: str, runtime: str) -> Pool:
        key = (namespace, runtime)
        if key not in self.pools:
            self.pools[key] = Pool(namespace=namespace, name=runtime)
        return self.pools[key]


MEMO_KEY = "clora"


def state_of(memo: Any) -> OperatorState:
    state = memo.get(MEMO_KEY) if hasattr(memo, "get") else None
    if not isinstance(state, OperatorState):
        raise RuntimeError("the operator state is missing from kopf's memo (startup did not run)")
    return state
