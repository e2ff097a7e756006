"""The built-in sampler: KV-cached batched generation through the same multi-LoRA layers as training.

Rows are ordered so that each adapter's rows are contiguous (the layers work on row segments) and
identical prompts of one adapter (a GRPO group) are prefilled once, then their cache rows repeated;
the head an adapter's prompts share (the chat template's system turn) is prefilled once per adapter.
Prompts are left-padded with per-row positions, so padding changes a row's numbers by rounding only.
Each row draws its tokens from its own torch.Generator seeded by the request (inverse-CDF sampling),
so a row's tokens never depend on its neighbours; finished rows leave the batch at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from clora_runtime.device_defaults import DeviceSizes
from clora_runtime.lora.layers import BatchPlan
from clora_runtime.sampling.base import Completion, Sampler, SampleRequest
from clora_runtime.training.trainer import shared_prefixes, unique_prompts

VOCAB_BLOCK = 256  # tokens per block of the two-level inverse-CDF draw

if TYPE_CHECKING:
    from clora_runtime.config import EngineConfig
    from clora_runtime.lora.bank import AdapterBank
    from clora_runtime.models.loading import LoadedModel


class TorchSampler(Sampler):
    def __init__(
        self, base: LoadedModel, bank: AdapterBank, config: EngineConfig, sizes: DeviceSizes | None = None
    ) -> None:
        sizes = sizes or DeviceSizes.cpu()
        self.base = base
        self.bank = bank
        self.max_batch_rows = sizes.max_batch_rows
        self.sync_every = sizes.decode_sync_every  # decode steps between host syncs
        self.eos = sorted(base.eos_token_ids)
        self.pad_id = int(base.tokenizer.pad_token_id or 0)

    def add_adapter(self, key: str) -> None:  # shares the bank's weights: nothing to load
        pass

    def remove_adapter(self, key: str) -> None:
        pass

    def sync_adapters(self, keys: list[str]) -> None:  # sampling reads the trained tensors themselves
        pass

    def slot_of(self, key: str) -> int:
        adapter = self.bank.adapters.get(key)
        if adapter is None:
            raise KeyError(f"adapter {key} is not in the bank")
        return adapter.slot

    @torch.no_grad()
    def generate(self, requests: list[SampleRequest]) -> list[Completion]:
        if not requests:
            return []
        slots = [self.slot_of(r.adapter_key) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: (slots[i], requests[i].prompt_ids, i))
        out: list[Completion | None] = [None] * len(requests)
        for start in range(0, len(order), self.max_batch_rows):
            chunk = order[start : start + self.max_batch_rows]
            results = self._generate_chunk([requests[i] for i in chunk], [slots[i] for i in chunk])
            for i, completion in zip(chunk, results, strict=True):
                out[i] = completion
        return [c for c in out if c is not None]

    def _generate_chunk(self, requests: list[SampleRequest], slots: list[int]) -> list[Completion]:
        model = self.base.model
        device = self.base.device
        # each row points at its unique prefill row
        unique, source = unique_prompts(slots, [r.prompt_ids for r in requests])
        from transformers import DynamicCache

        cache = DynamicCache()
        decoder = model.get_decoder()
        head = model.get_output_embeddings()
        # An adapter's prompts share the chat template's head: run it once per adapter (see the trainer).
        prefixes = shared_prefixes(unique)
        tails = [list(p) for _, p in unique]
        prefix_mask = prefix_source = None
        if prefixes is not None:
            prefix_slots = list(prefixes)
            heads = [next(p for s, p in unique if s == slot)[: prefixes[slot]] for slot in prefix_slots]
            prefix_ids, prefix_mask = self._left_padded(heads, device)
            with self.bank.plan(BatchPlan.from_slots(prefix_slots)):
                decoder(
                    input_ids=prefix_ids,
                    attention_mask=prefix_mask,
                    position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0),
                    past_key_values=cache,
                    use_cache=True,
                )
            prefix_source = torch.tensor([prefix_slots.index(s) for s, _ in unique], device=device)
            cache.batch_select_indices(prefix_source)
            tails = [list(p[prefixes[s] :]) for s, p in unique]
            self.prefill_tokens += sum(len(h) for h in heads)
        self.prefill_tokens += sum(len(t) for t in tails)
        ids, mask = self._left_padded(tails, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if prefix_mask is not None and prefix_source is not None:
            positions = positions + prefix_mask.sum(-1)[prefix_source].unsqueeze(1)
            mask = torch.cat([prefix_mask[prefix_source], mask], dim=1)
        with self.bank.plan(BatchPlan.from_slots([s for s, _ in unique])) as _:
            hidden = decoder(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]
            select = torch.tensor(source, device=device)
            cache.batch_select_indices(select)  # the group's rows share one prefill
            logits = head(hidden)[select].float()
            mask = mask[select]
            next_pos = positions[select, -1] + 1

            n = len(requests)
            gens = [torch.Generator(device=device).manual_seed(r.seed) for r in requests]
            temps = torch.tensor([r.temperature for r in requests], device=device).unsqueeze(1)
            tokens: list[list[int]] = [[] for _ in range(n)]
            finished = [False] * n
            alive = list(range(n))  # request index of each batch row
            plan = BatchPlan.from_slots(slots)
            eos = set(self.eos)
            drawn: list[tuple[list[int], torch.Tensor]] = []  # (rows, their log-probs) per decode step
            while True:
                chosen_t, logp = self._draw(logits, temps[alive], [gens[i] for i in alive])
                drawn.append((alive, logp))
                chosen = chosen_t.tolist()
                keep: list[int] = []
                for b, i in enumerate(alive):
                    tokens[i].append(chosen[b])
                    if chosen[b] in eos:
                        finished[i] = True
                    elif len(tokens[i]) < requests[i].max_new_tokens:
                        keep.append(b)
                if not keep:
                    break
                if len(keep) < len(alive):
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, next_pos = mask[index], next_pos[index]
                    plan = plan.select(keep)
                    alive = [alive[b] for b in keep]
                self.bank.set_plan(plan)
                step_ids = torch.tensor([[tokens[i][-1]] for i in alive], device=device)
                mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=device)], dim=1)
                hidden = decoder(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=next_pos.unsqueeze(1),
                    past_key_values=cache,
                    use_cache=True,
                ).last_hidden_state[:, -1]
                logits = head(hidden).float()
                next_pos = next_pos + 1
        # one transfer for every step's log-probs, dealt back to the rows in step order
        flat = torch.cat([logp for _, logp in drawn]).tolist()
        logprobs: list[list[float]] = [[] for _ in range(n)]
        at = 0
        for rows, _ in drawn:
            for i, value in zip(rows, flat[at : at + len(rows)], strict=True):
                logprobs[i].append(value)
            at += len(rows)
        return [
            Completion(token_ids=t, finished=f, logprobs=lp)
            for t, f, lp in zip(tokens, finished, logprobs, strict=True)
        ]

    def _left_padded(
        self, prompts: list[list[int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask [len(prompts), longest], prompts aligned on the right."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        return ids.to(device), mask.to(device)

    @staticmethod
    def _draw(
        logits: torch.Tensor, temps: torch.Tensor, gens: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row by inverse-CDF sampling, and its log-probability under softmax(logits / T):
        one uniform number from each row's own generator, so rows never share randomness (and a row's
        draw does not depend on the batch).

        Two levels, so no cumulative sum runs over the whole vocabulary (a sequential scan, slow on a
        CPU): block sums pick the block of VOCAB_BLOCK tokens the draw falls in, then a cumulative sum
        over that block alone picks the token. `logits` is overwritten.
        """
        rows, vocab = logits.shape
        scaled = logits.div_(temps)
        weights = scaled.sub_(scaled.amax(dim=1, keepdim=True)).exp_()  # unnormalised probabilities
        full = vocab // VOCAB_BLOCK * VOCAB_BLOCK
        sums = weights[:, :full].reshape(rows, -1, VOCAB_BLOCK).sum(dim=2)
        if full < vocab:
            sums = torch.cat([sums, weights[:, full:].sum(dim=1, keepdim=True)], dim=1)
        block_cdf = sums.cumsum(dim=1)
        u = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in gens])
        # scaled by the row's total: the draw lies in [0, total); side="right" never picks a block or
        # token of zero mass, even for u == 0
        target = (u * block_cdf[:, -1]).unsqueeze(1)
        block = torch.searchsorted(block_cdf, target, side="right").clamp_(max=sums.shape[1] - 1)
        before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
        columns = block * VOCAB_BLOCK + torch.arange(VOCAB_BLOCK, device=logits.device)
        columns.clamp_(max=vocab - 1)
        inside = weights.gather(1, columns).cumsum(dim=1)
        # columns past the vocabulary (a short last block) repeat its last token: masked out here
        inside.masked_fill_(columns >= vocab, float("inf"))
        offset = torch.searchsorted(inside, target - before, side="right").clamp_(max=VOCAB_BLOCK - 1)
        # a row whose logits are not finite (a diverged adapter) still gets a token; its loss then
        # fails that experiment alone
        tokens = (block.squeeze(1) * VOCAB_BLOCK + offset.squeeze(1)).clamp_(max=vocab - 1)
        logp = weights.gather(1, tokens.unsqueeze(1)).squeeze(1).log() - block_cdf[:, -1].log()
        return tokens, logp
