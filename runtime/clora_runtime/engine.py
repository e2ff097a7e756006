"""The warm multi-LoRA engine: one frozen base model, many experiments (adapters) trained together.

Threads. HTTP routes call upsert / remove / push_samples / states from any thread; one loop thread
calls tick(). `_lock` guards the experiment records and is only ever held for bookkeeping (and for
an admission's slot allocation): never across a tick's computation, so no route waits for a tick.

- Admission (PUT) happens in the route's thread: a free slot of the bank gets the new adapter (and
  its checkpoint, when resuming) at once. No running computation reads that slot: a tick only reads
  the slots of the experiments in its snapshot.
- Removal (DELETE) of an experiment the running tick does not hold happens in the route's thread too.
  One the running tick holds is marked Removing and finished by the tick thread at the tick's end
  (final checkpoint, slot freed); DELETE answers 202 meanwhile and the checkpoint is kept in a
  bounded list of removed experiments (GET /v1/experiments `removed`, and a later DELETE).
- The sampler's own adapter copies (vLLM) are only touched on the tick thread, between ticks.

One tick works on a snapshot taken at its start (StepPlan: the applied spec, the slot, the problems):
a PUT that changes the spec meanwhile is applied from the next step on. Every active experiment
contributes rows (promptsPerStep x groupSize a step) to one sampling batch (phase sample), completions
are scored (reward), one micro-batched forward/backward over the rows of every adapter and
updatesPerBatch optimizer updates per adapter (train), then samplers are synced, states updated and
checkpoints written (sync). New experiments are packed into the next tick; nothing runs inside another
batch's computation.

Budget and fairness. A row costs its prompt tokens (chat template, system prompt), what it generated
in earlier ticks and the tokens it may generate now against tokensPerTick; no row grows by more than
maxTickNewTokens in a tick (a tick's decode steps, hence its time, are bounded), and while several
experiments have work none takes more than maxTickShare of the budget. A step whose rows do not all
get done in a tick goes on in the next ones (StepPlan keeps what each row has): the experiment trains
only when all are done, so every part is sampled with the step's weights; the parts are seeded by row
and part, so the split never changes what is sampled but maxTickNewTokens does. A prompt longer than
the runtime takes (maxPromptTokens, the model's context, the training micro-batch) or whose chat prompt
cannot be built is skipped for its experiment with a message; a pushed one is consumed, so it is not
tried again after a restart.

Failures stay with their experiment: a task, reward, sampling or training error (an out-of-memory
included) that one experiment's rows cause fails that experiment alone and the tick goes on. An error
the base model itself raises (the probe after every experiment failed alone) escapes the tick.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch

from clora.api import CheckpointRef, LoRAExperimentSpec, Reward
from clora.api.experiment_types import PublishedRef
from clora.api.runtime_api import (
    DeleteExperimentResponse,
    ExperimentState,
    RemovedExperiment,
    Rollout,
    RolloutList,
    Sample,
    StepStats,
    spec_digest,
)
from clora.metrics import RuntimeMetrics
from clora_runtime import checkpoint, sample_queue
from clora_runtime.config import EngineConfig
from clora_runtime.device_defaults import DeviceSizes
from clora_runtime.lora.bank import AdapterBank, AdapterShape
from clora_runtime.publishing import Publisher
from clora_runtime.sampling import sampler_class
from clora_runtime.sampling.base import Completion, Sampler, SampleRequest
from clora_runtime.tasks import (
    DatasetSource,
    Problem,
    RewardFn,
    Task,
    build_task,
    chat_prompt,
    get_reward,
    read_records,
    verifier,
)
from clora_runtime.tasks.verifier import VerifierError
from clora_runtime.training.grpo import frac_zero_std, group_advantages, sequence_weights
from clora_runtime.training.trainer import (
    AdapterHyper,
    StepResult,
    TokenCounts,
    Trainer,
    TrainRow,
    free_memory,
)

log = logging.getLogger(__name__)

REWARD_WINDOW = 10
REMOVED_KEPT = 256  # removed experiments whose final checkpoint the engine still answers


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
    stepped: list[str]  # keys of experiments that took a step
    failed: dict[str, str]  # key -> message, experiments that failed in this tick
    rewards: dict[str, float]  # key -> mean reward of this step
    tokens_sampled: int
    tokens_trained: int
    seconds: dict[str, float]  # phase -> seconds (sample, reward, train, sync)
    tokens_prefilled: int = 0  # prompt tokens the sampler ran through the model (shared ones once)
    train_counts: TokenCounts = field(default_factory=TokenCounts)  # what training ran, for FLOPs
    completions: dict[str, list[list[int]]] = field(default_factory=dict)  # key -> completion token ids
    rollouts: dict[str, list[Rollout]] = field(default_factory=dict)  # key -> this step's rollouts
    # key -> tokens of tokensPerTick the experiment took in this tick (prompts, earlier parts, new tokens)
    tick_tokens: dict[str, int] = field(default_factory=dict)
    sampling: list[str] = field(default_factory=list)  # keys whose step goes on in a later tick
    decode_steps: int = 0  # the most tokens any row generated in this tick (its decode steps)

    @property
    def duration(self) -> float:
        return sum(self.seconds.values())


@dataclass
class Experiment:
    """The engine's record of one experiment. `spec` is the desired spec (the last PUT); a tick
    works on the copy its StepPlan took."""

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
    resume_from: str | None = None  # where a suspended-before-start experiment will resume from
    verifier_token: str | None = field(default=None, repr=False)  # task http's bearer token
    in_bank: bool = False
    announced: bool = False  # the sampler was told of the adapter (tick thread)
    busy: bool = False  # in the running tick's snapshot
    removing: bool = False  # DELETE arrived; finished at the end of the tick that holds it
    finishing: bool = False  # one thread has claimed the removal
    queue: list[Sample] = field(default_factory=list)  # pushed samples from queue_base on
    queue_consumed: int = 0  # samples trained on (or skipped), counted from the first ever pushed
    queue_base: int = 0  # samples trained on that left memory (the queue file may keep them)
    queue_file_base: int = 0  # samples compacted out of the queue file (sample_queue.py)
    skipped: int = 0  # prompts skipped as too long or unreadable (pushed samples, dataset records)
    pending: StepPlan | None = None  # a step whose sampling goes on in the next tick (tick thread)
    run_id: str = ""  # the run its checkpoints and queue belong to (checkpoint.py)
    records: list[Problem] | None = field(default=None, repr=False)  # its dataset, read at PUT
    task: Task | None = None
    task_spec_json: str = ""
    reward_fn: RewardFn | None = None
    last_tick: int = -1
    stats: StepStats = field(default_factory=StepStats)
    rollouts: deque[tuple[int, list[Rollout]]] = field(default_factory=deque)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def holds_slot(self) -> bool:
        # Suspended experiments give their slot back; finished ones keep it until removed, so their
        # adapter can still be read and exported.
        return self.phase != "Suspended" and not (self.phase == "Pending" and self.spec.suspend)

    def reward_summary(self) -> Reward:
        if not self.rewards:
            return Reward()
        window = self.rewards[-REWARD_WINDOW:]
        return Reward(mean=self.rewards[-1], best=max(self.rewards), window=sum(window) / len(window))

    def to_state(
        self, replica: int, published: tuple[PublishedRef | None, str] = (None, "")
    ) -> ExperimentState:
        return ExperimentState(
            namespace=self.namespace,
            name=self.name,
            phase="Removing" if self.removing else self.phase,  # type: ignore[arg-type]
            step=self.step,
            total_steps=self.spec.training.steps,
            reward=self.reward_summary(),
            last_checkpoint=self.last_checkpoint,
            started_at=self.started_at,
            message=self.message,
            stats=self.stats,
            spec_digest=spec_digest(self.spec),
            replica=replica,
            published=published[0],
            publish_error=published[1],
        )


@dataclass
class StepPlan:
    """One experiment's step as the tick planned it at its start: the tick reads nothing else of the
    experiment's record, so a PUT meanwhile cannot change what this step computes."""

    exp: Experiment
    spec: LoRAExperimentSpec  # the applied spec
    step: int
    slot: int
    reward_fn: RewardFn
    problems: list[Problem]
    prompts: list[list[int]]  # token ids of each problem's prompt
    queue_taken: int  # pushed samples the problems came from (consumed when the step completes)
    verifier_token: str | None = field(default=None, repr=False)
    # Row r is member r % groupSize of prompt r // groupSize. A step whose rows do not all get done in
    # one tick (maxTickNewTokens, maxTickShare, tokensPerTick) goes on in the next ones: each row keeps
    # what it generated so far and grows by parts; the experiment does not train meanwhile, so every
    # part is sampled with the weights the step started with.
    generated: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float] | None] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)  # stopped at EOS
    parts: list[int] = field(default_factory=list)  # parts sampled per row
    rows: list[int] = field(default_factory=list)  # the rows sampled in the running tick
    tick_tokens: int = 0  # what the running tick's rows count against tokensPerTick

    def __post_init__(self) -> None:
        n = len(self.prompts) * self.spec.training.group_size
        if not self.generated:
            self.generated = [[] for _ in range(n)]
            self.logprobs = [[] for _ in range(n)]
            self.done, self.finished, self.parts = [False] * n, [False] * n, [0] * n

    @property
    def key(self) -> str:
        return self.exp.key

    @property
    def complete(self) -> bool:
        return all(self.done)

    def open_rows(self) -> list[int]:
        """Rows not done yet, those with the fewest parts first (a group's rows move together)."""
        return sorted((r for r, d in enumerate(self.done) if not d), key=lambda r: (self.parts[r], r))

    def part_tokens(self, row: int, max_tick_new: int) -> int:
        return min(max_tick_new, self.spec.training.max_new_tokens - len(self.generated[row]))

    def row_cost(self, row: int, max_tick_new: int) -> int:
        """What the row's next part counts against tokensPerTick: its prompt and what it has so far
        (prefilled) and the tokens it may generate."""
        prompt = self.prompts[row // self.spec.training.group_size]
        return len(prompt) + len(self.generated[row]) + self.part_tokens(row, max_tick_new)

    def requests(self, max_tick_new: int) -> list[SampleRequest]:
        """The next part of each row of `rows`: seeded by the row and the part alone, so a row's
        tokens depend neither on its neighbours nor on how its parts fell into ticks."""
        t = self.spec.training
        out = []
        for row in self.rows:
            p, g, part = row // t.group_size, row % t.group_size, self.parts[row]
            seed = derive_seed("sample", t.seed, self.step, p, g, *([part] if part else []))
            out.append(
                SampleRequest(
                    adapter_key=self.key,
                    prompt_ids=self.prompts[p] + self.generated[row],
                    max_new_tokens=self.part_tokens(row, max_tick_new),
                    temperature=t.temperature,
                    seed=seed,
                )
            )
        return out

    def advance(self, completions: list[Completion], max_tick_new: int) -> None:
        """Append each sampled row's part. A row is done at EOS, at maxNewTokens, or when the sampler
        gave fewer tokens than asked (it cut the row at the model's context)."""
        for row, c in zip(self.rows, completions, strict=True):
            asked = self.part_tokens(row, max_tick_new)
            self.generated[row].extend(c.token_ids)
            kept = self.logprobs[row]
            both = kept is not None and c.logprobs is not None
            self.logprobs[row] = [*kept, *c.logprobs] if both else None  # type: ignore[misc]
            self.parts[row] += 1
            self.finished[row] = c.finished
            self.done[row] = (
                c.finished
                or len(c.token_ids) < asked
                or len(self.generated[row]) >= self.spec.training.max_new_tokens
            )

    def completions(self) -> list[Completion]:
        return [
            Completion(token_ids=t, finished=f, logprobs=lp)
            for t, f, lp in zip(self.generated, self.finished, self.logprobs, strict=True)
        ]


@dataclass
class Scored:
    """A plan's completions with their texts, rewards [prompts][group] and advantages (flat, in
    completion order, scaled per the plan's loss type)."""

    plan: StepPlan
    completions: list[Completion]
    texts: list[str]
    rewards: list[list[float]]
    advantages: list[float]


class Engine:
    def __init__(
        self, config: EngineConfig, metrics: RuntimeMetrics | None = None, *, replica: int = 0
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.replica = replica  # which of its pod's replicas this engine is (GET answers say)
        self.ready = False
        self.base = None  # LoadedModel once loaded
        self.bank: AdapterBank | None = None
        self.sampler: Sampler | None = None
        self.sizes = DeviceSizes.cpu()  # resolved for the device by load()
        self.trainer: Trainer | None = None
        self._experiments: dict[str, Experiment] = {}
        self._removed: OrderedDict[str, RemovedExperiment] = OrderedDict()
        self._retired: list[str] = []  # adapters removed from the bank, still known to the sampler
        self._lock = threading.RLock()  # guards the records above; never held across a tick's work
        self._tick_lock = threading.Lock()  # one tick (or a shutdown checkpoint) at a time
        self._http = httpx.Client()  # task http's verifier calls, with keep-alive between steps
        self.publisher = Publisher(self._http)  # spec.publish, on a thread of its own
        self._ticks = 0
        # Tests: called with (phase, adapter keys) before each sampling call and training micro-batch;
        # raising there stands for a fault of those adapters' rows (e.g. torch.OutOfMemoryError).
        self.fault_hook: Callable[[str, list[str]], None] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------

    def load(self) -> None:
        """Load the base model (slow), wrap its linear layers with adapter slots, start the sampler."""
        from clora_runtime.models.loading import load_model

        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        base = load_model(
            self.config.model, self.config.device, self.config.dtype, self.config.attn_implementation
        )
        self.sizes = sizes = DeviceSizes.resolve(self.config, base)
        bank = AdapterBank(
            base.model,
            self.config.max_adapters,
            self.config.max_rank,
            base_model_name=base.name,
            fused_adamw=sizes.fused_adamw,
        )
        self.base = base
        self.bank = bank
        self.trainer = Trainer(bank, sizes.micro_batch_tokens, head_chunk_elements=sizes.head_chunk_elements)
        self.trainer.fault_hook = lambda keys: self._fault("train", keys)
        self.sampler = sampler_class(self.config.sampler)(base, bank, self.config, sizes)  # type: ignore[call-arg]
        self.ready = True
        self._update_slot_metrics()

    @property
    def free_slots(self) -> int:
        with self._lock:
            used = sum(1 for e in self._experiments.values() if e.holds_slot)
        return self.config.max_adapters - used

    # ---- thread-safe API ----------------------------------------------------------------------------

    def upsert(
        self,
        namespace: str,
        name: str,
        spec: LoRAExperimentSpec,
        resume_from: str | None = None,
        verifier_token: str | None = None,
        dataset_text: str | None = None,
    ) -> ExperimentState:
        """Add an experiment (admitted into a slot now) or update its mutable fields (applied from the
        next tick on). Never waits for a running tick. `verifier_token`: task http's bearer token;
        `dataset_text`: a ConfigMap dataset's records (the PUT's datasetText).

        A new experiment's dataset (and a changed task's) is read first, under no lock: a large file
        delays this PUT alone. `resume_from` must lie in the experiment's own checkpoint folder; a PUT
        without it starts a new run (checkpoint.py), one with it continues the checkpoint's run."""
        key = f"{namespace}/{name}"
        # A glance without the lock (a dict read), checked again under it: this PUT never waits
        # for the lock while it reads.
        current = self._experiments.get(key)
        task_before = current.spec.task if current is not None else None
        source = self._dataset_source(dataset_text)
        records = read_records(spec.task, source) if task_before != spec.task else None
        with self._lock:
            current = self._experiments.get(key)
            if (current.spec.task if current is not None else None) != task_before:
                raise ExperimentConflict(f"{key}: its task changed while this PUT was read; PUT again")
            if current is not None:
                if verifier_token is not None:  # a rotated Secret applies from the next step
                    current.verifier_token = verifier_token
                return self._update(current, spec, records)
            task = self._validate_new(key, spec, records)
            if len(self._experiments) >= self.config.experiments_cap:
                raise ExperimentConflict(
                    f"{key}: this runtime holds {len(self._experiments)} experiments, suspended ones"
                    f" included, its maxExperiments {self.config.experiments_cap}; delete one first"
                )
            own = checkpoint.experiment_dir(self.config.checkpoint_dir, namespace, name)
            run_id = checkpoint.new_run_id()
            if resume_from is not None:
                # Refused now (HTTP 422) rather than failing the experiment at its first tick.
                resume_from = str(checkpoint.resolve_resume(resume_from, own))
                run_id = checkpoint.read_run(Path(resume_from))  # "": from before run ids
            if not spec.suspend and self.free_slots <= 0:
                raise ExperimentConflict(
                    f"{key}: all {self.config.max_adapters} adapter slots of this runtime are taken"
                )
            exp = Experiment(
                namespace=namespace, name=name, spec=spec, verifier_token=verifier_token, run_id=run_id
            )
            self._set_task(exp, spec, records, task)
            stored = sample_queue.read(self._queue_path(exp), key)
            exp.queue, exp.queue_consumed = stored.samples, stored.consumed
            exp.queue_base = exp.queue_file_base = stored.base
            self._removed.pop(key, None)
            self._experiments[key] = exp
            if spec.suspend:
                exp.phase, exp.message = "Suspended", "suspended before it started"
                exp.resume_from = resume_from
                if resume_from is not None:
                    # Report the step it will resume at from now on, not 0 until it is resumed.
                    exp.step = checkpoint.read_step(Path(resume_from))
                    exp.last_checkpoint = CheckpointRef(step=exp.step, path=resume_from, time=None)
            else:
                self._admit(exp, resume_from)
            self._update_slot_metrics()
            return self._state(exp)

    def _update(
        self, exp: Experiment, spec: LoRAExperimentSpec, records: list[Problem] | None
    ) -> ExperimentState:
        """A PUT of an experiment the engine has (holds _lock). `records`: the new task's dataset,
        read by upsert when the task changed (None: the task did not change)."""
        key = exp.key
        if exp.spec == spec:
            return self._state(exp)
        if exp.removing:
            raise ExperimentConflict(f"{key}: being removed; PUT again once DELETE has answered 200")
        if exp.spec.lora != spec.lora:
            raise ExperimentConflict(f"{key}: spec.lora is immutable (delete and re-create to change it)")
        if exp.spec.runtime != spec.runtime:
            raise ExperimentConflict(f"{key}: spec.runtime is immutable")
        task = None
        if exp.spec.task != spec.task or exp.spec.training != spec.training:
            records = exp.records if exp.spec.task == spec.task else records
            task = self._validate_task(key, spec, records)
        resumes = exp.phase == "Suspended" and not spec.suspend
        if resumes and self.free_slots <= 0:
            raise ExperimentConflict(f"{key}: no free adapter slot to resume into")
        if task is not None:
            self._set_task(exp, spec, records, task)
        exp.spec = spec
        if resumes:
            self._admit(exp, exp.last_checkpoint.path if exp.last_checkpoint else exp.resume_from)
            self._update_slot_metrics()
        return self._state(exp)

    def _validate_new(self, key: str, spec: LoRAExperimentSpec, records: list[Problem] | None) -> Task:
        if spec.lora.rank > self.config.max_rank:
            raise ExperimentConflict(
                f"{key}: spec.lora.rank {spec.lora.rank} is above this runtime's maxRank"
                f" {self.config.max_rank}"
            )
        if self.bank is not None:
            self.bank.resolve_targets(spec.lora.target_modules)
        return self._validate_task(key, spec, records)

    def _validate_task(self, key: str, spec: LoRAExperimentSpec, records: list[Problem] | None) -> Task:
        """The task (on its dataset's records) and reward build; one row (the longest first-step prompt
        + maxNewTokens) fits the training micro-batch budget, so that the experiment cannot fail on it
        later. Returns the task."""
        task = build_task(spec.task, spec.training.seed, records)
        get_reward(spec.task.reward)
        if self.base is None:
            return task
        if spec.task.system_prompt:
            head = len(chat_prompt(self.base.tokenizer, "", spec.task.system_prompt))
            limit, bound = self._prompt_limit(spec)
            if head > limit:
                raise ValueError(
                    f"spec.task.systemPrompt: {head} tokens with the chat template (before any prompt),"
                    f" above {bound}"
                )
        try:
            problems = task.problems(0, spec.training.prompts_per_step) if spec.training.steps else []
        except Exception:  # the task fails at its first step, with its own message
            log.exception("%s: the task's first problems cannot be read", key)
            problems = []
        longest = max(
            (len(chat_prompt(self.base.tokenizer, p.prompt, spec.task.system_prompt)) for p in problems),
            default=0,
        )
        row = longest + spec.training.max_new_tokens
        if row > self.sizes.micro_batch_tokens:
            raise ExperimentConflict(
                f"{key}: one row (a prompt of {longest} tokens + spec.training.maxNewTokens"
                f" {spec.training.max_new_tokens}) is {row} tokens, above this runtime's micro-batch"
                f" budget of {self.sizes.micro_batch_tokens}"
            )
        return task

    @staticmethod
    def _task_key(spec: LoRAExperimentSpec) -> str:
        return spec.task.model_dump_json() + f"/{spec.training.seed}"

    def _set_task(
        self, exp: Experiment, spec: LoRAExperimentSpec, records: list[Problem] | None, task: Task
    ) -> None:
        """The experiment's dataset and the task built on it for `spec` (holds _lock): the tick uses
        them as they are and never reads the dataset again."""
        exp.records = records
        exp.task, exp.reward_fn, exp.task_spec_json = task, get_reward(spec.task.reward), self._task_key(spec)

    def _dataset_source(self, text: str | None) -> DatasetSource:
        c = self.config
        return DatasetSource(
            roots=c.roots(),
            checkpoint_dir=c.checkpoint_dir,
            max_bytes=c.max_dataset_bytes,
            max_record_chars=c.max_record_chars,
            text=text,
        )

    def remove(self, namespace: str, name: str) -> DeleteExperimentResponse:
        """Checkpoint the adapter and free its slot, now when no running tick holds it; else mark it
        Removing (answered at once, removed=False) for the tick thread to finish at the tick's end.
        Repeated calls for a removed experiment answer its final checkpoint again."""
        key = f"{namespace}/{name}"
        if key not in self._experiments and key not in self._removed:
            # Unknown: answered without _lock, which an admission may hold a while (a checkpoint
            # load); dict reads are atomic, and a PUT racing this DELETE is ordered after it.
            raise ExperimentNotFound(f"experiment {key} not found")
        with self._lock:
            exp = self._experiments.get(key)
            if exp is None:
                gone = self._removed.get(key)
                if gone is None:
                    raise ExperimentNotFound(f"experiment {key} not found")
                return DeleteExperimentResponse(namespace=namespace, name=name, checkpoint=gone.checkpoint)
            exp.removing = True
            if exp.busy or exp.finishing:
                return DeleteExperimentResponse(
                    namespace=namespace, name=name, removed=False, checkpoint=exp.last_checkpoint
                )
            exp.finishing = True
        gone = self._finish_removal(exp)
        return DeleteExperimentResponse(namespace=namespace, name=name, checkpoint=gone.checkpoint)

    def push_samples(self, namespace: str, name: str, samples: list[Sample]) -> int:
        """Append prompts to the experiment's queue (and its file); returns how many wait."""
        key = f"{namespace}/{name}"
        with self._lock:
            exp = self._get(key)
            waiting = len(exp.queue) - max(0, exp.queue_consumed - exp.queue_base)
            cap = self.config.max_queued_samples
            if waiting + len(samples) > cap:
                raise ValueError(
                    f"samples: {key} has {waiting} pushed samples waiting; {len(samples)} more would"
                    f" exceed this runtime's maxQueuedSamples {cap}"
                )
            sample_queue.append(self._queue_path(exp), samples)
            exp.queue.extend(samples)
            return waiting + len(samples)

    def occupancy(self) -> list[tuple[str, int]]:
        """(key, per-tick sampling tokens) of every experiment holding a slot: what a pod of several
        replicas weighs with clora.placement to place a new experiment."""
        with self._lock:
            return [(e.key, e.spec.tokens_per_tick()) for e in self._experiments.values() if e.holds_slot]

    def states(self) -> list[ExperimentState]:
        with self._lock:
            return [self._state(e) for e in self._experiments.values()]

    def removed(self) -> list[RemovedExperiment]:
        """Recently removed experiments with their final checkpoints, oldest first."""
        with self._lock:
            return list(self._removed.values())

    def state(self, namespace: str, name: str) -> ExperimentState:
        with self._lock:
            return self._state(self._get(f"{namespace}/{name}"))

    def rollouts(self, namespace: str, name: str, step: int | None = None) -> RolloutList:
        """The rollouts of one kept step (the newest when step is None) and the steps kept."""
        with self._lock:
            exp = self._get(f"{namespace}/{name}")
            kept = list(exp.rollouts)
        steps = [s for s, _ in kept]
        if step is None:
            chosen = kept[-1][1] if kept else []
        else:
            chosen = next((r for s, r in kept if s == step), None)
            if chosen is None:
                raise ExperimentNotFound(
                    f"experiment {namespace}/{name}: step {step} is not kept (kept: {steps or 'none yet'})"
                )
        return RolloutList(rollouts=chosen, steps=steps)

    def experiment_history(self, namespace: str, name: str) -> tuple[list[float], list[float]]:
        """(mean reward per step, tick seconds per step) of one experiment, for summaries and plots."""
        with self._lock:
            exp = self._get(f"{namespace}/{name}")
            return list(exp.rewards), list(exp.step_seconds)

    def checkpoint_all(self) -> None:
        """Checkpoint every adapter that has stepped (SIGTERM, Ctrl-C): after the running tick."""
        with self._tick_lock, self._holding() as everyone:
            for exp in everyone:
                if exp.in_bank and exp.phase != "Failed" and exp.step > 0:
                    try:
                        self._checkpoint(exp)
                    except Exception as err:  # one bad disk write must not stop the others
                        log.exception("checkpoint of %s failed", exp.key)
                        exp.message = f"checkpoint failed: {err}"

    def _get(self, key: str) -> Experiment:
        exp = self._experiments.get(key)
        if exp is None:
            raise ExperimentNotFound(f"experiment {key} not found")
        return exp

    # ---- the tick -----------------------------------------------------------------------------------

    def tick(self) -> TickReport | None:
        """One tick: sample, reward, train, sync. None when no experiment had anything to do."""
        if not self.ready:
            raise RuntimeError("Engine.load() has not run")
        with self._tick_lock:
            failed: dict[str, str] = {}
            self._between_ticks(failed)
            plans = self._plan(failed)
            if not plans:
                self._release(plans)
                return None
            self._ticks += 1
            report = TickReport(self._ticks, [], failed, {}, 0, 0, {})
            try:
                self._step(plans, report)
            finally:
                self._release(plans)
                self._between_ticks(report.failed)
            if self.metrics is not None:
                for phase, seconds in report.seconds.items():
                    self.metrics.tick_duration.labels(phase).observe(seconds)
                self.metrics.tokens_sampled.inc(report.tokens_sampled)
                self.metrics.tokens_trained.inc(report.tokens_trained)
            return report

    def _between_ticks(self, failed: dict[str, str]) -> None:
        """Tick-thread housekeeping while no tick computes: finish removals, apply suspends, tell the
        sampler of adapters that came and went, mark finished experiments Succeeded."""
        with self._lock:
            removals = [e for e in self._experiments.values() if e.removing and not e.finishing]
            for exp in removals:
                exp.finishing = True
        for exp in removals:
            self._finish_removal(exp)
        self._drain_retired()  # before _settle announces: a key removed and added again ends added
        with self._holding() as everyone:
            for exp in everyone:
                try:
                    self._settle(exp)
                except Exception as err:
                    log.exception("applying %s failed", exp.key)
                    self._fail(exp, f"could not apply its spec: {type(err).__name__}: {err}")
                    failed[exp.key] = exp.message
        self._drain_retired()

    @contextmanager
    def _holding(self) -> Iterator[list[Experiment]]:
        """Every experiment not being removed, marked busy for the block: a DELETE meanwhile answers
        202 and the removal waits for the next housekeeping, so two threads never write one adapter's
        checkpoint or free its slot at once."""
        with self._lock:
            held = [e for e in self._experiments.values() if not e.removing and not e.busy]
            for exp in held:
                exp.busy = True
        try:
            yield held
        finally:
            with self._lock:
                for exp in held:
                    exp.busy = False

    def _drain_retired(self) -> None:
        """The sampler forgets adapters that left the bank (tick thread only: vLLM is not thread-safe)."""
        assert self.sampler is not None
        with self._lock:
            retired, self._retired = self._retired, []
        for key in retired:
            self.sampler.remove_adapter(key)

    def _settle(self, exp: Experiment) -> None:
        assert self.sampler is not None
        spec = exp.spec
        if exp.phase == "Failed" or not exp.in_bank:
            return
        if spec.suspend:
            if exp.step > 0:
                self._checkpoint(exp)
            self._evict(exp)
            with self._lock:
                exp.phase, exp.message = "Suspended", "suspended; checkpointed and out of its slot"
                exp.pending = None  # its step starts over on resume, from the checkpointed weights
            self._update_slot_metrics()
            return
        if not exp.announced:
            self.sampler.add_adapter(exp.key)
            exp.announced = True
        total = spec.training.steps
        if total is not None and exp.step >= total:
            if exp.phase != "Succeeded":
                self._finish(exp)
        elif exp.phase in ("Pending", "Succeeded"):
            with self._lock:
                exp.phase, exp.message = "Running", ""

    def _plan(self, failed: dict[str, str]) -> list[StepPlan]:
        """The snapshot this tick works on: every experiment with work, least recently served first,
        and the rows of each that this tick samples (_allot)."""
        assert self.bank is not None and self.base is not None
        with self._lock:
            candidates = [
                (e, e.spec)
                for e in self._experiments.values()
                if e.phase == "Running"
                and e.in_bank
                and not e.removing
                and not e.spec.suspend
                # Done, though not settled yet: admitted (or given fewer steps) since _between_ticks.
                and (e.spec.training.steps is None or e.step < e.spec.training.steps)
            ]
            candidates.sort(key=lambda c: (c[0].last_tick, c[0].key))
        plans = [plan for exp, spec in candidates if (plan := self._plan_one(exp, spec, failed)) is not None]
        return self._allot(plans)

    def _plan_one(self, exp: Experiment, spec: LoRAExperimentSpec, failed: dict[str, str]) -> StepPlan | None:
        """The experiment's step in progress, else a new one (marked busy); None when it has nothing
        to do. Prompts too long for this runtime, or whose chat prompt cannot be built, are skipped
        with a message (pushed ones are consumed), so one bad prompt never stops a tick."""
        assert self.bank is not None and self.base is not None
        with self._lock:
            if exp.removing or not exp.in_bank:  # a DELETE came while this was being planned
                return None
            exp.busy = True
            slot = self.bank.adapters[exp.key].slot
            pending = exp.pending
            if pending is not None and pending.step == exp.step and pending.slot == slot:
                return pending
            exp.pending = None
            n = spec.training.prompts_per_step
            start = max(0, exp.queue_consumed - exp.queue_base)
            queued = exp.queue[start : start + n]
            first = exp.queue_base + start  # the queue index of queued[0], for messages
            step = exp.step
            token = exp.verifier_token
        try:
            reward_fn, task = self._task_of(exp, spec)
            limit, bound = self._prompt_limit(spec)
            skipped: list[str] = []
            problems: list[Problem] = []
            prompts: list[list[int]] = []

            def take(problem: Problem, origin: str) -> None:
                try:
                    ids = chat_prompt(self.base.tokenizer, problem.prompt, spec.task.system_prompt)  # type: ignore[union-attr]
                except Exception as err:
                    skipped.append(f"{origin}: its chat prompt cannot be built: {type(err).__name__}: {err}")
                    return
                if len(ids) > limit:
                    skipped.append(f"{origin}: a prompt of {len(ids)} tokens, above {bound}")
                    return
                problems.append(problem)
                prompts.append(ids)

            for i, sample in enumerate(queued):
                take(Problem(sample.prompt, sample.answer, sample.metadata), f"pushed sample {first + i}")
            if len(problems) < n and spec.training.steps is not None:
                for i, problem in enumerate(task.problems(step, n)[: n - len(problems)]):
                    take(problem, f"step {step}'s problem {i}")
        except Exception as err:
            log.exception("task of %s failed", exp.key)
            self._fail(exp, f"task {spec.task.name} failed: {type(err).__name__}: {err}")
            failed[exp.key] = exp.message
            self._release_one(exp)
            return None
        if skipped:
            self._skipped(exp, skipped)
        if not problems:
            if queued:  # every queued one was skipped: consumed now, the next ones go next tick
                with self._lock:
                    exp.queue_consumed += len(queued)
                self._consumed(exp)
            elif skipped:  # no prompt of this step can run: it would be skipped again and again
                self._fail(exp, f"no prompt of step {step} can run; {skipped[-1]}")
                failed[exp.key] = exp.message
            self._release_one(exp)  # a continual experiment with an empty queue waits
            return None
        return StepPlan(exp, spec, step, slot, reward_fn, problems, prompts, len(queued), token)

    def _allot(self, plans: list[StepPlan]) -> list[StepPlan]:
        """The rows each plan samples in this tick, in order, within tokensPerTick (row_cost: prompt
        tokens included); while several experiments have work none takes more than maxTickShare of
        it. The tick's first row always runs, so the tick makes progress whatever the sizes. Plans
        that get no row wait (busy released; a step in progress stays pending)."""
        budget = self.config.tokens_per_tick
        share = budget if len(plans) <= 1 else max(1, int(self.config.max_tick_share * budget))
        chunk = self.config.max_tick_new_tokens
        chosen: list[StepPlan] = []
        for plan in plans:
            plan.rows, plan.tick_tokens = [], 0
            for row in plan.open_rows():
                cost = plan.row_cost(row, chunk)
                if (chosen or plan.rows) and (plan.tick_tokens + cost > share or cost > budget):
                    break
                plan.rows.append(row)
                plan.tick_tokens += cost
                budget -= cost
            if plan.rows:
                chosen.append(plan)
            else:
                self._release_one(plan.exp)
        return chosen

    def _prompt_limit(self, spec: LoRAExperimentSpec) -> tuple[int, str]:
        """The longest prompt (in tokens, chat template included) an experiment of this spec may
        sample, and what sets it: maxPromptTokens, or the model's context or the training micro-batch
        less maxNewTokens."""
        new = spec.training.max_new_tokens
        most = self.config.max_prompt_tokens
        bounds = [(most, f"this runtime's maxPromptTokens {most}")]
        micro = self.sizes.micro_batch_tokens
        bounds.append((micro - new, f"the training micro-batch of {micro} tokens less maxNewTokens {new}"))
        assert self.base is not None
        context = getattr(self.sampler, "max_model_len", None) or getattr(
            self.base.model.config, "max_position_embeddings", None
        )
        if isinstance(context, int):
            bounds.append((context - new, f"the model's context of {context} tokens less maxNewTokens {new}"))
        return min(bounds, key=lambda b: b[0])

    def _skipped(self, exp: Experiment, reasons: list[str]) -> None:
        with self._lock:
            exp.skipped += len(reasons)
            exp.message = f"skipped {exp.skipped} prompt(s) so far; the last: {reasons[-1]}"
        log.warning("%s: skipped %d prompt(s): %s", exp.key, len(reasons), "; ".join(reasons))

    def _consumed(self, exp: Experiment) -> None:
        """Persist the consumed count and drop trained-on samples from memory (the file keeps them
        until a checkpoint counts them: _compact_queue)."""
        sample_queue.write_consumed(self._queue_path(exp), exp.queue_consumed)
        with self._lock:
            drop = exp.queue_consumed - exp.queue_base
            if drop > 0:
                del exp.queue[:drop]
                exp.queue_base += drop

    def _task_of(self, exp: Experiment, spec: LoRAExperimentSpec) -> tuple[RewardFn, Task]:
        """The experiment's task and reward for this spec, rebuilt only when the task changed."""
        task_json = self._task_key(spec)
        if exp.task is None or exp.reward_fn is None or exp.task_spec_json != task_json:
            exp.task = build_task(spec.task, spec.training.seed, exp.records)
            exp.reward_fn = get_reward(spec.task.reward)
            exp.task_spec_json = task_json
        return exp.reward_fn, exp.task

    def _release(self, plans: list[StepPlan]) -> None:
        with self._lock:
            for plan in plans:
                plan.exp.busy = False

    def _release_one(self, exp: Experiment) -> None:
        with self._lock:
            exp.busy = False

    def _step(self, plans: list[StepPlan], report: TickReport) -> None:
        """One step of every planned experiment: sample, reward, train, sync, each phase timed."""
        t0 = time.perf_counter()
        report.tick_tokens = {plan.key: plan.tick_tokens for plan in plans}
        self._sample(plans, report)
        sampled: list[tuple[StepPlan, list[Completion]]] = []
        for plan in plans:
            if plan.key in report.failed:
                continue
            if plan.complete:
                plan.exp.pending = None
                sampled.append((plan, plan.completions()))
            else:  # goes on in a later tick; served now, so its neighbours go first next time
                with self._lock:
                    plan.exp.pending = plan
                    plan.exp.last_tick = report.tick
                report.sampling.append(plan.key)
        t1 = time.perf_counter()
        scored = self._score(sampled, report)
        t2 = time.perf_counter()
        result, rows_of = self._train(scored, report)
        t3 = time.perf_counter()
        report.seconds = {"sample": t1 - t0, "reward": t2 - t1, "train": t3 - t2}
        self._sync(scored, result, rows_of, report, t3 - t0)
        report.seconds["sync"] = time.perf_counter() - t3

    def _sample(self, plans: list[StepPlan], report: TickReport) -> None:
        """One sampling batch of every plan's rows of this tick, each row's part appended to its plan;
        if it fails, plan by plan, so that only the experiment whose rows fail is failed."""
        chunk = self.config.max_tick_new_tokens
        requests = [plan.requests(chunk) for plan in plans]
        prefilled = self.sampler.prefill_tokens if self.sampler is not None else 0
        try:
            completions = self._generate([r for rs in requests for r in rs])
            out, at = [], 0
            for plan, rs in zip(plans, requests, strict=True):
                out.append((plan, completions[at : at + len(rs)]))
                at += len(rs)
        except Exception as packed_error:
            log.warning("packed sampling failed (%s); sampling experiment by experiment", packed_error)
            free_memory(self.base.device)
            out, errors = [], {}
            for plan, rs in zip(plans, requests, strict=True):
                try:
                    out.append((plan, self._generate(rs)))
                except Exception as err:
                    errors[plan.key] = f"sampling failed: {type(err).__name__}: {err}"
                    free_memory(self.base.device)
            if len(errors) == len(plans) and not self._base_model_works():
                raise packed_error from None
            for key, message in errors.items():
                self._fail(next(p.exp for p in plans if p.key == key), message)
                report.failed[key] = message
        for plan, cs in out:
            plan.advance(cs, chunk)
        report.tokens_sampled = sum(len(c.token_ids) for _, cs in out for c in cs)
        report.decode_steps = max((len(c.token_ids) for _, cs in out for c in cs), default=0)
        report.tokens_prefilled = (self.sampler.prefill_tokens if self.sampler is not None else 0) - prefilled

    def _generate(self, requests: list[SampleRequest]) -> list[Completion]:
        assert self.sampler is not None
        self._fault("sample", sorted({r.adapter_key for r in requests}))
        return self.sampler.generate(requests)

    def _score(self, sampled: list[tuple[StepPlan, list[Completion]]], report: TickReport) -> list[Scored]:
        """Rewards of every plan's completions. Verifier calls (task http) run concurrently, on
        threads of their own and under no lock, so a slow one delays the tick by at most its own
        deadline (timeoutSeconds x (retries + 1) plus backoff) and fails only its experiment."""
        tokenizer = self.base.tokenizer
        decoded = [
            (
                plan,
                completions,
                [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions],
            )
            for plan, completions in sampled
        ]
        remote = {i: d for i, d in enumerate(decoded) if d[0].spec.task.verifier is not None}
        answers: dict[int, Future[list[float]]] = {}
        if remote:
            with ThreadPoolExecutor(len(remote), thread_name_prefix="clora-verifier") as pool:
                answers = {
                    i: pool.submit(self._verify, plan, texts) for i, (plan, _, texts) in remote.items()
                }
        scored: list[Scored] = []
        for i, (plan, completions, texts) in enumerate(decoded):
            g = plan.spec.training.group_size
            try:
                if i in answers:
                    flat = answers[i].result()
                else:
                    flat = [
                        float(plan.reward_fn(text, plan.problems[j // g].answer))
                        for j, text in enumerate(texts)
                    ]
            except VerifierError as err:
                log.warning("reward of %s failed: %s", plan.key, err)
                self._fail(plan.exp, f"reward: {err}")
                report.failed[plan.key] = plan.exp.message
                continue
            except Exception as err:
                log.exception("reward of %s failed", plan.key)
                self._fail(plan.exp, f"reward {plan.spec.task.reward} failed: {type(err).__name__}: {err}")
                report.failed[plan.key] = plan.exp.message
                continue
            rewards = [flat[p * g : (p + 1) * g] for p in range(len(plan.problems))]
            adv = group_advantages(torch.tensor(rewards, dtype=torch.float32), plan.spec.training.loss_type)
            scored.append(Scored(plan, completions, texts, rewards, adv.flatten().tolist()))
        return scored

    def _verify(self, plan: StepPlan, texts: list[str]) -> list[float]:
        """The rewards the experiment's verifier gives this step's completions (task http)."""
        assert plan.spec.task.verifier is not None
        g = plan.spec.training.group_size
        items = []
        for j, text in enumerate(texts):
            problem = plan.problems[j // g]
            items.append(verifier.Item(problem.prompt, text, problem.answer, problem.metadata))
        experiment = {"namespace": plan.exp.namespace, "name": plan.exp.name, "step": plan.step}
        return verifier.score(
            plan.spec.task.verifier, plan.verifier_token, experiment, items, client=self._http
        )

    def _train(
        self, scored: list[Scored], report: TickReport
    ) -> tuple[StepResult | None, dict[str, list[int]]]:
        """One trainer step over every scored plan's rows. Returns the result and, per experiment, the
        index in the trainer's rows of each of its completions (-1: empty, not trained)."""
        assert self.trainer is not None
        rows: list[TrainRow] = []
        hyper: dict[str, AdapterHyper] = {}
        rows_of: dict[str, list[int]] = {}
        for item in scored:
            plan, t = item.plan, item.plan.spec.training
            lengths = [len(c.token_ids) for c in item.completions]
            weights = sequence_weights(t.loss_type, lengths, t.max_new_tokens)
            index: list[int] = []
            for j, (c, a, w) in enumerate(zip(item.completions, item.advantages, weights, strict=True)):
                if c.token_ids:
                    index.append(len(rows))
                    prompt = plan.prompts[j // t.group_size]
                    rows.append(TrainRow(plan.key, prompt, c.token_ids, a, w, t.temperature))
                else:
                    index.append(-1)
            rows_of[plan.key] = index
            hyper[plan.key] = AdapterHyper(
                slot=plan.slot,
                clip_low=t.clip_epsilon,
                clip_high=t.clip_high,
                kl_coef=t.kl_coef,
                learning_rate=t.learning_rate,
                dropout_seed=derive_seed("dropout", t.seed, plan.step),
                updates=t.updates_per_batch,
            )
        if not rows:
            return None, rows_of
        try:
            result = self.trainer.step(rows, hyper)
        except Exception as err:
            # Every experiment failed alone (see Trainer.step): the base model's fault unless it works.
            if not self._base_model_works():
                raise
            message = f"training failed: {type(err).__name__}: {err}"
            for item in scored:
                if item.plan.key in hyper:
                    self._fail(item.plan.exp, message)
                    report.failed[item.plan.key] = message
            return None, rows_of
        for item in scored:
            res = result.adapters.get(item.plan.key)
            if res is not None and res.error is not None:
                self._fail(item.plan.exp, res.error)
                report.failed[item.plan.key] = res.error
        report.tokens_trained = result.counts.head
        report.train_counts = result.counts
        return result, rows_of

    def _sync(
        self,
        scored: list[Scored],
        result: StepResult | None,
        rows_of: dict[str, list[int]],
        report: TickReport,
        seconds: float,
    ) -> None:
        assert self.sampler is not None
        stepped = [s for s in scored if s.plan.key not in report.failed]
        self.sampler.sync_adapters([s.plan.key for s in stepped])
        for item in stepped:
            plan, exp, t = item.plan, item.plan.exp, item.plan.spec.training
            flat = [r for group in item.rewards for r in group]
            mean = sum(flat) / len(flat) if flat else float("nan")
            rollouts = self._rollouts(item, result, rows_of[plan.key])
            stats = self._stats(item, result)
            with self._lock:
                exp.step = plan.step + 1
                exp.rewards.append(mean)
                exp.step_seconds.append(seconds)
                exp.last_tick = report.tick
                exp.queue_consumed += plan.queue_taken
                exp.stats = stats
                exp.rollouts.append((plan.step, rollouts))
                while len(exp.rollouts) > self.config.rollout_steps:
                    exp.rollouts.popleft()
            if plan.queue_taken:
                self._consumed(exp)
            report.stepped.append(plan.key)
            report.rewards[plan.key] = mean
            report.completions[plan.key] = [list(c.token_ids) for c in item.completions]
            report.rollouts[plan.key] = rollouts
            if self.metrics is not None:
                self.metrics.experiment_step.labels(exp.namespace, exp.name).set(exp.step)
                if math.isfinite(mean):
                    self.metrics.experiment_reward.labels(exp.namespace, exp.name).set(mean)
                self.metrics.set_experiment_stats(exp.namespace, exp.name, stats.model_dump(by_alias=True))
            total = t.steps
            try:
                if total is not None and exp.step >= total:
                    self._finish(exp)
                elif exp.step % plan.spec.checkpoint.every_steps == 0:
                    self._checkpoint(exp)
            except Exception as err:
                log.exception("checkpoint of %s failed", exp.key)
                exp.message = f"checkpoint failed: {type(err).__name__}: {err}"

    def _rollouts(self, item: Scored, result: StepResult | None, index: list[int]) -> list[Rollout]:
        plan = item.plan
        g = plan.spec.training.group_size
        trained = result.row_logprobs if result is not None else []
        out: list[Rollout] = []
        for j, (c, text) in enumerate(zip(item.completions, item.texts, strict=True)):
            trainer_lp = trained[index[j]] if index[j] >= 0 and index[j] < len(trained) else None
            out.append(
                Rollout(
                    namespace=plan.exp.namespace,
                    name=plan.exp.name,
                    step=plan.step,
                    prompt=plan.problems[j // g].prompt,
                    completion=text,
                    tokens=len(c.token_ids),
                    reward=item.rewards[j // g][j % g],
                    advantage=item.advantages[j],
                    sampler_logprob=sum(c.logprobs) if c.logprobs is not None else None,
                    trainer_logprob=trainer_lp if trainer_lp is None or math.isfinite(trainer_lp) else None,
                )
            )
        return out

    @staticmethod
    def _stats(item: Scored, result: StepResult | None) -> StepStats:
        t = item.plan.spec.training
        lengths = [len(c.token_ids) for c in item.completions]
        stats = StepStats(
            completion_length=sum(lengths) / len(lengths) if lengths else 0.0,
            frac_reward_zero_std=frac_zero_std(torch.tensor(item.rewards, dtype=torch.float32)),
        )
        res = result.adapters.get(item.plan.key) if result is not None else None
        if res is None or not res.losses:
            return stats
        stats.loss = res.loss
        stats.grad_norm = sum(res.grad_norms) / len(res.grad_norms)
        stats.clip_fraction = sum(res.clip_fractions) / len(res.clip_fractions)
        stats.entropy = res.entropy
        if t.kl_coef > 0 and res.kls:
            stats.kl = sum(res.kls) / len(res.kls)
        return stats

    # ---- helpers ------------------------------------------------------------------------------------

    def _admit(self, exp: Experiment, resume: str | None) -> None:
        """Give the experiment a slot now (holds _lock; the slot is free, so no computation reads it).
        A failure fails the experiment alone and frees what it took."""
        assert self.bank is not None
        lora = exp.spec.lora
        shape = AdapterShape(lora.rank, lora.alpha, lora.dropout, lora.target_modules)
        try:
            self.bank.add(
                exp.key, shape, derive_seed("lora", exp.spec.training.seed), exp.spec.training.learning_rate
            )
            exp.in_bank = True
            if resume:
                state = checkpoint.load(self.bank, exp.key, Path(resume))
                exp.step, exp.rewards = state.step, state.rewards
                exp.queue_consumed = max(state.queue_consumed, exp.queue_base)
                if state.queue_consumed < exp.queue_base:  # older than the checkpoint that compacted
                    log.warning(
                        "%s: its queue no longer holds samples %d to %d (a newer checkpoint counted"
                        " them); it goes on from sample %d",
                        exp.key,
                        state.queue_consumed,
                        exp.queue_base - 1,
                        exp.queue_base,
                    )
                exp.run_id = state.run_id  # a resume continues the checkpoint's run
                exp.last_checkpoint = CheckpointRef(step=state.step, path=str(resume), time=None)
        except Exception as err:
            log.exception("admitting %s failed", exp.key)
            if exp.in_bank:
                self._evict(exp)
            exp.phase, exp.message = "Failed", f"could not start: {type(err).__name__}: {err}"
            return
        exp.announced = False
        exp.phase, exp.message = "Running", ""
        if exp.started_at is None:
            exp.started_at = datetime.now(UTC)

    def _evict(self, exp: Experiment) -> None:
        """Free the adapter's slot; the sampler forgets it on the tick thread (_between_ticks)."""
        assert self.bank is not None
        with self._lock:
            if exp.in_bank:
                self.bank.remove(exp.key)
                exp.in_bank = False
                if exp.announced:
                    self._retired.append(exp.key)
                    exp.announced = False

    def _finish_removal(self, exp: Experiment) -> RemovedExperiment:
        """Final checkpoint, slot freed, record moved to the removed list (the caller claimed it)."""
        ref = exp.last_checkpoint
        if exp.in_bank and exp.phase != "Failed" and exp.step > 0:
            try:
                ref = self._checkpoint(exp)
            except Exception as err:
                log.exception("final checkpoint of %s failed", exp.key)
                exp.message = f"final checkpoint failed: {type(err).__name__}: {err}"
        self._evict(exp)
        gone = RemovedExperiment(namespace=exp.namespace, name=exp.name, checkpoint=ref)
        with self._lock:
            # In this order: remove() reads both without _lock and must find the key in one of them.
            self._removed[exp.key] = gone
            self._experiments.pop(exp.key, None)
            while len(self._removed) > REMOVED_KEPT:
                self._removed.popitem(last=False)
        if self.metrics is not None:
            self.metrics.forget_experiment(exp.namespace, exp.name)
        self._update_slot_metrics()
        return gone

    def _fault(self, phase: str, keys: list[str]) -> None:
        if self.fault_hook is not None:
            self.fault_hook(phase, keys)

    def _base_model_works(self) -> bool:
        """One token through the base model alone: tells a fault of the model from one of the rows."""
        assert self.base is not None and self.bank is not None
        try:
            with torch.no_grad(), self.bank.plan(None):
                token = torch.tensor([[int(self.base.tokenizer.pad_token_id or 0)]], device=self.base.device)
                self.base.model(input_ids=token)
            return True
        except Exception:
            log.exception("the base model itself fails")
            return False

    def _fail(self, exp: Experiment, message: str) -> None:
        with self._lock:
            exp.phase = "Failed"
            exp.message = message
            exp.pending = None
        log.warning("experiment %s failed: %s", exp.key, message)

    def _checkpoint(self, exp: Experiment) -> CheckpointRef:
        assert self.bank is not None
        started = time.perf_counter()
        with self._lock:
            state = checkpoint.TrainingState(
                step=exp.step,
                rewards=list(exp.rewards),
                queue_consumed=exp.queue_consumed,
                extra={"spec": exp.spec.wire()},
                run_id=exp.run_id,
            )
            keep = exp.spec.checkpoint.keep
        directory = checkpoint.experiment_dir(self.config.checkpoint_dir, exp.namespace, exp.name)
        path, when = checkpoint.save(self.bank, exp.key, directory, state, keep)
        ref = CheckpointRef(step=state.step, path=str(path), time=when)
        with self._lock:
            exp.last_checkpoint = ref
        self._compact_queue(exp, state.queue_consumed)
        if self.metrics is not None:
            self.metrics.checkpoint_duration.observe(time.perf_counter() - started)
        self.publisher.offer(exp.namespace, exp.name, exp.spec.publish, ref, final=False)
        return ref

    def _finish(self, exp: Experiment) -> None:
        """Its last step is done: the final checkpoint (once), published as final; Succeeded once that
        publish has settled (sent, or given up: training is over either way)."""
        if exp.last_checkpoint is None or exp.last_checkpoint.step < exp.step:
            self._checkpoint(exp)
        if exp.last_checkpoint is not None:
            self.publisher.offer(exp.namespace, exp.name, exp.spec.publish, exp.last_checkpoint, final=True)
        done = self.publisher.settled(exp.key)
        with self._lock:
            exp.phase = "Succeeded" if done else "Running"
            exp.message = f"trained {exp.step} steps" + ("" if done else "; publishing the final adapter")

    def _state(self, exp: Experiment) -> ExperimentState:
        return exp.to_state(self.replica, self.publisher.status(exp.key))

    def _queue_path(self, exp: Experiment) -> Path:
        """The experiment's run's queue of pushed samples: another run under the same name (a PUT
        without resumeFrom) has a queue of its own."""
        folder = checkpoint.experiment_dir(self.config.checkpoint_dir, exp.namespace, exp.name)
        return sample_queue.queue_path(folder, exp.run_id)

    def _compact_queue(self, exp: Experiment, counted: int) -> None:
        """Drop from the queue file the samples a checkpoint just counted as consumed, once there are
        queueCompactSamples of them: the file then holds what waits (sample_queue.py). The waiting
        samples are written outside the lock; those pushed meanwhile are added under it."""
        with self._lock:
            if counted - exp.queue_file_base < self.config.queue_compact_samples or counted < exp.queue_base:
                return  # too few to bother, or (never, by _consumed) no longer all in memory
            end = exp.queue_base + len(exp.queue)
            waiting = exp.queue[counted - exp.queue_base :]
        path = self._queue_path(exp)
        try:
            staging = sample_queue.start_compaction(path, counted, waiting)
            with self._lock:
                sample_queue.finish_compaction(staging, path, exp.queue[end - exp.queue_base :])
                exp.queue_file_base = counted
        except OSError as err:  # the old file stays whole; the next checkpoint tries again
            log.warning("%s: compacting %s failed: %s", exp.key, path.name, err)

    def _update_slot_metrics(self) -> None:
        if self.metrics is None:
            return
        with self._lock:
            active = sum(1 for e in self._experiments.values() if e.in_bank)
        self.metrics.active_adapters.set(active)
        self.metrics.free_slots.set(self.free_slots)
