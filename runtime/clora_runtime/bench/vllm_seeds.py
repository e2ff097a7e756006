"""`clora bench vllm-seeds`: what per-request seeds cost vLLM's sampler.

vLLM draws a seeded request's tokens from that request's own generator, in a Python loop over the
seeded requests inside its sampler (one small kernel per seeded row per decode step); unseeded
requests share one draw. clora seeds every row (derived from the experiment's seed, step, prompt
and group index), so a row's tokens never depend on its neighbours. This measures the price: the
same batch of rows, every row the same length (ignore_eos), with per-row seeds and without,
alternated so machine drift hits both arms alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from clora_runtime.bench.stats import mean_se


def vllm_seeds(
    model: str, device: str, adapters: int, rows: int, tokens: int, repeats: int, console: Console
) -> dict[str, Any]:
    from vllm import SamplingParams

    from clora_runtime.config import EngineConfig
    from clora_runtime.engine import Engine

    with tempfile.TemporaryDirectory(prefix="clora-bench-seeds-") as tmp:
        config = EngineConfig(
            model=model,
            device=device,
            sampler="vllm",
            max_adapters=adapters,
            max_rank=16,
            max_batch_rows=rows,
            checkpoint_dir=Path(tmp),
        )
        engine = Engine(config)
        with console.status("[bold]vllm-seeds[/]: loading the model and starting vLLM"):
            engine.load()
        from clora_runtime.lora.bank import AdapterShape

        sampler: Any = engine.sampler
        keys = [f"bench/a{i}" for i in range(adapters)]
        for i, key in enumerate(keys):
            engine.bank.add(key, AdapterShape(16, 32.0, 0.0, "all-linear"), seed=i, learning_rate=1e-4)
            sampler.add_adapter(key)
        prompt = engine.base.tokenizer("What is 12 times 7?")["input_ids"]
        loras = [sampler.current_version(keys[r % adapters]).request for r in range(rows)]

        def run(seeded: bool) -> float:
            params = [
                SamplingParams(
                    temperature=1.0,
                    max_tokens=tokens,
                    ignore_eos=True,
                    seed=1000 + r if seeded else None,
                    detokenize=False,
                    logprobs=0,
                )
                for r in range(rows)
            ]
            started = time.perf_counter()
            sampler.llm.generate(
                [{"prompt_token_ids": prompt}] * rows, params, lora_request=loras, use_tqdm=False
            )
            return time.perf_counter() - started

        run(True)  # warm-up: compilation and first-use costs
        seeded: list[float] = []
        unseeded: list[float] = []
        for i in range(repeats):
            with console.status(f"[bold]vllm-seeds[/]: repeat {i + 1}/{repeats}"):
                seeded.append(run(True))
                unseeded.append(run(False))
        sampler.close()
    ratios = [s / u for s, u in zip(seeded, unseeded, strict=True)]
    ratio_mean, ratio_se = mean_se(ratios)
    return {
        "config": {
            "model": model,
            "device": str(engine.base.device),
            "adapters": adapters,
            "rows": rows,
            "tokens": tokens,
            "repeats": repeats,
        },
        "seededSeconds": seeded,
        "unseededSeconds": unseeded,
        "seededOverUnseeded": ratio_mean,
        "seededOverUnseededSe": ratio_se,
        "medianExtraMsPerDecodeStep": 1000
        * statistics.median(s - u for s, u in zip(seeded, unseeded, strict=True))
        / tokens,
    }
