"""clora's GRPO-family loss and gradients against a plain-PyTorch reference written from the papers.

One adapter samples one batch (2 prompts x a group of 4) on the tiny model; clora's trainer takes a step
on it (advantages and token weights from clora's own helpers, as the engine builds them from the
rewards) and the test recomputes, for every update of the step, the adapter's loss and the gradient of
every LoRA A and B from its own formulas:

- log-probs: logp = log softmax(logits / T)[token] under the base model plus the adapter, computed on
  a separate, unwrapped copy of the base model in float64 with the LoRA added by forward hooks,
  y = W x + (alpha / r) B A x (PEFT's LoRA, dropout 0); ref = the same copy with the adapter off.
- advantages (DeepSeekMath; Dr. GRPO; DAPO): grpo, dapo A = (r - mean) / (std + 1e-4), unbiased std;
  dr_grpo A = r - mean.
- per token: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta (exp(ref - logp) - (ref - logp) - 1),
  rho = exp(logp - old), old the sampling policy's log-probs.
- aggregation: grpo mean over sequences of each sequence's token mean; dr_grpo sum / (N maxNewTokens);
  dapo sum / total tokens.

Nothing of clora's loss code (clora_runtime.training.grpo's token losses, the trainer's log-prob code)
is used for the reference side.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

TEMPERATURE = 0.7
MAX_NEW_TOKENS = 8
REWARDS = [[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 1.0]]  # [prompts][group], spread in every group
# Each sampled completion is cut to this length (as though an EOS had come), so lengths differ and the
# three aggregations really differ.
CUT = [[8, 3, 6, 1], [5, 8, 2, 7]]
RANK, ALPHA = 4, 8.0
CLIP_LOW, CLIP_HIGH = 0.05, 0.08
LEARNING_RATE = 0.1  # large: update 2 sees weights far enough from sampling for the clip to act
KL_COEF = 0.3
ADV_EPS = 1e-4
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which the bank's optimizer keeps
MAX_GRAD_NORM = 1.0  # the trainer clips each adapter's gradient to this norm before stepping
# A shared head of >= 16 tokens: the trainer runs it once as a prefix (its shared-prefix path).
HEAD = "You are a careful assistant. Think step by step, then give the final answer on its own line."
PROMPTS = [HEAD + " What is 17 + 25?", HEAD + " A train travels 60 km in 1.5 hours. How fast is it?"]


@dataclass
class Setup:
    engine: Any  # a loaded clora Engine on the tiny model
    reference: ReferenceModel
    prompts: list[list[int]]


class ReferenceModel:
    """An unwrapped float64 copy of the base model; `weights` (module name -> (A, B)) adds a LoRA by
    hooks."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        self.model = model
        self.scale = scale
        self.weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.linears = [
            name
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not model.get_output_embeddings()
        ]
        for name in self.linears:
            model.get_submodule(name).register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            if self.weights is None:
                return output
            a, b = self.weights[name]
            return output + ((inputs[0] @ a.T) * self.scale) @ b.T

        return hook

    def logprobs(
        self,
        rows: list[tuple[list[int], list[int]]],
        weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> list[torch.Tensor]:
        """Per (prompt, completion), log softmax(logits / T) of each completion token, one full forward
        of prompt + completion per row."""
        self.weights = weights
        try:
            out = []
            for prompt, completion in rows:
                ids = torch.tensor([prompt + completion])
                # the logits at the last prompt position and every completion position but the last
                logits = self.model(input_ids=ids, logits_to_keep=len(completion) + 1).logits[0, :-1]
                logp = torch.log_softmax(logits / TEMPERATURE, dim=-1)
                out.append(logp.gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1))
            return out
        finally:
            self.weights = None


def reference_loss(
    loss_type: str,
    logp: list[torch.Tensor],
    old: list[torch.Tensor],
    ref: list[torch.Tensor],
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(loss, the same sum over |per-token terms| (the scale of its rounding), clipped fraction, mean KL)."""
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if loss_type in ("grpo", "dapo"):
        advantages = centred / (rewards.std(dim=1, keepdim=True) + ADV_EPS)
    else:
        advantages = centred
    advantages = advantages.flatten()
    n = len(logp)
    lengths = [len(x) for x in logp]
    token_loss: list[torch.Tensor] = []
    clipped = kl_sum = 0.0
    for i in range(n):
        rho = torch.exp(logp[i] - old[i])
        unclipped = rho * advantages[i]
        clipped_obj = torch.clamp(rho, 1.0 - CLIP_LOW, 1.0 + CLIP_HIGH) * advantages[i]
        clipped += float((clipped_obj < unclipped).sum())  # the min takes the clipped (flat) branch
        delta = ref[i] - logp[i]
        kl = torch.exp(delta) - delta - 1.0
        kl_sum += float(kl.detach().sum())
        token_loss.append(-torch.minimum(unclipped, clipped_obj) + beta * kl)

    def aggregate(parts: list[torch.Tensor]) -> torch.Tensor:
        if loss_type == "grpo":
            return sum(p.sum() / len(p) for p in parts) / n
        if loss_type == "dr_grpo":
            return sum(p.sum() for p in parts) / (n * MAX_NEW_TOKENS)
        assert loss_type == "dapo"
        return sum(p.sum() for p in parts) / sum(lengths)

    scale = aggregate([p.detach().abs() for p in token_loss])
    return aggregate(token_loss), scale, clipped / sum(lengths), kl_sum / sum(lengths)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    from transformers import AutoModelForCausalLM

    from clora.metrics import RuntimeMetrics
    from clora_runtime.config import EngineConfig
    from clora_runtime.engine import Engine

    # One thread: the tiny model's matrices are too small to gain from more, and on a busy 2-core
    # machine torch's second thread waiting at every op's barrier made this file ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine(
        EngineConfig(model="tiny", device="cpu", checkpoint_dir=tmp_path_factory.mktemp("ckpt")),
        RuntimeMetrics.create(),
    )
    engine.load()
    assert engine.base.dtype == torch.float32
    # The reference's own copy of the base weights, plain transformers (eager attention), not wrapped,
    # in float64 so that what the comparison sees is clora's float32 rounding alone.
    model = AutoModelForCausalLM.from_pretrained(
        Path(engine.base.path), dtype=torch.float64, attn_implementation="eager"
    )
    model.eval().requires_grad_(False)
    tokenizer = engine.base.tokenizer
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    try:
        yield Setup(engine=engine, reference=ReferenceModel(model, ALPHA / RANK), prompts=prompts)
    finally:
        torch.set_num_threads(threads)


LOSS_TYPES = ["grpo", "dr_grpo", "dapo"]


@pytest.mark.parametrize("kl_coef", [0.0, KL_COEF], ids=["kl0", "kl"])
@pytest.mark.parametrize("updates", [1, 2], ids=["1update", "2updates"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradients_match_the_reference(
    setup: Setup, loss_type: str, updates: int, kl_coef: float
) -> None:
    from clora_runtime.lora.bank import AdapterShape
    from clora_runtime.sampling.base import SampleRequest
    from clora_runtime.training.grpo import group_advantages, sequence_weights
    from clora_runtime.training.trainer import AdapterHyper, TrainRow

    engine = setup.engine
    bank, trainer = engine.bank, engine.trainer
    key = f"ref/{loss_type}-{updates}-{kl_coef}"
    adapter = bank.add(
        key, AdapterShape(RANK, ALPHA, dropout=0.0, target_modules="all-linear"), 7, LEARNING_RATE
    )
    try:
        assert sorted(adapter.modules) == sorted(setup.reference.linears)
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():  # B starts at zero: give it weight so that the adapter matters from the start
            for name in adapter.modules:
                adapter.b[name].normal_(0, 0.02, generator=gen)

        # ---- one sampled batch, clora's rows built as the engine builds them from the rewards ----
        requests = [
            SampleRequest(key, prompt, MAX_NEW_TOKENS, TEMPERATURE, seed=100 + 10 * p + g)
            for p, prompt in enumerate(setup.prompts)
            for g in range(len(REWARDS[p]))
        ]
        completions = engine.sampler.generate(requests)
        cut = [c for group in CUT for c in group]
        completion_ids = [c.token_ids[:n] for c, n in zip(completions, cut, strict=True)]
        lengths = [len(c) for c in completion_ids]
        assert len(set(lengths)) > 2
        advantages = group_advantages(torch.tensor(REWARDS), loss_type).flatten().tolist()
        weights = sequence_weights(loss_type, lengths, MAX_NEW_TOKENS)
        rows = [
            TrainRow(key, r.prompt_ids, ids, adv, w, TEMPERATURE)
            for r, ids, adv, w in zip(requests, completion_ids, advantages, weights, strict=True)
        ]
        hyper = AdapterHyper(
            slot=adapter.slot,
            clip_low=CLIP_LOW,
            clip_high=CLIP_HIGH,
            kl_coef=kl_coef,
            learning_rate=LEARNING_RATE,
            dropout_seed=0,
            updates=updates,
        )

        # ---- clora's step: per update, the weights its loss was computed at and its gradients ----
        seen: list[dict[str, tuple[torch.Tensor, ...]]] = []

        def capture(k: str, update: int) -> None:
            assert k == key and update == len(seen)
            seen.append(
                {
                    name: (
                        adapter.a[name].detach().clone(),
                        adapter.b[name].detach().clone(),
                        adapter.a[name].grad.detach().clone(),
                        adapter.b[name].grad.detach().clone(),
                    )
                    for name in adapter.modules
                }
            )

        trainer.before_optimizer_step = capture
        trainer.record_logprobs = True
        try:
            step = trainer.step(rows, {key: hyper})
        finally:
            trainer.before_optimizer_step = None
            trainer.record_logprobs = False
        result = step.adapters[key]
        assert result.error is None
        assert len(result.losses) == len(seen) == updates

        # ---- the reference, update by update ----
        ref_model = setup.reference
        pairs = [(r.prompt_ids, r.completion_ids) for r in rows]
        with torch.no_grad():
            ref = ref_model.logprobs(pairs, None)
        old: list[torch.Tensor] | None = None
        clipped_fractions = []
        for update, snapshot in enumerate(seen):
            leaves = {
                name: (a.double().requires_grad_(True), b.double().requires_grad_(True))
                for name, (a, b, _, _) in snapshot.items()
            }
            with torch.enable_grad():
                logp = ref_model.logprobs(pairs, leaves)
                if old is None:  # the sampling policy: the weights before any update of this step
                    old = [x.detach() for x in logp]
                loss, scale, clipped, kl = reference_loss(loss_type, logp, old, ref, kl_coef)
                params = [p for name in adapter.modules for p in leaves[name]]
                grads = torch.autograd.grad(loss, params)
            clipped_fractions.append(clipped)
            if update == 0:
                # The reference's sampling policy is the one the sampler drew the tokens from, and the
                # one whose log-probs clora's trainer keeps as the ratio's denominator. Log-probs are
                # ~ -11 here (a near-uniform 49152-token vocabulary): float32 keeps them to ~1e-6.
                for c, n, x, kept in zip(completions, lengths, old, step.token_logprobs, strict=True):
                    assert c.logprobs is not None
                    torch.testing.assert_close(
                        torch.tensor(c.logprobs[:n], dtype=x.dtype), x, rtol=0, atol=1e-5
                    )
                    torch.testing.assert_close(kept.double(), x, rtol=0, atol=1e-5)

            # Tolerances. clora computes in float32, this reference in float64. clora's log-probs are
            # ~ -11 and kept in float32, so each is off by up to ~1e-6 absolute (measured 9e-7 above,
            # one float32 ulp at 11), which goes into rho = exp(logp - old) and the KL of every token.
            # - The loss is a weighted sum of per-token terms that partly cancel (GRPO's surrogate sums to
            #   ~0 over a group at rho = 1): its rounding is relative to `scale`, the same sum over the
            #   terms' absolute values, not to the loss itself; measured <= 1.5e-7 x scale, hence
            #   atol = 1e-6 x scale (rtol 1e-5 alone holds wherever the loss does not cancel).
            # - Each gradient entry sums per-token terms weighted by those rho and KL values, so entries
            #   that cancel across tokens keep an absolute error ~1e-6 of the tensor's largest entry:
            #   measured <= 2.6e-6 x max|grad| (as large with clora's base model run in float64, so it is
            #   the float32 log-probs), hence atol = 1e-5 x max|grad| per tensor: 1e-5 relative to the
            #   gradient's own scale, on top of rtol 1e-5 per entry.
            torch.testing.assert_close(
                torch.tensor(result.losses[update], dtype=torch.float64),
                loss.detach(),
                rtol=1e-5,
                atol=1e-6 * float(scale),
                msg=lambda m, u=update: f"loss of update {u}: {m}",
            )
            assert result.clip_fractions[update] == pytest.approx(clipped, abs=1e-6)
            if kl_coef > 0:
                assert result.kls[update] == pytest.approx(kl, rel=1e-4, abs=1e-8)
            got = [g for name in adapter.modules for g in snapshot[name][2:]]
            names = [f"{name}.{ab}" for name in adapter.modules for ab in ("A", "B")]
            for name, g_clora, g_ref in zip(names, got, grads, strict=True):
                assert float(g_ref.abs().max()) > 0, name
                torch.testing.assert_close(
                    g_clora.double(),
                    g_ref,
                    rtol=1e-5,
                    atol=1e-5 * float(g_ref.abs().max()),
                    msg=lambda m, n=name, u=update: f"gradient of {n} at update {u}: {m}",
                )

        assert clipped_fractions[0] == 0.0  # rho == 1 at the sampling weights
        if updates == 2:
            # update 2 is computed at the weights one AdamW step moved: its loss differs, the old
            # log-probs make rho != 1, and the clip really acts
            assert abs(result.losses[1] - result.losses[0]) > 1e-3 * max(abs(result.losses[0]), 1e-3)
            assert clipped_fractions[1] > 0
            # and that step is AdamW's first step (bias-corrected: lr g / (|g| + eps)) on the gradient
            # clipped to MAX_GRAD_NORM
            before, after = seen
            norm = math.sqrt(sum(float(t[i].double().pow(2).sum()) for t in before.values() for i in (2, 3)))
            coef = min(1.0, MAX_GRAD_NORM / (norm + 1e-6))
            for name in adapter.modules:
                for i in (0, 1):
                    g = before[name][2 + i] * coef
                    want = before[name][i] - LEARNING_RATE * g / (g.abs() + ADAM_EPS)
                    torch.testing.assert_close(after[name][i], want, rtol=1e-5, atol=1e-6 * LEARNING_RATE)
    finally:
        bank.remove(key)
