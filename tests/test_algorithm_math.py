"""Hand-checked values for the shared RL math (algorithms/common.py, ppo.py, grpo.py).

Every expected number is worked out in the comments next to it. Padded positions hold
garbage (large numbers or nan) on purpose: nothing outside the mask may leak.
"""
import math

import pytest
import torch
from torch.testing import assert_close

from algorithms.common import (
    AGG_MODES,
    agg_loss,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from algorithms.common import group_advantages
from algorithms.common import clip_policy_loss, clipped_value_loss
from harness.errors import HarnessError

NAN = float("nan")


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


# ---- masked reductions and whitening ----

# valid entries 1, 2, 3, 4: mean 2.5; squared deviations 2.25, 0.25, 0.25, 2.25 (sum 5)
X = t([[1.0, 2.0, 3.0, NAN], [4.0, 99.0, -7.0, NAN]])
XMASK = t([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_masked_reductions():
    assert_close(masked_sum(X, XMASK), t(10.0))
    assert_close(masked_sum(X, XMASK, dim=-1), t([6.0, 4.0]))
    assert_close(masked_mean(X, XMASK), t(2.5))
    assert_close(masked_mean(X, XMASK, dim=-1), t([2.0, 4.0]))
    assert_close(masked_var(X, XMASK), t(5.0 / 3.0))  # 5 / (4 - 1)
    assert_close(masked_var(X, XMASK, unbiased=False), t(1.25))  # 5 / 4
    # a bool mask works the same; an empty mask gives a 0 mean, not nan
    assert_close(masked_mean(X, XMASK.bool()), t(2.5))
    assert_close(masked_mean(X, torch.zeros_like(XMASK)), t(0.0))


def test_masked_whiten():
    out = masked_whiten(X, XMASK)
    # (x - 2.5) / sqrt(5/3) = (x - 2.5) / 1.2909944: 1.5 / 1.2909944 = 1.1618950, 0.5 / ... = 0.3872983
    expected = t([[-1.1618950, -0.3872983, 0.3872983, 0.0], [1.1618950, 0.0, 0.0, 0.0]])
    assert_close(out, expected)
    assert_close(masked_mean(out, XMASK), t(0.0))
    assert_close(masked_var(out, XMASK), t(1.0))
    # shift_mean=False only rescales: the mean 2.5 is added back; padding still 0
    out = masked_whiten(X, XMASK, shift_mean=False)
    expected = t([[1.3381050, 2.1127017, 2.8872983, 0.0], [3.6618950, 0.0, 0.0, 0.0]])
    assert_close(out, expected)


# ---- GAE ----


def test_gae_by_hand_with_terminal_and_padding():
    rewards = t([[0.0, 0.0, 1.0], [0.0, 1.0, 99.0]])
    values = t([[0.5, 0.2, 0.8], [0.5, 0.2, NAN]])  # row 1: garbage after its last token
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0, gamma=1, lam=0.5 (gamma*lam = 0.5), V after the last token = 0:
    #   delta2 = 1 + 0   - 0.8 =  0.2        A2 = 0.2
    #   delta1 = 0 + 0.8 - 0.2 =  0.6        A1 = 0.6 + 0.5*0.2  = 0.7
    #   delta0 = 0 + 0.2 - 0.5 = -0.3        A0 = -0.3 + 0.5*0.7 = 0.05
    #   returns = A + V = 0.55, 0.9, 1.0
    # row 1 (length 2): the nan in V[2] must not be used as V after the last token
    #   delta1 = 1 + 0   - 0.2 =  0.8        A1 = 0.8
    #   delta0 = 0 + 0.2 - 0.5 = -0.3        A0 = -0.3 + 0.5*0.8 = 0.1
    #   returns = 0.6, 1.0, and 0 in the padding
    assert_close(adv, t([[0.05, 0.7, 0.2], [0.1, 0.8, 0.0]]))
    assert_close(ret, t([[0.55, 0.9, 1.0], [0.6, 1.0, 0.0]]))


def test_gae_gamma_discounts_values():
    rewards = t([[0.0, 0.0, 1.0]])
    values = t([[0.5, 0.2, 0.8]])
    adv, ret = gae(rewards, values, torch.ones_like(values), gamma=0.5, lam=1.0)
    # gamma=0.5, lam=1 (gamma*lam = 0.5):
    #   delta2 = 1 + 0         - 0.8 =  0.2   A2 = 0.2
    #   delta1 = 0 + 0.5*0.8   - 0.2 =  0.2   A1 = 0.2 + 0.5*0.2   = 0.3
    #   delta0 = 0 + 0.5*0.2   - 0.5 = -0.4   A0 = -0.4 + 0.5*0.3  = -0.25
    assert_close(adv, t([[-0.25, 0.3, 0.2]]))
    assert_close(ret, t([[0.25, 0.5, 1.0]]))


def test_gae_lambda_one_gives_monte_carlo_returns():
    # gamma = lam = 1: returns are the undiscounted reward-to-go, whatever the values are
    rewards = t([[0.5, 0.0, 2.0, 0.0], [1.0, 3.0, 0.0, 0.0]])
    values = t([[9.0, -4.0, 0.3, 5.0], [0.1, 0.2, 7.0, 7.0]])
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(ret, t([[2.5, 2.0, 2.0, 0.0], [4.0, 3.0, 0.0, 0.0]]))


def test_gae_skips_a_hole_in_the_mask():
    # mask [1, 0, 1]: the middle token is skipped (its reward 5 and value 9 are ignored), so this
    # is the 2-token sequence r = [0, 1], V = [0.5, 0.8] with gamma=1, lam=0.5:
    #   delta(last) = 1 - 0.8 = 0.2; delta(first) = 0 + 0.8 - 0.5 = 0.3; A(first) = 0.3 + 0.5*0.2 = 0.4
    adv, _ = gae(t([[0.0, 5.0, 1.0]]), t([[0.5, 9.0, 0.8]]), t([[1, 0, 1]]), gamma=1.0, lam=0.5)
    assert_close(adv, t([[0.4, 0.0, 0.2]]))


def test_gae_matches_brute_force_double_loop():
    gen = torch.Generator().manual_seed(0)
    batch, length, gamma, lam = 6, 9, 0.9, 0.8
    rewards = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    lengths = [0, 1, length, 4, 7, length]
    mask = torch.zeros(batch, length, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        values[i, n:] = 1e6  # garbage after the end

    expected_adv = torch.zeros(batch, length, dtype=torch.float64)
    for i, n in enumerate(lengths):
        v = values[i, :n].tolist() + [0.0]  # terminal value 0 after the last token
        r = rewards[i, :n].tolist()
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(n)]
        for s in range(n):
            expected_adv[i, s] = sum((gamma * lam) ** (k - s) * deltas[k] for k in range(s, n))

    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert_close(adv, expected_adv)
    assert_close(ret, (expected_adv + values) * mask)
    assert not adv.requires_grad


# ---- KL estimators ----


def test_kl_penalty_kinds():
    # token 0: pi = 0.5, ref = 0.25; token 1: pi = 0.25, ref = 0.5; ln 2 = 0.6931472
    logp = torch.log(torch.tensor([0.5, 0.25], dtype=torch.float64))
    ref = torch.log(torch.tensor([0.25, 0.5], dtype=torch.float64))
    assert_close(kl_penalty(logp, ref, "k1"), t([0.6931472, -0.6931472]))
    # 0.5 * (ln 2)^2 = 0.2402265 both ways
    assert_close(kl_penalty(logp, ref, "k2"), t([0.2402265, 0.2402265]))
    # k3 with d = ref - logp: d = -ln2 -> 0.5 + ln2 - 1 = 0.1931472; d = ln2 -> 2 - ln2 - 1 = 0.3068528
    assert_close(kl_penalty(logp, ref, "k3"), t([0.1931472, 0.3068528]))
    assert_close(kl_penalty(logp, ref, "low_var_kl"), t([0.1931472, 0.3068528]))


def test_k3_clamps():
    # d = 1: e - 2 = 0.7182818 (inside the clamp); d = 3: e^3 - 4 = 16.09 -> 10;
    # d = -30 -> clamped to -20: e^-20 + 19 -> 10; d = 1000 -> clamped to 20 -> 10 (no inf/nan)
    ref = t([1.0, 3.0, -30.0, 1000.0])
    out = kl_penalty(torch.zeros_like(ref), ref, "k3")
    assert_close(out, t([0.7182818, 10.0, 10.0, 10.0]))


def test_kl_penalty_unknown_kind():
    with pytest.raises(HarnessError, match="k1, k2, k3, low_var_kl"):
        kl_penalty(t([0.0]), t([0.0]), "k4")


# ---- loss aggregation ----

# unequal lengths 4, 2 and an empty row; padding holds nan
LOSS = t([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, NAN, NAN], [NAN, NAN, NAN, NAN]])
LMASK = t([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token-mean", 3.5),  # (1+2+3+4+5+6) / 6 = 21/6
        ("seq-mean-token-mean", 4.0),  # row means 2.5 and 5.5 -> 4.0; the empty row is left out
        ("seq-mean-token-sum", 10.5),  # row sums 10 and 11 -> 10.5; the empty row is left out
        ("seq-mean-token-sum-norm", 5.25),  # 21 / T, T = 4
    ],
)
def test_agg_loss_modes(mode, expected):
    assert_close(agg_loss(LOSS, LMASK, mode), t(expected))


def test_agg_loss_norm_const_and_gradient():
    assert_close(agg_loss(LOSS, LMASK, "seq-mean-token-sum-norm", norm_const=7.0), t(3.0))  # 21 / 7
    # token-mean gradient is mask / 6 on every valid token and exactly 0 (not nan) on padding
    loss = LOSS.clone().requires_grad_(True)
    agg_loss(loss, LMASK, "token-mean").backward()
    assert_close(loss.grad, LMASK / 6.0)


def test_agg_loss_empty_and_unknown():
    for mode in AGG_MODES:
        assert_close(agg_loss(LOSS, torch.zeros_like(LMASK), mode), t(0.0))
    with pytest.raises(HarnessError, match="token-mean, seq-mean-token-mean"):
        agg_loss(LOSS, LMASK, "sum")


# ---- PPO policy loss ----

# clip_low = 0.2, clip_high = 0.3 -> ratio clipped to [0.8, 1.3]; old_logp = 0, logp = ln(ratio)
#   token  ratio   A     pg1 = -A r    pg2 = -A clip(r)     loss   clipped (pg2 > pg1)
#   a      1.5    +1     -1.5          -1.3                 -1.3   yes
#   b      0.5    +1     -0.5          -0.8                 -0.5   no
#   c      0.5    -2      1.0           1.6                  1.6   yes
#   d      1.5    -2      3.0           2.6                  3.0   no
#   e      1.25   +1     -1.25         -1.25                -1.25  no  (would clip with clip_high 0.2)
#   f      0.75   -1      0.75          0.8                  0.8   yes (inside with clip_low 0.3)
RATIO = t([[1.5, 0.5, 0.5, 1.0], [1.5, 1.25, 0.75, 1.0]])
ADV = t([[1.0, 1.0, -2.0, 1e6], [-2.0, 1.0, -1.0, NAN]])
PMASK = t([[1, 1, 1, 0], [1, 1, 1, 0]])


def test_clip_policy_loss_by_hand():
    logp = torch.log(RATIO).requires_grad_(True)
    logp_padded = torch.where(PMASK.bool(), logp, t(50.0))  # garbage log-ratio in the padding
    loss, metrics = clip_policy_loss(
        logp_padded, torch.zeros_like(RATIO), ADV, PMASK, clip_low=0.2, clip_high=0.3
    )
    # (-1.3 - 0.5 + 1.6 + 3.0 - 1.25 + 0.8) / 6 = 2.35 / 6
    assert_close(loss, t(2.35 / 6))
    assert metrics["actor/pg_loss"] == pytest.approx(2.35 / 6)
    assert metrics["actor/clipfrac"] == pytest.approx(0.5)  # a, c, f
    assert metrics["actor/ratio_mean"] == pytest.approx(1.0)  # (1.5+0.5+0.5+1.5+1.25+0.75) / 6
    # mean of old - new = -mean(ln ratio) = -ln(1.5^2 * 0.5^2 * 1.25 * 0.75) / 6
    #   = -ln(0.52734375) / 6 = 0.6399027 / 6 = 0.1066504
    assert metrics["actor/approx_kl"] == pytest.approx(-math.log(1.5**2 * 0.5**2 * 1.25 * 0.75) / 6)
    assert metrics["actor/approx_kl"] == pytest.approx(0.1066504, abs=1e-7)

    # d loss / d logp = -A * ratio / 6 on unclipped tokens, 0 on clipped tokens and padding
    loss.backward()
    expected_grad = t([[0.0, -0.5 / 6, 0.0, 0.0], [3.0 / 6, -1.25 / 6, 0.0, 0.0]])
    assert_close(logp.grad, expected_grad)


def test_clip_policy_loss_symmetric_clip_and_agg_mode():
    logp = torch.log(RATIO)
    old = torch.zeros_like(RATIO)
    # with clip 0.2 / 0.2 the range is [0.8, 1.2]:
    #   a: max(-1.5, -1.2) = -1.2 (clipped)    d: max(3.0, 2.4) = 3.0 (not)
    #   e: max(-1.25, -1.2) = -1.2 (now clipped); b, c, f as before: -0.5, 1.6, 0.8
    #   (-1.2 - 0.5 + 1.6 + 3.0 - 1.2 + 0.8) / 6 = 2.5 / 6
    loss, metrics = clip_policy_loss(logp, old, ADV, PMASK)
    assert_close(loss, t(2.5 / 6))
    assert metrics["actor/clipfrac"] == pytest.approx(4 / 6)
    # agg_mode is forwarded: row sums (-1.3 - 0.5 + 1.6) = -0.2 and (3.0 - 1.25 + 0.8) = 2.55
    # -> seq-mean-token-sum = (-0.2 + 2.55) / 2 = 1.175
    loss, _ = clip_policy_loss(logp, old, ADV, PMASK, 0.2, 0.3, agg_mode="seq-mean-token-sum")
    assert_close(loss, t(1.175))


def test_clip_policy_loss_dual_clip():
    # c = 3, clip 0.2:
    #   ratio 4,   A = -1: max(4, 1.2) = 4 -> capped at -A*c = 3
    #   ratio 0.5, A = -2: max(1.0, 1.6) = 1.6 < 6, unchanged
    #   ratio 4,   A = +1: max(-4, -1.2) = -1.2, A > 0 so never capped
    logp = torch.log(t([[4.0, 0.5, 4.0]]))
    old = torch.zeros_like(logp)
    adv = t([[-1.0, -2.0, 1.0]])
    mask = torch.ones_like(logp)
    loss, _ = clip_policy_loss(logp, old, adv, mask)
    assert_close(loss, t((4.0 + 1.6 - 1.2) / 3))  # 4.4 / 3
    loss, _ = clip_policy_loss(logp, old, adv, mask, dual_clip=3.0)
    assert_close(loss, t((3.0 + 1.6 - 1.2) / 3))  # 3.4 / 3
    with pytest.raises(HarnessError):
        clip_policy_loss(logp, old, adv, mask, dual_clip=1.0)


# ---- PPO value loss ----


def test_clipped_value_loss_by_hand():
    # clip = 0.2; v_clip = old + clamp(v - old, -0.2, 0.2)
    #   old   v     R     v_clip  (v-R)^2  (v_clip-R)^2  max    clipped larger
    #   0.0   0.5   1.0   0.2     0.25     0.64          0.64   yes
    #   0.0   0.5   0.0   0.2     0.25     0.04          0.25   no
    #   1.0   1.1   0.0   1.1     1.21     1.21          1.21   no (equal)
    #   1.0   0.5   0.7   0.8     0.04     0.01          0.04   no
    #   1.0   0.5   0.0   0.8     0.25     0.64          0.64   yes
    old = t([[0.0, 0.0, 1.0], [1.0, 1.0, NAN]])
    values = t([[0.5, 0.5, 1.1], [0.5, 0.5, 1e6]])
    returns = t([[1.0, 0.0, 0.0], [0.7, 0.0, NAN]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    loss, metrics = clipped_value_loss(values, old, returns, mask, clip=0.2)
    # 0.5 * (0.64 + 0.25 + 1.21 + 0.04 + 0.64) / 5 = 0.5 * 2.78 / 5 = 0.278
    assert_close(loss, t(0.278))
    assert metrics["critic/vf_loss"] == pytest.approx(0.278)
    assert metrics["critic/vf_clipfrac"] == pytest.approx(0.4)  # 2 of 5
    assert metrics["critic/vpred_mean"] == pytest.approx(0.62)  # (0.5+0.5+1.1+0.5+0.5) / 5
    # with a clip too wide to bind: 0.5 * (0.25 + 0.25 + 1.21 + 0.04 + 0.25) / 5 = 0.2
    loss, metrics = clipped_value_loss(values, old, returns, mask, clip=10.0)
    assert_close(loss, t(0.2))
    assert metrics["critic/vf_clipfrac"] == 0.0


# ---- GRPO group advantages ----

# ids 7, 42, 3 are unsorted and non-contiguous
#   group 7:  rewards 1, 1, 4 (idx 0, 3, 5): mean 2, devs -1, -1, 2, var (1+1+4)/2 = 3, std 1.7320508
#   group 42: rewards 0, 2    (idx 1, 4):    mean 1, devs -1, 1,      var (1+1)/1 = 2,   std 1.4142136
#   group 3:  reward 5        (idx 2):       a singleton -> 0
REWARDS = t([1.0, 0.0, 5.0, 1.0, 2.0, 4.0])
GROUPS = torch.tensor([7, 42, 3, 7, 42, 7])


def test_group_advantages_std():
    adv = group_advantages(REWARDS, GROUPS, scale="std", eps=0.0)
    # -1/1.7320508 = -0.5773503, 2/1.7320508 = 1.1547005, 1/1.4142136 = 0.7071068
    assert_close(adv, t([-0.5773503, -0.7071068, 0.0, -0.5773503, 0.7071068, 1.1547005]))
    # the default eps = 1e-6 only nudges the scale
    assert_close(group_advantages(REWARDS, GROUPS), adv, rtol=1e-5, atol=1e-6)


def test_group_advantages_none():
    adv = group_advantages(REWARDS, GROUPS, scale="none")
    assert_close(adv, t([-1.0, -1.0, 0.0, -1.0, 1.0, 2.0]))


def test_group_advantages_edge_cases():
    # a group with equal rewards gets 0 (0 / (0 + eps)), as does a batch of singletons
    adv = group_advantages(t([3.0, 3.0, 0.5]), torch.tensor([1, 1, 2]))
    assert_close(adv, t([0.0, 0.0, 0.0]))
    with pytest.raises(HarnessError, match="std, none"):
        group_advantages(REWARDS, GROUPS, scale="mad")


# ---- explained variance ----


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0], [4.0, NAN, NAN]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    # a perfect critic: residuals all 0 -> 1
    assert_close(explained_variance(returns.clone(), returns, mask), t(1.0))
    # any constant predictor: Var[R - c] = Var[R] -> 0
    assert_close(explained_variance(torch.full_like(returns, 2.5), returns, mask), t(0.0))
    assert_close(explained_variance(torch.full_like(returns, -7.0), returns, mask), t(0.0))
    # values 1, 2, 3, 3: residuals 0, 0, 0, 1, Var = 0.75 / 3 = 0.25; Var[R] = 5/3 -> 1 - 0.15 = 0.85
    values = t([[1.0, 2.0, 3.0], [3.0, 1e6, 1e6]])
    assert_close(explained_variance(values, returns, mask), t(0.85))
    # constant returns: the ratio is undefined -> nan
    assert torch.isnan(explained_variance(values, torch.ones_like(returns), mask))
