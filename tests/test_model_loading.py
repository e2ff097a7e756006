"""Base model loading: a Hugging Face hub id resolves to its snapshot folder in the cache (offline here,
as HF_HUB_OFFLINE=1 makes it), and device, dtype and attention settings are honoured or refused clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Imported before any test sets HF_HOME / HF_HUB_OFFLINE: huggingface_hub reads them at import, so the
# tests below prove that loading reads them when it runs.
import huggingface_hub  # noqa: F401
import pytest
import torch
from hub_cache import TINY_QWEN3_SHAPE, publish_to_hub_cache, tiny_qwen3

from clora_runtime.models.loading import (
    HUB_ALLOW_PATTERNS,
    HUB_IGNORE_PATTERNS,
    built_dir,
    load_model,
    load_tokenizer,
    resolve_attn_implementation,
    save_weights,
    smollm2_dir,
    tiny_dir,
)

REPO_ID = "clora-test/tiny-qwen3"


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF_HOME whose hub cache holds REPO_ID: a tiny Qwen3 with smollm2's tokenizer."""
    home = tmp_path_factory.mktemp("hf-home")
    staging = tmp_path_factory.mktemp("tiny-qwen3")
    tokenizer = load_tokenizer(smollm2_dir())
    model = tiny_qwen3(tokenizer)
    model.config.save_pretrained(staging)
    model.generation_config.save_pretrained(staging)
    save_weights(model, staging / "model.safetensors")
    tokenizer.save_pretrained(staging)
    publish_to_hub_cache(staging, home / "hub", REPO_ID)
    return home


@pytest.fixture
def offline(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HOME at the test cache and HF_HUB_OFFLINE=1; returns HF_HOME."""
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def snapshot_of(hf_home: Path, repo_id: str) -> Path:
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    return repo / "snapshots" / (repo / "refs" / "main").read_text()


def test_a_hub_id_trains_and_samples_from_its_cached_snapshot(
    offline: Path, tmp_path: Path, spec_factory: Any
) -> None:
    from clora.metrics import RuntimeMetrics
    from clora_runtime.config import EngineConfig
    from clora_runtime.engine import Engine
    from clora_runtime.sampling.base import SampleRequest

    config = EngineConfig(model=REPO_ID, device="cpu", sampler="torch", checkpoint_dir=tmp_path / "ckpt")
    engine = Engine(config, RuntimeMetrics.create())
    engine.load()
    assert engine.base is not None and engine.sampler is not None
    # One folder for the trainer's weights and tokenizer, and for vLLM if it were the sampler.
    assert engine.base.path == snapshot_of(offline, REPO_ID)
    assert type(engine.base.model).__name__ == "Qwen3ForCausalLM"
    assert engine.base.tokenizer.name_or_path == str(engine.base.path)

    engine.upsert("ns", "hub", spec_factory(training={"steps": 2}))
    completions = engine.sampler.generate([SampleRequest("ns/hub", [1, 200, 300], 5, 1.0, 7)])
    assert len(completions[0].token_ids) > 0
    while engine.tick() is not None:
        pass
    state = engine.state("ns", "hub")
    assert (state.phase, state.step) == ("Succeeded", 2), state.message


def test_an_uncached_hub_id_offline_names_the_model_the_cache_and_hf_hub_offline(offline: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        load_model("clora-test/not-cached", device="cpu")
    message = str(caught.value)
    assert "clora-test/not-cached" in message
    assert str(offline / "hub") in message
    assert "HF_HUB_OFFLINE" in message


def test_hf_hub_cache_wins_over_hf_home(
    offline: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # huggingface_hub's precedence: the model is looked for in HF_HUB_CACHE, not under HF_HOME.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        load_model(REPO_ID, device="cpu")


def test_a_snapshot_without_safetensors_is_refused(offline: Path, tmp_path: Path) -> None:
    staging = tmp_path / "bin-only"
    staging.mkdir()
    (staging / "config.json").write_text('{"model_type": "qwen3"}')
    (staging / "pytorch_model.bin").write_bytes(b"")
    publish_to_hub_cache(staging, offline / "hub", "clora-test/bin-only")
    with pytest.raises(FileNotFoundError, match=r"clora-test/bin-only.*safetensors"):
        load_model("clora-test/bin-only", device="cpu")


def test_only_the_files_a_model_needs_are_downloaded() -> None:
    from huggingface_hub.utils import filter_repo_objects

    repo = [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "pytorch_model.bin",
        "consolidated.pth",
        "model-q4.gguf",
        "original/params.json",
        "original/consolidated.00.pth",
        "onnx/model.onnx",
        "README.md",
        ".gitattributes",
    ]
    kept = filter_repo_objects(repo, allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS)
    assert list(kept) == repo[:11]


def test_local_paths_and_built_in_names_are_their_folders(tmp_path: Path) -> None:
    tiny = load_model("tiny", device="cpu")
    assert tiny.path == tiny_dir()
    local = load_model(str(tiny_dir()), device="cpu")
    assert local.path == tiny_dir() and local.name == str(tiny_dir())
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_model(str(tmp_path / "absent"), device="cpu")


def test_built_in_folders_name_their_architecture() -> None:
    # vLLM picks its model class by it; without it a Qwen3 became Qwen3Model, an embedding model.
    folders = {
        "LlamaForCausalLM": [smollm2_dir(), tiny_dir()],
        "Qwen3ForCausalLM": [built_dir("qwen3", TINY_QWEN3_SHAPE, 0)],
    }
    for architecture, paths in folders.items():
        for path in paths:
            assert json.loads((path / "config.json").read_text())["architectures"] == [architecture], path


def test_attention_implementation_is_the_one_asked_for() -> None:
    assert load_model(
        "tiny", device="cpu", attn_implementation="eager"
    ).model.config._attn_implementation == ("eager")
    assert load_model("tiny", device="cpu").model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"attn_implementation: flash_attention_2 .*CUDA"):
        load_model("tiny", device="cpu", attn_implementation="flash_attention_2")


def test_resolve_attn_implementation() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    bf16, fp32 = torch.bfloat16, torch.float32
    assert resolve_attn_implementation("auto", cuda, bf16, flash_attn=True) == "flash_attention_2"
    assert resolve_attn_implementation("auto", cuda, bf16, flash_attn=False) == "sdpa"
    assert resolve_attn_implementation("auto", cuda, fp32, flash_attn=True) == "sdpa"  # flash-attn: 16-bit
    assert resolve_attn_implementation("auto", cpu, fp32, flash_attn=True) == "sdpa"
    assert resolve_attn_implementation("eager", cpu, fp32, flash_attn=False) == "eager"
    assert resolve_attn_implementation("sdpa", cuda, bf16, flash_attn=True) == "sdpa"
    assert (
        resolve_attn_implementation("flash_attention_2", cuda, bf16, flash_attn=True) == "flash_attention_2"
    )
    with pytest.raises(ValueError, match=r"attn_implementation:.*not installed"):
        resolve_attn_implementation("flash_attention_2", cuda, bf16, flash_attn=False)
    with pytest.raises(ValueError, match=r"attn_implementation:.*bfloat16.*float32"):
        resolve_attn_implementation("flash_attention_2", cuda, fp32, flash_attn=True)
    with pytest.raises(ValueError, match="attn_implementation: unknown 'flash'"):
        resolve_attn_implementation("flash", cpu, fp32, flash_attn=True)


def test_an_absent_cuda_device_is_refused_before_loading() -> None:
    absent = f"cuda:{max(1, torch.cuda.device_count())}"
    with pytest.raises(ValueError, match=rf"device: '{absent}'"):
        load_model("tiny", device=absent)
    with pytest.raises(ValueError, match=r"device: unknown device 'gpu'"):
        load_model("tiny", device="gpu")
    with pytest.raises(ValueError, match=r"device: 'meta' is not supported"):
        load_model("tiny", device="meta")
    assert load_model("tiny", device="cpu").device == torch.device("cpu")


def test_float16_is_refused_for_training() -> None:
    with pytest.raises(ValueError, match="dtype: float16 is refused"):
        load_model("tiny", device="cpu", dtype="float16")
    assert load_model("tiny", device="cpu", dtype="bfloat16").dtype == torch.bfloat16
