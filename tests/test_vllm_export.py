"""What the vLLM sampler exports, where and when, without a vLLM engine: the choice of folder
(/dev/shm or disk), the export dtype, and which adapters count as changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clora_runtime.lora.bank import AdapterBank, AdapterShape
from clora_runtime.models.loading import load_model
from clora_runtime.sampling.vllm_sampler import SHM_HEADROOM_BYTES, export_root, vllm_dtype, weights_version
from clora_runtime.training.trainer import AdapterHyper, Trainer, TrainRow


def test_exports_go_to_shared_memory_while_it_has_room(tmp_path: Path) -> None:
    shm, disk = tmp_path / "shm", tmp_path / "disk"
    shm.mkdir()
    disk.mkdir()
    free = shutil.disk_usage(shm).free
    assert export_root(shm, disk, 1024) == (shm, None)
    root, reason = export_root(shm, disk, free)  # no room left for the headroom
    assert root == disk
    assert reason is not None and "MiB free" in reason and str(shm) in reason
    assert free > SHM_HEADROOM_BYTES  # else the first case could not have chosen shm
    root, reason = export_root(tmp_path / "missing", disk, 1)
    assert root == disk and reason is not None and "not a writable folder" in reason


def test_vllm_runs_and_receives_adapters_in_the_base_dtype_on_a_gpu() -> None:
    assert vllm_dtype("cuda", torch.bfloat16) == torch.bfloat16
    assert vllm_dtype("cpu", torch.bfloat16) == torch.float32  # vLLM's CPU build runs float32


@pytest.fixture(scope="module")
def bank() -> AdapterBank:
    loaded = load_model("tiny", device="cpu")
    bank = AdapterBank(loaded.model, max_adapters=2, max_rank=8)
    bank.add("ns/a", AdapterShape(8, 16.0, 0.0, "all-linear"), seed=1, learning_rate=1e-2)
    bank.add("ns/b", AdapterShape(4, 8.0, 0.0, ["q_proj"]), seed=2, learning_rate=1e-2)
    return bank


def test_export_in_bfloat16_is_half_the_float32_one(bank: AdapterBank, tmp_path: Path) -> None:
    full = load_file(str(bank.export_peft("ns/a", tmp_path / "fp32") / "adapter_model.safetensors"))
    half = load_file(
        str(bank.export_peft("ns/a", tmp_path / "bf16", torch.bfloat16) / "adapter_model.safetensors")
    )
    assert full.keys() == half.keys()
    assert {t.dtype for t in full.values()} == {torch.float32}
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    for name, tensor in full.items():
        torch.testing.assert_close(half[name].float(), tensor, rtol=1e-2, atol=1e-2)


def test_only_adapters_an_optimizer_step_changed_count_as_changed(bank: AdapterBank) -> None:
    before = {k: weights_version(bank.adapters[k]) for k in ("ns/a", "ns/b")}
    assert weights_version(bank.adapters["ns/a"]) == before["ns/a"]  # reading changes nothing
    trainer = Trainer(bank, micro_batch_tokens=512)
    rows = [
        TrainRow(key="ns/a", prompt_ids=[1, 2, 3], completion_ids=[4, 5], advantage=a, token_weight=0.25)
        for a in (1.0, -1.0)
    ]
    hyper = AdapterHyper(slot=bank.adapters["ns/a"].slot, clip_low=0.2, clip_high=0.2, kl_coef=0.0,
                         learning_rate=1e-2, dropout_seed=0)  # fmt: skip
    result = trainer.step(rows, {"ns/a": hyper})
    assert result.adapters["ns/a"].error is None
    assert weights_version(bank.adapters["ns/a"]) != before["ns/a"]
    assert weights_version(bank.adapters["ns/b"]) == before["ns/b"]
