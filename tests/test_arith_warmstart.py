"""The testbeds' warm starts, at their real configuration, for several seeds: bands and properties
that hold whatever the CPU's float summation order, never one machine's numbers.

- `arith`: the warm start writes half its targets as `is <n>`, which the verifier rejects; which
  style the greedy answer of a problem takes is a near coin flip that float rounding tips (the
  same seeds scored 7.5-25 % graded accuracy on machines of one kind), so the graded score is not
  a stable property. What is: nearly every answer is in one of the two trained styles, the number
  is right in a band of problems, and the graded score lies between 0 and that.
- `chain`: sampled at temperature 1 the warm start reproduces its data's per-step error rate, so
  its avg@k score is pinned by the data's error rates, not by rounding: format >= 95 %, ID 15-40 %,
  OOD >= 5 %.

Slow: it trains the real warm starts (1500 steps each for arith, 3000 for chain)."""
from __future__ import annotations

import re

import pytest

from harness.model_eval import ModelEvaluation
from harness.resolver import eval_config

ARITH_CONTENT_BAND = (0.25, 0.80)


def evaluate(suite: str, seed: int, cache_dir, **overrides):
    cfg, _ = eval_config("tiny", suite, overrides, seed=seed)
    evaluation = ModelEvaluation(cfg, cache_dir)
    rows = evaluation.evaluate(0)
    return evaluation, rows


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_arith_warm_start_answers_in_a_trained_style_with_the_number_right_in_a_band(seed, cache_dir):
    evaluation, rows = evaluate("arith", seed, cache_dir)
    problems = {p.id: p for b in evaluation.benchmarks for p in b.problems}
    responses = [r for r in evaluation.eval_responses if r["benchmark"] == "arith_id"]
    styled = [re.fullmatch(r"(is )?(-?\d+)", r["response"].strip()) for r in responses]
    assert sum(m is not None for m in styled) / len(responses) >= 0.9
    content = sum(m is not None and m.group(2) == problems[r["problem"]].answer
                  for m, r in zip(styled, responses)) / len(responses)
    graded = next(r["value"] for r in rows if r["benchmark"] == "arith_id")
    assert ARITH_CONTENT_BAND[0] <= content <= ARITH_CONTENT_BAND[1], content
    assert 0 < graded <= content


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_chain_warm_start_is_in_format_and_in_its_band(seed, cache_dir):
    evaluation, rows = evaluate("chain", seed, cache_dir)
    assert evaluation.cfg.eval.k == 8 and evaluation.cfg.eval.temperature == 1.0  # the suite's defaults
    suite = evaluation.suite
    problems = {p.id: p for b in evaluation.benchmarks for p in b.problems}
    id_responses = [r for r in evaluation.eval_responses if r["benchmark"] == "chain_id"]
    in_format = sum(suite.in_format(r["response"], problems[r["problem"]]) for r in id_responses) / len(id_responses)
    score = {r["benchmark"]: r["value"] for r in rows if r["metric"] == "avg@8"}
    assert in_format >= 0.95, in_format
    assert 0.15 <= score["chain_id"] <= 0.40, score
    assert score["chain_ood"] >= 0.05, score
    # Each row records its problems' ceiling: a hidden-addend problem can only be guessed (1 in 10).
    ceiling = {r["benchmark"]: r["ceiling"] for r in rows if r["metric"] == "avg@8"}
    hidden = [p for p in evaluation.benchmarks[0].problems if "hidden" in p.meta]
    assert ceiling["chain_ood"] == 1.0 and hidden
    assert ceiling["chain_id"] == pytest.approx(1 - 0.9 * len(hidden) / len(evaluation.benchmarks[0].problems))
    # The warm start guesses a hidden addend: it gets those problems right about 1 time in 10 at best.
    hidden_ids = {p.id for p in hidden}
    guessed = [r["score"] for r in id_responses if r["problem"] in hidden_ids]
    assert sum(guessed) / len(guessed) <= 0.13, sum(guessed) / len(guessed)
