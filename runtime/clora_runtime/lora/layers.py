"""A multi-LoRA linear layer: one frozen nn.Linear, a fixed table of adapter slots, and rows of one batch
that belong to different adapters.

As a plain loop, for a batch x of shape [rows, tokens, in] and a plan of row segments:

    y = x @ W.T (+ bias)                                  # the base matmul, once for the whole batch
    for (slot, start, end) in plan.segments:              # rows [start, end) all use adapter `slot`
        if slot >= 0 and slots[slot] is set:
            y[start:end] += scale[slot] * (drop(x[start:end]) @ A[slot].T) @ B[slot].T

Segments, not gather + bmm: the engine orders every batch so that each adapter's rows are contiguous,
so a segment is a view (no copy), each adapter multiplies by its own rank (no padding to max_rank),
and autograd keeps only [rows, tokens, rank] per segment instead of a gathered [rows, max_rank, in]
copy of A per row. Measured on the 2-core CPU with smollm2's 576 -> 1536 projection, 1 thread, best
of 30: decode (64 rows, 1 token) segments 1.3-1.5 ms vs gather + bmm 2.2-2.5 ms for 1, 4 and 8
adapters (base matmul alone 1.1-1.2 ms); training forward + backward (16 rows x 64 tokens) 45-47 ms
vs 42-44 ms, equal within noise. A grouped-matmul kernel (punica/SGMV) would pay off on a GPU with
many small segments; on the CPU the loop of a handful of segments costs nearly nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SlotWeights:
    """One adapter's weights for one layer."""

    a: torch.Tensor  # [rank, in], trainable
    b: torch.Tensor  # [out, rank], trainable
    scale: float  # alpha / rank
    dropout: float


@dataclass
class BatchPlan:
    """Which rows of the current batch use which adapter slot; shared by every layer of the model.

    segments cover the batch's rows in order; slot -1 means the base model alone (adapter off).
    """

    segments: list[tuple[int, int, int]]
    training: bool = False
    # per-slot generators for LoRA dropout, so an adapter's dropout masks do not depend on neighbours
    dropout_generators: dict[int, torch.Generator] = field(default_factory=dict)

    @classmethod
    def from_slots(cls, row_slots: list[int], training: bool = False) -> BatchPlan:
        """Segments of equal consecutive slots, e.g. [0, 0, 2, -1] -> (0,0,2), (2,2,3), (-1,3,4)."""
        segments: list[tuple[int, int, int]] = []
        start = 0
        for i in range(1, len(row_slots) + 1):
            if i == len(row_slots) or row_slots[i] != row_slots[start]:
                segments.append((row_slots[start], start, i))
                start = i
        return cls(segments=segments, training=training)

    def select(self, rows: list[int]) -> BatchPlan:
        """The plan for a subset of rows (kept in order), e.g. after finished rows leave a decode batch."""
        slot_of: list[int] = []
        for slot, start, end in self.segments:
            slot_of.extend([slot] * (end - start))
        plan = BatchPlan.from_slots([slot_of[r] for r in rows], self.training)
        plan.dropout_generators = self.dropout_generators
        return plan


class LoRAContext:
    """Holds the plan of the batch being computed; every MultiLoRALinear of a model reads the same one."""

    def __init__(self) -> None:
        self.plan: BatchPlan | None = None


class MultiLoRALinear(nn.Module):
    """Wraps one nn.Linear with `max_adapters` fixed slots (vLLM's layer shape: set_lora / reset_lora)."""

    def __init__(self, base: nn.Linear, max_adapters: int, context: LoRAContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.slots: list[SlotWeights | None] = [None] * max_adapters

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some model code reads .weight (dtype / device checks)
        return self.base.weight

    def set_lora(self, slot: int, weights: SlotWeights) -> None:
        self.slots[slot] = weights

    def reset_lora(self, slot: int) -> None:
        self.slots[slot] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = self.context.plan
        if plan is None:
            return y
        active = [(s, a, b) for (s, a, b) in plan.segments if s >= 0 and self.slots[s] is not None]
        if not active:
            return y
        if len(plan.segments) == 1:
            return y + self._delta(x, active[0][0], plan)
        if not torch.is_grad_enabled():
            # Sampling: in place, segment by segment, with no copy of the whole output.
            for slot, start, end in active:
                y[start:end] += self._delta(x[start:end], slot, plan)
            return y
        # Training: split and concatenate. The backward of slicing x per segment would build a
        # zero-filled gradient of the whole input for every segment and sum them (time growing with
        # the number of adapters); the backward of split is one concatenation.
        parts = x.split([end - start for _, start, end in plan.segments])
        deltas = [
            self._delta(part, slot, plan)
            if slot >= 0 and self.slots[slot] is not None
            else part.new_zeros((*part.shape[:-1], self.out_features))
            for part, (slot, _, _) in zip(parts, plan.segments, strict=True)
        ]
        return y + torch.cat(deltas)

    def _delta(self, x: torch.Tensor, slot: int, plan: BatchPlan) -> torch.Tensor:
        w = self.slots[slot]
        assert w is not None
        a = w.a.to(x.dtype)
        b = w.b.to(x.dtype)
        if plan.training and w.dropout > 0:
            gen = plan.dropout_generators.get(slot)
            keep = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32) >= w.dropout
            x = x * keep.to(x.dtype) / (1.0 - w.dropout)
        return ((x @ a.T) * w.scale) @ b.T  # scaled on the rank side: rank columns, not out_features


def linear_module_names(model: nn.Module) -> list[str]:
    """Every nn.Linear of the decoder (the LM head excluded), as dotted paths, in model order."""
    decoder = model.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    return [
        f"{prefix}.{name}" if prefix else name
        for name, module in decoder.named_modules()
        if isinstance(module, nn.Linear)
    ]


def wrap_linears(model: nn.Module, names: list[str], max_adapters: int, context: LoRAContext) -> None:
    """Replace each named nn.Linear in place by a MultiLoRALinear around it."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, MultiLoRALinear):
            continue
        setattr(parent, child, MultiLoRALinear(base, max_adapters, context))
