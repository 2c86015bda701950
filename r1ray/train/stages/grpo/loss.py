"""The GRPO objective as pure tensor functions (no model, no Ray): advantage estimators and policy losses in
registries (a new one is one function), truncated importance sampling against the engines' sampling logprobs,
an optional k3 KL to a reference, and the three normalisations (GRPO, Dr. GRPO, DAPO).

Per token t of completion i of a group of G completions of one prompt (DeepSeekMath eq. 3; DAPO; Dr. GRPO)::

    A_i   = R_i - mean_j R_j                  (scale_rewards: / (std_j R_j + eps), std with Bessel's n-1 as TRL)
    r_t   = exp(logp_t - old_logp_t)
    l_t   = -w_t min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta * k3_t
    k3_t  = exp(d_t) - d_t - 1, d_t = clamp(ref_t - logp_t, -K3_CLAMP, K3_CLAMP)   (Schulman's k3, >= 0)
    w_t   = min(exp(old_logp_t - sampling_logp_t), is_cap), detached   (truncated importance sampling, TIS:
            the engines' sampling distribution against the learner's; 1 when it is off)

Advantage estimators (``ADVANTAGES``; each maps the [groups, G] rewards to advantages):

    grpo          R_i - mean_j R_j, optionally / (std_j R_j + eps)        (DeepSeekMath; scale off: Dr. GRPO)
    rloo          R_i - mean_{j != i} R_j = G / (G - 1) (R_i - mean_j R_j)  (REINFORCE leave-one-out)
    reinforce_pp  (R_i - mean_j R_j) / std of every such value in the step (REINFORCE++ with a group baseline:
                  the group mean removed, then normalised over the whole batch, not per group)

Policy losses (``POLICY_LOSSES``; each gives the per-token surrogate before TIS and KL):

    clip          PPO's clipped surrogate per token (above; DAPO's clip-higher with eps_high > eps_low)
    gspo          GSPO: one ratio per sequence, s_i = exp(mean_t (logp_t - old_t)) over its kept tokens,
                  clipped as above, with the token-level gradient of GSPO-token (s_i detached x exp(logp_t -
                  sg(logp_t))); GSPO's paper uses much smaller eps (3e-4, 4e-4)

Normalisation (what one update minimises; ``sum`` is what ``Stage.loss`` returns, ``weight`` its
``batch_weight``, and the loop divides the update's sum of sums by its sum of weights over every worker):

    grpo     sum_i (sum_t l_t / |o_i|)         weight: sequences   (per-sequence mean, then mean: DeepSeekMath)
    dapo     sum_i sum_t l_t                   weight: tokens      (token-level mean over the update: DAPO)
    dr_grpo  sum_i sum_t l_t / max_tokens      weight: all sequences  (constant normalisers: Dr. GRPO, as TRL)

Masked tokens (padding, prompts, dropped groups, filtered overlong completions) count in neither sum; dr_grpo's
denominator still counts every sequence of the update, kept or not (the paper's and TRL's batch size), so a
dropped group does not raise the weight of the others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

LossType = Literal["grpo", "dr_grpo", "dapo"]
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
ADV_EPS = 1e-4
"""Added to the group std before dividing (TRL's value)."""
K3_CLAMP = 20.0
"""``ref - logp`` is clamped to +-this before the k3 exponential (verl clamps the KL likewise): a token the
reference finds far likelier would otherwise overflow (``exp(89)`` is inf in float32, far less in bf16) and the
step's gradient would be NaN; the clamp bounds the term at ``e^20``."""

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}
"""Advantage estimators by name: ``fn(rewards [groups, G] float64, *, scale: bool, batch: Tensor | None)`` ->
advantages [groups, G]; ``batch`` is every reward of the step (all workers), for estimators that normalise over
the batch. Zero-variance groups are zeroed by ``group_advantages``, not here."""
PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}
"""Policy losses by name: ``fn(logp, old_logp, adv [B, 1], mask [B, T], *, eps_low, eps_high)`` -> (per-token
surrogate [B, T], stats with ``ratio`` and ``clipped``)."""


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def deco(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn
    return deco


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        return fn
    return deco


@register_advantage("grpo")
def _grpo_advantages(r: torch.Tensor, *, scale: bool, batch: torch.Tensor | None = None,
                     eps: float = ADV_EPS) -> torch.Tensor:
    centred = r - r.mean(dim=1, keepdim=True)
    return centred / (r.std(dim=1, keepdim=True) + eps) if scale else centred


@register_advantage("rloo")
def _rloo_advantages(r: torch.Tensor, *, scale: bool, batch: torch.Tensor | None = None,
                     eps: float = ADV_EPS) -> torch.Tensor:
    g = r.shape[1]
    adv = (r - r.mean(dim=1, keepdim=True)) * (g / (g - 1))
    return adv / (r.std(dim=1, keepdim=True) + eps) if scale else adv


@register_advantage("reinforce_pp")
def _reinforce_pp_advantages(r: torch.Tensor, *, scale: bool, batch: torch.Tensor | None = None,
                             eps: float = ADV_EPS) -> torch.Tensor:
    centred = r - r.mean(dim=1, keepdim=True)
    b = r if batch is None else batch.double()
    b = b - b.mean(dim=1, keepdim=True)  # the same group-centred values over the whole step
    std = b.reshape(-1).std() if b.numel() > 1 else torch.zeros((), dtype=b.dtype)
    return centred / (std + eps)


def group_advantages(rewards: torch.Tensor, *, scale: bool, eps: float = ADV_EPS, estimator: str = "grpo",
                     batch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rewards`` [groups, G] -> (advantages [groups, G], zero-variance mask [groups]), by ``estimator``
    (``ADVANTAGES``); ``batch`` [groups', G] is every group of the step where the estimator normalises over it.

    A group whose rewards all agree carries no gradient (every advantage is exactly 0)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G] with G >= 2, got shape {tuple(rewards.shape)}")
    if estimator not in ADVANTAGES:
        raise ValueError(f"advantage estimator {estimator!r}: expected one of {sorted(ADVANTAGES)}")
    r = rewards.double()
    zero = (r.max(dim=1).values - r.min(dim=1).values) == 0
    adv = ADVANTAGES[estimator](r, scale=scale, batch=batch, eps=eps)
    adv[zero] = 0.0
    return adv.to(rewards.dtype), zero


def _clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` per token, with ``ratio`` and ``clipped`` (1 where the
    clip is active) as statistics: the surrogate every ratio-based policy loss shares."""
    loss = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    r = ratio.detach()
    clipped = (((r < 1.0 - eps_low) & (adv < 0)) | ((r > 1.0 + eps_high) & (adv > 0))).to(r.dtype)
    return loss, {"ratio": r, "clipped": clipped}


@register_policy_loss("clip")
def _clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor | None, *,
               eps_low: float, eps_high: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return _clipped_surrogate(torch.exp(logp - old_logp), adv, eps_low, eps_high)


@register_policy_loss("gspo")
def _gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor | None, *,
               eps_low: float, eps_high: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)
    seq_log_ratio = ((logp - old_logp) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    # GSPO-token: the value is the sequence ratio on every token, the gradient flows through each token's logp
    return _clipped_surrogate(torch.exp(seq_log_ratio.detach() + logp - logp.detach()), adv, eps_low, eps_high)


def importance_weights(old_logp: torch.Tensor, sampling_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS): ``min(exp(old - sampling), cap)`` per token, no gradient. ``old`` is
    the learner's policy at the step, ``sampling`` the engine's logprob of the sampled token: the correction
    for a rollout policy that is not the learner's (async rollouts one step behind, or engine numerics)."""
    return torch.exp(old_logp.detach() - sampling_logp.detach()).clamp(max=cap)


def per_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    policy_loss: str = "clip",
    mask: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """l_t of the module doc, [B, T], and per-token statistics (``kl``, ``clipped``: 1 where the clip is
    active, ``ratio``). ``advantages`` is [B] (one per sequence); ``mask`` [B, T] the kept tokens (``gspo``'s
    sequence mean); ``is_weights`` [B, T] TIS weights (``importance_weights``) multiplying the surrogate."""
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's logprobs)")
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"policy loss {policy_loss!r}: expected one of {sorted(POLICY_LOSSES)}")
    adv = advantages.to(logp.dtype).unsqueeze(-1)
    loss, stats = POLICY_LOSSES[policy_loss](logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high)
    if is_weights is not None:
        loss = loss * is_weights.to(loss.dtype)
    if ref_logp is not None:
        d = torch.clamp(ref_logp - logp, -K3_CLAMP, K3_CLAMP)
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
    """The normaliser of ``reduce_loss``'s sum: kept tokens (dapo), kept sequences (grpo), every sequence
    (dr_grpo)."""
    if loss_type == "dapo":
        return float(mask.sum())
    if loss_type == "grpo":
        return float((mask.sum(dim=-1) > 0).sum())
    if loss_type == "dr_grpo":
        return float(mask.shape[0])
    raise ValueError(f"loss_type {loss_type!r}: expected one of {LOSS_TYPES}")
