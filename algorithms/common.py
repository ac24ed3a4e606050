"""Shared tensor math for the RL algorithms (spec §0.2, §4, §5).

Pure functions over tensors, no state and no config objects. Token-level tensors are
``[B, T]`` (B sequences, T response positions), right-padded, with a 0/1 ``mask``
(float or bool) that is 1 on the generated tokens up to and including EOS.

Positions outside the mask may hold anything, including ``nan`` or ``inf``: every function
here selects with ``torch.where`` instead of multiplying by the mask, so padding never
leaks into a result or a gradient.
"""
from __future__ import annotations

import torch

from harness.errors import HarnessError

KL_KINDS = ("k1", "k2", "k3", "low_var_kl")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


# ---- masked reductions ----


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the entries where ``mask`` is 1.

    x, mask: same shape (e.g. ``[B, T]``). dim=None sums everything (0-dim result);
    otherwise ``dim`` is reduced.
    """
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1.

    x, mask: same shape. dim=None averages everything (0-dim result); otherwise ``dim`` is
    reduced. A slice with no valid entry gives 0 (not nan), so an empty batch yields a zero
    loss rather than poisoning the gradients.
    """
    count = masked_sum(torch.ones_like(x), mask, dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all entries where ``mask`` is 1 (0-dim result).

    unbiased=True applies Bessel's correction n/(n-1), like ``torch.var``. As with
    ``torch.var``, the result is nan when there are too few valid entries (n < 2 unbiased,
    n < 1 biased).
    """
    n = masked_sum(torch.ones_like(x), mask)
    mean = masked_mean(x, mask)
    sum_sq = masked_sum((x - mean) ** 2, mask)
    return sum_sq / (n - 1 if unbiased else n)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten ``x`` with the mean and unbiased variance of its masked entries.

    x, mask: ``[B, T]`` -> ``[B, T]``: ``(x - mean) / sqrt(var + eps)`` on the mask; with
    shift_mean=False the mean is added back (only the scale changes). Positions outside the
    mask are returned as 0. Needs at least 2 valid entries (otherwise nan, see masked_var).
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# ---- advantages ----


@torch.no_grad()
def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (spec §5.3), computed without grad.

    token_rewards, values, mask: ``[B, T]``, right-padded.
    Returns (advantages, returns), both ``[B, T]``, with

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = sum_l (gamma * lam)^l delta_{t+l}
        R_t     = A_t + V_t

    The value after a sequence's last valid token is 0 (terminal), whatever the padded
    positions of ``values`` hold. Both outputs are 0 outside the mask; no whitening here.

    The recursion runs backwards over T and carries (next value, next advantage) across
    masked positions, so a 0 in the middle of a mask is skipped over rather than treated as
    an episode end. With plain right padding this is the same as stopping at the last token.
    """
    valid = mask.bool()
    rewards = torch.where(valid, token_rewards, torch.zeros_like(token_rewards))
    values = torch.where(valid, values, torch.zeros_like(values))

    batch, length = values.shape
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(batch)  # V_{t+1}; 0 past the end (terminal)
    next_adv = values.new_zeros(batch)  # A_{t+1}
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid[:, t], adv, torch.zeros_like(adv))
        next_value = torch.where(valid[:, t], values[:, t], next_value)
        next_adv = torch.where(valid[:, t], adv, next_adv)

    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


# ---- KL and loss aggregation ----


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs (spec §4.1).

    logp, ref_logp: same shape (e.g. ``[B, T]``) -> same shape, elementwise:

    - ``k1``: logp - ref_logp
    - ``k2``: 0.5 * (logp - ref_logp)^2
    - ``k3`` (alias ``low_var_kl``, GRPO's estimator): with d = ref_logp - logp clamped to
      [-20, 20], exp(d) - d - 1, then clamped to [-10, 10].
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind in ("k3", "low_var_kl"):
        d = (ref_logp - logp).clamp(-20.0, 20.0)
        return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)
    raise HarnessError(f"unknown KL kind {kind!r} (valid: {', '.join(KL_KINDS)})")


def agg_loss(
    loss: torch.Tensor, mask: torch.Tensor, mode: str, norm_const: float | None = None
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar (spec §0.2, §4.4).

    With m the mask and L the loss:

    - ``token-mean``: sum_{i,t} m L / sum_{i,t} m (DAPO; every token weighs the same).
    - ``seq-mean-token-mean``: mean over sequences of each sequence's token mean (GRPO).
    - ``seq-mean-token-sum``: mean over sequences of each sequence's token sum.
    - ``seq-mean-token-sum-norm``: sum_{i,t} m L / C with C = ``norm_const`` (default T =
      ``loss.shape[-1]``), exactly the spec's formula (Dr. GRPO as realised in verl). There
      is no division by B, so this scale grows with the number of sequences in the batch.

    In both ``seq-mean-*`` modes a sequence with no valid token is left out of the mean over
    sequences (so padding rows do not change the result). No valid token at all gives 0.
    """
    if mode == "token-mean":
        return masked_mean(loss, mask)
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        seq_loss = masked_sum(loss, mask, dim=-1)  # [B]
        seq_len = masked_sum(torch.ones_like(loss), mask, dim=-1)  # [B]
        if mode == "seq-mean-token-mean":
            seq_loss = seq_loss / seq_len.clamp(min=1)
        return masked_mean(seq_loss, seq_len > 0)
    if mode == "seq-mean-token-sum-norm":
        if norm_const is None:
            norm_const = loss.shape[-1]
        if norm_const <= 0:
            raise HarnessError(f"norm_const must be positive, got {norm_const}")
        return masked_sum(loss, mask) / norm_const
    raise HarnessError(f"unknown loss aggregation mode {mode!r} (valid: {', '.join(AGG_MODES)})")


# ---- diagnostics ----


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over the masked entries (0-dim float tensor).

    values, returns, mask: ``[B, T]``. 1 is a perfect critic, 0 is no better than predicting
    the mean return. When Var[returns] is 0 the ratio is undefined and the result is nan
    (left for the logger to handle); so is any case with fewer than 2 valid entries.
    """
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns > 0, 1.0 - var_residual / var_returns, nan)
