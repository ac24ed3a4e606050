"""DVPO: distributional value modelling with risk-aware policy optimisation (spec §2).

The whole method in one place:

- critic: a quantile ensemble, H heads x N quantiles at midpoint fractions tau_i = (2i-1)/(2N),
  monotone by construction (`QuantileHead`, registered as critic kind "quantile");
- distributional GAE per (head, quantile) on the old critic's quantiles (spec §2.3), giving the
  target quantiles T^{(h,i)} = theta_old^{(h,i)} + A^{(h,i)};
- critic loss (`dvpo_critic_loss`), five terms, each with its own weight, off switch (weight 0)
  and metric `critic/<term>`:
    qr           quantile-Huber regression, kappa = 1 (QR-DQN form, averaged over the H x N grid by default),
    cvar/gain    tail calibration: contract the lower tail (V - CVaR-_alpha), keep the upper tail
                 (CVaR+_alpha - V, capped) open; both at the "risk interval weight" 0.1,
    mean_shift   (mean_i theta_i - R)^2 toward the scalar GAE return,
    curvature    second differences of the sorted quantiles inside both alpha-tails,
    consistency  sum_h ||theta^h - sg(mean_h theta^h)||^2 across the heads (also averaged over H x N);
- advantage: GAE on the critic's mean (= the mean over (h, i) of A^{(h,i)}, spec §2.3), made risk-adjusted
  by `risk_adv_weight` w (below), whitened; actor: PPO-clip (`algorithms.common`).

The risk that reaches the policy [I, design default; spec §2.3 and §1.6 leave it open]. Every tail term
of the critic loss (CVaR, gain, curvature, head consistency) is unchanged when all quantiles of a token
shift together, so its gradient moves no token's mean, and an advantage on the mean cannot see it
(tests/test_risk.py). The risk-adjusted advantage reads the lower tail itself, through the lower-tail
spread g = mean - CVaR-_alpha of each head, averaged over heads (`risk_adv_mode`):

- `tail_td` (default): TD errors below the predicted lower tail, delta_t < -g_t, are shrunk by 1 - w
  (`algorithms.common.tail_dampened_gae`): the paper's stated aim, "contract the lower tail to
  dampen noisy negative deviations" [S, abstract], applied where the policy sees it; positive TD
  errors are never changed;
- `value`: GAE on the distorted value V_w = mean - w g (a mix of the mean and CVaR-) in place of the mean.

w = 0 is plain GAE on the mean, bit for bit; the critic's targets and returns stay those of the mean.
The default w and why: README, "The risk that reaches the policy". The run logs
`actor/adv_corr_plain_gae` (the advantage's correlation with plain GAE on the mean) and
`critic/grad_share/<term>` (each weighted term's share of the gradient at the quantile outputs) every step.

Shapes: B sequences, T response tokens, H heads, N quantiles.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.base import Batch, register, register_variant
from algorithms.clip import RewardKLOptions
from algorithms.common import (KL_KINDS, RISK_ADV_MODES, agg_loss, explained_variance, gae, grad_shares, masked_corr,
                               masked_mean, masked_whiten, risk_adjusted_gae)
from algorithms.critics import CRITICS
from algorithms.distributional import (crps, cvar_lower, cvar_upper, interval_coverage, lower_tail_gap, reward_std_cap,
                                       tail_curvature)
from algorithms.ppo import PPO
from algorithms.search import Uniform
from harness.errors import HarnessError

# ---- the critic head ----


def midpoint_taus(n: int, device=None) -> torch.Tensor:
    """Quantile fractions tau_i = (2i - 1) / (2N), i = 1..N: `[N]`."""
    return (2 * torch.arange(1, n + 1, device=device, dtype=torch.float32) - 1) / (2 * n)


@CRITICS.register("quantile")
class QuantileHead(nn.Module):
    """H heads x N monotone quantiles per token: `hidden [..., d]` -> `[..., H, N]`.

    One linear layer gives, per head, a base value b and N-1 raw increments r_j; the quantiles are
    theta_1 = b, theta_{i+1} = theta_i + softplus(r_i), so they never cross. Initialisation: small
    random weights (std `init_std / sqrt(d)`, different per head so the ensemble is diverse), and
    biases such that every head starts as N evenly spaced values on [-init_spread/2, init_spread/2].
    """

    def __init__(self, hidden_size: int, n_heads: int = 4, n_quantiles: int = 200, init_spread: float = 0.1,
                 init_std: float = 0.1):
        super().__init__()
        if n_quantiles < 2:
            raise HarnessError(f"n_quantiles must be >= 2, got {n_quantiles}")
        self.n_heads, self.n_quantiles = n_heads, n_quantiles
        self.linear = nn.Linear(hidden_size, n_heads * n_quantiles)
        nn.init.normal_(self.linear.weight, std=init_std / math.sqrt(hidden_size))
        step = init_spread / (n_quantiles - 1)
        bias = torch.full((n_heads, n_quantiles), math.log(math.expm1(step)))  # softplus(bias) = step
        bias[:, 0] = -init_spread / 2
        with torch.no_grad():
            self.linear.bias.copy_(bias.flatten())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        raw = self.linear(hidden.float()).unflatten(-1, (self.n_heads, self.n_quantiles))
        increments = F.softplus(raw[..., 1:])
        return torch.cat([raw[..., :1], raw[..., :1] + increments.cumsum(-1)], dim=-1)


# ---- pure math ----


def quantile_huber_pairwise(pred: torch.Tensor, target: torch.Tensor, taus: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """Quantile-Huber loss by its definition (QR-DQN), O(N*K) memory; the reference for tests.

    pred `[..., N]` (quantiles at fractions `taus [N]`), target `[..., K]` (samples, no grad) -> `[...]`:

        sum_i mean_k rho_{tau_i}(T_k - theta_i),   rho_tau(u) = |tau - 1{u < 0}| * Huber_kappa(u) / kappa,
        Huber_kappa(u) = u^2 / 2 if |u| <= kappa else kappa * (|u| - kappa / 2).
    """
    u = target.unsqueeze(-2) - pred.unsqueeze(-1)  # [..., N, K]
    huber = torch.where(u.abs() <= kappa, 0.5 * u * u, kappa * (u.abs() - 0.5 * kappa))
    weight = (taus.unsqueeze(-1) - (u < 0).float()).abs()
    return (weight * huber / kappa).mean(-1).sum(-1)


def quantile_huber(pred: torch.Tensor, target: torch.Tensor, taus: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """The same loss as `quantile_huber_pairwise`, exactly, in O((N + K) log K) time and memory.

    pred `[..., N]`, target `[..., K]` (treated as constants), taus `[N]` -> `[...]`.

    For a prediction theta the targets split into four runs of the sorted targets y: u = y - theta
    below -kappa, in [-kappa, 0), in [0, kappa], above kappa. On each run the loss is a polynomial
    of theta in the run's count, sum y and sum y^2, read from prefix sums at the run boundaries
    (found with searchsorted). The result and its gradient in `pred` equal the pairwise form.
    """
    target = target.detach()
    centre = target.mean(-1, keepdim=True)  # centring keeps the prefix sums of y^2 well conditioned
    y = (target - centre).sort(-1).values.contiguous()
    theta = (pred - centre).contiguous()
    zero = torch.zeros_like(y[..., :1])
    s1 = torch.cat([zero, y.cumsum(-1)], -1)  # [..., K+1]
    s2 = torch.cat([zero, (y * y).cumsum(-1)], -1)
    k = y.shape[-1]

    a = torch.searchsorted(y, theta - kappa, side="left")  # count of y < theta - kappa
    b = torch.searchsorted(y, theta, side="left")  # count of y < theta
    c = torch.searchsorted(y, theta + kappa, side="right")  # count of y <= theta + kappa

    ia, ib, ic = a.to(theta.dtype), b.to(theta.dtype), c.to(theta.dtype)
    # prefix sums at the run boundaries; s[..., -1:] are the totals
    y_a, y_b, y_c = (s1.gather(-1, i) for i in (a, b, c))
    q_a, q_b, q_c = (s2.gather(-1, i) for i in (a, b, c))
    n1, y1 = ia, y_a
    n2, y2, q2 = ib - ia, y_b - y_a, q_b - q_a
    n3, y3, q3 = ic - ib, y_c - y_b, q_c - q_b
    n4, y4 = k - ic, s1[..., -1:] - y_c
    far_low = theta * n1 - y1 - 0.5 * kappa * n1  # sum of (|u| - kappa/2), u < -kappa
    near_low = (q2 - 2 * theta * y2 + n2 * theta * theta) / (2 * kappa)  # sum of u^2 / (2 kappa)
    near_high = (q3 - 2 * theta * y3 + n3 * theta * theta) / (2 * kappa)
    far_high = y4 - theta * n4 - 0.5 * kappa * n4
    loss = (1 - taus) * (far_low + near_low) + taus * (near_high + far_high)
    return (loss / k).sum(-1)


@torch.no_grad()
def distributional_gae(token_rewards: torch.Tensor, quantiles: torch.Tensor, mask: torch.Tensor, gamma: float,
                       lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE run independently on every quantile of every head (spec §2.3), without grad.

    token_rewards `[B, T]`, quantiles `[B, T, H, N]` (the old critic's), mask `[B, T]` ->
    (advantages `[B, T, H, N]`, target quantiles `[B, T, H, N]`), with

        delta_t^{(h,i)} = r_t + gamma theta_i^{(h)}(s_{t+1}) - theta_i^{(h)}(s_t),   (0 after the last token)
        A_t^{(h,i)}     = sum_l (gamma lam)^l delta_{t+l}^{(h,i)},   T_t^{(h,i)} = theta_i^{(h)}(s_t) + A_t^{(h,i)}.

    Zero outside the mask.
    """
    b, t, h, n = quantiles.shape
    values = quantiles.permute(0, 2, 3, 1).reshape(b * h * n, t)
    rewards = token_rewards.repeat_interleave(h * n, dim=0)
    flat_mask = mask.repeat_interleave(h * n, dim=0)
    adv, targets = gae(rewards, values, flat_mask, gamma, lam)
    unflat = lambda x: x.reshape(b, h, n, t).permute(0, 3, 1, 2)  # noqa: E731
    return unflat(adv), unflat(targets)


def lower_tail_risk(quantiles: torch.Tensor, alpha: float, delta_low: float = 0.0) -> torch.Tensor:
    """CVaR objective (spec §1.5 item 4): ReLU((mean - CVaR-_alpha) - delta_low), mean over heads.
    `[..., H, N]` -> `[...]`."""
    gap = quantiles.mean(-1) - cvar_lower(quantiles, alpha)
    return F.relu(gap - delta_low).mean(-1)


def upper_tail_gain(quantiles: torch.Tensor, alpha: float, cap: torch.Tensor | float) -> torch.Tensor:
    """Gain objective (spec §1.5 item 5): -min(CVaR+_alpha - mean, cap), mean over heads.
    `[..., H, N]`, cap a float or `[...]` -> `[...]`."""
    gap = cvar_upper(quantiles, alpha) - quantiles.mean(-1)
    cap = torch.as_tensor(cap, dtype=gap.dtype, device=gap.device)
    cap = cap.unsqueeze(-1) if cap.dim() else cap
    return -torch.minimum(gap, cap).mean(-1)


def mean_shift(quantiles: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """(mean_i theta_i^{(h)} - anchor)^2, mean over heads: `[..., H, N]`, anchor `[...]` -> `[...]`."""
    return (quantiles.mean(-1) - anchor.unsqueeze(-1)).pow(2).mean(-1)


def head_consistency(quantiles: torch.Tensor) -> torch.Tensor:
    """sum_h ||theta^{(h)} - sg(mean_h theta^{(h)})||^2 (spec §2.3): `[..., H, N]` -> `[...]`."""
    centre = quantiles.mean(-2, keepdim=True).detach()
    return (quantiles - centre).pow(2).sum((-1, -2))


def dvpo_critic_loss(quantiles: torch.Tensor, old_quantiles: torch.Tensor, target_quantiles: torch.Tensor,
                     returns: torch.Tensor, gain_cap: torch.Tensor, mask: torch.Tensor, opts: "DVPOOptions"
                     ) -> tuple[torch.Tensor, dict[str, float]]:
    """The whole DVPO critic loss (spec §2.3). quantiles, old_quantiles, target_quantiles `[B, T, H, N]`;
    returns (scalar GAE return R) `[B, T]`; gain_cap `[B]`; mask `[B, T]`.

        L = w_qr L_qr + w_cvar L_cvar + w_gain L_gain + w_ms L_mean_shift + w_curv L_curv + w_cons L_cons

    each term a per-token value reduced with `agg_loss(.., opts.agg_mode)`:
    L_qr = sum_h sum_i mean_k rho_{tau_i}(T^{(h,k)} - theta_i^{(h)}) and `head_consistency`, the two
    terms that sum over the H x N quantile grid, divided by H N under `quantile_reduction="mean"` (the
    default; "sum" keeps the spec's sums); tail terms as in `lower_tail_risk`, `upper_tail_gain`
    (means over heads of tail statistics, already on the scale of one quantile); `tail_curvature` per
    head, mean over heads. A term with weight 0 is neither computed nor logged. With `opts.grad_shares`
    (and `quantiles` with grad), `critic/grad_share/<term>` is each weighted term's share of the gradient
    norm at the head's output `quantiles` (`algorithms.common.grad_shares`).
    """
    taus = midpoint_taus(quantiles.shape[-1], quantiles.device)
    h, n = quantiles.shape[-2:]
    grid = h * n if opts.quantile_reduction == "mean" else 1
    per_token: dict[str, tuple[float, callable]] = {
        "qr": (opts.qr_weight, lambda: quantile_huber(quantiles, target_quantiles, taus, opts.kappa).sum(-1) / grid),
        "cvar": (opts.cvar_weight, lambda: lower_tail_risk(quantiles, opts.alpha, opts.delta_low)),
        "gain": (opts.gain_weight, lambda: upper_tail_gain(quantiles, opts.alpha, gain_cap.unsqueeze(-1))),
        "mean_shift": (opts.mean_shift_weight, lambda: mean_shift(
            quantiles, returns if opts.mean_shift_target == "return" else old_quantiles.mean((-1, -2)))),
        "curvature": (opts.curvature_weight, lambda: tail_curvature(quantiles, opts.alpha).mean(-1)),
        "consistency": (opts.consistency_weight, lambda: head_consistency(quantiles) / grid),
    }
    total = quantiles.new_zeros(())
    metrics: dict[str, float] = {}
    weighted: dict[str, torch.Tensor] = {}
    for name, (weight, term) in per_token.items():
        if weight == 0:
            continue
        value = agg_loss(term(), mask, opts.agg_mode)
        weighted[name] = weight * value
        total = total + weighted[name]
        metrics[f"critic/{name}"] = value.item()
    metrics["critic/loss"] = total.item()
    if opts.grad_shares and quantiles.requires_grad:
        metrics.update({f"critic/grad_share/{k}": v for k, v in grad_shares(weighted, [quantiles]).items()})
    return total, metrics


# ---- the algorithm ----

QUANTILE_REDUCTIONS = ("mean", "sum")
RISK_ADV_WEIGHT = 1.0  # the defaults of the risk-adjusted advantage (module docstring; why: README)
RISK_ADV_MODE = "tail_td"
MEAN_SHIFT_TARGETS = ("return", "old")


@dataclass
class DVPOOptions(RewardKLOptions):
    # PPO part: the shared clip/KL options (algorithms.clip) at the PPO baseline's defaults, KL in the
    # reward (spec §9 #10), and PPO's names, so algo.kl_coef etc. apply across algorithms
    gamma: float = field(default=1.0, metadata={"doc": "discount factor of GAE"})
    lam: float = field(default=0.95, metadata={"doc": "GAE lambda"})
    whiten_advantages: bool = field(default=True, metadata={"doc": "whiten advantages over the batch"})
    # critic (spec §2.2, §9 #11)
    n_heads: int = field(default=4, metadata={"doc": "quantile heads of the distributional critic"})
    n_quantiles: int = field(default=200, metadata={"doc": "quantiles per head"})  # "interval density" 200
    init_spread: float = field(default=0.1, metadata={"doc": "initial span of each head's quantiles, centred on 0"})  # [I] initial span of each head's quantiles, centred on 0
    # critic loss (spec §2.3); a weight of 0 switches its term off
    kappa: float = field(default=1.0, metadata={"doc": "Huber threshold of the quantile-regression loss"})
    qr_weight: float = field(default=1.0, metadata={"doc": "weight of the quantile-regression loss (0: off)"})
    # "mean": the QR and consistency terms, sums over the H x N quantile grid in the spec, are divided
    # by H N, which puts them on the scale of the per-token tail, mean-shift and curvature terms, so the
    # weights below weigh like against like at any H and N; "sum": the spec's sums (QR-DQN's form), at
    # which the tail terms get ~1/1000 of QR's gradient at H=4, N=200 (README, DVPO)  [I]
    quantile_reduction: str = field(default="mean", metadata={"doc": "QR and consistency terms over the H x N grid: mean (default) or sum (the spec's sums)"})
    alpha: float = field(default=0.1, metadata={"doc": "CVaR level"})  # CVaR level (spec §9 #7)
    cvar_weight: float = field(default=0.1, metadata={"doc": "weight of the lower-tail (CVaR) risk term"})  # "risk interval weight" (spec §2.3)
    delta_low: float = field(default=0.0, metadata={"doc": "lower-tail threshold of the risk term"})
    gain_weight: float = field(default=0.1, metadata={"doc": "weight of the upper-tail gain cap term"})  # "risk interval weight" (spec §2.3)
    gain_cap: Optional[float] = field(default=None, metadata={"doc": "upper-tail cap delta_high (none: one std of the step's training rewards)"})  # delta_high; None: 1 std of the step's training rewards, as DFPO (spec §9 #7)
    mean_shift_weight: float = field(default=0.5, metadata={"doc": "weight of the mean-shift term"})  # [I] echoes DFPO's anchor weight (spec §1.8)
    mean_shift_target: str = field(default="return", metadata={"doc": "mean-shift target: return (GAE return) or old (previous mean)"})  # "return": scalar GAE return; "old": previous iteration's mean  [I]
    curvature_weight: float = field(default=0.05, metadata={"doc": "weight of the curvature (tail shape) term"})  # [I] echoes DFPO's shape weight (spec §1.8)
    consistency_weight: float = field(default=0.1, metadata={"doc": "weight of the heads' consistency term"})  # [I]
    # the risk that reaches the policy (module docstring, README "The risk that reaches the policy")  [I]
    risk_adv_weight: float = field(default=RISK_ADV_WEIGHT, metadata={"doc": "weight w in [0, 1] of the risk-adjusted advantage (0: plain GAE on the critic's mean); its form is risk_adv_mode"})
    risk_adv_mode: str = field(default=RISK_ADV_MODE, metadata={"doc": "risk-adjusted advantage: tail_td (TD errors below the critic's lower tail, mean - CVaR-_alpha, shrunk by 1 - w) or value (GAE on mean - w (mean - CVaR-_alpha))"})
    grad_shares: bool = field(default=True, metadata={"doc": "log each critic loss term's share of the gradient at the head's output (critic/grad_share/<term>)"})

    def validate(self) -> None:
        super().validate()
        for kind in (self.kl_reward_kind, self.kl_loss_kind):
            if kind not in KL_KINDS:
                raise HarnessError(f"unknown KL kind {kind!r} (valid: {', '.join(KL_KINDS)})")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise HarnessError(f"gamma and lam must lie in [0, 1], got {self.gamma}, {self.lam}")
        if self.n_heads < 1 or self.n_quantiles < 2:
            raise HarnessError(f"need n_heads >= 1 and n_quantiles >= 2, got {self.n_heads}, {self.n_quantiles}")
        if self.kappa <= 0 or self.init_spread <= 0:
            raise HarnessError(f"kappa and init_spread must be > 0, got {self.kappa}, {self.init_spread}")
        if not 0 < self.alpha <= 0.5:
            raise HarnessError(f"alpha must lie in (0, 0.5], got {self.alpha}")
        if not 0 <= self.risk_adv_weight <= 1:
            raise HarnessError(f"risk_adv_weight must lie in [0, 1] (0: plain GAE on the mean), got {self.risk_adv_weight}")
        if self.risk_adv_mode not in RISK_ADV_MODES:
            raise HarnessError(f"risk_adv_mode must be one of {', '.join(RISK_ADV_MODES)}, got {self.risk_adv_mode!r}")
        if self.gain_cap is not None and self.gain_cap < 0:
            raise HarnessError(f"gain_cap must be >= 0 or none, got {self.gain_cap}")
        weights = {k: getattr(self, k) for k in ("qr_weight", "cvar_weight", "gain_weight", "mean_shift_weight",
                                                 "curvature_weight", "consistency_weight")}
        if any(w < 0 for w in weights.values()):
            raise HarnessError(f"DVPO loss weights must be >= 0 (0 switches a term off), got {weights}")
        if self.quantile_reduction not in QUANTILE_REDUCTIONS:
            raise HarnessError(f"quantile_reduction must be one of {', '.join(QUANTILE_REDUCTIONS)}, "
                               f"got {self.quantile_reduction!r}")
        if self.mean_shift_target not in MEAN_SHIFT_TARGETS:
            raise HarnessError(f"mean_shift_target must be one of {', '.join(MEAN_SHIFT_TARGETS)}, "
                               f"got {self.mean_shift_target!r}")


DIAG_CRPS_POINTS = 64  # CRPS is O(M^2): it is computed on this many evenly spaced order statistics


@register
class DVPO(PPO):
    """PPO whose critic is a quantile ensemble; token rewards, KL handling and the actor are PPO's."""

    name = "dvpo"
    description = "quantile-ensemble critic, distributional GAE, QR + CVaR/gain tail, mean-shift, curvature, head consistency; PPO-clip"
    paper = "Zhu et al. 2025 (DVPO, arXiv 2512.03847)"
    Options = DVPOOptions
    # harness tune: the weight of the risk-adjusted advantage, the knob through which the critic's
    # distribution reaches the policy (0: plain GAE on its mean)  [I]
    SEARCH_SPACE = {"algo.risk_adv_weight": Uniform(0.0, 1.0)}
    critic = "quantile"

    def critic_options(self) -> dict:
        o = self.opts
        return {"n_heads": o.n_heads, "n_quantiles": o.n_quantiles, "init_spread": o.init_spread}

    def advantages(self, batch: Batch) -> dict[str, float]:
        mask = batch["response_mask"]
        old = batch["old_values"]  # [B, T, H, N]
        rewards = self.token_rewards(batch)
        _, targets = distributional_gae(rewards, old, mask, self.opts.gamma, self.opts.lam)
        plain, returns = gae(rewards, old.mean((-1, -2)), mask, self.opts.gamma, self.opts.lam)  # GAE on the mean
        adv = plain
        if self.opts.risk_adv_weight > 0:  # the critic still learns the mean; only the actor sees the risk
            gap = lower_tail_gap(old, self.opts.alpha).mean(-1)  # [B, T], per head then mean over heads
            adv = risk_adjusted_gae(rewards, old.mean((-1, -2)), gap, mask, self.opts.gamma, self.opts.lam,
                                    self.opts.risk_adv_weight, self.opts.risk_adv_mode)
        if self.opts.whiten_advantages:
            adv = masked_whiten(adv, mask)
        batch["advantages"], batch["returns"], batch["target_quantiles"] = adv, returns, targets
        cap = self.opts.gain_cap if self.opts.gain_cap is not None else reward_std_cap(batch["scores"])
        batch["gain_cap"] = torch.full_like(batch["scores"], cap, dtype=torch.float32)
        realised, _ = gae(rewards, torch.zeros_like(rewards), mask, self.opts.gamma, 1.0)
        return {"critic/returns_mean": float(masked_mean(returns, mask)), "critic/gain_cap": cap,
                "actor/adv_corr_plain_gae": masked_corr(adv, plain, mask),
                **distribution_diagnostics(old, returns, realised, mask, self.opts.alpha)}

    def critic_loss(self, mb: Batch, critic, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return dvpo_critic_loss(critic.on_batch(mb), mb["old_values"], mb["target_quantiles"], mb["returns"],
                                mb["gain_cap"], mb["response_mask"], self.opts)


@torch.no_grad()
def distribution_diagnostics(quantiles: torch.Tensor, returns: torch.Tensor, realised: torch.Tensor,
                             mask: torch.Tensor, alpha: float) -> dict[str, float]:
    """Token-averaged statistics of the predicted return distribution, taken as the ensemble's average
    quantile function mean_h theta^{(h)} (sorted, N values; cheaper than the H*N mixture).

    quantiles `[B, T, H, N]`; returns (scalar GAE return) and realised (sum of future token rewards)
    `[B, T]`. Keys: `critic/dist_mean`, `critic/dist_std`, `critic/cvar_lower_gap` (mean - CVaR-),
    `critic/cvar_upper_gap` (CVaR+ - mean), `critic/explained_var` (of the mean against `returns`),
    `critic/crps` and `critic/coverage_10_90` (against `realised`), `critic/head_disagreement` (std of
    the head means).
    """
    valid = mask.bool()
    samples = quantiles[valid].mean(-2)  # [n_tokens, N], monotone
    if samples.shape[0] == 0:
        return {}
    target = realised[valid]
    mean = samples.mean(-1)
    m = samples.shape[-1]
    thin = samples[:, ((torch.arange(min(m, DIAG_CRPS_POINTS)) + 0.5) * m / min(m, DIAG_CRPS_POINTS)).long()]
    return {
        "critic/dist_mean": float(mean.mean()),
        "critic/dist_std": float(samples.std(-1, unbiased=False).mean()),
        "critic/cvar_lower_gap": float((mean - cvar_lower(samples, alpha)).mean()),
        "critic/cvar_upper_gap": float((cvar_upper(samples, alpha) - mean).mean()),
        "critic/explained_var": float(explained_variance(quantiles.mean((-1, -2)), returns, mask)),
        "critic/crps": float(crps(thin, target).mean()),
        "critic/coverage_10_90": float(interval_coverage(samples, target).mean()),
        "critic/head_disagreement": float(quantiles[valid].mean(-1).std(-1, unbiased=False).mean()),
    }


# ---- ablations (the `ablations` preset): DVPO with its tail terms off, and with the risk-adjusted advantage off ----

DVPOTailsOff = register_variant(
    DVPO, "dvpo_tails_off", "DVPO ablation: the shift-invariant critic terms (CVaR, gain, curvature, head consistency) off",
    cvar_weight=0.0, gain_weight=0.0, curvature_weight=0.0, consistency_weight=0.0,
)
DVPORiskOff = register_variant(
    DVPO, "dvpo_risk_off", "DVPO ablation: the risk-adjusted advantage off (plain GAE on the critic's mean)",
    risk_adv_weight=0.0,
)
