"""One LoRARuntime's control loop: keep its pods, place its experiments, mirror runtime progress.

The handlers call three entry points:
- `reconcile` (the LoRARuntime's daemon, after any change and every few seconds): pods and
  token Secret, lost pods, suspend/delete/terminal clean-up, then the scheduler's decisions;
- `poll_pod` (one kopf timer per runtime pod): GET /v1/experiments, then status patches for the
  experiments whose status changed;
- `release` (an experiment's deletion): checkpoint it on its pod and free the slot, never
  waiting longer than delete_timeout.

Placement changes and status writes happen under the pool's lock, so a poll answer taken before
a preemption never overwrites the preempted experiment's status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from clora.api import TERMINAL_PHASES, LoRARuntime
from clora.api.runtime_api import ExperimentState
from clora.constants import (
    LABEL_KUEUE_QUEUE,
    REASON_ADMITTED,
    REASON_FAILED,
    REASON_MISSING_DATASET,
    REASON_PREEMPTED,
    REASON_QUEUED,
    REASON_RESUMED,
    REASON_RUNTIME_LOST,
    REASON_RUNTIME_REJECTED,
    REASON_SCHEDULED,
    REASON_SUCCEEDED,
    REASON_SUSPENDED,
    REASON_WAITING_FOR_KUEUE,
)
from clora_operator import k8s, scheduler
from clora_operator.pods import PodInfo, build_token_secret, plan_pods, pod_info, secret_name
from clora_operator.runtime_client import RuntimeRejected, RuntimeUnavailable
from clora_operator.state import ExperimentRecord, OperatorState, Placement, PodView, Pool, spec_hash
from clora_operator.status import Observed, experiment_status, observe_runtime, runtime_status, status_patch

log = logging.getLogger(__name__)

# Phases in which an experiment, not on a pod, waits for the scheduler.
WAITING_PHASES = frozenset({"Queued", "Scheduled", "Running", "Suspended"})


def _now() -> datetime:
    return datetime.now(UTC)


# Status writes.


async def write_status(state: OperatorState, pool: Pool, record: ExperimentRecord, obs: Observed) -> bool:
    """Patches the experiment's status to what `obs` says, if that changes anything but timestamps."""
    current = pool.status_of(record)
    desired = experiment_status(current, obs, spec=record.spec, generation=record.generation, now=_now())
    patch = status_patch(current, desired)
    if patch is None:
        return False
    if await state.kube.patch_experiment_status(record.namespace, record.name, patch):
        pool.written[record.key] = {k: v for k, v in desired.items() if v is not None}
        return True
    return False


def _event(record: ExperimentRecord, reason: str, message: str, *, warning: bool = False) -> None:
    k8s.post_event(
        k8s.experiment_ref(record.namespace, record.name, record.uid), reason, message, warning=warning
    )


# Pods and Secret.


async def ensure_token(state: OperatorState, runtime: LoRARuntime) -> str:
    """The pool's bearer token: read from its Secret, or generated once and stored there."""
    ns, name = runtime.metadata.namespace, runtime.metadata.name
    token = await state.kube.read_token(ns, secret_name(name))
    if token:
        return token
    await state.kube.create_secret(ns, build_token_secret(runtime, secrets.token_urlsafe(32)))
    # Read back: if another replica created it first, its token wins.
    token = await state.kube.read_token(ns, secret_name(name))
    if not token:
        raise RuntimeError(f"Secret {secret_name(name)} has no token after creation")
    return token


def _sync_pod_views(pool: Pool, infos: Iterable[PodInfo]) -> None:
    seen = set()
    for info in infos:
        seen.add(info.name)
        view = pool.pods.get(info.name)
        if view is None:
            pool.pods[info.name] = PodView(info=info)
        else:
            view.info = info
    for gone in set(pool.pods) - seen:
        del pool.pods[gone]


def note_pod(pool: Pool, body: dict[str, Any], deleted: bool) -> None:
    """A watch event of a runtime pod (kept between reconcile passes)."""
    info = pod_info(body)
    if deleted:
        pool.pods.pop(info.name, None)
    elif info.name in pool.pods:
        pool.pods[info.name].info = info
    else:
        pool.pods[info.name] = PodView(info=info)


def _lost(state: OperatorState, view: PodView | None) -> str | None:
    """Why a pod can no longer be trusted with experiments, or None."""
    if view is None:
        return "is gone"
    info = view.info
    if info.deleting:
        return "is being deleted"
    if info.finished:
        return f"has finished (phase {info.phase})"
    if view.failures * state.config.poll_interval >= state.config.unresponsive_after:
        return f"has not answered for {view.failures} polls"
    return None


def _healthy(view: PodView) -> bool:
    info = view.info
    return (
        info.ready
        and not info.deleting
        and not info.finished
        and info.url is not None
        and view.answer is not None
        and view.failures == 0
    )


# The reconcile pass.


async def reconcile(
    state: OperatorState, runtime: LoRARuntime, records: list[ExperimentRecord], logger: logging.Logger
) -> None:
    """One pass over a pool: its Secret and pods, then every experiment that names it."""
    pool = state.pool(runtime.metadata.namespace, runtime.metadata.name)
    if pool.token is None:
        pool.token = await ensure_token(state, runtime)
    if not pool.recovered:
        # Before the pods are planned: a pod with experiments on it is never replaced as stale.
        async with pool.lock:
            _recover(pool, records)
            pool.recovered = True
    await _reconcile_pods(state, pool, runtime, logger)
    by_key = {r.key: r for r in records}
    async with pool.lock:
        await _drop_lost(state, pool, by_key, logger)
        await _clean_up(state, pool, by_key, logger)
        await _schedule(state, pool, runtime, records, logger)
        await _suspend_waiting(state, pool, records)
    await _write_runtime_status(state, pool, runtime)
    _count_phases(state, pool, records)


async def _reconcile_pods(
    state: OperatorState, pool: Pool, runtime: LoRARuntime, logger: logging.Logger
) -> None:
    ns, name = runtime.metadata.namespace, runtime.metadata.name
    nodes = [
        ((n.get("metadata") or {}).get("name", ""), (n.get("metadata") or {}).get("labels") or {})
        for n in await state.kube.list_nodes()
    ]
    infos = [pod_info(p) for p in await state.kube.list_runtime_pods(ns, name)]
    _sync_pod_views(pool, infos)
    # A pod that stopped answering is replaced, once its experiments were moved (below, next pass).
    broken = {
        v.info.name
        for v in pool.pods.values()
        if not v.info.deleting and v.failures * state.config.poll_interval >= state.config.unresponsive_after
    }
    busy = frozenset(p.pod for p in pool.placements.values())
    plan = plan_pods(runtime, nodes, infos, image=runtime.spec.image or state.config.runtime_image, busy=busy)
    for body in plan.create:
        logger.info("creating runtime pod %s", body["metadata"]["name"])
        await state.kube.create_pod(ns, body)
    for pod in sorted(set(plan.delete) | broken):
        logger.info("deleting runtime pod %s", pod)
        await state.kube.delete_pod(ns, pod)


def _recover(pool: Pool, records: list[ExperimentRecord]) -> None:
    """After a restart: adopt the placements the statuses record, to be checked against the pods."""
    for r in records:
        pod = r.status.get("runtimePod")
        if pod and r.status.get("phase") in ("Scheduled", "Running") and r.key not in pool.placements:
            pool.placements[r.key] = Placement(pod=pod, spec_hash=spec_hash(r.spec), since=0.0)


async def _requeue(
    state: OperatorState,
    pool: Pool,
    record: ExperimentRecord,
    reason: str,
    message: str,
    *,
    checkpoint: dict[str, Any] | None = None,
    warning: bool = True,
) -> None:
    pool.placements.pop(record.key, None)
    await write_status(
        state, pool, record, Observed(phase="Queued", reason=reason, message=message, checkpoint=checkpoint)
    )
    _event(record, reason, message, warning=warning)


def _checkpoint_note(status: dict[str, Any]) -> str:
    cp = status.get("lastCheckpoint") or {}
    return (
        f"will resume from the checkpoint of step {cp['step']}"
        if cp.get("path")
        else "will start over (no checkpoint)"
    )


async def _drop_lost(
    state: OperatorState, pool: Pool, by_key: dict[str, ExperimentRecord], logger: logging.Logger
) -> None:
    """Experiments on a lost pod, or that their pod no longer has, go back to the queue."""
    for key, placement in sorted(pool.placements.items()):
        record = by_key.get(key)
        if record is None:
            continue  # deleted: `release` or `_clean_up` handles it
        view = pool.pods.get(placement.pod)
        why = _lost(state, view)
        restarted = (
            view is not None
            and view.answer is not None
            and view.answered_at > placement.since
            and key not in view.answer
            and key not in view.removed  # removed on our DELETE: _clean_up learns its checkpoint
        )
        if why is None and restarted:
            why = "no longer has it (the runtime restarted)"
        if why is None:
            continue
        message = f"runtime pod {placement.pod} {why}; {_checkpoint_note(pool.status_of(record))}"
        logger.warning("%s: %s", key, message)
        if view is not None and view.info.node:
            pool.avoid_nodes[key] = pool.avoid_nodes.get(key, frozenset()) | {view.info.node}
        await _requeue(state, pool, record, REASON_RUNTIME_LOST, message)


async def _delete_from_pod(
    state: OperatorState, pool: Pool, key: str, pod: str
) -> tuple[bool, dict[str, Any] | None]:
    """DELETE on the pod: (done, checkpoint). Not done when the pod did not answer."""
    view = pool.pods.get(pod)
    if view is None or view.info.url is None or pool.token is None:
        return True, None  # the pod is gone: nothing left to free
    namespace, name = key.split("/", 1)
    try:
        rsp = await state.runtime.delete(view.info.url, pool.token, namespace, name)
    except RuntimeUnavailable:
        return False, None
    except RuntimeRejected:
        return True, None
    if rsp is not None and not rsp.removed:
        return False, None  # 202: its final checkpoint is written when the runtime's tick ends; ask again
    if rsp is None or rsp.checkpoint is None:
        return True, None
    return True, rsp.checkpoint.model_dump(mode="json", by_alias=True, exclude_none=True)


async def _clean_up(
    state: OperatorState, pool: Pool, by_key: dict[str, ExperimentRecord], logger: logging.Logger
) -> None:
    """Take off their pods the experiments that should not be there; re-send changed specs."""
    for key, placement in sorted(pool.placements.items()):
        record = by_key.get(key)
        status = pool.status_of(record) if record else {}
        if record is None or record.deleting or status.get("phase") in TERMINAL_PHASES:
            done, _ = await _delete_from_pod(state, pool, key, placement.pod)
            if done:
                pool.placements.pop(key, None)
            continue
        if record.spec.get("suspend"):
            done, checkpoint = await _delete_from_pod(state, pool, key, placement.pod)
            if not done:
                continue
            pool.placements.pop(key, None)
            message = "suspended: checkpointed and left its runtime"
            await write_status(
                state,
                pool,
                record,
                Observed(phase="Suspended", reason=REASON_SUSPENDED, message=message, checkpoint=checkpoint),
            )
            _event(record, REASON_SUSPENDED, f"checkpointed on {placement.pod} and freed its slot")
            continue
        current = spec_hash(record.spec)
        if current != placement.spec_hash and record.parsed is not None:
            view = pool.pods.get(placement.pod)
            if view is None or view.info.url is None or pool.token is None:
                continue
            try:
                await state.runtime.put(
                    view.info.url, pool.token, record.namespace, record.name, record.parsed, None
                )
            except RuntimeUnavailable:
                continue
            except RuntimeRejected as e:
                logger.warning("%s: the runtime refused the changed spec: %s", key, e.detail)
                _event(
                    record, REASON_RUNTIME_REJECTED, f"the changed spec was refused: {e.detail}", warning=True
                )
            placement.spec_hash = current
    # Experiments a pod has that are not placed there (a placement lost in a crash, or one that
    # finished): the runtime would train them for nobody.
    placed = {(p.pod, k) for k, p in pool.placements.items()}
    for pod, view in sorted(pool.pods.items()):
        for key in sorted(view.answer or {}):
            if (pod, key) in placed:
                continue
            record = by_key.get(key)
            if (
                record is not None
                and not record.deleting
                and record.status.get("runtimePod") == pod
                and (pool.status_of(record).get("phase") in ("Scheduled", "Running"))
            ):
                pool.placements[key] = Placement(pod=pod, spec_hash=spec_hash(record.spec), since=0.0)
                continue
            logger.info("removing %s from %s: not placed there", key, pod)
            await _delete_from_pod(state, pool, key, pod)
            if view.answer is not None:
                view.answer.pop(key, None)


def _need(pool: Pool, record: ExperimentRecord) -> scheduler.Need:
    assert record.parsed is not None
    return scheduler.Need(
        key=record.key,
        rank=record.parsed.lora.rank,
        tokens=record.parsed.tokens_per_tick(),
        priority=record.parsed.priority,
        created=record.created,
        avoid_nodes=pool.avoid_nodes.get(record.key, frozenset()),
    )


def _waiting(pool: Pool, records: list[ExperimentRecord]) -> list[ExperimentRecord]:
    return [
        r
        for r in records
        if r.key not in pool.placements
        and r.parsed is not None
        and not r.deleting
        and not r.spec.get("suspend")
        and pool.status_of(r).get("phase") in WAITING_PHASES
    ]


async def _schedule(
    state: OperatorState,
    pool: Pool,
    runtime: LoRARuntime,
    records: list[ExperimentRecord],
    logger: logging.Logger,
) -> None:
    by_key = {r.key: r for r in records}
    cap = runtime.spec.capacity
    pods = []
    for name, view in sorted(pool.pods.items()):
        if not _healthy(view):
            continue
        running = tuple(
            _need(pool, by_key[k])
            for k, p in pool.placements.items()
            if p.pod == name and k in by_key and by_key[k].parsed
        )
        pods.append(
            scheduler.PodSnapshot(
                name=name,
                node=view.info.node,
                max_adapters=cap.max_adapters,
                max_rank=cap.max_rank,
                tokens_per_tick=cap.tokens_per_tick,
                running=running,
            )
        )
    waiting = _waiting(pool, records)
    if not waiting:
        return
    snapshot = scheduler.Snapshot(
        pods=tuple(pods), waiting=tuple(_need(pool, r) for r in waiting), policy=state.config.policy
    )
    blocked: set[str] = set()  # preemptors whose victim has not left yet: placed on a later pass
    for decision in scheduler.schedule(snapshot):
        record = by_key[decision.key]
        if isinstance(decision, scheduler.Queue):
            state.metrics.scheduling_decisions.labels("queue").inc()
            was = pool.status_of(record).get("phase")
            if (
                await write_status(
                    state,
                    pool,
                    record,
                    Observed(phase="Queued", reason=REASON_QUEUED, message=decision.reason),
                )
                and was != "Queued"
            ):
                _event(record, REASON_QUEUED, decision.reason)
        elif isinstance(decision, scheduler.Preempt):
            state.metrics.scheduling_decisions.labels("preempt").inc()
            done, checkpoint = await _delete_from_pod(state, pool, decision.key, decision.pod)
            if not done:
                # no answer, or 202: its final checkpoint is written when the runtime's tick ends
                logger.info("preempting %s on %s: not out yet, asking again", decision.key, decision.pod)
                blocked.add(decision.by)
                pool.wake()
                continue
            by = by_key[decision.by]
            where = {"lastCheckpoint": checkpoint} if checkpoint else pool.status_of(record)
            message = (
                f"preempted on {decision.pod} by {by.name} (priority {_need(pool, by).priority});"
                f" {_checkpoint_note(where)}"
            )
            await _requeue(state, pool, record, REASON_PREEMPTED, message, checkpoint=checkpoint)
        elif decision.key not in blocked:
            state.metrics.scheduling_decisions.labels("place").inc()
            await _place(state, pool, record, decision.pod, logger)


async def _place(
    state: OperatorState, pool: Pool, record: ExperimentRecord, pod: str, logger: logging.Logger
) -> None:
    view = pool.pods[pod]
    assert view.info.url is not None and pool.token is not None and record.parsed is not None
    status = pool.status_of(record)
    resume = (status.get("lastCheckpoint") or {}).get("path")
    try:
        await state.runtime.put(
            view.info.url, pool.token, record.namespace, record.name, record.parsed, resume
        )
    except RuntimeUnavailable as e:
        logger.warning("could not place %s on %s: %s", record.key, pod, e)
        view.failures += 1
        return
    except RuntimeRejected as e:
        reason = REASON_MISSING_DATASET if "dataset" in e.detail.lower() else REASON_RUNTIME_REJECTED
        message = f"runtime pod {pod} refused it: {e.detail}"
        await write_status(state, pool, record, Observed(phase="Failed", reason=reason, message=message))
        _event(record, reason, message, warning=True)
        return
    pool.placements[record.key] = Placement(pod=pod, spec_hash=spec_hash(record.spec), since=time.monotonic())
    if not status.get("startTime") and status.get("phase") in (None, "Pending", "Queued") and record.created:
        state.metrics.admission_wait.observe(max(0.0, time.time() - record.created))
    message = f"placed on {pod} (node {view.info.node})"
    await write_status(
        state,
        pool,
        record,
        Observed(
            phase="Scheduled", reason=REASON_SCHEDULED, message=message, runtime_pod=pod, node=view.info.node
        ),
    )
    _event(record, REASON_SCHEDULED, message)
    if resume:
        step = (status.get("lastCheckpoint") or {}).get("step")
        _event(record, REASON_RESUMED, f"resumed on {pod} from the checkpoint of step {step}")


async def _suspend_waiting(state: OperatorState, pool: Pool, records: list[ExperimentRecord]) -> None:
    """Suspended experiments that are on no pod show phase Suspended."""
    for r in records:
        if not r.spec.get("suspend") or r.key in pool.placements or r.deleting or r.parsed is None:
            continue
        phase = pool.status_of(r).get("phase")
        if phase in TERMINAL_PHASES or phase in (None, "Pending"):
            continue
        if LABEL_KUEUE_QUEUE in r.labels and not pool.status_of(r).get("startTime"):
            obs = Observed(
                phase="Suspended",
                reason=REASON_WAITING_FOR_KUEUE,
                message=f"waiting for Kueue (queue {r.labels[LABEL_KUEUE_QUEUE]}) to admit it",
            )
        else:
            obs = Observed(phase="Suspended", reason=REASON_SUSPENDED, message="suspended (spec.suspend)")
        await write_status(state, pool, r, obs)


async def _write_runtime_status(state: OperatorState, pool: Pool, runtime: LoRARuntime) -> None:
    cap = runtime.spec.capacity
    pods = []
    for name, view in sorted(pool.pods.items()):
        on_pod = sorted(k for k, p in pool.placements.items() if p.pod == name)
        pods.append(
            {
                "name": name,
                "node": view.info.node,
                "ready": _healthy(view),
                "experiments": on_pod,
                "slotsFree": max(0, cap.max_adapters - len(on_pod)),
            }
        )
    current = pool.status or (runtime.status.model_dump(mode="json", by_alias=True) if runtime.status else {})
    desired = runtime_status(
        current, pods, max_adapters=cap.max_adapters, generation=runtime.metadata.generation, now=_now()
    )
    patch = status_patch(current, desired)
    if patch is not None and await state.kube.patch_runtime_status(pool.namespace, pool.name, patch):
        pool.status = desired
    state.metrics.runtime_pods_ready.labels(pool.namespace, pool.name).set(desired["readyPods"])


def _count_phases(state: OperatorState, pool: Pool, records: list[ExperimentRecord]) -> None:
    counts: dict[str, int] = {}
    for r in records:
        phase = pool.status_of(r).get("phase") or "Pending"
        counts[phase] = counts.get(phase, 0) + 1
    state.phase_counts[(pool.namespace, pool.name)] = counts
    totals: dict[str, int] = {}
    for c in state.phase_counts.values():
        for phase, n in c.items():
            totals[phase] = totals.get(phase, 0) + n
    for phase in ("Pending", "Queued", "Scheduled", "Running", "Suspended", "Succeeded", "Failed"):
        state.metrics.experiments.labels(phase).set(totals.get(phase, 0))


# Polling one pod.


async def poll_pod(
    state: OperatorState, pool: Pool, info: PodInfo, records: list[ExperimentRecord], logger: logging.Logger
) -> None:
    """GET /v1/experiments from one pod, then patch the statuses that changed."""
    view = pool.pods.get(info.name)
    if view is None:
        view = pool.pods[info.name] = PodView(info=info)
    if info.url is None or pool.token is None:
        return
    if not info.ready and view.answer is None:
        return  # still starting (loading its model): silence is expected, not a failure
    asked = time.monotonic()
    try:
        answer = await state.runtime.list(info.url, pool.token)
    except (RuntimeUnavailable, RuntimeRejected) as e:
        view.failures += 1
        if info.ready or view.answer is not None:
            logger.info("runtime pod %s did not answer (%d in a row): %s", info.name, view.failures, e)
        if _lost(state, view) is not None:
            pool.wake()
        return
    was_new = view.answer is None
    view.failures = 0
    view.answer = {f"{s.namespace}/{s.name}": s for s in answer.experiments}
    view.removed = frozenset(f"{r.namespace}/{r.name}" for r in answer.removed)
    view.answered_at = asked
    by_key = {r.key: r for r in records}
    finished = []
    async with pool.lock:
        for key, s in sorted(view.answer.items()):
            placement = pool.placements.get(key)
            record = by_key.get(key)
            if placement is None or placement.pod != info.name or placement.since > asked or record is None:
                continue
            if await _mirror(state, pool, record, s, info):
                finished.append(key)
    if finished or was_new:
        pool.wake()


async def _mirror(
    state: OperatorState, pool: Pool, record: ExperimentRecord, s: ExperimentState, info: PodInfo
) -> bool:
    """Writes what the runtime says of one experiment; True when it has finished."""
    if s.phase == "Removing":
        return False  # leaving on the operator's DELETE; the status keeps what it says until then
    before = pool.status_of(record).get("phase")
    obs = observe_runtime(s, info.name, info.node)
    if obs.phase == "Suspended":
        return False  # the operator takes suspended experiments off their pod itself
    await write_status(state, pool, record, obs)
    if obs.phase in TERMINAL_PHASES and before not in TERMINAL_PHASES:
        if obs.phase == "Succeeded":
            _event(record, REASON_SUCCEEDED, f"trained {s.step} steps on {info.name}; reward {s.reward.mean}")
        else:
            _event(record, REASON_FAILED, obs.message, warning=True)
        # Final checkpoint and the slot back; the status keeps what the DELETE wrote.
        done, checkpoint = await _delete_from_pod(state, pool, record.key, info.name)
        if done:
            pool.placements.pop(record.key, None)
            view = pool.pods.get(info.name)
            if view is not None and view.answer is not None:
                view.answer.pop(record.key, None)
            if checkpoint:
                await write_status(state, pool, record, dataclasses.replace(obs, checkpoint=checkpoint))
        return True
    return False


# Deleting an experiment.


async def release(state: OperatorState, pool: Pool, record: ExperimentRecord, logger: logging.Logger) -> None:
    """Checkpoints a deleted experiment on its pod and frees the slot; gives up after delete_timeout."""
    async with pool.lock:
        pool.avoid_nodes.pop(record.key, None)
        placement = pool.placements.get(record.key)
        pod = placement.pod if placement else record.status.get("runtimePod")
        if (pod and record.status.get("phase") not in TERMINAL_PHASES) or placement is not None:
            deadline = time.monotonic() + state.config.delete_timeout
            while True:
                done, checkpoint = await _delete_from_pod(state, pool, record.key, pod)
                if done:
                    if checkpoint:
                        _event(
                            record,
                            "Checkpointed",
                            f"checkpointed at step {checkpoint.get('step')}: {checkpoint.get('path')}",
                        )
                    break
                if time.monotonic() >= deadline:
                    message = (
                        f"runtime pod {pod} did not answer within {state.config.delete_timeout:.0f}s;"
                        " deleted without a final checkpoint"
                    )
                    logger.warning("%s: %s", record.key, message)
                    _event(record, REASON_RUNTIME_LOST, message, warning=True)
                    break
                await asyncio.sleep(min(2.0, state.config.poll_interval))
        pool.placements.pop(record.key, None)
        pool.written.pop(record.key, None)
    pool.wake()


async def admit(
    state: OperatorState, pool: Pool, record: ExperimentRecord, problem: tuple[str, str] | None
) -> None:
    """The validation handler's verdict: Failed with the reason, or into the queue."""
    async with pool.lock:
        if problem is not None:
            reason, message = problem
            if await write_status(
                state, pool, record, Observed(phase="Failed", reason=reason, message=message)
            ):
                _event(record, reason, message, warning=True)
        elif pool.status_of(record).get("phase") in (None, "Pending"):
            if record.spec.get("suspend"):
                kueue = record.labels.get(LABEL_KUEUE_QUEUE)
                reason = REASON_WAITING_FOR_KUEUE if kueue else REASON_SUSPENDED
                message = (
                    f"waiting for Kueue (queue {kueue}) to admit it" if kueue else "suspended (spec.suspend)"
                )
                await write_status(
                    state, pool, record, Observed(phase="Suspended", reason=reason, message=message)
                )
            else:
                message = f"admitted to LoRARuntime {record.spec.get('runtime')}; waiting for a place"
                if await write_status(
                    state, pool, record, Observed(phase="Queued", reason=REASON_ADMITTED, message=message)
                ):
                    _event(record, REASON_ADMITTED, message)
    pool.wake()
