"""PPO for LLMs: token-level actor-critic (spec §5)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from algorithms.base import ALGOS, Batch, outcome_token_rewards
from algorithms.common import (KL_KINDS, KL_MODES, ClipActor, check_clip_options, clipped_value_loss, gae, kl_penalty,
                               masked_mean, masked_whiten)
from harness.errors import HarnessError

@dataclass
class PPOOptions:
    gamma: float = field(default=1.0, metadata={"doc": "discount factor of GAE"})  # spec §5.3: MOSS-RLHF / TRL
    lam: float = field(default=0.95, metadata={"doc": "GAE lambda"})
    clip_low: float = field(default=0.2, metadata={"doc": "PPO clip range below 1 (ratio >= 1 - clip_low)"})
    clip_high: float = field(default=0.2, metadata={"doc": "PPO clip range above 1 (ratio <= 1 + clip_high; DAPO clip-higher when larger)"})
    dual_clip: Optional[float] = field(default=None, metadata={"doc": "dual-clip constant c > 1 for negative advantages (none: off)"})  # e.g. 3.0; None disables
    value_clip: float = field(default=0.2, metadata={"doc": "value-loss clip range around the old values"})  # MOSS-RLHF / TRL (verl: 0.5)
    kl_mode: str = field(default="reward", metadata={"doc": "where the KL to the reference goes: reward, loss or none"})  # spec §5.2 option A (InstructGPT / PPO-max); "loss" is option B
    kl_coef: float = field(default=0.05, metadata={"doc": "KL coefficient"})  # spec §9 #10
    kl_reward_kind: str = field(default="k1", metadata={"doc": "KL estimator in the reward: k1, k2, k3 or abs"})
    kl_loss_kind: str = field(default="k3", metadata={"doc": "KL estimator in the loss: k1, k2, k3 or abs"})
    whiten_advantages: bool = field(default=True, metadata={"doc": "whiten advantages over the batch"})
    agg_mode: str = field(default="token-mean", metadata={"doc": "how token losses are reduced to one number (token-mean, seq-mean-token-mean, ...)"})
    entropy_coef: float = field(default=0.0, metadata={"doc": "entropy bonus coefficient"})

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
