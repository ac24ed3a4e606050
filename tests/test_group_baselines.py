"""RLOO, REINFORCE++, the GRPO variants (Dr. GRPO, DAPO), dynamic sampling, and the CLI for the new algorithms."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from algorithms import ALGOS
from algorithms.base import Batch, informative_groups
from algorithms.grpo import GRPO, GRPOOptions, overlong_penalty
from algorithms.reinforce import leave_one_out_advantages, reward_to_go
from harness.cli import main
from harness.errors import HarnessError
from harness.resolver import build_cells
from harness.rollout import Rollout, merge_rollouts
from tests.conftest import fast_args


def test_leave_one_out_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 2.0])
    groups = torch.tensor([7, 7, 7, 3, 3, 9])
    # group 7: 1 - (0+0)/2 = 1, 0 - (1+0)/2 = -0.5 (twice); group 3: 1 - 5 = -4, 5 - 1 = 4; group 9 alone: 0.
    assert leave_one_out_advantages(rewards, groups).tolist() == [1.0, -0.5, -0.5, -4.0, 4.0, 0.0]


def test_rloo_kl_enters_the_sequence_reward_before_the_baseline():
    algo = ALGOS.get("rloo")(ALGOS.get("rloo").Options(kl_coef=0.5))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    batch = Batch(scores=torch.tensor([1.0, 1.0]), group_ids=torch.tensor([0, 0]), response_mask=mask,
                  old_logp=torch.tensor([[-1.0, -1.0], [-1.0, 9.0]]), ref_logp=torch.tensor([[-2.0, -2.0], [-1.0, 0.0]]))
    algo.advantages(batch)
    # Sequence k1 KL: 2 and 0 (padding ignored) -> rewards 1 - 1 = 0 and 1; LOO: -1 and +1 on valid tokens.
    assert batch["advantages"].tolist() == [[-1.0, -1.0], [1.0, 0.0]]


def test_reward_to_go_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert reward_to_go(rewards, mask).tolist() == [[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]]
    assert reward_to_go(rewards, mask, gamma=0.5).tolist() == [[1 + 1 + 0.75, 2 + 1.5, 3.0], [6.5, 5.0, 0.0]]


def reinforce_pp_batch():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0]])
    ref = old - torch.tensor([[0.5, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])  # k1 KL per token
    return Batch(scores=torch.tensor([1.0, 0.0, 1.0, 1.0]), group_ids=torch.tensor([0, 0, 1, 1]),
                 response_mask=mask, old_logp=old, ref_logp=ref)


def whiten(values: list[float]) -> list[float]:
    x = torch.tensor(values)
    return ((x - x.mean()) / x.std()).tolist()


def test_reinforce_pp_advantages_hand_computed():
    cls = ALGOS.get("reinforce_pp")
    plain = cls(cls.Options(kl_coef=0.1, group_baseline=False))
    batch = reinforce_pp_batch()
    plain.advantages(batch)
    # Token rewards: seq0 [-0.05, 1 - 0.1], seq1 [0 - 0.1], seq2 [0, 1], seq3 [0, 1]; returns (gamma 1):
    returns = [0.85, 0.9, -0.1, 1.0, 1.0, 1.0, 1.0]
    valid = batch["response_mask"].bool()
    assert torch.allclose(batch["advantages"][valid], torch.tensor(whiten(returns)), atol=1e-5)
    assert batch["advantages"][1, 1] == 0

    baseline = cls(cls.Options(kl_coef=0.1))  # default: group mean subtracted first
    batch = reinforce_pp_batch()
    baseline.advantages(batch)
    # Scores minus group mean: 0.5, -0.5, 0, 0.
    returns = [0.35, 0.4, -0.6, 0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(batch["advantages"][valid], torch.tensor(whiten(returns)), atol=1e-5)


def test_overlong_penalty_hand_computed():
    lengths = torch.tensor([4, 6, 7, 8, 9])
    # L_max 8, L_cache 4: no penalty up to 4, then (L - 4) / 4, capped at 1.
    assert overlong_penalty(lengths, 8, 4).tolist() == [0.0, -0.5, -0.75, -1.0, -1.0]
    assert overlong_penalty(lengths, 8, 4, factor=2.0).tolist() == [0.0, -1.0, -1.5, -2.0, -2.0]


def resolved(algo: str, overrides: dict | None = None) -> dict:
    """A cell's algorithm options as its config.json has them."""
    return dataclasses.asdict(build_cells("arith", [algo], "none", [0], "/tmp/unused", overrides=overrides)[0].cfg.algo_options)


def test_variants_are_grpo_with_other_defaults():
    grpo, drgrpo, dapo = resolved("grpo"), resolved("drgrpo"), resolved("dapo")
    assert set(grpo) == set(drgrpo) == set(dapo)
    assert {k: v for k, v in drgrpo.items() if grpo[k] != v} == {
        "adv_scale": "none", "agg_mode": "seq-mean-token-sum-norm", "kl_mode": "none", "kl_coef": 0.0}
    assert {k: v for k, v in dapo.items() if grpo[k] != v} == {
        "clip_high": 0.28, "agg_mode": "token-mean", "kl_mode": "none", "kl_coef": 0.0, "dynamic_sampling": True}
    assert grpo["dynamic_sampling"] is False and grpo["overlong_buffer_len"] == 0
    for name in ("drgrpo", "dapo"):
        cls = ALGOS.get(name)
        assert issubclass(cls, GRPO) and issubclass(cls.Options, GRPOOptions) and cls.name == name
        assert not cls(cls.Options()).needs_reference()
    assert resolved("dapo", {"dapo.clip_high": "0.3", "dapo.max_extra_rounds": "0"})["clip_high"] == 0.3
    with pytest.raises(HarnessError, match="overlong_max_len"):
        resolved("dapo", {"dapo.overlong_buffer_len": "4"})
    assert ALGOS.get("dapo")(ALGOS.get("dapo").Options()).keep_groups(torch.zeros(2, 3)) is not None
    assert ALGOS.get("grpo")(GRPOOptions()).keep_groups(torch.zeros(2, 3)) is None


def test_drgrpo_divides_the_token_sum_by_the_generation_limit():
    from algorithms.base import PolicyForward

    # C is resolved per cell from train.max_new_tokens (0 stands for it), unless set.
    assert resolved("drgrpo", {"train.max_new_tokens": "5"})["agg_norm_const"] == 5
    assert resolved("drgrpo", {"train.max_new_tokens": "5", "drgrpo.agg_norm_const": "9"})["agg_norm_const"] == 9
    with pytest.raises(HarnessError, match="agg_norm_const must be >= 0"):
        resolved("drgrpo", {"drgrpo.agg_norm_const": "-1"})
    # ratio 1, so the per-token loss is -A: [[-1, -1, pad], [2, 2, 2]]; masked sum 4, over C = 5
    # (not over the batch's padded length T = 3, which changes with the longest response).
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    mb = Batch(old_logp=torch.zeros(2, 3), advantages=torch.tensor([[1.0] * 3, [-2.0] * 3]), response_mask=mask)
    fwd = PolicyForward(torch.zeros(2, 3), torch.zeros(2, 3), None)
    opts = GRPOOptions(agg_mode="seq-mean-token-sum-norm", kl_mode="none", agg_norm_const=5)
    assert GRPO(opts).actor_loss(mb, fwd, None)[0].item() == pytest.approx(4 / 5)
    opts.agg_norm_const = 0  # unresolved: the tensor's width, as before
    assert GRPO(opts).actor_loss(mb, fwd, None)[0].item() == pytest.approx(4 / 3)


def test_informative_groups():
    scores = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.25]])
    assert informative_groups(scores).tolist() == [False, True, False, True]


def test_merge_rollouts_repads_prompts_and_responses():
    a = Rollout(input_ids=torch.tensor([[0, 5, 6, 7], [8, 9, 1, 0]]), attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]),
                prompt_len=2, responses=torch.tensor([[6, 7], [1, 0]]), response_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
                logp=torch.tensor([[-0.5, -0.25], [-2.0, 0.0]]))
    b = Rollout(input_ids=torch.tensor([[4, 3]]), attention_mask=torch.tensor([[1, 1]]), prompt_len=1,
                responses=torch.tensor([[3]]), response_mask=torch.tensor([[1.0]]), logp=torch.tensor([[-1.5]]))
    m = merge_rollouts([(a, torch.tensor([1])), (b, torch.tensor([0]))], pad_id=0)
    assert m.prompt_len == 2
    assert m.input_ids.tolist() == [[8, 9, 1, 0], [0, 4, 3, 0]]
    assert m.attention_mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 0]]
    assert m.responses.tolist() == [[1, 0], [3, 0]]
    assert m.response_mask.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert m.logp.tolist() == [[-2.0, 0.0], [-1.5, 0.0]]  # the sampler's log-probs follow their rows


def test_dynamic_sampling_keeps_only_informative_groups_and_is_deterministic(tmp_path, cache_dir):
    from tests.test_training import make_trainer

    def run(path):
        trainer = make_trainer("dapo", path, cache_dir, noise="flip0.3", **{"train.prompts_per_step": "4",
                                                                            "train.group_size": "3"})
        seen = []
        advantages = trainer.algo.advantages

        def spy(batch):
            seen.append((batch["scores"].clone(), batch["group_ids"].clone(), batch["input_ids"].clone()))
            return advantages(batch)

        trainer.algo.advantages = spy
        metrics = [trainer.train_step(step) for step in (1, 2)]
        return seen, metrics

    seen, metrics = run(tmp_path / "a")
    for (scores, group_ids, _), m in zip(seen, metrics):
        assert m["sampling/groups_kept"] == scores.numel() // 3 and m["sampling/groups_drawn"] == 4 * m["sampling/rounds"]
        assert 0 < m["sampling/groups_kept"] <= 4
        assert informative_groups(scores.view(-1, 3)).all(), "an uninformative group was kept"
        assert group_ids.tolist() == torch.arange(scores.numel() // 3).repeat_interleave(3).tolist()
    assert any(m["sampling/rounds"] > 1 for m in metrics), "the case should need extra rounds"
    again, metrics_again = run(tmp_path / "b")
    strip = [{k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))} for m in metrics]
    assert strip == [{k: v for k, v in m.items() if not k.startswith(("time/", "throughput/"))} for m in metrics_again]
    for (s1, g1, i1), (s2, g2, i2) in zip(seen, again):
        assert torch.equal(s1, s2) and torch.equal(i1, i2)


@pytest.mark.parametrize("algo", ["flowrl", "rloo", "reinforce_pp", "drgrpo", "dapo"])
def test_new_algorithms_run_through_the_cli(algo, tmp_path, cache_dir):
    out = tmp_path / "runs"
    args = ["run", "--algos", algo, "--noise", "flip0.2", "--seeds", "1", "--steps", "2", "--out", str(out),
            "--cache-dir", str(cache_dir), "--quiet", *fast_args()]
    assert main(args) == 0
    cell = out / "arith" / algo / "flip0.2" / "seed0"
    assert json.loads((cell / "status.json").read_text())["state"] == "done"
    rows = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["actor/grad_norm"])) for r in rows)
    assert json.loads((cell / "config.json").read_text())["algo_options"] == resolved(algo)


def test_list_algos_names_each_with_description_and_paper(capsys):
    assert main(["list", "algos"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert sorted(lines) == ALGOS.names()
    for name in ALGOS.names():
        assert ALGOS.get(name).description in lines[name] and "arXiv" in lines[name]
