"""`clora bench ops`: operator calls per decode step of the torch sampler and per training micro-batch,
at 1 and N adapters, counted with the torch profiler (CPU activities).

Counts, not times: the number of operators a step dispatches is what a GPU cannot hide (each is a
kernel launch and a trip through the dispatcher), it is deterministic, and it can be measured on a
CPU. What is counted: *top-level aten operators*, events named `aten::...` with no `aten::` event
above them, i.e. one per call into the operator library (from Python, or from the autograd engine in
a backward); the operators a composite op runs inside itself (aten::matmul -> aten::mm) are not
counted again. The total of every recorded aten event is kept beside it in the JSON (`allAten`).

- Decode step: a real TorchSampler over a real AdapterBank holding N adapters (rank --rank, every
  linear layer), --rows rows spread evenly over them, no row stopping early. Two generates of S and 2S
  new tokens are profiled; their difference over S is one decode step (prefill and per-call work
  cancel), and the S-token generate less S decode steps is the prefill and per-call part.
- Per wrapped linear: the operators inside the MultiLoRALinear layers (the base matmul included),
  marked by forward hooks, per decode step and per layer call.
- Training micro-batch: one Trainer forward + backward over --train-rows rows of the N adapters (one
  micro-batch), between the trainer's fault hook (before a micro-batch) and the first
  before_optimizer_step hook (after its backward); the optimizer step is not counted.

Host syncs per decode step are reported too: the reads of a tensor's values by the host, which wait
for the device on a GPU. They are `aten::_local_scalar_dense` events (item(), bool(), int() of a
tensor) plus the reads that record no operator on a CPU (tolist(), numpy(), a copy to the CPU), seen
by a TorchFunctionMode.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode

from clora_runtime.bench.throughput import machine

if TYPE_CHECKING:
    from rich.table import Table

    from clora_runtime.lora.bank import AdapterBank
    from clora_runtime.models.loading import LoadedModel
    from clora_runtime.sampling.torch_sampler import TorchSampler

LORA_RANGE = "clora::lora_linear"
MICRO_BATCH_RANGE = "clora::micro_batch"
SYNC_OPS = ("aten::_local_scalar_dense",)
HOST_READS = ("tolist", "numpy", "__array__")
PROMPT_TOKENS = 12
COMPLETION_TOKENS = 8
GROUP = 4  # rows per prompt in the training micro-batch (a GRPO group)


@dataclass
class OpCount:
    """Operators of one profiled call."""

    top: int = 0  # top-level aten operators
    all_aten: int = 0  # every aten event, nested ones included
    lora_top: int = 0  # top-level aten operators inside the wrapped linear layers
    lora_calls: int = 0  # forward calls of wrapped linear layers
    syncs: int = 0  # host reads of tensor values: aten::_local_scalar_dense and HostReads
    names: Counter[str] = field(default_factory=Counter)  # top-level operators by name

    def minus(self, other: OpCount) -> OpCount:
        return OpCount(
            top=self.top - other.top,
            all_aten=self.all_aten - other.all_aten,
            lora_top=self.lora_top - other.lora_top,
            lora_calls=self.lora_calls - other.lora_calls,
            syncs=self.syncs - other.syncs,
            names=Counter({k: v for k, v in (self.names - other.names).items() if v > 0}),
        )


def _is_aten(name: str) -> bool:
    return name.startswith("aten::")


def _ancestors(event: Any) -> Iterator[Any]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def count_ops(events: list[Any], within: str | None = None) -> OpCount:
    """Count the profiler's events; with `within`, only those under a range of that name."""
    out = OpCount()
    for event in events:
        ancestors = [a.name for a in _ancestors(event)]
        if within is not None and within not in ancestors:
            continue
        if event.name == LORA_RANGE:
            out.lora_calls += 1
        if not _is_aten(event.name):
            continue
        out.all_aten += 1
        if event.name in SYNC_OPS:
            out.syncs += 1
        if any(_is_aten(a) for a in ancestors):
            continue
        out.top += 1
        out.names[event.name] += 1
        if LORA_RANGE in ancestors:
            out.lora_top += 1
    return out


@contextmanager
def _marked_lora_layers(bank: AdapterBank) -> Iterator[None]:
    """A profiler range around every wrapped linear's forward (hooks only while benchmarking)."""
    open_ranges: list[Any] = []

    def enter(module: torch.nn.Module, args: Any) -> None:
        record = torch.autograd.profiler.record_function(LORA_RANGE)
        record.__enter__()
        open_ranges.append(record)

    def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
        open_ranges.pop().__exit__(None, None, None)

    handles = []
    for layer in bank.layers.values():
        handles.append(layer.register_forward_pre_hook(enter))
        handles.append(layer.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class HostReads(TorchFunctionMode):
    """Counts the host reads of tensor values that record no operator on a CPU (tolist, numpy) and
    copies of device tensors to the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (
            name in ("cpu", "to")
            and isinstance(args[0], torch.Tensor)
            and args[0].device.type != "cpu"
            and _to_cpu(args[1:], kwargs or {}, name)
        ):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _to_cpu(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> bool:
    if name == "cpu":
        return True
    target = kwargs.get("device", args[0] if args else None)
    return str(target).startswith("cpu")


def profile(call: Callable[[], object], bank: AdapterBank, within: str | None = None) -> OpCount:
    """Run `call` under the profiler (and a HostReads mode) and count what it did."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    reads = HostReads()
    with _marked_lora_layers(bank), torch_profile(activities=[ProfilerActivity.CPU]) as prof, reads:
        call()
    count = count_ops(list(prof.events()), within)
    if within is None:
        count.syncs += reads.count
    return count


# ---- the workloads -------------------------------------------------------------------------------


def _fill_bank(bank: AdapterBank, n: int, rank: int) -> list[str]:
    """Exactly n adapters in the bank (keys bench/a0...), with non-zero B so they change the outputs."""
    from clora_runtime.lora.bank import AdapterShape

    keys = [f"bench/a{i}" for i in range(n)]
    for key in list(bank.adapters):
        if key not in keys:
            bank.remove(key)
    for i, key in enumerate(keys):
        if key not in bank.adapters:
            adapter = bank.add(key, AdapterShape(rank, 2.0 * rank, 0.0, "all-linear"), 100 + i, 1e-4)
            gen = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for b in adapter.b.values():
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.02)
    return keys


def _prompt(index: int, length: int, vocab: int) -> list[int]:
    gen = torch.Generator().manual_seed(10_000 + index)
    return [1, *torch.randint(2, min(vocab, 40_000), (length - 1,), generator=gen).tolist()]


def decode_counts(sampler: TorchSampler, keys: list[str], rows: int, steps: int) -> dict[str, Any]:
    """Operators per decode step (and the prefill part) of `rows` rows spread over `keys`."""
    from clora_runtime.sampling.base import SampleRequest

    vocab = int(sampler.base.model.config.vocab_size)
    bank = sampler.bank

    def requests(new_tokens: int, seed_offset: int) -> list[SampleRequest]:
        return [
            SampleRequest(
                keys[i % len(keys)], _prompt(i, PROMPT_TOKENS, vocab), new_tokens, 1.0, seed_offset + i
            )
            for i in range(rows)
        ]

    # Seeds with which no row draws an EOS, so every row runs every step (deterministic: fixed seeds).
    offset = next(
        (
            o
            for o in range(0, 20_000, 1000)
            if not any(c.finished for c in sampler.generate(requests(2 * steps, o)))
        ),
        None,
    )
    if offset is None:
        raise RuntimeError("every seed set tried draws an EOS; use fewer --rows or --steps")
    short = profile(lambda: sampler.generate(requests(steps, offset)), bank)
    long = profile(lambda: sampler.generate(requests(2 * steps, offset)), bank)
    step = long.minus(short)
    layers = len(bank.layers)
    return {
        "perDecodeStep": step.top / steps,
        "perDecodeStepAllAten": step.all_aten / steps,
        "perDecodeStepInWrappedLinears": step.lora_top / steps,
        "perWrappedLinearPerDecodeStep": step.lora_top / steps / layers,
        "hostSyncsPerDecodeStep": step.syncs / steps,
        "prefillAndCallOverhead": short.top - step.top,
        "generateTotal": {"newTokens": steps, "top": short.top, "allAten": short.all_aten},
        "topOpsPerDecodeStep": {k: v / steps for k, v in step.names.most_common(20)},
    }


def train_counts(bank: AdapterBank, keys: list[str], rows: int) -> dict[str, Any]:
    """Operators of one Trainer micro-batch forward + backward over `rows` rows spread over `keys`."""
    from clora_runtime.training.trainer import AdapterHyper, Trainer, TrainRow

    vocab = int(bank.model.config.vocab_size)
    trainer = Trainer(bank, micro_batch_tokens=1 << 20)  # one micro-batch whatever the rows
    train_rows = [
        TrainRow(
            keys[i % len(keys)],
            _prompt(i // GROUP * GROUP, PROMPT_TOKENS, vocab),
            _prompt(5000 + i, COMPLETION_TOKENS, vocab),
            advantage=1.0 if i % 2 else -1.0,
            token_weight=1.0 / COMPLETION_TOKENS,
        )
        for i in range(rows)
    ]
    train_rows.sort(key=lambda r: r.key)
    hyper = {
        k: AdapterHyper(
            slot=bank.adapters[k].slot,
            clip_low=0.2,
            clip_high=0.2,
            kl_coef=0.0,
            learning_rate=1e-4,
            dropout_seed=0,
        )
        for k in keys
    }
    open_range: list[Any] = []
    micro_batches: list[list[str]] = []

    def before_micro_batch(batch_keys: list[str]) -> None:
        micro_batches.append(batch_keys)
        record = torch.autograd.profiler.record_function(MICRO_BATCH_RANGE)
        record.__enter__()
        open_range.append(record)

    def after_backward(key: str, update: int) -> None:
        if open_range:
            open_range.pop().__exit__(None, None, None)

    trainer.fault_hook = before_micro_batch
    trainer.before_optimizer_step = after_backward
    trainer.step(train_rows, hyper)  # warm (first calls allocate and cache)
    micro_batches.clear()
    count = profile(lambda: trainer.step(train_rows, hyper), bank, within=MICRO_BATCH_RANGE)
    if len(micro_batches) != 1:
        raise RuntimeError(f"expected one training micro-batch, got {len(micro_batches)}")
    return {
        "perMicroBatch": count.top,
        "perMicroBatchAllAten": count.all_aten,
        "forwardInWrappedLinears": count.lora_top,
        "perWrappedLinearForward": count.lora_top / max(count.lora_calls, 1),
        "wrappedLinearCalls": count.lora_calls,
        "topOps": dict(count.names.most_common(20)),
    }


def build(
    model: str, device: str, dtype: str, max_adapters: int, rank: int
) -> tuple[LoadedModel, AdapterBank]:
    from clora_runtime.config import EngineConfig
    from clora_runtime.device_defaults import DeviceSizes
    from clora_runtime.lora.bank import AdapterBank
    from clora_runtime.models.loading import load_model

    base = load_model(model, device, dtype)
    config = EngineConfig(model=model, device=device, dtype=dtype)  # type: ignore[arg-type]
    sizes = DeviceSizes.resolve(config, base)
    bank = AdapterBank(base.model, max_adapters, rank, base.name, fused_adamw=sizes.fused_adamw)
    return base, bank


def ops(
    model: str = "tiny",
    adapters: list[int] | None = None,
    rows: int = 64,
    steps: int = 8,
    train_rows: int = 16,
    rank: int = 8,
    device: str = "cpu",
    dtype: str = "auto",
    sync_every: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Operator counts for each number of adapters; see the module docstring."""
    from dataclasses import replace

    from clora_runtime.config import EngineConfig
    from clora_runtime.device_defaults import DeviceSizes
    from clora_runtime.sampling.torch_sampler import TorchSampler

    if threads:
        torch.set_num_threads(threads)
    counts = adapters or [1, 8]
    base, bank = build(model, device, dtype, max(counts), rank)
    config = EngineConfig(model=model, device=device, dtype=dtype)  # type: ignore[arg-type]
    sizes = DeviceSizes.resolve(config, base)
    if sync_every is not None:
        sizes = replace(sizes, decode_sync_every=sync_every)
    sampler = TorchSampler(base, bank, config, sizes)
    by_adapters: dict[str, Any] = {}
    for n in counts:
        keys = _fill_bank(bank, n, rank)
        by_adapters[str(n)] = {
            "decode": decode_counts(sampler, keys, rows, steps),
            "train": train_counts(bank, keys, train_rows),
        }
    first, last = by_adapters[str(counts[0])], by_adapters[str(counts[-1])]
    return {
        "config": {
            "model": model,
            "device": str(base.device),
            "dtype": str(base.dtype).removeprefix("torch."),
            "adapters": counts,
            "rank": rank,
            "rows": rows,
            "decodeSteps": steps,
            "trainRows": train_rows,
            "promptTokens": PROMPT_TOKENS,
            "completionTokens": COMPLETION_TOKENS,
            "wrappedLinears": len(bank.layers),
            "syncEvery": sampler.sync_every,
            "counting": "top-level aten operators (no aten:: ancestor), torch.profiler CPU activities",
        },
        "machine": machine(),
        "adapters": by_adapters,
        # operators a decode step gains from the first to the last number of adapters
        "decodeStepGrowth": last["decode"]["perDecodeStep"] - first["decode"]["perDecodeStep"],
    }


def table(result: dict[str, Any]) -> Table:
    from rich.table import Table

    c = result["config"]
    t = Table(
        title=f"operator calls on {c['model']} ({c['dtype']}, {c['wrappedLinears']} wrapped linears,"
        f" {c['rows']} decode rows, {c['trainRows']} train rows, rank {c['rank']}; top-level aten ops)"
    )
    for col in (
        "adapters",
        "per decode step",
        "in wrapped linears",
        "per wrapped linear",
        "syncs / step",
        "per train micro-batch",
        "per wrapped linear (train fwd)",
    ):
        t.add_column(col, justify="right")
    for n, v in result["adapters"].items():
        d, tr = v["decode"], v["train"]
        t.add_row(
            n,
            f"{d['perDecodeStep']:.1f}",
            f"{d['perDecodeStepInWrappedLinears']:.1f}",
            f"{d['perWrappedLinearPerDecodeStep']:.2f}",
            f"{d['hostSyncsPerDecodeStep']:.2f}",
            f"{tr['perMicroBatch']}",
            f"{tr['perWrappedLinearForward']:.2f}",
        )
    return t
