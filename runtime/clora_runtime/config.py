"""The engine's one configuration: every field has a default and a help text."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Set on the command line or in a LoRARuntime, they override the device defaults (device_defaults.py).
DEVICE_DEFAULT = "None: the device's default (clora_runtime.device_defaults)."


def cache_dir() -> Path:
    """clora's cache folder: $CLORA_CACHE_DIR, else $XDG_CACHE_HOME/clora, else ~/.cache/clora."""
    explicit = os.environ.get("CLORA_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "clora"


def default_checkpoint_dir() -> Path:
    return cache_dir() / "runs"


MiB = 1024 * 1024


class EngineConfig(BaseModel):
    """How one runtime process loads its base model and trains its adapters."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "smollm2", description="Base model: smollm2 | tiny | a Hugging Face id | a local path."
    )
    device: str = Field("auto", description="auto (cuda when available, else cpu) | cpu | cuda | cuda:N.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="auto (bfloat16 on a GPU, float32 on a CPU) | float32 | bfloat16. float16 is refused:"
        " training in it needs a gradient scaler, which clora does not run.",
    )
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto",
        description="The base model's attention: auto (flash_attention_2 on CUDA when the flash-attn"
        " package is installed, else sdpa) | sdpa | flash_attention_2 | eager.",
    )
    sampler: str = Field("torch", description="Sampling engine: torch (built in) | vllm (GPU).")
    max_adapters: int = Field(8, ge=1, le=256, description="Adapter slots: experiments trained at once.")
    max_rank: int = Field(64, ge=1, le=512, description="The largest LoRA rank an experiment may ask for.")
    tokens_per_tick: int = Field(
        65536,
        ge=1,
        description="Sampling budget per tick in tokens: every row sampled in a tick counts its prompt"
        " (chat template and system prompt included), what it generated in earlier ticks (prefilled"
        " again) and the tokens it may generate in this one (at most maxTickNewTokens). Summed over the"
        " experiments of the tick; the first row of the tick always runs, so every experiment progresses.",
    )
    max_tick_new_tokens: int = Field(
        512,
        ge=1,
        description="The most tokens a completion grows by in one tick, which bounds a tick's decode"
        " steps, hence its time, whatever an experiment's maxNewTokens: a longer completion is generated"
        " over several ticks from its prompt and what it has so far. The experiment trains only once"
        " all its step's completions are done, so every part is sampled with the same weights; the"
        " split depends on this value alone (never on the neighbours), so results stay reproducible.",
    )
    max_tick_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="The largest share of tokensPerTick one experiment takes in a tick while other"
        " experiments have work: the rows of its step beyond it are sampled in later ticks (its step"
        " spans ticks), so a big experiment cannot starve its neighbours. Alone, it takes the whole budget.",
    )
    max_prompt_tokens: int = Field(
        4096,
        ge=16,
        description="The longest prompt in tokens, chat template and system prompt included (also capped"
        " by the model's context and the training micro-batch, less maxNewTokens). A PUT whose"
        " spec.task.systemPrompt alone exceeds it is refused (422); a longer pushed sample or dataset"
        " record is skipped for its experiment, with a message, and a pushed one is consumed.",
    )
    max_queued_samples: int = Field(
        4096,
        ge=1,
        description="Pushed samples waiting per experiment: a POST .../samples that would queue more is"
        " refused (422, naming `samples`). Trained-on samples leave memory; the queue file keeps them"
        " until a checkpoint counts them.",
    )
    queue_compact_samples: int = Field(
        1024,
        ge=1,
        description="A pushed-sample queue file is rewritten without the samples a checkpoint has"
        " counted as trained on once it holds this many of them, so a continual experiment's file stays"
        " about as small as what waits in it.",
    )
    max_experiments: int | None = Field(
        None,
        ge=1,
        description="Experiments this runtime holds at once, suspended ones included (a suspended"
        " experiment gives its slot back but keeps its record and queue): a PUT of a new one beyond it"
        " is refused (409). None: 4 x maxAdapters.",
    )
    checkpoint_dir: Path = Field(
        default_factory=default_checkpoint_dir,
        description="Where checkpoints and pushed-sample queues are written, one folder per experiment.",
    )
    dataset_roots: list[Path] = Field(
        default_factory=list,
        description="Folders a spec.task.dataset.path may name (os.pathsep-separated on the command"
        " line, e.g. /data:/datasets): a path is read only when it resolves, symlinks and .. followed,"
        " inside one of them, and never inside an experiment's folder of checkpoint_dir (its"
        " checkpoints and queued samples). Empty: the runtime's working directory only.",
    )
    max_dataset_bytes: int = Field(
        256 * MiB,
        ge=1,
        description="The largest dataset file (spec.task.dataset.path) the runtime reads, in bytes.",
    )
    max_record_chars: int = Field(
        32768,
        ge=1,
        description="The longest prompt, and the longest answer, of one dataset record in characters:"
        " a dataset with a longer one is refused (422 naming its line).",
    )
    micro_batch_tokens: int | None = Field(
        None,
        ge=64,
        description="Upper bound on padded tokens in one training forward/backward (unique prompts x"
        " longest prompt + rows x longest completion); bounds training memory whatever the number of"
        " experiments. " + DEVICE_DEFAULT,
    )
    max_batch_rows: int | None = Field(
        None,
        ge=1,
        description="Upper bound on completions generated together in one sampling batch. " + DEVICE_DEFAULT,
    )
    vllm_gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="The share of GPU memory vLLM may take (the trainer uses the rest). " + DEVICE_DEFAULT,
    )
    vllm_max_num_seqs: int | None = Field(
        None, ge=1, description="vLLM's max_num_seqs. None: max_batch_rows."
    )
    vllm_enforce_eager: bool | None = Field(
        None,
        description="Run vLLM without CUDA graphs. None: true on a CPU, false on a GPU.",
    )
    vllm_seed_per_row: bool = Field(
        True,
        description="Give every vLLM request its own seed, so a row's tokens never depend on its"
        " neighbours (vLLM then samples those rows one by one; docs/install.md has the cost). false:"
        " vLLM's engine seed only, faster, reproducible only for identical batches.",
    )
    rollout_steps: int = Field(
        4,
        ge=1,
        le=64,
        description="Steps of rollouts (prompts, completions, rewards, log-probs) kept per experiment for"
        " GET .../rollouts; older steps are dropped, so memory stays bounded.",
    )
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None leaves torch's default.")

    @field_validator("dataset_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        # The command line gives one string: PATH-style, os.pathsep between folders.
        if isinstance(value, str | os.PathLike):
            return [part for part in str(value).split(os.pathsep) if part]
        return value

    def roots(self) -> list[Path]:
        """The dataset roots in effect, resolved: dataset_roots, else the working directory."""
        return [Path(r).resolve() for r in self.dataset_roots] or [Path.cwd().resolve()]

    @property
    def experiments_cap(self) -> int:
        """max_experiments, or its default of 4 x max_adapters."""
        return self.max_experiments if self.max_experiments is not None else 4 * self.max_adapters

    @field_validator("dtype", mode="before")
    @classmethod
    def _no_float16(cls, value: object) -> object:
        if value == "float16":
            raise ValueError(
                "float16 is refused for training: without a gradient scaler its gradients underflow;"
                " use bfloat16 (GPUs) or float32"
            )
        return value
