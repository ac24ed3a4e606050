"""SGD dialogue data (tasks/benchmarks/dialogue.py): problems from the shared files, hand-checked prompts and
golds, the act graders, and the converter from the hub's columnar layout (a synthetic fixture)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from harness.errors import HarnessError
from tasks.benchmarks import dialogue
from tasks.base import Problem
from tasks.data import BENCHMARKS, GRADERS, DataSources

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
DOMAINS = ("life_services", "transportation_travel", "financial_services")
EXACT, F1 = GRADERS.get("dialogue_acts-v1"), GRADERS.get("dialogue_acts_f1-v1")


@pytest.fixture(scope="module")
def sources():
    return DataSources(data_dir=str(SHARED_DATA))


@pytest.fixture(scope="module")
def problems(sources):
    """name -> problems, for the six sgd_* benchmarks."""
    out = {}
    for domain in DOMAINS:
        for name in (f"sgd_{domain}", f"sgd_{domain}_train"):
            out[name] = sources.problems(dialogue.with_schemas(BENCHMARKS.get(name), sources))
    return out


def system_turns(path: Path) -> int:
    return sum(t["speaker"] == "SYSTEM" for line in path.read_text().splitlines() for t in json.loads(line)["turns"])


# ---- problems from the shared files -------------------------------------------------------------

def test_one_problem_per_system_turn(problems):
    for domain in DOMAINS:
        for name, split in ((f"sgd_{domain}", "test"), (f"sgd_{domain}_train", "train")):
            expected = system_turns(SHARED_DATA / "dialogue" / f"sgd_{domain}_{split}.jsonl")
            assert expected > 0 and len(problems[name]) == expected, name
            assert len({p.id for p in problems[name]}) == expected
            assert all(p.meta["domain"] == domain and p.meta["grader"] == "dialogue_acts-v1" for p in problems[name])


def test_every_gold_grades_full_marks_against_itself(problems):
    for name, items in problems.items():
        for p in items:
            assert p.meta["target"] == p.answer
            assert EXACT.grade(p.answer, p) == 1.0 and F1.grade(p.answer, p) == 1.0, p.id
            assert EXACT.grade(EXACT.extract(p.answer), p) == 1.0, p.id


def test_first_system_turn_of_a_payment_dialogue(problems):
    p = {q.id: q for q in problems["sgd_financial_services"]}["sgd_financial_services:8_00030:1"]
    assert p.answer == '[{"act": "REQUEST", "slot": "amount", "values": []}]'
    assert p.prompt.startswith(
        "Service: Payment_1 (The fast, simple way to pay in apps, on the web, and in millions of stores)\nIntents:\n"
        "- RequestPayment: Request payment from someone; required: receiver, amount; optional: private_visibility\n"
        "- MakePayment: Send money to your friends; required: payment_method, amount, receiver; optional: private_visibility\n"
        "Slots: payment_method [app balance|debit card|credit card], amount, receiver, private_visibility [True|False]\n\n"
        "Dialogue so far:\nUser: I would like to send funds from my saving account to Amelia in private.\n\n"
        "What does the system do next?")
    assert "Latest service call" not in p.prompt and "\nSystem:" not in p.prompt
    assert p.meta["service"] == "Payment_1" and p.meta["dialogue_id"] == "8_00030" and p.meta["turn"] == 1


def test_confirm_turn_uses_canonical_values_in_sorted_order(problems):
    p = {q.id: q for q in problems["sgd_financial_services"]}["sgd_financial_services:8_00030:3"]
    # the system said "$116"; the user "one hundred and sixteen bucks": the canonical value is 116
    assert json.loads(p.answer) == [
        {"act": "CONFIRM", "slot": "amount", "values": ["116"]},
        {"act": "CONFIRM", "slot": "payment_method", "values": ["debit card"]},
        {"act": "CONFIRM", "slot": "private_visibility", "values": ["True"]},
        {"act": "CONFIRM", "slot": "receiver", "values": ["Amelia"]},
    ]
    assert p.prompt.count("\nUser: ") + p.prompt.count("\nSystem: ") == 3


def test_offer_turn_shows_the_service_call_and_results(problems):
    p = {q.id: q for q in problems["sgd_life_services"]}["sgd_life_services:10_00005:1"]
    assert json.loads(p.answer) == [{"act": "OFFER", "slot": "movie_title", "values": ["The Ladykillers"]},
                                    {"act": "OFFER", "slot": "percent_rating", "values": ["100"]}]
    assert ("Latest service call: FindMovies() -> 10 result(s)\n"
            "1. cast=Leonard Sharp; directed_by=Alexander Mackendrick; genre=Thriller; movie_title=The Ladykillers; "
            "percent_rating=100\n2. ") in p.prompt


def test_context_keeps_the_last_turns(sources, problems):
    last = {q.id: q for q in problems["sgd_life_services"]}["sgd_life_services:10_00005:9"]
    assert json.loads(last.answer) == [{"act": "GOODBYE", "slot": "", "values": []}]
    history = last.prompt.split("Dialogue so far:\n")[1].split("\n\n")[0].splitlines()
    assert len(history) == 6  # turns 3-8
    assert history[0] == "System: It's considered a thriller." and history[-1] == "User: Nope, thanks again."
    assert "User: What's the genre?" not in last.prompt  # turn 2 is 7 back
    assert "Latest service call: FindMovies()" in last.prompt  # the call is shown though its turn is not
    spec = dialogue.with_schemas(BENCHMARKS.get("sgd_life_services"), sources)
    short = replace(spec, options={**spec.options, "context_turns": 2})
    p = {q.id: q for q in sources.problems(short)}["sgd_life_services:10_00005:9"]
    assert p.prompt.split("Dialogue so far:\n")[1].split("\n\n")[0] == (
        "System: Need anything else right now?\nUser: Nope, thanks again.")


# ---- graders ------------------------------------------------------------------------------------

GOLD = Problem("sgd:x:1", "prompt", dialogue.acts_json({("CONFIRM", "amount", "116"), ("CONFIRM", "receiver", "Amelia")}))


@pytest.mark.parametrize("response,exact", [
    ('[{"act": "CONFIRM", "slot": "amount", "values": ["116"]}, {"act": "CONFIRM", "slot": "receiver", "values": ["Amelia"]}]', 1.0),
    ('[{"act": "CONFIRM", "slot": "receiver", "values": ["Amelia"]}, {"act": "CONFIRM", "slot": "amount", "values": ["116"]}]', 1.0),
    ('[{"act": "confirm", "slot": "receiver", "values": [" AMELIA "]}, {"act": "CONFIRM", "slot": "amount", "values": [116]}]', 1.0),
    ('Sure.\n```json\n[{"act": "CONFIRM", "slot": "amount", "values": ["116"]},\n'
     ' {"act": "CONFIRM", "slot": "receiver", "values": ["Amelia"]}]\n```\nDone.', 1.0),
    ('First guess [{"act": "GOODBYE"}], final: [{"act": "CONFIRM", "slot": "amount", "values": ["116"]}, '
     '{"act": "CONFIRM", "slot": "receiver", "values": ["Amelia"]}]', 1.0),  # the last JSON counts
    ('[{"act": "CONFIRM", "slot": "amount", "values": ["116"]}, {"act": "CONFIRM", "slot": "receiver", "values": ["Amelia"]}, '
     '{"act": "CONFIRM", "slot": "payment_method", "values": ["debit card"]}]', 0.0),  # an extra act
    ('[{"act": "CONFIRM", "slot": "amount", "values": ["116"]}]', 0.0),  # a missing act
    ('[{"act": "CONFIRM", "slot": "amount", "values": ["117"]}, {"act": "CONFIRM", "slot": "receiver", "values": ["Amelia"]}]', 0.0),
    ('[{"act": "CONFIRM", "slot": "amount", "values": ["116"]}, {"act": "CONFIRM", "slot": "receiver", "values": ["Amelia"]', 0.0),
    ("[1, 2]", 0.0),
    ('{"foo": 1}', 0.0),
    ("CONFIRM amount 116", 0.0),
])
def test_exact_grader(response, exact):
    assert EXACT.grade(response, GOLD) == exact


def test_f1_grader_on_a_hand_computed_case():
    response = ('[{"act": "CONFIRM", "slot": "amount", "values": ["116"]}, {"act": "CONFIRM", "slot": "receiver", '
                '"values": ["Bob"]}, {"act": "CONFIRM", "slot": "payment_method", "values": ["debit card"]}]')
    # 1 shared triple, 3 predicted, 2 gold: precision 1/3, recall 1/2, F1 = 2/5
    assert F1.grade(response, GOLD) == pytest.approx(0.4)
    assert EXACT.grade(response, GOLD) == 0.0
    assert F1.grade('[{"act": "CONFIRM", "slot": "amount"', GOLD) == 0.0  # malformed
    two_values = Problem("sgd:x:2", "p", '[{"act": "REQUEST", "slot": "account_type", "values": ["checking", "savings"]}]')
    # one of two values: precision 1, recall 1/2, F1 = 2/3
    assert F1.grade('[{"act": "REQUEST", "slot": "account_type", "values": ["savings"]}]', two_values) == pytest.approx(2 / 3)
    assert EXACT.grade('[{"act": "REQUEST", "slot": "account_type", "values": ["savings"]}]', two_values) == 0.0


def test_acts_without_slot_or_values():
    gold = Problem("sgd:x:3", "p", '[{"act": "GOODBYE", "slot": "", "values": []}]')
    assert EXACT.grade('{"act": "GOODBYE"}', gold) == 1.0
    assert EXACT.grade('[{"act": "GOODBYE", "slot": null, "values": null}]', gold) == 1.0
    assert EXACT.grade('[{"act": "REQ_MORE"}]', gold) == 0.0
    assert EXACT.grade("[]", gold) == 0.0


def test_extract_is_canonical_and_regradable():
    response = ('[{"act": "confirm", "slot": "Receiver", "values": ["Amelia"]}, '
                '{"act": "CONFIRM", "slot": "amount", "values": ["116"]}]')
    label = EXACT.extract(response)
    assert label == ('[{"act": "CONFIRM", "slot": "amount", "values": ["116"]}, '
                     '{"act": "CONFIRM", "slot": "receiver", "values": ["amelia"]}]')
    assert EXACT.extract("not json") is None
    assert EXACT.grade(response, replace(GOLD, answer=label)) == 1.0  # a pseudo-label replaces the gold


# ---- schemas ------------------------------------------------------------------------------------

def test_without_schemas_the_converter_refuses(sources):
    spec = replace(BENCHMARKS.get("sgd_financial_services"), prepare=None)
    with pytest.raises(HarnessError, match="schemas are not loaded"):
        sources.problems(spec)


def test_the_prepare_hook_binds_the_schemas(sources):
    spec = BENCHMARKS.get("sgd_financial_services")
    assert "schemas" not in spec.options
    assert sources.problems(spec) == sources.problems(dialogue.with_schemas(spec, sources))


def test_schemas_come_from_the_folder_of_a_suite_paths_file(tmp_path):
    shutil.copy(SHARED_DATA / "dialogue" / "sgd_financial_services_test.jsonl", tmp_path / "payments.jsonl")
    spec = BENCHMARKS.get("sgd_financial_services")
    sources = DataSources(paths={spec.name: str(tmp_path / "payments.jsonl")})
    with pytest.raises(HarnessError, match="no sgd_schemas.jsonl"):
        dialogue.with_schemas(spec, sources)
    shutil.copy(SHARED_DATA / "dialogue" / "sgd_schemas.jsonl", tmp_path / "sgd_schemas.jsonl")
    bound = dialogue.with_schemas(spec, sources)
    assert len(bound.options["schemas"]) == 38 and "Payment_1" in bound.options["schemas"]
    assert dialogue.with_schemas(bound, sources) is bound
    assert len(sources.problems(bound)) == system_turns(tmp_path / "payments.jsonl")


def test_a_service_without_schema_is_an_error(sources):
    spec = dialogue.with_schemas(BENCHMARKS.get("sgd_financial_services"), sources)
    schemas = {k: v for k, v in spec.options["schemas"].items() if k != "Payment_1"}
    with pytest.raises(HarnessError, match="Payment_1"):
        sources.problems(replace(spec, options={**spec.options, "schemas": schemas}))


# ---- the hub's columnar layout ------------------------------------------------------------------

def hub_row():
    return json.loads((FIXTURES / "sgd_hub_row.json").read_text())


EXPECTED_RECORD = {
    "dialogue_id": "99_00001", "domain": "financial_services", "services": ["Payment_9"],
    "turns": [
        {"speaker": "USER", "utterance": "Synthetic: send 20 dollars to Ada.", "frames": [{
            "service": "Payment_9",
            "actions": [
                {"act": "INFORM_INTENT", "slot": "intent", "values": ["MakePayment"], "canonical_values": ["MakePayment"]},
                {"act": "INFORM", "slot": "amount", "values": ["20 dollars"], "canonical_values": ["20"]}],
            "state": {"active_intent": "MakePayment", "requested_slots": [],
                      "slot_values": {"amount": ["20 dollars"], "receiver": ["Ada"]}}}]},
        {"speaker": "SYSTEM", "utterance": "Which card?", "frames": [{
            "service": "Payment_9",
            "actions": [{"act": "REQUEST", "slot": "payment_method", "values": ["debit card", "credit card"],
                         "canonical_values": ["debit card", "credit card"]}]}]},
        {"speaker": "USER", "utterance": "Debit card.", "frames": [{
            "service": "Payment_9",
            "actions": [{"act": "INFORM", "slot": "payment_method", "values": ["debit card"],
                         "canonical_values": ["debit card"]}],
            "state": {"active_intent": "MakePayment", "requested_slots": [],
                      "slot_values": {"amount": ["20 dollars"], "receiver": ["Ada"], "payment_method": ["debit card"]}}}]},
        {"speaker": "SYSTEM", "utterance": "Done, sent.", "frames": [{
            "service": "Payment_9",
            "actions": [{"act": "NOTIFY_SUCCESS", "slot": "", "values": [], "canonical_values": []}],
            "service_call": {"method": "MakePayment",
                             "parameters": {"amount": "20", "payment_method": "debit card", "receiver": "Ada"}},
            "service_results": [{"amount": "20", "payment_method": "debit card", "receiver": "Ada"}],
            "n_service_results": 1}]},
    ],
}


def test_hub_dialogue_to_record():
    assert dialogue.hub_dialogue_to_record(hub_row(), dialogue.HUB_ACT_NAMES, dialogue.HUB_SPEAKER_NAMES) == EXPECTED_RECORD


def test_hub_act_names_are_the_sorted_union_of_user_and_system_acts():
    assert len(dialogue.HUB_ACT_NAMES) == 18
    assert dialogue.HUB_ACT_NAMES[:4] == ("AFFIRM", "AFFIRM_INTENT", "CONFIRM", "GOODBYE")
    assert dialogue.HUB_ACT_NAMES[13] == "REQUEST"  # the fixture's REQUEST is label 13


def test_hub_schema_to_record():
    record = dialogue.hub_schema_to_record(json.loads((FIXTURES / "sgd_hub_schema.json").read_text()))
    assert record == {
        "service_name": "Payment_9", "description": "Synthetic payment service",
        "slots": [
            {"name": "receiver", "description": "Synthetic: who gets the money", "is_categorical": False,
             "possible_values": []},
            {"name": "payment_method", "description": "Synthetic: source of money", "is_categorical": True,
             "possible_values": ["debit card", "credit card"]}],
        "intents": [{"name": "MakePayment", "description": "Synthetic: send money", "is_transactional": True,
                     "required_slots": ["receiver", "payment_method"],
                     "optional_slots": {"private_visibility": "False"},
                     "result_slots": ["receiver", "payment_method"]}],
    }


def test_problems_from_hub_rows():
    schemas = dialogue.load_schemas([json.loads((FIXTURES / "sgd_hub_schema.json").read_text())])
    spec = BENCHMARKS.get("sgd_financial_services")
    spec = replace(spec, options={**spec.options, "schemas": schemas})
    other = hub_row()
    other["dialogue_id"], other["services"] = "99_00002", ["Payment_9", "Banks_1"]  # multi-service: left out
    problems = spec.to_problems([hub_row(), other], spec, 0)
    assert [p.id for p in problems] == ["sgd_financial_services:99_00001:1", "sgd_financial_services:99_00001:3"]
    assert problems[0].answer == '[{"act": "REQUEST", "slot": "payment_method", "values": ["credit card", "debit card"]}]'
    assert problems[1].answer == '[{"act": "NOTIFY_SUCCESS", "slot": "", "values": []}]'
    assert problems[0].prompt.startswith("Service: Payment_9 (Synthetic payment service)\nIntents:\n"
                                         "- MakePayment: Synthetic: send money; required: receiver, payment_method; "
                                         "optional: private_visibility\n"
                                         "Slots: receiver, payment_method [debit card|credit card]\n\n")
    assert ("Latest service call: MakePayment(amount=20, payment_method=debit card, receiver=Ada) -> 1 result(s)\n"
            "1. amount=20; payment_method=debit card; receiver=Ada\n\n") in problems[1].prompt


def test_without_a_local_file_schemas_come_from_the_hub_schema_config(monkeypatch):
    calls = []

    def fake_hub_rows(hub, spec):
        calls.append((hub, spec.hub_config, spec.hub_split))
        return [json.loads((FIXTURES / "sgd_hub_schema.json").read_text())]

    monkeypatch.setattr(dialogue, "hub_rows", fake_hub_rows)
    bound = dialogue.with_schemas(BENCHMARKS.get("sgd_financial_services_train"), DataSources())
    assert calls == [("google-research-datasets/schema_guided_dstc8", "schema", "train")]
    assert bound.options["schemas"]["Payment_9"]["intents"][0]["optional_slots"] == {"private_visibility": "False"}


def test_service_domains_and_specs():
    assert dialogue.service_domain("Payment_1") == "financial_services"
    assert dialogue.service_domain("RideSharing_2") == "transportation_travel"
    assert dialogue.service_domain("Services_4") == "life_services"
    assert dialogue.service_domain("Music_1") is None
    for domain in DOMAINS:
        test, train = BENCHMARKS.get(f"sgd_{domain}"), BENCHMARKS.get(f"sgd_{domain}_train")
        assert (test.filename, test.hub_split) == (f"dialogue/sgd_{domain}_test.jsonl", "test")
        assert (train.filename, train.hub_split) == (f"dialogue/sgd_{domain}_train.jsonl", "train")
        for spec in (test, train):
            assert spec.domain == "dialogue" and spec.grader == "dialogue_acts-v1"
            assert spec.template == "dialogue-acts-v1" and spec.options["domain"] == domain
            assert spec.hub == "google-research-datasets/schema_guided_dstc8" and spec.hub_config == "dialogues"
