"""Science QA data (tasks/benchmarks/science.py): GPQA and HLE on synthetic fixtures in their real layouts,
SimpleQA on the shared file, and the graders on hand-written cases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.errors import HarnessError
from tasks.benchmarks import science
from tasks.base import Problem
from tasks.data import BENCHMARKS, GRADERS, DataSources, read_rows

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GPQA_FIXTURE = FIXTURES / "gpqa_synthetic.csv"
HLE_FIXTURE = FIXTURES / "hle_synthetic.jsonl"

# The correct option text of each synthetic GPQA record (hand-copied from the fixture, stripped).
GPQA_CORRECT = {"recSyn001": "4", "recSyn002": "Blue", "recSyn003": "4 zorbs", "recSyn004": "Planet Alpha",
                "recSyn005": "0", "recSyn006": "Fakease"}


def gpqa(seed: int = 0):
    return DataSources(paths={"gpqa": str(GPQA_FIXTURE)}).problems(BENCHMARKS.get("gpqa"), seed)


def hle():
    return DataSources(paths={"hle": str(HLE_FIXTURE)}).problems(BENCHMARKS.get("hle"))


# ---- GPQA -------------------------------------------------------------------------------------

def test_gpqa_problems_have_four_options_and_the_letter_of_the_correct_one():
    problems = gpqa()
    assert [p.id for p in problems] == [f"gpqa:recSyn00{i}" for i in range(1, 7)]
    for p in problems:
        record = p.id.split(":")[1]
        options = p.meta["options"]
        assert len(options) == 4 and len(set(options)) == 4
        assert options["ABCD".index(p.answer)] == GPQA_CORRECT[record]
        assert p.meta["target"] == f"\\boxed{{{p.answer}}}"
        for letter, text in zip("ABCD", options):
            assert f"\n{letter}) {text}" in p.prompt
        assert p.prompt.startswith("Answer the following multiple-choice question.")
        assert p.meta["grader"] == "mc_letter-v1" and p.meta["benchmark"] == "gpqa"
    assert problems[0].meta["subdomain"] == "Synthetic Biology" and problems[0].meta["field"] == "Biology"


def test_gpqa_shuffle_is_fixed_by_seed_and_record_id():
    first, again, other = gpqa(0), gpqa(0), gpqa(1)
    assert [p.meta["options"] for p in first] == [p.meta["options"] for p in again]
    assert any(a.meta["options"] != b.meta["options"] for a, b in zip(first, other))
    assert len({p.answer for p in first}) > 1  # the correct letter is not always in one place
    # the order depends on the record id, not on the row's position in the file
    rows = read_rows(GPQA_FIXTURE, "gpqa")[::-1]
    reversed_problems = science.gpqa_problems(rows, BENCHMARKS.get("gpqa"), 0)
    by_id = {p.id: p.meta["options"] for p in first}
    assert all(by_id[p.id] == p.meta["options"] for p in reversed_problems)


def test_gpqa_row_without_answers_is_an_error():
    rows = read_rows(GPQA_FIXTURE, "gpqa")
    del rows[2]["Incorrect Answer 3"]
    with pytest.raises(HarnessError, match="recSyn003"):
        science.gpqa_problems(rows, BENCHMARKS.get("gpqa"), 0)


def test_gpqa_grades_the_chosen_letter():
    grader = GRADERS.get("mc_letter-v1")
    p = gpqa()[0]
    wrong = next(L for L in "ABCD" if L != p.answer)
    assert grader.grade(f"Thinking...\n\\boxed{{{p.answer}}}", p) == 1.0
    assert grader.grade(f"Answer: {p.answer}", p) == 1.0
    assert grader.grade(f"\\boxed{{{wrong}}}", p) == 0.0
    assert grader.grade("no idea", p) == 0.0


LETTER_CASES = [
    ("\\boxed{C}", "C"),
    ("I think \\boxed{B} ... no wait, \\boxed{D}", "D"),  # the last box
    ("\\boxed{\\text{A}}", "A"),
    ("\\boxed{(B)}", "B"),
    ("\\boxed{B) 42 kg}", "B"),
    ("\\boxed{42}", None),  # a box without a letter: no answer, even if text follows
    ("The answer is (C).", "C"),
    ("Answer: D", "D"),
    ("**Answer:** B", "B"),
    ("the answer is **A**", "A"),
    ("D is tempting but the answer is A", "A"),
    ("Answer: B. Re-checking the units, the answer is D.", "D"),  # the last statement
    ("The answer is a bit unclear", None),  # lower-case "a" is the article
    ("Answer: Because of x", None),  # "B" of a word
    ("answer is A-ha", None),
    ("Answer: I think B is wrong, (C) is right", "C"),  # no stated letter: the last (X)
    ("Because (A) fails, (B) holds", "B"),
    ("C", "C"),
    (" (D). ", "D"),
    ("E", None),  # not an option of GPQA
    ("ANSWER: C\n", "C"),
    ("", None),
]


@pytest.mark.parametrize("response,expected", LETTER_CASES)
def test_letter_extraction(response, expected):
    assert science.extract_letter(response) == expected
    assert GRADERS.get("mc_letter-v1").extract(response) == expected


# ---- HLE ----------------------------------------------------------------------------------------

def test_hle_keeps_text_only_items():
    problems = hle()
    assert [p.id for p in problems] == ["hle:syn-hle-01", "hle:syn-hle-02", "hle:syn-hle-05", "hle:syn-hle-06"]
    kinds = {p.id: p.meta["answer_type"] for p in problems}
    assert kinds == {"hle:syn-hle-01": "exactMatch", "hle:syn-hle-02": "multipleChoice",
                     "hle:syn-hle-05": "exactMatch", "hle:syn-hle-06": "multipleChoice"}
    by_id = {p.id: p for p in problems}
    assert by_id["hle:syn-hle-02"].meta["letters"] == "ABCDEF"  # the question lists A-F
    assert by_id["hle:syn-hle-06"].meta["letters"] == "ABCDE"  # at least A-E
    assert by_id["hle:syn-hle-01"].answer == "Testville"
    assert by_id["hle:syn-hle-01"].prompt.endswith("what is the name of the fictional capital of Testland?")
    assert by_id["hle:syn-hle-01"].meta["target"] == "\\boxed{Testville}"


@pytest.mark.parametrize("item,response,expected", [
    ("syn-hle-01", "\\boxed{Testville}", 1.0),
    ("syn-hle-01", "Reasoning.\nThe answer is testville.", 1.0),
    ("syn-hle-01", "\\boxed{Testville city}", 0.0),  # exact match only: no span matching for HLE
    ("syn-hle-01", "\\boxed{Testland}", 0.0),
    ("syn-hle-02", "\\boxed{F}", 1.0),  # F is listed, so it is read
    ("syn-hle-02", "Answer: F", 1.0),
    ("syn-hle-02", "\\boxed{B}", 0.0),
    ("syn-hle-02", "\\boxed{999}", 0.0),  # the option's text is not its letter
    ("syn-hle-05", "\\boxed{7}", 1.0),
    ("syn-hle-05", "\\boxed{7 sides}", 0.0),
    ("syn-hle-06", "The answer is (A).", 1.0),
    ("syn-hle-06", "Answer: C", 0.0),
])
def test_hle_grading_dispatches_on_answer_type(item, response, expected):
    problem = {p.id: p for p in hle()}[f"hle:{item}"]
    assert GRADERS.get("hle_match-v1").grade(response, problem) == expected


def test_hle_unknown_answer_type_is_an_error():
    rows = read_rows(HLE_FIXTURE, "hle")
    rows[0]["answer_type"] = "freeForm"
    with pytest.raises(HarnessError, match="exactMatch, multipleChoice"):
        science.hle_problems(rows, BENCHMARKS.get("hle"), 0)


def test_hle_extract_reads_a_letter_or_a_short_answer():
    extract = GRADERS.get("hle_match-v1").extract
    assert extract("\\boxed{F}") == "F"
    assert extract("The answer is: The Testville!") == "testville"
    assert extract("") is None


# ---- SimpleQA -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def simpleqa_parts():
    sources = DataSources(data_dir=str(SHARED_DATA))
    return sources.problems(BENCHMARKS.get("simpleqa")), sources.problems(BENCHMARKS.get("simpleqa_train"))


def test_simpleqa_splits_by_id_hash_without_overlap(simpleqa_parts):
    evaluation, train = simpleqa_parts
    eval_ids = {p.id.split(":")[1] for p in evaluation}
    train_ids = {p.id.split(":")[1] for p in train}
    assert not eval_ids & train_ids
    assert eval_ids | train_ids == {str(i) for i in range(4326)}
    assert len(evaluation) == 835  # sha256 of "simpleqa:<id>" < 0.2: pinned, a change moves the eval set
    assert all(p.id.startswith("simpleqa:") for p in evaluation)
    assert all(p.id.startswith("simpleqa_train:") for p in train)
    assert all(science.simpleqa_part(i) == "eval" for i in eval_ids)


def test_simpleqa_problem_fields(simpleqa_parts):
    train = {p.id: p for p in simpleqa_parts[1]}
    first = train["simpleqa_train:0"]  # row 0 of the file
    assert first.answer == "Michio Sugeno"
    assert first.prompt == ("Answer the following question. Put your final answer within \\boxed{}.\n\n"
                            "Who received the IEEE Frank Rosenblatt Award in 2010?")
    assert first.meta["target"] == "\\boxed{Michio Sugeno}"
    assert first.meta["topic"] == "Science and technology" and first.meta["answer_type"] == "Person"
    assert first.meta["grader"] == "normalized_match-v1"


def test_simpleqa_reads_hub_rows_without_id_column():
    """The hub copy has columns metadata, problem, answer: the id is the row index."""
    rows = [{"metadata": "{'topic': 'Art', 'answer_type': 'Person', 'urls': []}", "problem": f"Q{i}?", "answer": "X"}
            for i in range(30)]
    evaluation = science.simpleqa_problems(rows, BENCHMARKS.get("simpleqa"), 0)
    train = science.simpleqa_problems(rows, BENCHMARKS.get("simpleqa_train"), 0)
    assert len(evaluation) + len(train) == 30 and evaluation
    assert {p.id.split(":")[1] for p in evaluation} == {str(i) for i in range(30) if science.simpleqa_part(str(i)) == "eval"}
    assert evaluation[0].meta["topic"] == "Art"


MATCH_CASES = [
    ("\\boxed{Michio Sugeno}", "Michio Sugeno", 1.0),
    ("The answer is michio sugeno.", "Michio Sugeno", 1.0),
    ("It was Michio Sugeno\nHe won it for fuzzy logic.", "Michio Sugeno", 1.0),  # gold as a span of a short line
    ("Sugeno", "Michio Sugeno", 0.0),
    ("Candidates: Alice Smith, Bob Jones, Carol White, Dan Brown, Michio Sugeno and others", "Michio Sugeno", 0.0),
    ("\\boxed{The Beatles}", "Beatles", 1.0),  # articles dropped
    ("Answer: U.S.A.", "USA", 1.0),  # punctuation dropped
    ("\\boxed{3.5}", "35", 0.0),  # a decimal point between digits stays
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1877}", "1877.", 1.0),
    ("Final Answer: Paris\nBecause it is the capital.", "Paris", 1.0),
    ("\\boxed{Parisian}", "Paris", 0.0),  # whole words only
    ("I don't know", "Paris", 0.0),
    ("\\boxed{Radcliffe}", "Radcliffe College", 0.0),
    ("", "Paris", 0.0),
    ("\\boxed{\\text{Adolf Anderssen}}", "Adolf Anderssen", 1.0),
]


@pytest.mark.parametrize("response,gold,expected", MATCH_CASES)
def test_normalized_match(response, gold, expected):
    problem = Problem("simpleqa:x", "Q?", gold)
    assert GRADERS.get("normalized_match-v1").grade(response, problem) == expected


def test_normalized_extract_and_regrade_against_it():
    extract = GRADERS.get("normalized_match-v1").extract
    assert extract("The answer is: The Beatles!") == "beatles"
    assert extract("\\boxed{ }") is None and extract("") is None
    label = extract("\\boxed{Michio Sugeno}")
    problem = Problem("simpleqa:x", "Q?", label)  # a pseudo-label replaces the gold
    assert GRADERS.get("normalized_match-v1").grade("It was Michio Sugeno.", problem) == 1.0


# ---- SimpleQA's judge grader --------------------------------------------------------------------

@pytest.fixture
def judge_reset(monkeypatch):
    monkeypatch.delenv("SIMPLEQA_JUDGE_MODEL", raising=False)
    science.set_judge(None)
    yield
    science.set_judge(None)


@pytest.mark.parametrize("reply,expected", [
    ("A", 1.0), ("B", 0.0), ("C", 0.0), (" A\n", 1.0), ("CORRECT", 1.0), ("NOT_ATTEMPTED", 0.0),
    ("INCORRECT", 0.0), ("I cannot decide", 0.0),
])
def test_judge_grader_with_a_fake_judge(judge_reset, reply, expected):
    prompts = []
    science.set_judge(lambda prompt: prompts.append(prompt) or reply)
    problem = Problem("simpleqa:0", "prompt", "Michio Sugeno", {"question": "Who won in 2010?"})
    assert GRADERS.get("simpleqa_judge-v1").grade("  It was Sugeno.  ", problem) == expected
    assert len(prompts) == 1
    assert "Question: Who won in 2010?\nGold target: Michio Sugeno\nPredicted answer: It was Sugeno.\n" in prompts[0]


def test_judge_grader_without_a_judge_is_an_error(judge_reset):
    problem = Problem("simpleqa:0", "prompt", "Paris", {"question": "Capital of France?"})
    with pytest.raises(HarnessError, match="simpleqa_judge-v1 needs a judge model"):
        GRADERS.get("simpleqa_judge-v1").grade("Paris", problem)


def test_judge_model_folder_that_does_not_exist_is_an_error(judge_reset, monkeypatch, tmp_path):
    monkeypatch.setenv("SIMPLEQA_JUDGE_MODEL", str(tmp_path / "no-such-model"))
    problem = Problem("simpleqa:0", "prompt", "Paris", {"question": "Capital of France?"})
    with pytest.raises(HarnessError, match="does not exist"):
        GRADERS.get("simpleqa_judge-v1").grade("Paris", problem)


def test_judge_from_a_local_model_folder_runs(judge_reset, tmp_path):
    """A random tiny Llama saved to a folder: the reply is noise, but loading and generating work."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    science.set_judge(str(tmp_path))
    problem = Problem("simpleqa:0", "prompt", "Paris", {"question": "Capital of France?"})
    assert GRADERS.get("simpleqa_judge-v1").grade("Paris", problem) in (0.0, 1.0)


# ---- registrations ------------------------------------------------------------------------------

def test_science_specs():
    expected = {
        "gpqa": ("science_qa/gpqa_diamond.csv", "Idavidrein/gpqa", "gpqa_diamond", "train", "mc_letter-v1", "science-mc-v1"),
        "hle": ("science_qa/hle.parquet", "cais/hle", None, "test", "hle_match-v1", "science-qa-v1"),
        "simpleqa": ("science_qa/simpleqa.jsonl", "basicv8vc/SimpleQA", None, "test", "normalized_match-v1", "science-qa-v1"),
        "simpleqa_train": ("science_qa/simpleqa.jsonl", "basicv8vc/SimpleQA", None, "test", "normalized_match-v1",
                           "science-qa-v1"),
    }
    for name, fields in expected.items():
        spec = BENCHMARKS.get(name)
        assert (spec.filename, spec.hub, spec.hub_config, spec.hub_split, spec.grader, spec.template) == fields
        assert spec.domain == "science"
    assert "never be posted in plain text" in BENCHMARKS.get("gpqa").note
    assert "never commit" in BENCHMARKS.get("hle").note
    assert BENCHMARKS.get("simpleqa").options == {"part": "eval"}
    assert BENCHMARKS.get("simpleqa_train").options == {"part": "train"}


def test_fixtures_are_synthetic():
    """GPQA and HLE must never be copied into the repository."""
    gpqa_rows = read_rows(GPQA_FIXTURE, "gpqa")
    hle_rows = [json.loads(line) for line in HLE_FIXTURE.read_text().splitlines()]
    assert all(r["Question"].startswith("Synthetic question") for r in gpqa_rows)
    assert all(r["question"].startswith("Synthetic question") for r in hle_rows)


def test_hle_multiple_choice_gold_is_read_as_a_letter():
    rows = [{"id": f"s{i}", "question": "Synthetic question: pick one\nA. 1\nB. 2", "image": "", "answer": answer,
             "answer_type": "multipleChoice"} for i, answer in enumerate(["B", "(b)", "B. 2", " b "])]
    assert [p.answer for p in science.hle_problems(rows, BENCHMARKS.get("hle"), 0)] == ["B", "B", "B", "B"]
