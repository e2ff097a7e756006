"""GRPO-family losses as pure functions (no model, no state).

Loss types (each adapter is normalised by its own rows and tokens only):
- grpo (DeepSeekMath, Shao et al. 2024): advantages divided by the group's std; each sequence's token
  losses averaged over its own length, then averaged over the adapter's sequences.
- dr_grpo (Dr. GRPO, Liu et al. 2025): no std division; token losses summed and divided by a constant,
  (sequences x maxNewTokens), which removes GRPO's length bias.
- dapo (DAPO, Yu et al. 2025): token losses summed and divided by the adapter's total completion tokens.
"""

from __future__ import annotations

import torch

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, scale_by_std: bool) -> torch.Tensor:
    """rewards [prompts, group] -> advantages of the same shape: r - mean(group) (/ (std + eps))."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(centred)
        centred = centred / (std + ADVANTAGE_EPS)
    return centred


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


def token_losses(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_epsilon: float,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Per-token clipped policy-gradient loss (PPO's surrogate, negated) plus the optional KL term.

    logp, old_logp, ref_logp and advantages all have one entry per completion token.
    """
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    if ref_logp is not None and kl_coef > 0:
        loss = loss + kl_coef * kl_to_reference(logp, ref_logp)
    return loss
