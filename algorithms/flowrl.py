"""FlowRL: matching the reward distribution with a trajectory-balance loss (spec §3).

The target is pi~(y|x) ∝ exp(beta r(x,y)) pi_ref(y|x), normalised by a learnable partition
function Z_phi(x). Per sequence (spec §3.1, §3.2):

    delta = log Z_phi(x) + mean_t log pi_theta(y_t) - beta * r^ - mean_t log pi_ref(y_t)
    loss  = mean_over_sequences( w * delta^2 )

with r^ the group-normalised outcome reward, both log-prob means masked means over the response
(length normalisation), and w a detached sequence-level importance weight. log Z_phi is an MLP on
the masked mean-pool of the policy's last hidden states over the prompt tokens but the prompt's last
one, as the official code pools (`full_last_hidden[:, : -response_length - 1]` in `dp_actor.py`,
which drops the column that predicts the first response token); it is an extra
head (`extra_heads`), optimised with the actor and never part of the rollout weights. pi_ref
enters only through delta: there is no separate KL term and no entropy bonus, as in the code.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from algorithms.base import Algorithm, Batch, PolicyForward, register
from algorithms.common import group_advantages, masked_mean
from algorithms.search import LogUniform
from harness.errors import HarnessError

W_MODES = ("clip_eps", "clamp_max10", "none")

# ---- pure math ----


def tb_residual(
    log_z: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 15.0,
) -> torch.Tensor:
    """Length-normalised trajectory-balance residual (spec §3.2).

    log_z ``[B]``, logp and ref_logp ``[B, T]`` (token log-probs of the response under the
    policy and the reference), rewards ``[B]`` (the group-normalised r^), mask ``[B, T]``.
    Returns ``[B]``: log_z + mean_t logp - beta * rewards - mean_t ref_logp, both means masked
    (an empty response contributes 0 to them).
    """
    return log_z + masked_mean(logp, mask, dim=-1) - beta * rewards - masked_mean(ref_logp, mask, dim=-1)


@torch.no_grad()
def importance_weight(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "clamp_max10",
    clip_eps: float = 0.2,
    w_max: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached sequence-level importance weight pi_theta(y|x) / pi_old(y|x) (spec §3.2, §9 #14).

    logp, old_logp, mask: ``[B, T]``. w = exp(sum_t m (logp - old_logp)), with the log-ratio sum
    clamped to [-20, 20] against overflow, then

    - ``clip_eps`` (paper): clamp(w, 1 - clip_eps, 1 + clip_eps);
    - ``clamp_max10`` (verl recipe): clamp(w, max=w_max), w_max = 10 by default;
    - ``none`` (released paper code): w unchanged.

    Returns (w ``[B]``, clipped ``[B]`` bool: where the mode changed w).
    """
    if mode not in W_MODES:
        raise HarnessError(f"unknown FlowRL w_mode {mode!r} (valid: {', '.join(W_MODES)})")
    log_ratio = torch.where(mask.bool(), logp - old_logp, torch.zeros_like(logp)).sum(-1)
    raw = torch.exp(log_ratio.clamp(-20.0, 20.0))
    if mode == "clip_eps":
        w = raw.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    elif mode == "clamp_max10":
        w = raw.clamp(max=w_max)
    else:
        w = raw
    return w, w != raw


def flowrl_loss(
    log_z: torch.Tensor,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 15.0,
    w_mode: str = "clamp_max10",
    clip_eps: float = 0.2,
    w_max: float = 10.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The FlowRL loss: mean over sequences of w * delta^2 (spec §3.2).

    log_z ``[B]``; logp, old_logp, ref_logp, mask ``[B, T]``; rewards ``[B]`` (r^). See
    `tb_residual` for delta and `importance_weight` for w (detached). Returns (scalar loss with
    grad through log_z and logp, metrics): ``actor/tb_loss``, ``actor/log_z_mean``,
    ``actor/tb_residual_mean``, ``actor/tb_residual_sq`` (mean delta^2, unweighted),
    ``actor/w_mean``, ``actor/w_clipfrac`` (fraction of sequences whose weight was clipped).
    """
    delta = tb_residual(log_z, logp, ref_logp, rewards, mask, beta)
    w, clipped = importance_weight(logp, old_logp, mask, w_mode, clip_eps, w_max)
    loss = (w * delta**2).mean()
    with torch.no_grad():
        metrics = {
            "actor/tb_loss": loss.item(),
            "actor/log_z_mean": log_z.mean().item(),
            "actor/tb_residual_mean": delta.mean().item(),
            "actor/tb_residual_sq": (delta**2).mean().item(),
            "actor/w_mean": w.mean().item(),
            "actor/w_clipfrac": clipped.float().mean().item(),
        }
    return loss, metrics


# ---- the log-partition head ----


class LogPartitionHead(nn.Module):
    """log Z_phi(x) from the policy's last hidden states over prompt columns (spec §3.2, `ProjZModule`).

    ``num_layers - 1`` blocks of [Linear(d, d), GELU, LayerNorm, Dropout], then Linear(d, 1), on
    the masked mean-pool of the prompt's hidden states. With ``detach_backbone`` the pooled
    input is detached, so the head's loss does not reach the policy (the code lets it through).
    """

    def __init__(self, hidden_size: int, num_layers: int = 3, dropout: float = 0.1, detach_backbone: bool = False):
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(num_layers - 1):
            blocks += [nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size), nn.Dropout(dropout)]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden_size, 1))
        self.detach_backbone = detach_backbone

    def forward(self, hidden: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """hidden ``[B, P, d]`` (prompt columns), prompt_mask ``[B, P]`` -> log Z ``[B]``."""
        mask = prompt_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        if self.detach_backbone:
            pooled = pooled.detach()
        return self.net(pooled.float()).squeeze(-1)


# ---- the algorithm ----


@dataclass
class FlowRLOptions:
    beta: float = field(default=15.0, metadata={"doc": "reward temperature beta of the trajectory-balance loss"})  # hard-coded in the code; the verl recipe's flowrl_beta_coef
    w_mode: str = field(default="clamp_max10", metadata={"doc": "importance weight: clip_eps (paper), clamp_max10 (recipe) or none (released code)"})  # spec §9 #14: clip_eps (paper) | clamp_max10 (recipe) | none (released code)
    clip_eps: float = field(default=0.2, metadata={"doc": "importance-weight clip range with w_mode=clip_eps"})  # w_mode=clip_eps
    w_max: float = field(default=10.0, metadata={"doc": "importance-weight cap with w_mode=clamp_max10"})  # w_mode=clamp_max10
    adv_eps: float = field(default=1e-6, metadata={"doc": "epsilon added to the group std of the normalised reward"})  # r^ = (r - mean) / (std + eps), as GRPO
    z_layers: int = field(default=3, metadata={"doc": "layers of the log-partition (log Z) head"})  # the code's porj_layer: z_layers - 1 hidden blocks, then Linear(d, 1)
    z_dropout: float = field(default=0.1, metadata={"doc": "dropout of the log Z head"})
    z_detach_backbone: bool = field(default=False, metadata={"doc": "stop log Z's gradient at the backbone"})  # the code lets log Z's gradient into the backbone
    z_lr_scale: float = field(default=1.0, metadata={"doc": "log Z head learning rate as a multiple of train.lr"})  # spec §9 #15: the code shares the actor's lr; 10 is the suggested alternative

    def validate(self) -> None:
        if self.w_mode not in W_MODES:
            raise HarnessError(f"unknown FlowRL w_mode {self.w_mode!r} (valid: {', '.join(W_MODES)})")
        if not 0 < self.clip_eps < 1:
            raise HarnessError(f"FlowRL clip_eps must lie in (0, 1), got {self.clip_eps}")
        if self.w_max <= 0 or self.beta < 0 or self.z_lr_scale <= 0:
            raise HarnessError(f"FlowRL w_max and z_lr_scale must be > 0 and beta >= 0, got "
                               f"{self.w_max}, {self.z_lr_scale}, {self.beta}")
        if self.z_layers < 1 or not 0 <= self.z_dropout < 1:
            raise HarnessError(f"FlowRL z_layers must be >= 1 and z_dropout in [0, 1), got {self.z_layers}, {self.z_dropout}")


@register
class FlowRL(Algorithm):
    name = "flowrl"
    description = "trajectory balance to exp(beta r^) pi_ref with a learned log Z(x) head, no critic"
    paper = "Zhu et al. 2025 (FlowRL, arXiv 2509.15207)"
    Options = FlowRLOptions
    needs_hidden = True
    # harness tune: beta 15 comes from 7B configs (spec §3); a decade around it on log scale  [I]
    SEARCH_SPACE = {"algo.beta": LogUniform(2.0, 40.0)}

    def needs_reference(self) -> bool:
        return True

    def extra_heads(self, hidden_size: int) -> dict[str, nn.Module]:
        o = self.opts
        return {"log_z": LogPartitionHead(hidden_size, o.z_layers, o.z_dropout, o.z_detach_backbone)}

    def heads_lr_scale(self) -> float:
        return self.opts.z_lr_scale

    def min_group_size(self) -> int:
        return 2  # r^ is the group-normalised reward

    def advantages(self, batch: Batch) -> dict[str, float]:
        # r^ broadcast over the response, as the code passes GRPO's advantages; the loss takes
        # its masked token mean, which recovers the scalar.
        r_hat = group_advantages(batch["scores"], batch["group_ids"], "std", self.opts.adv_eps)
        batch["advantages"] = r_hat.unsqueeze(-1) * batch["response_mask"]
        return {"actor/reward_hat_abs_mean": float(r_hat.abs().mean())}

    def actor_loss(self, mb: Batch, fwd: PolicyForward, heads: nn.ModuleDict) -> tuple[torch.Tensor, dict[str, float]]:
        mask = mb["response_mask"]
        pooled = mb.prompt_len - 1  # the prompt columns but the last, as the reference code pools
        log_z = heads["log_z"](fwd.hidden[:, :pooled], mb["attention_mask"][:, :pooled])
        r_hat = masked_mean(mb["advantages"], mask, dim=-1)
        o = self.opts
        return flowrl_loss(log_z, fwd.logp, mb["old_logp"], mb["ref_logp"], r_hat, mask, o.beta, o.w_mode,
                           o.clip_eps, o.w_max)
