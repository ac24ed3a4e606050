"""GRPO and its variants Dr. GRPO and DAPO (spec §4)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from algorithms.base import Batch, informative_groups, register, register_variant, with_defaults
from algorithms.clip import ClipActor, ClipOptions
from algorithms.common import GROUP_SCALES, KL_KINDS, group_advantages
from algorithms.search import Choice
from harness.errors import HarnessError

# ---- pure math ----


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), added to the outcome reward.

    lengths: ``[N]`` response lengths. With L_max = ``max_len`` and L_cache = ``buffer_len``:
    0 for |y| <= L_max - L_cache, then linear down to -``factor`` at |y| = L_max, and
    -``factor`` beyond. Returns ``[N]`` float.
    """
    over = (lengths.float() - (max_len - buffer_len)) / buffer_len
    return -factor * over.clamp(0.0, 1.0)


# ---- the algorithm ----


@dataclass
class GRPOOptions(with_defaults(
    ClipOptions,
    kl_mode="loss",  # GRPO puts the KL in the loss, not the reward (spec §4.1)
    kl_coef=0.04,  # DeepSeekMath §4.2 (verl's default is 0.001)
    agg_mode="seq-mean-token-mean",  # the original 1/|o_i| form (spec §4.4)
)):
    adv_scale: str = field(default="std", metadata={"doc": "group advantage scale: std (GRPO) or none (Dr. GRPO)"})  # "none" is Dr. GRPO
    adv_eps: float = field(default=1e-6, metadata={"doc": "epsilon added to the group std"})
    # C of agg_mode seq-mean-token-sum-norm (Dr. GRPO): "a constant, e.g. the max response length"
    # (spec §0.2, §4.2). 0 stands for train.max_new_tokens, resolved per cell into config.json.  [I]
    agg_norm_const: int = field(default=0, metadata={"doc": "constant C of agg_mode seq-mean-token-sum-norm (0: train.max_new_tokens)"})
    dynamic_sampling: bool = field(default=False, metadata={"doc": "DAPO: train only on groups whose training rewards differ"})  # DAPO: train only on groups whose training rewards differ
    max_extra_rounds: int = field(default=4, metadata={"doc": "dynamic sampling: at most this many extra rollout rounds per step"})  # dynamic sampling: at most this many extra rollout rounds per step
    overlong_buffer_len: int = field(default=0, metadata={"doc": "DAPO overlong shaping buffer L_cache (0: off)"})  # DAPO overlong shaping: L_cache; 0 disables
    overlong_max_len: int = field(default=0, metadata={"doc": "DAPO overlong shaping L_max (needed with overlong_buffer_len > 0)"})  # L_max, e.g. train.max_new_tokens; needed when overlong_buffer_len > 0
    overlong_penalty: float = field(default=1.0, metadata={"doc": "DAPO overlong penalty at L_max"})  # the penalty at L_max

    def validate(self) -> None:
        super().validate()
        if self.agg_norm_const < 0:
            raise HarnessError(f"agg_norm_const must be >= 0 (0: train.max_new_tokens), got {self.agg_norm_const}")
        if self.max_extra_rounds < 0:
            raise HarnessError(f"max_extra_rounds must be >= 0, got {self.max_extra_rounds}")
        if self.overlong_buffer_len < 0 or self.overlong_penalty < 0:
            raise HarnessError(f"overlong_buffer_len and overlong_penalty must be >= 0, got "
                               f"{self.overlong_buffer_len}, {self.overlong_penalty}")
        if self.overlong_buffer_len > 0 and self.overlong_max_len < self.overlong_buffer_len:
            raise HarnessError(f"overlong shaping needs overlong_max_len (e.g. train.max_new_tokens) >= "
                               f"overlong_buffer_len, got {self.overlong_max_len} < {self.overlong_buffer_len}")
        if self.kl_mode not in ("loss", "none"):
            raise HarnessError(f"GRPO kl_mode must be loss or none, got {self.kl_mode!r}")
        if self.kl_loss_kind not in KL_KINDS:
            raise HarnessError(f"unknown KL kind {self.kl_loss_kind!r} (valid: {', '.join(KL_KINDS)})")
        if self.adv_scale not in GROUP_SCALES:
            raise HarnessError(f"unknown adv_scale {self.adv_scale!r} (valid: {', '.join(GROUP_SCALES)})")


@register
class GRPO(ClipActor):
    name = "grpo"
    description = "group-normalised outcome advantage, PPO-clip, k3 KL loss, no critic"
    paper = "Shao et al. 2024 (DeepSeekMath, arXiv 2402.03300)"
    Options = GRPOOptions
    # harness tune: the group size sets the baseline's variance (samples per prompt); [I]
    SEARCH_SPACE = {"train.group_size": Choice((2, 4, 8))}

    @classmethod
    def cell_options(cls, options: GRPOOptions, train) -> GRPOOptions:
        """agg_norm_const 0 stands for the generation limit, train.max_new_tokens (spec §4.2)."""
        if options.agg_norm_const == 0:
            return replace(options, agg_norm_const=train.max_new_tokens)
        return options

    def loss_norm_const(self) -> float | None:
        return self.opts.agg_norm_const or None

    def keep_groups(self, scores: torch.Tensor) -> torch.Tensor | None:
        return informative_groups(scores) if self.opts.dynamic_sampling else None

    def extra_sampling_rounds(self) -> int:
        return self.opts.max_extra_rounds

    def min_group_size(self) -> int:
        return 2  # the advantage is relative to the group's other samples

    def advantages(self, batch: Batch) -> dict[str, float]:
        scores, metrics = batch["scores"], {}
        if self.opts.overlong_buffer_len > 0:
            penalty = overlong_penalty(batch["response_mask"].sum(-1), self.opts.overlong_max_len,
                                       self.opts.overlong_buffer_len, self.opts.overlong_penalty)
            scores = scores + penalty
            metrics["actor/overlong_penalty_mean"] = float(penalty.mean())
        adv = group_advantages(scores, batch["group_ids"], self.opts.adv_scale, self.opts.adv_eps)
        batch["advantages"] = adv.unsqueeze(-1) * batch["response_mask"]
        solved = group_advantages(scores, batch["group_ids"], "none") != 0
        return {"actor/nonzero_adv_frac": float(solved.float().mean()), **metrics}


# ---- named variants: GRPO with other defaults ----


# Dr. GRPO: no std scaling, token sum over a constant (spec §4.2). Spec §4.2 is silent on the KL;
# the paper's objective has no KL term, so none here (`--set drgrpo.kl_mode=loss` restores it).
DrGRPO = register_variant(
    GRPO, "drgrpo", "GRPO without std and length normalisation: A = r - group mean, token sum over a constant",
    "Liu et al. 2025 (Understanding R1-Zero-Like Training, arXiv 2503.20783)",
    adv_scale="none", agg_mode="seq-mean-token-sum-norm", kl_mode="none", kl_coef=0.0,
)

# DAPO: clip-higher, token-level loss, no KL, dynamic sampling (spec §4.3); overlong shaping is
# off unless overlong_buffer_len and overlong_max_len are set.
DAPO = register_variant(
    GRPO, "dapo", "GRPO with clip-higher (0.2/0.28), token-mean loss, no KL, dynamic sampling of informative groups",
    "Yu et al. 2025 (DAPO, arXiv 2503.14476)",
    clip_low=0.2, clip_high=0.28, agg_mode="token-mean", kl_mode="none", kl_coef=0.0, dynamic_sampling=True,
)
