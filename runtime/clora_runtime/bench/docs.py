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


def throughput_section(name: str, r: dict[str, Any]) -> list[str]:
    lines = [
        f"### Throughput: {r['experiments']} experiments x {r['steps']} steps on `{r['model']}` ({name})",
        "",
        f"Machine: {_machine(r['machine'])}.",
        "",
        "| arm | wall s | experiments/hour | mean completion s | step s | cold start s | peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, a in r["arms"].items():
        lines.append(
            f"| {arm} | {a['wallSeconds']:.1f} | {a['experimentsPerHour']:.1f}"
            f" | {a['meanCompletionSeconds']:.1f}"
            f" | {_f(a['stepLatencySeconds'])} | {a['coldStartSeconds']:.1f} | {a['peakMemoryMB']:.0f} |"
        )
    c = r["ceiling"]
    cmp = r["rewardComparison"]
    lines += [
        "",
        f"- Throughput ratio, concurrent over serial: **{r['throughputRatio']:.2f}x**; "
        "the hardware's ceiling "
        f"for this workload: {c['ratio']:.2f}x; efficiency (measured / ceiling): **{c['efficiency']:.0%}**.",
    ]
    if "trlRatio" in r:
        lines.append(f"- Against TRL's GRPOTrainer, one experiment at a time: **{r['trlRatio']:.2f}x**.")
    lines.append(
        f"- Final reward (mean of the last 3 steps), concurrent minus serial: {cmp['meanDifference']:+.4f}; "
        f"sampling noise of that mean: {cmp['noiseOfMeanDifference']:.4f}; "
        f"no regression: {cmp['noRegression']}."
    )
    phases = r["arms"]["concurrent"]["phaseSecondsPerTick"]
    lines.append(
        "- Time per tick by phase (concurrent): "
        + ", ".join(f"{p} {s:.3f} s" for p, s in phases.items())
        + "."
    )
    lines.append("")
    lines.append("| rows | sample s | forward+backward s |")
    lines.append("|---:|---:|---:|")
    for p in c["points"]:
        lines.append(f"| {p['rows']} | {p['sample_seconds']:.3f} | {p['train_seconds']:.3f} |")
    lines.append("")
    lines.append(
        f"Raw base-model figures for the ceiling ({c['promptTokens']} prompt + {c['newTokens']} new tokens"
        " per row)."
    )
    lines.append("")
    return lines


def scaling_section(name: str, r: dict[str, Any]) -> list[str]:
    lines = [
        f"### Scaling on `{r['model']}` ({name})",
        "",
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
        "",
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


def render(results: Path, output: Path) -> str:
    out = [
        "# Benchmarks",
        "",
        "Regenerated by `scripts/bench.sh` (the commands it runs are listed below); every figure comes from",
        "a JSON file it wrote, with the machine it ran on. Ratios are measured side by side in one run.",
        "",
    ]
    for commands in sorted(results.glob("commands*.txt")):
        out += ["```", commands.read_text().strip(), "```", ""]
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        name = path.stem
        if name.startswith("throughput"):
            out += throughput_section(name, r)
        elif name.startswith("scaling"):
            out += scaling_section(name, r)
        elif name.startswith("join"):
            out += join_section(name, r)
        png = path.with_suffix(".png")
        if png.exists():
            out += [f"![{name}]({os.path.relpath(png, output.parent)})", ""]
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
