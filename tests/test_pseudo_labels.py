"""pseudoK on every suite: votes read the answer as the suite's grader does (format variants of one
answer vote together), a label is correct when it equals the gold answer, and the label accuracy
that the injector logs is above chance. The suites are built on the shared data files (math,
science, dialogue) and on arith; the policy is a fake that writes right answers in several forms."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from noise import NoiseContext, parse_noise
from tasks import SUITES

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
K, P_RIGHT, N_PROBLEMS = 8, 0.5, 40  # a majority of 8 is right about 77 % of the time


def build(name: str):
    cls = SUITES.get(name)
    if name == "arith":
        return cls(cls.Options(n_train=N_PROBLEMS, n_eval=4), 0)
    return cls(cls.Options(data_dir=str(SHARED_DATA), n_train=N_PROBLEMS), 0)


# Per suite: the right answer written several ways the grader reads as one answer, and wrong answers.
RIGHT_FORMS = {
    "arith": lambda g: [g, f"is {g}", f" {g} "],
    "math": lambda g: [f"\\boxed{{{g}}}", f"We find it.\n\nThe answer is $\\boxed{{ {g} }}$."],
    "science": lambda g: [g, f"The answer is {g}.", f"\\boxed{{{g}}}"],
    "dialogue": lambda g: [g, f"```json\n{g}\n```", f"Next action: {g}"],
}
WRONG_CANDIDATES = {
    "arith": lambda g: [str(int(g) + 1), f"is {int(g) + 7}", str(int(g) - 3)],
    "math": lambda g: ["\\boxed{1001}", "So \\boxed{1002}", "\\boxed{-1003}"],
    "science": lambda g: ["Nobody knows", "The answer is 1887.", "\\boxed{Lyon and Toulouse}"],
    "dialogue": lambda g: ['[{"act": "GOODBYE"}]', '[{"act": "REQ_MORE"}]', '[{"act": "NOTIFY_FAILURE"}]',
                           '[{"act": "INFORM_COUNT", "slot": "count", "values": ["7"]}]'],
}


def fake_samples(suite, problem, rng: random.Random) -> list[str]:
    """K responses: right with probability P_RIGHT (in a random one of the right forms), else one of
    three wrong answers (checked wrong by the suite's grader)."""
    gold = problem.answer
    wrong = [w for w in WRONG_CANDIDATES[suite.name](gold) if suite.grade(w, problem) == 0.0][:3]
    assert len(wrong) == 3
    return [rng.choice(RIGHT_FORMS[suite.name](gold)) if rng.random() < P_RIGHT else rng.choice(wrong)
            for _ in range(K)]


@pytest.mark.parametrize("name", ["arith", "math", "science", "dialogue"])
def test_pseudo_label_accuracy_is_logged_and_above_chance_on_every_suite(name):
    suite = build(name)
    problems = suite.train_problems()[:N_PROBLEMS]
    rng = random.Random(f"pseudo-{name}")
    votes = {p.id: [suite.vote(text, p) for text in fake_samples(suite, p, rng)] for p in problems}
    # a vote's answer is right exactly when the text it came from is a right form (all of them vote right)
    spec = parse_noise(f"pseudo{K}")
    spec.set_labels(votes)
    pseudo = spec.injectors[0]
    for p in problems:
        label = pseudo.labels[p.id]
        assert pseudo.label_correct[p.id] == (label is not None and suite.answer_correct(label, p))
    # one training batch: each problem's two responses, the right answer in its first form and a wrong one
    batch = [(p, text) for p in problems for text in (RIGHT_FORMS[name](p.answer)[0], fake_samples(suite, p, rng)[0])]
    texts = [t for _, t in batch]
    ctx = NoiseContext(seed=0, step=1, prompt_ids=[p.id for p, _ in batch], sample_idx=[0, 1] * len(problems),
                       regrade=lambda i, gold: suite.grade(texts[i], dataclasses.replace(batch[i][0], answer=gold)),
                       responses=texts, golds=[p.answer for p, _ in batch], extract=suite.extract_answer)
    clean = torch.tensor([suite.grade(t, p) for p, t in batch])
    noisy, stats = spec.apply(clean, ctx)
    accuracy = stats["noise/pseudo_label_acc"]
    assert accuracy == pytest.approx(sum(pseudo.label_correct.values()) / len(problems))
    # chance: the label one random sample gives is right with probability P_RIGHT; the majority of 8 does better
    assert accuracy >= 0.6 > P_RIGHT
    # where the label is right the training reward is the clean one
    right_label = torch.tensor([pseudo.label_correct[p.id] for p, _ in batch])
    assert torch.equal(noisy[right_label], clean[right_label])


def test_arith_format_variants_vote_together_and_the_format_is_still_graded():
    suite = build("arith")
    problem = suite.train_problems()[0]
    g, wrong = problem.answer, str(int(problem.answer) + 1)
    texts = [wrong, f"is {g}", g, wrong, f"is {g}", wrong, g]  # as raw strings 'wrong' wins 3 to 2 and 2
    votes = [suite.vote(t, problem) for t in texts]
    assert votes[0] == (wrong, 0.0) and votes[1] == (g, 1.0) and votes[2] == (g, 1.0)
    spec = parse_noise("pseudo7")
    spec.set_labels({problem.id: votes})
    assert spec.injectors[0].labels[problem.id] == g and spec.injectors[0].label_correct[problem.id]
    # the label is the number; "is 12" is still not the graded format, so it earns nothing
    responses = [f"is {g}", g, wrong]
    ctx = NoiseContext(seed=0, step=1, prompt_ids=[problem.id] * 3, sample_idx=[0, 1, 2],
                       regrade=lambda i, gold: suite.grade(responses[i], dataclasses.replace(problem, answer=gold)))
    noisy, stats = spec.apply(torch.tensor([0.0, 1.0, 0.0]), ctx)
    assert noisy.tolist() == [0.0, 1.0, 0.0] and stats["noise/pseudo_label_acc"] == 1.0


def test_math_labels_are_checked_against_the_gold_by_the_grader():
    suite = build("math")
    problem = dataclasses.replace(suite.train_problems()[0], answer="5")
    assert suite.vote("so the answer is \\boxed{ 5 }", problem) == ("5", 1.0)
    assert suite.vote("so the answer is \\boxed{5.0}", problem) == ("5.0", 1.0)  # the grader's equality
    assert suite.vote("no box: 5", problem) == (None, 0.0)
    assert suite.vote("\\boxed{6}", problem) == ("6", 0.0)
