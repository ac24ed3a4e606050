"""Science QA benchmarks: GPQA (diamond), HLE (text-only) and SimpleQA, with their graders.

* `gpqa`: four options shuffled by a seeded permutation (the suite's fixed shuffle seed, so every
  run evaluates the same prompts); the answer is the correct letter; grader `mc_letter-v1`.
* `hle`: Humanity's Last Exam, text-only items; multiple-choice items are graded by letter,
  exact-match items by normalised exact match; grader `hle_match-v1`.
* `simpleqa` / `simpleqa_train`: one file split by a run-independent hash of the row id (20 %
  evaluation, 80 % training); grader `normalized_match-v1`, or the judge-model grader
  `simpleqa_judge-v1` of SimpleQA's official protocol when a judge model is configured.

GPQA and HLE are gated and must never be committed; tests use synthetic fixtures in their layouts.
"""
from __future__ import annotations

import ast
import os
import re
import string
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError
from harness.seeding import numpy_rng
from tasks.base import Problem
from tasks.data import BenchmarkSpec, Grader, Rows, field_of, register_benchmark, register_grader, stable_fraction
from tasks.benchmarks.math import extract_boxed as last_boxed

QA_TEMPLATE = "Answer the following question. Put your final answer within \\boxed{{}}.\n\n{question}"
MC_TEMPLATE = ("Answer the following multiple-choice question. Put the letter of your final answer within "
               "\\boxed{{}} (for example \\boxed{{A}}).\n\n{question}\n\n{options}")
GPQA_LETTERS = "ABCD"
SIMPLEQA_EVAL_FRACTION = 0.2


# ---- reading answers out of responses -------------------------------------------------------

def strip_latex_text(text: str) -> str:
    """`\\text{B}` / `\\textbf{B}` / `\\mathrm{B}` -> `B`."""
    return re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", text).strip()


def extract_letter(response: str, letters: str = GPQA_LETTERS) -> str | None:
    """The option letter a response chose, or None. In order of preference:

    1. the last `\\boxed{X}` (also `\\boxed{(X)}`, `\\boxed{X) text}`, `\\boxed{\\text{X}}`);
    2. the last "answer is X" / "Answer: X" (also "**Answer:** (X)", "answer is **X**");
    3. the last "(X)" anywhere;
    4. a response that is just the letter ("C", "(C)", "C.").

    Letters are upper case and must be one of `letters`, so "the answer is a bit unclear" reads nothing.
    """
    cls = f"[{re.escape(letters)}]"
    boxed = last_boxed(response)
    if boxed is not None:
        match = re.match(rf"\(?({cls})\)?(?:[\s.:)]|$)", strip_latex_text(boxed))
        return match.group(1) if match else None
    stated = re.findall(rf"(?i:answer)(?:\s+is)?\s*\**\s*:?\s*\**\s*\(?({cls})\b(?![-'])", response)
    if stated:
        return stated[-1]
    parenthesised = re.findall(rf"\(({cls})\)", response)
    if parenthesised:
        return parenthesised[-1]
    match = re.fullmatch(rf"\s*\(?({cls})\)?\.?\s*", response)
    return match.group(1) if match else None


def extract_short_answer(response: str) -> str | None:
    """The free-text answer a response gives: its last `\\boxed{}`; else the rest of the line after
    the last "answer is" / "Answer:"; else its first non-empty line. None when empty."""
    boxed = last_boxed(response)
    if boxed is not None:
        answer = strip_latex_text(boxed)
    else:
        stated = list(re.finditer(r"(?i)answer(?:\s+is|\s*:)\s*:?", response))
        if stated:
            answer = response[stated[-1].end():].split("\n", 1)[0]
        else:
            answer = next((line for line in response.splitlines() if line.strip()), "")
    answer = answer.strip().strip("*").strip()
    return answer or None


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, punctuation deleted ("U.S.A." -> "usa"), articles
    (a, an, the) removed, single spaces. One deviation keeps numbers intact: a point between
    digits stays ("3.5" does not become "35"; "1,000" becomes "1000" as in SQuAD)."""
    text = text.lower()
    text = re.sub(r"(?<=\d)\.(?=\d)", "\x00", text)  # protect decimal points from punctuation removal
    text = "".join(ch for ch in text if ch not in string.punctuation).replace("\x00", ".")
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def matches_gold(prediction: str, gold: str, allow_span: bool = True) -> bool:
    """Whether a prediction matches the gold after `normalize_answer`.

    Equal normalised strings match. With `allow_span`, a short prediction (at most 2 x the gold's
    tokens + 3 tokens) also matches when the normalised gold occurs in it as a run of whole words:
    "Michio Sugeno" matches "It was Michio Sugeno", but not "Sugeno" nor a long list of names.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not ref:
        return False
    if pred == ref:
        return True
    if not allow_span or len(pred) > 2 * len(ref) + 3:
        return False
    return any(pred[i:i + len(ref)] == ref for i in range(len(pred) - len(ref) + 1))


# ---- graders --------------------------------------------------------------------------------

def grade_letter(response: str, problem: Problem) -> float:
    letters = problem.meta.get("letters", GPQA_LETTERS)
    return float(extract_letter(response, letters) == problem.answer.strip().upper())


def extract_normalized(response: str) -> str | None:
    """The normalised short answer (so votes merge "Paris." and "paris"), or None."""
    answer = extract_short_answer(response)
    return (normalize_answer(answer) or None) if answer is not None else None


def grade_normalized(response: str, problem: Problem) -> float:
    answer = extract_short_answer(response)
    return float(answer is not None and matches_gold(answer, problem.answer))


def grade_hle(response: str, problem: Problem) -> float:
    """Multiple-choice items by letter (`extract_letter` over the item's letters); exact-match
    items by normalised exact match (no span matching)."""
    if problem.meta.get("answer_type") == "multipleChoice":
        return grade_letter(response, problem)
    answer = extract_short_answer(response)
    return float(answer is not None and matches_gold(answer, problem.answer, allow_span=False))


def extract_hle(response: str) -> str | None:
    """A letter when the response names one the way `extract_letter` reads it, else its
    normalised short answer (extract does not know the item's answer type)."""
    return extract_letter(response, string.ascii_uppercase) or extract_normalized(response)


register_grader(Grader("mc_letter-v1", grade_letter, extract_letter))
register_grader(Grader("hle_match-v1", grade_hle, extract_hle))
register_grader(Grader("normalized_match-v1", grade_normalized, extract_normalized))


# ---- SimpleQA's judge-model grader ----------------------------------------------------------

JUDGE_TEMPLATE = """You are grading an answer to a factual question. Compare the predicted answer with the gold
target and choose one grade.

A) CORRECT: the predicted answer states the gold target's information and contradicts nothing in
it (extra detail, small spelling differences or more precision are fine).
B) INCORRECT: the predicted answer contradicts the gold target or gives a different answer, even
hedged or as one of several candidates.
C) NOT_ATTEMPTED: the predicted answer neither gives the gold target's information nor contradicts
it (for example "I don't know").

Question: {question}
Gold target: {target}
Predicted answer: {predicted}

Reply with only the letter: A, B or C."""

JudgeFn = Callable[[str], str]
_judge: dict[str, Any] = {"source": None, "fn": None}


def set_judge(judge: str | JudgeFn | None) -> None:
    """Configure the judge of `simpleqa_judge-v1`: a local Hugging Face model folder or hub id
    (loaded on first use), a callable `prompt -> reply text`, or None to clear it. Without a call
    here, `$SIMPLEQA_JUDGE_MODEL` names the model."""
    _judge["source"], _judge["fn"] = judge, (judge if callable(judge) else None)


def judge_fn() -> JudgeFn:
    if _judge["fn"] is None:
        source = _judge["source"] or os.environ.get("SIMPLEQA_JUDGE_MODEL", "")
        if not source:
            raise HarnessError("simpleqa_judge-v1 needs a judge model: set $SIMPLEQA_JUDGE_MODEL to a local Hugging "
                               "Face model folder (or call tasks.benchmarks.science.set_judge), or use normalized_match-v1")
        _judge["fn"] = hf_judge(str(source))
    return _judge["fn"]


def hf_judge(model: str, max_new_tokens: int = 8) -> JudgeFn:
    """A greedy judge from a causal language model (through its chat template when it has one)."""
    model = str(Path(model).expanduser()) if model.startswith("~") else model
    if model.startswith(("/", ".")) and not Path(model).is_dir():
        raise HarnessError(f"simpleqa_judge-v1: judge model folder {model!r} does not exist ($SIMPLEQA_JUDGE_MODEL "
                           "or tasks.benchmarks.science.set_judge)")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
        lm = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise HarnessError(f"simpleqa_judge-v1: cannot load judge model {model!r}: {str(exc).splitlines()[0]}") from None
    lm.eval()

    def judge(prompt: str) -> str:
        import torch

        if getattr(tokenizer, "chat_template", None):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(lm.device)
        with torch.no_grad():
            out = lm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    return judge


def judge_grade_letter(reply: str) -> str | None:
    """A, B or C from a judge's reply (the first one it names; the grade words count too)."""
    match = re.search(r"\b(A|B|C|CORRECT|INCORRECT|NOT_ATTEMPTED)\b", reply)
    if not match:
        return None
    return {"CORRECT": "A", "INCORRECT": "B", "NOT_ATTEMPTED": "C"}.get(match.group(1), match.group(1))


def grade_judge(response: str, problem: Problem) -> float:
    """1.0 only when the judge grades the response CORRECT (A); INCORRECT, NOT_ATTEMPTED and an
    unreadable reply are 0.0."""
    question = problem.meta.get("question", problem.prompt)
    prompt = JUDGE_TEMPLATE.format(question=question, target=problem.answer, predicted=response.strip())
    return float(judge_grade_letter(judge_fn()(prompt)) == "A")


register_grader(Grader("simpleqa_judge-v1", grade_judge, extract_normalized))


# ---- converters -----------------------------------------------------------------------------

def text_of(value: Any) -> str:
    return "" if value is None else str(value).strip()


def gpqa_problems(rows: Rows, spec: BenchmarkSpec, seed: int) -> list[Problem]:
    """Each row's four options in the order of `numpy_rng(seed, "gpqa-shuffle", record id)`."""
    problems = []
    for index, row in enumerate(rows):
        record = text_of(field_of(row, "Record ID", default="")) or str(index)
        correct = text_of(field_of(row, "Correct Answer"))
        wrong = [text_of(field_of(row, f"Incorrect Answer {k}")) for k in (1, 2, 3)]
        question = text_of(field_of(row, "Question"))
        if not question or not correct or not all(wrong):
            raise HarnessError(f"benchmark {spec.name}: row {record} lacks Question, Correct Answer or Incorrect "
                               "Answer 1-3 (the columns of gpqa_diamond.csv)")
        order = numpy_rng(seed, "gpqa-shuffle", record).permutation(4)
        options = [([correct] + wrong)[i] for i in order]
        letter = GPQA_LETTERS[list(order).index(0)]
        listed = "\n".join(f"{L}) {text}" for L, text in zip(GPQA_LETTERS, options))
        problems.append(Problem(
            id=f"{spec.name}:{record}",
            prompt=MC_TEMPLATE.format(question=question, options=listed),
            answer=letter,
            meta={"options": options, "question": question, "target": f"\\boxed{{{letter}}}",
                  "subdomain": text_of(field_of(row, "Subdomain")),
                  "field": text_of(field_of(row, "High-level domain"))},
        ))
    return problems


def choice_letters(question: str, gold: str) -> str:
    """The option letters an HLE multiple-choice question lists ("A. ...", "B) ..." at line starts),
    at least A-E and the gold letter, so a response naming any listed option is read."""
    listed = re.findall(r"(?m)^\s*([A-Z])[.)]\s", question)
    last = max(listed + ["E", gold[:1].upper() or "E"])
    return string.ascii_uppercase[:string.ascii_uppercase.index(last) + 1]


def hle_problems(rows: Rows, spec: BenchmarkSpec, seed: int) -> list[Problem]:
    """Text-only HLE items (rows with an image are dropped)."""
    problems = []
    for index, row in enumerate(rows):
        if text_of(field_of(row, "image", default="")):
            continue
        item = text_of(field_of(row, "id", default="")) or str(index)
        question, answer = text_of(field_of(row, "question")), text_of(field_of(row, "answer"))
        kind = text_of(field_of(row, "answer_type", default="exactMatch"))
        if kind not in ("exactMatch", "multipleChoice"):
            raise HarnessError(f"benchmark {spec.name}: item {item} has answer_type {kind!r} "
                               "(valid: exactMatch, multipleChoice)")
        meta = {"answer_type": kind, "question": question, "target": f"\\boxed{{{answer}}}",
                "category": text_of(field_of(row, "category")), "subject": text_of(field_of(row, "raw_subject"))}
        if kind == "multipleChoice":
            letter = re.match(r"\(?([A-Za-z])\)?(?:[.):\s]|$)", answer)  # "B", "(B)", "B. text" -> "B"
            answer = letter.group(1).upper() if letter else answer
            meta["letters"] = choice_letters(question, answer)
        problems.append(Problem(f"{spec.name}:{item}", QA_TEMPLATE.format(question=question), answer, meta))
    return problems


def simpleqa_part(row_id: str) -> str:
    """"eval" for the fixed 20 % of SimpleQA held out for evaluation, else "train" (hash of the id)."""
    return "eval" if stable_fraction(f"simpleqa:{row_id}") < SIMPLEQA_EVAL_FRACTION else "train"


def simpleqa_problems(rows: Rows, spec: BenchmarkSpec, seed: int) -> list[Problem]:
    """The rows of `spec.options["part"]`; the row id is the `id` column, else the row index (the
    hub copy has no id column, and the local file's id is the row index)."""
    problems = []
    for index, row in enumerate(rows):
        row_id = text_of(field_of(row, "id", default=index))
        if simpleqa_part(row_id) != spec.options["part"]:
            continue
        question, answer = text_of(field_of(row, "problem")), text_of(field_of(row, "answer"))
        meta = {"question": question, "target": f"\\boxed{{{answer}}}", **simpleqa_labels(row)}
        problems.append(Problem(f"{spec.name}:{row_id}", QA_TEMPLATE.format(question=question), answer, meta))
    return problems


def simpleqa_labels(row: dict[str, Any]) -> dict[str, str]:
    """topic and answer_type, from their columns or from the hub's `metadata` dict string."""
    labels = {"topic": field_of(row, "topic"), "answer_type": field_of(row, "answer_type")}
    metadata = field_of(row, "metadata")
    if isinstance(metadata, str) and metadata.startswith("{"):
        try:
            metadata = ast.literal_eval(metadata)
        except (ValueError, SyntaxError):
            metadata = None
    if isinstance(metadata, dict):
        labels = {k: labels[k] if labels[k] is not None else metadata.get(k) for k in labels}
    return {k: text_of(v) for k, v in labels.items() if v is not None}


register_benchmark(BenchmarkSpec(
    name="gpqa", domain="science", filename="science_qa/gpqa_diamond.csv", hub="Idavidrein/gpqa",
    hub_config="gpqa_diamond", hub_split="train", grader="mc_letter-v1", to_problems=gpqa_problems,
    template="science-mc-v1",
    note="gated on the hub; the authors ask that it never be posted in plain text: download dataset.zip "
         "from github.com/idavidrein/gpqa and pass the csv"))
register_benchmark(BenchmarkSpec(
    name="hle", domain="science", filename="science_qa/hle.parquet", hub="cais/hle", hub_split="test",
    grader="hle_match-v1", to_problems=hle_problems, template="science-qa-v1",
    note="gated on the hub; request access to cais/hle, then pass a local copy; never commit it"))
for _name, _part in (("simpleqa", "eval"), ("simpleqa_train", "train")):
    register_benchmark(BenchmarkSpec(
        name=_name, domain="science", filename="science_qa/simpleqa.jsonl", hub="basicv8vc/SimpleQA",
        hub_split="test", grader="normalized_match-v1", to_problems=simpleqa_problems, template="science-qa-v1",
        options={"part": _part}))
