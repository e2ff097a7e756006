"""LoRARuntime handlers: one daemon per runtime keeps its pool and places its experiments."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from clora.api import LoRARuntime
from clora.constants import GROUP, RUNTIME_KIND, RUNTIME_PLURAL, VERSION
from clora_operator import pool
from clora_operator.config import OperatorConfig
from clora_operator.state import ExperimentRecord, state_of

RESOURCE = (GROUP, VERSION, RUNTIME_PLURAL)


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    @kopf.daemon(*RESOURCE, registry=registry, id="pool", cancellation_timeout=10.0)
    async def pool_loop(
        stopped: kopf.DaemonStopped,
        namespace: str,
        name: str,
        body: kopf.Body,
        memo: kopf.Memo,
        logger: logging.Logger,
        experiments_by_runtime: kopf.Index[tuple[str, str], ExperimentRecord],
        **_: Any,
    ) -> None:
        state = state_of(memo)
        # A fresh picture each time the daemon starts (operator start, or resumed after peering
        # paused it): placements are adopted again from the experiments' statuses.
        runtime_pool = state.reset_pool(namespace, name)
        while not stopped and not state.closing:
            try:
                runtime = LoRARuntime.model_validate(dict(body))
                records = list(experiments_by_runtime.get((namespace, name), []))
                with state.counting_errors(RUNTIME_KIND):
                    await pool.reconcile(state, runtime, records, logger)
            except Exception:
                if stopped or state.closing:
                    break  # the operator is stopping and has closed its clients under us
                # The loop must outlive any one failure: log it and try again at the next pass.
                logger.exception("reconciling LoRARuntime %s/%s failed; retrying", namespace, name)
            await runtime_pool.nap(config.reconcile_interval, stopped)

    @kopf.on.field(*RESOURCE, registry=registry, id="kick", field="spec")
    def spec_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        state_of(memo).pool(namespace, name).wake()
