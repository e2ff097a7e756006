"""The machine's arithmetic limit: a measured dense matmul rate, and the model FLOPs of a tick's phases.

Model FLOPs are counted from the model's shapes, per token position actually run (padding excluded):

- P_body: weights of every linear layer of the decoder (attention and MLP projections);
  P_head: the LM head (vocab x hidden); P_lora: an adapter's A and B (r x (in + out) per target layer).
- Sampling: 2 (P_body + P_lora) per prefilled or generated token, plus 2 P_head per generated token
  (the head runs on the last position only).
- Training, per update: forward 2 (P_body + P_lora) per position and 2 P_head per completion token;
  backward 2 P_body (activation gradients only: the base is frozen) + 4 P_lora (activation and
  weight gradients) per position, and 2 P_head per completion token. The KL reference, when used, is
  one more forward with the adapters off: 2 P_body per position, 2 P_head per completion token.
- Left out: attention scores (4 x context x attention width per token and layer, a few percent at
  the contexts of these runs), norms, activations and the softmax: a count of matmul work, as MFU is
  in the literature (PaLM, appendix B).

MFU = model FLOPs / seconds / measured matmul FLOP/s: the share of the machine's dense matmul rate
that the phase turns into model arithmetic.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}  # large enough to reach the device's peak, small enough to be quick


@dataclass(frozen=True)
class ModelShape:
    body_params: int
    head_params: int
    lora_params: float  # mean over the run's adapters

    def as_json(self) -> dict[str, Any]:
        return {
            "bodyParams": self.body_params,
            "headParams": self.head_params,
            "loraParams": self.lora_params,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelShape:
        return cls(d["bodyParams"], d["headParams"], d["loraParams"])


def model_shape(model: Any, adapter_params: list[int]) -> ModelShape:
    """Count P_body, P_head from a (possibly LoRA-wrapped) causal LM; P_lora from the adapters' sizes."""
    from torch import nn

    body = sum(m.weight.numel() for m in model.get_decoder().modules() if isinstance(m, nn.Linear))
    head = model.get_output_embeddings().weight.numel()
    lora = sum(adapter_params) / len(adapter_params) if adapter_params else 0.0
    return ModelShape(body, head, lora)


def sample_flops(shape: ModelShape, prefilled: int, generated: int) -> float:
    return (
        2 * (shape.body_params + shape.lora_params) * (prefilled + generated)
        + 2 * shape.head_params * generated
    )


def train_flops(shape: ModelShape, counts: dict[str, int]) -> float:
    """counts: body, head, referenceBody, referenceHead token positions (see TokenCounts)."""
    grad = (4 * shape.body_params + 6 * shape.lora_params) * counts["body"] + 4 * shape.head_params * counts[
        "head"
    ]
    reference = (
        2 * shape.body_params * counts["referenceBody"] + 2 * shape.head_params * counts["referenceHead"]
    )
    return grad + reference


def phase_rates(ticks: list[dict[str, Any]], shape: ModelShape) -> dict[str, dict[str, float]]:
    """Per phase (sample, train): model FLOPs, seconds and achieved GFLOP/s over the given ticks."""
    flops = {
        "sample": sum(sample_flops(shape, t["tokensPrefilled"], t["tokensSampled"]) for t in ticks),
        "train": sum(train_flops(shape, t["trainTokens"]) for t in ticks),
    }
    out = {}
    for phase, f in flops.items():
        seconds = sum(t["seconds"].get(phase, 0.0) for t in ticks)
        out[phase] = {"flops": f, "seconds": seconds, "gflops": f / seconds / 1e9 if seconds else 0.0}
    return out


def matmul_gflops(device: Any, dtype: Any, size: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """The device's dense matmul rate in this dtype: torch.mm of two size x size matrices (2 size^3
    FLOPs), the best of `repeats` runs after a warm-up, on the calling thread's torch settings."""
    import torch

    n = size or MATMUL_SIZE.get(device.type, 4096)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return {"gflops": 2 * n**3 / best / 1e9, "size": n, "dtype": str(dtype), "repeats": repeats}


def counts_json(counts: Any) -> dict[str, int]:
    """A trainer TokenCounts as the JSON the benchmarks write."""
    d = asdict(counts)
    return {
        "body": d["body"],
        "head": d["head"],
        "referenceBody": d["reference_body"],
        "referenceHead": d["reference_head"],
    }
