"""A runtime pod of several replicas (LoRARuntime spec.replicas > 1): Ray actors behind one HTTP API.

The pod starts a Ray instance of its own (loopback only, no dashboard, logs to the pod's stdout) and
one actor per replica with `num_gpus` = devices per replica, so each engine sees only its own GPU(s).
Experiments are independent (adapter-parallel): each lives on one replica, chosen by the fits/load
rule the operator's scheduler uses (clora.placement), and every call about it is forwarded there.

Threads: routes call this object from FastAPI's pool; a supervisor thread polls each replica's
status. `_lock` guards the bookkeeping below and is never held across a Ray call.

A replica whose process dies is restarted by Ray (max_restarts=-1): the supervisor sees its new
incarnation, waits for its base model, and re-admits its experiments from their newest checkpoints.
Meanwhile its experiments are answered from their last known state, and the other replicas, other
processes, never stop ticking.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from clora.api import LoRAExperimentSpec
from clora.api.runtime_api import (
    DeleteExperimentResponse,
    ExperimentState,
    RemovedExperiment,
    RolloutList,
    Sample,
)
from clora.api.runtime_types import RAY_OBJECT_STORE_MIB, TENSOR_PARALLEL_NOT_BUILT
from clora.metrics import label_replicas
from clora.placement import EngineCapacity, Occupancy, choose_replica
from clora_runtime.config import EngineConfig
from clora_runtime.replicas.worker import Answer, ReplicaStatus, ReplicaWorker
from clora_runtime.server.loop import LoopState, stall_message

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 120.0  # an admission may load a checkpoint; reads answer in milliseconds
POLL_TIMEOUT_S = 10.0
REMEMBERED = 4096  # removed experiments whose replica is remembered, for a repeated DELETE


class ExperimentConflict(Exception):
    """409, as clora_runtime.engine.ExperimentConflict (not imported: the pod's process needs no torch)."""


class ExperimentNotFound(KeyError):
    """404."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "experiment not found"


class ReplicaUnavailable(Exception):
    """503: the experiment's replica is restarting (or not started yet)."""


@dataclass
class _Placed:
    """An experiment the pod put on a replica: enough to put it back after the replica restarts."""

    spec: LoRAExperimentSpec
    resume_from: str | None
    replica: int
    verifier_token: str | None = field(default=None, repr=False)
    dataset_text: str | None = field(default=None, repr=False)  # a ConfigMap dataset's records
    removing: bool = False  # DELETE came while its replica was down


class _Families:
    """A collector that yields a fixed list of metric families (the replicas', merged)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class ReplicaLoops:
    """The LoopView (server/app.py) of a ReplicaSet: every replica's tick loop seen as one."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self._replicas = replicas

    @property
    def state(self) -> LoopState:
        return self._replicas.loop_state()

    @property
    def ready(self) -> bool:
        """/readyz: running, every replica up, none stalled."""
        return self.state == LoopState.RUNNING and self._replicas.all_up() and self.stalled is None

    @property
    def stalled(self) -> str | None:
        """The replicas whose running tick is past the tick deadline (as polled), or None."""
        return self._replicas.stalled()

    @property
    def loaded(self) -> bool:
        return self._replicas.loaded

    @property
    def error(self) -> str | None:
        return self._replicas.loop_error()

    def wake(self) -> None:
        """Each replica's own loop is woken by the call that gave it work."""

    def start(self) -> None:
        self._replicas.start()

    def stop(self, timeout: float | None = None) -> bool:
        return self._replicas.stop(timeout)


class ReplicaSet:
    """The EngineAPI (server/app.py) of a pod of `replicas` engines; `loop` is its LoopView."""

    def __init__(
        self,
        config: EngineConfig,
        replicas: int,
        *,
        devices_per_replica: int = 1,
        gpus: int | None = None,
        log_level: str = "info",
        poll_interval_s: float = 0.5,
        tick_deadline_s: float | None = None,
    ) -> None:
        if replicas < 2:
            raise ValueError("replicas: a ReplicaSet has 2 or more (1 runs the engine in-process)")
        if devices_per_replica != 1:
            raise ValueError(f"devicesPerReplica: {TENSOR_PARALLEL_NOT_BUILT}")
        self.config = config
        self.replicas = replicas
        self._gpus = gpus
        self._log_level = log_level
        self._poll_interval_s = poll_interval_s
        self._tick_deadline_s = tick_deadline_s
        self._capacity = EngineCapacity(config.max_adapters, config.max_rank, config.tokens_per_tick)
        self._actors: list[Any] = []
        self._lock = threading.Lock()
        self._placed: dict[str, _Placed] = {}
        self._reserved: dict[str, tuple[int, int]] = {}  # key -> (replica, tokens) while admitted
        self._last_replica: OrderedDict[str, int] = OrderedDict()  # removed keys, for a DELETE again
        self._last_state: dict[str, ExperimentState] = {}
        self._removed_here: OrderedDict[str, RemovedExperiment] = OrderedDict()
        self._status: list[ReplicaStatus | None] = [None] * replicas
        self._down: list[str | None] = ["not started"] * replicas  # why a replica cannot be called
        self._lost_at: list[float | None] = [None] * replicas
        self._ever_loaded = [False] * replicas
        self._stopping = False
        self._stop = threading.Event()
        self.loop = ReplicaLoops(self)

    # ---- what the loop view reports ---------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """Every replica has loaded its base model (once: a restarting one is answered from memory)."""
        return all(self._ever_loaded)

    def loop_state(self) -> LoopState:
        """RUNNING while any replica takes new experiments. DEAD when one replica's engine died (its
        model failed to load, or its tick loop died: a fault of the base model, not of one experiment),
        as for a pod of one replica: Kubernetes restarts the pod."""
        statuses = [s for s in self._status if s is not None]
        if any(s.state == LoopState.DEAD for s in statuses):
            return LoopState.DEAD
        if self._stopping:
            return LoopState.STOPPING
        if self.loaded and any(self._available(i) for i in range(self.replicas)):
            return LoopState.RUNNING
        return LoopState.LOADING

    def stalled(self) -> str | None:
        found = [
            f"replica {i}: {why}"
            for i, s in enumerate(self._status)
            if s is not None and (why := stall_message(s.tick_running_s, self._tick_deadline_s))
        ]
        return "; ".join(found) or None

    def all_up(self) -> bool:
        return all(self._available(i) for i in range(self.replicas))

    def loop_error(self) -> str | None:
        errors = [f"replica {i}: {s.error}" for i, s in enumerate(self._status) if s is not None and s.error]
        down = [f"replica {i}: {why}" for i, why in enumerate(self._down) if why and self._ever_loaded[i]]
        return "; ".join(errors + down) or None

    # ---- start and stop ------------------------------------------------------------------------

    def start(self) -> None:
        """Start Ray and one actor per replica (main thread: ray.init installs signal handlers)."""
        import ray

        started = time.perf_counter()
        ray.init(
            address="local",  # a Ray instance of this pod's own, never one found on the machine
            num_cpus=os.cpu_count() or 1,
            num_gpus=self._gpus,
            include_dashboard=False,
            log_to_driver=True,
            logging_level=logging.WARNING,
            object_store_memory=RAY_OBJECT_STORE_MIB * 2**20,
            _node_ip_address="127.0.0.1",
        )
        startup_s = time.perf_counter() - started
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if 0 < gpus < self.replicas:
            raise RuntimeError(f"the pod has {gpus} GPUs; {self.replicas} replicas x 1 device need more")
        per_actor = 1 if gpus else 0  # a CPU pod: replicas share the cores
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = self.config.threads or max(1, cores // self.replicas)  # the pod's cores, shared
        config = self.config.model_copy(update={"threads": threads}).model_dump(mode="json")
        actor = ray.remote(ReplicaWorker)
        self._actors = [
            actor.options(
                name=f"clora-replica-{i}",
                num_cpus=0,
                num_gpus=per_actor,
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=16,
            ).remote(config, i, self._log_level)
            for i in range(self.replicas)
        ]
        log.info(
            "Ray started in %.1f s; %d replicas, %d GPU(s) and %d CPU thread(s) each",
            startup_s,
            self.replicas,
            per_actor,
            threads,
        )
        threading.Thread(target=self._supervise, name="clora-replicas", daemon=True).start()

    def stop(self, timeout: float | None = None) -> bool:
        """No new ticks on any replica (each finishes the one it runs)."""
        self._stopping = True
        self._stop.set()
        self._each("stop_ticking", timeout=timeout or POLL_TIMEOUT_S)
        return True

    def checkpoint_all(self) -> None:
        """SIGTERM: every replica checkpoints its experiments, all replicas at once."""
        results = self._each("checkpoint_all", timeout=CALL_TIMEOUT_S)
        failed = [i for i, r in results.items() if isinstance(r, Exception)]
        if failed:
            raise RuntimeError(f"checkpointing failed on replicas {failed}")

    def close(self) -> None:
        import ray

        self._each("close", timeout=POLL_TIMEOUT_S)
        ray.shutdown()

    # ---- EngineAPI -----------------------------------------------------------------------------

    def upsert(
        self,
        namespace: str,
        name: str,
        spec: LoRAExperimentSpec,
        resume_from: str | None = None,
        verifier_token: str | None = None,
        dataset_text: str | None = None,
    ) -> ExperimentState:
        key = f"{namespace}/{name}"
        with self._lock:
            placed = self._placed.get(key)
            known = placed.replica if placed is not None else self._reserved.get(key, (None, 0))[0]
        if known is not None:  # an update (or a PUT racing the admission of the same new key)
            state = self._value(
                known, "upsert", namespace, name, spec, resume_from, verifier_token, dataset_text
            )
            with self._lock:
                if key in self._placed:
                    self._placed[key].spec = spec
                    if verifier_token is not None:
                        self._placed[key].verifier_token = verifier_token
                    if dataset_text is not None:
                        self._placed[key].dataset_text = dataset_text
                else:  # this PUT added it: the racing one failed or has not answered yet
                    self._placed[key] = _Placed(spec, resume_from, known, verifier_token, dataset_text)
            return self._seen(state)
        replica = self._choose(key, spec)
        try:
            state = self._value(
                replica, "upsert", namespace, name, spec, resume_from, verifier_token, dataset_text
            )
        finally:
            with self._lock:
                self._reserved.pop(key, None)
        with self._lock:
            self._placed[key] = _Placed(spec, resume_from, replica, verifier_token, dataset_text)
            self._removed_here.pop(key, None)
        return self._seen(state)

    def remove(self, namespace: str, name: str) -> DeleteExperimentResponse:
        key = f"{namespace}/{name}"
        with self._lock:
            placed = self._placed.get(key)
            replica = placed.replica if placed is not None else self._last_replica.get(key)
            gone = self._removed_here.get(key)
            if placed is not None and not self._available(placed.replica):
                placed.removing = True  # finished when the replica is back (see _recover)
                last = self._last_state.get(key)
                return DeleteExperimentResponse(
                    namespace=namespace,
                    name=name,
                    removed=False,
                    checkpoint=last.last_checkpoint if last else None,
                )
        if gone is not None:
            return DeleteExperimentResponse(namespace=namespace, name=name, checkpoint=gone.checkpoint)
        if replica is None:
            raise ExperimentNotFound(f"experiment {key} not found")
        answer: DeleteExperimentResponse = self._value(replica, "remove", namespace, name)
        if answer.removed:
            self._forget(key, replica)
        return answer

    def push_samples(self, namespace: str, name: str, samples: list[Sample]) -> int:
        queued: int = self._value(self._replica_of(namespace, name), "push_samples", namespace, name, samples)
        return queued

    def state(self, namespace: str, name: str) -> ExperimentState:
        key = f"{namespace}/{name}"
        replica = self._replica_of(namespace, name)
        if not self._available(replica):
            return self._stale(key)
        try:
            return self._seen(self._value(replica, "state", namespace, name))
        except ReplicaUnavailable:
            return self._stale(key)

    def rollouts(self, namespace: str, name: str, step: int | None = None) -> RolloutList:
        listed: RolloutList = self._value(
            self._replica_of(namespace, name), "rollouts", namespace, name, step
        )
        return listed

    def states(self) -> list[ExperimentState]:
        return self._listing()[0]

    def removed(self) -> list[RemovedExperiment]:
        return self._listing()[1]

    def exposition(self) -> bytes:
        """/metrics: every replica's series; per-replica ones with a `replica` label."""
        families = self._each("collect", timeout=POLL_TIMEOUT_S)
        per_replica = [f if isinstance(f := families.get(i), list) else [] for i in range(self.replicas)]
        registry = CollectorRegistry()
        registry.register(_Families(label_replicas(per_replica)))  # type: ignore[arg-type]
        return generate_latest(registry)

    # ---- placement -----------------------------------------------------------------------------

    def _choose(self, key: str, spec: LoRAExperimentSpec) -> int:
        """The replica a new experiment goes to (clora.placement), reserved until its PUT answers."""
        up = [i for i in range(self.replicas) if self._available(i)]
        if not up:
            raise ReplicaUnavailable("no replica of this runtime is running")
        occupancy = self._each("occupancy", timeout=POLL_TIMEOUT_S, replicas=up)
        tokens = spec.tokens_per_tick()
        with self._lock:
            rooms = []
            for i in up:
                held = occupancy.get(i)
                if not isinstance(held, list):
                    continue
                room = Occupancy(self._capacity)
                for _, used in held:
                    room.add(used)
                listed = {k for k, _ in held}
                for k, (r, used) in self._reserved.items():
                    if r == i and k not in listed:
                        room.add(used)
                rooms.append((i, room))
            if not rooms:
                raise ReplicaUnavailable("no replica of this runtime answers")
            pick = choose_replica([r for _, r in rooms], spec.lora.rank, tokens)
            if pick is None and not spec.suspend and spec.lora.rank <= self.config.max_rank:
                total = self.replicas * self.config.max_adapters
                raise ExperimentConflict(
                    f"{key}: all {total} adapter slots of this runtime ({self.replicas} replicas x"
                    f" {self.config.max_adapters}) are taken"
                )
            # A suspended experiment takes no slot; a rank above maxRank is refused by the engine.
            chosen = rooms[pick][0] if pick is not None else min(rooms, key=lambda r: (r[1].load(), r[0]))[0]
            self._reserved[key] = (chosen, tokens)
        return chosen

    # ---- calls ---------------------------------------------------------------------------------

    def _available(self, replica: int) -> bool:
        return self._down[replica] is None

    def _replica_of(self, namespace: str, name: str) -> int:
        key = f"{namespace}/{name}"
        with self._lock:
            placed = self._placed.get(key)
        if placed is None:
            raise ExperimentNotFound(f"experiment {key} not found")
        return placed.replica

    def _call(self, replica: int, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """One call on one replica; a replica that cannot answer is marked down (503)."""
        import ray

        if not self._available(replica) and method not in ("status", "resume", "newest_checkpoint"):
            raise ReplicaUnavailable(f"replica {replica} is restarting: {self._down[replica]}")
        try:
            return ray.get(getattr(self._actors[replica], method).remote(*args), timeout=timeout)
        except ray.exceptions.RayTaskError:
            raise  # a bug inside the worker: a 500, not a lost replica
        except ray.exceptions.RayError as e:
            self._lose(replica, f"{type(e).__name__}")
            raise ReplicaUnavailable(f"replica {replica} does not answer ({type(e).__name__})") from e

    def _value(self, replica: int, method: str, *args: Any) -> Any:
        """A call that answers an Answer: its value, or its refusal raised as the app expects."""
        answer: Answer = self._call(replica, method, *args)
        if answer.outcome == "ok":
            return answer.value
        if answer.outcome == "conflict":
            raise ExperimentConflict(answer.message)
        if answer.outcome == "not_found":
            raise ExperimentNotFound(answer.message)
        if answer.os_error is not None:
            raise OSError(*answer.os_error)
        raise ValueError(answer.message)

    def _each(self, method: str, *, timeout: float, replicas: Iterable[int] | None = None) -> dict[int, Any]:
        """The same call on several replicas at once; a replica that fails gives its exception."""
        import ray

        chosen = [
            i for i in (replicas if replicas is not None else range(self.replicas)) if self._available(i)
        ]
        refs = {i: getattr(self._actors[i], method).remote() for i in chosen if i < len(self._actors)}
        deadline = time.monotonic() + timeout
        out: dict[int, Any] = {}
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.RayError as e:
                if not isinstance(e, ray.exceptions.RayTaskError):
                    self._lose(i, type(e).__name__)
                log.warning("replica %d: %s failed: %s", i, method, type(e).__name__)
                out[i] = e
        return out

    def _listing(self) -> tuple[list[ExperimentState], list[RemovedExperiment]]:
        answers = self._each("listing", timeout=POLL_TIMEOUT_S)
        experiments: list[ExperimentState] = []
        removed: list[RemovedExperiment] = []
        for replica, answer in sorted(answers.items()):
            if not isinstance(answer, tuple):
                continue
            experiments += [self._seen(s) for s in answer[0]]
            removed += answer[1]
            for gone in answer[1]:  # removed at a tick's end after DELETE answered 202
                key = f"{gone.namespace}/{gone.name}"
                with self._lock:
                    placed = self._placed.get(key)
                if placed is not None and placed.replica == replica:
                    self._forget(key, replica)
        with self._lock:
            stale = [
                k for k, p in self._placed.items() if not self._available(p.replica) and k in self._last_state
            ]
            removed += list(self._removed_here.values())
        return experiments + [self._stale(k) for k in stale], removed

    def _seen(self, state: ExperimentState) -> ExperimentState:
        with self._lock:
            self._last_state[f"{state.namespace}/{state.name}"] = state
        return state

    def _stale(self, key: str) -> ExperimentState:
        """An experiment whose replica is restarting: as last seen, and said so."""
        with self._lock:
            last = self._last_state.get(key)
            placed = self._placed.get(key)
        if last is None or placed is None:
            raise ReplicaUnavailable(f"experiment {key}: its replica is restarting")
        note = f"replica {placed.replica} is restarting; resumes from its newest checkpoint"
        return last.model_copy(update={"message": note})

    def _forget(self, key: str, replica: int) -> None:
        with self._lock:
            self._placed.pop(key, None)
            self._last_state.pop(key, None)
            self._last_replica[key] = replica
            while len(self._last_replica) > REMEMBERED:
                self._last_replica.popitem(last=False)

    # ---- supervision ---------------------------------------------------------------------------

    def _lose(self, replica: int, why: str) -> None:
        with self._lock:
            if self._down[replica] is None:
                log.warning("replica %d lost: %s", replica, why)
                self._lost_at[replica] = time.monotonic()
            self._down[replica] = why

    def _supervise(self) -> None:
        """Polls every replica; a new incarnation (a restart by Ray) or a first start is recovered."""
        import ray

        while not self._stop.wait(self._poll_interval_s):
            refs = [a.status.remote() for a in self._actors]
            for i, ref in enumerate(refs):
                try:
                    status: ReplicaStatus = ray.get(ref, timeout=POLL_TIMEOUT_S)
                except ray.exceptions.RayError as e:
                    self._lose(i, f"{type(e).__name__}; Ray restarts it")
                    continue
                self._observe(i, status)

    def _observe(self, replica: int, status: ReplicaStatus) -> None:
        with self._lock:
            before = self._status[replica]
            self._status[replica] = status
            restarted = before is not None and before.incarnation != status.incarnation
            if restarted and self._lost_at[replica] is None:
                self._lost_at[replica] = time.monotonic()  # died and came back between two polls
            if restarted or before is None:
                self._down[replica] = "loading its base model"
                log.info("replica %d of %d running in pid %d", replica, self.replicas, status.pid)
            waiting = self._down[replica] is not None
        if waiting and status.state == LoopState.RUNNING:
            self._recover(replica)

    def _recover(self, replica: int) -> None:
        """Put back every experiment the replica held (none at the first start), then mark it up."""
        with self._lock:
            held = {k: p for k, p in self._placed.items() if p.replica == replica}
            first = not self._ever_loaded[replica]
        for key, placed in sorted(held.items()):
            namespace, name = key.split("/", 1)
            last = self._last_state.get(key)
            run_id = _run_of(last, placed)
            if placed.removing or (last is not None and last.phase == "Failed"):
                # Deleted meanwhile, or failed (a terminal phase stays terminal): not trained again.
                ref = None
                if run_id is not None:
                    ref = self._call(
                        replica, "newest_checkpoint", namespace, name, run_id, timeout=POLL_TIMEOUT_S
                    )
                with self._lock:
                    self._removed_here[key] = RemovedExperiment(
                        namespace=namespace, name=name, checkpoint=ref
                    )
                    while len(self._removed_here) > REMEMBERED:
                        self._removed_here.popitem(last=False)
                self._forget(key, replica)
                continue
            try:
                answer: Answer = self._call(
                    replica,
                    "resume",
                    namespace,
                    name,
                    placed.spec,
                    placed.resume_from,
                    placed.verifier_token,
                    placed.dataset_text,
                    run_id,
                )
            except ReplicaUnavailable:
                return  # lost again; the next poll starts over
            if answer.outcome != "ok":
                log.error("replica %d: %s could not be resumed: %s", replica, key, answer.message)
        with self._lock:
            lost_at, self._lost_at[replica] = self._lost_at[replica], None
            self._down[replica] = None
            self._ever_loaded[replica] = True
        if not first and lost_at is not None:
            seconds = time.monotonic() - lost_at
            log.info(
                "replica %d: %d experiment(s) resumed %.1f s after it was lost", replica, len(held), seconds
            )


def _run_of(last: ExperimentState | None, placed: _Placed) -> str | None:
    """The run an experiment trained in before its replica was lost, from the newest checkpoint the
    set saw (its last answer, else the resumeFrom it came with); None when it had none."""
    path = last.last_checkpoint.path if last is not None and last.last_checkpoint is not None else None
    path = path or placed.resume_from
    if not path:
        return None
    from clora_runtime.checkpoint import run_of  # torch: only where the engine runs

    return run_of(Path(path))
