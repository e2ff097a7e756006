"""Samplers (torch built in, vLLM) behind one ABC; picked by name and imported lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clora_runtime.sampling.base import Sampler


def sampler_class(name: str) -> type[Sampler]:
    """The Sampler class for a name; the module is imported only when asked for (vLLM is heavy)."""
    if name == "torch":
        from clora_runtime.sampling.torch_sampler import TorchSampler

        return TorchSampler
    if name == "vllm":
        from clora_runtime.sampling.vllm_sampler import VLLMSampler  # type: ignore[import-not-found]

        return VLLMSampler
    raise ValueError(f"sampler: unknown sampler {name!r} (torch | vllm)")
