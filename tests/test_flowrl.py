"""FlowRL: the trajectory-balance residual, the importance-weight modes, the log-partition head."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from algorithms.flowrl import LogPartitionHead, flowrl_loss, importance_weight, tb_residual
from harness.config import options_dataclass
from harness.errors import HarnessError


def enumerable_case(length: int, beta: float, seed: int = 0):
    """Every response of `length` tokens over a 3-token vocabulary, with an autoregressive pi_ref,
    a reward per response, and the policy pi = the length-normalised TB optimum
    pi(y) ∝ pi_ref(y) exp(length * beta * r(y)), factored into token log-probs.

    Returns (logp, ref_logp [N, L], rewards [N], log partition sum_y pi_ref(y) exp(length beta r))."""
    gen = torch.Generator().manual_seed(seed)
    seqs = list(itertools.product(range(3), repeat=length))
    # pi_ref(y_t | y_<t): a random softmax per prefix.
    ref_cond = {prefix: torch.log_softmax(torch.randn(3, generator=gen, dtype=torch.float64), -1)
                for n in range(length) for prefix in itertools.product(range(3), repeat=n)}
    ref_logp = torch.tensor([[ref_cond[y[:t]][y[t]] for t in range(length)] for y in seqs], dtype=torch.float64)
    rewards = torch.randn(len(seqs), generator=gen, dtype=torch.float64)
    log_joint = ref_logp.sum(-1) + length * beta * rewards
    log_partition = torch.logsumexp(log_joint, 0)
    log_pi = {y: log_joint[i] - log_partition for i, y in enumerate(seqs)}  # the target's joint

    def log_marginal(prefix):  # log pi(prefix) = log sum over completions
        return torch.logsumexp(torch.stack([v for y, v in log_pi.items() if y[:len(prefix)] == prefix]), 0)

    logp = torch.tensor([[log_marginal(y[:t + 1]) - log_marginal(y[:t]) for t in range(length)] for y in seqs],
                        dtype=torch.float64)
    return logp, ref_logp, rewards, float(log_partition)


@pytest.mark.parametrize("length", [1, 2])
def test_tb_residual_is_zero_at_the_true_log_partition(length):
    beta = 0.7
    logp, ref_logp, rewards, log_partition = enumerable_case(length, beta)
    assert torch.allclose(logp.sum(-1).exp().sum(), torch.tensor(1.0, dtype=torch.float64))  # a distribution
    mask = torch.ones_like(logp)
    # With length normalisation the optimum's log Z is the true log-partition divided by |y|.
    log_z = torch.full((logp.shape[0],), log_partition / length, dtype=torch.float64)
    delta = tb_residual(log_z, logp, ref_logp, rewards, mask, beta)
    assert delta.abs().max() < 1e-12
    # Any other log Z leaves a residual of exactly the offset, for every response.
    assert torch.allclose(tb_residual(log_z + 0.3, logp, ref_logp, rewards, mask, beta), torch.full_like(delta, 0.3))
    # And so does a policy that is not the target.
    assert tb_residual(log_z, ref_logp, ref_logp, rewards, mask, beta).abs().max() > 0.1


def test_tb_residual_masks_padding_and_length_normalises():
    logp = torch.tensor([[-1.0, -3.0, float("nan")]])
    ref = torch.tensor([[-2.0, -2.0, float("inf")]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    delta = tb_residual(torch.tensor([0.5]), logp, ref, torch.tensor([0.1]), mask, beta=15.0)
    assert delta.item() == pytest.approx(0.5 + (-2.0) - 1.5 - (-2.0))


def test_importance_weight_modes_hand_computed():
    # Sequence log-ratios: 0.5 + 0.5 = 1.0 -> w = e; -1.0 -> w = e^-1; 3.0 -> e^3 (padding ignored).
    logp = torch.tensor([[0.5, 0.5, 9.0], [-1.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    old = torch.zeros_like(logp)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    raw = torch.tensor([math.e, math.exp(-1), math.exp(3)])
    w, clipped = importance_weight(logp, old, mask, "none")
    assert torch.allclose(w, raw) and not clipped.any()
    w, clipped = importance_weight(logp, old, mask, "clamp_max10")
    assert torch.allclose(w, torch.tensor([math.e, math.exp(-1), 10.0])) and clipped.tolist() == [False, False, True]
    w, clipped = importance_weight(logp, old, mask, "clip_eps", clip_eps=0.2)
    assert torch.allclose(w, torch.tensor([1.2, 0.8, 1.2])) and clipped.all()
    w, _ = importance_weight(logp, old, mask, "clamp_max10", w_max=2.0)
    assert torch.allclose(w, torch.tensor([2.0, math.exp(-1), 2.0]))
    with pytest.raises(HarnessError, match="valid: clip_eps, clamp_max10, none"):
        importance_weight(logp, old, mask, "bogus")


def test_flowrl_loss_hand_computed_and_weight_is_detached():
    logp = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0], [-2.0, 0.0]])  # sequence 0: log-ratio 0.5
    ref = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]])
    mask = torch.ones(2, 2)
    log_z = torch.tensor([0.2, -0.1], requires_grad=True)
    r_hat = torch.tensor([0.1, -0.1])
    loss, metrics = flowrl_loss(log_z, logp, old, ref, r_hat, mask, beta=2.0, w_mode="none")
    d0 = 0.2 + (-1.0) - 0.2 - (-1.5)  # = 0.5
    d1 = -0.1 + (-1.0) + 0.2 - (-1.0)  # = 0.1
    w0 = math.exp(0.5)
    assert loss.item() == pytest.approx((w0 * d0**2 + d1**2) / 2)
    assert metrics["actor/tb_residual_mean"] == pytest.approx((d0 + d1) / 2)
    assert metrics["actor/tb_residual_sq"] == pytest.approx((d0**2 + d1**2) / 2)
    assert metrics["actor/w_mean"] == pytest.approx((w0 + 1) / 2)
    assert metrics["actor/log_z_mean"] == pytest.approx(0.05)
    loss.backward()
    # d loss / d log_z_i = w_i * delta_i (batch of 2: 2 w d / 2); w contributes no gradient of its own.
    assert torch.allclose(log_z.grad, torch.tensor([w0 * d0, d1]))
    assert torch.allclose(logp.grad, torch.tensor([[w0 * d0 / 2, w0 * d0 / 2], [d1 / 2, d1 / 2]]))


def test_log_partition_head_pools_only_the_prompt_tokens_and_can_detach():
    torch.manual_seed(0)
    head = LogPartitionHead(8, num_layers=3, dropout=0.0).eval()
    hidden = torch.randn(2, 4, 8)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = head(hidden, mask)
    assert out.shape == (2,)
    junk = hidden.clone()
    junk[0, :2] = 1e3  # left padding of row 0
    assert torch.allclose(head(junk, mask), out)
    assert len([m for m in head.net if isinstance(m, torch.nn.Linear)]) == 3  # 2 blocks + output

    h = hidden.clone().requires_grad_(True)
    head(h, mask).sum().backward()
    assert h.grad.abs().sum() > 0 and h.grad[0, :2].abs().sum() == 0
    h = hidden.clone().requires_grad_(True)
    detached = LogPartitionHead(8, dropout=0.0, detach_backbone=True)
    detached(h, mask).sum().backward()
    assert h.grad is None


def test_flowrl_pools_log_z_over_the_prompt_but_its_last_column_as_the_reference_code():
    # The official dp_actor.py pools `full_last_hidden[:, : -response_length - 1]`: the prompt's last
    # column (whose state predicts the first response token) is left out, as is the response.
    from algorithms.base import Batch, PolicyForward
    from algorithms.flowrl import FlowRL, FlowRLOptions

    torch.manual_seed(0)
    algo = FlowRL(FlowRLOptions(z_dropout=0.0))
    heads = torch.nn.ModuleDict(algo.extra_heads(8))
    p, t = 4, 2
    mb = Batch(attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]),
               response_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]), advantages=torch.ones(2, t),
               old_logp=torch.zeros(2, t), ref_logp=torch.zeros(2, t), prompt_len=p)
    hidden = torch.randn(2, p + t, 8)
    fwd = lambda h: PolicyForward(torch.zeros(2, t), torch.zeros(2, t), h)  # noqa: E731
    log_z = algo.actor_loss(mb, fwd(hidden), heads)[1]["actor/log_z_mean"]
    moved = hidden.clone()
    moved[:, p - 1:] += 100.0  # the prompt's last column and the response
    assert algo.actor_loss(mb, fwd(moved), heads)[1]["actor/log_z_mean"] == pytest.approx(log_z)
    expected = heads["log_z"](hidden[:, : p - 1], mb["attention_mask"][:, : p - 1]).mean().item()
    assert log_z == pytest.approx(expected)
    moved[:, p - 2] += 1.0  # an earlier prompt column does count
    assert algo.actor_loss(mb, fwd(moved), heads)[1]["actor/log_z_mean"] != pytest.approx(log_z)


def test_flowrl_options_validate():
    from algorithms.flowrl import FlowRLOptions

    opts = FlowRLOptions()
    assert (opts.beta, opts.w_mode, opts.clip_eps, opts.w_max, opts.z_detach_backbone) == (15.0, "clamp_max10", 0.2, 10.0, False)
    with pytest.raises(HarnessError, match="valid: clip_eps, clamp_max10, none"):
        options_dataclass(FlowRLOptions, {"w_mode": "clip"}, "flowrl")
    with pytest.raises(HarnessError, match="clip_eps"):
        options_dataclass(FlowRLOptions, {"clip_eps": "1.5"}, "flowrl")


def test_flowrl_trainer_wiring(tmp_path, cache_dir):
    from tests.test_training import make_trainer

    trainer = make_trainer("flowrl", tmp_path, cache_dir, **{"flowrl.z_lr_scale": "10"})
    assert trainer.reference is not None and "log_z" in trainer.heads
    # The head is not part of the policy (the rollout weights), and has its own lr group.
    head_ids = {id(p) for p in trainer.heads.parameters()}
    assert not head_ids & {id(p) for p in trainer.policy.parameters()}
    group = next(g for g in trainer.actor_opt.param_groups if {id(p) for p in g["params"]} == head_ids)
    assert group["lr"] == pytest.approx(10 * trainer.cfg.train.lr)
    metrics = trainer.train_step(1)
    for key in ("actor/log_z_mean", "actor/tb_residual_mean", "actor/tb_residual_sq", "actor/w_mean",
                "actor/w_clipfrac", "actor/kl_ref"):
        assert key in metrics, key
