"""`clora runtime`: one warm runtime server, as a runtime pod runs it.

Threads: uvicorn serves the API on a thread of its own, the tick loop (base-model load, then ticks)
on another, and the main thread waits for SIGTERM/SIGINT. On a signal it stops the loop after the
current tick, checkpoints every experiment, then stops the server and exits 0, all within the grace
period (exit 1 if the checkpoints could not finish in time). The API keeps answering meanwhile, with
/readyz at 503, so the operator sees the pod leave before it is gone.

With --replicas N > 1 the engines run as Ray actors (clora_runtime.replicas) and the same shutdown
stops every replica's ticks, then checkpoints all replicas at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import typing
from types import FrameType
from typing import Any

from clora.constants import RUNTIME_PORT, TOKEN_ENV, TOKEN_FILE_ENV

log = logging.getLogger("clora.runtime")

# Below Kubernetes' default terminationGracePeriodSeconds (30 s), which ends in SIGKILL.
DEFAULT_GRACE_PERIOD_S = 25.0


def _limit_fields() -> dict[str, Any]:
    from clora_runtime.server.limits import ServerLimits

    return dict(ServerLimits.model_fields)


def _engine_fields() -> dict[str, Any]:
    from clora_runtime.config import EngineConfig

    return dict(EngineConfig.model_fields)


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Server flags, plus one flag per EngineConfig field (--max-adapters for max_adapters, ...).

    The engine flags are generated from the config model so its descriptions are the help text and
    its defaults stay in one place; values are validated by the model itself.
    """
    parser.add_argument(
        "--host",
        default=None,
        help="address to bind (default: all interfaces; 127.0.0.1 with --insecure-no-auth)",
    )
    parser.add_argument("--port", type=int, default=RUNTIME_PORT, help=f"port (default {RUNTIME_PORT})")
    parser.add_argument(
        "--grace-period",
        type=float,
        default=DEFAULT_GRACE_PERIOD_S,
        metavar="SECONDS",
        help="on SIGTERM: time to finish the tick, checkpoint every experiment and exit"
        f" (default {DEFAULT_GRACE_PERIOD_S:g}; keep it below the pod's terminationGracePeriodSeconds)",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help=f"serve without a bearer token (only on a trusted machine; otherwise {TOKEN_ENV} or"
        f" {TOKEN_FILE_ENV} is required and the server refuses to start without one)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    pod = parser.add_argument_group("replicas (LoRARuntime spec.replicas)")
    pod.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="engines in this process's pod, each with the engine settings below (its own slots): 1 runs"
        " the engine in-process; more run one Ray actor each, one GPU each when the pod has GPUs"
        " (default 1)",
    )
    pod.add_argument(
        "--devices-per-replica",
        type=int,
        default=1,
        metavar="N",
        help="GPUs per replica; only 1 until tensor parallel is built (docs/multi-gpu.md)",
    )
    pod.add_argument(
        "--ray-gpus",
        type=int,
        default=None,
        metavar="N",
        help="GPUs the pod's Ray instance manages (default: those it detects; on a CPU, N fake GPUs give"
        " each replica a device id of its own, as tests do)",
    )
    limits = parser.add_argument_group("HTTP server limits (ServerLimits)")
    for name, field in _limit_fields().items():
        limits.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            metavar=name.upper(),
            help=f"{field.description} (default: {field.get_default()})",
        )
    engine = parser.add_argument_group("engine (EngineConfig)")
    for name, field in _engine_fields().items():
        default = field.get_default(call_default_factory=True)
        engine.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            choices=_choices(field.annotation),
            metavar=name.upper(),
            help=f"{field.description} (default: {default})",
        )


def _engine_config(args: argparse.Namespace) -> Any:
    from clora_runtime.config import EngineConfig

    return _from_flags(EngineConfig, _engine_fields(), args)


def _server_limits(args: argparse.Namespace) -> Any:
    from clora_runtime.server.limits import ServerLimits

    return _from_flags(ServerLimits, _limit_fields(), args)


def _from_flags(model: Any, fields: dict[str, Any], args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    given = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    try:
        return model.model_validate(given)
    except ValidationError as e:
        lines = [
            f"--{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}" for err in e.errors()
        ]
        raise SystemExit("clora runtime: " + "; ".join(lines)) from None


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from clora_runtime.server.auth import TokenMissing, load_token

    token: str | None = None
    if args.insecure_no_auth:
        log.warning("serving WITHOUT authentication (--insecure-no-auth)")
    else:
        try:
            token = load_token()
        except TokenMissing as e:
            print(f"clora runtime: {e}", file=sys.stderr)
            return 2
    config = _engine_config(args)
    limits = _server_limits(args).fitted_to_open_files()
    # Without a token only this machine may call: an explicit --host is needed to serve a network.
    host = args.host or ("127.0.0.1" if args.insecure_no_auth else "0.0.0.0")
    if args.replicas < 1:
        raise SystemExit("clora runtime: --replicas: must be at least 1")
    if args.devices_per_replica != 1:
        from clora.api.runtime_types import TENSOR_PARALLEL_NOT_BUILT

        raise SystemExit(f"clora runtime: --devices-per-replica: {TENSOR_PARALLEL_NOT_BUILT}")
    runtime = Runtime(
        config,
        token=token,
        host=host,
        port=args.port,
        log_level=args.log_level,
        replicas=args.replicas,
        ray_gpus=args.ray_gpus,
        limits=limits,
    )
    return runtime.run(args.grace_period)


class Runtime:
    """The engine (or the pod's replicas), its tick loop(s) and the HTTP server of one process, and
    their orderly shutdown."""

    def __init__(
        self,
        config: Any,
        *,
        token: str | None,
        host: str,
        port: int,
        log_level: str = "info",
        replicas: int = 1,
        ray_gpus: int | None = None,
        limits: Any = None,
    ) -> None:
        import uvicorn

        from clora_runtime.server.app import create_app
        from clora_runtime.server.limits import ServerLimits, guarded_protocol

        limits = limits or ServerLimits()

        if replicas == 1:  # in-process, as always: ray is not even imported
            from clora.metrics import RuntimeMetrics
            from clora_runtime.engine import Engine, ExperimentConflict, ExperimentNotFound
            from clora_runtime.server.loop import TickLoop

            metrics = RuntimeMetrics.create()
            self.engine: Any = Engine(config, metrics)
            self.loop: Any = TickLoop(self.engine, tick_deadline_s=limits.tick_deadline)
            app = create_app(
                self.engine,
                self.loop,
                lambda: metrics.exposition(self.engine.states if self.loop.loaded else None),
                token=token,
                conflict=ExperimentConflict,
                not_found=ExperimentNotFound,
                limits=limits,
            )
        else:
            from clora_runtime.replicas import replica_set

            self.engine = replica_set.ReplicaSet(
                config, replicas, gpus=ray_gpus, log_level=log_level, tick_deadline_s=limits.tick_deadline
            )
            self.loop = self.engine.loop
            app = create_app(
                self.engine,
                self.loop,
                self.engine.exposition,
                token=token,
                conflict=replica_set.ExperimentConflict,
                not_found=replica_set.ExperimentNotFound,
                unavailable=replica_set.ReplicaUnavailable,
                limits=limits,
            )
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                log_level=log_level,
                access_log=False,
                lifespan="off",
                http=guarded_protocol(limits),  # h11 with the header timeout and the connection cap
                timeout_keep_alive=limits.keep_alive_timeout,
            )
        )
        self._signalled = threading.Event()
        self._signals = 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            # A second Ctrl-C / SIGTERM: the user does not want to wait for checkpoints.
            os._exit(130 if signum == signal.SIGINT else 143)
        log.info("%s: checkpointing and shutting down", signal.Signals(signum).name)
        self._signalled.set()

    def run(self, grace_period: float) -> int:
        # uvicorn installs no signal handlers off the main thread: shutdown stays ours.
        server_thread = threading.Thread(target=self.server.run, name="clora-http", daemon=True)
        server_thread.start()
        self.loop.start()  # several replicas: ray.init, which sets a SIGTERM handler of its own
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        while not self._signalled.wait(0.5):
            if not server_thread.is_alive():
                log.error(
                    "the HTTP server stopped (could it bind %s:%s?)",
                    self.server.config.host,
                    self.server.config.port,
                )
                return 1
        return self.shutdown(grace_period, server_thread)

    def shutdown(self, grace_period: float, server_thread: threading.Thread) -> int:
        deadline = time.monotonic() + grace_period
        # No new ticks; the engine's checkpoint_all waits for a running one itself.
        self.loop.stop(timeout=0)
        done = threading.Event()
        errors: list[BaseException] = []

        def checkpoint() -> None:
            try:
                if self.loop.loaded:
                    self.engine.checkpoint_all()
            except BaseException as e:
                errors.append(e)
            finally:
                done.set()

        threading.Thread(target=checkpoint, name="clora-checkpoint-all", daemon=True).start()
        finished = done.wait(max(0.0, deadline - time.monotonic()))
        if not finished:
            log.error("checkpoints did not finish within the %.0f s grace period", grace_period)
        elif errors:
            log.error("checkpointing failed: %s", errors[0])
        else:
            log.info("every experiment checkpointed")
        self.server.should_exit = True
        server_thread.join(max(0.5, deadline - time.monotonic()))
        if finished:
            # The sampler's engine (vLLM), or the replicas and their Ray instance.
            close = getattr(getattr(self.engine, "sampler", None), "close", None) or getattr(
                self.engine, "close", None
            )
            if callable(close):
                close()
        return 0 if finished and not errors else 1


def _cli() -> int:  # python -m clora_runtime.server.main
    parser = argparse.ArgumentParser(prog="clora runtime")
    add_arguments(parser)
    return main(parser.parse_args())


if __name__ == "__main__":
    sys.exit(_cli())
