"""What the operator keeps in memory (in kopf's memo): per LoRARuntime, a cache of its pods, the
runtimes' answers and the statuses written here.

Nothing here is a source of truth: where each experiment is comes from the runtimes' answers and the
experiments' statuses (runtimePod) on every pass (pool.py), so a restarted operator, or one whose
cache was dropped, takes the same decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import kopf
import pydantic

from clora.api import LoRAExperimentSpec
from clora.api.runtime_api import CheckpointRef, ExperimentState
from clora.metrics import OperatorMetrics
from clora_operator.config import OperatorConfig
from clora_operator.k8s import Conflict, KubeClient, KubeError
from clora_operator.pods import PodInfo
from clora_operator.runtime_client import RuntimeClient, RuntimeUnavailable


def experiment_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


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
    resource_version: str | None
    deleting: bool
    parsed: LoRAExperimentSpec | None
    """The spec parsed by the models; None when it does not parse (the handler fails it)."""
    problem: str = ""

    @property
    def key(self) -> str:
        return experiment_key(self.namespace, self.name)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ExperimentRecord:
        parsed: LoRAExperimentSpec | None = None
        problem = ""
        try:
            raw = json.loads(json.dumps(dict(body), default=str))
        except (RecursionError, ValueError):
            # Nested deeper than this process can walk: kept as an unparsed record (the validation
            # handler fails it), so it holds up no other experiment.
            raw = {"metadata": dict(body.get("metadata") or {}), "status": dict(body.get("status") or {})}
            problem = "nested too deeply to read"
        meta = raw.get("metadata") or {}
        spec = raw.get("spec") or {}
        if not problem:
            try:
                parsed = LoRAExperimentSpec.model_validate(spec)
            except (ValueError, RecursionError) as e:
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
            resource_version=meta.get("resourceVersion"),
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
    asked_at: float = 0.0
    """time.time() when the last good answer was asked for."""
    failures: int = 0
    """Polls in a row that got no answer."""
    removed: dict[str, CheckpointRef | None] = field(default_factory=dict)
    """Experiments the runtime lists as removed (a DELETE finished after answering 202), with the
    final checkpoint of each."""


@dataclass(frozen=True, slots=True)
class Written:
    """A status this operator wrote, until the index shows the object has moved on."""

    superseded: frozenset[str]
    """resourceVersions older than this write (what the index shows until it catches up)."""
    version: str
    status: dict[str, Any]


@dataclass
class Pool:
    """One LoRARuntime as this operator last saw it. Every field is a cache of what the cluster and
    the runtimes say (or work in flight): `forget` drops the caches at any time, and the next pass
    takes the same decisions from the cluster and the runtimes alone."""

    namespace: str
    name: str
    pods: dict[str, PodView] = field(default_factory=dict)
    written: dict[str, Written] = field(default_factory=dict)
    """key -> the status as last written here, newer than the index until the watch catches up."""
    token: str | None = None
    synced: bool = False
    """Pods listed and token read since this pool was made: until then, no pod is known to be gone."""
    busy: set[str] = field(default_factory=set)
    """Experiments with a PUT or DELETE in flight: nothing else is decided for them until it ends."""
    touched: dict[str, float] = field(default_factory=dict)
    """key -> time.time() its last PUT or DELETE ended: a poll answer asked before that is older
    than what the call's answer told, and is not applied to it."""
    pollers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    kick: asyncio.Event = field(default_factory=asyncio.Event)
    status: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, Any] = field(default_factory=dict)
    """key -> the spec of the aibrix ModelAdapter last applied for it (applied again when it differs)."""

    def forget(self) -> None:
        """Drops every cache (not the work in flight): what a restarted operator starts from."""
        self.written.clear()
        self.adapters.clear()
        self.token = None
        self.synced = False
        self.status = {}
        for view in self.pods.values():
            view.answer, view.removed, view.failures = None, {}, 0

    def current(self, record: ExperimentRecord) -> tuple[dict[str, Any], str | None]:
        """The experiment's newest known status and the resourceVersion it belongs to: what this
        operator wrote while the index still shows the object it wrote over, else the index."""
        mine = self.written.get(record.key)
        if mine is not None and record.resource_version in mine.superseded:
            return mine.status, mine.version
        self.written.pop(record.key, None)
        return record.status, record.resource_version

    def status_of(self, record: ExperimentRecord) -> dict[str, Any]:
        return self.current(record)[0]

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

    def count_error(self, kind: str, reason: str) -> None:
        self.metrics.reconcile_errors.labels(kind, reason).inc()

    @contextlib.contextmanager
    def handler_errors(self, kind: str) -> Iterator[None]:
        """Counts an error escaping a handler by its reason, and steers kopf's retries by what it is:
        a retry may fix an unreachable runtime or API server, or a write conflict (TemporaryError);
        it cannot fix a spec that does not parse (PermanentError). kopf's own errors, raised on
        purpose, pass as they are; anything else is a bug: counted, then kopf logs it with its
        traceback and retries with backoff."""
        try:
            yield
        except (kopf.TemporaryError, kopf.PermanentError):
            raise
        except RuntimeUnavailable as e:
            self.count_error(kind, "RuntimeUnavailable")
            raise kopf.TemporaryError(str(e), delay=self.config.poll_interval) from e
        except Conflict as e:
            self.count_error(kind, "Conflict")
            raise kopf.TemporaryError(f"changed meanwhile, read again: {e}", delay=1.0) from e
        except KubeError as e:
            self.count_error(kind, f"HTTP{e.status}")
            raise kopf.TemporaryError(
                f"the API server refused: {e}", delay=5.0 if e.status >= 500 else 30.0
            ) from e
        except (aiohttp.ClientError, TimeoutError) as e:
            self.count_error(kind, "APIUnavailable")
            raise kopf.TemporaryError(f"the API server did not answer: {e!r}", delay=5.0) from e
        except pydantic.ValidationError as e:
            self.count_error(kind, "InvalidSpec")
            raise kopf.PermanentError(str(e)) from e
        except Exception as e:
            self.count_error(kind, type(e).__name__)
            raise

    def reset_pool(self, namespace: str, runtime: str) -> Pool:
        """A fresh pool: what the LoRARuntime's daemon starts from (cache-free, like a restart)."""
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
