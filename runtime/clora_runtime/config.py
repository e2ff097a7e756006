"""The engine's one configuration: every field has a default and a help text."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


def cache_dir() -> Path:
    """clora's cache folder: $CLORA_CACHE_DIR, else $XDG_CACHE_HOME/clora, else ~/.cache/clora."""
    explicit = os.environ.get("CLORA_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "clora"


def default_checkpoint_dir() -> Path:
    return cache_dir() / "runs"


class EngineConfig(BaseModel):
    """How one runtime process loads its base model and trains its adapters."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "smollm2", description="Base model: smollm2 | tiny | a Hugging Face id | a local path."
    )
    device: str = Field("auto", description="auto (cuda when available, else cpu) | cpu | cuda | cuda:N.")
    dtype: str = Field(
        "auto", description="auto (bfloat16 on a GPU, float32 on a CPU) | float32 | bfloat16 | float16."
    )
    sampler: str = Field("torch", description="Sampling engine: torch (built in) | vllm (GPU).")
    max_adapters: int = Field(8, ge=1, le=256, description="Adapter slots: experiments trained at once.")
    max_rank: int = Field(64, ge=1, le=512, description="The largest LoRA rank an experiment may ask for.")
    tokens_per_tick: int = Field(
        65536,
        ge=1,
        description="Sampling budget per tick in tokens (promptsPerStep x groupSize x maxNewTokens summed"
        " over the experiments stepped in one tick; at least one experiment always steps).",
    )
    checkpoint_dir: Path = Field(
        default_factory=default_checkpoint_dir,
        description="Where checkpoints and pushed-sample queues are written, one folder per experiment.",
    )
    micro_batch_tokens: int = Field(
        2048,
        ge=64,
        description="Upper bound on padded tokens in one training forward/backward (unique prompts x"
        " longest prompt + rows x longest completion); bounds training memory whatever the number of"
        " experiments.",
    )
    max_batch_rows: int = Field(
        512, ge=1, description="Upper bound on completions generated together in one sampling batch."
    )
    rollout_steps: int = Field(
        4,
        ge=1,
        le=64,
        description="Steps of rollouts (prompts, completions, rewards, log-probs) kept per experiment for"
        " GET .../rollouts; older steps are dropped, so memory stays bounded.",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None leaves torch's default.")
