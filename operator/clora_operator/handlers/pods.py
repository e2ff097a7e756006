"""Runtime pod handlers: watch events only. An event handler puts no finalizer on the pods (a timer
or a change handler would), so deleting a runtime pod never waits for the operator; the pods are
polled by their LoRARuntime's daemon (pool.py, `keep_pollers`)."""

from __future__ import annotations

from typing import Any

import kopf

from clora.constants import COMPONENT_RUNTIME, LABEL_COMPONENT, LABEL_MANAGED_BY, MANAGED_BY
from clora_operator import pool
from clora_operator.config import OperatorConfig
from clora_operator.pods import pod_info
from clora_operator.state import state_of

LABELS = {LABEL_COMPONENT: COMPONENT_RUNTIME, LABEL_MANAGED_BY: MANAGED_BY}


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    @kopf.on.event("v1", "pods", registry=registry, labels=LABELS)
    def pod_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        info = pod_info(body)
        runtime_pool = state_of(memo).pool(info.namespace, info.runtime)
        pool.note_pod(runtime_pool, dict(body), deleted=event.get("type") == "DELETED")
        runtime_pool.wake()
