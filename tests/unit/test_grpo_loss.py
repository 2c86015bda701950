"""The GRPO objective against numbers computed by hand (r1ray.train.stages.grpo.loss)."""

from __future__ import annotations

import math

import pytest
import torch

from r1ray.train.stages.grpo.loss import (
    group_advantages,
    importance_weights,
    loss_weight,
    per_token_loss,
    reduce_loss,
)


def test_advantages_with_and_without_std_scaling():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    adv, zero = group_advantages(rewards, scale=False)
    assert zero.tolist() == [False, True, False]
    assert adv[0].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert adv[1].tolist() == [0.0] * 4
    assert adv[2].tolist() == [2.25, -0.75, -0.75, -0.75]
    scaled, _ = group_advantages(rewards, scale=True)
    std0 = math.sqrt(4 * 0.25 / 3)  # Bessel's correction, as torch.std and TRL
    a = 0.5 / (std0 + 1e-4)
    assert scaled[0].tolist() == pytest.approx([a, -a, -a, a], rel=1e-6)
    std2 = math.sqrt((2.25**2 + 3 * 0.75**2) / 3)
    assert scaled[2, 0].item() == pytest.approx(2.25 / (std2 + 1e-4), rel=1e-6)
    assert scaled[1].tolist() == [0.0] * 4  # a zero-variance group stays exactly 0, no 0/eps noise
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1), scale=True)


R = torch.tensor([1.5, 0.7, 1.1, 1.0])
LOGP = torch.log(R).unsqueeze(0).repeat(2, 1)  # old logprobs 0: ratios exactly R
OLD = torch.zeros(2, 4)
ADV = torch.tensor([1.0, -1.0])


def test_clipping_low_and_high():
    loss, stats = per_token_loss(LOGP, OLD, ADV, eps_low=0.2, eps_high=0.28)
    # A = +1: min(r, clip(r, 0.8, 1.28)): 1.5 is clipped to 1.28; 0.7 is not (the low clip binds only for A < 0)
    assert loss[0].tolist() == pytest.approx([-1.28, -0.7, -1.1, -1.0])
    assert stats["clipped"][0].tolist() == [1.0, 0.0, 0.0, 0.0]
    # A = -1: min(-r, -clip(r)): 0.7 is clipped to 0.8; 1.5 is not (pessimistic bound keeps -1.5)
    assert loss[1].tolist() == pytest.approx([1.5, 0.8, 1.1, 1.0])
    assert stats["clipped"][1].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert "kl" not in stats
    # the gradient is zero exactly where the clip is active
    lp = LOGP.clone().requires_grad_(True)
    per_token_loss(lp, OLD, ADV, eps_low=0.2, eps_high=0.28)[0].sum().backward()
    assert lp.grad[0, 0] == 0 and lp.grad[1, 1] == 0
    assert lp.grad[0, 1] == pytest.approx(-0.7) and lp.grad[1, 0] == pytest.approx(1.5)  # d(-r A)/dlogp = -r A


def test_k3_kl_to_the_reference():
    ref = torch.zeros(2, 4)
    loss, stats = per_token_loss(LOGP, OLD, ADV, eps_low=0.2, eps_high=0.28, beta=0.1, ref_logp=ref)
    k3 = [1 / r + math.log(r) - 1 for r in R.tolist()]  # exp(ref - logp) - (ref - logp) - 1 with ref = 0
    assert stats["kl"][0].tolist() == pytest.approx(k3)
    assert all(k >= 0 for k in k3) and k3[3] == 0
    assert loss[0].tolist() == pytest.approx([a + 0.1 * k for a, k in zip([-1.28, -0.7, -1.1, -1.0], k3, strict=True)])
    # beta = 0 with a reference: the KL is measured, not added
    loss0, stats0 = per_token_loss(LOGP, OLD, ADV, eps_low=0.2, eps_high=0.28, beta=0.0, ref_logp=ref)
    assert loss0[0].tolist() == pytest.approx([-1.28, -0.7, -1.1, -1.0]) and "kl" in stats0
    with pytest.raises(ValueError, match="ref_logp"):
        per_token_loss(LOGP, OLD, ADV, eps_low=0.2, eps_high=0.2, beta=0.1)


def test_each_normalisation_variant():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # the third sequence is dropped
    # grpo: per-sequence token mean, summed over sequences; weight = kept sequences
    assert reduce_loss(per_token, mask, "grpo", max_tokens=8).item() == pytest.approx(6 / 3 + 10 / 1)
    assert loss_weight(mask, "grpo") == 2
    # dapo: token sum; weight = kept tokens
    assert reduce_loss(per_token, mask, "dapo", max_tokens=8).item() == pytest.approx(16.0)
    assert loss_weight(mask, "dapo") == 4
    # dr_grpo: token sum over a constant max length; weight = every sequence, the dropped one included
    assert reduce_loss(per_token, mask, "dr_grpo", max_tokens=8).item() == pytest.approx(16 / 8)
    assert loss_weight(mask, "dr_grpo") == 3
    # a fully masked batch: zero loss that still carries the graph (ZeRO-3 runs its backward too)
    x = per_token.clone().requires_grad_(True)
    zero = reduce_loss(x, torch.zeros_like(mask), "grpo", max_tokens=8)
    assert zero.item() == 0 and zero.requires_grad
    with pytest.raises(ValueError, match="loss_type"):
        reduce_loss(per_token, mask, "ppo", max_tokens=8)  # type: ignore[arg-type]


def test_dr_grpo_counts_every_sequence_of_the_update():
    per_token = torch.ones(4, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]])  # two sequences dropped
    # the paper and TRL: sum over kept tokens / (all sequences x max length): a drop does not up-weight the rest
    assert loss_weight(mask, "dr_grpo") == 4
    assert reduce_loss(per_token, mask, "dr_grpo", max_tokens=3).item() == pytest.approx(3 / 3)


def test_k3_is_clamped_so_a_far_token_cannot_overflow():
    logp = torch.tensor([[-200.0, -1.0]])
    ref = torch.tensor([[0.0, -1.0]])  # the reference finds token 0 e^200 times likelier: exp overflows unclamped
    loss, stats = per_token_loss(logp, logp.detach(), torch.tensor([1.0]), eps_low=0.2, eps_high=0.2, beta=0.1,
                                 ref_logp=ref)
    assert torch.isfinite(loss).all()
    assert stats["kl"][0, 0].item() == pytest.approx(math.exp(20.0) - 20.0 - 1.0, rel=1e-5)
    assert stats["kl"][0, 1].item() == 0.0


def test_rloo_and_reinforce_pp_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    # RLOO: R_i minus the mean of the other three
    adv, zero = group_advantages(rewards, scale=False, estimator="rloo")
    assert adv[0].tolist() == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    assert adv[1].tolist() == pytest.approx([3.0, -1.0, -1.0, -1.0])
    assert adv[2].tolist() == [0.0] * 4 and zero.tolist() == [False, False, True]
    # REINFORCE++ baseline: the group mean removed, then / the std of those values over the whole batch
    centred = [0.5, -0.5, -0.5, 0.5, 2.25, -0.75, -0.75, -0.75, 0, 0, 0, 0]
    std = torch.tensor(centred, dtype=torch.float64).std().item()
    adv, _ = group_advantages(rewards, scale=False, estimator="reinforce_pp")
    assert adv[1, 0].item() == pytest.approx(2.25 / (std + 1e-4), rel=1e-6)
    # a micro-batch normalises over the batch it is given (the step's, from every worker), not over itself
    part, _ = group_advantages(rewards[:1], scale=False, estimator="reinforce_pp", batch=rewards)
    assert part[0, 0].item() == pytest.approx(0.5 / (std + 1e-4), rel=1e-6)
    with pytest.raises(ValueError, match="estimator"):
        group_advantages(rewards, scale=False, estimator="ppo")


def test_gspo_one_ratio_per_sequence():
    logp = torch.tensor([[math.log(1.2), math.log(1.2), 0.0], [math.log(0.5), 0.0, 0.0]])
    old = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, stats = per_token_loss(logp, old, torch.tensor([1.0, -1.0]), eps_low=0.2, eps_high=0.28,
                                 policy_loss="gspo", mask=mask)
    s0 = 1.2  # geometric mean of the kept tokens' ratios
    s1 = math.exp(math.log(0.5) / 3)
    assert stats["ratio"][0].tolist() == pytest.approx([s0] * 3)
    assert stats["ratio"][1].tolist() == pytest.approx([s1] * 3)
    assert loss[0].tolist() == pytest.approx([-s0] * 3)  # 1.2 < 1.28: not clipped
    assert loss[1].tolist() == pytest.approx([max(s1, 0.8)] * 3)  # A < 0: the pessimistic bound
    # the gradient reaches each token through its own logprob, scaled by the sequence ratio
    lp = logp.clone().requires_grad_(True)
    per_token_loss(lp, old, torch.tensor([1.0, -1.0]), eps_low=0.2, eps_high=0.28, policy_loss="gspo",
                   mask=mask)[0][0].sum().backward()
    assert lp.grad[0, 0].item() == pytest.approx(-s0)


def test_truncated_importance_sampling_weights():
    old = torch.tensor([[0.0, 0.0, math.log(0.5)]])
    sampling = torch.tensor([[math.log(0.25), 0.0, 0.0]])  # the engine found token 0 4x less likely
    w = importance_weights(old, sampling, cap=2.0)
    assert w[0].tolist() == pytest.approx([2.0, 1.0, 0.5])  # 4 truncated at the cap
    loss, _ = per_token_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([1.0]), eps_low=0.2, eps_high=0.2,
                             is_weights=w)
    assert loss[0].tolist() == pytest.approx([-2.0, -1.0, -0.5])
