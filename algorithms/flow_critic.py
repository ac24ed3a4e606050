"""DFPO's flow critic (spec §1.3-§1.5): the head, its distributional targets and its loss.

- `FlowHead` (registered as critic kind "flow"): a velocity field v(z, tau, h_t) over virtual time
  tau in [0, 1], N(0, 1) base noise, one Euler step at inference, sampled at the fixed
  `noise_levels`;
- coupled-noise distributional GAE targets (`coupled_gae`, §1.4);
- the critic loss `flow_critic_loss` (§1.5) and its terms: uncertainty-weighted distributional CFM,
  bootstrapped anchor, geometric consistency, lower-tail conditional value risk, tail shape.

The algorithm that trains it, its options and the choices behind them: `algorithms.dfpo`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.common import gae, grad_shares
from algorithms.critics import CRITICS
from algorithms.distributional import cvar_lower, cvar_upper, tail_curvature
from harness.errors import HarnessError

WEIGHT_MODES = ("value_flows", "inverse_cov", "none")
ANCHOR_MODES = ("mean", "bcfm")
COUPLINGS = ("sorted", "independent")


# ---- pure math: targets ----


@torch.no_grad()
def coupled_gae(
    token_rewards: torch.Tensor, samples: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (distributional) GAE with coupled noise (spec §1.4), without grad.

    token_rewards, mask: ``[B, T]``; samples: ``[B, T, M]``, sample j of every token of a sequence
    drawn from the same base noise eps^(j). For each j, with z_{T+1} = 0 after the last valid token:

        delta_t^(j) = r_t + gamma * z_{t+1}^(j) - z_t^(j)
        A_t^(j)     = sum_l (gamma * lam)^l delta_{t+l}^(j)
        Z_t^(j)     = z_t^(j) + A_t^(j)

    Returns (A, Z), both ``[B, T, M]`` and 0 outside the mask. mean_j A^(j) is GAE on the mean.
    """
    b, t, m = samples.shape
    flat = samples.permute(0, 2, 1).reshape(b * m, t)  # row b*M + j is sample path j of sequence b
    adv, ret = gae(token_rewards.repeat_interleave(m, 0), flat, mask.repeat_interleave(m, 0), gamma, lam)
    return adv.reshape(b, m, t).permute(0, 2, 1), ret.reshape(b, m, t).permute(0, 2, 1)


@torch.no_grad()
def realised_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted sum of the future token rewards of the sampled response, G_t = sum_l gamma^l r_{t+l}:
    ``[B, T]`` -> ``[B, T]`` (0 outside the mask). It is GAE with V = 0 and lam = 1."""
    return gae(token_rewards, torch.zeros_like(token_rewards), mask, gamma, 1.0)[0]


def uncertainty_weight(old_samples: torch.Tensor, mode: str, kappa: float = 0.3, cov_c: float = 1.0) -> torch.Tensor:
    """Per-token CFM weight from the old critic's samples ``[N, M]`` -> ``[N]`` (detached), spec §1.5.1.

    With sigma = std_j z^(j) and V = mean_j z^(j):

    - ``value_flows``: sigmoid(-kappa / sigma) + 0.5, in [0.5, 1], larger for uncertain tokens;
    - ``inverse_cov``: 1 / (sigma / |V| + cov_c), normalised to mean 1 over the N tokens, smaller
      for targets with a high coefficient of variation (FlowCritic-style);
    - ``none``: 1.
    """
    old_samples = old_samples.detach()
    if mode == "none":
        return torch.ones_like(old_samples[..., 0])
    sigma = old_samples.std(-1)
    if mode == "value_flows":
        return torch.sigmoid(-kappa / sigma.clamp(min=1e-8)) + 0.5
    if mode == "inverse_cov":
        w = 1.0 / (sigma / old_samples.mean(-1).abs().clamp(min=1e-6) + cov_c)
        return w / w.mean().clamp(min=1e-12)
    raise HarnessError(f"unknown weight_mode {mode!r} (valid: {', '.join(WEIGHT_MODES)})")


def couple_noise(noise: torch.Tensor, targets: torch.Tensor, coupling: str) -> torch.Tensor:
    """Pair base-noise draws with target samples, both ``[N, M]`` -> noise ``[N, M]``.

    ``independent`` keeps the draws as they are; ``sorted`` reorders each row's draws so that the
    k-th smallest noise meets the k-th smallest target (the optimal-transport coupling in 1-D)."""
    if coupling == "independent":
        return noise
    if coupling == "sorted":
        ranks = targets.argsort(-1).argsort(-1)
        return noise.sort(-1).values.gather(-1, ranks)
    raise HarnessError(f"unknown cfm_coupling {coupling!r} (valid: {', '.join(COUPLINGS)})")


# ---- pure math: critic loss terms (N valid tokens, M samples each) ----


def cfm_loss(velocity: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Uncertainty-weighted conditional flow matching (spec §1.5.1).

    velocity = v(z_tau, tau, h) at z_tau = (1 - tau) * noise + tau * targets; all ``[N, M]``;
    weight ``[N]``. The straight-line velocity is u* = targets - noise, and

        L = mean_{t, j} w_t * (v - u*)^2
    """
    return (weight.unsqueeze(-1) * (velocity - (targets - noise)).pow(2)).mean()


def anchor_loss(
    value: torch.Tensor, old_value: torch.Tensor, returns: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bootstrapped mean anchor with PPO-style value clipping (spec §1.5.2): ``[N]`` each ->

        V_clip = V_old + clamp(V - V_old, -clip, clip)
        L      = 0.5 * mean max((V - R)^2, (V_clip - R)^2)

    Returns (loss, fraction of tokens where the clipped error is the larger)."""
    v_clip = old_value + (value - old_value).clamp(-clip, clip)
    err, err_clip = (value - returns).pow(2), (v_clip - returns).pow(2)
    return 0.5 * torch.maximum(err, err_clip).mean(), (err_clip > err).float().mean()


def geo_loss(velocity_on_path: torch.Tensor, velocity_at_start: torch.Tensor) -> torch.Tensor:
    """Straight-path consistency (spec §1.5.3): v(eps + tau * sg(v0), tau, h) should equal sg(v0),
    the velocity at tau = 0; both ``[N, M]``. L = mean (v_tau - sg(v0))^2."""
    return (velocity_on_path - velocity_at_start.detach()).pow(2).mean()


def risk_loss(samples: torch.Tensor, alpha: float, delta_low: float) -> torch.Tensor:
    """Conditional value risk, lower tail (spec §1.5.4): ``[N, M]`` ->
    mean_t ReLU((mean_j z - CVaR^-_alpha(z)) - delta_low)."""
    return F.relu(samples.mean(-1) - cvar_lower(samples, alpha) - delta_low).mean()


def shape_loss(samples: torch.Tensor, alpha: float, cap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tail shape (spec §1.5.5): samples ``[N, M]``, cap ``[N]`` (delta_high). Returns (gain, curvature):

        gain = -mean_t min(CVaR^+_alpha - mean_j z, cap)
        curv = mean_t sum_{i in both tails} (z_(i+1) - 2 z_(i) + z_(i-1))^2
    """
    gain = -torch.minimum(cvar_upper(samples, alpha) - samples.mean(-1), cap).mean()
    return gain, tail_curvature(samples, alpha).mean()


# ---- the flow critic head ----


def noise_levels(m: int, device=None) -> torch.Tensor:
    """The M fixed base-noise levels eps_j = Phi^-1((j - 1/2) / M), j = 1..M: `[M]`, increasing,
    symmetric about 0. The mean of a one-step map over them is the midpoint rule for E[Z] (exact for
    a map that is linear in eps), where M random draws give a Monte-Carlo mean."""
    u = (torch.arange(1, m + 1, dtype=torch.float64) - 0.5) / m
    return torch.special.ndtri(u).float().to(device)


def randn(generator: torch.Generator, *shape: int, device=None) -> torch.Tensor:
    """N(0, 1) draws from `generator` (a CPU generator), moved to `device`."""
    return torch.randn(*shape, generator=generator).to(device)


def rand(generator: torch.Generator, *shape: int, device=None) -> torch.Tensor:
    """U[0, 1) draws from `generator` (a CPU generator), moved to `device`."""
    return torch.rand(*shape, generator=generator).to(device)


def sinusoidal_embedding(tau: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal time embedding: ``tau [...]`` in [0, 1] -> ``[..., dim]`` (cos half, sin half),
    frequencies 10000^(-i/(dim/2)) applied to scale * tau."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=tau.device, dtype=torch.float32) / half)
    angles = (scale * tau.float()).unsqueeze(-1) * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


@CRITICS.register("flow")
class FlowHead(nn.Module):
    """Velocity field v(z, tau, h_t) -> R over virtual time tau in [0, 1] (spec §1.3).

    Inputs are embedded to width W and summed (the same as concatenating them and applying one
    linear layer): the scalar return sample z by Linear(1 -> W), tau by a sinusoidal embedding of
    `time_dim` followed by Linear(time_dim -> W), the state h_t by Linear(d -> W). Then `layers`
    blocks LayerNorm -> Linear(W -> W) -> SiLU, and a zero-initialised Linear(W -> 1), so the
    initial field is 0 and the first samples are the base noise.

    `forward(states [B, T, d])` returns M one-step Euler samples per token, `[B, T, M]`:
    z^(j) = eps_j + v(eps_j, 0, h_t) at the fixed levels eps_j of `noise_levels(M)`, the same at
    every token (coupled noise: sample j of a sequence is its j-th quantile path). The head holds
    no random state.
    """

    def __init__(self, hidden_size: int, width: int = 1024, layers: int = 3, time_dim: int = 128, n_samples: int = 16):
        super().__init__()
        self.time_dim, self.n_samples = time_dim, n_samples
        self.state_in = nn.Linear(hidden_size, width)
        self.time_in = nn.Linear(time_dim, width)
        self.value_in = nn.Linear(1, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU()) for _ in range(layers)
        )
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def velocity(self, z: torch.Tensor, tau: torch.Tensor | float, h: torch.Tensor) -> torch.Tensor:
        """v(z, tau, h): z ``[..., M]``, tau a float or ``[..., M]``, h ``[..., d]`` -> ``[..., M]``.
        The M samples of a state go through the MLP as one batch."""
        tau = torch.as_tensor(tau, dtype=torch.float32, device=z.device)
        x = (self.state_in(h.float()).unsqueeze(-2)  # [..., 1, W]
             + self.time_in(sinusoidal_embedding(tau, self.time_dim)).expand(*z.shape, -1)  # [..., M, W]
             + self.value_in(z.float().unsqueeze(-1)))  # [..., M, W]
        for block in self.blocks:
            x = block(x)
        return self.out(x).squeeze(-1)

    def sample(self, noise: torch.Tensor, h: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """Euler integration of dz/dtau = v from tau = 0 to 1 in `steps` steps: noise ``[..., M]``,
        h ``[..., d]`` -> ``[..., M]``."""
        z = noise
        for k in range(steps):
            z = z + self.velocity(z, k / steps, h) / steps
        return z

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """One-step samples `[B, T, M]` at the fixed noise levels, the same at every token."""
        b, t, _ = states.shape
        noise = noise_levels(self.n_samples, states.device).expand(b, t, self.n_samples)
        return self.sample(noise, states, steps=1)


# ---- the critic loss ----


def flow_critic_loss(head: FlowHead, h: torch.Tensor, tokens: dict[str, torch.Tensor], opts,
                     generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """The whole DFPO critic loss (spec §1.5) on N valid tokens, under `opts` (a `DFPOOptions`):

        L_V = L_CFM + lambda_anc L_anchor + lambda_geo L_geo + lambda_risk L_risk + lambda_shape L_shape

    h: ``[N, d]`` critic states (with grad). tokens (no grad): ``old_samples [N, M]`` (the old
    critic's one-step samples), ``targets [N, M]`` (Z-hat), ``returns [N]`` (R-hat), ``td_targets
    [N, M]`` (r_t + gamma z_{t+1}, for the `bcfm` anchor), ``tail_cap [N]`` (delta_high).

    The one-step samples z (anchor, risk, shape, the consistency paths) are taken at the fixed
    `noise_levels`, as the critic's output is, so the anchor clips the new value against the old one
    at the same levels. The flow-matching base noise and times (CFM, BCFM) and the consistency
    term's times are random, drawn from `generator`. Each term has a switch (`use_*`) and a weight;
    a switched-off term is not computed. Returns (loss, metrics: `critic/<term>` unweighted, the
    total, the one-step vs K-step straightness gap; with `opts.grad_shares`, `critic/grad_share/<term>`:
    each weighted term's share of the gradient norm at the head's outputs, the velocities of the batched
    query and of the consistency query, `algorithms.common.grad_shares`).
    """
    old, targets = tokens["old_samples"], tokens["targets"]
    n, m = targets.shape
    device = h.device
    noise = noise_levels(m, device).expand(n, m)

    # All velocity queries that need no earlier query's result go through the MLP in one call:
    # the one-step samples (tau = 0), the CFM path points, and the BCFM path points.
    queries: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = [("one_step", noise, torch.zeros_like(noise), noise)]
    if opts.use_cfm:
        base = couple_noise(randn(generator, n, m, device=device), targets, opts.cfm_coupling)
        tau = rand(generator, n, m, device=device)
        queries.append(("cfm", (1 - tau) * base + tau * targets, tau, base))
    if opts.use_anchor and opts.anchor_mode == "bcfm":
        td = tokens["td_targets"]
        base = couple_noise(randn(generator, n, m, device=device), td, opts.cfm_coupling)
        tau = rand(generator, n, m, device=device)
        queries.append(("bcfm", (1 - tau) * base + tau * td, tau, base))
    v_all = head.velocity(torch.cat([q[1] for q in queries], -1), torch.cat([q[2] for q in queries], -1), h)
    v = dict(zip([q[0] for q in queries], v_all.split(m, dim=-1)))
    bases = {q[0]: q[3] for q in queries}
    v0 = v["one_step"]
    z1 = noise + v0  # one-step samples with grad [N, M]

    terms: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    total = torch.zeros((), device=device)
    if opts.use_cfm:
        weight = uncertainty_weight(old, opts.weight_mode, opts.kappa, opts.cov_c)
        terms["cfm"] = cfm_loss(v["cfm"], targets, bases["cfm"], weight)
        total = total + opts.cfm_weight * terms["cfm"]
        metrics["critic/cfm_weight_mean"] = float(weight.mean())
    if opts.use_anchor:
        if opts.anchor_mode == "mean":
            terms["anchor"], clipfrac = anchor_loss(z1.mean(-1), old.mean(-1), tokens["returns"], opts.value_clip)
            metrics["critic/anchor_clipfrac"] = float(clipfrac)
        else:
            ones = torch.ones(n, device=device)
            terms["anchor"] = cfm_loss(v["bcfm"], tokens["td_targets"], bases["bcfm"], ones)
        total = total + opts.anchor_weight * terms["anchor"]

    # K-step endpoint from the same noise (no grad: the endpoint term uses sg(z_K)); the first
    # Euler step is v0 itself. Without the endpoint term it is only the straightness diagnostic,
    # computed on every 4th token to save time.
    sub = slice(None) if opts.use_geo and opts.geo_endpoint else slice(None, None, 4)
    with torch.no_grad():
        k = opts.consistency_steps
        z_k = (noise + v0.detach() / k)[sub]
        for step in range(1, k):
            z_k = z_k + head.velocity(z_k, step / k, h[sub]) / k
    metrics["critic/straightness_gap"] = float((z1.detach()[sub] - z_k).abs().mean())

    if opts.use_geo:
        tau = rand(generator, n, m, device=device)
        v_path = head.velocity(noise + tau * v0.detach(), tau, h)
        terms["geo"] = geo_loss(v_path, v0)
        if opts.geo_endpoint:
            terms["geo_endpoint"] = (z1 - z_k).pow(2).mean()
            terms["geo"] = terms["geo"] + terms["geo_endpoint"]
        total = total + opts.geo_weight * terms["geo"]
    if opts.use_risk:
        terms["risk"] = risk_loss(z1, opts.alpha, opts.delta_low)
        total = total + opts.risk_weight * terms["risk"]
    if opts.use_shape:
        terms["gain"], terms["curv"] = shape_loss(z1, opts.alpha, tokens["tail_cap"])
        terms["shape"] = terms["gain"] + terms["curv"]
        total = total + opts.shape_weight * terms["shape"]

    metrics.update({f"critic/{name}": float(value.detach()) for name, value in terms.items()})
    metrics["critic/loss"] = float(total.detach())
    if opts.grad_shares and v_all.requires_grad:
        weights = {"cfm": opts.cfm_weight, "anchor": opts.anchor_weight, "geo": opts.geo_weight,
                   "risk": opts.risk_weight, "shape": opts.shape_weight}
        weighted = {k: w * terms[k] for k, w in weights.items() if k in terms}
        outputs = [v_all] + ([v_path] if opts.use_geo else [])
        metrics.update({f"critic/grad_share/{k}": v for k, v in grad_shares(weighted, outputs).items()})
    return total, metrics
