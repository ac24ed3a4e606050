"""The math benchmarks (tasks.benchmarks.math): real data files, the math-verify grader, boxed extraction.

Reads the shared data folder (`../shared/data` next to the repository); every test runs, none is
skipped. The grading table's expectations are what a careful human grader says, written by hand.
"""
from __future__ import annotations

import random
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.errors import HarnessError
from tasks.data import BENCHMARKS, GRADERS, DataSources
from tasks.base import Problem
from tasks.benchmarks.math import MATH_PROMPT, clean_gold, extract_answer, extract_boxed, grade_answer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
EVAL_SIZES = {"math500": 500, "aime24": 30, "amc23": 40, "minerva": 272}


@pytest.fixture(scope="module")
def sources() -> DataSources:
    assert (SHARED_DATA / "math" / "math500.jsonl").is_file(), f"shared data missing under {SHARED_DATA}"
    return DataSources(data_dir=str(SHARED_DATA))


@pytest.fixture(scope="module")
def eval_problems(sources) -> dict[str, list[Problem]]:
    return {name: sources.problems(BENCHMARKS.get(name)) for name in EVAL_SIZES}


# ---------------------------------------------------------------------------------------------
# Real data


@pytest.mark.parametrize("name", sorted(EVAL_SIZES))
def test_eval_benchmark_rows(eval_problems, name):
    problems = eval_problems[name]
    assert len(problems) == EVAL_SIZES[name]
    assert len({p.id for p in problems}) == len(problems)
    assert all(p.id.startswith(f"{name}:") for p in problems)
    for p in problems:
        assert p.answer.strip(), p.id
        assert p.prompt.endswith("put your final answer within \\boxed{}."), p.id
        assert p.meta["target"] == f"\\boxed{{{p.answer}}}"
        assert p.meta["grader"] == "math_verify-v1" and p.meta["benchmark"] == name


@pytest.mark.parametrize("name", sorted(EVAL_SIZES))
def test_every_gold_answer_accepts_itself(eval_problems, name):
    failed = [(p.id, p.answer) for p in eval_problems[name] if grade_answer(f"\\boxed{{{p.answer}}}", p.answer) != 1.0]
    assert failed == []


def test_math_train_sample_gold_answers_accept_themselves(sources):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems = sources.problems(BENCHMARKS.get("math_train"))
    # The reference copy has 7474 rows, four of them without an answer; a training set leaves
    # those out with a warning naming them rather than failing.
    assert len(problems) == 7470
    assert any("left out 4 row(s)" in str(w.message) for w in caught)
    sample = random.Random(0).sample(problems, 300)
    failed = [(p.id, p.answer) for p in sample if grade_answer(f"\\boxed{{{p.answer}}}", p.answer) != 1.0]
    assert failed == []


def test_math500_metadata_and_ids(eval_problems):
    first = eval_problems["math500"][0]
    assert first.id == "math500:test/precalculus/807.json"
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.meta["level"] == "2" and first.meta["subject"] == "Precalculus"
    assert first.prompt == MATH_PROMPT.format(problem="Convert the point $(0,3)$ in rectangular coordinates to "
                                              "polar coordinates.  Enter your answer in the form $(r,\\theta),$ "
                                              "where $r > 0$ and $0 \\le \\theta < 2 \\pi.$")


def test_amc_float_answers_become_integers(eval_problems):
    first = eval_problems["amc23"][0]  # "answer": 27.0 in the file
    assert (first.id, first.answer) == ("amc23:0", "27")
    assert all("." not in p.answer for p in eval_problems["amc23"])  # AMC 2023 answers are all integers


def test_aime_ids_and_answers(eval_problems):
    first = eval_problems["aime24"][0]  # {"id": 60, ..., "answer": "204"}: Aya's walk
    assert (first.id, first.answer) == ("aime24:60", "204")


def test_minerva_gold_is_last_box_of_solution(eval_problems):
    # Row 0's solution ends "s=\frac{45}{3600} \frac{\pi}{180} 7200=\boxed{1.6} \mathrm{~cm}".
    first = eval_problems["minerva"][0]
    assert (first.id, first.answer) == ("minerva:0", "1.6")
    # Row 1's solution boxes "4.5e33" (Python notation); the converter writes it as LaTeX, since
    # math-verify would otherwise read the "e" as Euler's number.
    assert eval_problems["minerva"][1].answer == "4.5 \\times 10^{33}"
    assert grade_answer("\\boxed{4.5 \\times 10^{33}}", eval_problems["minerva"][1].answer) == 1.0


def test_gsm8k_gold_after_hashes(sources):
    test = sources.problems(BENCHMARKS.get("gsm8k"))
    train = sources.problems(BENCHMARKS.get("gsm8k_train"))
    assert len(test) == 1319 and len(train) == 7473
    # Janet's ducks: 16 - 3 - 4 = 9 eggs, at $2 each: "#### 18".
    assert test[0].id == "gsm8k:0" and test[0].answer == "18" and "Janet" in test[0].prompt
    # Natalia's clips: 48 + 24 = "#### 72".
    assert train[0].answer == "72"
    spec = BENCHMARKS.get("gsm8k")
    [row] = spec.to_problems([{"question": "How much?", "answer": "It costs 1,200 + 34.\n#### 1,234"}], spec, 0)
    assert row.answer == "1234"


# ---------------------------------------------------------------------------------------------
# Converters on hand-made rows


def test_converter_accepts_other_column_spellings():
    spec = BENCHMARKS.get("math500")
    rows = [{"Problem": "What is 1+1?", "Answer": "2", "unique_id": "a"},
            {"question": "What is 2+2?", "solution": "It is $\\boxed{\\frac{8}{2}}$, that is \\boxed{4}.", "idx": 7},
            {"problem": "What is 3+3?", "answer": 6.0}]
    problems = spec.to_problems(rows, spec, 0)
    assert [(p.id, p.answer) for p in problems] == [("math500:a", "2"), ("math500:7", "4"), ("math500:2", "6")]
    assert problems[0].prompt == ("What is 1+1?\n\nPlease reason step by step, and put your final answer "
                                  "within \\boxed{}.")


@pytest.mark.parametrize("row, missing", [
    ({"problem": "What is 1+1?", "solution": "Two, with no box."}, "no gold answer"),
    ({"problem": "What is 1+1?", "answer": ""}, "no gold answer"),
    ({"answer": "2"}, "no problem text"),
])
def test_row_without_problem_or_answer_is_an_error(row, missing):
    spec = BENCHMARKS.get("math500")
    with pytest.raises(HarnessError, match=f"benchmark math500: row 1 \\(id 1\\) has {missing}"):
        spec.to_problems([{"problem": "ok", "answer": "1"}, row], spec, 0)


def test_repeated_ids_are_an_error():
    spec = BENCHMARKS.get("aime24")
    with pytest.raises(HarnessError, match="repeats the id '3'"):
        spec.to_problems([{"id": 3, "problem": "a", "answer": "1"}, {"id": 3, "problem": "b", "answer": "2"}], spec, 0)


def test_all_math_benchmarks_registered():
    for name in ("math500", "aime24", "amc23", "minerva", "math_train", "gsm8k_train", "gsm8k"):
        spec = BENCHMARKS.get(name)
        assert (spec.domain, spec.grader, spec.template) == ("math", "math_verify-v1", "math-boxed-v1")
    assert BENCHMARKS.get("gsm8k_train").hub_config == "main"
    assert BENCHMARKS.get("minerva").hub == "math-ai/minervamath"


@pytest.mark.parametrize("raw, clean", [
    ("-1./3", "-1/3"),  # Minerva's Python-style floats
    ("30^\\circ.", "30^\\circ"),  # a sentence's full stop
    ("\\text{(E)},", "\\text{(E)}"),
    ("\\dfrac{1}{29,\\!322,\\!216}", "\\dfrac{1}{29322216}"),
    ("2.7778e-6", "2.7778 \\times 10^{-6}"),
    ("0.\\overline{3}", "0.\\overline{3}"),  # left alone
    ("e^{t} / 3", "e^{t} / 3"),
    ("5.5", "5.5"),
    ("(1,234)", "(1,234)"),
])
def test_clean_gold(raw, clean):
    assert clean_gold(raw) == clean


# ---------------------------------------------------------------------------------------------
# Boxed extraction


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{\\frac{\\sqrt{3}}{2}} it is", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{{a}_{1}^{2}}", "{a}_{1}^{2}"),
    ("\\boxed{1} then \\boxed{2} and finally \\boxed{3}.", "3"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are content
    ("\\fbox{7}", "7"),
    ("\\boxed {5}", "5"),
    ("\\boxed{}", ""),
    ("no box here, the answer is 5", None),
    ("", None),
    ("\\boxed{1} and a truncated \\boxed{\\frac{2}{", None),  # the last box never closes
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_answer_reads_only_boxes():
    assert extract_answer("blah \\boxed{ 12 } blah") == "12"
    assert extract_answer("\\boxed{3}\n\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("The answer is 5") is None
    assert extract_answer("\\boxed{  }") is None
    assert GRADERS.get("math_verify-v1").extract("\\boxed{7}") == "7"


# ---------------------------------------------------------------------------------------------
# Grading: (response, gold, expected), expectations by hand

GRADING_CASES = [
    # boxed integers
    ("The answer is \\boxed{5}.", "5", 1.0),
    ("\\boxed{6}", "5", 0.0),
    ("\\boxed{27}", "27.0", 1.0),
    ("\\boxed{12}", "{12}", 1.0),
    ("\\boxed{{12}}", "12", 1.0),
    # fractions, decimals, mixed forms
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "\\frac12", 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{2.5}", "\\frac{5}{2}", 1.0),
    ("\\boxed{2\\frac{1}{2}}", "\\frac{5}{2}", 1.0),  # a mixed number
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{0.33}", "\\frac{1}{3}", 0.0),  # an approximation is not the exact value
    # negative numbers
    ("\\boxed{-3}", "-3", 1.0),
    ("\\boxed{3}", "-3", 0.0),
    ("\\boxed{-\\frac{1}{2}}", "\\frac{-1}{2}", 1.0),
    # tuples and coordinates: order matters
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    ("\\boxed{(\\frac{\\pi}{2}, 3)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 0.0),
    ("\\boxed{(1,2)}", "(1, 2)", 1.0),
    # intervals: open and closed ends differ
    ("\\boxed{[-2, 7]}", "[-2,7]", 1.0),
    ("\\boxed{(-2, 7]}", "[-2,7]", 0.0),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", 1.0),
    ("\\boxed{(-\\infty, 3]}", "(-\\infty,3)", 0.0),
    ("\\boxed{[1,2) \\cup (3,4]}", "[1,2)\\cup(3,4]", 1.0),
    # sets: order does not matter, members do
    ("\\boxed{\\{1, 2, 3\\}}", "\\{3, 2, 1\\}", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2, 3\\}", 0.0),
    ("\\boxed{1, 2, 3}", "3, 1, 2", 1.0),  # a list of all solutions, in any order
    # math-verify is lenient about brackets: a set matches a tuple of the same members. Kept as
    # documented behaviour: "find all solutions" answers come in either bracket.
    ("\\boxed{\\{1, 2\\}}", "(1, 2)", 1.0),
    # units
    ("\\boxed{5 \\text{ cm}}", "5", 1.0),
    ("\\boxed{5}", "5\\text{ cm}", 1.0),
    ("\\boxed{864}", "864 \\mbox{ inches}^2", 1.0),
    ("\\boxed{5 cm}", "5", 1.0),
    ("\\boxed{6 \\text{ cm}}", "5 \\text{ cm}", 0.0),
    # degrees
    ("\\boxed{30^\\circ}", "30", 1.0),
    ("\\boxed{30}", "30^\\circ", 1.0),
    ("\\boxed{30^{\\circ}}", "60^\\circ", 0.0),
    # percentages
    ("\\boxed{10\\%}", "10", 1.0),
    ("\\boxed{10}", "10\\%", 1.0),
    ("\\boxed{0.1}", "10\\%", 1.0),  # 10% is 0.1
    ("\\boxed{20\\%}", "10\\%", 0.0),
    # square roots
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt2}{2}", 1.0),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0),
    # pi
    ("\\boxed{2\\pi}", "2\\pi", 1.0),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", 1.0),
    ("\\boxed{3.14}", "\\pi", 0.0),
    # scientific notation, LaTeX and programming styles
    ("\\boxed{1.5 \\times 10^{3}}", "1500", 1.0),
    ("\\boxed{1.5 \\times 10^{4}}", "1500", 0.0),
    ("\\boxed{4.5 \\times 10^{33}}", "4.5e33", 1.0),
    ("\\boxed{4.5e33}", "4.5 \\times 10^{33}", 1.0),
    ("\\boxed{1 \\times 10^{-5}}", "1e-5", 1.0),
    ("\\boxed{2 \\times 10^{-5}}", "1e-5", 0.0),
    # matrices and vectors
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 1.0),
    ("\\boxed{\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 0.0),
    # several boxes: the last one is the answer
    ("First \\boxed{3}; no, correcting myself: \\boxed{5}", "5", 1.0),
    ("\\boxed{5} ... wait, it is \\boxed{3}", "5", 0.0),
    ("\\boxed{7}, or maybe 5", "5", 0.0),  # a box wins over text after it
    # nested braces and LaTeX spacing
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\boxed{ \\frac { 1 } { 2 } }", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\left( 1 , 2 \\right)}", "(1,2)", 1.0),
    # expressions: equal as mathematics
    ("\\boxed{x^2 + 2x + 1}", "x^2+2x+1", 1.0),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("\\boxed{x^2 + 1}", "x^2+2x+1", 0.0),
    ("\\boxed{a+b+c}", "a + b + c", 1.0),  # math-verify alone reads " + c" as a unit
    ("\\boxed{6-5i}", "6 - 5i", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{y = 2x + 3}", "y=2x+3", 1.0),
    # text and multiple-choice answers
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", 1.0),
    ("\\boxed{\\text{Navin}}", "\\text{Evelyn}", 0.0),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", 1.0),
    ("\\boxed{C}", "\\text{(C)}", 1.0),
    ("\\boxed{(C)}", "\\text{(C)}", 1.0),
    ("\\boxed{\\text{(B)}}", "\\text{(C)}", 0.0),
    # money and thousands separators
    ("\\boxed{\\$18.90}", "18.90", 1.0),
    ("\\boxed{18.9}", "\\$18.90", 1.0),
    ("\\boxed{10080}", "10,\\!080", 1.0),
    ("\\boxed{10,080}", "10080", 1.0),
    ("\\boxed{\\frac{1}{29322216}}", "\\dfrac{1}{29,\\!322,\\!216}", 1.0),
    # \fbox counts as a box
    ("\\fbox{7}", "7", 1.0),
    # no box: math-verify reads the answer from the text ("final answer is", "answer:", else the
    # last expression it can parse), so a correct unboxed answer scores 1.0
    ("The answer is 5", "5", 1.0),
    ("The answer is 6", "5", 0.0),
    ("So the final answer is $\\frac{1}{2}$.", "\\frac{1}{2}", 1.0),
    # empty, garbage, broken boxes
    ("", "5", 0.0),
    ("   \n", "5", 0.0),
    ("asdf qwerty", "5", 0.0),
    ("\\boxed{}", "5", 0.0),
    ("}}}{{\\boxed{\\frac{", "5", 0.0),
    ("so the answer is \\boxed{5", "5", 0.0),  # a truncated box: the answer was never finished
    ("\\boxed{5}", "", 0.0),
]


@pytest.mark.parametrize("response, gold, expected", GRADING_CASES)
def test_grade_answer(response, gold, expected):
    assert grade_answer(response, gold) == expected


def test_grading_table_is_large_and_balanced():
    assert len(GRADING_CASES) >= 45
    assert sum(expected == 0.0 for _, _, expected in GRADING_CASES) >= 15


def test_grader_reads_problem_answer():
    grader = GRADERS.get("math_verify-v1")
    problem = Problem("x:1", "p", "\\frac{1}{2}")
    assert grader.grade("\\boxed{0.5}", problem) == 1.0
    assert grader.grade("\\boxed{0.6}", problem) == 0.0


# ---------------------------------------------------------------------------------------------
# Threads and processes


def _grade_case(case: tuple[str, str, float]) -> float:
    return grade_answer(case[0], case[1])


def test_grading_in_threads_matches_serial():
    serial = [_grade_case(case) for case in GRADING_CASES]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(_grade_case, GRADING_CASES))
    assert threaded == serial == [expected for _, _, expected in GRADING_CASES]


def test_grading_in_processes_matches_serial():
    cases = GRADING_CASES[:12]
    with ProcessPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(_grade_case, cases)) == [_grade_case(case) for case in cases]
