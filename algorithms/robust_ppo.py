"""Robust-Bellman PPO: the worst-case baseline of DVPO (spec §2.4, §9 #12).

PPO with an ensemble of H scalar value heads whose bootstrap is min-aggregated (the pessimistic
robust-Bellman backup):

    delta_t = r_t + gamma min_h V_h(s_{t+1}) - Vbar(s_t),   Vbar = mean_h V_h,
    A_t     = sum_l (gamma lam)^l delta_{t+l},              R_t = Vbar(s_t) + A_t,

and every head regresses to R_t with PPO's clipped value loss. Everything else is PPO.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from algorithms.base import Batch, register
from algorithms.common import clipped_value_loss, explained_variance, gae, masked_mean, masked_whiten
from algorithms.critics import CRITICS
from algorithms.ppo import PPO, PPOOptions
from harness.errors import HarnessError


@CRITICS.register("ensemble")
class EnsembleHead(nn.Module):
    """H linear value heads: `hidden [..., d]` -> `[..., H]`. Zero biases and small random weights
    (std `init_std / sqrt(d)`), so the heads start near 0 but differ, as an ensemble must."""

    def __init__(self, hidden_size: int, n_heads: int = 4, init_std: float = 0.1):
        super().__init__()
        self.linear = nn.Linear(hidden_size, n_heads)
        nn.init.normal_(self.linear.weight, std=init_std / math.sqrt(hidden_size))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float())


@torch.no_grad()
def robust_gae(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
               lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE with a min-over-heads bootstrap (spec §2.4), without grad.

    token_rewards, mask `[B, T]` (right-padded); values `[B, T, H]` -> (advantages, returns) `[B, T]`.
    delta_t = r_t + gamma min_h V_h(s_{t+1}) - mean_h V_h(s_t), with 0 after the last token. Computed
    as ordinary GAE on the mean values with the reward r_t + gamma (min - mean)(s_{t+1}).
    """
    mean, low = values.mean(-1), values.min(-1).values
    gap = torch.where(mask.bool(), low - mean, torch.zeros_like(mean))
    next_gap = torch.cat([gap[:, 1:], torch.zeros_like(gap[:, :1])], dim=1)
    return gae(token_rewards + gamma * next_gap, mean, mask, gamma, lam)


@dataclass
class RobustPPOOptions(PPOOptions):
    n_heads: int = field(default=4, metadata={"doc": "value heads whose minimum is the robust Bellman target"})  # spec §9 #12

    def validate(self) -> None:
        super().validate()
        if self.n_heads < 1:
            raise HarnessError(f"n_heads must be >= 1, got {self.n_heads}")


@register
class RobustPPO(PPO):
    name = "robust_ppo"
    description = "PPO with an ensemble of value heads and a min-aggregated (robust Bellman) bootstrap"
    paper = "baseline of Zhu et al. 2025 (DVPO, arXiv 2512.03847), spec §2.4"
    Options = RobustPPOOptions
    critic = "ensemble"

    def critic_options(self) -> dict:
        return {"n_heads": self.opts.n_heads}

    def advantages(self, batch: Batch) -> dict[str, float]:
        mask, values = batch["response_mask"], batch["old_values"]  # values [B, T, H]
        adv, returns = robust_gae(self.token_rewards(batch), values, mask, self.opts.gamma, self.opts.lam)
        if self.opts.whiten_advantages:
            adv = masked_whiten(adv, mask)
        batch["advantages"], batch["returns"] = adv, returns
        spread = values.max(-1).values - values.min(-1).values
        return {"critic/returns_mean": float(masked_mean(returns, mask)),
                "critic/explained_var": float(explained_variance(values.mean(-1), returns, mask)),
                "critic/head_spread": float(masked_mean(spread, mask))}

    def critic_loss(self, mb: Batch, critic, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        values = critic.on_batch(mb)
        n = values.shape[-1]
        total, sums = values.new_zeros(()), {}
        for h in range(n):
            loss, metrics = clipped_value_loss(values[..., h], mb["old_values"][..., h], mb["returns"],
                                               mb["response_mask"], self.opts.value_clip, self.opts.agg_mode)
            total = total + loss / n
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / n
        return total, sums
