"""One RL step for many adapters at once: micro-batched forward/backward over rows of all of them.

Rows of one adapter are contiguous inside every micro-batch (the multi-LoRA layers need segments).
Each adapter's loss is normalised by its own rows and tokens (weights computed over the whole step
before micro-batching, so the split does not change the loss), its gradients are clipped on their
own, and an adapter whose gradients are not finite is reported failed and not stepped.

A step is `updates` optimizer updates over the same sampled rows (PPO epochs, TRL's num_iterations):
the old log-probabilities of the clipped ratio are the sampling policy's, i.e. those of the first
update (same weights as at sampling), so the ratio is 1 on the first update and clipping acts from
the second on. Log-probabilities are taken at each row's sampling temperature (logits / T), as the
sampler drew the tokens.

Failures stay with their adapter: when a packed forward/backward raises (an out-of-memory, a bad
row), the update is redone adapter by adapter; an adapter that fails alone is reported failed and
left out, the others step. Only when every adapter fails alone is the error the base model's, and
it is raised.

The hot loop is written for a GPU, whatever it runs on. No per-token host work: each micro-batch is
laid out on the host from the rows' lengths, reaches the device in one non-blocking copy per dtype,
and per-token values are expanded from per-row ones there. No host sync in the loops over
micro-batches and adapters: per-adapter losses and statistics stay device tensors until _apply reads
them all in one transfer per update (where a non-finite loss or gradient norm fails its adapter
alone), and the rows' log-prob sums come back once per step. tests/test_trainer_syncs.py counts the
ops that would sync.

Sizes come from device_defaults.DeviceSizes (Engine.load). The LM head takes
head_chunk_elements // vocab rows of logits at a time and every chunk reads the whole head weight:
at Qwen3's 151936-token vocabulary the CPU's 2**22 elements are 27 rows, so a 4096-token micro-batch
would read the 0.78 GB bf16 weight of Qwen3-4B ~152 times; the GPU's 2**28 are 1766 rows, 3 reads for
4096 tokens and 19 for the largest (32768-token) micro-batch, for 1 GiB of float32 logits per chunk.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from clora_runtime.device_defaults import CPU_HEAD_CHUNK_ELEMENTS, head_chunk_rows
from clora_runtime.lora.bank import Adapter, AdapterBank
from clora_runtime.lora.layers import BatchPlan
from clora_runtime.training.grpo import token_losses

MAX_GRAD_NORM = 1.0
# Fewer prompt tokens saved than this do not pay for the extra decoder call of a shared-prefix stage.
MIN_PREFIX_SAVING = 16


@dataclass
class TrainRow:
    """One completion to learn from."""

    key: str  # adapter key
    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float
    token_weight: float  # from grpo.sequence_weights
    temperature: float = 1.0  # the sampling temperature: log-probs are taken from logits / temperature


@dataclass(frozen=True)
class AdapterHyper:
    """One adapter's settings for one step, fixed when the step was planned."""

    slot: int
    clip_low: float
    clip_high: float
    kl_coef: float
    learning_rate: float
    dropout_seed: int  # seeds this step's LoRA dropout masks (update u uses dropout_seed + u)
    updates: int = 1


@dataclass
class AdapterStepResult:
    losses: list[float] = field(default_factory=list)  # one per update done
    grad_norms: list[float] = field(default_factory=list)  # before clipping, one per update done
    clip_fractions: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)  # mean per-token KL, when a reference was computed
    entropy: float | None = None  # mean token entropy at the first update
    tokens: int = 0  # completion tokens of one update
    error: str | None = None  # set when this adapter failed this step (not stepped)

    @property
    def loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


@dataclass
class TokenCounts:
    """Token positions a trainer step ran through the model, padding excluded, over every update: what
    the step's FLOPs are counted from (clora_runtime.bench.flops)."""

    body: int = 0  # through the decoder with gradients: shared heads, prompts (once per group), completions
    head: int = 0  # through the LM head with gradients: the completion tokens
    reference_body: int = 0  # through the decoder without gradients: the KL reference (adapters off)
    reference_head: int = 0


@dataclass
class StepResult:
    adapters: dict[str, AdapterStepResult] = field(default_factory=dict)
    counts: TokenCounts = field(default_factory=TokenCounts)  # counts.head: tokens trained, every update
    row_logprobs: list[float] = field(default_factory=list)  # per input row: sum of first-update log-probs
    token_logprobs: list[torch.Tensor] = field(default_factory=list)  # per input row, with record_logprobs


class Trainer:
    """Trains the adapters of one bank. micro_batch_tokens (padded tokens per forward/backward) and
    head_chunk_elements (logit floats per LM-head chunk) are the device's (DeviceSizes); the defaults
    here are the CPU's."""

    def __init__(
        self, bank: AdapterBank, micro_batch_tokens: int, head_chunk_elements: int = CPU_HEAD_CHUNK_ELEMENTS
    ) -> None:
        self.bank = bank
        self.micro_batch_tokens = micro_batch_tokens
        self.head_chunk_elements = head_chunk_elements
        self.record_logprobs = False  # keep each row's token log-probabilities (tests, debugging)
        # Called after an update's backward, before its gradients are clipped and applied: (key,
        # update index). Tests read the gradients there.
        self.before_optimizer_step: Callable[[str, int], None] | None = None
        # Called before each micro-batch with the adapters whose rows it holds (tests inject faults).
        self.fault_hook: Callable[[list[str]], None] | None = None

    def micro_batches(self, rows: list[TrainRow], slot: dict[str, int], chosen: list[int]) -> list[list[int]]:
        """Indices (from `chosen`) of rows ordered by (slot, prompt) so each adapter's rows, and each
        group, are contiguous; cut so that the padded tokens (unique prompts x longest prompt + rows x
        longest completion) fit."""
        ordered = sorted(chosen, key=lambda i: (slot[rows[i].key], rows[i].prompt_ids))
        batches: list[list[int]] = []
        current: list[int] = []
        for i in ordered:
            if current and _padded_tokens([rows[j] for j in [*current, i]]) > self.micro_batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    @torch.no_grad()
    def token_logprobs(self, rows: list[TrainRow], slots: dict[str, int]) -> list[torch.Tensor]:
        """log p(token) of every completion token of each row under its adapter (no dropout), at the
        row's temperature; one tensor per row, in row order."""
        device = next(self.bank.model.parameters()).device
        out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        for batch in self.micro_batches(rows, slots, list(range(len(rows)))):
            chosen = [rows[i] for i in batch]
            prepared = _Prepared.build(chosen, [slots[r.key] for r in chosen], device)
            logp, _ = prepared.token_logprobs(
                self.bank, adapters_on=True, head_chunk_elements=self.head_chunk_elements
            )
            for i, part in zip(batch, logp.split(prepared.lengths), strict=True):
                out[i] = part
        return out

    def step(self, rows: list[TrainRow], hyper: dict[str, AdapterHyper]) -> StepResult:
        keys = sorted({r.key for r in rows})
        result = StepResult(adapters={k: AdapterStepResult() for k in keys})
        step = _Step(
            rows=rows,
            adapters={k: self.bank.adapters[k] for k in keys},
            hyper=hyper,
            device=next(self.bank.model.parameters()).device,
        )
        for update in range(max((hyper[k].updates for k in keys), default=0)):
            active = [k for k in keys if hyper[k].updates > update and result.adapters[k].error is None]
            if not active:
                break
            try:
                sums = self._update(step, active, update)
            except Exception as err:  # attributed below, adapter by adapter
                sums = self._update_alone(step, active, update, err)
            self._apply(step, active, update, sums, result)
        result.counts = step.counts
        result.row_logprobs = step.row_sums()
        if self.record_logprobs:
            result.token_logprobs = [t if t is not None else torch.empty(0) for t in step.old]
        return result

    # ---- one update -------------------------------------------------------------------------------

    def _update(self, step: _Step, active: list[str], update: int) -> dict[str, _Sums]:
        """Forward/backward of the rows of the adapters in `active`, micro-batch by micro-batch; their
        gradients are accumulated (applied by _apply). Returns per-adapter device sums."""
        for key in active:
            step.adapters[key].optimizer.zero_grad(set_to_none=True)
        generators = {
            step.hyper[k].slot: torch.Generator(device=step.device).manual_seed(
                step.hyper[k].dropout_seed + update
            )
            for k in active
        }
        sums: dict[str, _Sums] = {}
        for batch, prep in self._prepared(step, active):
            if self.fault_hook is not None:
                self.fault_hook(sorted({step.rows[i].key for i in batch}))
            self._forward_backward(step, prep, batch, update, generators, sums)
        return sums

    def _prepared(self, step: _Step, active: list[str]) -> list[tuple[list[int], _Prepared]]:
        """The micro-batches of the active adapters' rows as tensors, built once per set of adapters
        (every update of a step reuses them while no adapter drops out)."""
        cached = step.prepared.get(tuple(active))
        if cached is not None:
            return cached
        slots = {k: step.hyper[k].slot for k in active}
        wanted = set(active)
        chosen = [i for i, r in enumerate(step.rows) if r.key in wanted]
        built = []
        for batch in self.micro_batches(step.rows, slots, chosen):
            batch_rows = [step.rows[i] for i in batch]
            built.append(
                (batch, _Prepared.build(batch_rows, [slots[r.key] for r in batch_rows], step.device))
            )
        step.prepared[tuple(active)] = built
        return built

    def _update_alone(
        self, step: _Step, active: list[str], update: int, packed_error: Exception
    ) -> dict[str, _Sums]:
        """The packed update raised: redo it one adapter at a time, so that only an adapter whose own
        rows fail is failed. Raises the packed error when every adapter fails alone (the base model)."""
        free_memory(step.device)
        sums: dict[str, _Sums] = {}
        failures: dict[str, str] = {}
        for key in active:
            try:
                sums.update(self._update(step, [key], update))
            except Exception as err:  # this adapter's own failure
                step.adapters[key].optimizer.zero_grad(set_to_none=True)
                failures[key] = f"training failed: {type(err).__name__}: {err}"
                free_memory(step.device)
        if len(failures) == len(active):
            raise packed_error
        for key, message in failures.items():
            sums[key] = _Sums(error=message)
        return sums

    def _forward_backward(
        self,
        step: _Step,
        prep: _Prepared,
        batch: list[int],
        update: int,
        generators: dict[int, torch.Generator],
        sums: dict[str, _Sums],
    ) -> None:
        first = update == 0
        ref_logp = None
        if any(step.hyper[k].kl_coef > 0 for k, _, _ in prep.token_segments):
            # The reference (the base model, every adapter off) does not change between updates.
            ref_logp = step.gather(step.ref, batch)
            if ref_logp is None:
                with torch.no_grad():
                    ref_logp, _ = prep.token_logprobs(
                        self.bank, adapters_on=False, head_chunk_elements=self.head_chunk_elements
                    )
                step.counts.reference_body += prep.body_tokens
                step.counts.reference_head += prep.tokens
                step.scatter(step.ref, batch, ref_logp, prep.lengths)
        logp, entropy = prep.token_logprobs(
            self.bank,
            adapters_on=True,
            generators=generators,
            with_entropy=first,
            head_chunk_elements=self.head_chunk_elements,
        )
        if first:
            old_logp = logp.detach()  # the sampling policy: same weights as at sampling
            step.scatter(step.old, batch, old_logp, prep.lengths)
        else:
            old_logp = step.gather(step.old, batch)
            assert old_logp is not None, "a later update before the first"
        total: torch.Tensor | None = None
        for key, start, end in prep.token_segments:
            h = step.hyper[key]
            part = token_losses(
                logp[start:end],
                old_logp[start:end],
                prep.advantages[start:end],
                h.clip_low,
                h.clip_high,
                None if ref_logp is None else ref_logp[start:end],
                h.kl_coef,
            )
            loss = (part.loss * prep.weights[start:end]).sum()
            acc = sums.setdefault(key, _Sums())
            acc.add(
                loss.detach(),
                part.clipped.sum(),
                None if part.kl is None else part.kl.sum(),
                None if entropy is None else entropy[start:end].sum(),
                end - start,
            )
            total = loss if total is None else total + loss
        step.counts.body += prep.body_tokens
        step.counts.head += prep.tokens
        if total is not None:
            total.backward()

    def _apply(
        self, step: _Step, active: list[str], update: int, sums: dict[str, _Sums], result: StepResult
    ) -> None:
        """Clip and apply each adapter's gradients; the statistics come to the host in one transfer."""
        norms: dict[str, torch.Tensor] = {}
        for key in active:
            acc = sums.get(key)
            if acc is None or acc.error is not None:
                result.adapters[key].error = acc.error if acc else "no rows trained"
                continue
            if self.before_optimizer_step is not None:
                self.before_optimizer_step(key, update)
            norms[key] = torch.nn.utils.clip_grad_norm_(step.adapters[key].parameters(), MAX_GRAD_NORM)
        order = list(norms)
        numbers = (
            torch.stack([v for k in order for v in (norms[k], *sums[k].values())]).tolist() if order else []
        )
        width = 5
        for i, key in enumerate(order):
            norm, loss, clipped, kl, entropy = numbers[i * width : (i + 1) * width]
            res, acc = result.adapters[key], sums[key]
            tokens = max(acc.tokens, 1)
            res.tokens = acc.tokens
            res.losses.append(loss)
            res.grad_norms.append(norm)
            res.clip_fractions.append(clipped / tokens)
            if acc.kl is not None:
                res.kls.append(kl / tokens)
            if acc.entropy is not None:
                res.entropy = entropy / tokens
            if not (math.isfinite(norm) and math.isfinite(loss)):
                res.error = f"non-finite loss ({loss}) or gradient norm ({norm}) at this step"
        for key in active:
            adapter, res = step.adapters[key], result.adapters[key]
            if res.error is None:
                for group in adapter.optimizer.param_groups:
                    group["lr"] = step.hyper[key].learning_rate
                adapter.optimizer.step()
            adapter.optimizer.zero_grad(set_to_none=True)


def free_memory(device: torch.device) -> None:
    """Give back what a failed computation held (its tensors die with its frames)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class _Sums:
    """One adapter's sums over the tokens of one update, as device tensors until _apply reads them."""

    loss: torch.Tensor | None = None
    clipped: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    tokens: int = 0
    error: str | None = None

    def add(
        self,
        loss: torch.Tensor,
        clipped: torch.Tensor,
        kl: torch.Tensor | None,
        entropy: torch.Tensor | None,
        tokens: int,
    ) -> None:
        self.loss = _plus(self.loss, loss)
        self.clipped = _plus(self.clipped, clipped)
        self.kl = _plus(self.kl, kl)
        self.entropy = _plus(self.entropy, entropy)
        self.tokens += tokens

    def values(self) -> tuple[torch.Tensor, ...]:
        """loss, clipped tokens, KL sum, entropy sum (zero where absent), as float32 scalars."""
        assert self.loss is not None
        zero = torch.zeros((), dtype=torch.float32, device=self.loss.device)
        return tuple(
            v.float() if v is not None else zero for v in (self.loss, self.clipped, self.kl, self.entropy)
        )


def _plus(total: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    if value is None:
        return total
    return value if total is None else total + value


class _Step:
    """One trainer step: its rows, adapters and settings, the micro-batches prepared for it, and what
    the first update leaves for the later ones, per row: the sampling policy's log-probs (the ratio's
    denominator) and the reference's."""

    def __init__(
        self,
        rows: list[TrainRow],
        adapters: dict[str, Adapter],
        hyper: dict[str, AdapterHyper],
        device: torch.device,
    ) -> None:
        self.rows = rows
        self.adapters = adapters
        self.hyper = hyper
        self.device = device
        self.prepared: dict[tuple[str, ...], list[tuple[list[int], _Prepared]]] = {}
        self.old: list[torch.Tensor | None] = [None] * len(rows)
        self.ref: list[torch.Tensor | None] = [None] * len(rows)
        self.counts = TokenCounts()

    @staticmethod
    def gather(store: list[torch.Tensor | None], batch: list[int]) -> torch.Tensor | None:
        parts = [store[i] for i in batch]
        if any(p is None for p in parts):
            return None
        return torch.cat(parts)  # type: ignore[arg-type]

    @staticmethod
    def scatter(
        store: list[torch.Tensor | None], batch: list[int], values: torch.Tensor, lengths: list[int]
    ) -> None:
        for i, part in zip(batch, values.split(lengths), strict=True):
            store[i] = part

    def row_sums(self) -> list[float]:
        """Per row, the sum of its first-update log-probs (NaN for a row never trained)."""
        done = [i for i, t in enumerate(self.old) if t is not None]
        out = [float("nan")] * len(self.rows)
        if not done:
            return out
        flat = torch.cat([self.old[i] for i in done])  # type: ignore[misc]
        owner, _ = _token_layout([len(self.rows[i].completion_ids) for i in done], 0)
        (owner,) = _upload([owner], flat.device)
        sums = torch.zeros(len(done), dtype=torch.float32, device=flat.device).index_add_(
            0, owner, flat.float()
        )
        for i, value in zip(done, sums.tolist(), strict=True):
            out[i] = value
        return out


def unique_prompts(
    slots: list[int], prompts: list[list[int]]
) -> tuple[list[tuple[int, tuple[int, ...]]], list[int]]:
    """The distinct consecutive (slot, prompt) pairs of rows ordered by (slot, prompt), and for each
    row the index of its pair: a group's prompt is computed once and its cache repeated per row. Used
    by the trainer and the torch sampler alike."""
    unique: list[tuple[int, tuple[int, ...]]] = []
    source: list[int] = []
    for slot, prompt in zip(slots, prompts, strict=True):
        key = (slot, tuple(prompt))
        if not unique or unique[-1] != key:
            unique.append(key)
        source.append(len(unique) - 1)
    return unique, source


def shared_prefixes(unique: list[tuple[int, tuple[int, ...]]]) -> dict[int, int] | None:
    """Per slot, the length of the head its unique (slot, prompt) pairs share (each prompt keeps at
    least its last token for the prompt stage), or None when some slot shares none or too little would
    be saved. Used by the trainer and the torch sampler alike."""
    by_slot: dict[int, list[tuple[int, ...]]] = {}
    for slot, prompt in unique:
        by_slot.setdefault(slot, []).append(prompt)
    lengths: dict[int, int] = {}
    for slot, prompts in by_slot.items():
        first = prompts[0]
        common = min(len(p) for p in prompts) - 1
        for p in prompts[1:]:
            differ = (i for i, (x, y) in enumerate(zip(first, p, strict=False)) if x != y)
            common = min(common, next(differ, common))
        if common < 1:
            return None
        lengths[slot] = common
    saved = sum((len(prompts) - 1) * lengths[slot] for slot, prompts in by_slot.items())
    return lengths if saved >= MIN_PREFIX_SAVING else None


def _padded_tokens(rows: list[TrainRow]) -> int:
    prompts = {tuple(r.prompt_ids) for r in rows}
    longest_prompt = max(len(r.prompt_ids) for r in rows)
    longest_completion = max(len(r.completion_ids) for r in rows)
    return len(prompts) * longest_prompt + len(rows) * longest_completion


@dataclass
class _Prepared:
    """A micro-batch as tensors. Each unique (slot, prompt) is run once (left-padded), its KV cache is
    repeated for the rows of its group, then all completions run on top of it (right-padded), so a
    GRPO group pays for its prompt once instead of groupSize times.

    Prompts of one adapter mostly share a long head (the chat template's system turn): when every
    adapter of the micro-batch has one, that prefix is run once per adapter first and each prompt runs
    only its own tail on top of it (its cache repeated per prompt, as the prompts' is per row).

    Everything is laid out on the host, where the lengths are known, and reaches the device in one
    non-blocking copy per dtype; per-token tensors (advantages, weights, temperatures, targets) are
    expanded from per-row ones on the device. Nothing here reads a device tensor back."""

    prefix_ids: torch.Tensor | None  # [S, Lx], left-padded: one shared prefix per adapter, or None
    prefix_mask: torch.Tensor | None  # [S, Lx]
    prefix_slots: list[int]
    prefix_source: torch.Tensor | None  # [U]: the prefix of each unique prompt
    prompt_ids: torch.Tensor  # [U, Lp], left-padded (the tail after the prefix, if any)
    prompt_mask: torch.Tensor  # [U, Lp]
    prompt_slots: list[int]
    source: torch.Tensor  # [R]: the unique prompt of each row
    completion_ids: torch.Tensor  # [R, Lc], right-padded
    completion_mask: torch.Tensor  # [R, Lc] bool
    row_slots: list[int]
    lengths: list[int]  # completion tokens of each row
    row_keys: list[str]
    token_segments: list[tuple[str, int, int]]  # (adapter, start, end) in token order, contiguous
    token_index: torch.Tensor  # [N] flat [R * Lc] positions of the completion tokens, row by row
    targets: torch.Tensor  # [N] completion tokens, row by row
    advantages: torch.Tensor  # [N]
    weights: torch.Tensor  # [N]
    temperatures: torch.Tensor  # [N]
    body_tokens: (
        int  # positions run through the decoder, padding excluded: prefixes, prompt tails, completions
    )
    # Whether the first decoder call (the prefixes, else the prompts) has padding (_attention_mask)
    first_padded: bool = False

    @property
    def tokens(self) -> int:
        return int(self.targets.shape[0])

    @classmethod
    def build(cls, batch: list[TrainRow], slots: list[int], device: torch.device) -> _Prepared:
        unique, source = unique_prompts(slots, [r.prompt_ids for r in batch])
        prefixes = shared_prefixes(unique)
        prefix_slots: list[int] = []
        heads: list[tuple[int, ...]] = []
        tails = [list(prompt) for _, prompt in unique]
        host: dict[str, torch.Tensor] = {}  # int64, moved to the device together
        if prefixes is not None:
            prefix_slots = list(prefixes)
            heads = [next(p for s, p in unique if s == slot)[: prefixes[slot]] for slot in prefix_slots]
            host["prefix_ids"], host["prefix_mask"] = _padded(heads, left=True)
            host["prefix_source"] = torch.tensor([prefix_slots.index(s) for s, _ in unique])
            tails = [list(prompt[prefixes[slot] :]) for slot, prompt in unique]
        host["prompt_ids"], host["prompt_mask"] = _padded(tails, left=True)
        host["completion_ids"], host["completion_mask"] = _padded(
            [r.completion_ids for r in batch], left=False
        )
        host["source"] = torch.tensor(source)
        lengths = [len(r.completion_ids) for r in batch]
        host["owner"], host["token_index"] = _token_layout(lengths, host["completion_ids"].shape[1])
        segments: list[tuple[str, int, int]] = []
        start = 0
        for row, n in zip(batch, lengths, strict=True):
            if segments and segments[-1][0] == row.key:
                segments[-1] = (row.key, segments[-1][1], start + n)
            else:
                segments.append((row.key, start, start + n))
            start += n
        first = heads if prefixes is not None else tails
        per_row = torch.tensor(
            [[r.advantage for r in batch], [r.token_weight for r in batch], [r.temperature for r in batch]],
            dtype=torch.float32,
        )  # [3, R]

        on = dict(zip(host, _upload(list(host.values()), device), strict=True))
        (per_row,) = _upload([per_row], device)
        advantages, weights, temperatures = per_row.index_select(1, on["owner"]).unbind(0)  # [N] each
        return cls(
            prefix_ids=on.get("prefix_ids"),
            prefix_mask=on.get("prefix_mask"),
            prefix_slots=prefix_slots,
            prefix_source=on.get("prefix_source"),
            prompt_ids=on["prompt_ids"],
            prompt_mask=on["prompt_mask"],
            prompt_slots=[s for s, _ in unique],
            source=on["source"],
            completion_ids=on["completion_ids"],
            completion_mask=on["completion_mask"].bool(),
            row_slots=list(slots),
            lengths=lengths,
            row_keys=[r.key for r in batch],
            token_segments=segments,
            token_index=on["token_index"],
            targets=on["completion_ids"].flatten().index_select(0, on["token_index"]),
            advantages=advantages,
            weights=weights,
            temperatures=temperatures,
            body_tokens=sum(len(h) for h in heads) + sum(len(t) for t in tails) + sum(lengths),
            first_padded=len({len(q) for q in first}) > 1,
        )

    def token_logprobs(
        self,
        bank: AdapterBank,
        adapters_on: bool,
        generators: dict[int, torch.Generator] | None = None,
        with_entropy: bool = False,
        head_chunk_elements: int = CPU_HEAD_CHUNK_ELEMENTS,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log p(token) of every completion token, in row order, at each row's temperature: with each
        row's adapter (in training with dropout, when generators are given), or with every adapter off
        (the base model, the KL reference); and the policy's entropy at each token if asked."""
        from transformers import DynamicCache

        model = bank.model
        decoder = model.get_decoder()
        cache = DynamicCache()
        prompt_positions = (self.prompt_mask.cumsum(-1) - 1).clamp(min=0)
        prompt_mask = self.prompt_mask

        def run(slots: list[int], **kwargs: torch.Tensor | DynamicCache | bool | None) -> torch.Tensor:
            plan = BatchPlan.from_slots(slots, training=generators is not None) if adapters_on else None
            if plan is not None and generators is not None:
                plan.dropout_generators = generators
            with bank.plan(plan):
                return decoder(**kwargs).last_hidden_state

        if self.prefix_ids is not None:
            assert self.prefix_mask is not None and self.prefix_source is not None
            run(
                self.prefix_slots,
                input_ids=self.prefix_ids,
                attention_mask=_attention_mask(
                    self.prefix_mask, self.prefix_mask.shape[1], model, not self.first_padded
                ),
                position_ids=(self.prefix_mask.cumsum(-1) - 1).clamp(min=0),
                past_key_values=cache,
                use_cache=True,
            )
            cache.batch_select_indices(self.prefix_source)  # each prompt continues from its prefix
            prompt_positions = prompt_positions + self.prefix_mask.sum(-1)[self.prefix_source].unsqueeze(1)
            prompt_mask = torch.cat([self.prefix_mask[self.prefix_source], self.prompt_mask], dim=1)
        hp = run(
            self.prompt_slots,
            input_ids=self.prompt_ids,
            attention_mask=_attention_mask(
                prompt_mask,
                self.prompt_ids.shape[1],
                model,
                self.prefix_ids is None and not self.first_padded,
            ),
            position_ids=prompt_positions,
            past_key_values=cache,
            use_cache=True,
        )
        cache.batch_select_indices(self.source)  # each row continues from its group's prompt
        mask = torch.cat([prompt_mask[self.source], self.completion_mask.long()], dim=1)
        start = prompt_mask.sum(-1)[self.source]
        positions = start.unsqueeze(1) + torch.arange(self.completion_ids.shape[1], device=start.device)
        hc = run(
            self.row_slots,
            input_ids=self.completion_ids,
            attention_mask=_attention_mask(mask, self.completion_ids.shape[1], model),
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        # Completion token j of a row is predicted from the prompt's last position (j == 0) or from
        # completion position j - 1.
        first = hp[self.source, -1].unsqueeze(1)  # [R, 1, H]
        hidden = torch.cat([first, hc[:, :-1]], dim=1)  # [R, Lc, H]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.token_index)  # [N, H]
        return target_logprobs(
            hidden,
            model.get_output_embeddings(),
            self.targets,
            self.temperatures,
            with_entropy,
            chunk_elements=head_chunk_elements,
        )


def _padded(seqs: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Host token ids and mask [len(seqs), longest], aligned on the right (left padding) or the left."""
    width = max(len(q) for q in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, q in enumerate(seqs):
        if q:
            cols = slice(width - len(q), width) if left else slice(0, len(q))
            ids[i, cols] = torch.tensor(q)
            mask[i, cols] = 1
    return ids, mask


def _token_layout(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Host [N] tensors for N = sum(lengths) tokens laid out row by row: the row of each token and its
    flat position in the right-padded [rows, width] completions. From the lengths, not from a mask:
    nonzero() on a device mask, or repeat_interleave without its output size, reads the device back."""
    total = sum(lengths)
    counts = torch.tensor(lengths, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(lengths)), counts, output_size=total)
    row_start = counts.cumsum(0) - counts  # first token of each row in the flat order
    column = torch.arange(total) - row_start.index_select(0, owner)
    return owner, owner * width + column


def _upload(host: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors of one dtype on `device`, in one copy. To a GPU the copy goes from pinned memory,
    non-blocking: a copy from pageable memory waits until the device queue has drained (a host sync)."""
    flat = torch.cat([t.reshape(-1) for t in host])
    pinned = device.type == "cuda"
    flat = (flat.pin_memory() if pinned else flat).to(device, non_blocking=pinned)
    parts = flat.split([t.numel() for t in host])
    return [part.view(t.shape) for part, t in zip(parts, host, strict=True)]


def _attention_mask(
    mask: torch.Tensor, queries: int, model: torch.nn.Module, unpadded_start: bool = False
) -> torch.Tensor | None:
    """The attention mask of one decoder call, from the 2D padding mask [B, kv] of the cache and the
    call's `queries` new positions (its last columns).

    Handed a 2D mask, transformers reads it on the host to learn whether it may drop it (SDPA's
    is_causal): a host sync per decoder call. The host knows already: a call on an empty cache without
    padding (unpadded_start) needs no mask; otherwise SDPA and eager attention get the 4D mask
    transformers would build (for SDPA, attend where True; for eager, additive), which it takes as is.
    Other attention kernels take the 2D mask.
    """
    if unpadded_start:
        return None
    kind = getattr(model.config, "_attn_implementation", None)
    if kind not in ("sdpa", "eager"):
        return mask
    keys = mask.shape[1]
    # query i is position keys - queries + i: it sees the keys up to there
    causal = torch.ones((queries, keys), dtype=torch.bool, device=mask.device).tril_(keys - queries)
    allowed = causal & mask.bool()[:, None, None, :]  # [B, 1, queries, keys]
    if kind == "sdpa":
        return allowed
    dtype = next(model.parameters()).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min
    )


def target_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    temperatures: torch.Tensor | None = None,
    with_entropy: bool = False,
    chunk_elements: int = CPU_HEAD_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(hidden) / T)[target] for each row of hidden [N, H], in float32, and (if asked)
    the entropy of each row's distribution (no gradient). T is per row (None: 1).

    A frozen bias-free linear head (every decoder-only LM here) goes through _TargetLogProb, which never
    holds the [N, vocab] logits: it takes chunk_elements // vocab rows at a time (at least one), each
    chunk reading the whole head weight once (device_defaults.*_HEAD_CHUNK_ELEMENTS). Anything else
    falls back to plain autograd.
    """
    if temperatures is None:
        temperatures = torch.ones(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    weight = getattr(head, "weight", None)
    plain = (
        not isinstance(head, torch.nn.Linear)
        or head.bias is not None
        or weight is None
        or weight.requires_grad
    )
    if plain:
        logits = head(hidden).float() / temperatures.unsqueeze(1)
        logp_all = torch.log_softmax(logits, dim=-1)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = -(logp_all.exp() * logp_all).sum(-1)
        return logp_all.gather(1, targets.unsqueeze(1)).squeeze(1), entropy
    chunk = head_chunk_rows(chunk_elements, weight.shape[0])
    logp, entropy = _TargetLogProb.apply(hidden, weight, targets, temperatures, chunk, with_entropy)
    return logp, entropy if with_entropy else None


class _TargetLogProb(torch.autograd.Function):
    """log p(target) under softmax(hidden @ W.T / T), chunked over rows, W frozen.

    Autograd through logits + logsumexp + gather keeps [N, vocab] tensors alive and makes several
    passes over them in the backward (on the tiny model they are most of a training step). The
    gradient needs far less: d log p(t) / d h = (W[t] - E_p[W]) / T = (W[t] - softmax(h W^T / T) @ W) / T.
    The forward computes E_p[W] ([N, H]) chunk by chunk while each chunk's probabilities are at hand
    and saves only that; the backward is one gather and a subtraction. The entropy
    log Z - E_p[logits / T] comes from the same chunk at the cost of one reduction.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        temperatures: torch.Tensor,
        chunk: int,
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        need_grad = ctx.needs_input_grad[0]
        expected = torch.empty(
            (n, hidden.shape[1]) if need_grad else (0,), dtype=torch.float32, device=hidden.device
        )
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = (
                (hidden[start:end] @ weight.T).float().div_(temperatures[start:end].unsqueeze(1))
            )  # [c, V]
            target = logits.gather(1, targets[start:end].unsqueeze(1)).squeeze(1)
            peak = logits.amax(dim=1, keepdim=True)
            shifted = logits.sub_(peak)  # in place
            # unnormalised probabilities, in place too unless the entropy still needs `shifted`
            weights = shifted.exp() if with_entropy else shifted.exp_()
            total = weights.sum(dim=1)
            out[start:end] = target - peak.squeeze(1) - total.log()
            if with_entropy:
                entropy[start:end] = total.log() - (weights * shifted).sum(dim=1) / total
            if need_grad:
                mixed = (weights.to(weight.dtype) @ weight).float()
                expected[start:end] = mixed / total.unsqueeze(1)
        ctx.save_for_backward(expected, weight, targets, temperatures)
        ctx.need_grad = need_grad
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, _grad_entropy: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None, None]:
        expected, weight, targets, temperatures = ctx.saved_tensors
        if not ctx.need_grad:
            return None, None, None, None, None, None
        scale = (grad / temperatures).unsqueeze(1)
        grad_hidden = scale * (weight[targets].float() - expected)
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None, None
