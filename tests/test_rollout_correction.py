"""Sampler/trainer mismatch: the metrics and the truncated / masked importance-sampling corrections
(algorithms.common.rollout_mismatch, rollout_correction), by hand, and in a cell whose sampler is
deliberately off (another temperature, another dtype)."""
from __future__ import annotations

import math

import pytest
import torch

from algorithms.common import clip_policy_loss, rollout_correction, rollout_mismatch
from harness.errors import HarnessError
from harness.resolver import build_cells
from harness.trainer import Trainer
from tests.conftest import FAST

# Two sequences: token ratios pi_trainer / pi_sampler of 1/4, 1, 4 and 3, 3 (the last column padding,
# holding nan, which must not leak).
RATIOS = [[0.25, 1.0, 4.0], [3.0, 3.0, float("nan")]]
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def logps():
    rollout = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, float("nan")]])
    return rollout + torch.tensor(RATIOS).log(), rollout


def close(actual: torch.Tensor, expected: list[list[float]]) -> bool:
    return torch.allclose(actual, torch.tensor(expected), atol=1e-6)


def test_mismatch_metrics_by_hand():
    logp, rollout = logps()
    m = rollout_mismatch(logp, rollout, MASK)
    assert m["rollout/mismatch_kl"] == pytest.approx(-2 * math.log(3) / 5, abs=1e-6)  # mean(log q - log p)
    assert m["rollout/ratio_mean"] == pytest.approx(11.25 / 5, abs=1e-6)
    assert m["rollout/ratio_max"] == pytest.approx(4.0) and m["rollout/ratio_min"] == pytest.approx(0.25)
    k3 = [r - 1 - math.log(r) for r in (0.25, 1.0, 4.0, 3.0, 3.0)]  # r - 1 - log r per token
    assert m["rollout/mismatch_k3"] == pytest.approx(sum(k3) / 5, abs=1e-6)


def test_truncated_importance_sampling_by_hand():
    logp, rollout = logps()
    w, m = rollout_correction(logp, rollout, MASK, "token-tis", cap=2.0)
    assert close(w, [[0.25, 1.0, 2.0], [2.0, 2.0, 0.0]])
    assert m["rollout/truncated_frac"] == pytest.approx(3 / 5) and m["rollout/masked_frac"] == 0.0
    assert m["rollout/weight_mean"] == pytest.approx(7.25 / 5)
    w, m = rollout_correction(logp, rollout, MASK, "seq-tis", cap=2.0)  # R = 1/4 * 1 * 4 = 1; 3 * 3 = 9 -> 2
    assert close(w, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])
    assert m["rollout/truncated_frac"] == pytest.approx(2 / 5)


def test_masked_importance_sampling_by_hand():
    logp, rollout = logps()
    w, m = rollout_correction(logp, rollout, MASK, "token-mask", low=0.5, high=3.5)  # 1/4 and 4 outside
    assert close(w, [[0.0, 1.0, 0.0], [3.0, 3.0, 0.0]])
    assert m["rollout/masked_frac"] == pytest.approx(2 / 5)
    # geometric means 1 and 3: the second sequence is outside [0.5, 2.5], the first kept with token TIS
    w, m = rollout_correction(logp, rollout, MASK, "seq-mask", cap=2.0, low=0.5, high=2.5)
    assert close(w, [[0.25, 1.0, 2.0], [0.0, 0.0, 0.0]])
    assert m["rollout/masked_frac"] == pytest.approx(2 / 5) and m["rollout/truncated_frac"] == pytest.approx(1 / 5)
    w, _ = rollout_correction(logp, rollout, MASK, "off")
    assert close(w, [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    with pytest.raises(HarnessError, match="unknown rollout correction 'tis'"):
        rollout_correction(logp, rollout, MASK, "tis")


def test_weights_multiply_the_per_token_policy_loss():
    logp = torch.zeros(1, 2, requires_grad=True)  # ratio 1: per-token loss -A = -1
    loss, _ = clip_policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2),
                               weights=torch.tensor([[0.5, 2.0]]))
    assert loss.item() == pytest.approx(-(0.5 + 2.0) / 2)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-0.25, -1.0]]))  # d(-w r / 2)/dlogp = -w / 2


def cell(tmp_path, algo="grpo", **overrides):
    c = build_cells("arith", [algo], "flip0.3", [0], tmp_path, steps=2, overrides={**FAST, **overrides})[0]
    c.path.mkdir(parents=True, exist_ok=True)
    return c


def off_sampler(trainer: Trainer, temperature: float) -> None:
    """The sampler samples (and reports log-probs) at another temperature than the trainer scores at."""
    rollout = trainer.rollout
    trainer.rollout = lambda prompts, **kw: rollout(prompts, **{**kw, "temperature": temperature})


def step_metrics(tmp_path, cache_dir, temperature: float | None = None, **overrides) -> dict:
    c = cell(tmp_path, **overrides)
    trainer = Trainer(c.cfg, c.path, cache_dir=cache_dir, progress=False)
    if temperature is not None:
        off_sampler(trainer, temperature)
    return trainer.train_step(1)


def test_every_step_logs_the_mismatch_and_an_exact_sampler_has_none(tmp_path, cache_dir):
    exact = step_metrics(tmp_path / "exact", cache_dir, **{"train.old_logp": "recompute"})
    assert abs(exact["rollout/mismatch_kl"]) < 1e-5 and exact["rollout/ratio_max"] < 1.0001
    default = step_metrics(tmp_path / "default", cache_dir)  # old_logp=rollout: on the first minibatch's rows
    assert abs(default["rollout/mismatch_kl"]) < 1e-5 and "rollout/weight_mean" not in default


def test_a_sampler_at_another_temperature_is_measured_and_corrected(tmp_path, cache_dir):
    off = step_metrics(tmp_path / "off", cache_dir, temperature=2.0, **{"train.old_logp": "recompute"})
    assert off["rollout/mismatch_k3"] > 0.05 and off["rollout/ratio_max"] > 1.5
    masked = step_metrics(tmp_path / "mask", cache_dir, temperature=2.0, **{"train.rollout_correction": "token-mask",
                                                                          "train.rollout_mask_high": "1.5"})
    assert masked["rollout/mismatch_k3"] == pytest.approx(off["rollout/mismatch_k3"])  # same draws, same models
    assert 0 < masked["rollout/masked_frac"] < 1
    assert masked["actor/pg_loss"] != off["actor/pg_loss"]
    tis = step_metrics(tmp_path / "tis", cache_dir, temperature=2.0, **{"train.rollout_correction": "token-tis",
                                                                       "train.rollout_is_cap": "1.2"})
    assert tis["rollout/truncated_frac"] > 0 and tis["rollout/masked_frac"] == 0


def test_a_bfloat16_sampler_shows_a_small_mismatch(tmp_path, cache_dir):
    bf16 = step_metrics(tmp_path, cache_dir, **{"model.dtype": "bfloat16"})  # bf16 sampler, float32 trainer
    assert 0 < bf16["rollout/mismatch_k3"] < 0.05


def test_rollout_correction_options_are_checked(tmp_path):
    with pytest.raises(HarnessError, match="train.rollout_correction must be one of off, token-tis"):
        cell(tmp_path, **{"train.rollout_correction": "tis"})
    with pytest.raises(HarnessError, match="needs train.old_logp=recompute or auto"):
        cell(tmp_path, **{"train.rollout_correction": "seq-tis", "train.old_logp": "rollout"})
    with pytest.raises(HarnessError, match="flowrl's actor loss takes no per-token importance weights"):
        cell(tmp_path, "flowrl", **{"train.rollout_correction": "seq-tis"})
    with pytest.raises(HarnessError, match="train.rollout_is_cap must be >= 1"):
        cell(tmp_path, **{"train.rollout_is_cap": "0.5"})
    with pytest.raises(HarnessError, match="train.rollout_correction with train.rollout=vllm needs train.top_p=1"):
        cell(tmp_path, **{"train.rollout": "vllm", "train.top_p": "0.9", "train.rollout_correction": "token-tis"})
    assert cell(tmp_path, **{"train.rollout_correction": "seq-mask"}).cfg.train.old_logp == "recompute"
