"""The training core: what each algorithm trains, determinism, evaluation records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from algorithms import ALGOS
from harness.cli import main
from harness.grid import run_grid
from harness.resolver import build_cells
from harness.evaluation import pass_at_k
from harness.trainer import Trainer
from tests.conftest import FAST, fast_args


def make_trainer(algo: str, tmp_path: Path, cache_dir: Path, seed: int = 0, noise: str = "none", **extra) -> Trainer:
    cell = build_cells("arith", [algo], noise, [seed], tmp_path, steps=3, overrides={**FAST, **extra})[0]
    cell.path.mkdir(parents=True, exist_ok=True)
    return Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=False)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, bool]:
    return {name: not torch.equal(before[name], p.detach()) for name, p in module.named_parameters()}


@pytest.mark.parametrize("algo", ALGOS.names())
def test_steps_train_exactly_the_intended_parameters(algo, tmp_path, cache_dir):
    # A high learning rate so that every parameter with a gradient visibly moves, and flip0.5 noise
    # so that rewards differ within groups whatever the barely warm-started model answers.
    trainer = make_trainer(algo, tmp_path, cache_dir, noise="flip0.5", **{"train.lr": "1e-2", "train.critic_lr": "1e-2"})
    policy_before = snapshot(trainer.policy)
    ref_before = snapshot(trainer.reference) if trainer.reference is not None else None
    critic_before = snapshot(trainer.critic) if trainer.critic is not None else None
    heads_before = snapshot(trainer.heads)
    for step in (1, 2, 3):
        trainer.train_step(step)

    assert all(changed(policy_before, trainer.policy).values()), "every policy tensor must be trained"
    assert all(changed(heads_before, trainer.heads).values())
    if trainer.reference is not None:
        assert not any(changed(ref_before, trainer.reference).values()), "the reference must stay frozen"
        assert not any(p.requires_grad for p in trainer.reference.parameters())
    if trainer.critic is not None:
        assert all(changed(critic_before, trainer.critic).values()), "every critic tensor must be trained"
        # The actor optimiser never holds critic parameters and vice versa.
        actor_ids = {id(p) for g in trainer.actor_opt.param_groups for p in g["params"]}
        critic_ids = {id(p) for g in trainer.critic_opt.param_groups for p in g["params"]}
        assert not actor_ids & critic_ids
        assert critic_ids == {id(p) for p in trainer.critic.parameters()}


def test_critic_loss_does_not_reach_the_actor_and_actor_loss_not_the_critic(tmp_path, cache_dir):
    from algorithms.base import Batch, PolicyForward
    from harness.rollout import forward_response

    trainer = make_trainer("ppo", tmp_path, cache_dir)
    metrics = trainer.train_step(1)  # fills nothing we need; build a batch by hand below
    assert "critic/vf_loss" in metrics
    t = trainer.cfg.train
    problems = trainer.step_problems(2)
    from harness.rollout import generate

    roll = generate(trainer.policy, [trainer.encode(p) for p in problems], max_new_tokens=t.max_new_tokens,
                    eos_id=trainer.tokenizer.eos_token_id, pad_id=trainer.tokenizer.pad_token_id)
    batch = Batch(input_ids=roll.input_ids, attention_mask=roll.attention_mask, responses=roll.responses,
                  response_mask=roll.response_mask, scores=torch.ones(len(problems)),
                  clean_scores=torch.ones(len(problems)), group_ids=torch.arange(len(problems)),
                  prompt_len=roll.prompt_len)
    with torch.no_grad():
        batch["old_logp"], _, _ = forward_response(trainer.policy, roll.input_ids, roll.attention_mask, roll.prompt_len)
        batch["ref_logp"] = batch["old_logp"].clone()
        batch["old_values"] = trainer.critic(roll.input_ids, roll.attention_mask, roll.prompt_len)
        trainer.algo.advantages(batch)
    trainer.policy.zero_grad(set_to_none=True)
    trainer.critic.zero_grad(set_to_none=True)
    closs, _ = trainer.algo.critic_loss(batch, trainer.critic, torch.Generator().manual_seed(0))
    closs.backward()
    assert all(p.grad is None for p in trainer.policy.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.critic.parameters())
    trainer.critic.zero_grad(set_to_none=True)
    logp, ent, _ = forward_response(trainer.policy, roll.input_ids, roll.attention_mask, roll.prompt_len)
    aloss, _ = trainer.algo.actor_loss(batch, PolicyForward(logp, ent, None), trainer.heads)
    aloss.backward()
    assert all(p.grad is None for p in trainer.critic.parameters())


@pytest.mark.parametrize("backbone", ["separate", "shared"])
def test_critic_backbone_separate_or_shared_with_the_policy(backbone, tmp_path, cache_dir, monkeypatch):
    # Only the critic loss trains (the actor loss is multiplied by 0): a separate critic leaves the
    # policy exactly as it was; a shared one moves the policy's backbone through its head.
    trainer = make_trainer("ppo", tmp_path, cache_dir, noise="flip0.5",
                           **{"train.critic_backbone": backbone, "train.lr": "1e-2", "train.critic_lr": "1e-2"})
    shared = backbone == "shared"
    assert (trainer.critic.backbone is trainer.policy.get_decoder()) == shared
    assert (trainer.critic_opt is None) == shared
    actor_ids = {id(p) for g in trainer.actor_opt.param_groups for p in g["params"]}
    assert ({id(p) for p in trainer.critic.parameters()} <= actor_ids) == shared
    actor_loss = trainer.algo.actor_loss

    def zeroed_actor_loss(*args):
        loss, metrics = actor_loss(*args)
        return 0 * loss, metrics

    monkeypatch.setattr(trainer.algo, "actor_loss", zeroed_actor_loss)
    policy_before, head_before = snapshot(trainer.policy), snapshot(trainer.critic.head)
    metrics = trainer.train_step(1)

    assert metrics["critic/vf_loss"] > 0 and ("critic/grad_norm" in metrics) != shared
    assert all(changed(head_before, trainer.critic.head).values()), "the value head trains either way"
    moved = changed(policy_before, trainer.policy)
    assert any(moved.values()) == shared
    if shared:
        assert all(v for k, v in moved.items() if k.startswith("model.layers.")), "every backbone layer moves"


def test_shared_critic_checkpoint_restores_the_head_and_the_joint_optimiser(tmp_path, cache_dir):
    from harness import checkpoints

    a = make_trainer("ppo", tmp_path, cache_dir, **{"train.critic_backbone": "shared"})
    a.run(ckpt_every=3)
    state = torch.load(checkpoints.checkpoint_dir(a.cell, 3) / "state.pt", weights_only=False)
    assert set(state["critic"]) == {"linear.weight", "linear.bias"}, "the shared backbone is saved once, as the policy"
    assert "critic_opt" not in state
    b = make_trainer("ppo", tmp_path, cache_dir, **{"train.critic_backbone": "shared"})
    assert b.restore_latest() == 3
    assert b.critic.backbone is b.policy.get_decoder()
    for (name, p), q in zip(a.critic.state_dict().items(), b.critic.state_dict().values()):
        assert torch.equal(p, q), name
    assert len(b.actor_opt.state_dict()["state"]) == len(b.actor_params)


def test_bad_critic_backbone_is_a_one_line_error(tmp_path, capsys):
    assert main(["run", "--set", "train.critic_backbone=tied", "--out", str(tmp_path / "r"), *fast_args()]) == 2
    err = capsys.readouterr().err
    assert err == "harness: error: train.critic_backbone must be separate or shared, got 'tied'\n"
    assert not (tmp_path / "r").exists()


def strip_timing(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/"))} for row in rows]


def run_cells(out: Path, cache_dir: Path, seeds: list[int], algo: str = "ppo", noise: str = "flip0.2"):
    cells = build_cells("arith", [algo], noise, seeds, out, steps=3, overrides=FAST)
    counts = run_grid(cells, cache_dir=cache_dir, progress=False)
    assert counts["failed"] == 0
    return cells


def test_same_seed_same_metrics_other_seed_other_metrics(tmp_path, cache_dir):
    a = run_cells(tmp_path / "a", cache_dir, [0])[0]
    b = run_cells(tmp_path / "b", cache_dir, [0])[0]
    c = run_cells(tmp_path / "c", cache_dir, [1])[0]
    rows_a, rows_b, rows_c = (strip_timing(x.path / "metrics.jsonl") for x in (a, b, c))
    assert len(rows_a) == 3
    assert rows_a == rows_b
    assert rows_a != rows_c
    assert strip_timing(a.path / "eval.jsonl") == strip_timing(b.path / "eval.jsonl")


def test_metrics_and_eval_records_carry_the_required_keys(tmp_path, cache_dir):
    cell = run_cells(tmp_path, cache_dir, [0], algo="ppo", noise="flip0.2")[0]
    metrics = [json.loads(line) for line in (cell.path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ("reward/clean_mean", "reward/train_mean", "noise/flip_rate", "actor/kl_ref", "actor/entropy",
                "actor/clipfrac", "actor/grad_norm", "critic/explained_var", "response/length_mean",
                "time/rollout", "time/update", "throughput/tokens_per_s"):
        assert key in metrics[0], key
    assert "eval/ID_accuracy" in metrics[1] and "eval/ID_accuracy" not in metrics[0]
    evals = [json.loads(line) for line in (cell.path / "eval.jsonl").read_text().splitlines()]
    assert sorted({e["step"] for e in evals}) == [0, 2, 3]  # before training, every 2 steps, at the end
    assert {e["role"] for e in evals} == {"ID", "OOD"}
    for e in evals:
        assert {"step", "benchmark", "role", "metric", "value", "temperature", "top_p", "k", "grader", "seed"} <= set(e)
        assert 0.0 <= e["value"] <= 1.0
    config = json.loads((cell.path / "config.json").read_text())
    assert config["algo_options"]["lam"] == 0.95 and config["train"]["steps"] == 3
    assert json.loads((cell.path / "status.json").read_text())["state"] == "done"


def test_sampled_evaluation_reports_avg_and_unbiased_pass_at_k(tmp_path, cache_dir):
    trainer = make_trainer("grpo", tmp_path, cache_dir, **{"eval.temperature": "1.0", "eval.k": "4", "eval.limit": "5"})
    rows = trainer.evaluate(0)
    metrics = {(r["benchmark"], r["metric"]) for r in rows}
    assert ("arith_id", "avg@4") in metrics and ("arith_id", "pass@4") in metrics
    by = {(r["benchmark"], r["metric"]): r["value"] for r in rows}
    assert by[("arith_id", "pass@4")] >= by[("arith_id", "avg@4")]
    assert all(r["n_problems"] == 5 for r in rows)


def test_pass_at_k_matches_hand_computed_values():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(3, 2, 2) == 1.0


def test_tiny_model_scales_down_the_flow_head_unless_the_user_sets_it(tmp_path):
    [cell] = build_cells("arith", ["dfpo"], "none", [0], tmp_path, steps=1)
    assert cell.cfg.algo_options.flow_width == 64
    [cell] = build_cells("arith", ["dfpo"], "none", [0], tmp_path, steps=1, overrides={"dfpo.flow_width": "256"})
    assert cell.cfg.algo_options.flow_width == 256
    [cell] = build_cells("arith", ["dfpo"], "none", [0], tmp_path, steps=1, model="some/real-model")
    assert cell.cfg.algo_options.flow_width == 1024  # the spec's default for real models
