"""The arith suite: splits, seeding, grader, warm-start targets."""
from __future__ import annotations

import pytest

from harness.errors import HarnessError
from tasks.arith import ArithOptions, ArithSuite


def ops(problem):
    text = problem.prompt.rstrip("=")
    op = "+" if "+" in text else "-"
    a, b = (int(x) for x in text.split(op))
    return a, op, b


def test_splits_are_disjoint_and_ood_is_the_unseen_operand_order():
    suite = ArithSuite(ArithOptions(), seed=0)
    train = {p.id for p in suite.train_problems()}
    bench = {b.name: b for b in suite.eval_benchmarks()}
    id_eval = {p.id for p in bench["arith_id"].problems}
    ood = bench["arith_ood"].problems
    assert not train & id_eval
    assert len(id_eval) == 200 and bench["arith_id"].role == "ID" and bench["arith_ood"].role == "OOD"
    assert len(ood) == 200
    for p in ood:
        a, op, b = ops(p)
        assert op == "+" and a < b and int(p.answer) == a + b
    for p in [*suite.train_problems(), *bench["arith_id"].problems]:
        a, op, b = ops(p)
        assert a >= b and 0 <= b and a <= 29
        assert int(p.answer) == (a + b if op == "+" else a - b)


def test_splits_are_fixed_by_the_seed():
    a, b, c = (ArithSuite(ArithOptions(), seed=s) for s in (0, 0, 1))
    assert [p.id for p in a.train_problems()] == [p.id for p in b.train_problems()]
    assert [p.id for p in a.train_problems()] != [p.id for p in c.train_problems()]


def test_exact_match_grader():
    suite = ArithSuite(ArithOptions(), seed=0)
    p = next(p for p in suite.train_problems() if p.prompt.startswith("12+"))
    assert suite.grade(f" {p.answer} ", p) == 1.0
    assert suite.grade(f"is {p.answer}", p) == 0.0
    assert suite.grade(str(int(p.answer) + 1), p) == 0.0
    assert suite.grade("", p) == 0.0


def test_warm_start_targets_mix_styles_at_the_configured_rate():
    suite = ArithSuite(ArithOptions(verbose_frac=0.3), seed=0)
    targets = [suite.sft_target(p) for p in suite.train_problems()]
    verbose = sum(t.startswith("is ") for t in targets) / len(targets)
    assert 0.25 < verbose < 0.35
    assert all(t in (p.answer, f"is {p.answer}") for t, p in zip(targets, suite.train_problems()))
    plain = ArithSuite(ArithOptions(verbose_frac=0.0), seed=0)
    assert all(plain.sft_target(p) == p.answer for p in plain.train_problems())


@pytest.mark.parametrize("kwargs", [dict(ops="/"), dict(ops="-"), dict(min_operand=30), dict(verbose_frac=-0.1),
                                    dict(n_eval=0)])
def test_bad_options(kwargs):
    with pytest.raises(HarnessError):
        ArithOptions(**kwargs).validate()


def test_an_instruction_tuned_model_is_asked_in_words_and_graded_on_its_last_number():
    """suite.prompt_style=question and suite.grading=last_number: the same problems, asked as a question,
    and a sentence scores when its last integer is the answer; the defaults stay the bare exact form."""
    plain = ArithSuite(ArithOptions(), seed=0)
    asked = ArithSuite(ArithOptions(prompt_style="question", grading="last_number"), seed=0)
    first, worded = plain.train_problems()[0], asked.train_problems()[0]
    assert first.id == worded.id and first.answer == worded.answer
    assert worded.prompt == f"What is {first.prompt[:-1]}? Reply with the number only."
    answer = first.answer
    assert asked.grade(f"{first.prompt[:-1]} = {answer}.", worded) == 1.0
    assert asked.grade(f"It is {int(answer) + 1}", worded) == 0.0
    assert asked.grade("I cannot say.", worded) == 0.0
    assert plain.grade(f"{first.prompt[:-1]} = {answer}.", first) == 0.0  # the default stays exact
    assert plain.grade(answer, first) == 1.0
    assert {b.grader for b in asked.eval_benchmarks()} == {"last_number-v1"}
    assert {b.grader for b in plain.eval_benchmarks()} == {"exact_match-v1"}


@pytest.mark.parametrize("options, message", [
    ({"prompt_style": "chat"}, "suite.prompt_style must be one of expr, question, got 'chat'"),
    ({"grading": "lenient"}, "suite.grading must be one of exact, last_number, got 'lenient'"),
])
def test_unknown_prompt_styles_and_graders_are_refused(options, message):
    with pytest.raises(HarnessError, match=message):
        ArithOptions(**options).validate()
