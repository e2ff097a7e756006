"""The experiments a benchmark trains: N specs made from a template, differing only in seed.

Pure: no torch, no processes. Every arm of a benchmark trains exactly these specs.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from clora.api import LoRAExperiment, LoRAExperimentSpec

BENCH_NAMESPACE = "bench"

# Sized like examples/local: arithmetic difficulty 1 on a small model, short completions.
DEFAULT_TEMPLATE: dict = {
    "runtime": "bench",
    "task": {"name": "arithmetic", "difficulty": 1},
    "lora": {"rank": 16, "alpha": 32},
    "training": {
        "steps": 5,
        "learningRate": 2.0e-4,
        "promptsPerStep": 4,
        "groupSize": 4,
        "maxNewTokens": 24,
        "temperature": 0.8,
    },
    "checkpoint": {"everySteps": 1000, "keep": 1},
}


def templates_from(directory: Path | None) -> list[LoRAExperimentSpec]:
    """The LoRAExperiment specs in a folder of manifests (e.g. examples/local), or the built-in one."""
    if directory is None:
        return [LoRAExperimentSpec.model_validate(DEFAULT_TEMPLATE)]
    specs = []
    for path in sorted(directory.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "LoRAExperiment":
                specs.append(LoRAExperiment.model_validate(doc).spec)
    if not specs:
        raise ValueError(f"{directory}: no LoRAExperiment manifests")
    return specs


def bench_experiments(
    n: int, steps: int, templates: list[LoRAExperimentSpec], replicate: int = 0
) -> list[tuple[str, str, LoRAExperimentSpec]]:
    """N experiments (namespace, name, spec): the templates in turn, each with its own seed and K steps.

    `replicate` picks another set of seeds for the same N specs (seed 1000 + replicate x N + i), so
    replicates of a benchmark are independent runs of identical specs.

    Checkpoints are pushed past the run so that no arm pays for them; the checkpoint cost is measured
    on its own (clora_checkpoint_duration_seconds).
    """
    out = []
    for i in range(n):
        spec = templates[i % len(templates)].model_copy(deep=True)
        spec.runtime = "bench"
        spec.suspend = False
        spec.training.steps = steps
        spec.training.seed = 1000 + replicate * n + i
        spec.checkpoint.every_steps = steps + 1
        out.append((BENCH_NAMESPACE, f"exp-{i:02d}", spec))
    return out
