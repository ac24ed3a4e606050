"""DVPO and Robust-Bellman PPO: loss terms against hand-computed values, the quantile critic learning a
bimodal distribution, gradients, and a few steps through the CLI."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from algorithms.dvpo import (
    DVPOOptions, QuantileHead, distributional_gae, dvpo_critic_loss, head_consistency, lower_tail_risk, mean_shift,
    midpoint_taus, quantile_huber, quantile_huber_pairwise, upper_tail_gain,
)
from algorithms.robust_ppo import RobustPPOOptions, robust_gae
from harness.cli import main
from harness.config import options_dataclass
from harness.errors import HarnessError
from tests.conftest import fast_args

# ---- quantile-Huber ----


def test_quantile_huber_hand_computed():
    pred = torch.tensor([0.0, 1.0])  # quantiles at tau = 0.25, 0.75
    target = torch.tensor([-2.0, 0.5])
    taus = midpoint_taus(2)
    assert taus.tolist() == [0.25, 0.75]
    # theta=0, tau=.25: u=-2 -> .75 * (2 - .5) = 1.125; u=.5 -> .25 * .125 = .03125; mean .578125
    # theta=1, tau=.75: u=-3 -> .25 * 2.5 = .625;      u=-.5 -> .25 * .125 = .03125; mean .328125
    for fn in (quantile_huber, quantile_huber_pairwise):
        assert fn(pred, target, taus).item() == pytest.approx(0.90625)
    # kappa = 2: u=-2 sits on the boundary (u^2/2)/2 = 1 = (2 - 1); u=.5 -> .0625; u=-3 -> 2*(3-1)/2 = 2
    expected = (0.75 * 1.0 + 0.25 * 0.0625) / 2 + (0.25 * 2.0 + 0.25 * 0.0625) / 2
    for fn in (quantile_huber, quantile_huber_pairwise):
        assert fn(pred, target, taus, kappa=2.0).item() == pytest.approx(expected)


def test_fast_quantile_huber_equals_pairwise_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 4, 2, 9, generator=gen).mul(2).requires_grad_()
    target = torch.randn(3, 4, 2, 13, generator=gen) * 3 + 1
    target[0, 0, 0, :4] = pred[0, 0, 0, 0].detach()  # ties with a prediction
    taus = midpoint_taus(9)
    fast, slow = quantile_huber(pred, target, taus), quantile_huber_pairwise(pred, target, taus)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    g_fast, = torch.autograd.grad(fast.sum(), pred)
    g_slow, = torch.autograd.grad(slow.sum(), pred)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-5)


# ---- the other terms ----


def test_tail_terms_hand_computed():
    q = torch.tensor([[0.0, 1.0, 2.0, 5.0], [1.0, 1.0, 1.0, 1.0]])  # [H=2, N=4]; means 2 and 1
    # alpha .25 -> 1 sample per tail; head 1: mean - CVaR- = 2 - 0 = 2, CVaR+ - mean = 5 - 2 = 3; head 2: 0, 0
    assert lower_tail_risk(q, 0.25).item() == pytest.approx((2 + 0) / 2)
    assert lower_tail_risk(q, 0.25, delta_low=0.5).item() == pytest.approx((1.5 + 0) / 2)
    assert upper_tail_gain(q, 0.25, cap=10.0).item() == pytest.approx(-(3 + 0) / 2)
    assert upper_tail_gain(q, 0.25, cap=1.0).item() == pytest.approx(-(1 + 0) / 2)
    assert mean_shift(q, torch.tensor(1.0)).item() == pytest.approx((1.0 + 0.0) / 2)
    two = torch.tensor([[0.0, 2.0], [2.0, 2.0]])  # centre [1, 2]: (-1)^2 + 0 + 1^2 + 0
    assert head_consistency(two).item() == pytest.approx(2.0)


def test_distributional_gae_hand_computed():
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    q = torch.tensor([[[[0.0, 1.0]], [[0.5, 2.0]], [[9.0, 9.0]]]])  # [B=1, T=3, H=1, N=2]; column 2 is padding
    adv, targets = distributional_gae(rewards, q, mask, gamma=1.0, lam=0.5)
    # delta_1 = 1 - theta(s_1) = [.5, -1]; delta_0 = theta(s_1) - theta(s_0) = [.5, 1]; A_0 = delta_0 + .5 A_1
    torch.testing.assert_close(adv[0, :, 0], torch.tensor([[0.75, 0.5], [0.5, -1.0], [0.0, 0.0]]))
    torch.testing.assert_close(targets[0, :, 0], torch.tensor([[0.75, 1.5], [1.0, 1.0], [0.0, 0.0]]))


def test_robust_gae_bootstraps_from_the_minimum_head():
    rewards, mask = torch.tensor([[0.0, 1.0]]), torch.ones(1, 2)
    values = torch.tensor([[[0.0, 2.0], [1.0, 3.0]]])  # t0: mean 1; t1: mean 2, min 1
    adv, returns = robust_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # delta_1 = 1 + 0 - 2 = -1; delta_0 = 0 + min(1, 3) - 1 = 0; A = [-1, -1]; R = mean + A = [0, 1]
    torch.testing.assert_close(adv, torch.tensor([[-1.0, -1.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, 1.0]]))


def test_dvpo_critic_loss_weights_switches_and_metrics():
    q = torch.tensor([[0.0, 1.0, 2.0, 5.0], [1.0, 1.0, 1.0, 1.0]]).view(1, 1, 2, 4)
    target = q.clone()
    returns, mask, cap = torch.tensor([[1.0]]), torch.ones(1, 1), torch.tensor([10.0])
    base = dict(qr_weight=0.0, cvar_weight=0.0, gain_weight=0.0, mean_shift_weight=0.0, curvature_weight=0.0,
                consistency_weight=0.0, alpha=0.5, quantile_reduction="sum")
    expected = {  # per term, on this one token
        "qr": (quantile_huber(q[0, 0], target[0, 0], midpoint_taus(4))).sum().item(),
        # alpha .5 -> 2 samples per tail; head 1: mean - CVaR- = 2 - .5, CVaR+ - mean = 3.5 - 2; head 2: 0, 0
        "cvar": 1.5 / 2, "gain": -1.5 / 2, "mean_shift": 0.5,
        "curvature": (0 + 4) / 2,  # head 1 second differences 0 (idx 1), 2 (idx 2), both in a tail; head 2 none
        "consistency": 2 * ((0 - 0.5) ** 2 + 0 + (2 - 1.5) ** 2 + (5 - 3) ** 2),
    }
    for name, value in expected.items():
        opts = DVPOOptions(**{**base, f"{name}_weight": 2.0})
        loss, metrics = dvpo_critic_loss(q, q, target, returns, cap, mask, opts)
        assert metrics[f"critic/{name}"] == pytest.approx(value), name
        assert loss.item() == pytest.approx(2.0 * value), name
        assert {k for k in metrics if k != "critic/loss"} == {f"critic/{name}"}  # switched-off terms are silent
    all_on = DVPOOptions(**{**base, **{f"{n}_weight": 1.0 for n in expected}})
    loss, metrics = dvpo_critic_loss(q, q, target, returns, cap, mask, all_on)
    assert loss.item() == pytest.approx(sum(expected.values()))
    # The default "mean": the two sums over the H x N = 8 grid are divided by 8, the others unchanged.
    mean_form = dataclasses.replace(all_on, quantile_reduction="mean")
    _, metrics = dvpo_critic_loss(q, q, target, returns, cap, mask, mean_form)
    for name, value in expected.items():
        assert metrics[f"critic/{name}"] == pytest.approx(value / 8 if name in ("qr", "consistency") else value), name
    assert DVPOOptions().quantile_reduction == "mean"


def test_every_dvpo_term_sends_gradient_to_the_quantile_head():
    torch.manual_seed(0)
    head = QuantileHead(8, n_heads=2, n_quantiles=40)  # alpha N = 4 quantiles per tail: curvature exists
    hidden = torch.randn(2, 3, 8)
    with torch.no_grad():
        old = head(hidden)
    target = old + torch.randn_like(old)
    for name in ("qr", "cvar", "gain", "mean_shift", "curvature", "consistency"):
        opts = DVPOOptions(**{f"{n}_weight": float(n == name) for n in
                              ("qr", "cvar", "gain", "mean_shift", "curvature", "consistency")})
        head.zero_grad()
        loss, _ = dvpo_critic_loss(head(hidden), old, target, torch.ones(2, 3), torch.full((2,), 5.0),
                                   torch.ones(2, 3), opts)
        loss.backward()
        assert head.linear.weight.grad.abs().sum() > 0, name


TERMS = ("qr", "cvar", "gain", "mean_shift", "curvature", "consistency")


def term_gradient_norms(opts: DVPOOptions) -> dict[str, float]:
    """Per term, the norm of its weighted gradient on the quantile outputs `[B, T, H, N]`, on a batch
    like a step's: default head (H=4, N=200) on random states, targets from distributional GAE on
    0/1 outcome rewards, the gain cap one std of the rewards."""
    torch.manual_seed(0)
    b, t = 16, 6
    head = QuantileHead(8, opts.n_heads, opts.n_quantiles)
    with torch.no_grad():
        old = head(torch.randn(b, t, 8))
    mask = torch.ones(b, t)
    scores = (torch.rand(b) < 0.5).float()
    rewards = torch.zeros(b, t)
    rewards[:, -1] = scores
    _, targets = distributional_gae(rewards, old, mask, opts.gamma, opts.lam)
    returns = targets.mean((-1, -2))
    norms = {}
    for name in TERMS:
        only = dataclasses.replace(opts, **{f"{n}_weight": getattr(opts, f"{n}_weight") * (n == name) for n in TERMS})
        quantiles = old.clone().requires_grad_(True)
        loss, _ = dvpo_critic_loss(quantiles, old, targets, returns, torch.full((b,), float(scores.std())), mask, only)
        (grad,) = torch.autograd.grad(loss, quantiles)
        norms[name] = float(grad.norm())
    return norms


def test_tail_terms_are_not_inert_at_the_defaults():
    # DVPO's asymmetric risk terms must move the critic about as much as QR does: at the defaults
    # neither tail term's gradient on the quantile outputs may be more than 10x smaller than QR's.
    # Under the spec's plain sums over the H x N grid they were ~1/1000 of it (README, DVPO).
    norms = term_gradient_norms(DVPOOptions())
    for name in ("cvar", "gain"):
        assert norms[name] > norms["qr"] / 10, norms
    summed = term_gradient_norms(DVPOOptions(quantile_reduction="sum"))
    assert all(summed[name] < summed["qr"] / 100 for name in ("cvar", "gain")), summed  # the test can fail


def test_quantile_head_is_monotone_and_starts_near_zero():
    head = QuantileHead(16)  # defaults: H=4, N=200
    out = head(torch.randn(3, 5, 16))
    assert out.shape == (3, 5, 4, 200)
    assert (out.diff(dim=-1) > 0).all()
    assert out.abs().max() < 0.5 and 0.05 < (out[..., -1] - out[..., 0]).mean() < 0.2


def test_options_are_validated():
    with pytest.raises(HarnessError, match="quantile_reduction must be one of mean, sum"):
        options_dataclass(DVPOOptions, {"quantile_reduction": "max"}, "dvpo")
    with pytest.raises(HarnessError, match="weights must be >= 0"):
        options_dataclass(DVPOOptions, {"cvar_weight": "-1"}, "dvpo")
    with pytest.raises(HarnessError, match="n_heads"):
        options_dataclass(RobustPPOOptions, {"n_heads": "0"}, "robust_ppo")


# ---- the quantile critic learns a distribution ----


def bimodal_quantiles(taus: torch.Tensor, w: float = 0.4, m1=-1.0, s1=0.2, m2=2.0, s2=0.3) -> torch.Tensor:
    """True quantiles of w N(m1, s1^2) + (1-w) N(m2, s2^2), by bisection on the CDF."""
    n1, n2 = torch.distributions.Normal(m1, s1), torch.distributions.Normal(m2, s2)
    lo, hi = torch.full_like(taus, -5.0), torch.full_like(taus, 5.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = w * n1.cdf(mid) + (1 - w) * n2.cdf(mid) < taus
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def test_quantile_critic_recovers_a_bimodal_distribution():
    """Fit the head (H=2, N=20) on one fixed random feature vector to 8000 returns from
    0.4 N(-1, .2^2) + 0.6 N(2, .3^2). With a small Huber kappa the loss is the pinball loss, whose minimiser
    is the true quantile; every recovered quantile of every head must lie within 0.1 of the true one (the
    modes are 3 apart; the sample's own quantiles are within 0.02 of the truth)."""
    gen = torch.Generator().manual_seed(0)
    n = 8000
    first = torch.rand(n, generator=gen) < 0.4
    returns = torch.where(first, -1.0 + 0.2 * torch.randn(n, generator=gen), 2.0 + 0.3 * torch.randn(n, generator=gen))
    torch.manual_seed(0)
    head = QuantileHead(8, n_heads=2, n_quantiles=20)
    features = torch.randn(1, 8, generator=gen)
    taus = midpoint_taus(20)
    target = returns.sort().values.expand(1, 2, n)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    steps = 600
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for _ in range(steps):
        loss = quantile_huber(head(features), target, taus, kappa=0.01).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    assert (torch.quantile(returns, taus) - bimodal_quantiles(taus)).abs().max() < 0.02
    learned = head(features).detach()[0]  # [H, N]
    truth = bimodal_quantiles(taus)
    error = (learned - truth).abs().max().item()
    assert error < 0.1, f"max quantile error {error:.3f}"


# ---- end to end ----


def test_dvpo_and_robust_ppo_train_through_the_cli(tmp_path, cache_dir):
    out = tmp_path / "runs"
    args = ["run", "--algos", "dvpo,robust_ppo", "--noise", "flip0.2", "--seeds", "1", "--steps", "2",
            "--out", str(out), "--cache-dir", str(cache_dir), "--quiet", *fast_args()]
    assert main(args) == 0
    dvpo = [json.loads(x) for x in (out / "arith/dvpo/flip0.2/seed0/metrics.jsonl").read_text().splitlines()]
    assert len(dvpo) == 2
    for key in ("critic/qr", "critic/cvar", "critic/gain", "critic/mean_shift", "critic/curvature",
                "critic/consistency", "critic/dist_mean", "critic/dist_std", "critic/cvar_lower_gap",
                "critic/cvar_upper_gap", "critic/explained_var", "critic/crps", "critic/coverage_10_90",
                "actor/kl_ref", "actor/clipfrac"):
        assert key in dvpo[0], key
    config = json.loads((out / "arith/dvpo/flip0.2/seed0/config.json").read_text())
    assert config["algo_options"]["n_quantiles"] == 200 and config["algo_options"]["cvar_weight"] == 0.1
    robust = [json.loads(x) for x in (out / "arith/robust_ppo/flip0.2/seed0/metrics.jsonl").read_text().splitlines()]
    assert {"critic/vf_loss", "critic/head_spread", "critic/explained_var"} <= set(robust[1])
    assert json.loads((out / "arith/robust_ppo/flip0.2/seed0/config.json").read_text())["algo_options"]["n_heads"] == 4


@pytest.mark.parametrize("algo", ["dvpo", "robust_ppo"])
def test_critic_loss_reaches_only_the_critic_and_actor_loss_only_the_policy(algo, tmp_path, cache_dir):
    from algorithms.base import Batch, PolicyForward
    from harness.rollout import forward_response, generate
    from tests.test_training import make_trainer

    trainer = make_trainer(algo, tmp_path, cache_dir)
    problems = trainer.step_problems(1)
    roll = generate(trainer.policy, [trainer.encode(p) for p in problems], max_new_tokens=trainer.cfg.train.max_new_tokens,
                    eos_id=trainer.tokenizer.eos_token_id, pad_id=trainer.tokenizer.pad_token_id)
    n = len(problems)
    batch = Batch(input_ids=roll.input_ids, attention_mask=roll.attention_mask, responses=roll.responses,
                  response_mask=roll.response_mask, scores=torch.arange(n) % 2 * 1.0, clean_scores=torch.ones(n),
                  group_ids=torch.arange(n), prompt_len=roll.prompt_len)
    with torch.no_grad():
        batch["old_logp"], _, _ = forward_response(trainer.policy, roll.input_ids, roll.attention_mask, roll.prompt_len)
        batch["ref_logp"] = batch["old_logp"] - 0.1
        batch["old_values"] = trainer.critic(roll.input_ids, roll.attention_mask, roll.prompt_len)
        trainer.algo.advantages(batch)
    closs, _ = trainer.algo.critic_loss(batch, trainer.critic, torch.Generator().manual_seed(0))
    closs.backward()
    assert all(p.grad is None for p in trainer.policy.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.critic.parameters())
    trainer.critic.zero_grad(set_to_none=True)
    logp, ent, _ = forward_response(trainer.policy, roll.input_ids, roll.attention_mask, roll.prompt_len)
    aloss, _ = trainer.algo.actor_loss(batch, PolicyForward(logp, ent, None), trainer.heads)
    aloss.backward()
    assert all(p.grad is None for p in trainer.critic.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.policy.parameters())
