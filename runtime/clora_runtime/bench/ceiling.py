"""The hardware's ceiling for packing: raw sampling and forward+backward throughput of the base model at
the single-experiment batch and at the packed batch, with the same lengths.

Run as `python -m clora_runtime.bench.ceiling REQUEST.json RESULT.json`. From these figures and the
measured cold start, `ceiling_ratio` gives the experiment-throughput ratio the hardware allows at N:
what clora would reach if packing cost nothing beyond the raw model's own batch scaling.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pydantic import BaseModel


class CeilingRequest(BaseModel):
    model: str
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    batches: list[int]  # rows per sampling batch to measure (B1, 2*B1, ...)
    prompt_tokens: int
    new_tokens: int
    repeats: int = 2
    micro_batch_tokens: int = 4096  # as the engine: training is micro-batched to bound memory


class CeilingPoint(BaseModel):
    rows: int
    sample_seconds: float  # prefill + new_tokens decode steps for `rows` rows, KV-cached
    train_seconds: float  # one forward+backward over rows x (prompt + new) tokens


class CeilingResult(BaseModel):
    points: list[CeilingPoint]
    prompt_tokens: int
    new_tokens: int


def measure(request: CeilingRequest) -> CeilingResult:
    import torch

    from clora_runtime.models.loading import load_model

    if request.threads:
        torch.set_num_threads(request.threads)
    base = load_model(request.model, request.device, request.dtype)
    model = base.model
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)

    def sync() -> None:
        if base.device.type == "cuda":
            torch.cuda.synchronize()

    def sample(rows: int) -> float:
        ids = torch.randint(0, vocab, (rows, request.prompt_tokens), generator=gen).to(base.device)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            # Only the last position's logits are ever used: the head runs on nothing else.
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            for _ in range(request.new_tokens - 1):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
        sync()
        return time.perf_counter() - start

    def train(rows: int) -> float:
        length = request.prompt_tokens + request.new_tokens
        chunk = max(1, request.micro_batch_tokens // length)
        ids = torch.randint(0, vocab, (rows, length), generator=gen).to(base.device)
        sync()
        start = time.perf_counter()
        for part in ids.split(chunk):
            # The base is frozen; gradients flow to the input embeddings so the backward pass does the
            # activation-gradient work a LoRA backward does (LoRA's own weight gradients are tiny).
            embeds = model.get_input_embeddings()(part).detach().requires_grad_(True)
            hidden = decoder(inputs_embeds=embeds).last_hidden_state[:, request.prompt_tokens - 1 : -1]
            # The head runs only on the completion positions, the ones a policy-gradient loss reads.
            logp = torch.log_softmax(head(hidden).float(), -1)
            loss = -logp.gather(-1, part[:, request.prompt_tokens :, None]).mean()
            loss.backward()
        sync()
        return time.perf_counter() - start

    sample(request.batches[0])  # warm-up: allocator, kernels
    points = []
    for rows in request.batches:
        s = min(sample(rows) for _ in range(request.repeats))
        t = min(train(rows) for _ in range(request.repeats))
        points.append(CeilingPoint(rows=rows, sample_seconds=s, train_seconds=t))
    return CeilingResult(points=points, prompt_tokens=request.prompt_tokens, new_tokens=request.new_tokens)


def ceiling_ratio(result: CeilingResult, single_rows: int, n: int, steps: int, cold_start_s: float) -> float:
    """Experiments/hour of N packed over N one-at-a-time, if packing cost only the raw batch scaling."""
    by_rows = {p.rows: p for p in result.points}
    one, packed = by_rows[single_rows], by_rows[single_rows * n]
    serial = n * (cold_start_s + steps * (one.sample_seconds + one.train_seconds))
    concurrent = cold_start_s + steps * (packed.sample_seconds + packed.train_seconds)
    return serial / concurrent


def main(argv: list[str]) -> int:
    request = CeilingRequest.model_validate_json(Path(argv[0]).read_text())
    Path(argv[1]).write_text(measure(request).model_dump_json(indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
