"""A multi-LoRA linear layer: one frozen nn.Linear, a fixed table of adapter slots, and rows of one batch
that belong to different adapters.

As a plain loop, for a batch x of shape [rows, tokens, in] and a plan of row segments:

    y = x @ W.T (+ bias)                                  # the base matmul, once for the whole batch
    for (slot, start, end) in plan.segments:              # rows [start, end) all use adapter `slot`
        if slot >= 0 and slots[slot] is set:
            y[start:end] += scale[slot] * (drop(x[start:end]) @ A[slot].T) @ B[slot].T

Training (gradients on) runs exactly that loop on the float32 master weights, so gradients flow to
them: segments, not gather + bmm, because the engine orders every batch so that each adapter's rows
are contiguous, a segment is a view (no copy), each adapter multiplies by its own rank, and autograd
keeps only [rows, tokens, rank] per segment. Measured on the 2-core CPU with smollm2's 576 -> 1536
projection, 1 thread, best of 30: training forward + backward (16 rows x 64 tokens) segments 45-47 ms
vs gather + bmm 42-44 ms, equal within noise.

Without gradients (sampling, the trainer's log-prob passes) the layer reads compute-dtype copies of
the adapters (bf16 on a GPU; never a cast per call), stacked per layer: A as [adapters, max rank, in],
B scaled by alpha / rank as [adapters, out, max rank], zero-padded to the largest rank. They are
rebuilt when an adapter joins or leaves, and refreshed slot by slot when a weight's in-place version
counter moved (an optimizer step, a checkpoint load; the bank moves the counters after every step of
a fused AdamW, which does not); the engine refreshes them after every step (TorchSampler.sync_adapters),
and every no-grad call compares the counters (a sum of ints), so no caller ever computes with stale
copies. Each call then takes one of two paths:

- grouped: the rows are gathered into [adapters, rows of the largest group, in] (padding repeats a
  row), two batched matmuls apply every adapter at once, and one gather puts the deltas back in row
  order: 8 operators per layer, the base matmul included, whatever the number of adapters (the
  index tensors are built once per plan, on the device, and shared by every layer);
- segment loop: 5 operators per adapter segment, no padded work.

The grouped path is taken when the multiply-adds its padding wastes cost less than the operators the
loop would add (OPERATOR_COST_MACS per device), so decode steps (one token a row, operators dominate)
go grouped, and a prefill whose groups are very uneven goes the exact way.

Measured on the 2-core CPU, 1 thread, float32, rank 8 (rank 32 in brackets), ms per layer call, best
of 4 x 20 (x 10 for prefill), rows spread evenly over the adapters; "as before" is the old loop less
its per-call casts (no-ops in float32). Operator counts (`clora bench ops`, tiny, 8 adapters): 97
top-level operators per wrapped linear per decode step before, 8 now.

    576 -> 1536, decode 64 x 1      1 adapter                8 adapters
      base matmul alone             1.49 (1.26)              1.70 (1.40)
      segment loop (as before)      1.91 (1.60)              2.08 (2.14)
      concatenated A, row mask, B   1.68 (1.62)              2.00 (2.58)
      grouped (padded bmm)          1.86 (1.51)              1.80 (1.92)
    576 -> 1536, prefill 16 x 64
      base matmul alone             20.1 (22.5)              24.0 (23.5)
      segment loop (as before)      22.0 (25.4)              21.7 (32.1)
      concatenated A, row mask, B   22.0 (25.0)              23.4 (42.2)
      grouped (padded bmm)          23.1 (30.9)              22.1 (26.7)
    64 -> 128 (tiny), decode 64 x 1
      segment loop (as before)      0.071 (0.097)            0.345 (0.391)
      concatenated A, row mask, B   0.052 (0.060)            0.063 (0.125)
      grouped (padded bmm)          0.060 (0.075)            0.066 (0.080)
    64 -> 128 (tiny), prefill 16 x 64
      segment loop (as before)      0.448 (0.602)            0.648 (0.756)
      concatenated A, row mask, B   0.441 (0.483)            0.576 (1.405)
      grouped (padded bmm)          0.513 (0.503)            0.426 (0.568)

Why grouped: it is as fast as the segment loop or faster at 8 adapters in every case measured, and
its operator count does not grow with the adapters. The concatenated-A variant (x @ [A1; ...; A8].T,
a per-row block mask, @ [B1 ... B8].T) needs as few operators but multiplies every row by every
adapter (8x the LoRA work at 8 adapters: 1.4 ms vs 0.57 ms on tiny's prefill at rank 32), and one
adapter's non-finite weights would reach every row through the zero blocks (0 x NaN); the grouped
bmm never mixes rows of different adapters. A grouped-matmul kernel (punica/SGMV) would avoid the
padding; none runs on a CPU, and the padding stays small when the groups are even.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# Multiply-adds one more operator call costs in time, per device type; the grouped path is taken when
# its padding wastes fewer than the operators it saves (SEGMENT_OPERATORS a segment) are worth. A GPU
# kernel launch (~5 us) is the time of ~10^8 multiply-adds; a CPU operator call (~5 us of dispatch) of
# ~10^5 on one core, as the measurements in the module docstring show.
OPERATOR_COST_MACS = {"cuda": 100_000_000, "cpu": 100_000}
SEGMENT_OPERATORS = 5  # two slices, two matmuls and an add per segment in the no-grad loop
GROUPED_OPERATORS = 7  # the grouped path's operators beyond the base matmul: 2 gathers, 2 views, 2 bmm, add


def host_to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait for the device: pinned and non-blocking
    on a GPU, where a copy from pageable memory synchronises the stream."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


@dataclass
class SlotWeights:
    """One adapter's weights for one layer."""

    a: torch.Tensor  # [rank, in], trainable
    b: torch.Tensor  # [out, rank], trainable
    scale: float  # alpha / rank
    dropout: float


Layout = tuple[tuple[int, int], ...]  # (slot, rank) of each adapter a layer holds, in slot order


@dataclass
class GroupIndex:
    """Where one plan's rows go in a layout's padded groups; on the device, built once per plan."""

    gather: torch.Tensor  # [groups * width]: the row each padded position reads (padding repeats one)
    inverse: torch.Tensor  # [rows]: each row's padded position (0 for rows without an adapter here)
    covered: torch.Tensor | None  # [rows] bool: rows with an adapter in the layout; None when all are
    width: int  # rows per group: the largest group's


@dataclass
class LayoutCost:
    """A plan's rows over one layout, counted on the host: what the grouped path pads."""

    exact: int  # sum over the rows with an adapter here of its rank
    padded: int  # groups x largest group x largest rank
    segments: int  # segments with an adapter here: what the loop would run
    index: GroupIndex | None = None


@dataclass
class BatchPlan:
    """Which rows of the current batch use which adapter slot; shared by every layer of the model.

    segments cover the batch's rows in order; slot -1 means the base model alone (adapter off).
    """

    segments: list[tuple[int, int, int]]
    training: bool = False
    # per-slot generators for LoRA dropout, so an adapter's dropout masks do not depend on neighbours
    dropout_generators: dict[int, torch.Generator] = field(default_factory=dict)
    # per layout, built by the first layer that needs it and shared by the others
    layouts: dict[Layout, LayoutCost] = field(default_factory=dict, repr=False, compare=False)

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

    def cost(self, layout: Layout) -> LayoutCost:
        known = self.layouts.get(layout)
        if known is None:
            rank = dict(layout)
            rows = dict.fromkeys(rank, 0)
            segments = 0
            for slot, start, end in self.segments:
                if slot in rows:
                    rows[slot] += end - start
                    segments += 1
            known = LayoutCost(
                exact=sum(rows[s] * rank[s] for s in rank),
                padded=len(layout) * max(rows.values(), default=0) * max(rank.values(), default=0),
                segments=segments,
            )
            self.layouts[layout] = known
        return known

    def group_index(self, layout: Layout, device: torch.device) -> GroupIndex:
        cost = self.cost(layout)
        if cost.index is None:
            group_of = {slot: g for g, (slot, _) in enumerate(layout)}
            members: list[list[int]] = [[] for _ in layout]
            for slot, start, end in self.segments:
                if slot in group_of:
                    members[group_of[slot]].extend(range(start, end))
            width = max(len(m) for m in members)
            gather: list[int] = []
            for rows in members:
                gather.extend(rows + [rows[0] if rows else 0] * (width - len(rows)))
            inverse: list[int] = []
            covered: list[bool] = []
            placed = [0] * len(layout)
            for slot, start, end in self.segments:
                g = group_of.get(slot)
                for _ in range(start, end):
                    covered.append(g is not None)
                    if g is None:
                        inverse.append(0)
                    else:
                        inverse.append(g * width + placed[g])
                        placed[g] += 1
            cost.index = GroupIndex(
                gather=host_to_device(torch.tensor(gather), device),
                inverse=host_to_device(torch.tensor(inverse), device),
                covered=None if all(covered) else host_to_device(torch.tensor(covered), device),
                width=width,
            )
        return cost.index


class LoRAContext:
    """Holds the plan of the batch being computed; every MultiLoRALinear of a model reads the same one."""

    def __init__(self) -> None:
        self.plan: BatchPlan | None = None


@dataclass
class _Stacked:
    """A layer's adapters in the compute dtype, stacked for the no-grad paths."""

    layout: Layout
    dtype: torch.dtype
    epoch: int  # the layer's slot epoch they were built at
    versions: list[tuple[int, int]]  # each slot's (A, B) version counters when copied
    version_total: int  # their sum, compared on every call
    a: torch.Tensor  # [groups, max rank, in], zero-padded
    b: torch.Tensor  # [groups, out, max rank], scaled by alpha / rank, zero-padded
    a_t: torch.Tensor  # a.transpose(1, 2) and b.transpose(1, 2): views made once, not per call
    b_t: torch.Tensor
    # per group: A.T [in, rank] and (scale B).T [rank, out] views, for the segment loop
    segment: dict[int, tuple[torch.Tensor, torch.Tensor]]


class MultiLoRALinear(nn.Module):
    """Wraps one nn.Linear with `max_adapters` fixed slots (vLLM's layer shape: set_lora / reset_lora)."""

    def __init__(self, base: nn.Linear, max_adapters: int, context: LoRAContext) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.slots: list[SlotWeights | None] = [None] * max_adapters
        self._present: list[tuple[int, SlotWeights]] = []
        self._epoch = 0  # bumped whenever a slot is set or reset: the stacked copies' layout changed
        self._stacked: _Stacked | None = None

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
        self._slots_changed()

    def reset_lora(self, slot: int) -> None:
        self.slots[slot] = None
        self._slots_changed()

    def _slots_changed(self) -> None:
        self._present = [(s, w) for s, w in enumerate(self.slots) if w is not None]
        self._epoch += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        plan = self.context.plan
        if plan is None or not self._present:
            return y
        if torch.is_grad_enabled():
            return self._train_forward(x, y, plan)
        stacked = self.compute_copies(x.dtype)
        cost = plan.cost(stacked.layout)
        if cost.exact == 0:
            return y
        # the grouped path's padded multiply-adds against the operators the segment loop would add
        per_row = x.numel() // max(x.shape[0], 1) // self.in_features * (self.in_features + self.out_features)
        saved = SEGMENT_OPERATORS * cost.segments - GROUPED_OPERATORS
        if (cost.padded - cost.exact) * per_row <= saved * OPERATOR_COST_MACS.get(x.device.type, 100_000):
            return self._grouped(x, y, plan, stacked)
        rows = x.shape[0]
        for slot, start, end in plan.segments:
            views = stacked.segment.get(slot)
            if views is None:
                continue
            a_t, b_t = views
            if start == 0 and end == rows:  # one adapter for the whole batch: no slicing
                y.add_((x @ a_t) @ b_t)
            else:
                y[start:end].add_((x[start:end] @ a_t) @ b_t)
        return y

    def _grouped(self, x: torch.Tensor, y: torch.Tensor, plan: BatchPlan, stacked: _Stacked) -> torch.Tensor:
        index = plan.group_index(stacked.layout, x.device)
        groups = stacked.a.shape[0]
        xg = x.index_select(0, index.gather).view(groups, -1, self.in_features)
        out = torch.bmm(torch.bmm(xg, stacked.a_t), stacked.b_t)
        delta = out.view(groups * index.width, *x.shape[1:-1], self.out_features).index_select(
            0, index.inverse
        )
        if index.covered is not None:  # rows of other adapters or none: where, not a multiply (0 x NaN)
            covered = index.covered.view(-1, *([1] * (x.dim() - 1)))
            delta = torch.where(covered, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
        return y.add_(delta)

    def _train_forward(self, x: torch.Tensor, y: torch.Tensor, plan: BatchPlan) -> torch.Tensor:
        """The segment loop on the float32 master weights, so gradients reach them."""
        active = [(s, a, b) for (s, a, b) in plan.segments if s >= 0 and self.slots[s] is not None]
        if not active:
            return y
        if len(plan.segments) == 1:
            return y + self._delta(x, active[0][0], plan)
        # Split and concatenate. The backward of slicing x per segment would build a zero-filled
        # gradient of the whole input for every segment and sum them (time growing with the number of
        # adapters); the backward of split is one concatenation.
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

    # ---- compute-dtype copies ------------------------------------------------------------------------

    def compute_copies(self, dtype: torch.dtype | None = None) -> _Stacked:
        """The stacked compute-dtype copies, rebuilt or refreshed when stale (cheap when fresh: a sum of
        version counters). Needs at least one adapter."""
        dtype = dtype or (self._stacked.dtype if self._stacked is not None else self.base.weight.dtype)
        stacked = self._stacked
        if stacked is None or stacked.dtype != dtype or stacked.epoch != self._epoch:
            stacked = self._stacked = self._build(dtype)
        elif stacked.version_total != sum(w.a._version + w.b._version for _, w in self._present):
            self._refresh(stacked)
        return stacked

    @torch.no_grad()
    def _build(self, dtype: torch.dtype) -> _Stacked:
        present = self._present
        first = present[0][1].a
        rank = max(w.a.shape[0] for _, w in present)
        a = torch.zeros(len(present), rank, self.in_features, dtype=dtype, device=first.device)
        b = torch.zeros(len(present), self.out_features, rank, dtype=dtype, device=first.device)
        segment = {}
        for g, (slot, w) in enumerate(present):
            r = w.a.shape[0]
            segment[slot] = (a[g, :r].T, b[g, :, :r].T)
        stacked = _Stacked(
            layout=tuple((s, w.a.shape[0]) for s, w in present),
            dtype=dtype,
            epoch=self._epoch,
            versions=[(-1, -1)] * len(present),
            version_total=-1,
            a=a,
            b=b,
            a_t=a.transpose(1, 2),
            b_t=b.transpose(1, 2),
            segment=segment,
        )
        self._refresh(stacked)
        return stacked

    @torch.no_grad()
    def _refresh(self, stacked: _Stacked) -> None:
        """Copy the slots whose weights moved since they were copied."""
        for g, (_, w) in enumerate(self._present):
            now = (w.a._version, w.b._version)
            if now != stacked.versions[g]:
                r = w.a.shape[0]
                stacked.a[g, :r].copy_(w.a)
                stacked.b[g, :, :r].copy_(w.b * w.scale)  # scaled in float32, rounded once
                stacked.versions[g] = now
        stacked.version_total = sum(a + b for a, b in stacked.versions)


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
