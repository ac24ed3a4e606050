"""Learning happens where it should: each algorithm raises the clean reward of a two-answer bandit.

The suite's warm start writes half of the targets as "7" and half as "8"; the grader rewards "7".
From a ~50% start, every registered algorithm must push the sampled reward well above it within a
few dozen steps, and must not with the reward signal removed (flip0.5 makes rewards pure noise).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from algorithms import ALGOS
from harness.resolver import build_cells
from harness.seeding import uniform
from harness.trainer import Trainer
from tasks.base import SUITES, Benchmark, Problem, Suite


@dataclass
class BanditOptions:
    n_prompts: int = field(default=8, metadata={"doc": "number of training prompts"})


@SUITES.register("unit-bandit")
class BanditSuite(Suite):
    name = "unit-bandit"
    description = "test-only: answer 7 is rewarded, the warm start says 7 or 8 equally often"
    Options = BanditOptions

    def train_problems(self):
        return [Problem(id=f"q{i}", prompt=f"q{i}?", answer="7") for i in range(self.options.n_prompts)]

    def eval_benchmarks(self):
        return [Benchmark("bandit", "ID", self.train_problems(), "exact_match-v1")]

    def sft_target(self, problem):
        return "7" if uniform(self.seed, "bandit", problem.id) < 0.5 else "8"

    def grade(self, response, problem):
        return float(response.strip() == "7")


SETTINGS = {
    "model.warmstart_steps": "60", "train.prompts_per_step": "8", "train.group_size": "4",
    "train.max_new_tokens": "3", "train.lr": "2e-3", "train.critic_lr": "2e-3", "train.eval_every": "100",
}


def mean_reward(algo: str, noise: str, tmp_path, cache_dir, steps: int = 30) -> tuple[float, float]:
    cell = build_cells("unit-bandit", [algo], noise, [0], tmp_path, steps=steps, overrides=SETTINGS)[0]
    cell.path.mkdir(parents=True)
    trainer = Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=False)
    rewards = [trainer.train_step(step)["reward/clean_mean"] for step in range(1, steps + 1)]
    # Step 1's rollout precedes every update: the warm start's reward. (A mean over the first
    # steps would already include learning, and a fast learner such as DAPO could never clear it.)
    return rewards[0], sum(rewards[-5:]) / 5


@pytest.mark.parametrize("algo", ALGOS.names())
def test_clean_reward_is_learned(algo, tmp_path, cache_dir):
    first, last = mean_reward(algo, "none", tmp_path, cache_dir)
    assert 0.2 < first < 0.8, f"the warm start should answer 7 about half the time, got {first:.2f}"
    assert last > max(first + 0.25, 0.8), f"{algo}: clean reward went {first:.2f} -> {last:.2f}"


def test_pure_noise_reward_teaches_nothing(tmp_path, cache_dir):
    first, last = mean_reward("grpo", "flip0.5", tmp_path, cache_dir)
    assert last < 0.8, f"flip0.5 carries no signal, yet the reward went {first:.2f} -> {last:.2f}"
