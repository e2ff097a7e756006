"""Pure status builders: what the operator knows of an experiment or a pool -> the status to write.

Conditions follow Kubernetes conventions (metav1.Condition): every type is always present,
`lastTransitionTime` changes only when a condition's status flips, and a write is skipped when
nothing but timestamps would change (as kuberay's consistency.go does). The clock is an argument,
so these functions are deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from clora.api import TERMINAL_PHASES
from clora.api.runtime_api import ExperimentState
from clora.constants import (
    COND_ADMITTED,
    COND_CHECKPOINTED,
    COND_DEGRADED,
    COND_FAILED,
    COND_PUBLISHED,
    COND_READY,
    COND_RUNNING,
    COND_SCHEDULED,
    COND_SUCCEEDED,
    MAX_MESSAGE_LENGTH,
    REASON_ADMITTED,
    REASON_CHECKPOINTED,
    REASON_DATASET_TOO_LARGE,
    REASON_INVALID,
    REASON_MISSING_DATASET,
    REASON_PREEMPTED,
    REASON_PUBLISH_FAILED,
    REASON_PUBLISHED,
    REASON_RANK_TOO_HIGH,
    REASON_RUNNING,
    REASON_RUNTIME_REJECTED,
    REASON_SCHEDULED,
    REASON_SUCCEEDED,
    REASON_TOKEN_BUDGET_TOO_HIGH,
    REASON_UNKNOWN_RUNTIME,
    REASON_WAITING_FOR_KUEUE,
)

Status = dict[str, Any]

# Reasons that mean the spec itself is wrong: the experiment was never admitted.
INVALID_REASONS = frozenset(
    {
        REASON_INVALID,
        REASON_UNKNOWN_RUNTIME,
        REASON_RANK_TOO_HIGH,
        REASON_MISSING_DATASET,
        REASON_DATASET_TOO_LARGE,
        REASON_TOKEN_BUDGET_TOO_HIGH,
        REASON_RUNTIME_REJECTED,
    }
)
# The runtime's phase of an experiment -> the resource's phase, while it is on a pod.
RUNTIME_TO_PHASE = {
    "Pending": "Scheduled",
    "Running": "Running",
    "Suspended": "Suspended",
    "Succeeded": "Succeeded",
    "Failed": "Failed",
    "Removing": "Running",  # not mirrored (pool._mirror skips it); here so every runtime phase maps
}


def timestamp(when: datetime) -> str:
    """RFC 3339 in UTC at second precision, as the API server writes times."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def bounded(message: str) -> str:
    """A message cut to the CRD's maxLength: a longer one would make the API server refuse the write."""
    if len(message) <= MAX_MESSAGE_LENGTH:
        return message
    return message[: MAX_MESSAGE_LENGTH - 15] + " ... (cut)"


@dataclass(frozen=True, slots=True)
class Observed:
    """What the operator knows of one experiment now."""

    phase: str
    reason: str
    message: str = ""
    runtime_pod: str | None = None
    node: str | None = None
    state: ExperimentState | None = None
    """The runtime's last answer about it, when it is on a pod."""
    checkpoint: Mapping[str, Any] | None = None
    """A checkpoint learned outside the runtime's answer (from a DELETE)."""


def observe_runtime(state: ExperimentState, pod: str, node: str | None) -> Observed:
    """The runtime's answer about an experiment on `pod` -> what the status should say."""
    phase = RUNTIME_TO_PHASE[state.phase]
    reason = {
        "Scheduled": "Scheduled",
        "Running": "Training",
        "Suspended": "Suspended",
        "Succeeded": "Completed",
        "Failed": "TrainingFailed",
    }[phase]
    message = (
        state.message
        or {
            "Scheduled": f"placed on {pod}, waiting for its first tick",
            "Running": f"training on {pod}",
            "Suspended": f"suspended on {pod}",
            "Succeeded": f"trained {state.step} steps on {pod}",
            "Failed": f"failed on {pod}",
        }[phase]
    )
    return Observed(phase=phase, reason=reason, message=message, runtime_pod=pod, node=node, state=state)


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: str,
    reason: str,
    message: str,
    *,
    now: datetime,
    generation: int | None,
) -> list[dict[str, Any]]:
    """A copy of `conditions` with one condition set; its lastTransitionTime moves only on a flip."""
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == status else None
    cond: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": bounded(message),
        "lastTransitionTime": since or timestamp(now),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    out.append(cond)
    return out


def _experiment_conditions(
    current: list[dict[str, Any]], obs: Observed, checkpoint: Mapping[str, Any] | None, **kw: Any
) -> list[dict[str, Any]]:
    phase, reason, message = obs.phase, obs.reason, obs.message
    invalid = phase == "Failed" and reason in INVALID_REASONS
    waiting_for_kueue = phase == "Suspended" and reason == REASON_WAITING_FOR_KUEUE
    if phase == "Pending":
        admitted = ("Unknown", "Validating", "the operator has not checked the spec yet")
    elif invalid or waiting_for_kueue:
        admitted = ("False", reason, message)
    else:
        admitted = ("True", REASON_ADMITTED, "the spec is valid for its runtime")
    on_pod = phase in ("Scheduled", "Running")
    scheduled = (
        ("True", "Scheduled", f"on runtime pod {obs.runtime_pod}") if on_pod else ("False", reason, message)
    )
    running = ("True", reason, message) if phase == "Running" else ("False", phase, message)
    if checkpoint:
        checkpointed = ("True", "Checkpointed", f"step {checkpoint.get('step')} at {checkpoint.get('path')}")
    else:
        checkpointed = ("False", "NoCheckpoint", "no checkpoint written yet")
    succeeded = ("True", reason, message) if phase == "Succeeded" else ("False", phase, "")
    failed = ("True", reason, message) if phase == "Failed" else ("False", phase, "")
    conds = current
    for type_, (status, why, text) in (
        (COND_ADMITTED, admitted),
        (COND_SCHEDULED, scheduled),
        (COND_RUNNING, running),
        (COND_CHECKPOINTED, checkpointed),
        (COND_SUCCEEDED, succeeded),
        (COND_FAILED, failed),
    ):
        conds = set_condition(conds, type_, status, why, text, **kw)
    return _ordered(conds)


def _ordered(conds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    order = {t: i for i, t in enumerate((COND_ADMITTED, COND_SCHEDULED, COND_RUNNING, COND_CHECKPOINTED))}
    return sorted(conds, key=lambda c: order.get(c["type"], len(order)))


def experiment_status(
    current: Mapping[str, Any] | None,
    obs: Observed,
    *,
    spec: Mapping[str, Any],
    generation: int | None,
    now: datetime,
) -> Status:
    """The whole status an experiment should have, given its current one and what is observed.

    Succeeded and Failed are final: once there, the phase never changes (only a newer checkpoint,
    such as the final one a DELETE returns, is recorded). The step never falls below the step of the
    checkpoint recorded (a resumed experiment restarts from there, not from 0)."""
    cur = dict(current or {})
    if cur.get("phase") in TERMINAL_PHASES:
        return _final(cur, obs, spec=spec, now=now, generation=generation)
    state = obs.state
    checkpoint: Mapping[str, Any] | None = cur.get("lastCheckpoint")
    if state is not None and state.last_checkpoint is not None:
        checkpoint = state.last_checkpoint.model_dump(mode="json", by_alias=True)
    if obs.checkpoint:
        checkpoint = dict(obs.checkpoint)
    if checkpoint:
        checkpoint = {k: v for k, v in checkpoint.items() if v is not None}
    step = state.step if state is not None else cur.get("step", 0)
    step = max(step or 0, int((checkpoint or {}).get("step") or 0))
    reward = (
        state.reward.model_dump(mode="json", by_alias=True, exclude_none=True)
        if state is not None
        else cur.get("reward", {})
    )
    total = (spec.get("training") or {}).get("steps")
    start = cur.get("startTime")
    if start is None and obs.phase == "Running":
        start = timestamp(state.started_at) if state is not None and state.started_at else timestamp(now)
    terminal = obs.phase in TERMINAL_PHASES
    completion = (cur.get("completionTime") or timestamp(now)) if terminal else None
    kw: dict[str, Any] = {"now": now, "generation": generation}
    conditions = _experiment_conditions(list(cur.get("conditions") or []), obs, checkpoint, **kw)
    published, conditions = _published(cur, obs, spec, conditions, **kw)
    return {
        "phase": obs.phase,
        "runtimePod": obs.runtime_pod,
        "node": obs.node,
        "step": step,
        "totalSteps": total,
        "reward": reward,
        "lastCheckpoint": checkpoint,
        "published": published,
        "startTime": start,
        "completionTime": completion,
        "message": bounded(obs.message),
        "observedGeneration": generation,
        "conditions": conditions,
    }


def _published(
    cur: Mapping[str, Any], obs: Observed, spec: Mapping[str, Any], conds: list[dict[str, Any]], **kw: Any
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """status.published (the runtime's, else the one recorded: the version serving outlives its pod)
    and the Published condition, present only with spec.publish: False while the last publish failed
    (training goes on; the runtime retries at the next checkpoint)."""
    state = obs.state
    published = cur.get("published")
    if state is not None and state.published is not None:
        published = state.published.model_dump(mode="json", by_alias=True, exclude_none=True)
    if not spec.get("publish"):
        return published, conds
    error = state.publish_error if state is not None else ""
    if error:
        serving = f"; serving step {published['step']}" if published else ""
        cond = ("False", REASON_PUBLISH_FAILED, error + serving)
    elif published:
        cond = (
            "True",
            REASON_PUBLISHED,
            f"step {published['step']} as {published['name']} on {published['target']}",
        )
    else:
        cond = ("False", "NotPublished", "no checkpoint published yet")
    return published, _ordered(set_condition(conds, COND_PUBLISHED, *cond, **kw))


def _final(
    cur: Status, obs: Observed, *, spec: Mapping[str, Any], now: datetime, generation: int | None
) -> Status:
    """A Succeeded or Failed status: only a newer checkpoint (the final one) and a newer publish are
    recorded."""
    published, conds = _published(
        cur, obs, spec, list(cur.get("conditions") or []), now=now, generation=generation
    )
    if published != cur.get("published"):
        cur = {**cur, "published": published, "conditions": conds}
    checkpoint = obs.checkpoint
    if not checkpoint and obs.state is not None and obs.state.last_checkpoint is not None:
        checkpoint = obs.state.last_checkpoint.model_dump(mode="json", by_alias=True)
    old = cur.get("lastCheckpoint") or {}
    if not checkpoint or not checkpoint.get("path") or checkpoint.get("path") == old.get("path"):
        return cur
    if int(checkpoint.get("step") or 0) < int(old.get("step") or 0):
        return cur
    checkpoint = {k: v for k, v in checkpoint.items() if v is not None}
    text = f"step {checkpoint.get('step')} at {checkpoint.get('path')}"
    conds = set_condition(
        list(cur.get("conditions") or []),
        COND_CHECKPOINTED,
        "True",
        "Checkpointed",
        text,
        now=now,
        generation=generation,
    )
    return {
        **cur,
        "lastCheckpoint": checkpoint,
        "step": max(int(cur.get("step") or 0), int(checkpoint.get("step") or 0)),
        "conditions": _ordered(conds),
    }


@dataclass(frozen=True, slots=True)
class Event:
    """A Kubernetes Event to post about an experiment."""

    reason: str
    message: str
    warning: bool = False


def transition_events(before: Mapping[str, Any], after: Mapping[str, Any], obs: Observed) -> list[Event]:
    """The Events a status write from `before` to `after` is worth: one per phase transition and one
    per new checkpoint. A write that changes neither (step, reward) posts none, so a poll that
    repeats what is known never repeats an Event."""
    events = []
    was, now = before.get("phase"), after.get("phase")
    if now != was:
        pod, node = after.get("runtimePod"), after.get("node")
        if now == "Scheduled":
            events.append(Event(REASON_SCHEDULED, f"placed on {pod} (node {node})"))
        elif now == "Running":
            if was != "Scheduled":  # placed and running in one write: both transitions are news
                events.append(Event(REASON_SCHEDULED, f"placed on {pod} (node {node})"))
            events.append(Event(REASON_RUNNING, f"training on {pod} (node {node})"))
        elif now == "Queued" and was in (None, "Pending"):
            events.append(Event(REASON_ADMITTED, obs.message))
        elif now == "Queued":
            # Preempted by X, RuntimeLost, ...: why it went back to the queue.
            events.append(
                Event(obs.reason, f"requeued: {obs.message}", warning=obs.reason != REASON_PREEMPTED)
            )
        elif now == "Suspended":
            events.append(Event(obs.reason, obs.message))
        elif now == "Succeeded":
            events.append(
                Event(REASON_SUCCEEDED, f"{obs.message}; reward {(after.get('reward') or {}).get('mean')}")
            )
        elif now == "Failed":
            events.append(Event(obs.reason, obs.message, warning=True))
    old_pub, new_pub = before.get("published") or {}, after.get("published") or {}
    if new_pub.get("step") is not None and new_pub.get("step") != old_pub.get("step"):
        events.append(
            Event(
                REASON_PUBLISHED,
                f"step {new_pub['step']} published as {new_pub.get('name')} on {new_pub.get('target')}",
            )
        )
    old_cp, new_cp = before.get("lastCheckpoint") or {}, after.get("lastCheckpoint") or {}
    if new_cp.get("path") and new_cp.get("path") != old_cp.get("path"):
        events.append(
            Event(REASON_CHECKPOINTED, f"checkpointed at step {new_cp.get('step')}: {new_cp['path']}")
        )
    return events


def _without_times(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _without_times(v) for k, v in value.items() if k != "lastTransitionTime" and v is not None}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> Status | None:
    """The merge patch from `current` to `desired`, or None when only timestamps would change.

    A None value in `desired` removes the field (JSON merge patch)."""
    cur = dict(current or {})
    patch = {
        k: v
        for k, v in desired.items()
        if _without_times(v) != _without_times(cur.get(k)) and not (v is None and k not in cur)
    }
    return patch or None


def runtime_status(
    current: Mapping[str, Any] | None,
    pods: list[dict[str, Any]],
    *,
    slots_per_pod: int,
    generation: int | None,
    now: datetime,
    refused: tuple[str, str] | None = None,
) -> Status:
    """A LoRARuntime's status from its pods, each {name, node, ready, experiments, slotsFree}.
    `slots_per_pod` is replicas x maxAdapters. `refused` (reason, message): the operator builds no
    pods for it (a field the chart does not allow, a token Secret it did not create)."""
    ready = [p for p in pods if p["ready"]]
    used = sum(len(p["experiments"]) for p in ready)
    conds = list((current or {}).get("conditions") or [])
    kw: dict[str, Any] = {"now": now, "generation": generation}
    if refused is not None:
        conds = set_condition(conds, COND_READY, "False", *refused, **kw)
        conds = set_condition(conds, COND_DEGRADED, "True", *refused, **kw)
    elif ready:
        conds = set_condition(
            conds, COND_READY, "True", "PodsReady", f"{len(ready)} of {len(pods)} ready", **kw
        )
    elif pods:
        conds = set_condition(conds, COND_READY, "False", "NoReadyPods", "no runtime pod is ready", **kw)
    else:
        conds = set_condition(conds, COND_READY, "False", "NoMatchingNodes", "no node matches", **kw)
    down = sorted(p["name"] for p in pods if not p["ready"])
    if refused is None and down:
        conds = set_condition(conds, COND_DEGRADED, "True", "PodsNotReady", ", ".join(down), **kw)
    elif refused is None:
        conds = set_condition(conds, COND_DEGRADED, "False", "AllPodsReady", "", **kw)
    return {
        "readyPods": len(ready),
        "totalSlots": len(ready) * slots_per_pod,
        "usedSlots": used,
        "pods": sorted(pods, key=lambda p: p["name"]),
        "conditions": conds,
        "observedGeneration": generation,
    }
