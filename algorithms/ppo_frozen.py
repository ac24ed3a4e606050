"""PPO with a frozen critic: the control that tells whether PPO's critic helps on a testbed.

PPO's scalar head is zero-initialised (`algorithms.critics.ScalarHead`), so its critic frozen at
initialisation predicts V = 0 for every state, whatever the backbone. This variant is exactly
that: PPO in every option and loss, with GAE run on V = 0,

    A_t = sum_l (gamma lam)^l r_{t+l}     (the KL-shaped outcome reward, discounted back from the end)

and no critic to build, run or train. Where a trained critic tracks only the batch mean (explained
variance near 0) the two score alike; a testbed with room for critics shows PPO ahead of it.
"""
from __future__ import annotations

import torch

from algorithms.base import Batch, register
from algorithms.common import gae, masked_mean, masked_whiten
from algorithms.ppo import PPO


@register
class FrozenCriticPPO(PPO):
    name = "ppo_frozen_critic"
    description = "PPO with its critic frozen at its zero initialisation (V = 0): the critic's control"
    paper = "control for Schulman et al. 2017 (PPO, arXiv 1707.06347)"
    critic = "none"

    def advantages(self, batch: Batch) -> dict[str, float]:
        mask, rewards = batch["response_mask"], self.token_rewards(batch)
        adv, returns = gae(rewards, torch.zeros_like(rewards), mask, self.opts.gamma, self.opts.lam)
        if self.opts.whiten_advantages:
            adv = masked_whiten(adv, mask)
        batch["advantages"], batch["returns"] = adv, returns
        return {"critic/returns_mean": float(masked_mean(returns, mask))}
