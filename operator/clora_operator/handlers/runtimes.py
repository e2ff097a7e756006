"""LoRARuntime handlers: one daemon per runtime keeps its pool, polls its pods, places its experiments."""

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
    # An error ends the daemon (counted by its reason); kopf starts it again after the error's delay,
    # with a fresh pool: every pass decides from the cluster and the runtimes, not from memory.
    @kopf.daemon(*RESOURCE, registry=registry, id="pool", cancellation_timeout=10.0, backoff=2.0)
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
        runtime_pool = state.reset_pool(namespace, name)

        def records() -> list[ExperimentRecord]:
            return list(experiments_by_runtime.get((namespace, name), []))

        try:
            while not stopped and not state.closing:
                with state.handler_errors(RUNTIME_KIND):
                    runtime = LoRARuntime.model_validate(dict(body))
                    await pool.reconcile(state, runtime, records, logger)
                await runtime_pool.nap(config.reconcile_interval, stopped)
        except Exception:
            if stopped or state.closing:
                return  # the operator is stopping and has closed its clients under us
            raise
        finally:
            pool.stop_pollers(runtime_pool)

    @kopf.on.field(*RESOURCE, registry=registry, id="kick", field="spec")
    def spec_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        state_of(memo).pool(namespace, name).wake()
