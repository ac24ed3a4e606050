"""GRPO and its variants Dr. GRPO and DAPO (spec §4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from algorithms.base import ALGOS, Algorithm, Batch, PolicyForward
from algorithms.common import KL_KINDS
from algorithms.ppo import actor_objective, check_clip_options
from harness.errors import HarnessError

GROUP_SCALES = ("std", "none")

# ---- pure math ----


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "std", eps: float = 1e-6
) -> torch.Tensor:
    """Group-normalised outcome advantage (spec §4.1, §4.2).

    rewards: ``[N]`` float, one scalar reward per response. group_ids: ``[N]`` integer, the
    prompt (group) of each response; any values, in any order. Returns ``[N]``:

    - ``std`` (GRPO): (r - group_mean) / (group_std + eps), group_std unbiased as in
      ``torch.std``;
    - ``none`` (Dr. GRPO): r - group_mean.

    A group of one response gets advantage 0 under both scales (there is nothing to compare
    it with). Note verl instead uses mean 0 and std 1 for such a group, i.e. A = r / (1 + eps).
    """
    if scale not in GROUP_SCALES:
        raise HarnessError(f"unknown advantage scale {scale!r} (valid: {', '.join(GROUP_SCALES)})")

    ids, group = torch.unique(group_ids, return_inverse=True)  # group: [N] in 0..G-1
    count = rewards.new_zeros(ids.numel()).index_add_(0, group, torch.ones_like(rewards))  # [G]
    total = rewards.new_zeros(ids.numel()).index_add_(0, group, rewards)  # [G]
    adv = rewards - (total / count)[group]
    if scale == "std":
        sum_sq = rewards.new_zeros(ids.numel()).index_add_(0, group, adv**2)  # [G]
        std = (sum_sq / (count - 1).clamp(min=1)).sqrt()  # unbiased, as torch.std
        adv = adv / (std[group] + eps)
    singleton = count[group] == 1
    return torch.where(singleton, torch.zeros_like(adv), adv)


# ---- the algorithm ----


@dataclass
class GRPOOptions:
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    kl_mode: str = "loss"  # GRPO puts the KL in the loss, not the reward (spec §4.1)
    kl_coef: float = 0.04  # DeepSeekMath §4.2 (verl's default is 0.001)
    kl_loss_kind: str = "k3"
    adv_scale: str = "std"  # "none" is Dr. GRPO
    adv_eps: float = 1e-6
    agg_mode: str = "seq-mean-token-mean"  # the original 1/|o_i| form (spec §4.4)
    entropy_coef: float = 0.0

    def validate(self) -> None:
        check_clip_options(self)
        if self.kl_mode not in ("loss", "none"):
            raise HarnessError(f"GRPO kl_mode must be loss or none, got {self.kl_mode!r}")
        if self.kl_loss_kind not in KL_KINDS:
            raise HarnessError(f"unknown KL kind {self.kl_loss_kind!r} (valid: {', '.join(KL_KINDS)})")
        if self.adv_scale not in GROUP_SCALES:
            raise HarnessError(f"unknown adv_scale {self.adv_scale!r} (valid: {', '.join(GROUP_SCALES)})")


@ALGOS.register("grpo")
class GRPO(Algorithm):
    name = "grpo"
    description = "group-normalised outcome advantage, PPO-clip, k3 KL loss, no critic"
    paper = "Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300)"
    Options = GRPOOptions

    def needs_reference(self) -> bool:
        return self.opts.kl_mode == "loss" and self.opts.kl_coef > 0

    def advantages(self, batch: Batch) -> dict[str, float]:
        adv = group_advantages(batch["scores"], batch["group_ids"], self.opts.adv_scale, self.opts.adv_eps)
        batch["advantages"] = adv.unsqueeze(-1) * batch["response_mask"]
        solved = group_advantages(batch["scores"], batch["group_ids"], "none") != 0
        return {"actor/nonzero_adv_frac": float(solved.float().mean())}

    def actor_loss(self, mb: Batch, fwd: PolicyForward, heads) -> tuple[torch.Tensor, dict[str, float]]:
        return actor_objective(mb, fwd, self.opts)
