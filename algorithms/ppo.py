"""PPO for LLMs: token-level actor-critic (spec §5)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from algorithms.base import ALGOS, Algorithm, Batch, PolicyForward, outcome_token_rewards
from algorithms.common import AGG_MODES, KL_KINDS, agg_loss, gae, kl_penalty, masked_mean, masked_whiten
from harness.errors import HarnessError

# ---- pure math ----


def clip_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg_mode: str = "token-mean",
    dual_clip: float | None = None,
    norm_const: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate loss (spec §5.3), with decoupled clip range (DAPO clip-higher).

    logp, old_logp, advantages, mask: ``[B, T]``. Per token, with
    ratio = exp(clamp(logp - old_logp, -20, 20)):

        pg1  = -A * ratio
        pg2  = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)
        loss = max(pg1, pg2)

    With ``dual_clip`` = c (> 1), tokens with A < 0 are further capped: min(loss, -A * c).
    The per-token loss is reduced with ``agg_loss(..., agg_mode, norm_const)``.

    Returns (scalar loss with grad, metrics of python floats):
    ``actor/pg_loss``; ``actor/clipfrac`` (fraction of valid tokens with pg2 > pg1);
    ``actor/approx_kl`` (masked mean of old_logp - logp, the k1 estimate of KL(old || new));
    ``actor/ratio_mean`` (masked mean ratio).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise HarnessError(f"dual_clip must be greater than 1, got {dual_clip}")

    log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg1, pg2)
    if dual_clip is not None:
        capped = torch.minimum(per_token, -advantages * dual_clip)
        per_token = torch.where(advantages < 0, capped, per_token)
    loss = agg_loss(per_token, mask, agg_mode, norm_const)

    with torch.no_grad():
        metrics = {
            "actor/pg_loss": loss.item(),
            "actor/clipfrac": masked_mean((pg2 > pg1).float(), mask).item(),
            "actor/approx_kl": masked_mean(-log_ratio, mask).item(),
            "actor/ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, metrics


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (spec §5.3).

    values, old_values, returns, mask: ``[B, T]``. Per token,

        v_clip = old + clamp(v - old, -clip, clip)
        loss   = 0.5 * agg( max((v - R)^2, (v_clip - R)^2) )

    Returns (scalar loss with grad, metrics of python floats): ``critic/vf_loss``;
    ``critic/vf_clipfrac`` (fraction of valid tokens where the clipped error is strictly
    larger); ``critic/vpred_mean`` (masked mean of ``values``).
    """
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    err = (values - returns) ** 2
    err_clip = (v_clip - returns) ** 2
    loss = 0.5 * agg_loss(torch.maximum(err, err_clip), mask, agg_mode)

    with torch.no_grad():
        metrics = {
            "critic/vf_loss": loss.item(),
            "critic/vf_clipfrac": masked_mean((err_clip > err).float(), mask).item(),
            "critic/vpred_mean": masked_mean(values, mask).item(),
        }
    return loss, metrics


# ---- the algorithm ----


def actor_objective(mb: Batch, fwd: PolicyForward, opts) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip on `mb["advantages"]`, plus a KL-to-reference loss term when `opts.kl_mode == "loss"`
    and an entropy bonus when `opts.entropy_coef > 0`. Shared by every PPO-clip actor (PPO, GRPO, ...)."""
    mask = mb["response_mask"]
    # Only the GRPO family has agg_norm_const; elsewhere seq-mean-token-sum-norm divides by T.
    norm_const = getattr(opts, "agg_norm_const", 0) or None
    loss, metrics = clip_policy_loss(fwd.logp, mb["old_logp"], mb["advantages"], mask, opts.clip_low,
                                     opts.clip_high, opts.agg_mode, opts.dual_clip, norm_const)
    if opts.kl_mode == "loss" and opts.kl_coef > 0:
        kl = agg_loss(kl_penalty(fwd.logp, mb["ref_logp"], opts.kl_loss_kind), mask, opts.agg_mode, norm_const)
        loss = loss + opts.kl_coef * kl
        metrics["actor/kl_loss"] = kl.item()
    if opts.entropy_coef > 0:
        loss = loss - opts.entropy_coef * agg_loss(fwd.entropy, mask, opts.agg_mode, norm_const)
    return loss, metrics


KL_MODES = ("reward", "loss", "none")


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


def check_clip_options(opts) -> None:
    """Validation shared by every PPO-clip options class."""
    if opts.clip_low < 0 or opts.clip_high < 0:
        raise HarnessError(f"clip_low and clip_high must be >= 0, got {opts.clip_low}, {opts.clip_high}")
    if opts.dual_clip is not None and opts.dual_clip <= 1:
        raise HarnessError(f"dual_clip must be greater than 1 (or none), got {opts.dual_clip}")
    if opts.kl_coef < 0 or opts.entropy_coef < 0:
        raise HarnessError(f"kl_coef and entropy_coef must be >= 0, got {opts.kl_coef}, {opts.entropy_coef}")
    if opts.agg_mode not in AGG_MODES:
        raise HarnessError(f"unknown agg_mode {opts.agg_mode!r} (valid: {', '.join(AGG_MODES)})")


@ALGOS.register("ppo")
class PPO(Algorithm):
    name = "ppo"
    description = "token-level PPO: scalar critic, GAE, clipped surrogate and value loss, KL in reward or loss"
    paper = "Schulman et al. 2017; Zheng et al. 2023 (Secrets of RLHF, arXiv 2307.04964)"
    Options = PPOOptions
    critic = "scalar"

    def needs_reference(self) -> bool:
        return self.opts.kl_mode != "none" and self.opts.kl_coef > 0

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

    def actor_loss(self, mb: Batch, fwd: PolicyForward, heads) -> tuple[torch.Tensor, dict[str, float]]:
        return actor_objective(mb, fwd, self.opts)

    def critic_loss(self, mb: Batch, critic) -> tuple[torch.Tensor, dict[str, float]]:
        return clipped_value_loss(critic.on_batch(mb), mb["old_values"], mb["returns"], mb["response_mask"],
                                  self.opts.value_clip, self.opts.agg_mode)
