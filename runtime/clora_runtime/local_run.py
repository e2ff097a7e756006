"""`clora run -f DIR`: train every experiment in a folder on one in-process warm runtime, no cluster.

It reads the LoRARuntime and LoRAExperiments in DIR (checked as `clora validate` checks them), loads
the base model once, trains all experiments together tick by tick with a live table, and writes each
final adapter to OUTPUT/NAMESPACE/NAME/, a summary JSON and a PNG of the reward curves. Experiments
beyond the runtime's slots wait and join as others finish. Ctrl-C stops after the running tick,
checkpoints and writes what it has; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clora.api import LoRAExperiment, LoRARuntime

log = logging.getLogger(__name__)

TERMINAL = ("Succeeded", "Failed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-f", "--filename", required=True, metavar="DIR", help="folder (or file) of manifests"
    )
    parser.add_argument("--model", help="override the runtime's baseModel: smollm2 | tiny | HF id | path")
    parser.add_argument("--steps", type=int, help="override every experiment's training.steps")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--output", default="clora-output", help="where adapters, summary and plot go")
    parser.add_argument("--json", dest="json_file", help="summary JSON path (default: OUTPUT/summary.json)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--runtime", help="the LoRARuntime to run, when the folder has several")
    parser.add_argument(
        "--rollouts",
        metavar="FILE.jsonl",
        help="write every completion (prompt, completion, reward, advantage, sampler and trainer"
        " log-probs) as one JSON object per line",
    )


# -- manifests --------------------------------------------------------------------------------------


class ManifestError(Exception):
    """The folder cannot be run; the message lists every problem, one per line."""


Secrets = dict[tuple[str, str], dict[str, str]]  # (namespace, name) -> key -> value


def load_folder(path: str) -> tuple[list[LoRARuntime], list[LoRAExperiment], Secrets, Secrets]:
    """The folder's LoRARuntimes, LoRAExperiments, Secrets (a verifier's token, as a cluster would
    hold it: `data` base64-encoded or `stringData`) and ConfigMaps (a dataset's records, `data`)."""
    from clora import validation

    report = validation.validate([path])
    if report.errors:
        raise ManifestError("\n".join(str(p) for p in report.errors))
    manifests, _ = validation.load_paths([path])
    runtimes: list[LoRARuntime] = []
    experiments: list[LoRAExperiment] = []
    secrets: Secrets = {}
    config_maps: Secrets = {}
    for manifest in manifests:
        if manifest.kind == "LoRARuntime":
            runtimes.append(LoRARuntime.model_validate(manifest.body))
        elif manifest.kind == "LoRAExperiment":
            experiments.append(LoRAExperiment.model_validate(manifest.body))
        elif manifest.kind == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (manifest.body.get("data") or {}).items()}
            secrets[(manifest.namespace, manifest.name)] = data | dict(manifest.body.get("stringData") or {})
        elif manifest.kind == "ConfigMap":
            config_maps[(manifest.namespace, manifest.name)] = dict(manifest.body.get("data") or {})
    return runtimes, experiments, secrets, config_maps


def _referenced(experiment: LoRAExperiment, store: Secrets, ref: Any, field: str, kind: str) -> str | None:
    """The value a {name, key} reference of the experiment names in the folder's objects of `kind`
    (as the operator reads it in the experiment's namespace); None without a reference; ManifestError
    if absent."""
    if ref is None:
        return None
    value = store.get((experiment.metadata.namespace, ref.name), {}).get(ref.key)
    if value is None:
        raise ManifestError(
            f"LoRAExperiment {experiment.metadata.name}: {field}: no {kind} {ref.name} with key"
            f" {ref.key} in the folder"
        )
    return value


def dataset_text(experiment: LoRAExperiment, config_maps: Secrets) -> str | None:
    """The records of spec.task.dataset.configMap (sent to the runtime as the operator sends them)."""
    dataset = experiment.spec.task.dataset
    ref = dataset.config_map if dataset is not None else None
    return _referenced(experiment, config_maps, ref, "spec.task.dataset.configMap", "ConfigMap")


def verifier_token(experiment: LoRAExperiment, secrets: Secrets) -> str | None:
    """The value of spec.task.verifier.tokenSecret from the folder's Secrets."""
    verifier = experiment.spec.task.verifier
    ref = verifier.token_secret if verifier is not None else None
    return _referenced(experiment, secrets, ref, "spec.task.verifier.tokenSecret", "Secret")


def choose(
    runtimes: list[LoRARuntime], experiments: list[LoRAExperiment], wanted: str | None
) -> tuple[LoRARuntime, list[LoRAExperiment]]:
    if not runtimes:
        raise ManifestError("no LoRARuntime in the folder: clora run needs one to know the base model")
    if wanted is None:
        used = {(e.metadata.namespace, e.spec.runtime) for e in experiments}
        candidates = [r for r in runtimes if (r.metadata.namespace, r.metadata.name) in used] or runtimes
        if len(candidates) > 1:
            names = ", ".join(r.metadata.name for r in candidates)
            raise ManifestError(f"several LoRARuntimes ({names}): pick one with --runtime")
        runtime = candidates[0]
    else:
        found = [r for r in runtimes if r.metadata.name == wanted]
        if not found:
            raise ManifestError(f"--runtime: no LoRARuntime named {wanted}")
        runtime = found[0]
    mine = [
        e
        for e in experiments
        if e.spec.runtime == runtime.metadata.name and e.metadata.namespace == runtime.metadata.namespace
    ]
    if not mine:
        raise ManifestError(f"no LoRAExperiment uses the LoRARuntime {runtime.metadata.name}")
    return runtime, mine


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class Tracked:
    experiment: LoRAExperiment
    total_steps: int | None = None  # after --steps
    started: float | None = None
    finished: float | None = None
    adapter_dir: str | None = None
    rewards: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    phase: str = "Queued"
    step: int = 0
    message: str = ""
    stats: dict[str, Any] = field(default_factory=dict)  # RL statistics of the last step (camelCase)
    published: dict[str, Any] | None = None  # the version spec.publish sent to serving

    @property
    def namespace(self) -> str:
        return self.experiment.metadata.namespace

    @property
    def name(self) -> str:
        return self.experiment.metadata.name


class Stopper:
    """First Ctrl-C: stop after the running tick. Second: stop now."""

    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nclora: stopping after this tick (Ctrl-C again to stop now)", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        runtimes, experiments, secrets, config_maps = load_folder(args.filename)
        runtime, chosen = choose(runtimes, experiments, args.runtime)
        specs = {}
        tokens = {(e.metadata.namespace, e.metadata.name): verifier_token(e, secrets) for e in chosen}
        texts = {(e.metadata.namespace, e.metadata.name): dataset_text(e, config_maps) for e in chosen}
        for exp in chosen:
            spec = exp.spec
            if args.steps is not None:
                spec = spec.model_copy(
                    update={"training": spec.training.model_copy(update={"steps": args.steps})}
                )
            if spec.training.steps is None:
                raise ManifestError(
                    f"LoRAExperiment {exp.metadata.name}: spec.training.steps is unset (continual);"
                    " set it or pass --steps to run it locally"
                )
            if spec.suspend:
                spec = spec.model_copy(update={"suspend": False})
            specs[(exp.metadata.namespace, exp.metadata.name)] = spec
    except ManifestError as err:
        print(f"clora run: {err}", file=sys.stderr)
        return 1
    return _run(args, runtime, chosen, specs, tokens, texts)


def _run(
    args: argparse.Namespace,
    runtime: LoRARuntime,
    chosen: list[LoRAExperiment],
    specs: dict,
    tokens: dict[tuple[str, str], str | None],
    texts: dict[tuple[str, str], str | None],
) -> int:
    from rich.console import Console
    from rich.live import Live

    from clora.metrics import RuntimeMetrics
    from clora_runtime.config import EngineConfig
    from clora_runtime.engine import Engine

    console = Console(stderr=True)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    cap = runtime.spec.capacity
    config = EngineConfig(
        model=args.model or runtime.spec.base_model,
        device=args.device,
        dtype=runtime.spec.dtype,
        attn_implementation=runtime.spec.attention_implementation,
        sampler=runtime.spec.sampler,
        vllm_gpu_memory_utilization=runtime.spec.gpu_memory_utilization,
        vllm_max_num_seqs=runtime.spec.max_num_seqs,
        vllm_enforce_eager=runtime.spec.enforce_eager,
        max_adapters=cap.max_adapters,
        max_rank=cap.max_rank,
        tokens_per_tick=cap.tokens_per_tick,
        checkpoint_dir=output / "checkpoints",
        # Dataset paths may name files beside the manifests or under the working directory (as the
        # examples' relative paths do); the runtime of a cluster reads only its mounted volumes.
        dataset_roots=[_manifest_folder(args.filename), Path.cwd()],
        threads=args.threads,
    )
    if runtime.spec.replicas > 1:
        # A laptop has one device: the replicas' slots are run by one engine instead.
        config = config.model_copy(update={"max_adapters": min(runtime.spec.slots_per_pod(), 256)})
        console.print(
            f"clora: spec.replicas {runtime.spec.replicas} runs one engine per GPU in a runtime pod; here one"
            f" engine takes their {config.max_adapters} slots"
        )
    t_start = time.perf_counter()
    console.print(f"clora: loading {config.model} ...")
    engine = Engine(config, RuntimeMetrics.create())
    engine.load()
    load_seconds = time.perf_counter() - t_start
    console.print(
        f"clora: {config.model} on {engine.base.device} ({engine.base.dtype}) loaded in {load_seconds:.1f}s;"
        f" {len(chosen)} experiments, {config.max_adapters} slots"
    )
    tracked = {
        (e.metadata.namespace, e.metadata.name): Tracked(
            e, specs[(e.metadata.namespace, e.metadata.name)].training.steps
        )
        for e in chosen
    }
    waiting = list(tracked)
    stopper = Stopper()
    previous = signal.signal(signal.SIGINT, stopper)
    totals = {"ticks": 0, "sampled": 0, "trained": 0, "seconds": 0.0}
    interrupted = False
    rollouts = Path(args.rollouts).open("w") if args.rollouts else None  # noqa: SIM115 - closed below

    def admit() -> None:
        while waiting and engine.free_slots > 0:
            key = waiting.pop(0)
            try:
                engine.upsert(key[0], key[1], specs[key], None, tokens[key], texts[key])
            except Exception as err:  # a bad experiment fails alone
                t = tracked[key]
                t.phase, t.message = "Failed", str(err)
                continue
            tracked[key].started = time.perf_counter()
            tracked[key].phase = "Pending"

    def collect() -> None:
        for state in engine.states():
            t = tracked[(state.namespace, state.name)]
            t.phase, t.step, t.message = state.phase, state.step, state.message
            t.stats = state.stats.model_dump(mode="json", by_alias=True)
            if state.published is not None:
                t.published = state.published.model_dump(mode="json", by_alias=True)
            t.rewards, t.step_seconds = engine.experiment_history(state.namespace, state.name)
            if state.phase in TERMINAL and t.finished is None:
                finish(t)

    def finish(t: Tracked) -> None:
        t.finished = time.perf_counter()
        key = f"{t.namespace}/{t.name}"
        if engine.bank is not None and key in engine.bank.adapters and t.step > 0:
            t.adapter_dir = str(engine.bank.export_peft(key, output / t.namespace / t.name))
        engine.remove(t.namespace, t.name)  # checkpoints (unless failed) and frees the slot

    def write_rollouts(report: Any) -> None:
        if rollouts is None:
            return
        for items in report.rollouts.values():
            for item in items:
                rollouts.write(json.dumps(item.model_dump(mode="json", by_alias=True)) + "\n")
        rollouts.flush()

    try:
        with Live(_table(tracked, totals), console=console, refresh_per_second=2, transient=False) as live:
            admit()
            while not stopper.requested:
                report = engine.tick()
                if report is not None:
                    write_rollouts(report)
                collect()
                admit()
                if report is not None:
                    totals["ticks"] += 1
                    totals["sampled"] += report.tokens_sampled
                    totals["trained"] += report.tokens_trained
                    totals["seconds"] += report.duration
                    totals["last"] = report
                    if not console.is_terminal:  # a log, not a table, when piped
                        print(_line(report, tracked), file=sys.stderr, flush=True)
                live.update(_table(tracked, totals))
                if report is None and not waiting:
                    break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGINT, previous)
        if rollouts is not None:
            rollouts.close()
    interrupted = interrupted or stopper.requested
    if interrupted:
        console.print("clora: interrupted; checkpointing")
        engine.checkpoint_all()
        for state in engine.states():
            t = tracked[(state.namespace, state.name)]
            t.phase, t.step = state.phase, state.step
            t.rewards, t.step_seconds = engine.experiment_history(state.namespace, state.name)
            if t.finished is None:
                finish(t)
    wall = time.perf_counter() - t_start
    summary = _summary(config, engine, tracked, totals, wall, load_seconds, interrupted)
    json_path = Path(args.json_file) if args.json_file else output / "summary.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    png = output / "rewards.png"
    plot_rewards(tracked, png, f"{config.model}: mean reward per step")
    console.print(
        f"clora: wall time {wall:.1f}s; adapters in {output}/NAMESPACE/NAME, summary {json_path}, plot {png}"
    )
    for t in tracked.values():
        first = f"{t.rewards[0]:.3f}" if t.rewards else "-"
        last = f"{t.rewards[-1]:.3f}" if t.rewards else "-"
        console.print(
            f"  {t.namespace}/{t.name}: {t.phase} step {t.step}, reward {first} -> {last} {t.message}"
        )
    if interrupted:
        return 130
    return 0 if all(t.phase == "Succeeded" for t in tracked.values()) else 1


def _manifest_folder(filename: str) -> Path:
    path = Path(filename).resolve()
    return path if path.is_dir() else path.parent


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summary(
    config: Any, engine: Any, tracked: dict, totals: dict, wall: float, load: float, stopped: bool
) -> dict:
    return {
        "model": config.model,
        "device": str(engine.base.device),
        "dtype": str(engine.base.dtype).removeprefix("torch."),
        "wallSeconds": round(wall, 3),
        "loadSeconds": round(load, 3),
        "interrupted": stopped,
        "ticks": totals["ticks"],
        "tokensSampled": totals["sampled"],
        "tokensTrained": totals["trained"],
        "tokensSampledPerSecond": round(totals["sampled"] / totals["seconds"], 2)
        if totals["seconds"]
        else None,
        "experiments": [
            {
                "namespace": t.namespace,
                "name": t.name,
                "phase": t.phase,
                "message": t.message,
                "finalStep": t.step,
                "totalSteps": t.total_steps,
                "rewardPerStep": t.rewards,
                "firstReward": t.rewards[0] if t.rewards else None,
                "lastReward": t.rewards[-1] if t.rewards else None,
                "wallSeconds": round((t.finished or time.perf_counter()) - t.started, 3)
                if t.started
                else None,
                "stepSeconds": [round(s, 4) for s in t.step_seconds],
                "stats": t.stats,
                "published": t.published,
                "adapter": t.adapter_dir,
            }
            for t in tracked.values()
        ],
    }


def _table(tracked: dict, totals: dict) -> Any:
    from rich.table import Table

    last = totals.get("last")
    rate = totals["sampled"] / totals["seconds"] if totals["seconds"] else 0.0
    caption = f"tick {totals['ticks']}  sampled {totals['sampled']} tok  {rate:.1f} tok/s"
    if last is not None:
        caption += "  last tick " + " ".join(f"{k} {v:.1f}s" for k, v in last.seconds.items())
    table = Table(title="clora run", caption=caption)
    for column in ("experiment", "phase", "step", "reward", "best", "window(10)", "first"):
        table.add_column(column, justify="left" if column in ("experiment", "phase") else "right")
    for t in tracked.values():
        total = t.total_steps
        r = t.rewards
        table.add_row(
            f"{t.namespace}/{t.name}",
            t.phase if not t.message or t.phase != "Failed" else f"Failed: {t.message[:60]}",
            f"{t.step}/{total}" if total else str(t.step),
            f"{r[-1]:.3f}" if r else "-",
            f"{max(r):.3f}" if r else "-",
            f"{_mean(r[-10:]):.3f}" if r else "-",
            f"{r[0]:.3f}" if r else "-",
        )
    return table


def _line(report: Any, tracked: dict) -> str:
    rate = report.tokens_sampled / report.duration if report.duration else 0.0
    rewards = " ".join(f"{k.split('/', 1)[1]}={v:.2f}" for k, v in report.rewards.items())
    return f"tick {report.tick} ({report.duration:.1f}s, {rate:.0f} tok/s): {rewards}"


def plot_rewards(tracked: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for t in tracked.values():
        if not t.rewards:
            continue
        steps = list(range(1, len(t.rewards) + 1))
        (line,) = ax.plot(steps, t.rewards, alpha=0.35, linewidth=1)
        window = 5
        smooth = [_mean(t.rewards[max(0, i - window + 1) : i + 1]) for i in range(len(t.rewards))]
        ax.plot(steps, smooth, color=line.get_color(), linewidth=2, label=f"{t.namespace}/{t.name}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (thin: per step, thick: mean of last 5)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
