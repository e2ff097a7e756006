"""GRPO-family losses as pure functions (no model, no state).

Per token t of completion i of one adapter, with r_t = exp(logp_t - old_logp_t) the probability ratio
to the sampling policy and A_i the completion's advantage:

    token_loss_t = -min(r_t A_i, clip(r_t, 1 - clipEpsilon, 1 + clipEpsilonHigh) A_i) + klCoef KL_t

KL_t is the k3 estimate exp(ref_t - logp_t) - (ref_t - logp_t) - 1 to the base model (adapter off).
All log-probabilities are taken from logits divided by the sampling temperature.

Loss types (each adapter is normalised by its own rows and tokens only):
- grpo (DeepSeekMath, Shao et al. 2024): A = (r - mean) / (std + eps) within the group; each sequence's
  token losses averaged over its own length, then averaged over the adapter's sequences.
- dr_grpo (Dr. GRPO, Liu et al. 2025): A = r - mean (no std division); token losses summed and divided
  by a constant, sequences x maxNewTokens, which removes GRPO's length and difficulty biases.
- dapo (DAPO, Yu et al. 2025): A = (r - mean) / (std + eps), as the paper keeps it; token losses summed
  and divided by the adapter's total completion tokens (token-level mean); the decoupled upper clip
  clipEpsilonHigh is DAPO's "clip-higher".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADVANTAGE_EPS = 1e-4  # TRL's epsilon in (r - mean) / (std + eps)
STD_SCALED = frozenset({"grpo", "dapo"})


def group_advantages(rewards: torch.Tensor, loss_type: str) -> torch.Tensor:
    """rewards [prompts, group] -> advantages of the same shape: r - mean(group), divided by the
    group's (unbiased) std + eps for the loss types that scale by it (grpo, dapo)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if loss_type in STD_SCALED:
        std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(centred)
        centred = centred / (std + ADVANTAGE_EPS)
    return centred


def frac_zero_std(rewards: torch.Tensor) -> float:
    """Fraction of groups (rows of rewards [prompts, group]) whose rewards are all equal."""
    same = (rewards == rewards[:, :1]).all(dim=1)
    return float(same.float().mean()) if rewards.shape[0] else 0.0


def sequence_weights(loss_type: str, lengths: list[int], max_new_tokens: int) -> list[float]:
    """Per-sequence weight of each completion token: sum(weight * token_loss) is the adapter's loss."""
    n = len(lengths)
    if loss_type == "grpo":
        return [1.0 / (max(length, 1) * n) for length in lengths]
    if loss_type == "dr_grpo":
        return [1.0 / (n * max_new_tokens)] * n
    if loss_type == "dapo":
        total = max(sum(lengths), 1)
        return [1.0 / total] * n
    raise ValueError(f"spec.training.lossType: unknown loss type {loss_type!r}")


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1.0


@dataclass
class TokenLosses:
    """token_losses' answer: the per-token loss and what the statistics need."""

    loss: torch.Tensor  # [N], differentiable
    clipped: torch.Tensor  # [N] bool: the clipped term is the active one
    kl: torch.Tensor | None  # [N] detached k3, when a reference was given


def token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> TokenLosses:
    """Per-token clipped policy-gradient loss (PPO's surrogate, negated) plus the optional KL term.

    logp, old_logp, ref_logp and advantages all have one entry per completion token.
    """
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = -torch.minimum(ratio * advantages, clipped_ratio * advantages)
    with torch.no_grad():
        clipped = ((ratio < 1.0 - clip_low) & (advantages < 0)) | (
            (ratio > 1.0 + clip_high) & (advantages > 0)
        )
    kl = None
    if ref_logp is not None:
        per_token_kl = kl_to_reference(logp, ref_logp)
        if kl_coef > 0:
            loss = loss + kl_coef * per_token_kl
        kl = per_token_kl.detach()
    return TokenLosses(loss=loss, clipped=clipped, kl=kl)
