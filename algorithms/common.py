"""What the RL algorithms share (spec §0.2, §4, §5): tensor math, the PPO-clip losses, group baselines.

Pure functions over tensors, no state (the PPO-clip actor built on them, with the options it shares,
is `algorithms.clip`). Algorithm modules import these from here, never from each other. Token-level
tensors are ``[B, T]`` (B sequences, T response positions), right-padded, with a 0/1 ``mask``
(float or bool) that is 1 on the generated tokens up to and including EOS.

Positions outside the mask may hold anything, including ``nan`` or ``inf``: every function
here selects with ``torch.where`` instead of multiplying by the mask, so padding never
leaks into a result or a gradient.
"""
from __future__ import annotations

import torch

from harness.errors import HarnessError

KL_KINDS = ("k1", "k2", "k3", "low_var_kl")
KL_MODES = ("reward", "loss", "none")
GROUP_SCALES = ("std", "none")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
ROLLOUT_CORRECTIONS = ("off", "token-tis", "seq-tis", "token-mask", "seq-mask")


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


@torch.no_grad()
def tail_dampened_gae(token_rewards: torch.Tensor, values: torch.Tensor, lower_gap: torch.Tensor, mask: torch.Tensor,
                      gamma: float, lam: float, weight: float) -> torch.Tensor:
    """GAE whose TD errors below the critic's lower tail are dampened, without grad.

    token_rewards, values (the critic's mean), lower_gap (mean - CVaR-_alpha of the critic's distribution
    at each state, >= 0), mask: ``[B, T]``. With delta_t the TD error of `gae` (lam = 0) and
    g_t = lower_gap_t,

        delta'_t = delta_t - weight * min(0, delta_t + g_t),    A_t = sum_l (gamma lam)^l delta'_{t+l}:

    a TD error inside the predicted lower tail (delta_t >= -g_t) is kept; the part of a negative one
    beyond it (an outcome the critic puts below the mean of its worst alpha) is shrunk by (1 - weight):
    weight 0 is plain GAE, weight 1 clips at -g_t. Positive TD errors are never changed. Returns the
    advantages ``[B, T]`` (0 outside the mask)."""
    delta = gae(token_rewards, values, mask, gamma, 0.0)[0]
    dampened = delta - weight * torch.clamp(delta + lower_gap, max=0.0)
    return gae(dampened, torch.zeros_like(values), mask, gamma, lam)[0]


RISK_ADV_MODES = ("tail_td", "value")


@torch.no_grad()
def risk_adjusted_gae(token_rewards: torch.Tensor, mean: torch.Tensor, lower_gap: torch.Tensor, mask: torch.Tensor,
                      gamma: float, lam: float, weight: float, mode: str) -> torch.Tensor:
    """The risk-adjusted advantage of a distributional critic, without grad: all ``[B, T]``; ``mean`` and
    ``lower_gap`` (mean - CVaR-_alpha >= 0) summarise the critic's distribution at each state.

    - ``value``: GAE on the risk-distorted value V_w = mean - weight * lower_gap (a mix of the mean and
      CVaR-, `algorithms.distributional.lower_tail_distortion`) in place of the mean;
    - ``tail_td``: `tail_dampened_gae`, GAE on the mean whose TD errors below the lower tail are shrunk.

    weight 0 gives GAE on the mean (the caller computes it as `gae` itself, bit for bit)."""
    if mode == "value":
        return gae(token_rewards, mean - weight * lower_gap, mask, gamma, lam)[0]
    if mode == "tail_td":
        return tail_dampened_gae(token_rewards, mean, lower_gap, mask, gamma, lam, weight)
    raise HarnessError(f"unknown risk_adv_mode {mode!r} (valid: {', '.join(RISK_ADV_MODES)})")


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


# ---- sampler/trainer mismatch ----


@torch.no_grad()
def rollout_mismatch(logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the trainer's log-probs are from the sampler's on the sampled tokens.

    logp (trainer), rollout_logp (sampler), mask: ``[B, T]``. With r = exp(logp - rollout_logp) per
    valid token (log-ratio clamped to [-20, 20]), tokens drawn from the sampler q, trainer p:

    - ``rollout/mismatch_kl``: masked mean of rollout_logp - logp (k1 estimate of KL(q || p));
    - ``rollout/mismatch_k3``: masked mean of r - 1 - log r (k3: non-negative, lower variance);
    - ``rollout/ratio_mean``, ``rollout/ratio_max``, ``rollout/ratio_min``: of r over valid tokens.
    """
    valid = mask.bool()
    log_ratio = torch.where(valid, (logp - rollout_logp).clamp(-20.0, 20.0), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    inf = torch.full_like(ratio, float("inf"))
    any_valid = bool(valid.any())
    return {
        "rollout/mismatch_kl": float(masked_mean(-log_ratio, mask)),
        "rollout/mismatch_k3": float(masked_mean(ratio - 1.0 - log_ratio, mask)),
        "rollout/ratio_mean": float(masked_mean(ratio, mask)),
        "rollout/ratio_max": float(torch.where(valid, ratio, -inf).max()) if any_valid else 1.0,
        "rollout/ratio_min": float(torch.where(valid, ratio, inf).min()) if any_valid else 1.0,
    }


@torch.no_grad()
def rollout_correction(logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float = 2.0, low: float = 0.5, high: float = 5.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Importance weights that correct a policy loss for the sampler/trainer mismatch (detached).

    logp: the trainer's behaviour log-probs; rollout_logp: the sampler's; mask: ``[B, T]``. With the
    token ratio r_t = exp(logp_t - rollout_logp_t) (log-ratio clamped to [-20, 20]) and, per sequence,
    R = prod_t r_t and its geometric mean g = exp(mean_t log r_t) over the valid tokens:

    - ``off``: w = 1;
    - ``token-tis`` (truncated IS, per token): w_t = min(r_t, cap);
    - ``seq-tis`` (truncated IS, per sequence): w_t = min(R, cap) on every token of the sequence;
    - ``token-mask`` (masked IS, IcePop): w_t = r_t where low <= r_t <= high, else 0;
    - ``seq-mask`` (sequence-masked TIS): w_t = min(r_t, cap) where low <= g <= high, else 0 for the
      whole sequence.

    The per-token policy loss is multiplied by w (a masked token weighs 0 but stays in the
    aggregation's denominator). Returns (w ``[B, T]``, 0 outside the mask; metrics
    ``rollout/weight_mean``, ``rollout/masked_frac`` (valid tokens whose weight is 0 by a mask),
    ``rollout/truncated_frac`` (valid tokens whose weight was cut to ``cap``)).
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise HarnessError(f"unknown rollout correction {mode!r} (valid: {', '.join(ROLLOUT_CORRECTIONS)})")
    valid = mask.bool()
    log_ratio = torch.where(valid, (logp - rollout_logp).clamp(-20.0, 20.0), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    zeros = torch.zeros_like(ratio)
    truncated = masked = torch.zeros_like(valid)
    if mode == "off":
        weight = torch.ones_like(ratio)
    elif mode == "token-tis":
        weight, truncated = ratio.clamp(max=cap), ratio > cap
    elif mode == "seq-tis":
        seq = torch.exp(masked_sum(log_ratio, mask, dim=-1).clamp(-20.0, 20.0)).unsqueeze(-1).expand_as(ratio)
        weight, truncated = seq.clamp(max=cap), seq > cap
    elif mode == "token-mask":
        masked = (ratio < low) | (ratio > high)
        weight = torch.where(masked, zeros, ratio)
    else:  # seq-mask
        geo = torch.exp(masked_mean(log_ratio, mask, dim=-1)).unsqueeze(-1).expand_as(ratio)
        masked = (geo < low) | (geo > high)
        weight, truncated = torch.where(masked, zeros, ratio.clamp(max=cap)), ~masked & (ratio > cap)
    weight = torch.where(valid, weight, zeros)
    metrics = {"rollout/weight_mean": float(masked_mean(weight, mask)),
               "rollout/masked_frac": float(masked_mean(masked.float(), mask)),
               "rollout/truncated_frac": float(masked_mean(truncated.float(), mask))}
    return weight, metrics


@torch.no_grad()
def masked_corr(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> float:
    """Pearson correlation of ``x`` and ``y`` (same shape, e.g. ``[B, T]``) over the entries where
    ``mask`` is 1; nan when either has no variance there (or fewer than 2 entries)."""
    valid = mask.bool()
    a, b = x[valid].double(), y[valid].double()
    if a.numel() < 2:
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denom = (a.pow(2).sum() * b.pow(2).sum()).sqrt()
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def grad_shares(terms: dict[str, torch.Tensor], wrt: list[torch.Tensor]) -> dict[str, float]:
    """Each loss term's share of the gradient norm at the tensors ``wrt`` (a critic head's outputs).

    terms: name -> weighted scalar term (with grad) of one loss; wrt: tensors the terms depend on.
    With g_k the gradient of term k with respect to all of ``wrt`` (concatenated), the share of term
    k is ||g_k|| / sum_j ||g_j||: the shares sum to 1 (nan when every gradient is 0). One
    ``torch.autograd.grad`` per term that keeps the graph for the loss's own backward; the gradient
    stops at ``wrt``, so nothing is propagated through the network behind it. Keys ``<name>``."""
    norms = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, wrt, retain_graph=True, allow_unused=True)
        norms[name] = sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None) ** 0.5
    total = sum(norms.values())
    return {name: (n / total if total > 0 else float("nan")) for name, n in norms.items()}


# ---- group baselines ----


def group_advantages(
    rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "std", eps: float = 1e-6
) -> torch.Tensor:
    """Group-normalised outcome advantage (spec §4.1, §4.2).

    rewards: ``[N]`` float, one scalar reward per response. group_ids: ``[N]`` integer, the
    prompt (group) of each response; any values, in any order. Returns ``[N]``:

    - ``std`` (GRPO): (r - group_mean) / (group_std + eps), group_std unbiased as in
      ``torch.std``;
    - ``none`` (Dr. GRPO): r - group_mean.

    A group of one response gets advantage 0 under both scales (there is nothing to compare
    it with); RLOO's `leave_one_out_advantages` follows the same rule. Note verl instead uses mean
    0 and std 1 for such a group, i.e. A = r / (1 + eps) (and r for its RLOO).
    """
    if scale not in GROUP_SCALES:
        raise HarnessError(f"unknown advantage scale {scale!r} (valid: {', '.join(GROUP_SCALES)})")

    ids, group = torch.unique(group_ids, return_inverse=True)  # group: [N] in 0..G-1
    count = rewards.new_zeros(ids.numel()).index_add_(0, group, torch.ones_like(rewards))  # [G]
    total = rewards.new_zeros(ids.numel()).index_add_(0, group, rewards)  # [G]
    adv = rewards - (total / count)[group]
    if scale == "std":
        sum_sq = rewards.new_zeros(ids.numel()).index_add_(0, group, adv**2)  # [G]
        std = (sum_sq / (count - 1).clamp(min=1)).sqrt()  # unbiased, as torch.std
        adv = adv / (std[group] + eps)
    singleton = count[group] == 1
    return torch.where(singleton, torch.zeros_like(adv), adv)


# ---- PPO-clip: policy and value losses ----


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
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate loss (spec §5.3), with decoupled clip range (DAPO clip-higher).

    logp, old_logp, advantages, mask: ``[B, T]``. Per token, with
    ratio = exp(clamp(logp - old_logp, -20, 20)):

        pg1  = -A * ratio
        pg2  = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)
        loss = max(pg1, pg2)

    With ``dual_clip`` = c (> 1), tokens with A < 0 are further capped: min(loss, -A * c).
    ``weights`` ``[B, T]`` (detached; the rollout correction's, `rollout_correction`) multiply the
    per-token loss. The per-token loss is reduced with ``agg_loss(..., agg_mode, norm_const)``.

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
    if weights is not None:
        per_token = per_token * weights
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
