"""Checkpoints of one adapter: PEFT files, optimizer state, RNG state, step and reward history.

Layout: <checkpoint_dir>/<namespace>/<name>/step-<step:08d>/
    adapter_model.safetensors, adapter_config.json   (PEFT / vLLM loadable)
    optimizer.pt                                      (AdamW state of this adapter)
    state.json                                        (step, reward history, queue position, spec)
    rng.pt                                            (torch RNG state, for completeness: the engine
                                                       derives every random draw from (seed, step))
Each checkpoint is written into a hidden staging folder and renamed into place, so a crash leaves
either the whole checkpoint or none. Only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from clora_runtime.lora.bank import AdapterBank

PREFIX = "step-"


@dataclass
class TrainingState:
    """What besides weights a resumed run needs."""

    step: int = 0
    rewards: list[float] = field(default_factory=list)  # mean reward of every step so far
    queue_consumed: int = 0  # pushed samples already trained on
    extra: dict[str, Any] = field(default_factory=dict)


def experiment_dir(root: Path, namespace: str, name: str) -> Path:
    return Path(root) / namespace / name


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint folders of one experiment, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def resolve_resume(path: str) -> Path:
    """The checkpoint to resume from: `path`, or, when keep-pruning removed it after the caller last
    looked (the operator's view of lastCheckpoint lags the runtime by a poll), the newest checkpoint of
    the same experiment beside it, which loses fewer steps. ValueError naming resumeFrom otherwise."""
    folder = Path(path)
    if (folder / "adapter_model.safetensors").is_file():
        return folder
    if folder.name.startswith(PREFIX):
        newer = [p for p in list_checkpoints(folder.parent) if (p / "adapter_model.safetensors").is_file()]
        if newer and newer[-1].name > folder.name:
            return newer[-1]
    if not folder.is_dir():
        raise ValueError(f"resumeFrom: {path} does not exist or is not a folder")
    raise ValueError(f"resumeFrom: {path} is not a clora checkpoint (no adapter_model.safetensors)")


def save(
    bank: AdapterBank, key: str, directory: Path, state: TrainingState, keep: int
) -> tuple[Path, datetime]:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{PREFIX}{state.step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=directory))
    try:
        bank.export_peft(key, staging)
        adapter = bank.adapters[key]
        torch.save(adapter.optimizer.state_dict(), staging / "optimizer.pt")
        torch.save({"torch": torch.get_rng_state()}, staging / "rng.pt")
        now = datetime.now(UTC)
        meta = {
            "key": key,
            "step": state.step,
            "rewards": state.rewards,
            "queueConsumed": state.queue_consumed,
            "time": now.isoformat(),
            **state.extra,
        }
        (staging / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
        if target.exists():  # the same step again (e.g. removal right after a periodic checkpoint)
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target, now


def read_step(path: Path) -> int:
    """The step a checkpoint was taken at (from its state.json; 0 when it has none)."""
    meta_file = Path(path) / "state.json"
    return int(json.loads(meta_file.read_text()).get("step", 0)) if meta_file.is_file() else 0


def load(bank: AdapterBank, key: str, path: Path) -> TrainingState:
    """Load weights and optimizer state into the adapter `key` (already in the bank, same shape)."""
    path = Path(path)
    if not (path / "adapter_model.safetensors").is_file():
        raise ValueError(f"resumeFrom: {path} is not a clora checkpoint (no adapter_model.safetensors)")
    config = json.loads((path / "adapter_config.json").read_text())
    adapter = bank.adapters[key]
    if int(config["r"]) != adapter.shape.rank:
        raise ValueError(
            f"resumeFrom: {path} has rank {config['r']}, the experiment asks for {adapter.shape.rank}"
        )
    bank.load_peft_weights(key, path)
    optimizer_file = path / "optimizer.pt"
    if optimizer_file.is_file():
        adapter.optimizer.load_state_dict(torch.load(optimizer_file, map_location="cpu", weights_only=True))
        # load_state_dict casts state onto the parameters' device; lr comes from the spec each step.
    meta = json.loads((path / "state.json").read_text()) if (path / "state.json").is_file() else {}
    return TrainingState(
        step=read_step(path),
        rewards=[float(r) for r in meta.get("rewards", [])],
        queue_consumed=int(meta.get("queueConsumed", 0)),
    )
