"""PPO for LLMs: token-level actor-critic (spec §5)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from algorithms.base import Batch, outcome_token_rewards, register
from algorithms.clip import ClipActor, RewardKLOptions
from algorithms.common import KL_KINDS, clipped_value_loss, gae, kl_penalty, masked_mean, masked_whiten
from harness.errors import HarnessError


@dataclass
class PPOOptions(RewardKLOptions):
    # the shared clip/KL options (algorithms.clip) at their defaults: KL in the reward, spec §5.2 option A
    # (InstructGPT / PPO-max; "loss" is option B), kl_coef 0.05 (spec §9 #10)
    gamma: float = field(default=1.0, metadata={"doc": "discount factor of GAE"})  # spec §5.3: MOSS-RLHF / TRL
    lam: float = field(default=0.95, metadata={"doc": "GAE lambda"})
    value_clip: float = field(default=0.2, metadata={"doc": "value-loss clip range around the old values"})  # MOSS-RLHF / TRL (verl: 0.5)
    whiten_advantages: bool = field(default=True, metadata={"doc": "whiten advantages over the batch"})

    def validate(self) -> None:
        super().validate()
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise HarnessError(f"gamma and lam must lie in [0, 1], got {self.gamma}, {self.lam}")
        if self.value_clip <= 0:
            raise HarnessError(f"value_clip must be > 0, got {self.value_clip}")
        for kind in (self.kl_reward_kind, self.kl_loss_kind):
            if kind not in KL_KINDS:
                raise HarnessError(f"unknown KL kind {kind!r} (valid: {', '.join(KL_KINDS)})")


@register
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
