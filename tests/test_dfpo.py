"""DFPO (algorithms/dfpo.py, flow_critic.py): each critic-loss term on hand-computed cases, coupled-noise GAE
against a brute-force loop, the flow critic fitting a bimodal return distribution, and DFPO
through the training core and the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from algorithms.base import Batch, PolicyForward
from algorithms.common import gae
from algorithms.dfpo import DFPO, DFPOOptions
from algorithms.flow_critic import (FlowHead, anchor_loss, cfm_loss, couple_noise, coupled_gae, flow_critic_loss, geo_loss,
                                    noise_levels, realised_returns, risk_loss, shape_loss, uncertainty_weight)
from harness.cli import main
from harness.config import options_dataclass
from harness.errors import HarnessError
from tests.conftest import fast_args

# ---- targets ----


def test_coupled_gae_matches_a_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    b, t, m, gamma, lam = 3, 5, 4, 0.9, 0.8
    rewards = torch.randn(b, t, generator=g)
    samples = torch.randn(b, t, m, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.float32)
    adv, targets = coupled_gae(rewards, samples, mask, gamma, lam)
    for i in range(b):
        n = int(mask[i].sum())
        for j in range(m):
            for s in range(n):
                expected = 0.0
                for k in range(s, n):
                    next_z = samples[i, k + 1, j] if k + 1 < n else 0.0
                    delta = rewards[i, k] + gamma * next_z - samples[i, k, j]
                    expected += (gamma * lam) ** (k - s) * float(delta)
                assert adv[i, s, j].item() == pytest.approx(expected, abs=1e-5)
                assert targets[i, s, j].item() == pytest.approx(expected + samples[i, s, j].item(), abs=1e-5)
            assert (adv[i, n:, j] == 0).all()
    # The mean over samples is GAE on the mean value (spec §1.4: R-hat = V-bar + A-bar).
    mean_adv, _ = gae(rewards, samples.mean(-1), mask, gamma, lam)
    assert torch.allclose(adv.mean(-1), mean_adv, atol=1e-6)


def test_realised_returns_sum_future_rewards():
    rewards = torch.tensor([[0.0, -0.1, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(realised_returns(rewards, mask, 1.0), torch.tensor([[0.9, 0.9, 1.0, 0.0]]))
    assert torch.allclose(realised_returns(rewards, mask, 0.5), torch.tensor([[0.2, 0.4, 1.0, 0.0]]))


# ---- critic loss terms, hand-computed ----


def test_cfm_loss_hand_computed_and_zero_for_the_straight_line_velocity():
    velocity, targets, noise = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    # u* = targets - noise = [2, 1]; squared errors [1, 1]; weight 0.5
    assert cfm_loss(velocity, targets, noise, torch.tensor([0.5])).item() == 0.5
    assert cfm_loss(targets - noise, targets, noise, torch.tensor([0.7])).item() == 0.0


class PointMassField(FlowHead):
    """The exact marginal velocity towards a point mass at c: v(z, tau) = (c - z) / (1 - tau)."""

    def __init__(self, c: float, offset: float = 0.0):
        super().__init__(hidden_size=2, width=8, layers=1, time_dim=4, n_samples=8)
        self.c, self.offset = c, offset

    def velocity(self, z, tau, h):
        tau = torch.as_tensor(tau, dtype=torch.float64)
        return ((self.c - z.double()) / (1 - tau) + self.offset).float()


def test_cfm_term_of_the_critic_loss_is_zero_for_the_exact_field():
    head = PointMassField(c=2.5)
    n, m = 5, 8
    targets = torch.full((n, m), 2.5)
    tokens = {"old_samples": torch.randn(n, m), "targets": targets, "returns": targets.mean(-1),
              "tail_cap": torch.ones(n)}
    for coupling in ("sorted", "independent"):
        opts = DFPOOptions(use_anchor=False, use_risk=False, use_shape=False, use_geo=False, cfm_coupling=coupling)
        loss, metrics = flow_critic_loss(head, torch.zeros(n, 2), tokens, opts, torch.Generator().manual_seed(0))
        assert metrics["critic/cfm"] < 1e-8 and loss.item() < 1e-8
    # A field that misses the target by 1 everywhere: loss = mean weight * 1.
    head.offset = 1.0
    loss, metrics = flow_critic_loss(head, torch.zeros(n, 2), tokens, DFPOOptions(
        use_anchor=False, use_risk=False, use_shape=False, use_geo=False, weight_mode="none"), torch.Generator())
    assert metrics["critic/cfm"] == pytest.approx(1.0, rel=1e-4)


def test_uncertainty_weights():
    old = torch.tensor([[0.0, 2.0], [1.0, 1.0 + 1e-3]])
    sigma = math.sqrt(2.0)  # unbiased std of {0, 2}
    w = uncertainty_weight(old, "value_flows", kappa=0.3)
    assert w[0].item() == pytest.approx(1 / (1 + math.exp(0.3 / sigma)) + 0.5, abs=1e-6)
    assert w[1].item() == pytest.approx(0.5, abs=1e-6)  # a certain token gets the smallest weight
    inv = uncertainty_weight(old, "inverse_cov", cov_c=1.0)
    raw = torch.tensor([1 / (sigma / 1.0 + 1), 1 / (old[1].std().item() / 1.0005 + 1)])
    assert torch.allclose(inv, raw / raw.mean(), atol=1e-6)
    assert inv[1] > inv[0]  # high coefficient of variation is down-weighted
    assert uncertainty_weight(old, "none").tolist() == [1.0, 1.0]
    with pytest.raises(HarnessError, match="valid: value_flows"):
        uncertainty_weight(old, "bogus")


def test_sorted_coupling_pairs_noise_and_targets_by_rank():
    noise, targets = torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[10.0, 30.0, 20.0]])
    assert couple_noise(noise, targets, "sorted").tolist() == [[1.0, 3.0, 2.0]]
    assert couple_noise(noise, targets, "independent").tolist() == noise.tolist()


def test_anchor_loss_hand_computed():
    loss, clipfrac = anchor_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]), 0.2)
    # token 1: unclipped error 0, clipped (0.2 - 1)^2 = 0.64; token 2: both 1 -> 0.5 * (0.64 + 1) / 2
    assert loss.item() == pytest.approx(0.41)
    assert clipfrac.item() == 0.5


def test_geo_loss_is_zero_for_constant_velocity_and_stops_the_start_gradient():
    v0 = torch.tensor([[1.0, -2.0]], requires_grad=True)
    assert geo_loss(v0.detach().clone(), v0).item() == 0.0
    path = torch.tensor([[2.0, 0.0]], requires_grad=True)
    loss = geo_loss(path, v0)  # (1^2 + 2^2) / 2
    assert loss.item() == 2.5
    loss.backward()
    assert v0.grad is None and path.grad.tolist() == [[1.0, 2.0]]


def test_cvar_risk_term_on_a_known_sample_set():
    z = torch.arange(10.0).unsqueeze(0)  # mean 4.5; alpha 0.1 -> lowest 1 sample (0)
    assert risk_loss(z, 0.1, 0.0).item() == 4.5
    assert risk_loss(z, 0.1, 4.0).item() == 0.5
    assert risk_loss(z, 0.1, 5.0).item() == 0.0
    z16 = torch.arange(16.0).unsqueeze(0)  # M = 16, alpha 0.1 -> ceil(1.6) = 2 samples: mean 7.5 - 0.5
    assert risk_loss(z16, 0.1, 0.0).item() == 7.0


def test_tail_shape_terms_hand_computed():
    z = torch.tensor([[0.0, 1.0, 2.0, 4.0, 8.0, 9.0]])  # mean 4; alpha 0.2 -> 2 samples per tail
    gain, curv = shape_loss(z, 0.2, torch.tensor([10.0]))
    assert gain.item() == -4.5  # CVaR+ = 8.5
    assert curv.item() == 9.0  # tail second differences 0 (index 1) and -3 (index 4)
    gain, _ = shape_loss(z, 0.2, torch.tensor([1.0]))
    assert gain.item() == -1.0  # capped at delta_high


# ---- the flow critic learns a distribution ----


def bimodal(n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """0.3 N(-1, 0.2^2) + 0.7 N(1, 0.3^2)."""
    left = torch.rand(n, m, generator=gen) < 0.3
    return torch.where(left, -1 + 0.2 * torch.randn(n, m, generator=gen), 1 + 0.3 * torch.randn(n, m, generator=gen))


def fit_flow(coupling: str, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a small flow head (default DFPO losses without anchor and tail terms: CFM + geometric
    consistency) on one fixed feature to bimodal returns, 8 tokens x M = 64 samples per update,
    Adam with a linearly decaying lr. Returns 4000 one-step samples and 200000 true draws."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads only contend (about 3 s instead of 30+)
    try:
        return _fit_flow(coupling, iterations)
    finally:
        torch.set_num_threads(threads)


def _fit_flow(coupling: str, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    head = FlowHead(hidden_size=4, width=64, layers=3, time_dim=16, n_samples=64)
    opts = DFPOOptions(use_anchor=False, use_risk=False, use_shape=False, cfm_coupling=coupling)
    h = torch.ones(8, 4)  # 8 "tokens" with the same state
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: 1 - i / iterations)
    for _ in range(iterations):
        targets = bimodal(8, 64, gen)
        tokens = {"old_samples": targets, "targets": targets, "returns": targets.mean(-1), "tail_cap": torch.ones(8)}
        loss, _ = flow_critic_loss(head, h, tokens, opts, gen)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        samples = head.sample(noise_levels(4000).unsqueeze(0), h[:1], steps=1)[0]
    return samples, bimodal(1, 200_000, gen)[0]


def test_flow_critic_one_step_samples_match_a_bimodal_distribution():
    samples, truth = fit_flow("sorted", iterations=300)
    # Levels away from the jump of the quantile function at 0.3 (between the modes).
    levels = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    error = (torch.quantile(samples, levels) - torch.quantile(truth, levels)).abs()
    # Tolerance 0.2 (the modes are 2 apart with std 0.2 and 0.3); measured max error 0.13.
    assert error.max() < 0.2, f"quantile errors {error.tolist()}"
    # Bimodal, not a blur: little mass between the modes (the truth has 0.3%), the right share on the left.
    assert ((samples > -0.4) & (samples < 0.2)).float().mean() < 0.08
    assert (samples < 0).float().mean().item() == pytest.approx(0.3, abs=0.05)


def test_independent_coupling_collapses_the_one_step_samples():
    # Why cfm_coupling defaults to "sorted": with noise independent of the targets, the CFM
    # velocity at tau = 0 is E[Z] - z, so one Euler step lands every sample near the mean.
    samples, truth = fit_flow("independent", iterations=100)
    assert samples.std() < 0.4 * truth.std()
    assert samples.mean().item() == pytest.approx(truth.mean().item(), abs=0.15)


# ---- fixed noise levels: the value without Monte-Carlo noise ----


def test_noise_levels_are_the_normal_quantiles_of_the_midpoints():
    levels = noise_levels(4)
    expected = [-1.1503493803760079, -0.3186393639643752, 0.3186393639643752, 1.1503493803760079]  # Phi^-1(1/8, 3/8, ..)
    assert levels.tolist() == pytest.approx(expected, abs=1e-6)
    assert noise_levels(2).tolist() == pytest.approx([-0.6744897501960817, 0.6744897501960817], abs=1e-6)


def test_flow_head_output_is_deterministic_and_the_anchor_compares_the_same_levels():
    torch.manual_seed(0)
    head = FlowHead(hidden_size=4, width=16, layers=1, time_dim=8, n_samples=8)
    torch.nn.init.normal_(head.out.weight, std=0.5)
    h = torch.randn(2, 3, 4)
    with torch.no_grad():
        out = head(h)
    assert torch.equal(out, head(h).detach()), "two passes give the same samples"
    # The samples are the one-step map at the levels, the same levels at every token (coupled).
    with torch.no_grad():
        assert torch.allclose(out, head.sample(noise_levels(8).expand(2, 3, 8), h))
    # The anchor's new value is taken at the old value's levels: with an unchanged head it equals the
    # old value exactly whatever the random draws, so its loss is 0.5 (V_old - R)^2 for any generator.
    old = out.reshape(6, 8)
    returns = old.mean(-1) + 0.5
    tokens = {"old_samples": old, "targets": old, "returns": returns, "tail_cap": torch.ones(6)}
    opts = DFPOOptions(cfm_weight=0.0, use_geo=False, use_risk=False, use_shape=False)
    anchors = [flow_critic_loss(head, h.reshape(6, 4), tokens, opts, torch.Generator().manual_seed(k))[1]
               for k in (0, 1)]
    assert anchors[0]["critic/anchor"] == pytest.approx(0.5 * 0.25, rel=1e-5)
    assert anchors[0]["critic/anchor"] == anchors[1]["critic/anchor"] and anchors[0]["critic/anchor_clipfrac"] == 0.0
    assert anchors[0]["critic/cfm"] != anchors[1]["critic/cfm"], "the flow-matching draws come from the generator"


def test_two_critic_passes_on_a_batch_give_identical_advantages(tmp_path, cache_dir):
    from harness.rollout import forward_response, generate
    from tests.test_training import make_trainer

    trainer = make_trainer("dfpo", tmp_path, cache_dir)
    torch.nn.init.normal_(trainer.critic.head.out.weight, std=0.5)  # a field that is not zero
    problems = trainer.step_problems(1)
    roll = generate(trainer.policy, [trainer.encode(p) for p in problems], max_new_tokens=4,
                    eos_id=trainer.tokenizer.eos_token_id, pad_id=trainer.tokenizer.pad_token_id)
    advantages, metrics = [], []
    for _ in range(2):
        batch = Batch(input_ids=roll.input_ids, attention_mask=roll.attention_mask, responses=roll.responses,
                      response_mask=roll.response_mask, scores=torch.tensor([1.0, 0.0, 1.0, 0.0]),
                      clean_scores=torch.ones(4), group_ids=torch.arange(4), prompt_len=roll.prompt_len)
        with torch.no_grad():
            batch["old_logp"], _, _ = forward_response(trainer.policy, roll.input_ids, roll.attention_mask,
                                                       roll.prompt_len)
            batch["ref_logp"] = batch["old_logp"].clone()
            batch["old_values"] = trainer.critic(roll.input_ids, roll.attention_mask, roll.prompt_len)
            metrics.append(trainer.algo.advantages(batch))
        advantages.append(batch["advantages"])
    assert torch.equal(advantages[0], advantages[1])
    assert advantages[0].abs().sum() > 0
    # The spread the fixed levels keep out of V-bar: std_j z / sqrt(M), logged as a diagnostic.
    assert metrics[0]["critic/value_mc_se"] > 0 and metrics[0] == metrics[1]


# ---- the algorithm ----


def tiny_batch(m: int = 4) -> Batch:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    batch = Batch(response_mask=mask, scores=torch.tensor([1.0, 0.0, 1.0, 0.0]),
                  old_values=torch.randn(4, 3, m, generator=g), old_logp=torch.zeros(4, 3), ref_logp=torch.zeros(4, 3))
    return batch


def test_advantage_is_whitened_gae_on_the_flow_mean_and_risk_variant_differs():
    algo = DFPO(DFPOOptions(kl_coef=0.0, risk_adv_weight=0.0))  # the risk-adjusted advantage: tests/test_risk.py
    batch = tiny_batch()
    metrics = algo.advantages(batch)
    mask = batch["response_mask"]
    rewards = torch.zeros(4, 3)
    rewards[[0, 1, 2, 3], [2, 1, 0, 2]] = batch["scores"]
    adv, ret = gae(rewards, batch["old_values"].mean(-1), mask, 1.0, 0.95)
    from algorithms.common import masked_whiten
    assert torch.allclose(batch["advantages"], masked_whiten(adv, mask), atol=1e-5)
    assert torch.allclose(batch["returns"], ret, atol=1e-5)
    assert batch["dist_returns"].shape == (4, 3, 4) and batch["tail_cap"].shape == (4,)
    assert batch["tail_cap"][0].item() == pytest.approx(batch["scores"].std().item())
    for key in ("critic/dist_mean", "critic/dist_std", "critic/cvar_lower_gap", "critic/cvar_upper_gap",
                "critic/explained_var", "critic/crps", "critic/coverage_10_90"):
        assert math.isfinite(metrics[key]), key
    risky = tiny_batch()
    DFPO(DFPOOptions(kl_coef=0.0, risk_eta=0.5, risk_adv_weight=0.0, whiten_advantages=False)).advantages(risky)
    plain = tiny_batch()
    DFPO(DFPOOptions(kl_coef=0.0, risk_adv_weight=0.0, whiten_advantages=False)).advantages(plain)
    assert (risky["advantages"] <= plain["advantages"] + 1e-6).all()  # CVaR- <= mean
    assert not torch.allclose(risky["advantages"], plain["advantages"])


def test_options_defaults_and_validation():
    o = DFPOOptions()
    assert (o.flow_width, o.n_samples, o.consistency_steps, o.kappa, o.alpha) == (1024, 16, 4, 0.3, 0.1)
    assert (o.anchor_weight, o.geo_weight, o.risk_weight, o.shape_weight) == (0.5, 0.1, 0.1, 0.05)
    assert (o.kl_mode, o.kl_coef, o.weight_mode, o.anchor_mode, o.risk_eta) == ("reward", 0.05, "value_flows", "mean", 0.0)
    for key, value, message in [("weight_mode", "x", "valid|one of"), ("anchor_mode", "x", "mean, bcfm"),
                                ("n_samples", "1", "at least 2"), ("alpha", "0.9", "alpha"),
                                ("use_cfm", "false", "flow-matching term")]:
        with pytest.raises(HarnessError, match=message):
            options_dataclass(DFPOOptions, {key: value}, "dfpo")


@pytest.mark.parametrize("overrides", [{}, {"anchor_mode": "bcfm", "geo_endpoint": "true", "weight_mode": "inverse_cov"}])
def test_critic_loss_reaches_only_the_critic_and_actor_loss_only_the_actor(overrides, tmp_path, cache_dir):
    from harness.rollout import forward_response, generate
    from tests.test_training import make_trainer

    trainer = make_trainer("dfpo", tmp_path, cache_dir, **{f"dfpo.{k}": v for k, v in overrides.items()},
                           **{"dfpo.flow_width": "32"})
    problems = trainer.step_problems(1)
    roll = generate(trainer.policy, [trainer.encode(p) for p in problems], max_new_tokens=4,
                    eos_id=trainer.tokenizer.eos_token_id, pad_id=trainer.tokenizer.pad_token_id)
    batch = Batch(input_ids=roll.input_ids, attention_mask=roll.attention_mask, responses=roll.responses,
                  response_mask=roll.response_mask, scores=torch.tensor([1.0, 0.0, 1.0, 0.0]),
                  clean_scores=torch.ones(4), group_ids=torch.arange(4), prompt_len=roll.prompt_len)
    with torch.no_grad():
        batch["old_logp"], _, _ = forward_response(trainer.policy, roll.input_ids, roll.attention_mask, roll.prompt_len)
        batch["ref_logp"] = batch["old_logp"].clone()
        batch["old_values"] = trainer.critic(roll.input_ids, roll.attention_mask, roll.prompt_len)
        trainer.algo.advantages(batch)
    assert batch["old_values"].shape == (*batch["response_mask"].shape, 16)
    # Give the zero-initialised output layer a value so that gradients reach every critic tensor.
    torch.nn.init.normal_(trainer.critic.head.out.weight, std=0.1)
    closs, metrics = trainer.algo.critic_loss(batch, trainer.critic, torch.Generator().manual_seed(0))
    closs.backward()
    assert all(p.grad is None for p in trainer.policy.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.critic.parameters())
    trainer.critic.zero_grad(set_to_none=True)
    logp, ent, _ = forward_response(trainer.policy, roll.input_ids, roll.attention_mask, roll.prompt_len)
    aloss, _ = trainer.algo.actor_loss(batch, PolicyForward(logp, ent, None), trainer.heads)
    aloss.backward()
    assert all(p.grad is None for p in trainer.critic.parameters())
    assert any(p.grad is not None for p in trainer.policy.parameters())


def test_cli_runs_dfpo_and_the_same_seed_gives_the_same_metrics(tmp_path, cache_dir):
    from tests.test_training import strip_timing

    rows = []
    for out in ("a", "b"):
        args = ["run", "--algos", "dfpo", "--noise", "flip0.2", "--seeds", "1", "--steps", "2",
                "--out", str(tmp_path / out), "--cache-dir", str(cache_dir), "--quiet",
                *fast_args({"dfpo.flow_width": "64"})]
        assert main(args) == 0
        cell = tmp_path / out / "arith" / "dfpo" / "flip0.2" / "seed0"
        assert json.loads((cell / "status.json").read_text())["state"] == "done"
        rows.append(strip_timing(cell / "metrics.jsonl"))
    assert rows[0] == rows[1] and len(rows[0]) == 2
    for key in ("critic/cfm", "critic/anchor", "critic/geo", "critic/risk", "critic/shape", "critic/straightness_gap",
                "critic/value_mc_se", "critic/tail_cap",
                "critic/dist_std", "critic/cvar_lower_gap", "critic/cvar_upper_gap", "critic/explained_var",
                "critic/crps", "critic/coverage_10_90", "actor/kl_ref", "eval/ID_accuracy"):
        assert key in rows[0][1], key
    config = json.loads((tmp_path / "a" / "arith" / "dfpo" / "flip0.2" / "seed0" / "config.json").read_text())
    assert config["algo_options"]["flow_width"] == 64 and config["algo_options"]["weight_mode"] == "value_flows"
