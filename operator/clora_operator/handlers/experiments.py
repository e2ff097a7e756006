"""LoRAExperiment handlers: the index the scheduler reads, validation, deletion (the finalizer)."""

from __future__ import annotations

import datetime
import logging
from typing import Any

import kopf

from clora.api import TERMINAL_PHASES
from clora.constants import EXPERIMENT_KIND, EXPERIMENT_PLURAL, GROUP, REASON_INVALID, VERSION
from clora_operator import admission, pool
from clora_operator.config import OperatorConfig
from clora_operator.state import ExperimentRecord, OperatorState, state_of

RESOURCE = (GROUP, VERSION, EXPERIMENT_PLURAL)


def experiments_by_runtime(
    namespace: str, body: kopf.Body, spec: kopf.Spec, **_: Any
) -> dict[tuple[str, str], ExperimentRecord]:
    """Index: (namespace, runtime) -> the experiments naming that runtime."""
    return {(namespace, str(spec.get("runtime", ""))): ExperimentRecord.from_body(body)}


async def validate(
    namespace: str, body: kopf.Body, spec: kopf.Spec, status: kopf.Status, memo: kopf.Memo, **_: Any
) -> None:
    """Checks the spec against its runtime; Failed with the reason, or queued. Any spec change
    (suspend, priority, learning rate) also wakes the runtime's loop, which acts on it."""
    if status.get("phase") in TERMINAL_PHASES:
        return
    state = state_of(memo)
    with state.handler_errors(EXPERIMENT_KIND):
        await _validate(state, namespace, body, spec)


async def _validate(state: OperatorState, namespace: str, body: kopf.Body, spec: kopf.Spec) -> None:
    record = ExperimentRecord.from_body(body)
    runtime_name = str(spec.get("runtime", ""))
    parsed = record.parsed
    if parsed is None:
        # Names are checked (DNS-1123) before anything is read: nothing is looked up for a spec the
        # models refuse, and every read is in the experiment's own namespace.
        problem = (REASON_INVALID, f"spec: {record.problem}")
    else:
        runtime = await state.kube.get_runtime(namespace, parsed.runtime)
        configmap = None
        dataset = parsed.task.dataset
        if dataset is not None and dataset.config_map is not None:
            configmap = await state.kube.get_configmap(namespace, dataset.config_map.name)
        problem = admission.check(spec, namespace, runtime, configmap)
    await pool.admit(state, state.pool(namespace, runtime_name), record, problem)


async def delete(
    namespace: str,
    body: kopf.Body,
    spec: kopf.Spec,
    memo: kopf.Memo,
    logger: logging.Logger,
    runtime: datetime.timedelta,
    **_: Any,
) -> None:
    """The final checkpoint on the runtime and the slot back, before the finalizer comes off; waits
    while the runtime writes the checkpoint, gives up after delete_timeout only when it does not answer."""
    state = state_of(memo)
    record = ExperimentRecord.from_body(body)
    with state.handler_errors(EXPERIMENT_KIND):
        runtime_pool = state.pool(namespace, str(spec.get("runtime", "")))
        await pool.release(state, runtime_pool, record, runtime.total_seconds(), logger)


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    kopf.index(*RESOURCE, registry=registry)(experiments_by_runtime)
    kopf.on.create(*RESOURCE, registry=registry, id="validate")(validate)
    kopf.on.resume(*RESOURCE, registry=registry, id="validate")(validate)
    kopf.on.update(*RESOURCE, registry=registry, id="revalidate", field="spec")(validate)
    # Retried (TemporaryError) until the runtime has answered; the handler itself gives up after
    # delete_timeout when the runtime does not answer, so no retry limit here.
    kopf.on.delete(*RESOURCE, registry=registry, id="release", backoff=2)(delete)
