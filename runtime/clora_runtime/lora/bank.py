"""The adapter bank: a fixed slot table over one wrapped base model, and per-experiment adapters.

Each adapter has its own rank, alpha, seed-determined initialisation (A Kaiming-uniform, B zero, as
PEFT does), its own AdamW and learning rate. Adding or removing one writes only its own slot in every
wrapped layer, so neighbours and the base model are never touched.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from clora_runtime.lora.layers import (
    BatchPlan,
    LoRAContext,
    MultiLoRALinear,
    SlotWeights,
    linear_module_names,
    wrap_linears,
)

# Adapter parameters are kept in float32 whatever the base dtype: AdamW on bf16 weights loses updates.
MASTER_DTYPE = torch.float32
WEIGHT_DECAY = 0.0


@dataclass
class AdapterShape:
    rank: int
    alpha: float
    dropout: float
    target_modules: str | list[str]  # "all-linear" or short names such as ["q_proj", "v_proj"]


@dataclass
class Adapter:
    """One experiment's LoRA weights and optimizer."""

    key: str
    slot: int
    shape: AdapterShape
    modules: list[str]  # dotted module paths that carry this adapter, in model order
    a: dict[str, nn.Parameter]
    b: dict[str, nn.Parameter]
    optimizer: torch.optim.AdamW

    def parameters(self) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for name in self.modules:
            out.extend((self.a[name], self.b[name]))
        return out

    @property
    def scale(self) -> float:
        return self.shape.alpha / self.shape.rank

    def weight_norm(self) -> float:
        return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in self.parameters()))


def _mark_written(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    torch.autograd.graph.increment_version([p for group in optimizer.param_groups for p in group["params"]])


class SlotsFull(Exception):
    """No free adapter slot."""


class AdapterBank:
    """Slot table plus adapters for one base model."""

    def __init__(
        self,
        model: nn.Module,
        max_adapters: int,
        max_rank: int,
        base_model_name: str = "",
        fused_adamw: bool = False,
    ) -> None:
        self.model = model
        self.fused_adamw = fused_adamw  # one AdamW kernel per adapter (CUDA); per-tensor loops elsewhere
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.base_model_name = base_model_name
        self.context = LoRAContext()
        self.all_linear = linear_module_names(model)
        wrap_linears(model, self.all_linear, max_adapters, self.context)
        self.layers: dict[str, MultiLoRALinear] = {n: model.get_submodule(n) for n in self.all_linear}
        self.adapters: dict[str, Adapter] = {}
        self.slot_keys: list[str | None] = [None] * max_adapters
        # One batch through the shared context at a time. add/remove may run on another thread than
        # the batches (the engine serialises them): they only write slots no running plan names.
        self._plan_lock = threading.Lock()

    @property
    def free_slots(self) -> int:
        return sum(1 for k in self.slot_keys if k is None)

    def resolve_targets(self, target_modules: str | list[str]) -> list[str]:
        """Module paths for 'all-linear' or a list of short names; ValueError names what matched nothing."""
        if target_modules == "all-linear":
            return list(self.all_linear)
        wanted = list(target_modules)
        chosen = [n for n in self.all_linear if n.rsplit(".", 1)[-1] in wanted or n in wanted]
        missing = [w for w in wanted if not any(n.rsplit(".", 1)[-1] == w or n == w for n in chosen)]
        if missing:
            known = sorted({n.rsplit(".", 1)[-1] for n in self.all_linear})
            raise ValueError(
                f"spec.lora.targetModules: {missing} match no linear layer of this model (known: {known})"
            )
        return chosen

    def add(self, key: str, shape: AdapterShape, seed: int, learning_rate: float) -> Adapter:
        """A fresh adapter in a free slot; its initialisation depends only on (shape, seed)."""
        if key in self.adapters:
            raise ValueError(f"adapter {key} already in the bank")
        if shape.rank > self.max_rank:
            raise ValueError(f"spec.lora.rank: {shape.rank} is above this runtime's maxRank {self.max_rank}")
        modules = self.resolve_targets(shape.target_modules)
        if None not in self.slot_keys:
            raise SlotsFull(f"all {self.max_adapters} adapter slots are taken")
        slot = self.slot_keys.index(None)
        device = next(self.model.parameters()).device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        a: dict[str, nn.Parameter] = {}
        b: dict[str, nn.Parameter] = {}
        for name in modules:
            layer = self.layers[name]
            a_init = torch.empty(shape.rank, layer.in_features, dtype=MASTER_DTYPE)
            # PEFT's init: kaiming_uniform_(a=sqrt(5)) for A, zeros for B (the adapter starts as a no-op)
            nn.init.kaiming_uniform_(a_init, a=math.sqrt(5), generator=gen)
            a[name] = nn.Parameter(a_init.to(device))
            b[name] = nn.Parameter(
                torch.zeros(layer.out_features, shape.rank, dtype=MASTER_DTYPE, device=device)
            )
        params = [p for name in modules for p in (a[name], b[name])]
        optimizer = torch.optim.AdamW(
            params,
            lr=learning_rate,
            weight_decay=WEIGHT_DECAY,
            **({"fused": True} if self.fused_adamw else {"foreach": False}),
        )
        # A fused AdamW writes the parameters without moving their version counters, which tell the
        # layers' compute-dtype copies (and the vLLM sampler) that the weights changed: move them.
        optimizer.register_step_post_hook(_mark_written)
        adapter = Adapter(key=key, slot=slot, shape=shape, modules=modules, a=a, b=b, optimizer=optimizer)
        for name in modules:
            self.layers[name].set_lora(
                slot, SlotWeights(a=a[name], b=b[name], scale=adapter.scale, dropout=shape.dropout)
            )
        self.slot_keys[slot] = key
        self.adapters[key] = adapter
        return adapter

    def remove(self, key: str) -> None:
        adapter = self.adapters.pop(key)
        for name in adapter.modules:
            self.layers[name].reset_lora(adapter.slot)
        self.slot_keys[adapter.slot] = None

    @contextmanager
    def plan(self, plan: BatchPlan | None) -> Iterator[BatchPlan | None]:
        """Run model forwards with this plan (rows -> slots); None means the base model alone."""
        with self._plan_lock:
            outer = self.context.plan
            self.context.plan = plan
            try:
                yield plan
            finally:
                self.context.plan = outer

    def refresh(self, keys: list[str]) -> None:
        """Bring the compute-dtype copies of these adapters' weights up to date now (after an optimizer
        step), so the next sampling pass does not pay for it; a no-grad forward would otherwise do it
        on first use."""
        for key in keys:
            adapter = self.adapters.get(key)
            if adapter is not None:
                for name in adapter.modules:
                    self.layers[name].compute_copies()

    def set_plan(self, plan: BatchPlan | None) -> None:
        """Swap the plan inside an active `plan()` block (a decode batch that lost finished rows)."""
        self.context.plan = plan

    # ---- PEFT format -------------------------------------------------------------------------------

    def peft_state_dict(self, key: str, dtype: torch.dtype = MASTER_DTYPE) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's names, on the CPU, in `dtype` (checkpoints keep the float32
        master weights; a serving copy such as vLLM's takes the base model's dtype)."""
        adapter = self.adapters[key]
        out: dict[str, torch.Tensor] = {}
        for name in adapter.modules:
            prefix = f"base_model.model.{name}"
            out[f"{prefix}.lora_A.weight"] = adapter.a[name].detach().to("cpu", dtype).contiguous()
            out[f"{prefix}.lora_B.weight"] = adapter.b[name].detach().to("cpu", dtype).contiguous()
        return out

    def peft_config(self, key: str) -> dict[str, object]:
        adapter = self.adapters[key]
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model_name,
            "r": adapter.shape.rank,
            "lora_alpha": adapter.shape.alpha,
            "lora_dropout": adapter.shape.dropout,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in adapter.modules}),
            "bias": "none",
            "fan_in_fan_out": False,
            "use_rslora": False,
            "init_lora_weights": True,
            "inference_mode": True,
            "modules_to_save": None,
        }

    def export_peft(self, key: str, directory: str | Path, dtype: torch.dtype = MASTER_DTYPE) -> Path:
        """Write adapter_model.safetensors + adapter_config.json, loadable by PEFT and vLLM."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            self.peft_state_dict(key, dtype),
            str(directory / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        (directory / "adapter_config.json").write_text(json.dumps(self.peft_config(key), indent=2) + "\n")
        return directory

    def load_peft_weights(self, key: str, directory: str | Path) -> None:
        """Copy weights from a PEFT adapter folder (same shape) into an adapter of the bank."""
        from safetensors.torch import load_file

        adapter = self.adapters[key]
        tensors = load_file(str(Path(directory) / "adapter_model.safetensors"))
        with torch.no_grad():
            for name in adapter.modules:
                prefix = f"base_model.model.{name}"
                adapter.a[name].copy_(tensors[f"{prefix}.lora_A.weight"])
                adapter.b[name].copy_(tensors[f"{prefix}.lora_B.weight"])
