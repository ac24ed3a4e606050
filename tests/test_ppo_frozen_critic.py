"""ppo_frozen_critic: PPO whose critic stays at its zero initialisation (the critic's control)."""
import pytest
import torch

from algorithms import ALGOS
from algorithms.base import Batch
from algorithms.critics import ScalarHead
from algorithms.ppo import PPOOptions
from harness.resolver import build_cells


def batch(scores, mask):
    B, T = mask.shape
    return Batch(scores=torch.tensor(scores), clean_scores=torch.tensor(scores), group_ids=torch.arange(B),
                 response_mask=mask, old_logp=torch.zeros(B, T), ref_logp=torch.zeros(B, T), prompt_len=2)


def test_advantages_are_gae_on_zero_values_by_hand():
    """Outcome reward 1 on the last of 3 tokens, no KL, gamma 1, lam 0.95, no whitening:
    A = (0.95^2, 0.95, 1), and the returns R = A + V are the same lambda-returns."""
    algo = ALGOS.get("ppo_frozen_critic")(PPOOptions(kl_coef=0.0, whiten_advantages=False))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    b = batch([1.0, 0.0], mask)
    algo.advantages(b)
    assert b["advantages"].flatten().tolist() == pytest.approx([0.9025, 0.95, 1.0, 0.0, 0.0, 0.0])
    assert torch.equal(b["returns"], b["advantages"])


def test_it_is_ppo_with_the_critic_it_starts_with():
    """PPO's head is zero at initialisation, so PPO's first advantages are the frozen variant's."""
    hidden = torch.randn(2, 3, 16)
    assert torch.equal(ScalarHead(16)(hidden), torch.zeros(2, 3))
    opts = PPOOptions(kl_coef=0.05)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    frozen, ppo = batch([1.0, 0.0], mask), batch([1.0, 0.0], mask)
    frozen["ref_logp"] = ppo["ref_logp"] = torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.5, 0.0]])
    ppo["old_values"] = torch.zeros(2, 3)
    ALGOS.get("ppo_frozen_critic")(opts).advantages(frozen)
    ALGOS.get("ppo")(opts).advantages(ppo)
    assert torch.allclose(frozen["advantages"], ppo["advantages"]) and torch.allclose(frozen["returns"], ppo["returns"])


def test_it_has_no_critic_and_takes_ppos_options(tmp_path):
    cls = ALGOS.get("ppo_frozen_critic")
    assert cls.critic == "none" and ALGOS.get("ppo").critic == "scalar" and cls.Options is PPOOptions
    [cell] = build_cells("arith", ["ppo_frozen_critic"], "none", [0], tmp_path, steps=1,
                         overrides={"ppo_frozen_critic.lam": "0.9"})
    assert cell.cfg.algo_options.lam == 0.9
