"""One optimizer step for many adapters at once: micro-batched forward/backward over rows of all of them.

Rows of one adapter are contiguous inside every micro-batch (the multi-LoRA layers need segments).
Each adapter's loss is normalised by its own rows and tokens (weights computed over the whole step
before micro-batching, so the split does not change the loss), its gradients are clipped on their
own, and an adapter whose loss or gradients are not finite is reported failed and not stepped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from clora_runtime.lora.bank import Adapter, AdapterBank
from clora_runtime.lora.layers import BatchPlan
from clora_runtime.training.grpo import token_losses

MAX_GRAD_NORM = 1.0


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

    def micro_batches(self, rows: list[TrainRow]) -> list[list[TrainRow]]:
        """Rows ordered by (slot, length), cut so that rows x longest row stays within the budget."""
        slot = {k: a.slot for k, a in self.bank.adapters.items()}
        ordered = sorted(rows, key=lambda r: (slot[r.key], len(r.prompt_ids) + len(r.completion_ids)))
        batches: list[list[TrainRow]] = []
        current: list[TrainRow] = []
        longest = 0
        for row in ordered:
            length = len(row.prompt_ids) + len(row.completion_ids)
            if current and (len(current) + 1) * max(longest, length) > self.micro_batch_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(row)
            longest = max(longest, length)
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
        model = self.bank.model
        lengths = [len(r.prompt_ids) + len(r.completion_ids) for r in batch]
        width = max(lengths)
        pad = 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : lengths[i]] = torch.tensor(r.prompt_ids + r.completion_ids)
        ids = ids.to(device)
        # Right padding with a causal mask: a real token never sees padding, so no attention mask is needed.
        positions = torch.arange(width, device=device).unsqueeze(0).expand(len(batch), -1)
        # Flat (row, position) of every completion token and the position that predicts it.
        row_idx, pred_pos, targets, weights, advs = [], [], [], [], []
        for i, r in enumerate(batch):
            n, m = len(r.prompt_ids), len(r.completion_ids)
            row_idx.extend([i] * m)
            pred_pos.extend(range(n - 1, n + m - 1))
            targets.extend(r.completion_ids)
            weights.extend([r.token_weight] * m)
            advs.extend([r.advantage] * m)
        row_t = torch.tensor(row_idx, device=device)
        pos_t = torch.tensor(pred_pos, device=device)
        target_t = torch.tensor(targets, device=device)
        weight_t = torch.tensor(weights, device=device, dtype=torch.float32)
        adv_t = torch.tensor(advs, device=device, dtype=torch.float32)
        slots = [adapters[r.key].slot for r in batch]

        ref_logp = None
        if any(hyper[r.key].kl_coef > 0 for r in batch):
            with torch.no_grad(), self.bank.plan(None):  # the reference is the base: every adapter off
                ref_logp = self._token_logprobs(model, ids, positions, row_t, pos_t, target_t)

        plan = BatchPlan.from_slots(slots, training=True)
        plan.dropout_generators = generators
        with self.bank.plan(plan):
            logp = self._token_logprobs(model, ids, positions, row_t, pos_t, target_t)
        # Per-token owner, to cut the loss per adapter.
        owner = [r.key for r in batch for _ in range(len(r.completion_ids))]
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
            if self.record_logprobs:
                res.logprobs.append(logp[start:end].detach().clone())
            result.tokens += end - start
            if res.error is None and not math.isfinite(value):
                res.error = f"non-finite loss ({value}) at this step"
            if res.error is None:
                res.loss += value
                total = loss if total is None else total + loss
            start = end
        if total is not None:
            total.backward()

    @staticmethod
    def _token_logprobs(
        model: torch.nn.Module,
        ids: torch.Tensor,
        positions: torch.Tensor,
        row_t: torch.Tensor,
        pos_t: torch.Tensor,
        target_t: torch.Tensor,
    ) -> torch.Tensor:
        hidden = model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        picked = hidden[row_t, pos_t]  # only completion positions go through the LM head
        logits = model.get_output_embeddings()(picked).float()
        return logits.gather(1, target_t.unsqueeze(1)).squeeze(1) - torch.logsumexp(logits, dim=-1)
