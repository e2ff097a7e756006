"""Runtime pod handlers: watch events, and one timer per pod polling its runtime."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from clora.constants import COMPONENT_RUNTIME, LABEL_COMPONENT, LABEL_MANAGED_BY, MANAGED_BY
from clora_operator import pool
from clora_operator.config import OperatorConfig
from clora_operator.pods import pod_info
from clora_operator.state import ExperimentRecord, state_of

LABELS = {LABEL_COMPONENT: COMPONENT_RUNTIME, LABEL_MANAGED_BY: MANAGED_BY}


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    @kopf.on.event("v1", "pods", registry=registry, labels=LABELS)
    def pod_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        info = pod_info(body)
        runtime_pool = state_of(memo).pool(info.namespace, info.runtime)
        pool.note_pod(runtime_pool, dict(body), deleted=event.get("type") == "DELETED")
        runtime_pool.wake()

    @kopf.timer("v1", "pods", registry=registry, labels=LABELS, interval=config.poll_interval, id="poll")
    async def poll(
        body: kopf.Body,
        memo: kopf.Memo,
        logger: logging.Logger,
        experiments_by_runtime: kopf.Index[tuple[str, str], ExperimentRecord],
        **_: Any,
    ) -> None:
        state = state_of(memo)
        info = pod_info(body)
        runtime_pool = state.pool(info.namespace, info.runtime)
        records = list(experiments_by_runtime.get((info.namespace, info.runtime), []))
        with state.counting_errors("Pod"):
            await pool.poll_pod(state, runtime_pool, info, records, logger)
