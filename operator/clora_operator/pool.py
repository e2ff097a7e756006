"""One LoRARuntime's control loop: keep its pods, place its experiments, mirror runtime progress.

Entry points:
- `reconcile` (one pass of the LoRARuntime's daemon, after any change and every few seconds): the
  token Secret and the pods, one poller per pod, then the decisions: experiments their pod lost go
  back to the queue, experiments that should leave their pod are taken off it (deleted, finished,
  suspended), changed specs are re-sent, and the scheduler places the waiting ones;
- `poll_pod` (each pod's poller, a task the daemon keeps): GET /v1/experiments, then status patches;
- `release` (an experiment's deletion handler): its final checkpoint, and its slot back;
- `admit` (the validation handler's verdict).

Level-triggered: each pass decides from what the cluster (the experiments' statuses, the pods) and
the runtimes' answers say now. Where an experiment is comes from its runtime's answer, else from its
status (runtimePod); whether a runtime has its latest spec, from the runtime's specDigest. What the
pool keeps in memory (state.Pool) is a cache that `Pool.forget` may drop at any time.

No lock is held across I/O: a decision is taken between two awaits on what the pool knows, the I/O
(a runtime call, an API write) runs after it, and its outcome is applied only where it still holds.
An experiment with a PUT or DELETE in flight is `busy`: nothing else is decided for it meanwhile.
Status writes carry the resourceVersion they were computed from, so a write computed from a status
that changed meanwhile is refused (409) and computed again from the newer one.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import kopf

from clora.api import TERMINAL_PHASES, LoRARuntime
from clora.api.runtime_api import CheckpointRef, ExperimentState, spec_digest
from clora.constants import (
    COND_READY,
    EXPERIMENT_KIND,
    LABEL_KUEUE_QUEUE,
    REASON_ADMITTED,
    REASON_CHECKPOINTED,
    REASON_DATASET_TOO_LARGE,
    REASON_MISSING_DATASET,
    REASON_MISSING_SECRET,
    REASON_PREEMPTED,
    REASON_PUBLISH_FAILED,
    REASON_QUEUED,
    REASON_RESUMED,
    REASON_RUNTIME_LOST,
    REASON_RUNTIME_REJECTED,
    REASON_SECRET_NOT_OWNED,
    REASON_SUSPENDED,
    REASON_WAITING_FOR_KUEUE,
    TOKEN_SECRET_KEY,
)
from clora_operator import admission, k8s, scheduler
from clora_operator.model_adapters import model_adapter
from clora_operator.pods import (
    PodInfo,
    build_token_secret,
    owns_token_secret,
    plan_pods,
    pod_info,
    secret_name,
)
from clora_operator.runtime_client import RuntimeRejected, RuntimeUnavailable
from clora_operator.state import ExperimentRecord, OperatorState, PodView, Pool, Written
from clora_operator.status import (
    Observed,
    experiment_status,
    observe_runtime,
    runtime_status,
    status_patch,
    transition_events,
)

log = logging.getLogger(__name__)

# Phases in which an experiment, not on a pod, waits for the scheduler.
WAITING_PHASES = frozenset({"Queued", "Scheduled", "Running", "Suspended"})
# Phases in which the status says the experiment is on its runtimePod.
ON_POD_PHASES = frozenset({"Scheduled", "Running"})

Records = Callable[[], list[ExperimentRecord]]
"""The experiments naming a LoRARuntime, as kopf's index holds them now."""


def _now() -> datetime:
    return datetime.now(UTC)


def _checkpoint_dict(ref: CheckpointRef | None) -> dict[str, Any] | None:
    return ref.model_dump(mode="json", by_alias=True, exclude_none=True) if ref is not None else None


# Status writes.


async def write_status(
    state: OperatorState,
    pool: Pool,
    record: ExperimentRecord,
    obs: Observed,
    *,
    conflict_raises: bool = False,
) -> bool:
    """Patches the experiment's status to what `obs` says, if that changes anything but timestamps,
    and posts the Events of the transition. False when nothing was written: no change, the object is
    gone, or it changed since it was read (409). On a conflict the object is read again (the pool's
    cache holds it until the index catches up) and the write is not retried here: the decision that
    led to it is taken again on the newer status, by the next pass, or by kopf's retry of the handler
    when `conflict_raises` (k8s.Conflict, which `handler_errors` makes a TemporaryError)."""
    current, version = pool.current(record)
    desired = experiment_status(current, obs, spec=record.spec, generation=record.generation, now=_now())
    patch = status_patch(current, desired)
    if patch is None:
        return False
    try:
        answer = await state.kube.patch_experiment_status(record.namespace, record.name, patch, version)
    except k8s.Conflict:
        fresh = await state.kube.get_experiment(record.namespace, record.name)
        if fresh is not None:
            _remember(pool, record, fresh)
        pool.wake()
        if conflict_raises:
            raise
        state.count_error(EXPERIMENT_KIND, "Conflict")
        return False
    if answer is None:
        return False
    _remember(pool, record, answer)
    for event in transition_events(current, desired, obs):
        _event(record, event.reason, event.message, warning=event.warning)
    return True


def _remember(pool: Pool, record: ExperimentRecord, obj: dict[str, Any]) -> None:
    """The object as the API server last answered: newer than the index until the watch catches up."""
    older = {record.resource_version or ""}
    previous = pool.written.get(record.key)
    if previous is not None and record.resource_version in previous.superseded:
        older |= previous.superseded | {previous.version}  # written over a write the index lacks too
    pool.written[record.key] = Written(
        superseded=frozenset(older),
        version=(obj.get("metadata") or {}).get("resourceVersion") or "",
        status=obj.get("status") or {},
    )


def _event(record: ExperimentRecord, reason: str, message: str, *, warning: bool = False) -> None:
    k8s.post_event(
        k8s.experiment_ref(record.namespace, record.name, record.uid), reason, message, warning=warning
    )


# Where each experiment is.


def placements(pool: Pool, records: list[ExperimentRecord]) -> dict[str, str]:
    """key -> the pod it is on: a pod whose runtime lists it (the one its status names, if several
    do), else the pod its status names (placed, and its runtime not asked since). Keys of no
    experiment (deleted objects) are included."""
    listed: dict[str, list[str]] = {}
    for name, view in sorted(pool.pods.items()):
        for key, s in (view.answer or {}).items():
            if s.phase != "Removing":
                listed.setdefault(key, []).append(name)
    out = {key: pods[0] for key, pods in listed.items()}
    for r in records:
        status = pool.status_of(r)
        named = status.get("runtimePod")
        placed = r.key not in out and status.get("phase") in ON_POD_PHASES
        if named and (named in listed.get(r.key, ()) or placed):
            out[r.key] = named
    return out


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


def _scheduled_at(status: dict[str, Any]) -> float:
    """When the status last said the experiment went onto its pod (the Scheduled condition's flip)."""
    cond = next((c for c in status.get("conditions") or [] if c.get("type") == "Scheduled"), {})
    when = cond.get("lastTransitionTime")
    if cond.get("status") != "True" or not when:
        return 0.0
    return datetime.fromisoformat(when.replace("Z", "+00:00")).timestamp()


# Pods and Secret.


class ForeignSecret(Exception):
    """The runtime's token Secret exists but was not created by clora for this LoRARuntime."""


async def ensure_token(state: OperatorState, runtime: LoRARuntime) -> str:
    """The pool's bearer token: read from its Secret, or generated once and stored there. A Secret of
    that name that clora did not create for this runtime is never adopted (ForeignSecret): whoever
    wrote it would know the token of the pods the operator builds."""
    ns, name = runtime.metadata.namespace, runtime.metadata.name
    secret = await state.kube.get_secret(ns, secret_name(name))
    if secret is None:
        await state.kube.create_secret(ns, build_token_secret(runtime, secrets.token_urlsafe(32)))
        # Read back: if another replica created it first, its token wins.
        secret = await state.kube.get_secret(ns, secret_name(name))
        if secret is None:
            raise RuntimeError(f"Secret {secret_name(name)} is gone right after its creation")
    if not owns_token_secret(runtime, secret):
        raise ForeignSecret(
            f"Secret {secret_name(name)} exists but was not created by clora for this LoRARuntime (its"
            " labels or owner differ); clora never adopts it: delete or rename it"
        )
    token = k8s.secret_value(secret, TOKEN_SECRET_KEY)
    if not token:
        raise RuntimeError(f"Secret {secret_name(name)} has no key {TOKEN_SECRET_KEY}")
    return token


def _sync_pod_views(pool: Pool, infos: list[PodInfo]) -> None:
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


async def _reconcile_pods(
    state: OperatorState, pool: Pool, runtime: LoRARuntime, occupied: frozenset[str], logger: logging.Logger
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
    image = runtime.spec.image or state.config.runtime_image
    plan = plan_pods(runtime, nodes, infos, image=image, busy=occupied)
    for body in plan.create:
        logger.info("creating runtime pod %s", body["metadata"]["name"])
        await state.kube.create_pod(ns, body)
    for pod in sorted(set(plan.delete) | broken):
        logger.info("deleting runtime pod %s", pod)
        await state.kube.delete_pod(ns, pod)


# Pollers: one task per pod, kept by the daemon.


def keep_pollers(state: OperatorState, pool: Pool, records: Records, logger: logging.Logger) -> None:
    """One poller per pod: started for new pods, stopped for gone ones, restarted (after logging its
    error) when one ended."""
    for name in list(pool.pollers):
        task = pool.pollers[name]
        if name in pool.pods and not task.done():
            continue
        del pool.pollers[name]
        if not task.done():
            task.cancel()
        elif not task.cancelled() and (error := task.exception()) is not None:
            logger.error("poller of %s failed (a bug, counted); restarting it", name, exc_info=error)
    for name in pool.pods:
        if name not in pool.pollers:
            pool.pollers[name] = asyncio.create_task(_poll_loop(state, pool, name, records, logger))


def stop_pollers(pool: Pool) -> None:
    for task in pool.pollers.values():
        task.cancel()
    pool.pollers.clear()


async def _poll_loop(
    state: OperatorState, pool: Pool, name: str, records: Records, logger: logging.Logger
) -> None:
    while (view := pool.pods.get(name)) is not None:
        delay = state.config.poll_interval
        try:
            with state.handler_errors("Pod"):  # counted by reason; a bug ends the poller
                await poll_pod(state, pool, view, records(), logger)
        except kopf.TemporaryError as e:  # the API server refused or did not answer: poll again
            logger.info("polling %s: %s", name, e)
            delay = max(delay, e.delay or 0.0)
        await asyncio.sleep(delay)


def _merge(new: dict[str, Any], old: dict[str, Any], stale: set[str]) -> dict[str, Any]:
    """`new`, except for the `stale` keys, which keep what `old` says of them."""
    return {k: v for k, v in new.items() if k not in stale} | {k: v for k, v in old.items() if k in stale}


async def poll_pod(
    state: OperatorState, pool: Pool, view: PodView, records: list[ExperimentRecord], logger: logging.Logger
) -> None:
    """GET /v1/experiments from one pod, then patch the statuses of the experiments placed there."""
    info = view.info
    if info.url is None or pool.token is None:
        return
    if not info.ready and view.answer is None:
        return  # still starting (loading its model): silence is expected, not a failure
    asked = time.time()
    try:
        answer = await state.runtime.list(info.url, pool.token)
    except (RuntimeUnavailable, RuntimeRejected) as e:
        view.failures += 1
        if info.ready or view.answer is not None:
            logger.info("runtime pod %s did not answer (%d in a row): %s", info.name, view.failures, e)
        if _lost(state, view) is not None:
            pool.wake()
        return
    # An experiment whose PUT or DELETE ended after this GET was asked is as that call left it.
    for key in [k for k, t in pool.touched.items() if t < asked - 60]:
        del pool.touched[key]
    stale = {k for k, t in pool.touched.items() if t >= asked}
    listed = {f"{s.namespace}/{s.name}": s for s in answer.experiments}
    removed = {f"{r.namespace}/{r.name}": r.checkpoint for r in answer.removed}
    was_new = view.answer is None
    view.failures = 0
    view.answer = _merge(listed, view.answer or {}, stale)
    view.removed = _merge(removed, view.removed, stale)
    view.asked_at = asked
    where = placements(pool, records)
    writes = []
    finished = False
    for record in records:
        s = listed.get(record.key)
        if s is None or record.key in stale or record.deleting or record.key in pool.busy:
            continue
        if where.get(record.key) != info.name or s.phase in ("Removing", "Suspended"):
            continue  # on another pod too, or leaving on the operator's DELETE: the daemon decides
        status = pool.status_of(record)
        if status.get("phase") in TERMINAL_PHASES and status.get("runtimePod") != info.name:
            continue
        obs = observe_runtime(s, info.name, info.node)
        finished |= obs.phase in TERMINAL_PHASES
        writes.append(write_status(state, pool, record, obs))
    await asyncio.gather(*writes)
    if finished or was_new:
        pool.wake()  # a finished experiment leaves its pod on the daemon's next pass


# Runtime calls whose outcome is applied after they answer.


async def _busy(pool: Pool, key: str, call: Awaitable[Any]) -> Any:
    """Runs `call` with `key` marked busy (nothing else is decided for it until it ends)."""
    pool.busy.add(key)
    try:
        return await call
    finally:
        pool.busy.discard(key)
        pool.touched[key] = time.time()


class Removal(enum.Enum):
    """How a DELETE on a runtime went."""

    DONE = "done"
    """Removed (or not there): the slot is free, and the checkpoint that came with it is final."""
    WRITING = "writing"
    """202: the runtime writes the final checkpoint when its running tick ends; ask again."""
    UNANSWERED = "unanswered"
    """No answer: ask again; a later DELETE answers with the same checkpoint, so none is lost."""


async def _delete_from_pod(
    state: OperatorState, pool: Pool, key: str, pod: str
) -> tuple[Removal, dict[str, Any] | None]:
    """DELETE on the pod: how it went, and the final checkpoint."""
    view = pool.pods.get(pod)
    if view is None or view.info.url is None or pool.token is None:
        return Removal.DONE, None  # the pod is gone: nothing left to free
    namespace, name = key.split("/", 1)
    try:
        rsp = await state.runtime.delete(view.info.url, pool.token, namespace, name)
    except RuntimeUnavailable:
        return Removal.UNANSWERED, None
    except RuntimeRejected:
        return Removal.DONE, None
    if rsp is not None and not rsp.removed:
        return Removal.WRITING, None
    # 404: gone already; a poll may have seen its final checkpoint in the runtime's removed list.
    ref = rsp.checkpoint if rsp is not None else view.removed.get(key)
    if view.answer is not None:
        view.answer.pop(key, None)
    view.removed[key] = ref
    return Removal.DONE, _checkpoint_dict(ref)


async def _take_off(
    state: OperatorState,
    pool: Pool,
    record: ExperimentRecord | None,
    key: str,
    pod: str,
    logger: logging.Logger,
) -> None:
    """Takes an experiment that should not be on `pod` off it, recording what the DELETE answers."""
    outcome, checkpoint = await _busy(pool, key, _delete_from_pod(state, pool, key, pod))
    if outcome is not Removal.DONE:
        pool.wake()  # ask again on the next pass
        return
    if record is None:
        return
    status = pool.status_of(record)
    if status.get("phase") in TERMINAL_PHASES:
        if checkpoint:  # the final checkpoint (a terminal status takes nothing else)
            await write_status(
                state, pool, record, Observed(phase=status["phase"], reason="", checkpoint=checkpoint)
            )
    elif record.spec.get("suspend"):
        message = f"suspended: checkpointed on {pod} and left its runtime"
        await write_status(
            state,
            pool,
            record,
            Observed(phase="Suspended", reason=REASON_SUSPENDED, message=message, checkpoint=checkpoint),
        )
    else:
        logger.info("%s left %s", key, pod)


async def _verifier_token(state: OperatorState, record: ExperimentRecord) -> tuple[str, str | None]:
    """("", value) of spec.task.verifier.tokenSecret, read when the experiment goes to a pod (the value
    travels in the PUT only, never in a status, an Event or a log line); ("", None) without one; (what
    is missing, None) when the Secret or its key is not there."""
    assert record.parsed is not None
    verifier = record.parsed.task.verifier
    if verifier is None or verifier.token_secret is None:
        return "", None
    ref = verifier.token_secret
    value = await state.kube.read_token(record.namespace, ref.name, ref.key)
    return ("" if value is not None else f"Secret {ref.name} with key {ref.key}"), value


async def _dataset_text(
    state: OperatorState, record: ExperimentRecord
) -> tuple[tuple[str, str] | None, str | None]:
    """(None, value) of spec.task.dataset.configMap, read in the experiment's own namespace when it
    goes to a pod (the runtime pod mounts no ConfigMap: the value travels in the PUT's datasetText);
    (None, None) for a path dataset; ((reason, message), None) when the ConfigMap or key is missing or
    the value is too large."""
    assert record.parsed is not None
    dataset = record.parsed.task.dataset
    if dataset is None or dataset.config_map is None:
        return None, None
    ref = dataset.config_map
    configmap = await state.kube.get_configmap(record.namespace, ref.name)
    if configmap is None:
        return (
            REASON_MISSING_DATASET,
            f"spec.task.dataset.configMap: ConfigMap {ref.name} does not exist",
        ), None
    problem = admission.dataset_problem(ref.name, ref.key, configmap)
    return problem, (admission.dataset_text(configmap, ref.key) if problem is None else None)


async def _resend(
    state: OperatorState, pool: Pool, record: ExperimentRecord, pod: str, logger: logging.Logger
) -> None:
    """A spec changed since its runtime got it: PUT again (the runtime applies the mutable fields)."""
    view = pool.pods.get(pod)
    if view is None or view.info.url is None or pool.token is None or record.parsed is None:
        return
    _, verifier_token = await _verifier_token(state, record)  # a Secret gone since: the verifier says so
    _, dataset_text = await _dataset_text(state, record)  # a ConfigMap gone since: the runtime keeps its own
    put = state.runtime.put(
        view.info.url,
        pool.token,
        record.namespace,
        record.name,
        record.parsed,
        None,
        verifier_token,
        dataset_text,
    )
    try:
        answer = await _busy(pool, record.key, put)
    except RuntimeUnavailable:
        return
    except RuntimeRejected as e:
        logger.warning("%s: the runtime refused the changed spec: %s", record.key, e.detail)
        _event(record, REASON_RUNTIME_REJECTED, f"the changed spec was refused: {e.detail}", warning=True)
        return
    if view.answer is not None:
        view.answer[record.key] = answer


# The reconcile pass.


async def reconcile(
    state: OperatorState, runtime: LoRARuntime, records: Records, logger: logging.Logger
) -> None:
    """One pass over a pool: its Secret and pods, then every experiment that names it."""
    pool = state.pool(runtime.metadata.namespace, runtime.metadata.name)
    refused = admission.runtime_refusal(runtime, state.config)
    if refused is None and pool.token is None:
        try:
            pool.token = await ensure_token(state, runtime)
        except ForeignSecret as e:
            refused = (REASON_SECRET_NOT_OWNED, str(e))
    if refused is not None:
        # No pod is built or kept for it; its experiments wait, and its status says why.
        await _refuse(state, pool, runtime, refused, logger)
        return
    occupied = frozenset(placements(pool, records()).values())  # pods never replaced as stale
    await _reconcile_pods(state, pool, runtime, occupied, logger)
    keep_pollers(state, pool, records, logger)
    # Ready pods never asked yet (a fresh pool, or one whose cache was dropped): their pollers ask at
    # once, and the pass waits for those answers (2 s at most), so no decision rests on not knowing.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(
        v.answer is None and v.failures == 0 and v.info.ready and v.info.url for v in pool.pods.values()
    ):
        await asyncio.sleep(0.05)
    pool.synced = True
    await _record_removals(state, pool, records())
    await _apply_model_adapters(state, pool, records(), logger)
    await _requeue_lost(state, pool, records(), logger)
    await _clean_up(state, pool, records(), logger)
    await _schedule(state, pool, runtime, records(), logger)
    await _show_suspended(state, pool, records())
    await _write_runtime_status(state, pool, runtime, records())
    _count_phases(state, pool, records())


async def _apply_model_adapters(
    state: OperatorState, pool: Pool, records: list[ExperimentRecord], logger: logging.Logger
) -> None:
    """Every experiment publishing to aibrix has its ModelAdapter pointed at its published version."""
    for record in records:
        if record.parsed is None or record.deleting:
            continue
        published = pool.status_of(record).get("published") or {}
        body = model_adapter(record.namespace, record.name, record.uid, record.parsed, published)
        if body is None or pool.adapters.get(record.key) == body["spec"]:
            continue
        try:
            await state.kube.apply_model_adapter(record.namespace, body)
        except k8s.KubeError as e:  # e.g. no aibrix CRD here: said on the experiment, retried next pass
            logger.warning("%s: ModelAdapter %s not applied: %s", record.key, body["metadata"]["name"], e)
            _event(record, REASON_PUBLISH_FAILED, f"ModelAdapter not applied: {e}", warning=True)
            continue
        pool.adapters[record.key] = body["spec"]


def _checkpoint_note(status: dict[str, Any]) -> str:
    cp = status.get("lastCheckpoint") or {}
    return (
        f"will resume from the checkpoint of step {cp['step']}"
        if cp.get("path")
        else "will start over (no checkpoint)"
    )


async def _record_removals(state: OperatorState, pool: Pool, records: list[ExperimentRecord]) -> None:
    """Experiments their runtime lists as removed with a checkpoint the status lacks (a DELETE
    finished, but its answer was lost or was a 202): the status records that final checkpoint, and
    one that was not finished leaves its pod (suspended, or back to the queue)."""
    writes = []
    for record in records:
        status = pool.status_of(record)
        view = pool.pods.get(status.get("runtimePod") or "")
        if view is None or record.deleting or record.key in pool.busy or record.key in (view.answer or {}):
            continue
        ref = view.removed.get(record.key)
        checkpoint = _checkpoint_dict(ref)
        if not checkpoint or checkpoint.get("path") == (status.get("lastCheckpoint") or {}).get("path"):
            continue
        phase = status.get("phase")
        if phase in TERMINAL_PHASES:
            obs = Observed(phase=phase, reason="", checkpoint=checkpoint)
        elif record.spec.get("suspend"):
            message = f"suspended: checkpointed on {view.info.name} and left its runtime"
            obs = Observed(phase="Suspended", reason=REASON_SUSPENDED, message=message, checkpoint=checkpoint)
        elif phase in ON_POD_PHASES:
            message = f"taken off {view.info.name}; {_checkpoint_note({'lastCheckpoint': checkpoint})}"
            obs = Observed(phase="Queued", reason=REASON_QUEUED, message=message, checkpoint=checkpoint)
        else:
            continue
        writes.append(write_status(state, pool, record, obs))
    await asyncio.gather(*writes)


async def _requeue_lost(
    state: OperatorState, pool: Pool, records: list[ExperimentRecord], logger: logging.Logger
) -> None:
    """Experiments whose status puts them on a pod that is lost, or whose runtime, asked after they
    were placed there, no longer has them, go back to the queue."""
    writes = []
    for record in records:
        status = pool.status_of(record)
        pod = status.get("runtimePod")
        if record.deleting or record.key in pool.busy or status.get("phase") not in ON_POD_PHASES or not pod:
            continue
        view = pool.pods.get(pod)
        why = _lost(state, view)
        if (
            why is None
            and view is not None
            and view.answer is not None
            and record.key not in view.answer
            and record.key not in view.removed  # taken off by a DELETE: _record_removals records it
            and view.asked_at > _scheduled_at(status) + 1.0  # asked after the PUT (status times: 1 s)
        ):
            why = "no longer has it (the runtime restarted)"
        if why is None:
            continue
        message = f"runtime pod {pod} {why}; {_checkpoint_note(status)}"
        logger.warning("%s: %s", record.key, message)
        writes.append(
            write_status(
                state, pool, record, Observed(phase="Queued", reason=REASON_RUNTIME_LOST, message=message)
            )
        )
    await asyncio.gather(*writes)


async def _clean_up(
    state: OperatorState, pool: Pool, records: list[ExperimentRecord], logger: logging.Logger
) -> None:
    """Take off their pods the experiments that should not be there; re-send changed specs."""
    by_key = {r.key: r for r in records}
    actions = []
    where = placements(pool, records)
    for pod, view in sorted(pool.pods.items()):
        for key in sorted(view.answer or {}):
            if where.get(key) not in (pod, None) and key not in pool.busy:
                # Also on another pod (its runtime came back after the experiment moved): one copy.
                logger.info("removing %s from %s: it is placed on %s", key, pod, where[key])
                actions.append(_take_off(state, pool, None, key, pod, logger))
    for key, pod in sorted(where.items()):
        record = by_key.get(key)
        if key in pool.busy or (record is not None and record.deleting):
            continue  # a call in flight, or the deletion handler's
        view = pool.pods.get(pod)
        on_runtime = (view.answer or {}).get(key) if view is not None else None
        if record is None:
            if on_runtime is not None:
                logger.info("removing %s from %s: no such experiment", key, pod)
                actions.append(_take_off(state, pool, None, key, pod, logger))
            continue
        phase = pool.status_of(record).get("phase")
        if on_runtime is not None and (phase in TERMINAL_PHASES or record.spec.get("suspend")):
            actions.append(_take_off(state, pool, record, key, pod, logger))
        elif (
            on_runtime is not None
            and record.parsed is not None
            and on_runtime.spec_digest not in (None, spec_digest(record.parsed))
        ):
            actions.append(_resend(state, pool, record, pod, logger))
    await asyncio.gather(*actions)


def _need(record: ExperimentRecord) -> scheduler.Need:
    assert record.parsed is not None
    return scheduler.Need(
        key=record.key,
        rank=record.parsed.lora.rank,
        tokens=record.parsed.tokens_per_tick(),
        priority=record.parsed.priority,
        created=record.created,
    )


async def _schedule(
    state: OperatorState,
    pool: Pool,
    runtime: LoRARuntime,
    records: list[ExperimentRecord],
    logger: logging.Logger,
) -> None:
    by_key = {r.key: r for r in records}
    where = placements(pool, records)
    cap = runtime.spec.capacity
    pods = [
        scheduler.PodSnapshot(
            name=name,
            node=view.info.node,
            max_adapters=cap.max_adapters,
            max_rank=cap.max_rank,
            tokens_per_tick=cap.tokens_per_tick,
            running=tuple(
                _need(by_key[k])
                for k, p in sorted(where.items())
                if p == name and k in by_key and by_key[k].parsed
            ),
            replicas=runtime.spec.replicas,
            replica_of={k: s.replica for k, s in (view.answer or {}).items() if s.replica is not None},
        )
        for name, view in sorted(pool.pods.items())
        if _healthy(view)
    ]
    waiting = [
        r
        for r in records
        if r.key not in where
        and r.key not in pool.busy
        and r.parsed is not None
        and not r.deleting
        and not r.spec.get("suspend")
        and pool.status_of(r).get("phase") in WAITING_PHASES
    ]
    if not waiting:
        return
    snapshot = scheduler.Snapshot(
        pods=tuple(pods), waiting=tuple(_need(r) for r in waiting), policy=state.config.policy
    )
    actions = []
    preemptors: set[str] = set()  # placed on a later pass, once their victim has left
    for decision in scheduler.schedule(snapshot):
        record = by_key[decision.key]
        if isinstance(decision, scheduler.Queue):
            state.metrics.scheduling_decisions.labels("queue").inc()
            obs = Observed(phase="Queued", reason=REASON_QUEUED, message=decision.reason)
            actions.append(write_status(state, pool, record, obs))
        elif isinstance(decision, scheduler.Preempt):
            state.metrics.scheduling_decisions.labels("preempt").inc()
            preemptors.add(decision.by)
            actions.append(_preempt(state, pool, record, by_key[decision.by], decision.pod, logger))
        elif decision.key not in preemptors:
            state.metrics.scheduling_decisions.labels("place").inc()
            actions.append(_place(state, pool, record, decision.pod, logger))
    await asyncio.gather(*actions)


async def _preempt(
    state: OperatorState,
    pool: Pool,
    victim: ExperimentRecord,
    by: ExperimentRecord,
    pod: str,
    logger: logging.Logger,
) -> None:
    outcome, checkpoint = await _busy(pool, victim.key, _delete_from_pod(state, pool, victim.key, pod))
    pool.wake()  # the preemptor is placed on the next pass
    if outcome is not Removal.DONE:
        logger.info("preempting %s on %s: not out yet, asking again", victim.key, pod)
        return
    where = {"lastCheckpoint": checkpoint} if checkpoint else pool.status_of(victim)
    priority = by.parsed.priority if by.parsed else 0
    message = f"preempted on {pod} by {by.name} (priority {priority}); {_checkpoint_note(where)}"
    obs = Observed(phase="Queued", reason=REASON_PREEMPTED, message=message, checkpoint=checkpoint)
    await write_status(state, pool, victim, obs)


async def _place(
    state: OperatorState, pool: Pool, record: ExperimentRecord, pod: str, logger: logging.Logger
) -> None:
    view = pool.pods[pod]
    assert view.info.url is not None and pool.token is not None and record.parsed is not None
    status = pool.status_of(record)
    resume = (status.get("lastCheckpoint") or {}).get("path")
    missing, verifier_token = await _verifier_token(state, record)
    if missing:
        message = f"spec.task.verifier.tokenSecret: waiting for {missing}"
        obs = Observed(phase="Queued", reason=REASON_MISSING_SECRET, message=message)
        await write_status(state, pool, record, obs)
        return
    dataset_problem, dataset_text = await _dataset_text(state, record)
    if dataset_problem is not None:
        # Gone or grown since admission: a missing one may come back (queued), a too large one will not.
        reason, message = dataset_problem
        phase = "Failed" if reason == REASON_DATASET_TOO_LARGE else "Queued"
        await write_status(state, pool, record, Observed(phase=phase, reason=reason, message=message))
        return
    put = state.runtime.put(
        view.info.url,
        pool.token,
        record.namespace,
        record.name,
        record.parsed,
        resume,
        verifier_token,
        dataset_text,
    )
    try:
        answer: ExperimentState = await _busy(pool, record.key, put)
    except RuntimeUnavailable as e:
        logger.warning("could not place %s on %s: %s", record.key, pod, e)
        view.failures += 1
        return
    except RuntimeRejected as e:
        reason = REASON_MISSING_DATASET if "dataset" in e.detail.lower() else REASON_RUNTIME_REJECTED
        message = f"runtime pod {pod} refused it: {e.detail}"
        await write_status(state, pool, record, Observed(phase="Failed", reason=reason, message=message))
        return
    if view.answer is not None:
        view.answer[record.key] = answer  # placed here, whatever an older poll answer says
    if not status.get("startTime") and status.get("phase") in (None, "Pending", "Queued") and record.created:
        state.metrics.admission_wait.observe(max(0.0, time.time() - record.created))
    # What the PUT answered (the runtime admits at once: Running, or Failed if it could not start).
    obs = observe_runtime(answer, pod, view.info.node)
    await write_status(state, pool, record, obs)
    # The runtime resumed whether or not this write landed (a conflicting one is redone from the next
    # poll, which does not know about the resume): the Event tells it now.
    if resume and obs.phase != "Failed":
        step = (status.get("lastCheckpoint") or {}).get("step")
        _event(record, REASON_RESUMED, f"resumed on {pod} from the checkpoint of step {step}")


async def _show_suspended(state: OperatorState, pool: Pool, records: list[ExperimentRecord]) -> None:
    """Suspended experiments that are on no pod show phase Suspended."""
    where = placements(pool, records)
    writes = []
    for r in records:
        if (
            not r.spec.get("suspend")
            or r.key in where
            or r.key in pool.busy
            or r.deleting
            or r.parsed is None
        ):
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
        writes.append(write_status(state, pool, r, obs))
    await asyncio.gather(*writes)


async def _refuse(
    state: OperatorState, pool: Pool, runtime: LoRARuntime, refused: tuple[str, str], logger: logging.Logger
) -> None:
    reason, message = refused
    current = pool.status or (runtime.status.model_dump(mode="json", by_alias=True) if runtime.status else {})
    ready = next((c for c in current.get("conditions") or [] if c.get("type") == COND_READY), {})
    if ready.get("reason") != reason:
        logger.warning("LoRARuntime %s/%s refused: %s", pool.namespace, pool.name, message)
        k8s.post_event(
            k8s.runtime_ref(pool.namespace, pool.name, runtime.metadata.uid), reason, message, warning=True
        )
    await _write_runtime_status(state, pool, runtime, [], refused)


async def _write_runtime_status(
    state: OperatorState,
    pool: Pool,
    runtime: LoRARuntime,
    records: list[ExperimentRecord],
    refused: tuple[str, str] | None = None,
) -> None:
    where = placements(pool, records)
    pods = []
    for name, view in sorted(pool.pods.items()):
        on_pod = sorted(k for k, p in where.items() if p == name)
        pods.append(
            {
                "name": name,
                "node": view.info.node,
                "ready": _healthy(view),
                "experiments": on_pod,
                "slotsFree": max(0, runtime.spec.slots_per_pod() - len(on_pod)),
            }
        )
    current = pool.status or (runtime.status.model_dump(mode="json", by_alias=True) if runtime.status else {})
    desired = runtime_status(
        current,
        pods,
        slots_per_pod=runtime.spec.slots_per_pod(),
        generation=runtime.metadata.generation,
        now=_now(),
        refused=refused,
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


# Deleting an experiment.


async def release(
    state: OperatorState, pool: Pool, record: ExperimentRecord, elapsed: float, logger: logging.Logger
) -> None:
    """Checkpoints a deleted experiment on its pod and frees the slot, before its finalizer comes off.

    `elapsed`: seconds since the deletion handler first ran. It waits (kopf.TemporaryError) until the
    pool knows its pods and token (after a restart the handler may run before the pool's first pass)
    and while the runtime writes the final checkpoint (202); a runtime that does not answer is asked
    again (RuntimeUnavailable, which kopf retries) until delete_timeout, then given up on."""
    timeout = state.config.delete_timeout
    if not pool.synced and not pool.status_of(record).get("runtimePod") and record.key not in pool.busy:
        return  # never placed (refused, or still queued): nothing to free
    if not pool.synced:
        if elapsed < timeout:
            raise kopf.TemporaryError(f"waiting for LoRARuntime {pool.name}'s pods to be known", delay=1.0)
        message = f"LoRARuntime {pool.name} has no known pods; deleted without a final checkpoint"
        _event(record, REASON_RUNTIME_LOST, message, warning=True)
        return
    pod = placements(pool, [record]).get(record.key)
    if pod is None or pod not in pool.pods:
        return  # never placed, taken off already, or its pod is gone: nothing left to free
    outcome, checkpoint = await _busy(pool, record.key, _delete_from_pod(state, pool, record.key, pod))
    pool.wake()
    if outcome is Removal.WRITING:
        raise kopf.TemporaryError(f"waiting for {pod} to write the final checkpoint", delay=0.5)
    if outcome is Removal.UNANSWERED:
        if elapsed < timeout:
            raise RuntimeUnavailable(f"runtime pod {pod} did not answer the DELETE")
        message = (
            f"runtime pod {pod} did not answer within {timeout:.0f}s; deleted without a final checkpoint"
        )
        logger.warning("%s: %s", record.key, message)
        _event(record, REASON_RUNTIME_LOST, message, warning=True)
        return
    if checkpoint:
        step, path = checkpoint.get("step"), checkpoint.get("path")
        _event(record, REASON_CHECKPOINTED, f"checkpointed at step {step}: {path}")
    pool.written.pop(record.key, None)


async def admit(
    state: OperatorState, pool: Pool, record: ExperimentRecord, problem: tuple[str, str] | None
) -> None:
    """The validation handler's verdict: Failed with the reason, or into the queue. A write that
    conflicts raises (kopf runs the handler again on the newer object)."""
    obs: Observed | None = None
    if problem is not None:
        reason, message = problem
        obs = Observed(phase="Failed", reason=reason, message=message)
    elif pool.status_of(record).get("phase") in (None, "Pending"):
        if record.spec.get("suspend"):
            kueue = record.labels.get(LABEL_KUEUE_QUEUE)
            reason = REASON_WAITING_FOR_KUEUE if kueue else REASON_SUSPENDED
            message = (
                f"waiting for Kueue (queue {kueue}) to admit it" if kueue else "suspended (spec.suspend)"
            )
            obs = Observed(phase="Suspended", reason=reason, message=message)
        else:
            message = f"admitted to LoRARuntime {record.spec.get('runtime')}; waiting for a place"
            obs = Observed(phase="Queued", reason=REASON_ADMITTED, message=message)
    if obs is not None:
        await write_status(state, pool, record, obs, conflict_raises=True)
    pool.wake()
