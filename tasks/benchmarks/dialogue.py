"""Schema-Guided Dialogue (SGD): predict the system's next dialogue acts as JSON.

One problem per SYSTEM turn. The prompt gives the service schema (compact: intents with their
required and optional slots, slot names, the values of categorical slots), the latest service
call with its results (what the system saw before it spoke; needed for OFFER, INFORM_COUNT,
NOTIFY_*), and the last `context_turns` turns of the dialogue. The gold is the turn's actions as
(act, slot, value) triples, with SGD's `canonical_values` (the values in service calls and
results, e.g. "116" where the user said "one hundred and sixteen bucks"), written as JSON in a
canonical order: objects sorted by (act, slot), each with its sorted values.

Benchmarks: `sgd_<domain>` (the test dialogues) and `sgd_<domain>_train` for the domains
life_services, transportation_travel and financial_services. Graders: `dialogue_acts-v1` (1.0
iff the triple sets are equal) and `dialogue_acts_f1-v1` (F1 of the triple sets).

The converter needs the service schemas (`sgd_schemas.jsonl` next to the dialogue files, or the
hub's "schema" config). A converter receives rows only, so `with_schemas(spec, sources)` loads
them from the same place as the dialogues and binds them into `spec.options["schemas"]`; it is the
`prepare` hook of every sgd_* spec, so `sources.problems(spec)` calls it.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from tasks.base import Problem
from tasks.data import BenchmarkSpec, DataSources, Grader, Rows, hub_rows, read_rows, register_benchmark, register_grader

DOMAIN_FAMILIES = {
    "financial_services": ("Banks", "Payment"),
    "transportation_travel": ("Flights", "Buses", "Trains", "RideSharing", "RentalCars", "Travel", "Hotels"),
    "life_services": ("Restaurants", "Services", "Homes", "Events", "Movies", "Calendar", "Alarm", "Weather"),
}
SYSTEM_ACTS = ("INFORM", "REQUEST", "CONFIRM", "OFFER", "NOTIFY_SUCCESS", "NOTIFY_FAILURE", "INFORM_COUNT",
               "OFFER_INTENT", "REQ_MORE", "GOODBYE")
USER_ACTS = ("INFORM_INTENT", "NEGATE_INTENT", "AFFIRM_INTENT", "INFORM", "REQUEST", "AFFIRM", "NEGATE", "SELECT",
             "REQUEST_ALTS", "THANK_YOU", "GOODBYE")
# The ClassLabel names of google-research-datasets/schema_guided_dstc8 (config "dialogues").
HUB_ACT_NAMES = tuple(sorted(set(USER_ACTS + SYSTEM_ACTS)))
HUB_SPEAKER_NAMES = ("USER", "SYSTEM")
SCHEMA_FILE = "sgd_schemas.jsonl"
CONTEXT_TURNS = 6
SHOWN_RESULTS = 3

Triple = tuple[str, str, str]


def service_domain(service: str) -> str | None:
    """"Payment_1" -> "financial_services"; None for a family outside the three domains."""
    family = service.split("_")[0]
    return next((d for d, families in DOMAIN_FAMILIES.items() if family in families), None)


# ---- triples, JSON and graders -------------------------------------------------------------

def action_triples(actions: list[dict[str, Any]], fold: bool = True) -> set[Triple]:
    """(ACT, slot, value) triples of action objects; an act without values gives (ACT, slot, "").

    Values come from "canonical_values" when present, else "values" (else "value"); a single
    value may be a string. Acts are upper-cased, slots lower-cased, values stripped and, with
    `fold`, case-folded. Raises ValueError when an item is not an object with a string "act"."""
    triples = set()
    for item in actions:
        if not isinstance(item, dict) or not isinstance(item.get("act"), str) or not item["act"].strip():
            raise ValueError("every action needs a string 'act'")
        act, slot = item["act"].strip().upper(), str(item.get("slot") or "").strip().lower()
        values = next((item[k] for k in ("canonical_values", "values", "value") if item.get(k) is not None), [])
        values = values if isinstance(values, list) else [values]
        texts = [str(v).strip() for v in values] or [""]
        triples |= {(act, slot, t.casefold() if fold else t) for t in texts}
    return triples


def acts_json(triples: set[Triple]) -> str:
    """The canonical JSON of a triple set: objects sorted by (act, slot), values sorted."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for act, slot, value in sorted(triples):
        grouped.setdefault((act, slot), [])
        if value:
            grouped[(act, slot)].append(value)
    return json.dumps([{"act": a, "slot": s, "values": v} for (a, s), v in grouped.items()], ensure_ascii=False)


def parse_acts(response: str) -> set[Triple] | None:
    """The (case-folded) triples of the last JSON array or object in `response` that reads as
    actions (code fences and prose around it are ignored); None when there is none."""
    decoder, found, i = json.JSONDecoder(), None, 0
    while True:
        starts = [p for p in (response.find("[", i), response.find("{", i)) if p >= 0]
        if not starts:
            return found
        pos = min(starts)
        try:
            value, end = decoder.raw_decode(response, pos)
        except json.JSONDecodeError:
            i = pos + 1
            continue
        try:
            found = action_triples(value if isinstance(value, list) else [value])
        except ValueError:
            pass
        i = end


def grade_exact(response: str, problem: Problem) -> float:
    predicted = parse_acts(response)
    return float(predicted is not None and predicted == parse_acts(problem.answer))


def triple_f1(predicted: set[Triple], gold: set[Triple]) -> float:
    """F1 of two triple sets; 1.0 when both are empty."""
    if not predicted and not gold:
        return 1.0
    hits = len(predicted & gold)
    return 2 * hits / (len(predicted) + len(gold))


def grade_f1(response: str, problem: Problem) -> float:
    predicted = parse_acts(response)
    return 0.0 if predicted is None else triple_f1(predicted, parse_acts(problem.answer) or set())


def extract_acts(response: str) -> str | None:
    """The canonical JSON of the response's triples (case-folded, so votes merge case variants)."""
    predicted = parse_acts(response)
    return None if predicted is None else acts_json(predicted)


register_grader(Grader("dialogue_acts-v1", grade_exact, extract_acts))
register_grader(Grader("dialogue_acts_f1-v1", grade_f1, extract_acts))


# ---- prompts ------------------------------------------------------------------------------

def schema_text(schema: dict[str, Any]) -> str:
    """The service schema in a few lines: name, intents with slots, slot names (categorical ones
    with their values). Slot descriptions are left out to keep prompts short."""
    lines = [f"Service: {schema['service_name']} ({schema.get('description', '')})", "Intents:"]
    for intent in schema.get("intents", []):
        required = ", ".join(intent.get("required_slots", [])) or "none"
        optional = ", ".join(intent.get("optional_slots", {})) or "none"
        lines.append(f"- {intent['name']}: {intent.get('description', '')}; required: {required}; optional: {optional}")
    slots = [s["name"] + (f" [{'|'.join(s['possible_values'])}]" if s.get("is_categorical") and s.get("possible_values")
                          else "") for s in schema.get("slots", [])]
    lines.append("Slots: " + ", ".join(slots))
    return "\n".join(lines)


def service_call_text(frame: dict[str, Any]) -> str:
    """"Latest service call: Method(a=1, b=2) -> N results" and the first results, one a line."""
    call = frame["service_call"]
    params = ", ".join(f"{k}={v}" for k, v in call.get("parameters", {}).items())
    results = frame.get("service_results", [])
    count = frame.get("n_service_results", len(results))
    lines = [f"Latest service call: {call['method']}({params}) -> {count} result(s)"]
    lines += [f"{n}. " + "; ".join(f"{k}={v}" for k, v in r.items()) for n, r in enumerate(results[:SHOWN_RESULTS], 1)]
    return "\n".join(lines)


def latest_call(turns: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last frame with a service call in `turns` (the system's own turn included)."""
    for turn in reversed(turns):
        for frame in turn.get("frames", []):
            if frame.get("service_call", {}).get("method"):
                return frame
    return None


def dialogue_prompt(schema: dict[str, Any], turns: list[dict[str, Any]], index: int, context_turns: int) -> str:
    """The prompt for system turn `turns[index]`."""
    history = turns[max(0, index - context_turns):index]
    said = "\n".join(f"{t['speaker'].capitalize()}: {t['utterance']}" for t in history)
    call = latest_call(turns[:index + 1])
    parts = [schema_text(schema)]
    if call is not None:
        parts.append(service_call_text(call))
    parts.append("Dialogue so far:\n" + said)
    parts.append('What does the system do next? Reply with a JSON list of dialogue acts, each '
                 '{"act": ACT, "slot": SLOT, "values": [VALUES]}, with "slot": "" and "values": [] when it has none. '
                 f"Acts: {', '.join(SYSTEM_ACTS)}.")
    return "\n\n".join(parts)


# ---- problems -----------------------------------------------------------------------------

def dialogue_problems(records: Rows, schemas: dict[str, dict[str, Any]], domain: str,
                      context_turns: int = CONTEXT_TURNS, prefix: str = "sgd") -> list[Problem]:
    """One problem per system turn of the single-service `records` of `domain` (our record layout).
    Ids are "<prefix>:<dialogue_id>:<turn index>"."""
    problems = []
    for record in records:
        if record.get("domain") != domain or len(record.get("services", [])) != 1:
            continue
        service = record["services"][0]
        if service not in schemas:
            raise HarnessError(f"dialogue {record['dialogue_id']}: no schema for service {service!r} in "
                               f"{SCHEMA_FILE} (it has {len(schemas)} services)")
        turns = record["turns"]
        for index, turn in enumerate(turns):
            if turn["speaker"] != "SYSTEM":
                continue
            gold = acts_json(action_triples([a for f in turn["frames"] for a in f["actions"]], fold=False))
            problems.append(Problem(
                id=f"{prefix}:{record['dialogue_id']}:{index}",
                prompt=dialogue_prompt(schemas[service], turns, index, context_turns),
                answer=gold,
                meta={"target": gold, "dialogue_id": record["dialogue_id"], "turn": index, "service": service,
                      "domain": domain},
            ))
    return problems


def sgd_problems(rows: Rows, spec: BenchmarkSpec, seed: int) -> list[Problem]:
    """The converter of the sgd_* specs: rows in our layout or the hub's, schemas bound by `with_schemas`."""
    schemas = spec.options.get("schemas")
    if schemas is None:
        raise HarnessError(f"benchmark {spec.name}: the SGD service schemas are not loaded; load it with "
                           "tasks.benchmarks.dialogue.with_schemas(spec, sources) first")
    records = [hub_dialogue_to_record(r, HUB_ACT_NAMES, HUB_SPEAKER_NAMES) if isinstance(r.get("turns"), dict) else r
               for r in rows]
    return dialogue_problems(records, schemas, spec.options["domain"],
                             spec.options.get("context_turns", CONTEXT_TURNS), prefix=spec.name)


# ---- schemas ------------------------------------------------------------------------------

def load_schemas(rows: Rows) -> dict[str, dict[str, Any]]:
    """Service name -> schema, from `sgd_schemas.jsonl` rows or the hub's "schema" rows."""
    records = [hub_schema_to_record(r) if isinstance(r.get("slots"), dict) else r for r in rows]
    return {r["service_name"]: r for r in records}


def schema_rows(spec: BenchmarkSpec, sources: DataSources) -> Rows:
    """The schema rows from where `spec`'s dialogues come from: `sgd_schemas.jsonl` in the folder
    of the local dialogue file (or the data folder), else the hub's "schema" config."""
    local = sources.local_file(spec)
    if local is None:
        return hub_rows(sources.hub_id(spec), replace(spec, hub_config="schema"))
    folders = [local if local.is_dir() else local.parent]
    if sources.data_dir:
        folders += [Path(sources.data_dir) / "dialogue", Path(sources.data_dir)]
    for folder in folders:
        if (folder / SCHEMA_FILE).is_file():
            return read_rows(folder / SCHEMA_FILE, spec.name)
    raise HarnessError(f"benchmark {spec.name}: no {SCHEMA_FILE} (the SGD service schemas) next to {str(local)!r}; "
                       f"put it in that folder or in --data-dir")


def with_schemas(spec: BenchmarkSpec, sources: DataSources) -> BenchmarkSpec:
    """`spec` with its service schemas in `options["schemas"]` (unchanged when already there)."""
    if "schemas" in spec.options:
        return spec
    return replace(spec, options={**spec.options, "schemas": load_schemas(schema_rows(spec, sources))})


# ---- the hub's columnar layout --------------------------------------------------------------

def unzip(columns: dict[str, list] | list) -> list[dict[str, Any]]:
    """{"a": [1, 2], "b": [3, 4]} -> [{"a": 1, "b": 3}, {"a": 2, "b": 4}]: `datasets` stores a
    sequence of records as a record of sequences. A list of records passes through."""
    if isinstance(columns, list):
        return columns
    n = len(next(iter(columns.values()), []))
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def label(value: Any, names: tuple[str, ...] | list[str]) -> str:
    return names[value] if isinstance(value, int) else str(value)


def hub_frame(frame: dict[str, Any], speaker: str, act_names) -> dict[str, Any]:
    """One frame of a hub turn in our layout (state on user turns, service call on system turns)."""
    actions = [{"act": label(a["act"], act_names), "slot": a.get("slot") or "", "values": list(a.get("values") or []),
                "canonical_values": list(a.get("canonical_values") or [])} for a in unzip(frame["actions"])]
    out: dict[str, Any] = {"service": frame["service"], "actions": actions}
    state = frame.get("state") or {}
    if speaker == "USER" and state:
        values = state.get("slot_values") or {"slot_name": [], "slot_value_list": []}
        out["state"] = {"active_intent": state.get("active_intent", ""),
                        "requested_slots": list(state.get("requested_slots") or []),
                        "slot_values": dict(zip(values["slot_name"], map(list, values["slot_value_list"])))}
    call = frame.get("service_call") or {}
    if call.get("method"):
        params = call.get("parameters") or {"parameter_slot_name": [], "parameter_canonical_value": []}
        results = [dict(zip(r["service_slot_name"], r["service_canonical_value"]))
                   for r in (frame.get("service_results") or {}).get("service_results_list", [])]
        out["service_call"] = {"method": call["method"],
                               "parameters": dict(zip(params["parameter_slot_name"], params["parameter_canonical_value"]))}
        out["service_results"], out["n_service_results"] = results[:SHOWN_RESULTS], len(results)
    return out


def hub_dialogue_to_record(row: dict[str, Any], act_names=HUB_ACT_NAMES, speaker_names=HUB_SPEAKER_NAMES) -> dict[str, Any]:
    """A row of the hub's "dialogues" config (turns as columns, ClassLabel ints for speaker and
    act) in our record layout. `domain` is the service family's domain for a single-service
    dialogue, else None (the benchmarks keep single-service dialogues only, as the local subset)."""
    turns = []
    for turn in unzip(row["turns"]):
        speaker = label(turn["speaker"], speaker_names)
        frames = [hub_frame(f, speaker, act_names) for f in unzip(turn["frames"])]
        turns.append({"speaker": speaker, "utterance": turn["utterance"], "frames": frames})
    services = list(row["services"])
    return {"dialogue_id": row["dialogue_id"], "domain": service_domain(services[0]) if len(services) == 1 else None,
            "services": services, "turns": turns}


def hub_schema_to_record(row: dict[str, Any]) -> dict[str, Any]:
    """A row of the hub's "schema" config in the layout of `sgd_schemas.jsonl`."""
    intents = []
    for intent in unzip(row["intents"]):
        optional = intent.get("optional_slots") or {"slot_name": [], "slot_value": []}
        intents.append({**intent, "required_slots": list(intent.get("required_slots") or []),
                        "optional_slots": dict(zip(optional["slot_name"], optional["slot_value"])),
                        "result_slots": list(intent.get("result_slots") or [])})
    slots = [{**s, "possible_values": list(s.get("possible_values") or [])} for s in unzip(row["slots"])]
    return {"service_name": row["service_name"], "description": row.get("description", ""), "slots": slots,
            "intents": intents}


for _domain in DOMAIN_FAMILIES:
    for _suffix, _split in (("", "test"), ("_train", "train")):
        register_benchmark(BenchmarkSpec(
            name=f"sgd_{_domain}{_suffix}", domain="dialogue", filename=f"dialogue/sgd_{_domain}_{_split}.jsonl",
            hub="google-research-datasets/schema_guided_dstc8", hub_config="dialogues", hub_split=_split,
            grader="dialogue_acts-v1", to_problems=sgd_problems, template="dialogue-acts-v1",
            options={"domain": _domain, "context_turns": CONTEXT_TURNS}, prepare=with_schemas,
            note="the service schemas (sgd_schemas.jsonl) must sit next to the dialogue file"))
