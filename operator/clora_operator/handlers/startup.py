"""Operator start and stop: kopf settings, shared state, metrics server."""

from __future__ import annotations

import logging
from typing import Any

import kopf
import prometheus_client

from clora.constants import FINALIZER, GROUP
from clora.metrics import OperatorMetrics
from clora_operator.config import OperatorConfig
from clora_operator.k8s import KubeClient
from clora_operator.runtime_client import RuntimeClient
from clora_operator.state import MEMO_KEY, OperatorState, state_of

METRICS_SERVER_KEY = "clora-metrics-server"


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """clora's kopf settings (also used by tests that run kopf in-process)."""
    settings.persistence.finalizer = FINALIZER
    # Progress and the last-handled spec live in annotations under clora.dev: the CRDs' status
    # schemas would prune anything kopf wrote into status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = True
    # Handlers' log lines are not Events; clora posts its own Events, and kopf posts failures.
    settings.posting.level = logging.WARNING
    settings.peering.standalone = config.standalone
    settings.peering.name = config.peering
    settings.peering.mandatory = not config.standalone
    settings.peering.clusterwide = not config.namespaces
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    @kopf.on.login(registry=registry)
    def login(
        settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any
    ) -> kopf.ConnectionInfo | None:
        # A registry of our own has none of kopf's default login handlers: the same two, in order.
        return kopf.login_with_service_account(settings=settings, logger=logger) or (
            kopf.login_with_kubeconfig(settings=settings, logger=logger)
        )

    @kopf.on.startup(registry=registry)
    async def start(
        settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any
    ) -> None:
        configure(settings, config)
        metrics = OperatorMetrics.create()
        if config.metrics_port:
            server, _ = prometheus_client.start_http_server(config.metrics_port, registry=metrics.registry)
            memo[METRICS_SERVER_KEY] = server
        memo[MEMO_KEY] = OperatorState(
            config=config,
            metrics=metrics,
            kube=await KubeClient.connect(),
            runtime=RuntimeClient(),
        )
        logger.info("clora operator started: %s", config.model_dump(mode="json"))

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        state = state_of(memo)
        # kopf runs cleanup before it cancels the daemons: they must stop using the clients.
        state.closing = True
        server = memo.get(METRICS_SERVER_KEY)
        if server is not None:
            server.shutdown()  # so an operator restarted in the same process can bind the port
            server.server_close()
        await state.kube.close()
        await state.runtime.close()
