"""PPO for LLMs: token-level actor-critic (spec §5)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from algorithms.base import ALGOS, Batch, outcome_token_rewards
from algorithms.common import (KL_KINDS, KL_MODES, ClipActor, check_clip_options, clipped_value_loss, gae, kl_penalty,
                               masked_mean, masked_whiten)
from harness.errors import HarnessError

@dataclass
class PPOOptions:
    gamma: float = 1.0  # spec §5.3: MOSS-RLHF / TRL
    lam: float = 0.95
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None  # e.g. 3.0; None disables
    value_clip: float = 0.2  # MOSS-RLHF / TRL (verl: 0.5)
    kl_mode: str = "reward"  # spec §5.2 option A (InstructGPT / PPO-max); "loss" is option B
    kl_coef: float = 0.05  # spec §9 #10
    kl_reward_kind: str = "k1"
    kl_loss_kind: str = "k3"
    whiten_advantages: bool = True
    agg_mode: str = "token-mean"
    entropy_coef: float = 0.0

    def validate(self) -> None:
        check_clip_options(self)
        if self.kl_mode not in KL_MODES:
            raise HarnessError(f"kl_mode must be one of {', '.join(KL_MODES)}, got {self.kl_mode!r}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise HarnessError(f"gamma and lam must lie in [0, 1], got {self.gamma}, {self.lam}")
        if self.value_clip <= 0:
            raise HarnessError(f"value_clip must be > 0, got {self.value_clip}")
        for kind in (self.kl_reward_kind, self.kl_loss_kind):
            if kind not in KL_KINDS:
                raise HarnessError(f"unknown KL kind {kind!r} (valid: {', '.join(KL_KINDS)})")


@ALGOS.register("ppo")
class PPO(ClipActor):
    name = "ppo"
    description = "token-level PPO: scalar critic, GAE, clipped surrogate and value loss, KL in reward or loss"
    paper = "Schulman et al. 2017; Zheng et al. 2023 (Secrets of RLHF, arXiv 2307.04964)"
    Options = PPOOptions
    critic = "scalar"

    def token_rewards(self, batch: Batch) -> torch.Tensor:
        """Outcome score on the last token, minus the per-token KL penalty when it is in the reward."""
        mask = batch["response_mask"]
        rewards = outcome_token_rewards(batch["scores"], mask)
        if self.opts.kl_mode == "reward" and self.opts.kl_coef > 0:
            kl = kl_penalty(batch["old_logp"], batch["ref_logp"], self.opts.kl_reward_kind)
            rewards = rewards - self.opts.kl_coef * kl * mask
        return rewards

    def advantages(self, batch: Batch) -> dict[str, float]:
        mask = batch["response_mask"]
        adv, returns = gae(self.token_rewards(batch), batch["old_values"], mask, self.opts.gamma, self.opts.lam)
        if self.opts.whiten_advantages:
            adv = masked_whiten(adv, mask)
        batch["advantages"], batch["returns"] = adv, returns
        return {"critic/returns_mean": float(masked_mean(returns, mask))}

    def critic_loss(self, mb: Batch, critic, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return clipped_value_loss(critic.on_batch(mb), mb["old_values"], mb["returns"], mb["response_mask"],
                                  self.opts.value_clip, self.opts.agg_mode)
