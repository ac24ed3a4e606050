"""REINFORCE-style baselines without a critic: RLOO and REINFORCE++.

Both update with the PPO-clip surrogate (`algorithms.clip.actor_objective`). On the first,
on-policy minibatch the ratio is 1 and the surrogate's gradient is exactly REINFORCE's
A * grad log pi; the clip only matters for later minibatches and epochs. Plain REINFORCE is
`--set rloo.clip_low=1 --set rloo.clip_high=1e9` (the clip then never binds).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from algorithms.base import Batch, outcome_token_rewards, register, with_defaults
from algorithms.clip import ClipActor, RewardKLOptions
from algorithms.common import group_advantages, kl_penalty, masked_mean, masked_sum, masked_whiten
from harness.errors import HarnessError

# ---- pure math ----


def leave_one_out_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO advantage (Ahmadian et al. 2024, Eq. 7): each reward minus the mean of the others in its group.

    rewards ``[N]``, group_ids ``[N]`` (any ids, any order) -> ``[N]``:
    A_i = r_i - (sum_{j in g(i), j != i} r_j) / (n_g - 1).

    A group of one response has no other sample to be its baseline and gets A = 0, the same rule
    as GRPO's `group_advantages` (nothing to compare it with, so it does not move the policy).
    verl's RLOO instead gives it A = r (no baseline), as its GRPO gives r / (1 + eps).
    """
    _, group = torch.unique(group_ids, return_inverse=True)
    n_groups = int(group.max()) + 1 if group.numel() else 0
    count = rewards.new_zeros(n_groups).index_add_(0, group, torch.ones_like(rewards))[group]
    total = rewards.new_zeros(n_groups).index_add_(0, group, rewards)[group]
    adv = rewards - (total - rewards) / (count - 1).clamp(min=1)
    return torch.where(count > 1, adv, torch.zeros_like(adv))


@torch.no_grad()
def reward_to_go(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Returns G_t = sum_{s >= t} gamma^(s - t) m_s r_s, per token. ``[B, T]`` -> ``[B, T]``, 0 outside the mask."""
    rewards = torch.where(mask.bool(), token_rewards, torch.zeros_like(token_rewards))
    returns = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return torch.where(mask.bool(), returns, torch.zeros_like(returns))


# ---- RLOO ----


# kl_mode reward as the paper: r(x, y) - kl_coef * sum_t KL_t, before the baseline; kl_coef 0.05, the
# PPO baseline's coefficient, for a like-for-like comparison
@dataclass
class RLOOOptions(with_defaults(
    RewardKLOptions,
    agg_mode="seq-mean-token-sum",  # the response is one action: -A * log pi(y|x) per sequence
)):
    pass


@register
class RLOO(ClipActor):
    name = "rloo"
    description = "REINFORCE with a leave-one-out group baseline on the sequence reward (KL in reward), PPO-clip"
    paper = "Ahmadian et al. 2024 (Back to Basics, arXiv 2402.14740)"
    Options = RLOOOptions

    def min_group_size(self) -> int:
        return 2  # the baseline is the mean of the group's other samples

    def advantages(self, batch: Batch) -> dict[str, float]:
        mask, rewards = batch["response_mask"], batch["scores"].float()
        metrics = {}
        if self.opts.kl_mode == "reward" and self.opts.kl_coef > 0:
            seq_kl = masked_sum(kl_penalty(batch["old_logp"], batch["ref_logp"], self.opts.kl_reward_kind), mask, dim=-1)
            rewards = rewards - self.opts.kl_coef * seq_kl
            metrics["actor/seq_kl_penalty"] = float(self.opts.kl_coef * seq_kl.mean())
        adv = leave_one_out_advantages(rewards, batch["group_ids"])
        batch["advantages"] = adv.unsqueeze(-1) * mask
        return {"actor/adv_abs_mean": float(adv.abs().mean()), **metrics}


# ---- REINFORCE++ ----


# kl_mode reward: the token-level KL penalty in the reward (Hu 2025)
@dataclass
class ReinforcePPOptions(with_defaults(
    RewardKLOptions,
    kl_coef=0.01,  # OpenRLHF's init_kl_coef, where REINFORCE++ was released
)):
    gamma: float = field(default=1.0, metadata={"doc": "discount factor of the token-level returns"})
    # REINFORCE++-baseline, the paper's form for G samples per prompt: subtract the group mean
    # score before the KL shaping and the global normalisation. False is plain REINFORCE++, which
    # with no per-prompt baseline fails the unit bandit (tests/test_learning.py): prompts whose
    # samples all fail only see negative advantages and drift to junk rather than to the answer.
    group_baseline: bool = field(default=True, metadata={"doc": "subtract the group mean score (REINFORCE++-baseline)"})

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.gamma <= 1:
            raise HarnessError(f"gamma must lie in [0, 1], got {self.gamma}")


@register
class ReinforcePP(ClipActor):
    name = "reinforce_pp"
    description = ("REINFORCE++(-baseline): group-mean baseline, token KL in the reward, reward-to-go, "
                   "batch-normalised advantage, PPO-clip")
    paper = "Hu 2025 (REINFORCE++, arXiv 2501.03262)"
    Options = ReinforcePPOptions

    def min_group_size(self) -> int:
        return 2 if self.opts.group_baseline else 1  # a group of one minus its own mean is 0

    def advantages(self, batch: Batch) -> dict[str, float]:
        mask, scores = batch["response_mask"], batch["scores"].float()
        if self.opts.group_baseline:
            scores = group_advantages(scores, batch["group_ids"], "none")
        rewards = outcome_token_rewards(scores, mask)
        if self.opts.kl_mode == "reward" and self.opts.kl_coef > 0:
            rewards = rewards - self.opts.kl_coef * kl_penalty(batch["old_logp"], batch["ref_logp"],
                                                               self.opts.kl_reward_kind) * mask
        returns = reward_to_go(rewards, mask, self.opts.gamma)
        batch["advantages"] = masked_whiten(returns, mask)  # over every valid token of the batch
        return {"actor/returns_mean": float(masked_mean(returns, mask))}
