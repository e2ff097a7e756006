"""The Sampler contract shared by the torch and the vLLM samplers.

The engine owns the adapter bank and decides what is sampled; a sampler only turns prompt token ids
into completion token ids for the adapter each row names. Rows are independent: a row's tokens depend
on its adapter, prompt, temperature and seed, never on its neighbours in the batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass
class SampleRequest:
    """One row of the sampling batch."""

    adapter_key: str  # "namespace/name"
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    seed: int  # per-row seed so a row's tokens do not depend on its neighbours


@dataclass
class Completion:
    """What one row produced."""

    token_ids: list[int]  # generated tokens, EOS included if produced
    finished: bool  # stopped at EOS (False: hit max_new_tokens)
    # log-probability of each generated token under the distribution it was drawn from (logits
    # divided by the temperature); None when the sampler cannot say
    logprobs: list[float] | None = None


class Sampler(ABC):
    """Generates completions for rows of many adapters at once.

    Who owns what: the engine's adapter bank owns the weights. The torch sampler runs through the very
    same layers (so it always sees the newest weights); a sampler with its own copy (vLLM) refreshes it
    in sync_adapters, which the engine calls after optimizer steps and before the next sampling.
    """

    # Prompt tokens run through the model so far (a shared head or a group's prompt counted once, as
    # computed), for FLOP accounting: the engine reports each tick's share.
    prefill_tokens: int = 0

    @abstractmethod
    def generate(self, requests: list[SampleRequest]) -> list[Completion]:
        """One Completion per request, in the same order."""

    @abstractmethod
    def sync_adapters(self, keys: list[str]) -> None:
        """The adapters named were updated by an optimizer step."""

    @abstractmethod
    def add_adapter(self, key: str) -> None:
        """An adapter joined the bank."""

    @abstractmethod
    def remove_adapter(self, key: str) -> None:
        """An adapter left the bank."""
