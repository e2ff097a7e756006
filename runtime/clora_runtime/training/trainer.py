"""One optimizer step for many adapters at once: micro-batched forward/backward over rows of all of them.

Rows of one adapter are contiguous inside every micro-batch (the multi-LoRA layers need segments).
Each adapter's loss is normalised by its own rows and tokens (weights computed over the whole step
before micro-batching, so the split does not change the loss), its gradients are clipped on their
own, and an adapter whose loss or gradients are not finite is reported failed and not stepped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

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


@dataclass
class AdapterHyper:
    clip_epsilon: float
    kl_coef: float
    learning_rate: float
    dropout_seed: int  # seeds this step's LoRA dropout masks


@dataclass
class AdapterStepResult:
    loss: float = 0.0
    tokens: int = 0
    grad_norm: float = 0.0
    error: str | None = None  # set when this adapter failed this step (not stepped)
    logprobs: list[torch.Tensor] = field(default_factory=list)  # only with Trainer.record_logprobs


@dataclass
class StepResult:
    adapters: dict[str, AdapterStepResult] = field(default_factory=dict)
    tokens: int = 0


class Trainer:
    def __init__(self, bank: AdapterBank, micro_batch_tokens: int) -> None:
        self.bank = bank
        self.micro_batch_tokens = micro_batch_tokens
        self.record_logprobs = False  # keep each adapter's token log-probabilities (tests, debugging)
        # Called between chunks of the LM head, the longest stretch of a training forward outside the
        # decoder layers (the engine's join point; the layers have their own hooks).
        self.pause: Callable[[], None] | None = None

    def micro_batches(self, rows: list[TrainRow]) -> list[list[TrainRow]]:
        """Rows ordered by (slot, prompt) so each adapter's rows, and each group, are contiguous; cut so
        that the padded tokens (unique prompts x longest prompt + rows x longest completion) fit."""
        slot = {k: a.slot for k, a in self.bank.adapters.items()}
        ordered = sorted(rows, key=lambda r: (slot[r.key], r.prompt_ids))
        batches: list[list[TrainRow]] = []
        current: list[TrainRow] = []
        for row in ordered:
            if current and _padded_tokens([*current, row]) > self.micro_batch_tokens:
                batches.append(current)
                current = []
            current.append(row)
        if current:
            batches.append(current)
        return batches

    def step(self, rows: list[TrainRow], hyper: dict[str, AdapterHyper]) -> StepResult:
        bank = self.bank
        keys = sorted({r.key for r in rows})
        adapters: dict[str, Adapter] = {k: bank.adapters[k] for k in keys}
        result = StepResult(adapters={k: AdapterStepResult() for k in keys})
        for adapter in adapters.values():
            adapter.optimizer.zero_grad(set_to_none=True)
        device = next(bank.model.parameters()).device
        generators = {
            adapters[k].slot: torch.Generator(device=device).manual_seed(hyper[k].dropout_seed) for k in keys
        }
        for batch in self.micro_batches(rows):
            self._forward_backward(batch, adapters, hyper, result, generators, device)
        for key, adapter in adapters.items():
            res = result.adapters[key]
            if res.error is None:
                params = adapter.parameters()
                norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                res.grad_norm = float(norm)
                if not math.isfinite(res.grad_norm):
                    res.error = f"non-finite gradient norm ({res.grad_norm}) at this step"
            if res.error is not None:
                adapter.optimizer.zero_grad(set_to_none=True)
                continue
            for group in adapter.optimizer.param_groups:
                group["lr"] = hyper[key].learning_rate
            adapter.optimizer.step()
            adapter.optimizer.zero_grad(set_to_none=True)
        return result

    def _forward_backward(
        self,
        batch: list[TrainRow],
        adapters: dict[str, Adapter],
        hyper: dict[str, AdapterHyper],
        result: StepResult,
        generators: dict[int, torch.Generator],
        device: torch.device,
    ) -> None:
        prepared = _Prepared.build(batch, [adapters[r.key].slot for r in batch], device)
        ref_logp = None
        if any(hyper[r.key].kl_coef > 0 for r in batch):
            with torch.no_grad():  # the reference is the base model: every adapter off
                ref_logp = prepared.token_logprobs(self.bank, adapters_on=False)
        logp = prepared.token_logprobs(self.bank, adapters_on=True, generators=generators, pause=self.pause)
        weight_t = torch.tensor(
            [r.token_weight for r in batch for _ in r.completion_ids], device=device, dtype=torch.float32
        )
        adv_t = torch.tensor([r.advantage for r in batch for _ in r.completion_ids], device=device)
        # Per-token owner, to cut the loss per adapter (rows of one adapter are contiguous).
        owner = [r.key for r in batch for _ in r.completion_ids]
        total: torch.Tensor | None = None
        start = 0
        while start < len(owner):
            key = owner[start]
            end = start
            while end < len(owner) and owner[end] == key:
                end += 1
            h = hyper[key]
            res = result.adapters[key]
            part = token_losses(
                logp[start:end],
                logp[start:end].detach(),  # on-policy: one optimizer step per sampled batch
                adv_t[start:end],
                h.clip_epsilon,
                None if ref_logp is None else ref_logp[start:end],
                h.kl_coef,
            )
            loss = (part * weight_t[start:end]).sum()
            value = float(loss.detach())
            res.tokens += end - start
            result.tokens += end - start
            if self.record_logprobs:
                res.logprobs.append(logp[start:end].detach().clone())
            if res.error is None and not math.isfinite(value):
                res.error = f"non-finite loss ({value}) at this step"
            if res.error is None:
                res.loss += value
                total = loss if total is None else total + loss
            start = end
        if total is not None:
            total.backward()


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
    only its own tail on top of it (its cache repeated per prompt, as the prompts' is per row)."""

    prefix_ids: torch.Tensor | None  # [S, Lx], left-padded: one shared prefix per adapter, or None
    prefix_mask: torch.Tensor | None  # [S, Lx]
    prefix_slots: list[int]
    prefix_source: torch.Tensor | None  # [U]: the prefix of each unique prompt
    prompt_ids: torch.Tensor  # [U, Lp], left-padded (the tail after the prefix, if any)
    prompt_mask: torch.Tensor  # [U, Lp]
    prompt_slots: list[int]
    source: torch.Tensor  # [R]: the unique prompt of each row
    completion_ids: torch.Tensor  # [R, Lc], right-padded
    completion_mask: torch.Tensor  # [R, Lc]
    row_slots: list[int]
    first_rows: torch.Tensor  # rows of every completion token j == 0 (predicted from the prompt)
    rest_rows: torch.Tensor  # (row, j - 1) of every completion token j >= 1
    rest_cols: torch.Tensor
    is_first: torch.Tensor  # [N] bool, in token order (row by row)
    targets: torch.Tensor  # [N]

    @classmethod
    def build(cls, batch: list[TrainRow], slots: list[int], device: torch.device) -> _Prepared:
        unique, source = unique_prompts(slots, [r.prompt_ids for r in batch])
        prefixes = shared_prefixes(unique)
        prefix_ids = prefix_mask = prefix_source = None
        prefix_slots: list[int] = []
        tails = [prompt for _, prompt in unique]
        if prefixes is not None:
            prefix_slots = list(prefixes)
            lx = max(prefixes.values())
            prefix_ids = torch.zeros((len(prefix_slots), lx), dtype=torch.long)
            prefix_mask = torch.zeros((len(prefix_slots), lx), dtype=torch.long)
            for i, slot in enumerate(prefix_slots):
                head = next(p for s, p in unique if s == slot)[: prefixes[slot]]
                prefix_ids[i, lx - len(head) :] = torch.tensor(head)
                prefix_mask[i, lx - len(head) :] = 1
            prefix_source = torch.tensor([prefix_slots.index(s) for s, _ in unique], device=device)
            tails = [prompt[prefixes[slot] :] for slot, prompt in unique]
            prefix_ids, prefix_mask = prefix_ids.to(device), prefix_mask.to(device)
        lp = max(len(t) for t in tails)
        lc = max(len(r.completion_ids) for r in batch)
        prompt_ids = torch.zeros((len(unique), lp), dtype=torch.long)
        prompt_mask = torch.zeros((len(unique), lp), dtype=torch.long)
        for i, tail in enumerate(tails):
            prompt_ids[i, lp - len(tail) :] = torch.tensor(tail)
            prompt_mask[i, lp - len(tail) :] = 1
        completion_ids = torch.zeros((len(batch), lc), dtype=torch.long)
        completion_mask = torch.zeros((len(batch), lc), dtype=torch.long)
        first_rows, rest_rows, rest_cols, is_first, targets = [], [], [], [], []
        for i, row in enumerate(batch):
            m = len(row.completion_ids)
            completion_ids[i, :m] = torch.tensor(row.completion_ids)
            completion_mask[i, :m] = 1
            first_rows.append(i)
            rest_rows.extend([i] * (m - 1))
            rest_cols.extend(range(m - 1))
            is_first.extend([True] + [False] * (m - 1))
            targets.extend(row.completion_ids)
        return cls(
            prefix_ids=prefix_ids,
            prefix_mask=prefix_mask,
            prefix_slots=prefix_slots,
            prefix_source=prefix_source,
            prompt_ids=prompt_ids.to(device),
            prompt_mask=prompt_mask.to(device),
            prompt_slots=[s for s, _ in unique],
            source=torch.tensor(source, device=device),
            completion_ids=completion_ids.to(device),
            completion_mask=completion_mask.to(device),
            row_slots=list(slots),
            first_rows=torch.tensor(first_rows, device=device),
            rest_rows=torch.tensor(rest_rows, device=device, dtype=torch.long),
            rest_cols=torch.tensor(rest_cols, device=device, dtype=torch.long),
            is_first=torch.tensor(is_first, device=device),
            targets=torch.tensor(targets, device=device),
        )

    def token_logprobs(
        self,
        bank: AdapterBank,
        adapters_on: bool,
        generators: dict[int, torch.Generator] | None = None,
        pause: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """log p(token) of every completion token, in row order: with each row's adapter (training,
        dropout on), or with every adapter off (the base model, the KL reference)."""
        from transformers import DynamicCache

        model = bank.model
        decoder = model.get_decoder()
        cache = DynamicCache()
        prompt_positions = (self.prompt_mask.cumsum(-1) - 1).clamp(min=0)
        prompt_mask = self.prompt_mask

        def run(slots: list[int], **kwargs: torch.Tensor | DynamicCache | bool) -> torch.Tensor:
            plan = BatchPlan.from_slots(slots, training=True) if adapters_on else None
            if plan is not None and generators is not None:
                plan.dropout_generators = generators
            with bank.plan(plan):
                return decoder(**kwargs).last_hidden_state

        if self.prefix_ids is not None:
            assert self.prefix_mask is not None and self.prefix_source is not None
            run(
                self.prefix_slots,
                input_ids=self.prefix_ids,
                attention_mask=self.prefix_mask,
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
            attention_mask=prompt_mask,
            position_ids=prompt_positions,
            past_key_values=cache,
            use_cache=True,
        )
        cache.batch_select_indices(self.source)  # each row continues from its group's prompt
        mask = torch.cat([prompt_mask[self.source], self.completion_mask], dim=1)
        start = prompt_mask.sum(-1)[self.source]
        positions = start.unsqueeze(1) + torch.arange(self.completion_ids.shape[1], device=start.device)
        hc = run(
            self.row_slots,
            input_ids=self.completion_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        first = hp[self.source[self.first_rows], -1]  # [R, H]
        rest = hc[self.rest_rows, self.rest_cols]  # [N - R, H]
        hidden = torch.empty((self.targets.shape[0], first.shape[-1]), dtype=first.dtype, device=first.device)
        hidden = hidden.index_put((self.is_first.nonzero().squeeze(1),), first)
        hidden = hidden.index_put(((~self.is_first).nonzero().squeeze(1),), rest)
        return target_logprobs(hidden, model.get_output_embeddings(), self.targets, pause)


# Token rows per chunk of the LM head: logits of [chunk, vocab] floats (about 16 MiB) at a time.
HEAD_CHUNK_ELEMENTS = 2**22


def target_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    pause: Callable[[], None] | None = None,
) -> torch.Tensor:
    """log softmax(head(hidden))[target] for each row of hidden [N, H], in float32; `pause` is called
    between chunks.

    A frozen bias-free linear head (every decoder-only LM here) goes through _TargetLogProb, which never
    holds the [N, vocab] logits; anything else falls back to plain autograd.
    """
    weight = getattr(head, "weight", None)
    plain = (
        not isinstance(head, torch.nn.Linear)
        or head.bias is not None
        or weight is None
        or weight.requires_grad
    )
    if plain:
        logits = head(hidden).float()
        return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
    chunk = max(1, HEAD_CHUNK_ELEMENTS // weight.shape[0])
    return _TargetLogProb.apply(hidden, weight, targets, chunk, pause)


class _TargetLogProb(torch.autograd.Function):
    """log p(target) under softmax(hidden @ W.T), chunked over rows, W frozen.

    Autograd through logits + logsumexp + gather keeps [N, vocab] tensors alive and makes several
    passes over them in the backward (on the tiny model they are most of a training step). The
    gradient needs far less: d log p(t) / d h = W[t] - E_p[W] = W[t] - softmax(h W^T) @ W. The forward
    computes E_p[W] ([N, H]) chunk by chunk while each chunk's probabilities are at hand and saves only
    that; the backward is one gather and a subtraction.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        pause: Callable[[], None] | None,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        need_grad = ctx.needs_input_grad[0]
        expected = torch.empty((n, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk):
            if start and pause is not None:
                pause()
            end = min(start + chunk, n)
            logits = (hidden[start:end] @ weight.T).float()  # [c, V]
            target = logits.gather(1, targets[start:end].unsqueeze(1)).squeeze(1)
            peak = logits.amax(dim=1, keepdim=True)
            weights = logits.sub_(peak).exp_()  # in place: unnormalised probabilities
            total = weights.sum(dim=1)
            out[start:end] = target - peak.squeeze(1) - total.log()
            if need_grad:
                mixed = (weights.to(weight.dtype) @ weight).float()
                expected[start:end] = mixed / total.unsqueeze(1)
        ctx.save_for_backward(expected if need_grad else None, weight, targets)
        ctx.hidden_dtype = hidden.dtype
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None, None, None]:
        expected, weight, targets = ctx.saved_tensors
        if expected is None:
            return None, None, None, None, None
        grad_hidden = grad.unsqueeze(1) * (weight[targets].float() - expected)
        return grad_hidden.to(ctx.hidden_dtype), None, None, None, None
