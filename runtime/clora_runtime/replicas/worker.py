"""One replica of a runtime pod, as a Ray actor: a whole engine (base model, adapter bank, sampler,
trainer) and its tick loop in a process of its own, on the device(s) Ray gave it.

The actor is threaded (ReplicaSet creates it with max_concurrency > 1): its methods run beside the
tick loop's thread and call the engine's thread-safe methods, which never wait for a tick. Expected
refusals come back as values (`Answer`), not as exceptions, so that the pod answers them with the
engine's own message and status instead of a Ray traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from clora.api import CheckpointRef, LoRAExperimentSpec
from clora.api.runtime_api import ExperimentState, RemovedExperiment, Sample
from clora.metrics import RuntimeMetrics
from clora_runtime.config import EngineConfig
from clora_runtime.server.errors import describe

T = TypeVar("T")
Outcome = Literal["ok", "conflict", "not_found", "invalid", "os_error"]


@dataclass(frozen=True)
class Answer:
    """An engine call's result, or the refusal the pod turns into 409 / 404 / 422."""

    outcome: Outcome
    value: Any = None
    message: str = ""
    os_error: tuple[int | None, str | None, str | None] | None = None
    """os_error: (errno, strerror, filename), raised again as an OSError in the pod, whose app tells a
    file the client named (422) from the runtime's own (500)."""


@dataclass(frozen=True)
class ReplicaStatus:
    """What the pod polls of each replica."""

    state: str  # server.loop.LoopState's value
    error: str | None
    loaded: bool
    ticks: int
    incarnation: str  # new for every start of the actor process: how the pod sees a restart
    pid: int
    tick_running_s: float | None = None  # how long its running tick has run (the stall deadline)


class ReplicaWorker:
    """The body of the Ray actor (ray.remote(ReplicaWorker) in replica_set.py)."""

    def __init__(self, config: dict[str, Any], replica: int, log_level: str = "info") -> None:
        logging.basicConfig(
            level=log_level.upper(),
            format=f"%(asctime)s %(levelname)s replica-{replica} %(name)s: %(message)s",
            stream=sys.stderr,  # Ray forwards it to the pod's log
        )
        from clora_runtime.engine import Engine, ExperimentConflict, ExperimentNotFound
        from clora_runtime.server.loop import TickLoop

        self._conflict, self._not_found = ExperimentConflict, ExperimentNotFound
        self.replica = replica
        self.metrics = RuntimeMetrics.create()
        self.engine = Engine(EngineConfig.model_validate(config), self.metrics, replica=replica)
        self.loop = TickLoop(self.engine)
        self.incarnation = uuid.uuid4().hex
        self.loop.start()  # loads the base model on the loop's thread; status() says when it is done

    def _answer(self, call: Callable[[], T], *, wake: bool = False) -> Answer:
        try:
            value = call()
        except self._conflict as e:
            return Answer("conflict", message=str(e) or "conflict")
        except self._not_found as e:
            return Answer("not_found", message=str(e))
        except ValidationError as e:
            return Answer("invalid", message=describe(e.errors()))
        except ValueError as e:
            return Answer("invalid", message=str(e) or "invalid value")
        except OSError as e:
            name = e.filename if isinstance(e.filename, str) else None
            return Answer("os_error", message=str(e), os_error=(e.errno, e.strerror, name))
        if wake:
            self.loop.wake()
        return Answer("ok", value)

    # ---- what ReplicaSet calls ------------------------------------------------------------------

    def status(self) -> ReplicaStatus:
        loop = self.loop
        return ReplicaStatus(
            loop.state.value,
            loop.error,
            loop.loaded,
            loop.ticks,
            self.incarnation,
            os.getpid(),
            loop.tick_running_s(),
        )

    def upsert(
        self,
        namespace: str,
        name: str,
        spec: LoRAExperimentSpec,
        resume_from: str | None,
        token: str | None,
        dataset_text: str | None = None,
    ) -> Answer:
        return self._answer(
            lambda: self.engine.upsert(namespace, name, spec, resume_from, token, dataset_text), wake=True
        )

    def resume(
        self,
        namespace: str,
        name: str,
        spec: LoRAExperimentSpec,
        fallback: str | None,
        token: str | None,
        dataset_text: str | None = None,
        run_id: str | None = None,
    ) -> Answer:
        """Re-admit an experiment this replica held before it restarted: from the newest checkpoint of
        its run (`run_id`; None when no checkpoint of it was seen) in its folder, else from `fallback`
        (the resumeFrom it first came with), else from the start."""
        newest = self.newest_checkpoint(namespace, name, run_id) if run_id is not None else None
        return self.upsert(namespace, name, spec, newest.path if newest else fallback, token, dataset_text)

    def newest_checkpoint(self, namespace: str, name: str, run_id: str | None) -> CheckpointRef | None:
        """The newest whole checkpoint of one run (None: of any run) in the experiment's folder: only
        its own run, so a phantom registration's checkpoints under the same name are never taken."""
        from clora_runtime import checkpoint

        folder = checkpoint.experiment_dir(self.engine.config.checkpoint_dir, namespace, name)
        whole = [
            p
            for p in checkpoint.list_checkpoints(folder, run_id)
            if (p / "adapter_model.safetensors").is_file()
        ]
        return CheckpointRef(step=checkpoint.read_step(whole[-1]), path=str(whole[-1])) if whole else None

    def remove(self, namespace: str, name: str) -> Answer:
        return self._answer(lambda: self.engine.remove(namespace, name), wake=True)

    def push_samples(self, namespace: str, name: str, samples: list[Sample]) -> Answer:
        return self._answer(lambda: self.engine.push_samples(namespace, name, samples), wake=True)

    def state(self, namespace: str, name: str) -> Answer:
        return self._answer(lambda: self.engine.state(namespace, name))

    def rollouts(self, namespace: str, name: str, step: int | None) -> Answer:
        return self._answer(lambda: self.engine.rollouts(namespace, name, step))

    def listing(self) -> tuple[list[ExperimentState], list[RemovedExperiment]]:
        return self.engine.states(), self.engine.removed()

    def occupancy(self) -> list[tuple[str, int]]:
        return self.engine.occupancy()

    def collect(self) -> list[Any]:
        """This replica's metric families (prometheus_client Metric objects), step and reward fresh."""
        self.metrics.refresh(self.engine.states if self.loop.loaded else None)
        return list(self.metrics.registry.collect())

    def stop_ticking(self) -> None:
        """No tick after the running one (SIGTERM): checkpoint_all then waits for that one only."""
        self.loop.stop(timeout=0)

    def checkpoint_all(self) -> None:
        if self.loop.loaded:
            self.engine.checkpoint_all()

    def close(self) -> None:
        close = getattr(self.engine.sampler, "close", None)
        if callable(close):
            close()
