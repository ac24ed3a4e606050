"""Statistics of predicted return distributions, shared by the distributional critics (DVPO, DFPO).

A distribution is represented by samples (or quantile values) along the last dimension:
`samples [..., M]`. Functions sort internally where they need order statistics.
"""
from __future__ import annotations

import math

import torch


def tail_count(m: int, alpha: float) -> int:
    """Number of samples in an alpha-tail of M samples: ceil(alpha * M), at least 1."""
    return max(1, math.ceil(alpha * m - 1e-9))


def cvar_lower(samples: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mean of the lowest ceil(alpha*M) samples: `[..., M]` -> `[...]`."""
    k = tail_count(samples.shape[-1], alpha)
    return samples.sort(dim=-1).values[..., :k].mean(-1)


def cvar_upper(samples: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mean of the highest ceil(alpha*M) samples: `[..., M]` -> `[...]`."""
    k = tail_count(samples.shape[-1], alpha)
    return samples.sort(dim=-1).values[..., -k:].mean(-1)


def lower_tail_distortion(samples: torch.Tensor, weight: float, alpha: float) -> torch.Tensor:
    """The risk-distorted value of a distribution, the mean minus `weight` times its lower-tail spread:
    `[..., M]` -> `[...]`,

        V_w = mean - w (mean - CVaR-_alpha) = (1 - w) mean + w CVaR-_alpha,

    a mix of the mean and the mean of the lowest ceil(alpha M) samples (w = 0: the mean; w = 1: CVaR-).
    It is monotone in every sample and, for 0 <= w <= 1, never above the mean."""
    return samples.mean(-1) - weight * lower_tail_gap(samples, alpha)


def lower_tail_gap(samples: torch.Tensor, alpha: float) -> torch.Tensor:
    """The lower-tail spread mean - CVaR-_alpha (>= 0): `[..., M]` -> `[...]`."""
    return samples.mean(-1) - cvar_lower(samples, alpha)


def tail_curvature(samples: torch.Tensor, alpha: float) -> torch.Tensor:
    """Sum of squared second differences of the sorted samples inside both alpha-tails
    (`z_(i+1) - 2 z_(i) + z_(i-1)` for interior i of each tail): `[..., M]` -> `[...]`."""
    z = samples.sort(dim=-1).values
    k = tail_count(z.shape[-1], alpha)
    second = z[..., 2:] - 2 * z[..., 1:-1] + z[..., :-2]  # centred at sorted index 1..M-2
    idx = torch.arange(1, z.shape[-1] - 1, device=z.device)
    in_tail = (idx < k) | (idx >= z.shape[-1] - k)
    return (second.pow(2) * in_tail).sum(-1)


def crps(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Continuous ranked probability score of the sample distribution at `target` (lower is
    better), energy form `E|X - y| - 1/2 E|X - X'|`: samples `[..., M]`, target `[...]` -> `[...]`."""
    term1 = (samples - target.unsqueeze(-1)).abs().mean(-1)
    term2 = (samples.unsqueeze(-1) - samples.unsqueeze(-2)).abs().mean((-1, -2))
    return term1 - 0.5 * term2


def interval_coverage(samples: torch.Tensor, target: torch.Tensor, low: float = 0.1, high: float = 0.9) -> torch.Tensor:
    """1.0 where `target` lies within the [low, high] quantiles of the samples, else 0.0: `[...]`."""
    q = torch.quantile(samples.float(), torch.tensor([low, high], device=samples.device), dim=-1)
    return ((target >= q[0]) & (target <= q[1])).float()


def reward_std_cap(scores: torch.Tensor) -> float:
    """The default cap of the upper-tail gain term (delta_high, spec §9 #7), shared by DVPO and DFPO:
    one (unbiased) standard deviation of the step's training rewards `scores [B]`; 0 when there are
    fewer than two rewards (no spread is known, so the upper tail earns no gain)."""
    return float(scores.float().std()) if scores.numel() > 1 else 0.0
