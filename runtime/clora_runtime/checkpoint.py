"""Checkpoints of one adapter: PEFT files, optimizer state, RNG state, step and reward history.

Layout: <checkpoint_dir>/<namespace>/<name>/step-<step:08d>-<run>/
    adapter_model.safetensors, adapter_config.json   (PEFT / vLLM loadable)
    optimizer.pt                                      (AdamW state of this adapter)
    state.json                                        (step, run id, reward history, queue position, spec)
    rng.pt                                            (torch RNG state, for completeness: the engine
                                                       derives every random draw from (seed, step))
Each checkpoint is written into a hidden staging folder, fsynced and renamed into place, so a crash
leaves either the whole checkpoint or none (and the run's next checkpoint removes the staging folder
a crash left). Only the newest `keep` of the run are kept.

A run is one registration's training: a PUT without resumeFrom starts one (a new run id), a resume
from one of its checkpoints continues it. Pruning and the pushed-samples queue belong to one run, so
another registration under the same name (another tenant's PUT, say) never prunes a run's
checkpoints or feeds its queue. Checkpoints written before run ids (step-<step:08d>, no runId) are
the run "" and stay resumable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from clora_runtime.lora.bank import AdapterBank

PREFIX = "step-"
RUN_ID_LENGTH = 16  # hex digits of a run id (64 random bits)
_NAME = re.compile(r"^step-(\d{8,})(?:-([0-9a-f]+))?$")
ADAPTER_FILE = "adapter_model.safetensors"


@dataclass
class TrainingState:
    """What besides weights a resumed run needs."""

    step: int = 0
    rewards: list[float] = field(default_factory=list)  # mean reward of every step so far
    queue_consumed: int = 0  # pushed samples already trained on
    extra: dict[str, Any] = field(default_factory=dict)
    run_id: str = ""


def new_run_id() -> str:
    return uuid.uuid4().hex[:RUN_ID_LENGTH]


def experiment_dir(root: Path, namespace: str, name: str) -> Path:
    return Path(root) / namespace / name


def folder_name(step: int, run_id: str) -> str:
    return f"{PREFIX}{step:08d}" + (f"-{run_id}" if run_id else "")


def run_of(folder: Path) -> str | None:
    """The run id a checkpoint folder's name carries ("" for one from before run ids); None when
    the name is not a checkpoint's."""
    match = _NAME.match(Path(folder).name)
    return None if match is None else (match.group(2) or "")


def list_checkpoints(directory: Path, run_id: str | None = None) -> list[Path]:
    """Checkpoint folders of one experiment (of one run when run_id is given), oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        match = _NAME.match(p.name)
        if match and p.is_dir() and (run_id is None or (match.group(2) or "") == run_id):
            found.append((int(match.group(1)), p.name, p))
    return [p for _, _, p in sorted(found)]


def _step_of_name(folder: Path) -> int:
    match = _NAME.match(folder.name)
    return int(match.group(1)) if match else -1


def resolve_resume(path: str, own: Path) -> Path:
    """The checkpoint to resume from: `path`, which must lie (symlinks and .. followed) inside `own`,
    the experiment's own folder; or, when keep-pruning removed it after the caller last looked (the
    operator's view of lastCheckpoint lags the runtime by a poll), the newest checkpoint of the same
    run beside it, which loses fewer steps. ValueError naming resumeFrom otherwise."""
    folder = Path(path)
    mine = Path(own).resolve()
    real = folder.resolve()
    if real == mine or not real.is_relative_to(mine):
        raise ValueError(f"resumeFrom: {path} is not a checkpoint of this experiment (those lie in {own})")
    if (folder / ADAPTER_FILE).is_file():
        return folder
    run = run_of(folder)
    if run is not None:
        named = _step_of_name(folder)
        newer = [
            p
            for p in list_checkpoints(folder.parent, run)
            if (p / ADAPTER_FILE).is_file() and _step_of_name(p) > named
        ]
        if newer:
            return newer[-1]
    if not folder.is_dir():
        raise ValueError(f"resumeFrom: {path} does not exist or is not a folder")
    raise ValueError(f"resumeFrom: {path} is not a clora checkpoint (no {ADAPTER_FILE})")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clean_staging(directory: Path, run_id: str) -> None:
    """Staging folders of this run that a crash left (another run's may be in use)."""
    for p in directory.iterdir():
        # .<target name>.<random>, as save() names them
        target = p.name[1:].split(".")[0]
        if p.name.startswith(f".{PREFIX}") and p.is_dir() and run_of(Path(target)) == run_id:
            shutil.rmtree(p, ignore_errors=True)


def save(
    bank: AdapterBank, key: str, directory: Path, state: TrainingState, keep: int
) -> tuple[Path, datetime]:
    directory.mkdir(parents=True, exist_ok=True)
    _clean_staging(directory, state.run_id)
    target = directory / folder_name(state.step, state.run_id)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=directory))
    try:
        bank.export_peft(key, staging)
        adapter = bank.adapters[key]
        torch.save(adapter.optimizer.state_dict(), staging / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state()}, staging / "rng.pt")
        now = datetime.now(UTC)
        meta = {
            "key": key,
            "step": state.step,
            "runId": state.run_id,
            "rewards": state.rewards,
            "queueConsumed": state.queue_consumed,
            "time": now.isoformat(),
            **state.extra,
        }
        (staging / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
        # Durable before it is visible: a power loss after the rename never leaves empty files.
        for file in staging.iterdir():
            _fsync(file)
        _fsync(staging)
        if target.exists():  # the same step again (e.g. removal right after a periodic checkpoint)
            shutil.rmtree(target)
        staging.rename(target)
        _fsync(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(directory, state.run_id)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target, now


def _meta(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint, its fields checked; {} when it has none."""
    meta_file = Path(path) / "state.json"
    if not meta_file.is_file():
        return {}
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"resumeFrom: {path}/state.json is not JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"resumeFrom: {path}/state.json is not an object")

    def count(name: str) -> None:
        value = meta.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"resumeFrom: {path}/state.json: {name} is {value!r}, not a count")

    count("step")
    count("queueConsumed")
    rewards = meta.get("rewards", [])
    if not isinstance(rewards, list) or any(
        isinstance(r, bool) or not isinstance(r, int | float) for r in rewards
    ):
        raise ValueError(f"resumeFrom: {path}/state.json: rewards is not a list of numbers")
    run = meta.get("runId", "")
    if not isinstance(run, str) or (run and not re.fullmatch(r"[0-9a-f]+", run)):
        raise ValueError(f"resumeFrom: {path}/state.json: runId is {run!r}, not a run id")
    return meta


def read_step(path: Path) -> int:
    """The step a checkpoint was taken at (from its state.json; 0 when it has none)."""
    return int(_meta(path).get("step", 0))


def read_run(path: Path) -> str:
    """The run a checkpoint belongs to ("" for one from before run ids)."""
    return str(_meta(path).get("runId", ""))


def _check_shapes(path: Path, bank: AdapterBank, key: str) -> None:
    """Every tensor the adapter needs is in the file with the adapter's shape: copy_ would broadcast
    a (1, n) tensor over (r, n) and resume from garbage instead of failing."""
    from safetensors import safe_open

    adapter = bank.adapters[key]
    with safe_open(str(path / ADAPTER_FILE), framework="pt") as f:
        names = set(f.keys())
        for module in adapter.modules:
            prefix = f"base_model.model.{module}"
            for part, want in (("lora_A", adapter.a[module]), ("lora_B", adapter.b[module])):
                name = f"{prefix}.{part}.weight"
                if name not in names:
                    raise ValueError(f"resumeFrom: {path} has no tensor {name}")
                got = tuple(f.get_slice(name).get_shape())
                if got != tuple(want.shape):
                    raise ValueError(
                        f"resumeFrom: {path}: {name} has shape {list(got)}, the experiment's is"
                        f" {list(want.shape)}"
                    )


def _check_optimizer(path: Path, state: dict[str, Any], bank: AdapterBank, key: str) -> None:
    """The optimizer state matches the adapter's parameters, tensor for tensor."""
    params = [p for group in bank.adapters[key].optimizer.param_groups for p in group["params"]]
    per_param = state.get("state") if isinstance(state, dict) else None
    if not isinstance(per_param, dict):
        raise ValueError(f"resumeFrom: {path}/optimizer.pt is not an optimizer state")
    for index, values in per_param.items():
        if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(values, dict):
            raise ValueError(f"resumeFrom: {path}/optimizer.pt: state {index!r} matches no parameter")
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise ValueError(
                    f"resumeFrom: {path}/optimizer.pt: {name} of parameter {index} has shape"
                    f" {list(value.shape)}, the parameter's is {list(params[index].shape)}"
                )


def load(bank: AdapterBank, key: str, path: Path) -> TrainingState:
    """Load weights and optimizer state into the adapter `key` (already in the bank, same shape)."""
    path = Path(path)
    if not (path / ADAPTER_FILE).is_file():
        raise ValueError(f"resumeFrom: {path} is not a clora checkpoint (no {ADAPTER_FILE})")
    meta = _meta(path)
    config = json.loads((path / "adapter_config.json").read_text())
    adapter = bank.adapters[key]
    if int(config["r"]) != adapter.shape.rank:
        raise ValueError(
            f"resumeFrom: {path} has rank {config['r']}, the experiment asks for {adapter.shape.rank}"
        )
    _check_shapes(path, bank, key)
    optimizer_state = None
    optimizer_file = path / "optimizer.pt"
    if optimizer_file.is_file():
        optimizer_state = torch.load(optimizer_file, map_location="cpu", weights_only=True)
        _check_optimizer(path, optimizer_state, bank, key)
    bank.load_peft_weights(key, path)
    if optimizer_state is not None:
        adapter.optimizer.load_state_dict(optimizer_state)
        # load_state_dict casts state onto the parameters' device; lr comes from the spec each step.
    return TrainingState(
        step=int(meta.get("step", 0)),
        rewards=[float(r) for r in meta.get("rewards", [])],
        queue_consumed=int(meta.get("queueConsumed", 0)),
        run_id=str(meta.get("runId", "")),
    )
