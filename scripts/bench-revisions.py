"""Tick phase times of two revisions of clora, side by side in one run.

    .venv/bin/python scripts/bench-revisions.py --before REV [--pairs 3] [--experiments 8] [--steps 6]
        [--model smollm2] [--from examples/local] [--json FILE]

Each run is one benchmark worker process (clora_runtime.bench.worker: load the model, train the
experiments together, report each tick's phase seconds) of either the working tree or REV (unpacked
with `git archive` into a temporary folder and put first on PYTHONPATH). Runs alternate A B B A ...,
so drift on a shared machine hits both alike; every run trains the same experiments with the same
seeds. The first tick of each run (one-off costs) is left out; the ratio after/before is taken per
pair and reported as mean ± standard error over the pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from clora_runtime.bench.stats import mean_se, steady
from clora_runtime.bench.worker import WorkerRequest, WorkerResult
from clora_runtime.bench.workload import bench_experiments, templates_from

REPO = Path(__file__).resolve().parent.parent
PHASES = ("sample", "reward", "train", "sync")


def unpack(rev: str, into: Path) -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    archive = into / "rev.tar"
    subprocess.run(["git", "archive", "--output", str(archive), sha], cwd=REPO, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "src", filter="data")
    return sha


def run_worker(source: Path, request: WorkerRequest, work: Path) -> WorkerResult:
    req, out = work / "request.json", work / "result.json"
    req.write_text(request.model_copy(update={"spawned_at": time.time()}).model_dump_json())
    env = {**os.environ, "PYTHONPATH": f"{source}:{source / 'runtime'}"}
    proc = subprocess.run(
        [sys.executable, "-m", "clora_runtime.bench.worker", str(req), str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker of {source} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return WorkerResult.model_validate_json(out.read_text())


def phase_means(result: WorkerResult) -> dict[str, float]:
    ticks = steady(result.ticks)
    means = {p: statistics.fmean(t["seconds"].get(p, 0.0) for t in ticks) for p in PHASES}
    means["tick"] = sum(means.values())
    return means


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the revision to compare the working tree with")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--experiments", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--from", dest="from_dir", type=Path, default=REPO / "examples" / "local")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    exps = bench_experiments(args.experiments, args.steps, templates_from(args.from_dir))
    request = WorkerRequest.of(args.model, "cpu", args.threads, exps)
    runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="clora-revisions-") as tmp:
        sha = unpack(args.before, Path(tmp))
        sources = {"before": Path(tmp) / "src", "after": REPO}
        for pair in range(args.pairs):
            order = ("before", "after") if pair % 2 == 0 else ("after", "before")
            for arm in order:
                started = time.perf_counter()
                result = run_worker(sources[arm], request, Path(tmp))
                runs[arm].append(phase_means(result))
                print(
                    f"pair {pair + 1}/{args.pairs} {arm}: tick {runs[arm][-1]['tick']:.2f} s"
                    f" ({time.perf_counter() - started:.0f} s run)",
                    file=sys.stderr,
                    flush=True,
                )
    summary: dict[str, Any] = {}
    for phase in (*PHASES, "tick"):
        ratios = [
            a[phase] / b[phase] for a, b in zip(runs["after"], runs["before"], strict=True) if b[phase] > 0
        ]
        mean, se = mean_se(ratios)
        summary[phase] = {
            "beforeSeconds": statistics.fmean(r[phase] for r in runs["before"]),
            "afterSeconds": statistics.fmean(r[phase] for r in runs["after"]),
            "afterOverBefore": mean,
            "afterOverBeforeSe": se,
        }
    print(f"{'phase':<8} {'before s':>9} {'after s':>9} {'after/before':>16}")
    for phase, s in summary.items():
        print(
            f"{phase:<8} {s['beforeSeconds']:>9.3f} {s['afterSeconds']:>9.3f}"
            f" {s['afterOverBefore']:>9.3f} ± {s['afterOverBeforeSe']:.3f}"
        )
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "before": sha,
        "config": {k: str(v) for k, v in vars(args).items()},
        "runs": runs,
        "phases": summary,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
