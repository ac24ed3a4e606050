"""The PPO-clip actor and the options it shares (spec §4, §5).

`ClipOptions` declares once the option fields every PPO-clip algorithm has (`clip_low`, `clip_high`,
`dual_clip`, `kl_mode`, `kl_coef`, `kl_loss_kind`, `agg_mode`, `entropy_coef`), with their docs and
their shared validation; `RewardKLOptions` adds the KL estimator of a KL penalty in the reward. An
algorithm's Options class derives from one of them and changes a shared default with
`algorithms.base.with_defaults`:

    @dataclass
    class MyOptions(with_defaults(ClipOptions, kl_mode="none", kl_coef=0.0)):
        my_knob: float = field(default=1.0, metadata={"doc": "..."})

`ClipActor` is the actor loss on those options (`actor_objective`): an algorithm deriving from it
supplies only its advantages (and a critic's loss).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from algorithms.base import Algorithm, Batch, PolicyForward
from algorithms.common import AGG_MODES, KL_MODES, agg_loss, clip_policy_loss, kl_penalty
from harness.errors import HarnessError


@dataclass
class ClipOptions:
    """The PPO-clip actor's options (`actor_objective` reads them by these names)."""

    clip_low: float = field(default=0.2, metadata={"doc": "PPO clip range below 1 (ratio >= 1 - clip_low)"})
    clip_high: float = field(default=0.2, metadata={"doc": "PPO clip range above 1 (ratio <= 1 + clip_high; DAPO clip-higher when larger)"})
    dual_clip: Optional[float] = field(default=None, metadata={"doc": "dual-clip constant c > 1 for negative advantages (none: off)"})  # e.g. 3.0; None disables
    kl_mode: str = field(default="reward", metadata={"doc": "where the KL to the reference goes: reward, loss or none"})
    kl_coef: float = field(default=0.05, metadata={"doc": "KL coefficient"})  # spec §9 #10
    kl_loss_kind: str = field(default="k3", metadata={"doc": "KL estimator in the loss: k1, k2, k3 or abs"})
    agg_mode: str = field(default="token-mean", metadata={"doc": "how token losses are reduced to one number (token-mean, seq-mean-token-mean, ...)"})
    entropy_coef: float = field(default=0.0, metadata={"doc": "entropy bonus coefficient"})

    def validate(self) -> None:
        check_clip_options(self)


@dataclass
class RewardKLOptions(ClipOptions):
    """`ClipOptions` for an algorithm that can put the KL penalty in the reward (kl_mode reward)."""

    kl_reward_kind: str = field(default="k1", metadata={"doc": "KL estimator in the reward: k1, k2, k3 or abs"})

    def validate(self) -> None:
        super().validate()
        if self.kl_mode not in KL_MODES:
            raise HarnessError(f"kl_mode must be one of {', '.join(KL_MODES)}, got {self.kl_mode!r}")



def actor_objective(mb: Batch, fwd: PolicyForward, opts, norm_const: float | None = None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip on `mb["advantages"]`, plus a KL-to-reference loss term when `opts.kl_mode == "loss"`
    and an entropy bonus when `opts.entropy_coef > 0`, every term reduced with `agg_loss(..,
    opts.agg_mode, norm_const)` (`norm_const` None: seq-mean-token-sum-norm divides by T). The PPO term
    is weighted by `mb["rollout_weight"]` when the trainer gives it (`train.rollout_correction`)."""
    mask = mb["response_mask"]
    loss, metrics = clip_policy_loss(fwd.logp, mb["old_logp"], mb["advantages"], mask, opts.clip_low,
                                     opts.clip_high, opts.agg_mode, opts.dual_clip, norm_const,
                                     mb.get("rollout_weight"))
    if opts.kl_mode == "loss" and opts.kl_coef > 0:
        kl = agg_loss(kl_penalty(fwd.logp, mb["ref_logp"], opts.kl_loss_kind), mask, opts.agg_mode, norm_const)
        loss = loss + opts.kl_coef * kl
        metrics["actor/kl_loss"] = kl.item()
    if opts.entropy_coef > 0:
        loss = loss - opts.entropy_coef * agg_loss(fwd.entropy, mask, opts.agg_mode, norm_const)
    return loss, metrics


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


class ClipActor(Algorithm):
    """An algorithm whose actor loss is `actor_objective` on its options (PPO, GRPO and its variants,
    RLOO, REINFORCE++, and PPO's subclasses): the reference is needed for a KL term, the entropy
    needs a gradient for an entropy bonus. Subclasses supply `advantages` (and a critic's loss)."""

    supports_rollout_correction = True

    def needs_reference(self) -> bool:
        return self.opts.kl_mode != "none" and self.opts.kl_coef > 0

    def entropy_needs_grad(self) -> bool:
        return self.opts.entropy_coef > 0

    def loss_norm_const(self) -> float | None:
        """C of agg_mode seq-mean-token-sum-norm; None: the response width T."""
        return None

    def actor_loss(self, mb: Batch, fwd: PolicyForward, heads) -> tuple[torch.Tensor, dict[str, float]]:
        return actor_objective(mb, fwd, self.opts, self.loss_norm_const())
