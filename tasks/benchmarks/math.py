"""Math benchmarks and their grader: MATH500, AIME24, AMC23, Minerva (OCW), MATH train and GSM8K,
all graded by `math_verify-v1` and prompted with `math-boxed-v1`.

The grader reads a response's answer from its last `\\boxed{}` (or `\\fbox{}`) and compares it with
the gold answer through math-verify, gold first. A response with no box is still graded: math-verify
then extracts what it can from the whole text ("The answer is $5$" -> 5), so a correct but unboxed
answer scores 1.0. `extract_answer`, which pseudo-label majority votes use, only reads boxes.

math-verify's own timeouts use `signal.alarm`, which works only in a process's main thread; the
grader turns them off so that it can run in worker threads and processes alike.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import replace
from functools import lru_cache
from typing import Any, Callable

from harness.errors import HarnessError
from tasks.base import Problem
from tasks.data import BenchmarkSpec, Grader, Rows, field_of, register_benchmark, register_grader

MATH_PROMPT = "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
TEMPLATE = "math-boxed-v1"
GRADER = "math_verify-v1"

_BOX_START = re.compile(r"\\(?:boxed|fbox)\s*\{")


# ---------------------------------------------------------------------------------------------
# Reading answers


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` that closes the group opened just before `start`, or None when it never
    closes. Escaped braces (`\\{`, `\\}`) are content, not grouping."""
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` or `\\fbox{...}` in `text`, nested braces included;
    None when there is no box or the last one never closes (a truncated response)."""
    starts = list(_BOX_START.finditer(text or ""))
    if not starts:
        return None
    begin = starts[-1].end()
    end = _closing_brace(text, begin)
    return None if end is None else text[begin:end]


def extract_answer(response: str) -> str | None:
    """The answer a response commits to, for majority votes: its last boxed content, stripped;
    None without a (non-empty) box."""
    boxed = extract_boxed(response)
    if boxed is None or not boxed.strip():
        return None
    return boxed.strip()


# ---------------------------------------------------------------------------------------------
# Gold answers as datasets write them

_E_NOTATION = re.compile(r"([-+]?\d+(?:\.\d*)?)[eE]([-+]?\d+)")
_DIGIT_SEPARATOR = re.compile(r"(?<=\d),\s*\\!\s*(?=\d)")  # 29,\!322 -> 29322
_BARE_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\s*/)")  # Minerva's Python-style "-1./3" -> "-1/3"


def latex_e_notation(answer: str) -> str:
    """A number written as a whole in programming e-notation ("4.5e33", "1e-5", as Minerva's golds
    are) as LaTeX, `4.5 \\times 10^{33}`: math-verify reads a bare "e" as Euler's number."""
    match = _E_NOTATION.fullmatch(answer.strip())
    if not match:
        return answer
    return f"{match.group(1)} \\times 10^{{{int(match.group(2))}}}"


def clean_gold(answer: str) -> str:
    """A gold answer without the dataset's typing artefacts that stop math-verify from reading it
    as the number or expression meant: a sentence's closing "." or ",", thousands separators
    `,\\!`, "1./3", and e-notation."""
    answer = answer.strip().rstrip(".,").strip()
    answer = _DIGIT_SEPARATOR.sub("", answer)
    return latex_e_notation(_BARE_DECIMAL_POINT.sub("", answer))


# ---------------------------------------------------------------------------------------------
# Grading


@lru_cache(maxsize=1)
def _math_verify():
    """math-verify and the extraction configs the grader tries, imported on first use (it pulls in
    sympy), with its once-per-process "timeout disabled" warning silenced: disabling it is deliberate.

    Configs: boxed answers first; the same without unit stripping (math-verify reads a trailing
    " c" or " m" as a unit, so `a + b + c` would lose its "+ c"); anything it can find."""
    try:
        import math_verify
        from math_verify import ExprExtractionConfig, LatexExtractionConfig
    except ImportError:
        raise HarnessError("the math grader needs math-verify (pip install math-verify)") from None
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    boxed_first = LatexExtractionConfig(boxed_match_priority=0)
    keep_units = replace(boxed_first, normalization_config=replace(boxed_first.normalization_config, units=False))
    configs = {"boxed": [boxed_first], "boxed_keep_units": [keep_units], "latex": [LatexExtractionConfig()],
               "anything": [LatexExtractionConfig(), ExprExtractionConfig()]}
    return math_verify, configs


def _parse_first_math(attempts: list[tuple[str, str]]) -> list:
    """Parse (text, config name) attempts in order; the first that yields a math object wins. When
    none does, the first non-empty result (math-verify's bare-string fallback), else []."""
    math_verify, configs = _math_verify()
    fallback: list = []
    for text, config in attempts:
        parsed = math_verify.parse(text, extraction_config=configs[config], parsing_timeout=None)
        if any(not isinstance(item, str) for item in parsed):
            return parsed
        fallback = fallback or parsed
    return fallback


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    """A gold answer parsed once, as a whole: wrapped as a box (so "27.0", "\\frac{1}{2}" and
    "(3, \\frac{\\pi}{2})" parse as LaTeX), else as inline math. Never a fragment of it: plain
    expression extraction would read "np.arcsin(10/13)" as 10/13. Dataset artefacts are cleaned
    first (`clean_gold`), so raw golds and pseudo-labels grade like converted ones."""
    gold = clean_gold(gold)
    boxed = f"\\boxed{{{gold}}}"
    return tuple(_parse_first_math([(boxed, "boxed"), (boxed, "boxed_keep_units"), (f"${gold}$", "latex")]))


def _parse_response(response: str) -> list:
    """The response's answer: its last box when it has one, else math-verify's own extraction."""
    boxed = extract_boxed(response)
    if boxed is None:
        return _parse_first_math([(response, "anything")])
    if not boxed.strip():
        return []
    wrapped = f"\\boxed{{{latex_e_notation(boxed)}}}"
    return _parse_first_math([(wrapped, "boxed"), (wrapped, "boxed_keep_units")])


def grade_answer(response: str, gold: str) -> float:
    """1.0 when the response's answer equals `gold` mathematically (math-verify, gold first), else
    0.0; an empty or unreadable response, or any error inside math-verify, is 0.0."""
    if not response or not response.strip() or not str(gold).strip():
        return 0.0
    try:
        gold_parsed = _parse_gold(str(gold))
        answer_parsed = _parse_response(response)
        if not gold_parsed or not answer_parsed:
            return 0.0
        math_verify, _ = _math_verify()
        return 1.0 if math_verify.verify(list(gold_parsed), answer_parsed, timeout_seconds=None) else 0.0
    except Exception:  # math-verify and sympy raise many kinds on odd input; a crash is a wrong answer
        return 0.0


register_grader(Grader(GRADER, grade=lambda response, problem: grade_answer(response, problem.answer),
                       extract=extract_answer, render=lambda answer: f"\\boxed{{{answer}}}"))


# ---------------------------------------------------------------------------------------------
# Rows -> problems


def _text(value: Any) -> str:
    """A cell as stripped text; None and NaN-like empties become ""."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value != value:  # NaN, as pandas writes an empty cell
            return ""
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value).strip()


def math_gold(row: dict[str, Any]) -> str:
    """The gold answer of a MATH-style row: its answer column (AMC's 27.0 -> "27"), else the last
    box of its solution (Minerva); "" when neither exists."""
    answer = _text(field_of(row, "answer", "Answer"))
    if not answer:
        answer = extract_boxed(_text(field_of(row, "solution", "Solution"))) or ""
    return clean_gold(answer)


def gsm8k_gold(row: dict[str, Any]) -> str:
    """The gold answer of a GSM8K row: the number after the last "####" of its worked answer
    (thousands commas removed); an answer column without "####" is taken as the number itself."""
    answer = _text(field_of(row, "answer", "Answer"))
    return answer.rpartition("####")[2].replace(",", "").strip()


def _row_id(row: dict[str, Any], index: int) -> str:
    """The row's own id (`id`, `unique_id` or `idx`), else its position in the file."""
    for name in ("id", "unique_id", "idx"):
        value = _text(field_of(row, name))
        if value:
            return value
    return str(index)


def _meta(row: dict[str, Any], answer: str) -> dict[str, Any]:
    """Warm-start target and, where the row has them, the level and subject."""
    meta: dict[str, Any] = {"target": f"\\boxed{{{answer}}}"}
    for key, names in (("level", ("level", "Level")), ("subject", ("subject", "type"))):
        value = _text(field_of(row, *names))
        if value:
            meta[key] = value
    return meta


def _converter(gold_of: Callable[[dict[str, Any]], str]):
    """A `to_problems` that reads each row's gold answer with `gold_of`. A row without problem text
    or gold answer is an error, except that a training set with `options["unanswered"] == "drop"`
    leaves out rows without a gold answer (they cannot be rewarded), with a warning naming them."""

    def to_problems(rows: Rows, spec: BenchmarkSpec, seed: int) -> list[Problem]:
        problems, seen, dropped = [], set(), []
        for index, row in enumerate(rows):
            row_id = _row_id(row, index)
            where = f"benchmark {spec.name}: row {index} (id {row_id})"
            text = _text(field_of(row, "problem", "question", "Problem"))
            if not text:
                raise HarnessError(f"{where} has no problem text (a 'problem' or 'question' column)")
            answer = gold_of(row)
            if not answer and spec.options.get("unanswered") == "drop":
                dropped.append(row_id)
                continue
            if not answer:
                raise HarnessError(f"{where} has no gold answer (an 'answer' column, or a \\boxed{{}} "
                                   f"in its 'solution')")
            problem_id = f"{spec.name}:{row_id}"
            if problem_id in seen:
                raise HarnessError(f"{where} repeats the id {row_id!r}; problem ids must be unique")
            seen.add(problem_id)
            problems.append(Problem(problem_id, MATH_PROMPT.format(problem=text), answer, _meta(row, answer)))
        if dropped:
            warnings.warn(f"benchmark {spec.name}: left out {len(dropped)} row(s) with no gold answer "
                          f"(ids {', '.join(dropped[:10])}{', ...' if len(dropped) > 10 else ''})", stacklevel=2)
        return problems

    return to_problems


math_problems = _converter(math_gold)
gsm8k_problems = _converter(gsm8k_gold)


def _register(name: str, filename: str, hub: str, split: str, to_problems, config: str | None = None,
              **options: Any) -> None:
    """One math benchmark: domain "math", graded by math-verify, prompted with `math-boxed-v1`."""
    register_benchmark(BenchmarkSpec(name=name, domain="math", filename=filename, hub=hub, hub_split=split,
                                     grader=GRADER, to_problems=to_problems, hub_config=config,
                                     template=TEMPLATE, options=options))


_register("math500", "math/math500.jsonl", "HuggingFaceH4/MATH-500", "test", math_problems)
_register("aime24", "math/aime24.jsonl", "math-ai/aime24", "test", math_problems)
_register("amc23", "math/amc23.jsonl", "math-ai/amc23", "test", math_problems)
_register("minerva", "math/minerva_math.jsonl", "math-ai/minervamath", "test", math_problems)
# Training sets leave out rows without a gold answer (4 of the 7474 rows of the reference MATH train
# copy have none); evaluation sets never do.
_register("math_train", "math/math_train.jsonl", "DigitalLearningGmbH/MATH-lighteval", "train", math_problems,
          unanswered="drop")
_register("gsm8k_train", "math/gsm8k_train.jsonl", "openai/gsm8k", "train", gsm8k_problems, config="main",
          unanswered="drop")
_register("gsm8k", "math/gsm8k_test.jsonl", "openai/gsm8k", "test", gsm8k_problems, config="main")
