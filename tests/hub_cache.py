"""A tiny Qwen3 laid out in a Hugging Face hub cache the way huggingface_hub writes one, so that tests
load a model by hub id with HF_HUB_OFFLINE=1 and no network. Importable on its own: no pytest fixtures.

    $HF_HOME/hub/models--ORG--NAME/refs/main                 (the revision's 40-hex commit)
    $HF_HOME/hub/models--ORG--NAME/snapshots/<REV>/<file>    -> ../../blobs/<sha256> (symlinks)
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch

# A Qwen3 vLLM's CPU build runs: head size 32 (it supports 32, 64, 80, 96, 112, 128, ...).
TINY_QWEN3_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def tiny_qwen3(tokenizer: Any, seed: int = 0) -> Any:
    """A Qwen3ForCausalLM of TINY_QWEN3_SHAPE over `tokenizer`'s vocabulary, random weights from `seed`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        architectures=["Qwen3ForCausalLM"],  # as in every hub repo; vLLM picks its model class by it
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_QWEN3_SHAPE,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)


def publish_to_hub_cache(folder: Path, hub_cache: Path, repo_id: str) -> Path:
    """Move the files of `folder` into `hub_cache` as the snapshot of `repo_id` at its main ref; returns
    the snapshot folder (what huggingface_hub's snapshot_download answers for it)."""
    revision = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex commit id will do
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for item in sorted(folder.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(item.read_bytes()).hexdigest()
        shutil.move(item, blob)
        # Relative links as huggingface_hub makes them: loaders must follow them (vLLM included).
        (snapshot / item.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
