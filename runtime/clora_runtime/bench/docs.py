"""Render docs/benchmarks.md from the JSON files `scripts/bench.sh` writes.

Run as `python -m clora_runtime.bench.docs RESULTS_DIR OUTPUT.md`. Every figure in the page comes from
a JSON file in RESULTS_DIR, with the machine it was measured on.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def _machine(m: dict[str, Any]) -> str:
    where = m.get("gpu") or f"{m.get('cpuCount')} CPU cores ({m.get('processor')})"
    return f"{where}, torch {m.get('torch')}, {m.get('torchThreads')} threads"


def _f(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _command(r: dict[str, Any]) -> list[str]:
    return ["", "```", r["command"], "```", ""] if "command" in r else [""]


def throughput_section(name: str, r: dict[str, Any]) -> list[str]:
    c = r["config"]
    lines = [
        f"### Throughput: {c['experiments']} experiments x {c['steps']} steps on `{c['model']}` ({name})",
        *_command(r),
        f"Machine: {_machine(r['machine'])}.",
        "",
        "| arm | processes | wall s | experiments/hour | tick s | cold start s | peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, a in r["arms"].items():
        lines.append(
            f"| {arm} | {a['processes']} | {a['wallSeconds']:.1f} | {a['experimentsPerHour']:.1f}"
            f" | {_f(a['stepLatencySeconds'])} | {a['coldStartSeconds']:.1f} | {a['peakMemoryMB']:.0f} |"
        )
    lines += [
        "",
        "concurrent: the N experiments packed on one engine; limit: ONE adapter at the packed batch"
        " (N x promptsPerStep x groupSize rows); serial: one process per experiment, one after another"
        + ("; trl: TRL's GRPOTrainer, one process per experiment." if "trl" in r["arms"] else "."),
        "",
        "| figure | measured | batching limit | efficiency (measured / limit) |",
        "|---|---:|---:|---:|",
        f"| experiments/hour over serial, cold starts included | **{r['ratio']:.2f}x**"
        f" | {r['batchingLimit']:.2f}x | {r['efficiency']:.2f} ± {r['efficiencyNoise']:.2f} |",
        f"| warm experiment-steps/s over serial (steady) | **{r['steadyRatio']:.2f}x**"
        f" | {r['steadyBatchingLimit']:.2f}x"
        f" | {r['steadyEfficiency']:.2f} ± {r['steadyEfficiencyNoise']:.2f} |",
        "",
        f"Efficiency above 1 beyond noise (± one standard error from the tick times) would mean the limit is"
        f" wrong; within the limit: {r['efficiencyWithinLimit']}.",
    ]
    if "vsTrl" in r:
        lines.append(f"Against TRL's GRPOTrainer, one experiment at a time: **{r['vsTrl']:.2f}x**.")
    lines += [
        "",
        f"Arithmetic: this device's dense matmul rate (torch.mm, {r['config']['matmul']['size']}^2,"
        f" {r['config']['matmul']['dtype']}, best of {r['config']['matmul']['repeats']}):"
        f" **{r['matmulGflops']:.1f} GFLOP/s**. Model FLOPs per phase over the steady ticks"
        " (counted from the model's shapes: runtime/clora_runtime/bench/flops.py):",
        "",
        "| arm | sample GFLOP/s | sample MFU | train GFLOP/s | train MFU |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm, rates in r["phaseRates"].items():
        s, t = rates["sample"], rates["train"]
        lines.append(f"| {arm} | {s['gflops']:.1f} | {s['mfu']:.1%} | {t['gflops']:.1f} | {t['mfu']:.1%} |")
    phases = r["arms"]["concurrent"]["phaseSecondsPerTick"]
    iso = r["isolationCheck"]
    lines += [
        "",
        "Time per tick by phase (concurrent): "
        + ", ".join(f"{p} {s:.3f} s" for p, s in phases.items())
        + ".",
        "",
        f"Isolation check (not a reward comparison): packed minus alone, final reward"
        f" {iso['meanDifference']:+.4f} (sampling noise of that mean {iso['noiseOfMeanDifference']:.4f}):"
        " the same numbers up to float rounding, which over many steps can flip a sampled token.",
        "",
    ]
    return lines


def rewards_section(name: str, r: dict[str, Any]) -> list[str]:
    c, d, v = r["config"], r["cloraMinusTrl"], r["vsTrl"]
    lines = [
        f"### Reward: clora vs TRL's GRPOTrainer, {c['experiments']} specs x {c['replicates']} seeds x"
        f" {c['steps']} steps on `{c['model']}` ({name})",
        *_command(r),
        f"Machine: {_machine(r['machine'])}; {c['threads']} thread(s) per process, {c['jobs']} at a time.",
        "",
        "| arm | runs | final reward (mean of the last 5 steps) |",
        "|---|---:|---:|",
    ]
    for arm, band in r["reward"].items():
        lines.append(f"| {arm} | {band['runs']} | {band['finalMean']:.3f} ± {band['finalSe']:.3f} |")
    lines += [
        "",
        f"- clora minus TRL, paired by spec and seed over {d['pairs']} runs: **{d['difference']:+.3f} ±"
        f" {d['standardError']:.3f}**; no regression ({d['rule']}): **{d['noRegression']}**.",
        f"- Wall time, TRL over clora for the same experiments (processes side by side in this run):"
        f" {v['mean']:.2f}x ± {v['standardError']:.2f} (per seed: "
        + ", ".join(f"{x:.2f}x" for x in v["perReplicate"])
        + ").",
        "",
    ]
    return lines


def gpu_check_section(path: Path) -> list[str]:
    text = path.read_text().strip().splitlines()
    return ["### " + text[0].lstrip("# "), *text[1:], ""]


def scaling_section(name: str, r: dict[str, Any]) -> list[str]:
    lines = [
        f"### Scaling on `{r['model']}` ({name})",
        *_command(r),
        f"Machine: {_machine(r['machine'])}.",
        "",
        "| N | step s | experiment-steps/s | speed-up | peak MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        mem = row["peakDeviceMemoryMB"] or row["peakMemoryMB"]
        lines.append(
            f"| {row['experiments']} | {row['stepSeconds']:.2f} | {row['experimentStepsPerSecond']:.2f}"
            f" | {row['speedupPerExperimentStep']:.2f}x | {mem:.0f} |"
        )
    lines += [
        "",
        f"Memory per extra adapter (slope of {r['memoryMeasure']}): "
        f"{_f(r['memoryPerExtraAdapterMB'], '.1f')} MB.",
        "",
    ]
    return lines


def join_section(name: str, r: dict[str, Any]) -> list[str]:
    return [
        f"### Join latency on `{r['model']}` ({name})",
        *_command(r),
        f"Machine: {_machine(r['machine'])}.",
        "",
        f"A new experiment PUT {len(r['joins'])} times, at random moments, on a runtime already training"
        f" {r['busyExperiments']} experiments (one tick of theirs: {r['busyTickSeconds']:.1f} s):",
        "",
        f"- PUT to admitted (slot allocated, phase Running): median {r['warmPutToAdmittedSeconds']:.2f} s,"
        f" max {r['warmPutToAdmittedMaxSeconds']:.2f} s.",
        f"- PUT to first trained step (packed into the next tick): median"
        f" {r['warmPutToFirstStepSeconds']:.2f} s, max {r['warmPutToFirstStepMaxSeconds']:.2f} s; the step"
        f" alone, PUT on an idle warm runtime: {r['coldFirstStepAfterPutSeconds']:.2f} s.",
        *(
            [
                f"- DELETE while it trains, to the answer (200, or 202 while the running tick holds it):"
                f" median {r['deleteAnswerSeconds']:.2f} s, max {r['deleteAnswerMaxSeconds']:.2f} s; to"
                f" its final checkpoint known: max {r['deleteToFinalCheckpointMaxSeconds']:.2f} s."
            ]
            if "deleteAnswerSeconds" in r
            else []
        ),
        f"- Cold: process start to ready {r['coldStartToReadySeconds']:.2f} s;"
        f" to first trained step {r['coldStartToFirstStepSeconds']:.2f} s.",
        "",
        "| random wait before the PUT s | PUT to admitted s | PUT to first step s | DELETE answered s |",
        "|---:|---:|---:|---:|",
        *(
            f"| {t['delaySeconds']:.2f} | {t['putToAdmittedSeconds']:.2f}"
            f" | {t['putToFirstStepSeconds']:.2f} | {t.get('deleteAnswerSeconds', float('nan')):.2f} |"
            for t in r["joins"]
        ),
        "",
    ]


def vllm_seeds_section(name: str, r: dict[str, Any]) -> list[str]:
    c = r["config"]
    return [
        f"### vLLM: what per-row seeds cost (`{c['model']}` on {c['device']}, {name})",
        *_command(r),
        f"The same {c['rows']} rows ({c['adapters']} adapters, {c['tokens']} tokens each, EOS ignored)"
        f" sampled by vLLM with a seed per row and without, alternated {c['repeats']} times:",
        "",
        f"- seeded / unseeded wall time: **{r['seededOverUnseeded']:.3f}x"
        f" ± {r['seededOverUnseededSe']:.3f}**;"
        f" median extra per decode step {r['medianExtraMsPerDecodeStep']:.2f} ms.",
        "- seeded s: "
        + ", ".join(f"{x:.2f}" for x in r["seededSeconds"])
        + "; unseeded s: "
        + ", ".join(f"{x:.2f}" for x in r["unseededSeconds"])
        + ".",
        "",
    ]


def revisions_section(name: str, r: dict[str, Any]) -> list[str]:
    c = r["config"]
    lines = [
        f"### Tick phases before and after ({c['model']}, {c['experiments']} experiments x {c['steps']}"
        f" steps; before = {r['before']}; {name})",
        *_command(r),
        f"Runs of both revisions alternated in one session ({c['pairs']} pairs); first tick of each run"
        " left out; after/before per pair, mean ± standard error:",
        "",
        "| phase | before s/tick | after s/tick | after / before |",
        "|---|---:|---:|---:|",
    ]
    for phase, v in r["phases"].items():
        lines.append(
            f"| {phase} | {v['beforeSeconds']:.3f} | {v['afterSeconds']:.3f}"
            f" | {v['afterOverBefore']:.3f} ± {v['afterOverBeforeSe']:.3f} |"
        )
    return [*lines, ""]


def ops_section(name: str, r: dict[str, Any], before: dict[str, Any] | None = None) -> list[str]:
    """Operator counts of one `clora bench ops` run; with `before` (the same command on the code before
    the GPU-host-work issue, ops-before-*.json), each count beside the earlier one."""
    c = r["config"]
    lines = [
        f"### Operator calls per decode step and training micro-batch (`{c['model']}`, {c['dtype']}, {name})",
        *_command(r),
        f"Machine: {_machine(r['machine'])}. {c['wrappedLinears']} wrapped linears, rank {c['rank']},"
        f" {c['rows']} decode rows and {c['trainRows']} training rows spread evenly over the adapters;"
        f" host syncs every {c['syncEvery']} decode step(s). Counted: {c['counting']}"
        + ("; before: the same command on the code before the GPU-host-work issue." if before else "."),
        "",
        "| adapters | per decode step | per wrapped linear per decode step | host syncs per decode step"
        " | per training micro-batch |",
        "|---:|---:|---:|---:|---:|",
    ]

    def cell(n: str, part: str, key: str, fmt: str) -> str:
        now = format(r["adapters"][n][part][key], fmt)
        if before is None or n not in before["adapters"]:
            return now
        return f"{format(before['adapters'][n][part][key], fmt)} -> **{now}**"

    for n in r["adapters"]:
        lines.append(
            f"| {n} | {cell(n, 'decode', 'perDecodeStep', '.0f')}"
            f" | {cell(n, 'decode', 'perWrappedLinearPerDecodeStep', '.1f')}"
            f" | {cell(n, 'decode', 'hostSyncsPerDecodeStep', '.2f')}"
            f" | {cell(n, 'train', 'perMicroBatch', '.0f')} |"
        )
    return [*lines, ""]


def replicas_section(name: str, r: dict[str, Any]) -> list[str]:
    c = r["config"]
    lines = [
        f"### Replicas: a pod of 2 (Ray actors) vs 1 (`{c['model']}`, {c['experiments']} experiments,"
        f" {c['threadsPerReplica']} threads per replica, {name})",
        *_command(r),
        f"Machine: {_machine(r['machine'])}. Real `clora runtime` processes; throughput over"
        f" {c['windows']} windows of {c['windowSeconds']:g} s after a warm-up (mean ± standard error);"
        " memory is the proportional set size of every process of the pod (one replica: its engine is in"
        " the pod's own process).",
        "",
        "| pod | spawn to ready s | ray.init s | experiment steps/s | PSS engines MB"
        " | PSS pod process + Ray MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm, a in r["arms"].items():
        m = a["memoryMB"]
        lines.append(
            f"| {arm} | {a['readySeconds']:.1f} | {_f(a['rayInitSeconds'], '.1f')}"
            f" | {a['stepsPerSecond']:.2f} ± {a['stepsPerSecondSe']:.2f}"
            f" | {m['engines']:.0f} | {m['rest']:.0f} |"
        )
    lines += [
        "",
        f"- 2 replicas / 1: **{r['twoOverOne']:.2f}x ± {r['twoOverOneSe']:.2f}** steps/s. Both pods share"
        f" this machine's {r['machine'].get('cpuCount')} cores, so a second replica cannot add compute"
        " here: below 1 is the cost of two engine processes on the same cores, above 1 what one engine"
        " left idle.",
        f"- Ray start-up: ray.init {_f(r['rayStartupSeconds'], '.1f')} s; spawn to ready"
        f" {r['extraReadySeconds']:+.1f} s against one replica.",
        f"- Memory beyond two one-replica pods: {r['podMemoryOverheadMB']:.0f} MB (the pod's own process"
        " and Ray's daemons).",
    ]
    rec = r["arms"].get("2 replicas", {}).get("recovery")
    if rec:
        lines.append(
            f"- kill -9 of one replica's process, {rec['kills']} times: to `/readyz` 200 again (restarted,"
            f" model loaded, its experiments re-admitted from their newest checkpoints)"
            f" **{rec['killToReadySeconds']:.1f} ± {rec['killToReadySecondsSe']:.1f} s**; to each of them"
            f" stepping again {rec['killToSteppingSeconds']:.1f} ± {rec['killToSteppingSecondsSe']:.1f} s."
        )
    return [*lines, ""]


def verifier_section(name: str, r: dict[str, Any]) -> list[str]:
    c = r["config"]
    lines = [
        f"### Verifier: what an HTTP verifier adds to a tick (`{c['model']}`, {name})",
        *_command(r),
        f"Machine: {_machine(r['machine'])}. The same problems scored by the built-in exact-match reward"
        " and by examples/continual/verifier.py (the same rule) on loopback, runs alternated"
        f" ({c['rounds']} each, {c['ticks']} ticks timed per run, {c['itemsPerStep']} completions per"
        " experiment step); the reward phase of a tick, mean ± standard error:",
        "",
        "| experiments | built in ms/tick | verifier ms/tick | overhead ms/tick |",
        "|---:|---:|---:|---:|",
    ]
    for n, e in r["experiments"].items():
        b, v = e["builtinRewardSeconds"], e["verifierRewardSeconds"]
        lines.append(
            f"| {n} | {b['mean'] * 1000:.1f} ± {b['se'] * 1000:.1f}"
            f" | {v['mean'] * 1000:.1f} ± {v['se'] * 1000:.1f}"
            f" | {e['overheadMsPerTick']:.1f} ± {e['overheadMsPerTickSe']:.1f} |"
        )
    return [*lines, ""]


def render(results: Path, output: Path) -> str:
    out = [
        "# Benchmarks",
        "",
        "Regenerated by `scripts/bench.sh`; every figure comes from a JSON file it wrote, with the command",
        "that wrote it and the machine it ran on. Ratios are measured side by side in one run, each beside",
        "the limit that bounds it.",
        "",
    ]
    order = (
        "throughput",
        "rewards",
        "scaling",
        "join",
        "revisions",
        "ops",
        "replicas",
        "verifier",
        "vllm-seeds",
    )
    paths = [p for p in results.glob("*.json") if p.stem.startswith(order)]
    for path in sorted(
        paths, key=lambda p: (next(i for i, o in enumerate(order) if p.stem.startswith(o)), p.stem)
    ):
        r = json.loads(path.read_text())
        name = path.stem
        if name.startswith("throughput"):
            out += throughput_section(name, r)
        elif name.startswith("rewards"):
            out += rewards_section(name, r)
        elif name.startswith("scaling"):
            out += scaling_section(name, r)
        elif name.startswith("join"):
            out += join_section(name, r)
        elif name.startswith("revisions"):
            out += revisions_section(name, r)
        elif name.startswith("ops-before-"):
            continue  # shown beside its after-run
        elif name.startswith("ops"):
            earlier = path.with_name(name.replace("ops-", "ops-before-", 1) + ".json")
            out += ops_section(name, r, json.loads(earlier.read_text()) if earlier.exists() else None)
        elif name.startswith("vllm-seeds"):
            out += vllm_seeds_section(name, r)
        elif name.startswith("replicas"):
            out += replicas_section(name, r)
        elif name.startswith("verifier"):
            out += verifier_section(name, r)
        png = path.with_suffix(".png")
        if png.exists():
            out += [f"![{name}]({os.path.relpath(png, output.parent)})", ""]
    for path in sorted(results.glob("gpu-check*.md")):
        out += gpu_check_section(path)
    from clora_runtime.bench.throughput import KEYS

    out += ["### The throughput JSON's keys", "", "| key | meaning |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in KEYS.items()]
    out.append("")
    notes = results / "notes.md"
    if notes.exists():
        out += [notes.read_text().strip(), ""]
    return "\n".join(out)


def main(argv: list[str]) -> int:
    results, output = Path(argv[0]), Path(argv[1])
    output.write_text(render(results, output))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
