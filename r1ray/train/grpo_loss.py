"""The GRPO objective as pure tensor functions (no model, no Ray): group advantages, the clipped per-token
surrogate with an optional k3 KL to a reference, and the three normalisations (GRPO, Dr. GRPO, DAPO).

Per token t of completion i of a group of G completions of one prompt (DeepSeekMath eq. 3; DAPO; Dr. GRPO)::

    A_i   = R_i - mean_j R_j                  (scale_rewards: / (std_j R_j + eps), std with Bessel's n-1 as TRL)
    r_t   = exp(logp_t - old_logp_t)
    l_t   = -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t
    k3_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1     (Schulman's unbiased, always >= 0 KL estimator)

Normalisation (what one update minimises; ``sum`` is what ``Stage.loss`` returns, ``weight`` its
``batch_weight``, and the loop divides the update's sum of sums by its sum of weights over every worker):

    grpo     sum_i (sum_t l_t / |o_i|)         weight: sequences   (per-sequence mean, then mean: DeepSeekMath)
    dapo     sum_i sum_t l_t                   weight: tokens      (token-level mean over the update: DAPO)
    dr_grpo  sum_i sum_t l_t / max_tokens      weight: sequences   (a constant length normaliser: Dr. GRPO)

Masked tokens (padding, prompts, dropped groups, filtered overlong completions) count in neither.
"""

from __future__ import annotations

from typing import Literal

import torch

LossType = Literal["grpo", "dr_grpo", "dapo"]
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
ADV_EPS = 1e-4
"""Added to the group std before dividing (TRL's value)."""


def group_advantages(rewards: torch.Tensor, *, scale: bool, eps: float = ADV_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``rewards`` [groups, G] -> (advantages [groups, G], zero-variance mask [groups]).

    A group whose rewards all agree carries no gradient (every advantage is exactly 0)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G] with G >= 2, got shape {tuple(rewards.shape)}")
    r = rewards.double()
    centred = r - r.mean(dim=1, keepdim=True)
    zero = (r.max(dim=1).values - r.min(dim=1).values) == 0
    if scale:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    centred[zero] = 0.0
    return centred.to(rewards.dtype), zero


def per_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """l_t of the module doc, [B, T], and per-token statistics (``kl``, ``clipped``: 1 where the clip is
    active, ``ratio``). ``advantages`` is [B] (one per sequence)."""
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's logprobs)")
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(ratio * adv, clipped_ratio * adv)
    stats = {
        "ratio": ratio.detach(),
        "clipped": (((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))).to(logp.dtype),
    }
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        stats["kl"] = kl.detach()
        if beta > 0:
            loss = loss + beta * kl
    return loss, stats


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: LossType, *,
                max_tokens: int) -> torch.Tensor:
    """The micro-batch's loss *sum* under ``loss_type`` (see the module doc); ``mask`` [B, T] in {0, 1}."""
    m = mask.to(per_token.dtype)
    if loss_type == "dapo":
        return (per_token * m).sum()
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / float(max_tokens)
    if loss_type == "grpo":
        lengths = m.sum(dim=-1)
        per_seq = (per_token * m).sum(dim=-1) / lengths.clamp(min=1.0)
        return per_seq.sum()
    raise ValueError(f"loss_type {loss_type!r}: expected one of {LOSS_TYPES}")


def loss_weight(mask: torch.Tensor, loss_type: LossType) -> float:
    """The normaliser of ``reduce_loss``'s sum: kept tokens (dapo) or kept sequences (grpo, dr_grpo)."""
    if loss_type == "dapo":
        return float(mask.sum())
    if loss_type in ("grpo", "dr_grpo"):
        return float((mask.sum(dim=-1) > 0).sum())
    raise ValueError(f"loss_type {loss_type!r}: expected one of {LOSS_TYPES}")
