"""The risk that reaches the policy (DVPO and DFPO): the risk-distorted value on hand-computed
distributions, risk weight 0 giving plain GAE on the critic's mean bit for bit, the risk-adjusted
advantage on a hand-computed case, the policy's loss gradient moving with the risk weight, the tail
terms reaching the advantage only through it, and the logged diagnostics (the advantage's correlation
with plain GAE, each critic term's share of the gradient)."""
from __future__ import annotations

import math

import pytest
import torch

from algorithms import ALGOS
from algorithms.base import Batch, PolicyForward
from algorithms.common import gae, grad_shares, masked_corr, masked_whiten
from algorithms.dfpo import DFPO, DFPOOptions
from algorithms.flow_critic import FlowHead, flow_critic_loss, risk_loss, shape_loss
from algorithms.distributional import lower_tail_distortion
from algorithms.dvpo import (DVPO, DVPOOptions, dvpo_critic_loss, head_consistency, lower_tail_risk, upper_tail_gain)
from algorithms.distributional import tail_curvature
from harness.config import options_dataclass
from harness.errors import HarnessError

DISTRIBUTIONAL = [name for name in ALGOS.names() if ALGOS.get(name).critic in ("quantile", "flow")]


# ---- the distortion ----


def test_lower_tail_distortion_hand_computed():
    z = torch.arange(10.0)  # mean 4.5
    # alpha .1: the lowest 1 sample, CVaR- = 0: V_w = 4.5 - w 4.5
    assert lower_tail_distortion(z, 0.0, 0.1).item() == 4.5
    assert lower_tail_distortion(z, 0.5, 0.1).item() == pytest.approx(2.25)
    assert lower_tail_distortion(z, 1.0, 0.1).item() == pytest.approx(0.0)
    # alpha .25: ceil(2.5) = 3 lowest samples, CVaR- = 1: 4.5 - .4 (4.5 - 1) = 3.1
    assert lower_tail_distortion(z, 0.4, 0.25).item() == pytest.approx(3.1)
    # unsorted, batched: [3, -1, 2, 0] mean 1, alpha .5 -> CVaR- = mean(-1, 0) = -.5; w .5 -> .25
    batch = torch.tensor([[3.0, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert lower_tail_distortion(batch, 0.5, 0.5).tolist() == pytest.approx([0.25, 1.0])


# ---- the advantage ----


def risk_batch(algo: str, seed: int = 0) -> Batch:
    """B=4 sequences of T=3 (right-padded) whose old critic outputs (means in [.2, .8]) differ in spread
    from token to token, so that some 0/1 outcomes fall beyond the lower tail:
    `[B, T, H=2, N=8]` for a quantile critic, `[B, T, M=8]` for a flow critic."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    shape = (4, 3, 2, 8) if ALGOS.get(algo).critic == "quantile" else (4, 3, 8)
    spread = (torch.rand(4, 3, generator=g) * 0.4).view(4, 3, *([1] * (len(shape) - 2)))
    means = (0.2 + 0.6 * torch.rand(4, 3, generator=g)).view(4, 3, *([1] * (len(shape) - 2)))
    values = means + torch.randn(*shape, generator=g).sort(-1).values * spread
    return Batch(response_mask=mask, scores=torch.tensor([1.0, 0.0, 1.0, 0.0]), old_values=values,
                 old_logp=torch.randn(4, 3, generator=g) * 0.1, ref_logp=torch.randn(4, 3, generator=g) * 0.1)


def make(algo: str, **options):
    cls = ALGOS.get(algo)
    return cls(cls.Options(**options))


def critic_mean(values: torch.Tensor) -> torch.Tensor:
    return values.mean((-1, -2)) if values.dim() == 4 else values.mean(-1)


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("algo", DISTRIBUTIONAL)
def test_risk_weight_zero_is_plain_gae_on_the_mean_bit_for_bit(algo, whiten):
    model = make(algo, risk_adv_weight=0.0, whiten_advantages=whiten)
    batch = risk_batch(algo)
    metrics = model.advantages(batch)
    mask = batch["response_mask"]
    adv, returns = gae(model.token_rewards(batch), critic_mean(batch["old_values"]), mask, model.opts.gamma,
                       model.opts.lam)
    expected = masked_whiten(adv, mask) if whiten else adv
    assert torch.equal(batch["advantages"], torch.where(mask.bool(), expected, torch.zeros_like(expected)))
    assert torch.equal(batch["returns"], returns)
    assert metrics["actor/adv_corr_plain_gae"] == pytest.approx(1.0, abs=1e-12)


# One sequence of two tokens with the outcome on the last; two samples (quantiles) per token, alpha .5 so
# that CVaR- is the lower sample. Token 0: {0, 2} (mean 1, CVaR- 0, gap 1); token 1: {1, 3} (mean 2, CVaR- 1,
# gap 1). gamma 1, lam .95, w = .5. Plain GAE on the mean V = [1, 2]:
#   reward 1: delta = [1, -1], A = [1 - .95, -1] = [.05, -1], R = A + V = [1.05, 1];
#   reward 0: delta = [1, -2], A = [1 - 1.9, -2] = [-.9, -2],  R = [.1, 0].
# value: V_w = V - .5 gap = [.5, 1.5]:
#   reward 1: delta = [1, -.5], A = [1 - .475, -.5] = [.525, -.5];  reward 0: delta = [1, -1.5], A = [-.425, -1.5].
# tail_td: delta' = delta - .5 min(0, delta + gap):
#   reward 1: delta_1 + gap = 0, nothing beyond the tail: A = plain [.05, -1];
#   reward 0: delta_1 + gap = -1 -> delta'_1 = -2 + .5 = -1.5, delta'_0 = 1: A = [1 - 1.425, -1.5] = [-.425, -1.5].
HAND = {("value", 1.0): [0.525, -0.5], ("value", 0.0): [-0.425, -1.5],
        ("tail_td", 1.0): [0.05, -1.0], ("tail_td", 0.0): [-0.425, -1.5]}


@pytest.mark.parametrize("mode, reward", list(HAND))
@pytest.mark.parametrize("algo", ["dvpo", "dfpo"])
def test_risk_adjusted_advantage_hand_computed(algo, mode, reward):
    z = torch.tensor([[[0.0, 2.0], [1.0, 3.0]]])  # [B=1, T=2, 2]
    values = z.unsqueeze(-2) if algo == "dvpo" else z  # DVPO: one head
    batch = Batch(response_mask=torch.ones(1, 2), scores=torch.tensor([reward]), old_values=values,
                  old_logp=torch.zeros(1, 2), ref_logp=torch.zeros(1, 2))
    make(algo, risk_adv_weight=0.5, risk_adv_mode=mode, alpha=0.5, kl_coef=0.0, whiten_advantages=False).advantages(batch)
    assert batch["advantages"][0].tolist() == pytest.approx(HAND[mode, reward])
    assert batch["returns"][0].tolist() == pytest.approx([1.05, 1.0] if reward else [0.1, 0.0])  # the critic's: plain


def test_tail_dampening_keeps_positive_td_errors_and_clips_at_weight_one():
    from algorithms.common import tail_dampened_gae

    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.5, 0.4], [0.6, 0.7, 0.9]])
    gap = torch.full((2, 3), 0.3)
    mask = torch.ones(2, 3)
    delta = gae(rewards, values, mask, 1.0, 0.0)[0]  # row 0: .3, -.1, .6 (none below -.3); row 1: .1, .2, -.9
    assert torch.equal(tail_dampened_gae(rewards, values, gap, mask, 1.0, 0.0, 1.0)[0], delta[0])
    clipped = tail_dampened_gae(rewards, values, gap, mask, 1.0, 0.0, 1.0)[1]
    assert clipped.tolist() == pytest.approx([0.1, 0.2, -0.3])
    assert tail_dampened_gae(rewards, values, gap, mask, 1.0, 0.0, 0.25)[1, 2].item() == pytest.approx(-0.9 + 0.25 * 0.6)
    # lam .5 sums the dampened errors: A_0 = .1 + .5 (.2 + .5 (-.3))
    assert tail_dampened_gae(rewards, values, gap, mask, 1.0, 0.5, 1.0)[1, 0].item() == pytest.approx(0.125)


@pytest.mark.parametrize("mode", ["tail_td", "value"])
@pytest.mark.parametrize("algo", DISTRIBUTIONAL)
def test_risk_weight_changes_the_policy_loss_gradient(algo, mode):
    grads = {}
    for w in (0.0, 0.5, 1.0):
        model = make(algo, risk_adv_weight=w, risk_adv_mode=mode)
        batch = risk_batch(algo)
        metrics = model.advantages(batch)
        logp = (batch["old_logp"] + 0.05).requires_grad_(True)
        loss, _ = model.actor_loss(batch, PolicyForward(logp, torch.zeros_like(logp), None), torch.nn.ModuleDict())
        (grads[w],) = torch.autograd.grad(loss, logp)
        if w > 0:  # the advantage moves off plain GAE (how far on the testbed: README)
            assert metrics["actor/adv_corr_plain_gae"] < 1 - 1e-4, (w, metrics["actor/adv_corr_plain_gae"])
    assert grads[0.0].abs().sum() > 0
    assert not torch.allclose(grads[0.0], grads[0.5], atol=1e-4)
    assert not torch.allclose(grads[0.5], grads[1.0], atol=1e-4)


def test_the_ablation_variants_switch_off_what_they_say():
    assert make("dvpo_risk_off").opts.risk_adv_weight == 0.0 and make("dfpo_risk_off").opts.risk_adv_weight == 0.0
    off = make("dvpo_tails_off").opts
    assert (off.cvar_weight, off.gain_weight, off.curvature_weight, off.consistency_weight) == (0, 0, 0, 0)
    assert (off.qr_weight, off.mean_shift_weight, off.risk_adv_weight) == (1.0, 0.5, DVPOOptions().risk_adv_weight)
    off = make("dfpo_tails_off").opts
    assert (off.use_risk, off.use_shape, off.use_cfm, off.use_anchor) == (False, False, True, True)
    assert off.risk_adv_weight == DFPOOptions().risk_adv_weight


@pytest.mark.parametrize("algo", ["dvpo", "dfpo"])
def test_risk_options_are_validated(algo):
    for bad in ("-0.1", "1.5"):
        with pytest.raises(HarnessError, match="risk_adv_weight must lie in"):
            options_dataclass(ALGOS.get(algo).Options, {"risk_adv_weight": bad}, algo)
    with pytest.raises(HarnessError, match="risk_adv_mode must be one of tail_td, value, got 'cvar'"):
        options_dataclass(ALGOS.get(algo).Options, {"risk_adv_mode": "cvar"}, algo)


# ---- the tail terms reach the policy only through the risk-adjusted advantage ----


def value_change_along(term_grad: torch.Tensor, values: torch.Tensor, w: float, alpha: float) -> float:
    """|d V_w / d step| for a critic step along a term's gradient at the head's output: the inner product
    of the gradient of the value the advantage reads (summed over tokens) with the term's gradient."""
    v = values.detach().requires_grad_(True)
    dist = lower_tail_distortion(v, w, alpha)
    (dv,) = torch.autograd.grad(dist.mean(-1).sum() if v.dim() == 4 else dist.sum(), v)
    return float((dv * term_grad).sum().abs())


DVPO_TAILS = {
    "cvar": lambda q: lower_tail_risk(q, 0.1).sum(),
    "gain": lambda q: upper_tail_gain(q, 0.1, 10.0).sum(),
    "curvature": lambda q: tail_curvature(q, 0.1).sum(),
    "consistency": lambda q: head_consistency(q).sum(),
}
DFPO_TAILS = {
    "risk": lambda z: risk_loss(z, 0.1, 0.0),
    "shape": lambda z: sum(shape_loss(z, 0.1, torch.full(z.shape[:-1], 10.0))),
}


@pytest.mark.parametrize("name", [*DVPO_TAILS, *DFPO_TAILS])
def test_tail_terms_move_the_advantage_only_when_the_risk_weight_is_on(name):
    # The tail terms are unchanged when all samples of a token shift together, so a critic step along
    # one of them leaves each token's mean where it is (to float rounding): with w = 0 the advantage
    # cannot see them. Both risk modes read the lower-tail spread g = mean - CVaR- (the value mode
    # through V_w = mean - w g, tail_td through its threshold -g), and a step along a tail term moves
    # V_w (here at w = .5) at first order: the term reaches the policy through the risk weight.
    g = torch.Generator().manual_seed(1)
    shape = (5, 3, 2, 40) if name in DVPO_TAILS else (15, 40)
    values = (torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g) * 3).sort(-1).values
    term = (DVPO_TAILS | DFPO_TAILS)[name]
    v = values.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(term(v), v)
    scale = float(grad.norm())
    assert scale > 0
    assert value_change_along(grad, values, 0.0, 0.1) < 1e-5 * scale, name
    if name == "consistency":
        # Head consistency pulls each head toward the heads' average quantile function, which is what
        # the value reads (a mean over heads of per-head tails of sorted quantiles): it reaches neither.
        assert value_change_along(grad, values, 0.5, 0.1) < 1e-5 * scale
    else:
        assert value_change_along(grad, values, 0.5, 0.1) > 1e-3 * scale, name


# ---- the logged diagnostics ----


def test_masked_corr_hand_computed():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert masked_corr(torch.tensor([[1.0, 2.0, 3.0, 9.0]]), torch.tensor([[3.0, 2.0, 1.0, float("nan")]]), mask) == -1.0
    # x = (1, 2, 3), y = (1, 2, 4): centred (-1, 0, 1), (-4/3, -1/3, 5/3); sum xy = 3, |x|^2 = 2, |y|^2 = 42/9
    expected = 3 / math.sqrt(2 * 42 / 9)
    assert masked_corr(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), torch.tensor([[1.0, 2.0, 4.0, 7.0]]), mask) == pytest.approx(expected)
    assert math.isnan(masked_corr(torch.ones(1, 4), torch.arange(4.0).view(1, 4), mask))  # no variance


def test_grad_shares_hand_computed():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    shares = grad_shares({"a": 3 * x.sum(), "b": x.pow(2).sum()}, [x])
    # gradients (3, 3) and (2, 4): norms 3 sqrt 2 and sqrt 20
    total = 3 * math.sqrt(2) + math.sqrt(20)
    assert shares == pytest.approx({"a": 3 * math.sqrt(2) / total, "b": math.sqrt(20) / total})
    assert math.isnan(grad_shares({"a": 0 * x.sum()}, [x])["a"])


def test_dvpo_critic_loss_logs_each_terms_gradient_share():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(2, 3, 2, 20, generator=g).sort(-1).values
    q = (old + 0.1 * torch.randn(old.shape, generator=g)).sort(-1).values.requires_grad_(True)
    target = old + torch.randn(old.shape, generator=g)
    args = (old, target, torch.ones(2, 3), torch.full((2,), 1.0), torch.ones(2, 3))
    _, metrics = dvpo_critic_loss(q, *args, DVPOOptions())
    shares = {k.split("/")[-1]: v for k, v in metrics.items() if "grad_share" in k}
    assert set(shares) == {"qr", "cvar", "gain", "mean_shift", "curvature", "consistency"}
    assert sum(shares.values()) == pytest.approx(1.0)
    # the share of one term by hand: its weighted gradient's norm over the sum of all of them
    norms = {}
    for name in shares:
        only = DVPOOptions(**{f"{n}_weight": getattr(DVPOOptions(), f"{n}_weight") * (n == name) for n in shares},
                           grad_shares=False)
        loss, _ = dvpo_critic_loss(q, *args, only)
        norms[name] = float(torch.autograd.grad(loss, q)[0].norm())
    assert shares["cvar"] == pytest.approx(norms["cvar"] / sum(norms.values()), rel=1e-5)
    _, metrics = dvpo_critic_loss(q, *args, DVPOOptions(cvar_weight=0.0, grad_shares=False))
    assert not any("grad_share" in k for k in metrics)
    _, metrics = dvpo_critic_loss(q, *args, DVPOOptions(cvar_weight=0.0))
    assert "critic/grad_share/cvar" not in metrics and "critic/grad_share/gain" in metrics


def test_dfpo_critic_loss_logs_each_terms_gradient_share():
    torch.manual_seed(0)
    head = FlowHead(8, width=16, layers=1, time_dim=8, n_samples=20)
    torch.nn.init.normal_(head.out.weight, std=0.1)
    h = torch.randn(5, 8)
    with torch.no_grad():
        old = head.sample(torch.randn(5, 20), h)
    tokens = {"old_samples": old, "targets": old + torch.randn(5, 20), "returns": old.mean(-1) + 0.3,
              "tail_cap": torch.full((5,), 10.0)}
    _, metrics = flow_critic_loss(head, h, tokens, DFPOOptions(), torch.Generator().manual_seed(0))
    shares = {k.split("/")[-1]: v for k, v in metrics.items() if "grad_share" in k}
    assert set(shares) == {"cfm", "anchor", "geo", "risk", "shape"}
    assert sum(shares.values()) == pytest.approx(1.0)
    assert all(v > 0 for v in shares.values()), shares
    _, metrics = flow_critic_loss(head, h, tokens, DFPOOptions(use_risk=False, use_geo=False),
                                  torch.Generator().manual_seed(0))
    assert {k.split("/")[-1] for k in metrics if "grad_share" in k} == {"cfm", "anchor", "shape"}


def test_the_tiny_model_flow_width_reaches_the_dfpo_variants():
    from harness.resolver import with_tiny_model_overrides

    assert with_tiny_model_overrides({}, ["ppo", "dfpo", "dfpo_tails_off", "dvpo_risk_off"], None) == {
        "dfpo.flow_width": "64", "dfpo_tails_off.flow_width": "64"}
    assert with_tiny_model_overrides({"dfpo_risk_off.flow_width": "32"}, ["dfpo_risk_off"], "tiny") == {
        "dfpo_risk_off.flow_width": "32"}
    assert with_tiny_model_overrides({}, ["dfpo_tails_off"], "some/model") == {}


@pytest.mark.slow
def test_every_distributional_algorithm_logs_the_risk_diagnostics_each_step(tmp_path, cache_dir):
    import json

    from harness.cli import main
    from tests.conftest import fast_args

    out = tmp_path / "runs"
    args = ["run", "--algos", ",".join(DISTRIBUTIONAL), "--noise", "flip0.2", "--seeds", "1", "--steps", "2",
            "--out", str(out), "--cache-dir", str(cache_dir), "--quiet", "--workers", "1", *fast_args()]
    assert main(args) == 0
    for algo in DISTRIBUTIONAL:
        rows = [json.loads(x) for x in (out / f"arith/{algo}/flip0.2/seed0/metrics.jsonl").read_text().splitlines()]
        opts = make(algo).opts
        for row in rows:
            corr = row["actor/adv_corr_plain_gae"]
            assert (corr == pytest.approx(1.0) if opts.risk_adv_weight == 0 else -1 <= corr <= 1), (algo, corr)
            shares = {k: v for k, v in row.items() if k.startswith("critic/grad_share/")}
            assert len(shares) >= 2 and sum(shares.values()) == pytest.approx(1.0), (algo, shares)
        tails = {"critic/grad_share/cvar", "critic/grad_share/risk"} & set(rows[0])
        assert bool(tails) == ("tails_off" not in algo), (algo, tails)
