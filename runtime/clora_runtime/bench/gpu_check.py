"""The GPU arm in one go (`scripts/gpu-check.sh`): per model, one experiment and eight packed on one
engine: tick phases, peak memory, MFU against the measured matmul rate, and packed-vs-alone isolation.

Run as `python -m clora_runtime.bench.gpu_check --out DIR [--model qwen3|tiny] [--device cuda|cpu]`.
Needs torch, transformers and clora's own packages only, and no network: the Qwen3 shapes are built
from their published configs with random weights (throughput does not depend on the weights' values).

On random weights every arithmetic answer is wrong, so exact-match rewards are all 0, advantages 0 and
the adapters would never move: the isolation check would be vacuous. This process scores completions
by a hash of their text instead (spread rewards, non-zero gradients); nothing else changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS = {"qwen3": ["qwen3-0.6b-shaped", "qwen3-4b-shaped"], "tiny": ["tiny"]}
PACKED = 8
# Per device: a GPU-sized step (256 rows packed, 64 new tokens) and a CPU-sized one for CI. Micro-batch
# tokens, LM-head chunks and the sampler's sync interval are the device defaults (device_defaults.py),
# reported with the results.
WORKLOAD = {
    "cuda": {"promptsPerStep": 4, "groupSize": 8, "maxNewTokens": 64, "steps": 3},
    "cpu": {"promptsPerStep": 2, "groupSize": 4, "maxNewTokens": 8, "steps": 3},
}


def spread_reward(text: str, answer: str) -> float:
    return (sum(map(ord, text)) % 5) / 4


def _spec(seed: int, w: dict[str, int]) -> Any:
    from clora.api import LoRAExperimentSpec

    return LoRAExperimentSpec.model_validate(
        {
            "runtime": "gpu-check",
            "task": {"name": "arithmetic", "difficulty": 1},
            "lora": {"rank": 16, "alpha": 32},
            "training": {
                "steps": 1000,
                "learningRate": 1e-4,
                "promptsPerStep": w["promptsPerStep"],
                "groupSize": w["groupSize"],
                "maxNewTokens": w["maxNewTokens"],
                "temperature": 1.0,
                "seed": seed,
            },
            "checkpoint": {"everySteps": 1000, "keep": 1},
        }
    )


def _peak_mb(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _run(engine: Any, names: list[str], seeds: list[int], w: dict[str, int], gflops: float) -> dict[str, Any]:
    """Admit these experiments, tick `steps` times; figures over the ticks after the first."""
    from clora_runtime.bench.flops import counts_json, model_shape, phase_rates
    from clora_runtime.bench.stats import TICK_PHASES, steady, tick_seconds

    for name, seed in zip(names, seeds, strict=True):
        engine.upsert("gpu-check", name, _spec(seed, w))
    device = engine.base.device
    _reset_peak(device)
    ticks, first_logprobs = [], {}
    for i in range(w["steps"]):
        report = engine.tick()
        assert report is not None and not report.failed, report.failed if report else "no tick"
        ticks.append(
            {
                "seconds": report.seconds,
                "tokensSampled": report.tokens_sampled,
                "tokensPrefilled": report.tokens_prefilled,
                "trainTokens": counts_json(report.train_counts),
            }
        )
        if i == 0:
            first_logprobs = {k: [r.trainer_logprob for r in rs] for k, rs in report.rollouts.items()}
    shape = model_shape(
        engine.base.model,
        [sum(p.numel() for p in engine.bank.adapters[f"gpu-check/{n}"].parameters()) for n in names],
    )
    warm = steady(ticks)
    rates = phase_rates(warm, shape)
    tick_s = sum(tick_seconds(warm)) / len(warm)
    return {
        "experiments": len(names),
        "phaseSeconds": {p: sum(t["seconds"].get(p, 0.0) for t in warm) / len(warm) for p in TICK_PHASES},
        "tickSeconds": tick_s,
        "experimentStepsPerSecond": len(names) / tick_s,
        "tokensSampledPerSecond": sum(t["tokensSampled"] for t in warm)
        / sum(t["seconds"]["sample"] for t in warm),
        "peakMemoryMB": _peak_mb(device),
        "mfu": {p: r["gflops"] / gflops for p, r in rates.items()},
        "gflops": {p: r["gflops"] for p, r in rates.items()},
        "firstLogprobs": first_logprobs,
    }


def _rel(a: dict[str, Any], b: dict[str, Any], keys: list[str]) -> float:
    import torch

    num = sum((a[k].double() - b[k].double()).pow(2).sum() for k in keys)
    den = sum(b[k].double().pow(2).sum() for k in keys)
    return float(torch.sqrt(num / den)) if float(den) > 0 else float("nan")


def check_model(model: str, device: str, dtype: str, w: dict[str, int], log: Any) -> dict[str, Any]:
    from clora_runtime.bench.flops import matmul_gflops
    from clora_runtime.config import EngineConfig
    from clora_runtime.engine import Engine

    with tempfile.TemporaryDirectory(prefix="clora-gpu-check-") as tmp:
        start = time.perf_counter()
        engine = Engine(
            EngineConfig(
                model=model,
                device=device,
                dtype=dtype,
                max_adapters=PACKED,
                max_rank=16,
                checkpoint_dir=Path(tmp),
            )
        )
        engine.load()
        load_s = time.perf_counter() - start
        base = engine.base
        matmul = matmul_gflops(base.device, base.dtype)
        log(
            f"{model}: loaded in {load_s:.1f} s on {base.device} ({base.dtype});"
            f" matmul {matmul['gflops']:.0f} GFLOP/s"
        )
        alone = _run(engine, ["alone"], [0], w, matmul["gflops"])
        alone_weights = engine.bank.peft_state_dict("gpu-check/alone")
        engine.remove("gpu-check", "alone")
        log(f"{model}: 1 experiment, tick {alone['tickSeconds']:.2f} s")
        names = ["x", *(f"n{i}" for i in range(1, PACKED))]
        packed = _run(engine, names, list(range(PACKED)), w, matmul["gflops"])
        log(f"{model}: {PACKED} experiments, tick {packed['tickSeconds']:.2f} s")
        x = engine.bank.peft_state_dict("gpu-check/x")
        other = engine.bank.peft_state_dict("gpu-check/n1")  # another seed: the scale of a real difference
        trained = [k for k in alone_weights if "lora_B" in k]  # B starts at zero: what training wrote
        lp_alone, lp_packed = (
            alone.pop("firstLogprobs")["gpu-check/alone"],
            packed.pop("firstLogprobs")["gpu-check/x"],
        )
        lp_rel = max(
            (
                abs(p - a) / max(abs(a), 1e-9)
                for a, p in zip(lp_alone, lp_packed, strict=True)
                if a is not None and p is not None
            ),
            default=float("nan"),
        )
        return {
            "model": model,
            "loadSeconds": load_s,
            "device": str(base.device),
            "dtype": str(base.dtype),
            "attention": str(base.model.config._attn_implementation),
            "sizes": dataclasses.asdict(engine.sizes),
            "matmul": matmul,
            "runs": [alone, packed],
            "packingSpeedup": packed["experimentStepsPerSecond"] / alone["experimentStepsPerSecond"],
            "isolation": {
                "what": "experiment x trained packed with 7 others vs alone, same seed, after "
                f"{w['steps']} steps: relative norm of the weight difference",
                "firstStepLogprobMaxRelative": lp_rel,
                "trainedWeightsRelative": _rel(x, alone_weights, trained),
                "allWeightsRelative": _rel(x, alone_weights, list(alone_weights)),
                "otherSeedTrainedWeightsRelative": _rel(other, alone_weights, trained),
            },
        }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# gpu-check on {m['device']}",
        "",
        f"torch {m['torch']}, {m['cpuCount']} CPU cores; workload per experiment: {result['workload']}.",
        "",
        "| model | experiments | sample s | reward s | train s | sync s | tick s | experiment-steps/s"
        " | tokens sampled/s | peak MB | MFU sample | MFU train |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        for run in r["runs"]:
            p, mfu = run["phaseSeconds"], run["mfu"]
            cells = [
                r["model"],
                str(run["experiments"]),
                *(f"{p[phase]:.3f}" for phase in ("sample", "reward", "train", "sync")),
                f"{run['tickSeconds']:.3f}",
                f"{run['experimentStepsPerSecond']:.2f}",
                f"{run['tokensSampledPerSecond']:.0f}",
                f"{run['peakMemoryMB']:.0f}",
                f"{mfu['sample']:.1%}",
                f"{mfu['train']:.1%}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | load s | matmul GFLOP/s | packing speed-up (8 vs 1) | isolation: trained weights,"
        " packed vs alone | another seed vs alone | first-step log-prob, packed vs alone |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["models"]:
        iso = r["isolation"]
        cells = [
            r["model"],
            f"{r['loadSeconds']:.1f}",
            f"{r['matmul']['gflops']:.0f}",
            f"{r['packingSpeedup']:.2f}x",
            f"{iso['trainedWeightsRelative']:.2e}",
            f"{iso['otherSeedTrainedWeightsRelative']:.2e}",
            f"{iso['firstStepLogprobMaxRelative']:.2e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Device defaults the runs used (clora_runtime/device_defaults.py):",
        "",
        "| model | attention | micro-batch tokens | LM-head chunk (logit floats) | decode steps per host"
        " sync | fused AdamW |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in result["models"]:
        z = r["sizes"]
        lines.append(
            f"| {r['model']} | {r['attention']} | {z['micro_batch_tokens']} | {z['head_chunk_elements']}"
            f" | {z['decode_sync_every']} | {z['fused_adamw']} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check")
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen3")
    parser.add_argument("--device", default="cuda", help="cuda | cpu")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--out", type=Path, default=Path("out/gpu-check"))
    args = parser.parse_args(argv)

    from clora_runtime.bench.throughput import machine
    from clora_runtime.tasks import rewards

    for name in list(rewards.REWARDS):  # see the module docstring
        rewards.REWARDS[name] = spread_reward
    w = WORKLOAD["cuda" if args.device.startswith("cuda") else "cpu"]
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    models = [check_model(m, args.device, args.dtype, w, log) for m in MODELS[args.model]]
    info = machine()
    result = {
        "machine": {
            **info,
            "device": info.get("gpu") or f"{info['cpuCount']} CPU cores ({info['processor']})",
        },
        "workload": w,
        "models": models,
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(result, indent=1))
    (args.out / "gpu-check.md").write_text(markdown(result))
    log(f"wrote {args.out}/gpu-check.json and gpu-check.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
