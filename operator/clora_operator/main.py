"""`clora operator`: the control plane, kopf with clora's settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys

import kopf

from clora.constants import OPERATOR_RECURSION_LIMIT
from clora_operator import config as operator_config
from clora_operator.config import OperatorConfig
from clora_operator.handlers import register


def add_arguments(parser: argparse.ArgumentParser) -> None:
    operator_config.add_arguments(parser)


def build_registry(config: OperatorConfig) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    register(registry, config)
    return registry


async def run(config: OperatorConfig, *, stop_flag: asyncio.Event | None = None) -> None:
    """Runs the operator until stopped (tests call this in-process with a stop flag)."""
    # kopf decodes every watched object with Python's json: at the default limit one object nested
    # deeper than ~1000 levels (the API server takes 10000) stopped the watcher for every namespace.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), OPERATOR_RECURSION_LIMIT))
    await kopf.operator(
        registry=build_registry(config),
        standalone=config.standalone,
        peering_name=None if config.standalone else config.peering,
        priority=config.priority if config.priority is not None else random.randrange(1, 2**31),
        namespaces=config.namespaces,
        clusterwide=not config.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{config.liveness_port}/healthz" if config.liveness_port else None,
        stop_flag=stop_flag,
    )


def main(args: argparse.Namespace) -> int:
    config = operator_config.from_args(args)
    logging.basicConfig(
        level=logging.DEBUG if config.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    kopf.configure(verbose=config.verbose)
    asyncio.run(run(config))
    return 0
