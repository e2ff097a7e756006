"""kopf handlers, one module per concern. Each module's `register` adds its handlers to a registry
with the intervals of the given config, so nothing registers itself on import."""

from __future__ import annotations

import kopf

from clora_operator.config import OperatorConfig
from clora_operator.handlers import experiments, pods, runtimes, startup


def register(registry: kopf.OperatorRegistry, config: OperatorConfig) -> None:
    startup.register(registry, config)
    experiments.register(registry, config)
    runtimes.register(registry, config)
    pods.register(registry, config)
