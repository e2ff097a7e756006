"""`clora bench throughput | rewards | scaling | join | ops | vllm-seeds | replicas | verifier`."""

from __future__ import annotations

import argparse
import json
import sys
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
    t.set_defaults(steps=20)  # long enough that cold starts do not dominate; --steps 3 for a quick look
    t.add_argument("--experiments", type=int, default=8, help="N")
    t.add_argument(
        "--baseline",
        choices=["serial", "trl"],
        default="serial",
        help="serial: clora's own engine, one process per experiment; trl: also TRL's GRPOTrainer",
    )
    t.add_argument("--plot", type=Path, default=None, help="PNG of reward curves and wall times")

    w = sub.add_parser("rewards", help="clora vs TRL's GRPOTrainer: reward curves over several seeds")
    common(w)
    w.set_defaults(steps=20)
    w.add_argument("--experiments", type=int, default=8, help="N specs per seed")
    w.add_argument("--seeds", type=int, default=3, help="replicates: independent seeds for the same N specs")
    w.add_argument("--jobs", type=int, default=1, help="processes at once (nothing is timed)")
    w.add_argument("--plot", type=Path, default=None, help="PNG of the reward curves with 95%% bands")

    s = sub.add_parser("scaling", help="step time and throughput for N = 1, 2, 4, ... experiments")
    common(s)
    s.set_defaults(steps=3)
    s.add_argument("--max-experiments", type=int, default=16)
    s.add_argument("--plot", type=Path, default=None)

    j = sub.add_parser("join", help="PUT to first trained step on a warm runtime vs a cold start")
    common(j)
    j.add_argument("--busy", type=int, default=7, help="experiments the warm runtime already trains")
    j.add_argument("--joins", type=int, default=5, help="newcomers timed, one after another")

    o = sub.add_parser("ops", help="operator calls per decode step and per training micro-batch (profiler)")
    o.add_argument("--model", default="tiny", help="base model: tiny | smollm2 | HF id | path")
    o.add_argument("--device", default="cpu", help="cpu | cuda (the profiler counts CPU-side operators)")
    o.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    o.add_argument("--threads", type=int, default=None, help="torch threads")
    o.add_argument("--adapters", default="1,8", help="comma-separated numbers of adapters")
    o.add_argument("--rows", type=int, default=64, help="decode rows, spread evenly over the adapters")
    o.add_argument("--steps", type=int, default=8, help="decode steps S (generates of S and 2S tokens)")
    o.add_argument("--train-rows", type=int, default=16, help="rows of the training micro-batch")
    o.add_argument("--rank", type=int, default=8, help="every adapter's rank")
    o.add_argument("--sync-every", type=int, default=None, help="sampler decode steps between host syncs")
    o.add_argument("--json", type=Path, default=None, help="write the full result here")

    r = sub.add_parser(
        "replicas", help="a pod of 2 replicas (Ray) vs 1: start-up, memory, throughput, kill -9"
    )
    r.add_argument("--model", default="tiny", help="base model: tiny | smollm2 | HF id | path")
    r.add_argument("--device", default="cpu", help="cpu | cuda (cuda: one GPU per replica)")
    r.add_argument("--experiments", type=int, default=8, help="experiments on each pod")
    r.add_argument("--threads", type=int, default=2, help="torch threads per replica")
    r.add_argument("--windows", type=int, default=5, help="throughput windows (mean ± standard error)")
    r.add_argument("--window-seconds", type=float, default=20.0, help="length of each window")
    r.add_argument("--kills", type=int, default=3, help="kill -9 of a replica, timed, repeated")
    r.add_argument("--json", type=Path, default=None, help="write the full result here")
    r.add_argument("--plot", type=Path, default=None, help="PNG of throughput and memory")

    f = sub.add_parser("verifier", help="what scoring through an HTTP verifier (task http) adds to a tick")
    f.add_argument("--model", default="tiny", help="base model: tiny | smollm2 | HF id | path")
    f.add_argument("--experiments", type=int, default=8, help="N (also measured: 1)")
    f.add_argument("--ticks", type=int, default=10, help="ticks timed per run")
    f.add_argument("--rounds", type=int, default=3, help="runs of each arm, alternated")
    f.add_argument("--json", type=Path, default=None, help="write the full result here")

    v = sub.add_parser("vllm-seeds", help="what per-row seeds cost vLLM's sampler (needs vLLM)")
    v.add_argument("--model", default="smollm2", help="base model: smollm2 | tiny | HF id | path")
    v.add_argument("--device", default="auto", help="auto | cpu | cuda")
    v.add_argument("--adapters", type=int, default=8, help="adapters the rows are spread over")
    v.add_argument("--rows", type=int, default=64, help="rows sampled together")
    v.add_argument("--tokens", type=int, default=64, help="tokens per row (EOS ignored)")
    v.add_argument("--repeats", type=int, default=5, help="seeded/unseeded pairs timed")
    v.add_argument("--json", type=Path, default=None, help="write the full result here")


def _write(result: dict[str, Any], path: Path | None, console: Console) -> None:
    result["command"] = " ".join(["clora", *sys.argv[1:]])
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
        console.log(f"wrote {path}")


def _throughput_table(r: dict[str, Any]) -> Table:
    c = r["config"]
    t = Table(title=f"{c['experiments']} experiments x {c['steps']} steps on {c['model']}")
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
    if args.bench == "ops":
        from clora_runtime.bench import ops

        with console.status("[bold]ops[/]: profiling decode steps and training micro-batches"):
            result = ops.ops(
                model=args.model,
                adapters=[int(n) for n in args.adapters.split(",")],
                rows=args.rows,
                steps=args.steps,
                train_rows=args.train_rows,
                rank=args.rank,
                device=args.device,
                dtype=args.dtype,
                sync_every=args.sync_every,
                threads=args.threads,
            )
        console.print(ops.table(result))
        _write(result, args.json, console)
        if args.json is None:
            print(json.dumps(result, default=str))
        return 0
    if args.bench == "replicas":
        from clora_runtime.bench import replicas

        result = replicas.replicas_bench(
            args.model,
            args.experiments,
            args.threads,
            args.device,
            args.windows,
            args.window_seconds,
            args.kills,
            console,
        )
        console.print(replicas.table(result))
        rec = result["arms"]["2 replicas"].get("recovery")
        console.print(
            f"2 replicas / 1: [bold]{result['twoOverOne']:.2f}x[/] ± {result['twoOverOneSe']:.2f} steps/s;"
            f" ray.init {result['rayStartupSeconds']:.1f} s; pod memory beyond 2 one-replica pods"
            f" {result['podMemoryOverheadMB']:.0f} MB"
            + (
                f"; kill -9 -> ready {rec['killToReadySeconds']:.1f} ± {rec['killToReadySecondsSe']:.1f} s,"
                f" -> stepping {rec['killToSteppingSeconds']:.1f} ± {rec['killToSteppingSecondsSe']:.1f} s"
                if rec
                else ""
            )
        )
        if args.plot:
            replicas.plot(result, args.plot)
        _write(result, args.json, console)
        return 0
    if args.bench == "verifier":
        from clora_runtime.bench.verifier import verifier_bench

        result = verifier_bench(args.model, args.experiments, args.ticks, args.rounds, console)
        for n, e in result["experiments"].items():
            console.print(
                f"{n} experiment(s): reward phase {e['builtinRewardSeconds']['mean'] * 1000:.1f} ms built in,"
                f" {e['verifierRewardSeconds']['mean'] * 1000:.1f} ms through the verifier: overhead"
                f" [bold]{e['overheadMsPerTick']:.1f} ± {e['overheadMsPerTickSe']:.1f} ms[/] per tick"
            )
        _write(result, args.json, console)
        return 0
    if args.bench == "vllm-seeds":
        from clora_runtime.bench.vllm_seeds import vllm_seeds

        result = vllm_seeds(
            args.model, args.device, args.adapters, args.rows, args.tokens, args.repeats, console
        )
        console.print(
            f"per-row seeds / none: [bold]{result['seededOverUnseeded']:.3f}x[/] ±"
            f" {result['seededOverUnseededSe']:.3f} ({args.rows} rows x {args.tokens} tokens);"
            f" {result['medianExtraMsPerDecodeStep']:.2f} ms more per decode step (median)"
        )
        _write(result, args.json, console)
        return 0
    templates = templates_from(args.from_dir)
    if args.bench == "throughput":
        from clora_runtime.bench import throughput

        exps = bench_experiments(args.experiments, args.steps, templates)
        result = throughput.throughput(exps, args.model, args.device, args.baseline, args.threads, console)
        console.print(_throughput_table(result))
        r = result
        console.print(
            f"concurrent / serial: [bold]{r['ratio']:.2f}x[/] with cold starts (batching limit"
            f" {r['batchingLimit']:.2f}x, efficiency {r['efficiency']:.2f} ± {r['efficiencyNoise']:.2f});"
            f" steady {r['steadyRatio']:.2f}x (limit {r['steadyBatchingLimit']:.2f}x, efficiency"
            f" {r['steadyEfficiency']:.2f} ± {r['steadyEfficiencyNoise']:.2f})"
            + (f"; vs TRL {r['vsTrl']:.2f}x" if "vsTrl" in r else "")
        )
        console.print(
            f"matmul {r['matmulGflops']:.1f} GFLOP/s; MFU sample {r['mfu']['sample']:.1%},"
            f" train {r['mfu']['train']:.1%}; isolation check (packed = alone):"
            f" {r['isolationCheck']['noRegression']}"
        )
        if args.plot:
            throughput.plot(result, args.plot)
    elif args.bench == "rewards":
        from clora_runtime.bench import rewards

        replicates = [
            bench_experiments(args.experiments, args.steps, templates, r) for r in range(args.seeds)
        ]
        result = rewards.rewards(replicates, args.model, args.device, args.threads, args.jobs, console)
        d = result["cloraMinusTrl"]
        for arm, band in result["reward"].items():
            console.print(
                f"{arm}: final reward {band['finalMean']:.3f} ± {band['finalSe']:.3f} ({band['runs']} runs)"
            )
        console.print(
            f"final reward, clora - TRL: {d['difference']:+.3f} ± {d['standardError']:.3f} (paired over"
            f" {d['pairs']} runs); no regression: {d['noRegression']}"
        )
        if args.plot:
            rewards.plot(result, args.plot)
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
