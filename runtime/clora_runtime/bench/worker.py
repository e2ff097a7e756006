"""One benchmark process: load the base model, train the given experiments together, report timings.

Run as `python -m clora_runtime.bench.worker REQUEST.json RESULT.json`. The concurrent arm is one such
process with N experiments; the serial arm is N of them with one experiment each, so both arms pay
their cold starts (interpreter, imports, model load) exactly as a job would. The engine is the very one
`clora runtime` serves.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from clora.api import LoRAExperimentSpec
from clora_runtime.bench.flops import counts_json, matmul_gflops, model_shape


class WorkerExperiment(BaseModel):
    namespace: str
    name: str
    spec: LoRAExperimentSpec


class WorkerRequest(BaseModel):
    model: str = "smollm2"
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    spawned_at: float = Field(description="time.time() when the parent started this process")
    experiments: list[WorkerExperiment]
    measure_matmul: bool = False  # after training: this device's dense matmul rate, same threads and dtype

    @classmethod
    def of(
        cls, model: str, device: str, threads: int | None, exps: list[tuple[str, str, LoRAExperimentSpec]]
    ) -> WorkerRequest:
        """A request for these (namespace, name, spec) experiments; spawned_at is set at the spawn."""
        return cls(
            model=model,
            device=device,
            threads=threads,
            spawned_at=0.0,
            experiments=[WorkerExperiment(namespace=ns, name=n, spec=s) for ns, n, s in exps],
        )


class ExperimentResult(BaseModel):
    key: str
    rewards: list[float]
    step_seconds: list[float]
    completed_at: float  # time.time()
    phase: str
    message: str = ""


class WorkerResult(BaseModel):
    spawned_at: float
    loaded_at: float  # base model loaded, engine ready
    finished_at: float
    experiments: list[ExperimentResult]
    ticks: list[dict[str, Any]]  # per tick: seconds per phase, active adapters, tokens
    peak_rss_mb: float
    peak_device_mb: float | None = None
    device: str = ""
    dtype: str = ""
    shape: dict[str, Any] = {}  # ModelShape.as_json(): what the model FLOPs are counted from
    matmul: dict[str, Any] | None = None  # flops.matmul_gflops(), when asked


def peak_device_mb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def run(request: WorkerRequest) -> WorkerResult:
    from clora_runtime.config import EngineConfig
    from clora_runtime.engine import Engine

    max_rank = max(e.spec.lora.rank for e in request.experiments)
    with tempfile.TemporaryDirectory(prefix="clora-bench-") as tmp:
        engine = Engine(
            EngineConfig(
                model=request.model,
                device=request.device,
                dtype=request.dtype,
                max_adapters=len(request.experiments),
                max_rank=max_rank,
                checkpoint_dir=Path(tmp),
                threads=request.threads,
            )
        )
        engine.load()
        loaded_at = time.time()
        for e in request.experiments:
            engine.upsert(e.namespace, e.name, e.spec)
        keys = [f"{e.namespace}/{e.name}" for e in request.experiments]
        assert engine.bank is not None and engine.base is not None
        shape = model_shape(
            engine.base.model, [sum(p.numel() for p in a.parameters()) for a in engine.bank.adapters.values()]
        )
        completed: dict[str, float] = {}
        ticks: list[dict[str, Any]] = []
        while len(completed) < len(keys):
            report = engine.tick()
            if report is None:
                break
            ticks.append(
                {
                    "active": len(report.stepped),
                    "seconds": report.seconds,
                    "tokensSampled": report.tokens_sampled,
                    "tokensTrained": report.tokens_trained,
                    "tokensPrefilled": report.tokens_prefilled,
                    "trainTokens": counts_json(report.train_counts),
                }
            )
            now = time.time()
            for state in engine.states():
                key = f"{state.namespace}/{state.name}"
                if state.phase in ("Succeeded", "Failed") and key not in completed:
                    completed[key] = now
        results = []
        for e in request.experiments:
            state = engine.state(e.namespace, e.name)
            rewards, step_seconds = engine.experiment_history(e.namespace, e.name)
            key = f"{e.namespace}/{e.name}"
            results.append(
                ExperimentResult(
                    key=key,
                    rewards=rewards,
                    step_seconds=step_seconds,
                    completed_at=completed.get(key, time.time()),
                    phase=state.phase,
                    message=state.message,
                )
            )
        device = str(engine.base.device)
        dtype = engine.base.dtype
        matmul = matmul_gflops(engine.base.device, dtype) if request.measure_matmul else None
    return WorkerResult(
        spawned_at=request.spawned_at,
        loaded_at=loaded_at,
        finished_at=time.time(),
        experiments=results,
        ticks=ticks,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        peak_device_mb=peak_device_mb(),
        device=device,
        dtype=str(dtype),
        shape=shape.as_json(),
        matmul=matmul,
    )


def main(argv: list[str]) -> int:
    request = WorkerRequest.model_validate_json(Path(argv[0]).read_text())
    result = run(request)
    Path(argv[1]).write_text(result.model_dump_json(indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
