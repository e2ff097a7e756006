"""The built-in sampler: KV-cached batched generation through the same multi-LoRA layers as training.

Rows are ordered so that each adapter's rows are contiguous (the layers work on row segments) and
identical prompts of one adapter (a GRPO group) are prefilled once, then their cache rows repeated;
the head an adapter's prompts share (the chat template's system turn) is prefilled once per adapter.
Prompts are left-padded with per-row positions, so padding changes a row's numbers by rounding only.
Each row draws its tokens from its own torch.Generator seeded by the request (inverse-CDF sampling),
all its uniform numbers at once when its chunk starts, so a row's tokens never depend on its
neighbours. Decode steps do no host work per row: tokens, log-probs and EOS flags stay on the device,
the host reads the EOS flags every `sync_every` steps (DeviceSizes.decode_sync_every: every step on a
CPU, every 8 on a GPU), and rows that finished leave the batch then; the rest is read once at the end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from clora_runtime.device_defaults import DeviceSizes
from clora_runtime.lora.layers import BatchPlan, host_to_device
from clora_runtime.sampling.base import Completion, Sampler, SampleRequest
from clora_runtime.training.trainer import shared_prefixes, unique_prompts

VOCAB_BLOCK = 256  # tokens per block of the two-level inverse-CDF draw

if TYPE_CHECKING:
    from transformers import DynamicCache

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
        cfg = base.model.config
        # decode steps pass SDPA a ready boolean mask (see _step_mask) where every layer attends fully
        self._ready_mask = (
            getattr(cfg, "_attn_implementation", None) == "sdpa"
            and getattr(cfg, "sliding_window", None) is None
            and all(t == "full_attention" for t in getattr(cfg, "layer_types", None) or [])
        )

    def add_adapter(self, key: str) -> None:  # shares the bank's weights: nothing to load
        pass

    def remove_adapter(self, key: str) -> None:
        pass

    def sync_adapters(self, keys: list[str]) -> None:
        """Sampling runs through the bank's layers; their compute-dtype copies of the stepped adapters
        are refreshed now rather than on the first decode step."""
        self.bank.refresh(keys)

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
            return self._decode(requests, slots, cache, logits, mask[select], positions[select, -1] + 1)

    def _decode(
        self,
        requests: list[SampleRequest],
        slots: list[int],
        cache: DynamicCache,
        logits: torch.Tensor,
        mask: torch.Tensor,
        next_pos: torch.Tensor,
    ) -> list[Completion]:
        """Decode steps from the prompts' last logits. Tokens, log-probs and EOS flags stay on the
        device; the host reads the EOS flags every `sync_every` steps (rows that finished leave the
        batch then: what they drew after their EOS is dropped) and everything else once, at the end.
        Rows that reach their max_new_tokens leave at once: the host knows when without a sync."""
        device = self.base.device
        decoder = self.base.model.get_decoder()
        head = self.base.model.get_output_embeddings()
        n = len(requests)
        budgets = [max(r.max_new_tokens, 1) for r in requests]  # the first token is always drawn
        uniforms = self._uniforms(requests, budgets)
        temps = host_to_device(torch.tensor([[r.temperature] for r in requests]), device)
        columns = torch.arange(VOCAB_BLOCK, device=device)
        eos = torch.tensor(self.eos, device=device)
        seen_eos = torch.zeros(n, dtype=torch.bool, device=device)
        prompt_width = mask.shape[1]
        # every column a row can reach, so a decode step slices the mask instead of growing it
        mask = torch.cat([mask, torch.ones((n, max(budgets)), dtype=mask.dtype, device=device)], dim=1)
        step_mask = self._step_mask(mask)
        alive = list(range(n))  # request index of each batch row
        plan = BatchPlan.from_slots(slots)
        # (request indices of the batch rows, tokens [k, rows], log-probs [k, rows]) per stretch of
        # steps with the same rows; read once at the end
        windows: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []
        drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
        step = 0
        next_end = min(budgets)  # the first step at which some row reaches its budget
        last_end = max(budgets)  # the step at which every row has (no EOS read is needed then)
        while True:
            chosen, logp = self._draw(logits, temps, uniforms[:, step], columns)
            drawn.append((chosen, logp))
            if self.eos:
                seen_eos |= torch.isin(chosen, eos)
            step += 1
            synced = bool(self.eos) and step % self.sync_every == 0 and step < last_end
            if not synced and step < next_end:
                keep = None
            else:
                ended = seen_eos.tolist() if synced else [False] * len(alive)  # the only sync
                keep = [b for b, i in enumerate(alive) if budgets[i] > step and not ended[b]]
            if keep is not None and len(keep) < len(alive):
                windows.append((alive, *self._stacked(drawn)))
                drawn = []
                if not keep:
                    break
                index = host_to_device(torch.tensor(keep), device)
                cache.batch_select_indices(index)
                mask, next_pos, temps = mask[index], next_pos[index], temps[index]
                uniforms, seen_eos, chosen = uniforms[index], seen_eos[index], chosen[index]
                step_mask = self._step_mask(mask)
                plan = plan.select(keep)
                alive = [alive[b] for b in keep]
                next_end = min(budgets[i] for i in alive)
                last_end = max(budgets[i] for i in alive)
            self.bank.set_plan(plan)
            hidden = decoder(
                input_ids=chosen.unsqueeze(1),
                attention_mask=step_mask[..., : prompt_width + step],
                position_ids=next_pos.unsqueeze(1),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[:, -1]
            logits = head(hidden).float()
            next_pos = next_pos + 1
        return self._completions(windows, budgets)

    def _completions(
        self, windows: list[tuple[list[int], torch.Tensor, torch.Tensor]], budgets: list[int]
    ) -> list[Completion]:
        """Every row's tokens up to its EOS (included) or its budget, from one transfer of all steps."""
        tokens_flat = torch.cat([t.flatten() for _, t, _ in windows]).tolist()
        logp_flat = torch.cat([lp.flatten() for _, _, lp in windows]).tolist()
        n = len(budgets)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        finished = [False] * n
        stopped = [False] * n
        eos = set(self.eos)
        at = 0
        for rows, window, _ in windows:
            for _ in range(window.shape[0]):
                for i in rows:
                    if not stopped[i]:
                        token = tokens_flat[at]
                        tokens[i].append(token)
                        logprobs[i].append(logp_flat[at])
                        if token in eos:
                            finished[i] = stopped[i] = True
                        elif len(tokens[i]) >= budgets[i]:
                            stopped[i] = True
                    at += 1
        return [
            Completion(token_ids=t, finished=f, logprobs=lp)
            for t, f, lp in zip(tokens, finished, logprobs, strict=True)
        ]

    @staticmethod
    def _stacked(drawn: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([t for t, _ in drawn]), torch.stack([lp for _, lp in drawn])

    def _uniforms(self, requests: list[SampleRequest], budgets: list[int]) -> torch.Tensor:
        """[rows, longest budget]: each row's uniform numbers for all its steps, drawn at once from its
        own generator seeded by the request. A CPU generator, and exactly the row's budget of numbers,
        so a row's draws depend on neither its neighbours nor the device."""
        out = torch.full((len(requests), max(budgets)), 0.5)
        for i, (request, budget) in enumerate(zip(requests, budgets, strict=True)):
            out[i, :budget].uniform_(generator=torch.Generator().manual_seed(request.seed))
        return host_to_device(out, self.base.device)

    def _step_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask decode steps slice. SDPA models get it as a ready [rows, 1, 1, keys]
        boolean mask: from a 2-D mask, transformers checks on the host whether any key is padding
        (a device sync every decode step). Sliding-window models and other attentions keep the 2-D
        mask, which transformers turns into theirs."""
        return mask.bool()[:, None, None, :] if self._ready_mask else mask

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
        logits: torch.Tensor, temps: torch.Tensor, u: torch.Tensor, columns: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row by inverse-CDF sampling, and its log-probability under softmax(logits / T):
        `u` holds one uniform number of [0, 1) per row, from the row's own generator, so rows never
        share randomness (and a row's draw does not depend on the batch). `columns` is
        arange(VOCAB_BLOCK) on the device.

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
        # scaled by the row's total: the draw lies in [0, total); side="right" never picks a block or
        # token of zero mass, even for u == 0
        target = (u * block_cdf[:, -1]).unsqueeze(1)
        block = torch.searchsorted(block_cdf, target, side="right").clamp_(max=sums.shape[1] - 1)
        before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
        columns = block * VOCAB_BLOCK + columns
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
