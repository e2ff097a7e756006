"""The warm multi-LoRA engine: one frozen base model, many experiments (adapters) trained together.

Threads: HTTP routes call upsert / remove / push_samples / states from any thread; one loop thread
calls tick(). Routes only record the desired state under `_lock`; tick() applies it at the start of a
tick (under `_tick_lock`), so the model and the adapter bank are only ever touched by the tick thread,
or by remove() / checkpoint_all() after they have waited for the running tick to end.

One tick: every active experiment contributes promptsPerStep x groupSize rows to one sampling batch
(phase sample), completions are scored (reward), one micro-batched forward/backward over the rows of
every adapter and one optimizer step per adapter (train), then samplers are synced, states updated
and checkpoints written (sync). A task, reward or loss failure fails that experiment alone.

An experiment added while a tick runs does not wait for it: at the tick's next join point (any
decoder layer's forward or backward, any chunk of the trainer's LM head) it is admitted and takes its
first step on its own (see `_join_point`); from the next tick on it is packed with the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch

from clora.api import CheckpointRef, LoRAExperimentSpec, Reward
from clora.api.runtime_api import ExperimentState, Sample
from clora.metrics import RuntimeMetrics
from clora_runtime import checkpoint
from clora_runtime.config import EngineConfig
from clora_runtime.lora.bank import AdapterBank, AdapterShape
from clora_runtime.sampling import sampler_class
from clora_runtime.sampling.base import Sampler, SampleRequest
from clora_runtime.tasks import Problem, RewardFn, Task, build_task, chat_prompt, get_reward
from clora_runtime.training.grpo import group_advantages, sequence_weights
from clora_runtime.training.trainer import AdapterHyper, Trainer, TrainRow

log = logging.getLogger(__name__)

REWARD_WINDOW = 10


class ExperimentConflict(Exception):
    """The request cannot be applied as asked (slots full, rank above maxRank, immutable field changed)."""


class ExperimentNotFound(KeyError):
    """No experiment of that namespace/name on this runtime."""

    def __str__(self) -> str:  # KeyError quotes its argument; this is a message
        return str(self.args[0]) if self.args else "experiment not found"


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from its parts, stable across processes (unlike hash())."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class TickReport:
    """What one tick did."""

    tick: int
    stepped: list[str]  # keys of experiments that took an optimizer step
    failed: dict[str, str]  # key -> message, experiments that failed in this tick
    rewards: dict[str, float]  # key -> mean reward of this step
    tokens_sampled: int
    tokens_trained: int
    seconds: dict[str, float]  # phase -> seconds (sample, reward, train, sync)
    completions: dict[str, list[list[int]]] = field(default_factory=dict)  # key -> completion token ids
    logprobs: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> token log-probs (if recorded)
    joined: list[str] = field(default_factory=list)  # keys that took their step alone, at a join point

    @property
    def duration(self) -> float:
        return sum(self.seconds.values())


@dataclass
class Experiment:
    """The engine's record of one experiment."""

    namespace: str
    name: str
    spec: LoRAExperimentSpec
    phase: str = "Pending"
    message: str = ""
    step: int = 0
    rewards: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # tick duration of each of its steps
    last_checkpoint: CheckpointRef | None = None
    started_at: datetime | None = None
    resume_from: str | None = None
    in_bank: bool = False
    queue: list[Sample] = field(default_factory=list)
    queue_consumed: int = 0
    task: Task | None = None
    task_spec_json: str = ""
    reward_fn: RewardFn | None = None
    last_tick: int = -1

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def holds_slot(self) -> bool:
        # Suspended experiments give their slot back; finished ones keep it until removed, so their
        # adapter can still be read and exported.
        return self.phase != "Suspended" and not (self.phase == "Pending" and self.spec.suspend)

    @property
    def wants_admission(self) -> bool:
        """Recorded, meant to run, but not in the bank yet (new, or resumed after a suspend)."""
        return not self.in_bank and self.phase != "Failed" and not self.spec.suspend

    def reward_summary(self) -> Reward:
        if not self.rewards:
            return Reward()
        window = self.rewards[-REWARD_WINDOW:]
        return Reward(mean=self.rewards[-1], best=max(self.rewards), window=sum(window) / len(window))

    def to_state(self) -> ExperimentState:
        return ExperimentState(
            namespace=self.namespace,
            name=self.name,
            phase=self.phase,  # type: ignore[arg-type]
            step=self.step,
            total_steps=self.spec.training.steps,
            reward=self.reward_summary(),
            last_checkpoint=self.last_checkpoint,
            started_at=self.started_at,
            message=self.message,
        )


Planned = tuple[Experiment, list[Problem], list[list[int]]]
"""An experiment that steps, its problems for this step and their prompts' token ids."""


class Engine:
    def __init__(self, config: EngineConfig, metrics: RuntimeMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.ready = False
        self.base = None  # LoadedModel once loaded
        self.bank: AdapterBank | None = None
        self.sampler: Sampler | None = None
        self.trainer: Trainer | None = None
        self._experiments: dict[str, Experiment] = {}
        self._lock = threading.RLock()  # guards _experiments and their desired state
        self._tick_lock = threading.RLock()  # held for a whole tick; remove() waits on it
        self._ticks = 0
        self._joiners = threading.Event()  # set when an experiment that needs admitting is recorded
        self._running: TickReport | None = None  # the tick in progress, which newcomers may join
        self._held: list[Experiment] = []  # admitted at the tick's start, to step at its first join point
        self._budget_left = 0  # sampling tokens the running tick leaves for newcomers

    # ---- lifecycle ----------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the base model (slow), wrap its linear layers with adapter slots, start the sampler."""
        from clora_runtime.models.loading import load_model

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        base = load_model(self.config.model, self.config.device, self.config.dtype)
        bank = AdapterBank(
            base.model, self.config.max_adapters, self.config.max_rank, base_model_name=base.name
        )
        self.base = base
        self.bank = bank
        self.trainer = Trainer(bank, self.config.micro_batch_tokens)
        self.sampler = sampler_class(self.config.sampler)(base, bank, self.config)  # type: ignore[call-arg]
        self.ready = True
        self._update_slot_metrics()

    @property
    def free_slots(self) -> int:
        with self._lock:
            used = sum(1 for e in self._experiments.values() if e.holds_slot)
        return self.config.max_adapters - used

    # ---- thread-safe desired state ------------------------------------------------------------------

    def upsert(
        self, namespace: str, name: str, spec: LoRAExperimentSpec, resume_from: str | None = None
    ) -> ExperimentState:
        """Add an experiment or update its mutable fields; applied at the next tick."""
        key = f"{namespace}/{name}"
        with self._lock:
            current = self._experiments.get(key)
            if current is not None:
                if current.spec == spec:
                    return current.to_state()
                if current.spec.lora != spec.lora:
                    raise ExperimentConflict(
                        f"{key}: spec.lora is immutable (delete and re-create to change it)"
                    )
                if current.spec.runtime != spec.runtime:
                    raise ExperimentConflict(f"{key}: spec.runtime is immutable")
                if current.spec.task != spec.task:
                    build_task(spec.task, spec.training.seed)  # validate now; rebuilt at the next tick
                    get_reward(spec.task.reward)
                resumes = current.phase == "Suspended" and not spec.suspend
                if resumes and self.free_slots <= 0:
                    raise ExperimentConflict(f"{key}: no free adapter slot to resume into")
                current.spec = spec
                if resumes:
                    self._joiners.set()
                return current.to_state()
            self._validate_new(key, spec)
            if resume_from is not None:
                # Refused now (HTTP 422) rather than failing the experiment at its first tick.
                resume_from = str(checkpoint.resolve_resume(resume_from))
            if not spec.suspend and self.free_slots <= 0:
                raise ExperimentConflict(
                    f"{key}: all {self.config.max_adapters} adapter slots of this runtime are taken"
                )
            exp = Experiment(namespace=namespace, name=name, spec=spec, resume_from=resume_from)
            exp.queue, exp.queue_consumed = self._read_queue(exp)
            if spec.suspend:
                exp.phase = "Suspended"
                exp.message = "suspended before it started"
            self._experiments[key] = exp
            if not spec.suspend:
                self._joiners.set()
            self._update_slot_metrics()
            return exp.to_state()

    def _validate_new(self, key: str, spec: LoRAExperimentSpec) -> None:
        if spec.lora.rank > self.config.max_rank:
            raise ExperimentConflict(
                f"{key}: spec.lora.rank {spec.lora.rank} is above this runtime's maxRank"
                f" {self.config.max_rank}"
            )
        if self.bank is not None:
            self.bank.resolve_targets(spec.lora.target_modules)
        build_task(spec.task, spec.training.seed)
        get_reward(spec.task.reward)

    def remove(self, namespace: str, name: str) -> CheckpointRef | None:
        """Wait for the running tick, checkpoint the adapter, free its slot."""
        key = f"{namespace}/{name}"
        with self._tick_lock:
            with self._lock:
                exp = self._experiments.get(key)
                if exp is None:
                    raise ExperimentNotFound(f"experiment {key} not found")
            ref = exp.last_checkpoint
            if exp.in_bank and exp.phase != "Failed" and exp.step > 0:
                ref = self._checkpoint(exp)
            if exp.in_bank:
                self._evict(exp)
            with self._lock:
                del self._experiments[key]
            if self.metrics is not None:
                self.metrics.forget_experiment(namespace, name)
            self._update_slot_metrics()
            return ref

    def push_samples(self, namespace: str, name: str, samples: list[Sample]) -> int:
        """Append prompts to the experiment's queue (and its file); returns how many wait."""
        key = f"{namespace}/{name}"
        with self._lock:
            exp = self._experiments.get(key)
            if exp is None:
                raise ExperimentNotFound(f"experiment {key} not found")
            path = self._queue_path(exp)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                for sample in samples:
                    f.write(json.dumps(sample.wire()) + "\n")
                f.flush()
            exp.queue.extend(samples)
            return len(exp.queue) - exp.queue_consumed

    def states(self) -> list[ExperimentState]:
        with self._lock:
            return [e.to_state() for e in self._experiments.values()]

    def state(self, namespace: str, name: str) -> ExperimentState:
        key = f"{namespace}/{name}"
        with self._lock:
            exp = self._experiments.get(key)
            if exp is None:
                raise ExperimentNotFound(f"experiment {key} not found")
            return exp.to_state()

    def experiment_history(self, namespace: str, name: str) -> tuple[list[float], list[float]]:
        """(mean reward per step, tick seconds per step) of one experiment, for summaries and plots."""
        with self._lock:
            exp = self._experiments.get(f"{namespace}/{name}")
            if exp is None:
                raise ExperimentNotFound(f"experiment {namespace}/{name} not found")
            return list(exp.rewards), list(exp.step_seconds)

    def checkpoint_all(self) -> None:
        """Checkpoint every adapter that has stepped (SIGTERM, Ctrl-C)."""
        with self._tick_lock:
            for exp in list(self._experiments.values()):
                if exp.in_bank and exp.phase != "Failed" and exp.step > 0:
                    try:
                        self._checkpoint(exp)
                    except Exception as err:  # one bad disk write must not stop the others
                        log.exception("checkpoint of %s failed", exp.key)
                        exp.message = f"checkpoint failed: {err}"

    # ---- the tick -----------------------------------------------------------------------------------

    def tick(self) -> TickReport | None:
        """One tick: sample, reward, train, sync. None when no experiment had anything to do."""
        if not self.ready:
            raise RuntimeError("Engine.load() has not run")
        with self._tick_lock:
            self._joiners.clear()  # everything recorded so far is applied now
            with self._lock:
                everyone = list(self._experiments.values())
            failed: dict[str, str] = {}
            admitted = self._apply(everyone, failed)
            runnable = [e for e in everyone if e.phase == "Running" and e.in_bank]
            newcomers = [e for e in runnable if e in admitted]
            veterans = [e for e in runnable if e not in admitted]
            budget = self.config.tokens_per_tick
            batch, self._budget_left = self._collect_problems(veterans, budget, failed, True)
            if batch:
                # Newcomers beside experiments already training take their first step on their own at
                # the first join point, rather than after the whole packed tick.
                self._held = newcomers
                self._joiners.set()
            else:
                batch, self._budget_left = self._collect_problems(newcomers, budget, failed, True)
            if not batch:
                return None
            self._ticks += 1
            report = TickReport(self._ticks, [], failed, {}, 0, 0, {})
            self._running = report
            try:
                with self._join_points():
                    self._step(batch, report)
            finally:
                self._running = None
                self._held = []
            if self.metrics is not None:
                for phase, seconds in report.seconds.items():
                    self.metrics.tick_duration.labels(phase).observe(seconds)
                self.metrics.tokens_sampled.inc(report.tokens_sampled)
                self.metrics.tokens_trained.inc(report.tokens_trained)
            return report

    def _step(self, batch: list[Planned], report: TickReport) -> None:
        """One step of every experiment in `batch`: sample, reward, train, sync, each phase timed."""
        t0 = time.perf_counter()
        completions = self._sample(batch, report)
        t1 = time.perf_counter()
        scored = self._score(batch, completions, report)
        t2 = time.perf_counter()
        stepped = self._train(scored, report)
        t3 = time.perf_counter()
        report.seconds = {"sample": t1 - t0, "reward": t2 - t1, "train": t3 - t2}
        self._sync(stepped, scored, report, t3 - t0)
        report.seconds["sync"] = time.perf_counter() - t3

    @contextmanager
    def _join_points(self) -> Iterator[None]:
        """Make every decoder layer a join point for the duration of a tick: before its forward (so
        between decode steps and micro-batches too) and, in training, after its backward; and every
        chunk of the trainer's LM head.

        A layer is the finest step that can pause without cost: the running batch keeps its KV cache
        and autograd graph while a newcomer's step runs its own (autograd allows a backward inside a
        backward hook). Without a list of decoder layers (an unusual model) a newcomer waits for the
        tick's end. vLLM samples outside these layers: there the newcomer joins when training begins.
        """
        assert self.base is not None
        layers = getattr(self.base.model.get_decoder(), "layers", None) or []

        def on_backward(_grad: torch.Tensor) -> None:
            self._join_point()

        def before_layer(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self._join_point()
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
                hidden.register_hook(on_backward)

        handles = [layer.register_forward_pre_hook(before_layer, with_kwargs=True) for layer in layers]
        assert self.trainer is not None
        self.trainer.pause = self._join_point
        try:
            yield
        finally:
            self.trainer.pause = None
            for handle in handles:
                handle.remove()

    def _join_point(self) -> None:
        """Where a running tick lets experiments added since it began take their first step.

        Without it a newcomer waits for the tick to end (seconds to minutes with many experiments on
        a slow device) before it even starts. Here newcomers are admitted and, when their sampling
        tokens fit in what this tick left of tokensPerTick, take one step of their own at once. That
        step touches only the newcomers' adapters (the bank restores the running batch's plan after
        it), so the tick's other experiments compute exactly what they would have; they finish later
        by the newcomers' step time. From the next tick on the newcomers are packed with the others.
        Memory: the newcomers' sampling fits the tick's budget, and their training adds at most one
        micro-batch of activations to the one the running batch may hold.
        """
        running = self._running
        if running is None or not self._joiners.is_set():
            return
        self._joiners.clear()
        with self._lock:
            joining = [e for e in self._experiments.values() if e.wants_admission]
        candidates = self._held + self._apply(joining, running.failed)
        self._held = []
        runnable = [e for e in candidates if e.phase == "Running" and e.in_bank]
        side = TickReport(running.tick, [], running.failed, {}, 0, 0, {})
        batch, self._budget_left = self._collect_problems(runnable, self._budget_left, side.failed, False)
        if not batch:
            return
        self._running = None  # no join point inside the newcomers' own step
        try:
            # grad mode is off in the sampler's decode loop and inside a backward
            with torch.enable_grad():
                self._step(batch, side)
        finally:
            self._running = running
        running.stepped.extend(side.stepped)
        running.joined.extend(side.stepped)
        running.rewards.update(side.rewards)
        running.completions.update(side.completions)
        running.logprobs.update(side.logprobs)
        running.tokens_sampled += side.tokens_sampled
        running.tokens_trained += side.tokens_trained

    def _apply(self, experiments: list[Experiment], failed: dict[str, str]) -> list[Experiment]:
        """Bring the bank in line with these experiments' recorded specs (adds, suspends, resumes,
        changed fields); returns the ones admitted into the bank now."""
        admitted: list[Experiment] = []
        for exp in experiments:
            was_in_bank = exp.in_bank
            try:
                self._apply_one(exp)
            except Exception as err:
                log.exception("applying %s failed", exp.key)
                self._fail(exp, f"could not start: {err}")
                failed[exp.key] = exp.message
            if exp.in_bank and not was_in_bank:
                admitted.append(exp)
        self._update_slot_metrics()
        return admitted

    def _apply_one(self, exp: Experiment) -> None:
        spec = exp.spec
        if exp.phase == "Failed":
            return
        if spec.suspend:
            if exp.in_bank:
                if exp.step > 0:
                    self._checkpoint(exp)
                self._evict(exp)
            if exp.phase != "Suspended":
                exp.phase, exp.message = "Suspended", "suspended; checkpointed and out of its slot"
            return
        if not exp.in_bank:
            resume = exp.resume_from
            if exp.phase == "Suspended" and exp.last_checkpoint is not None:
                resume = exp.last_checkpoint.path
            self._admit(exp, resume)
        task_json = spec.task.model_dump_json()
        if exp.task is None or exp.task_spec_json != task_json:
            exp.task = build_task(spec.task, spec.training.seed)
            exp.reward_fn = get_reward(spec.task.reward)
            exp.task_spec_json = task_json
        total = spec.training.steps
        if total is not None and exp.step >= total:
            if exp.phase != "Succeeded":
                exp.phase, exp.message = "Succeeded", f"trained {exp.step} steps"
                self._checkpoint(exp)
        elif exp.phase in ("Pending", "Suspended", "Succeeded"):
            exp.phase, exp.message = "Running", ""

    def _admit(self, exp: Experiment, resume: str | None) -> None:
        assert self.bank is not None and self.sampler is not None
        lora = exp.spec.lora
        shape = AdapterShape(lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        self.bank.add(
            exp.key, shape, derive_seed("lora", exp.spec.training.seed), exp.spec.training.learning_rate
        )
        exp.in_bank = True
        if resume:
            state = checkpoint.load(self.bank, exp.key, Path(resume))
            exp.step, exp.rewards, exp.queue_consumed = state.step, state.rewards, state.queue_consumed
            exp.last_checkpoint = CheckpointRef(step=state.step, path=str(resume), time=None)
        self.sampler.add_adapter(exp.key)
        if exp.started_at is None:
            exp.started_at = datetime.now(UTC)

    def _evict(self, exp: Experiment) -> None:
        assert self.bank is not None and self.sampler is not None
        self.sampler.remove_adapter(exp.key)
        self.bank.remove(exp.key)
        exp.in_bank = False

    def _collect_problems(
        self, runnable: list[Experiment], budget: int, failed: dict[str, str], at_least_one: bool
    ) -> tuple[list[Planned], int]:
        """Prompts of the experiments that step, least recently stepped first, within `budget` sampling
        tokens (the first always steps when at_least_one); returns them and the budget left."""
        runnable = sorted(runnable, key=lambda e: (e.last_tick, e.key))
        chosen: list[Planned] = []
        for exp in runnable:
            cost = exp.spec.tokens_per_tick()
            if cost > budget and (chosen or not at_least_one):
                continue
            try:
                problems = self._problems_for(exp)
                if not problems:
                    continue  # a continual experiment with an empty queue waits
                prompts = [
                    chat_prompt(self.base.tokenizer, p.prompt, exp.spec.task.system_prompt) for p in problems
                ]
            except Exception as err:
                log.exception("task of %s failed", exp.key)
                self._fail(exp, f"task {exp.spec.task.name} failed: {type(err).__name__}: {err}")
                failed[exp.key] = exp.message
                continue
            budget -= cost
            chosen.append((exp, problems, prompts))
        return chosen, max(budget, 0)

    def _problems_for(self, exp: Experiment) -> list[Problem]:
        """Pushed samples first (in order); a finite experiment fills the rest from its task."""
        n = exp.spec.training.prompts_per_step
        with self._lock:
            pending = exp.queue[exp.queue_consumed : exp.queue_consumed + n]
        problems = [Problem(prompt=s.prompt, answer=s.answer) for s in pending]
        if len(problems) < n and exp.spec.training.steps is not None:
            assert exp.task is not None
            problems.extend(exp.task.problems(exp.step, n)[: n - len(problems)])
        return problems

    def _sample(self, batch: list[Planned], report: TickReport):
        assert self.sampler is not None
        requests: list[SampleRequest] = []
        for exp, _problems, prompts in batch:
            t = exp.spec.training
            for p, prompt in enumerate(prompts):
                for g in range(t.group_size):
                    requests.append(
                        SampleRequest(
                            adapter_key=exp.key,
                            prompt_ids=prompt,
                            max_new_tokens=t.max_new_tokens,
                            temperature=t.temperature,
                            seed=derive_seed("sample", t.seed, exp.step, p, g),
                        )
                    )
        completions = self.sampler.generate(requests)
        report.tokens_sampled = sum(len(c.token_ids) for c in completions)
        return completions

    def _score(self, batch, completions, report: TickReport):
        """Per experiment: (rows of (prompt ids, completion ids), rewards [prompts, group])."""
        scored = []
        offset = 0
        tokenizer = self.base.tokenizer
        for exp, problems, prompts in batch:
            g = exp.spec.training.group_size
            mine = completions[offset : offset + len(problems) * g]
            offset += len(problems) * g
            rows = [(prompts[j // g], c.token_ids) for j, c in enumerate(mine)]
            try:
                assert exp.reward_fn is not None
                flat = [
                    float(
                        exp.reward_fn(
                            tokenizer.decode(c.token_ids, skip_special_tokens=True), problems[j // g].answer
                        )
                    )
                    for j, c in enumerate(mine)
                ]
            except Exception as err:
                log.exception("reward of %s failed", exp.key)
                self._fail(exp, f"reward {exp.spec.task.reward} failed: {type(err).__name__}: {err}")
                report.failed[exp.key] = exp.message
                continue
            rewards = [flat[p * g : (p + 1) * g] for p in range(len(problems))]
            scored.append((exp, rows, rewards, len(problems)))
        return scored

    def _train(self, scored, report: TickReport) -> list[Experiment]:
        assert self.trainer is not None
        rows: list[TrainRow] = []
        hyper: dict[str, AdapterHyper] = {}
        for exp, exp_rows, rewards, _n in scored:
            t = exp.spec.training
            adv = group_advantages(
                torch.tensor(rewards, dtype=torch.float32), scale_by_std=t.loss_type == "grpo"
            )
            flat_adv = adv.flatten().tolist()
            weights = sequence_weights(t.loss_type, [len(c) for _, c in exp_rows], t.max_new_tokens)
            for (prompt, completion), a, w in zip(exp_rows, flat_adv, weights, strict=True):
                if completion:
                    rows.append(TrainRow(exp.key, prompt, completion, a, w))
            hyper[exp.key] = AdapterHyper(
                clip_epsilon=t.clip_epsilon,
                kl_coef=t.kl_coef,
                learning_rate=t.learning_rate,
                dropout_seed=derive_seed("dropout", t.seed, exp.step),
            )
        result = self.trainer.step(rows, hyper) if rows else None
        for exp, exp_rows, _rewards, _n in scored:
            report.completions[exp.key] = [list(c) for _p, c in exp_rows]
            res = result.adapters.get(exp.key) if result else None
            if res is not None and res.logprobs:
                report.logprobs[exp.key] = torch.cat(res.logprobs)
        stepped: list[Experiment] = []
        for exp, _rows, _rewards, _n in scored:
            res = result.adapters.get(exp.key) if result else None
            if res is not None and res.error is not None:
                self._fail(exp, res.error)
                report.failed[exp.key] = res.error
                continue
            stepped.append(exp)
        report.tokens_trained = result.tokens if result else 0
        return stepped

    def _sync(self, stepped: list[Experiment], scored, report: TickReport, seconds: float) -> None:
        assert self.sampler is not None
        self.sampler.sync_adapters([e.key for e in stepped])
        rewards_of = {exp.key: rewards for exp, _rows, rewards, _n in scored}
        for exp in stepped:
            flat = [r for group in rewards_of[exp.key] for r in group]
            mean = sum(flat) / len(flat) if flat else float("nan")
            with self._lock:
                exp.step += 1
                exp.rewards.append(mean)
                exp.step_seconds.append(seconds)
                exp.last_tick = report.tick
                used = min(exp.spec.training.prompts_per_step, len(exp.queue) - exp.queue_consumed)
                exp.queue_consumed += used
            if used:
                self._write_consumed(exp)
            report.stepped.append(exp.key)
            report.rewards[exp.key] = mean
            if self.metrics is not None:
                self.metrics.experiment_step.labels(exp.namespace, exp.name).set(exp.step)
                if math.isfinite(mean):
                    self.metrics.experiment_reward.labels(exp.namespace, exp.name).set(mean)
            total = exp.spec.training.steps
            try:
                if total is not None and exp.step >= total:
                    exp.phase, exp.message = "Succeeded", f"trained {exp.step} steps"
                    self._checkpoint(exp)
                elif exp.step % exp.spec.checkpoint.every_steps == 0:
                    self._checkpoint(exp)
            except Exception as err:
                log.exception("checkpoint of %s failed", exp.key)
                exp.message = f"checkpoint failed: {type(err).__name__}: {err}"

    # ---- helpers ------------------------------------------------------------------------------------

    def _fail(self, exp: Experiment, message: str) -> None:
        with self._lock:
            exp.phase = "Failed"
            exp.message = message
        log.warning("experiment %s failed: %s", exp.key, message)

    def _checkpoint(self, exp: Experiment) -> CheckpointRef:
        assert self.bank is not None
        started = time.perf_counter()
        state = checkpoint.TrainingState(
            step=exp.step,
            rewards=list(exp.rewards),
            queue_consumed=exp.queue_consumed,
            extra={"spec": exp.spec.wire()},
        )
        directory = checkpoint.experiment_dir(self.config.checkpoint_dir, exp.namespace, exp.name)
        path, when = checkpoint.save(self.bank, exp.key, directory, state, exp.spec.checkpoint.keep)
        ref = CheckpointRef(step=exp.step, path=str(path), time=when)
        with self._lock:
            exp.last_checkpoint = ref
        if self.metrics is not None:
            self.metrics.checkpoint_duration.observe(time.perf_counter() - started)
        return ref

    def _queue_path(self, exp: Experiment) -> Path:
        return (
            checkpoint.experiment_dir(self.config.checkpoint_dir, exp.namespace, exp.name) / "samples.jsonl"
        )

    def _read_queue(self, exp: Experiment) -> tuple[list[Sample], int]:
        """The persisted queue of a re-added experiment and how much of it was already trained on."""
        path = self._queue_path(exp)
        if not path.is_file():
            return [], 0
        samples = [Sample.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]
        consumed_file = path.with_name("samples.consumed")
        consumed = int(consumed_file.read_text()) if consumed_file.is_file() else 0
        return samples, min(consumed, len(samples))

    def _write_consumed(self, exp: Experiment) -> None:
        path = self._queue_path(exp).with_name("samples.consumed")
        staging = path.with_name(".samples.consumed.tmp")
        staging.write_text(str(exp.queue_consumed))
        staging.replace(path)  # atomic: a crash leaves the old count or the new one

    def _update_slot_metrics(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            active = sum(1 for e in self._experiments.values() if e.in_bank)
        self.metrics.active_adapters.set(active)
        self.metrics.free_slots.set(self.free_slots)
