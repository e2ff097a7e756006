"""`clora bench throughput | scaling | join`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from clora_runtime.bench.workload import bench_experiments, templates_from


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCH")

    def common(p: argparse.ArgumentParser, experiments: bool = True) -> None:
        p.add_argument("--model", default="smollm2", help="base model: smollm2 | tiny | HF id | path")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda")
        p.add_argument("--threads", type=int, default=None, help="torch threads per process")
        p.add_argument(
            "--from",
            dest="from_dir",
            type=Path,
            default=None,
            help="take experiment specs from the LoRAExperiments in this folder (default: built-in,"
            " sized like examples/local)",
        )
        p.add_argument("--steps", type=int, default=5, help="steps per experiment")
        p.add_argument("--json", type=Path, default=None, help="write the full result here")

    t = sub.add_parser("throughput", help="N experiments together vs the same N one at a time")
    common(t)
    t.add_argument("--experiments", type=int, default=8, help="N")
    t.add_argument(
        "--baseline",
        choices=["serial", "trl"],
        default="serial",
        help="serial: clora's own engine, one process per experiment; trl: also TRL's GRPOTrainer",
    )
    t.add_argument("--plot", type=Path, default=None, help="PNG of reward curves and wall times")

    s = sub.add_parser("scaling", help="step time and throughput for N = 1, 2, 4, ... experiments")
    common(s)
    s.set_defaults(steps=3)
    s.add_argument("--max-experiments", type=int, default=16)
    s.add_argument("--plot", type=Path, default=None)

    j = sub.add_parser("join", help="PUT to first trained step on a warm runtime vs a cold start")
    common(j)
    j.add_argument("--busy", type=int, default=7, help="experiments the warm runtime already trains")
    j.add_argument("--joins", type=int, default=5, help="newcomers timed, one after another")


def _write(result: dict[str, Any], path: Path | None, console: Console) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
        console.log(f"wrote {path}")


def _throughput_table(r: dict[str, Any]) -> Table:
    t = Table(title=f"{r['experiments']} experiments x {r['steps']} steps on {r['model']}")
    for col in ("arm", "wall s", "exp/hour", "mean completion s", "step s", "cold start s", "peak MB"):
        t.add_column(col, justify="right")
    for name, a in r["arms"].items():
        t.add_row(
            name,
            f"{a['wallSeconds']:.1f}",
            f"{a['experimentsPerHour']:.1f}",
            f"{a['meanCompletionSeconds']:.1f}",
            f"{a['stepLatencySeconds'] or 0:.2f}",
            f"{a['coldStartSeconds']:.1f}",
            f"{a['peakMemoryMB']:.0f}",
        )
    return t


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    templates = templates_from(args.from_dir)
    if args.bench == "throughput":
        from clora_runtime.bench import throughput

        exps = bench_experiments(args.experiments, args.steps, templates)
        result = throughput.throughput(exps, args.model, args.device, args.baseline, args.threads, console)
        console.print(_throughput_table(result))
        cmp = result["rewardComparison"]
        console.print(
            f"throughput ratio (concurrent / serial): [bold]{result['throughputRatio']:.2f}x[/]; ceiling "
            f"{result['ceiling']['ratio']:.2f}x; efficiency {result['ceiling']['efficiency']:.0%}"
            + (f"; vs TRL {result['trlRatio']:.2f}x" if "trlRatio" in result else "")
        )
        console.print(
            f"final reward, concurrent - serial: {cmp['meanDifference']:+.3f}"
            f" (noise {cmp['noiseOfMeanDifference']:.3f});"
            f" no regression: {cmp['noRegression']}"
        )
        if args.plot:
            throughput.plot(result, args.plot)
    elif args.bench == "scaling":
        from clora_runtime.bench import scaling

        exps = bench_experiments(args.max_experiments, args.steps, templates)
        result = scaling.scaling(exps, args.model, args.device, args.threads, console)
        console.print(scaling.table(result))
        if result["memoryPerExtraAdapterMB"] is not None:
            console.print(
                f"memory per extra adapter (slope of peak memory): {result['memoryPerExtraAdapterMB']:.1f} MB"
            )
        if args.plot:
            scaling.plot(result, args.plot)
    else:
        from clora_runtime.bench.join import join

        specs = [s for _, _, s in bench_experiments(1 + args.busy, args.steps, templates)]
        with console.status(f"[bold]join[/]: a cold start, then {args.joins} joins beside {args.busy}"):
            result = join(specs, args.model, args.device, args.threads, args.joins)
        for k, v in result.items():
            if not isinstance(v, list | dict):  # the per-arrival list and the machine are in the JSON
                console.print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    _write(result, args.json, console)
    if args.json is None:
        print(json.dumps(result, default=str))
    return 0
