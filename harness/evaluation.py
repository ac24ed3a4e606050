"""ID/OOD evaluation with the suites' clean graders: `PolicyEvaluator`, the component the trainer
holds for training-time evaluation and `harness eval` (`harness.model_eval`) uses for any model
alone: the same prompt templates, decoding protocol and graders, rows in the `eval.jsonl` schema.

A row's primary metric is `accuracy` (one sample per problem) or `avg@k` (k > 1 samples; the row of
`pass@k` beside it is not a score): `primary_metric` names it, `is_primary` recognises it, for the
trainer, `harness eval` and the reports alike.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from harness.config import RunConfig
from harness.metrics import primary_metric
from harness.rollout import PerRow
from harness.seeding import torch_generator
from tasks.base import Benchmark, Problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


class PolicyEvaluator:
    """Clean-grader evaluation of a policy, sampled through `rollout` (prompts -> `Rollout`, e.g. a
    partial of `harness.rollout.generate`), on `benchmarks`. The trainer holds one (`Trainer.evaluator`),
    `harness eval` another (`harness.model_eval.ModelEvaluation`). `eval_responses`: a list that
    collects every graded response, or None. The prompt cache also serves the trainer's prompts."""

    def __init__(self, cfg: RunConfig, suite: Any, tokenizer: Any, rollout: Callable[..., Any],
                 benchmarks: list[Benchmark], eval_responses: list[dict[str, Any]] | None = None):
        self.cfg = cfg
        self.suite = suite
        self.tokenizer = tokenizer
        self.rollout = rollout
        self.benchmarks = benchmarks
        self.eval_responses = eval_responses
        self.prompt_cache: dict[str, list[int]] = {}

    def encode(self, problem: Problem) -> list[int]:
        if problem.id not in self.prompt_cache:
            text = self.suite.format_prompt(problem, self.tokenizer)
            self.prompt_cache[problem.id] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.prompt_cache[problem.id]

    def decode(self, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
        lengths = mask.sum(-1).long().tolist()  # one tolist for the whole batch: per-row ones cost ~1 ms a step
        return [self.tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(responses.tolist(), lengths)]

    @torch.no_grad()
    def evaluate(self, step: int) -> list[dict[str, Any]]:
        """Clean-grader evaluation of every benchmark; one row per (benchmark, metric)."""
        e, t = self.cfg.eval, self.cfg.train
        max_new = e.max_new_tokens or t.max_new_tokens
        rows = []
        for bench in self.benchmarks:
            problems = bench.problems[: e.limit] if e.limit else bench.problems
            correct = self.eval_correct(bench, problems, step, max_new)
            decoding = {"temperature": e.temperature, "top_p": e.top_p, "k": e.k, "max_new_tokens": max_new,
                        "greedy": e.temperature == 0}
            base = {"step": step, "benchmark": bench.name, "role": bench.role, "n_problems": len(problems),
                    "grader": bench.grader, "prompt_template": self.prompt_template_id(bench), "seed": self.cfg.seed,
                    "ceiling": sum(p.meta.get("ceiling", 1.0) for p in problems) / len(problems),
                    **decoding}
            if e.k == 1:
                rows.append({**base, "metric": primary_metric(e.k), "value": sum(c[0] for c in correct) / len(problems)})
            else:
                rows.append({**base, "metric": primary_metric(e.k),
                             "value": sum(sum(c) / e.k for c in correct) / len(problems)})
                rows.append({**base, "metric": f"pass@{e.k}",
                             "value": sum(pass_at_k(e.k, sum(c), e.k) for c in correct) / len(problems)})
        return rows

    def eval_correct(self, bench: Benchmark, problems: list[Problem], step: int, max_new: int) -> list[list[int]]:
        """Grades `[problem][sample]` of k samples per problem. Sample j of a problem draws from its own
        stream (seed, "eval", eval.sample_seed, step, benchmark, problem id, j): a problem's samples do
        not depend on the batch they were generated in, nor on the other problems or the worker."""
        e = self.cfg.eval
        repeated = [(p, j) for p in problems for j in range(e.k)]
        grades: list[int] = []
        for start in range(0, len(repeated), e.batch_size):
            chunk = [p for p, _ in repeated[start:start + e.batch_size]]
            gen = None if e.temperature == 0 else PerRow([
                torch_generator(self.cfg.seed, "eval", e.sample_seed, step, bench.name, p.id, j)
                for p, j in repeated[start:start + e.batch_size]])
            roll = self.rollout([self.encode(p) for p in chunk], max_new_tokens=max_new,
                            eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                            temperature=e.temperature, top_p=e.top_p, generator=gen)
            texts = self.decode(roll.responses, roll.response_mask)
            grades += [int(self.suite.grade(text, p) >= 1.0) for text, p in zip(texts, chunk)]
            if self.eval_responses is not None:
                self.eval_responses += [{"step": step, "benchmark": bench.name, "role": bench.role, "problem": p.id,
                                         "response": text, "score": g} for text, p, g in zip(texts, chunk, grades[start:])]
        return [grades[i * e.k:(i + 1) * e.k] for i in range(len(problems))]

    def prompt_template_id(self, bench: Benchmark) -> str:
        """The benchmark's template id (if it has one) and whether the chat template wrapped it."""
        wrap = "chat" if getattr(self.tokenizer, "chat_template", None) else "raw"
        return f"{bench.template}/{wrap}" if bench.template else wrap
