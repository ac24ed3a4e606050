"""Validity gates (reports/validity.py) on synthetic run stores that pass and fail each gate."""
import json

import pandas as pd
import pytest

from reports import validity, write_report
from reports.analysis import suites
from reports.sections import analyse
from reports.load import RunStore
from reports.answers import answers
from tests.test_report import eval_row, make_cell

SEEDS = range(4)
# The passing store: ppo gains 43 points clean (0.20 -> 0.60-0.66), 33 under flip0.2+corrected
# (77 % recovered), 13 under flip0.2; the frozen critic ends 21 points below ppo; the critic explains
# 0.5 of the variance in the second half; OOD starts at 10 % and gains 10; the retest sd is 0.5 point.
GOOD = {
    "start_id": 0.20, "start_ood": 0.10,
    "ppo": {"none": [0.60, 0.62, 0.64, 0.66], "flip0.2": [0.30, 0.32, 0.34, 0.36], "flip0.2+corrected": [0.50, 0.52, 0.54, 0.56]},
    "frozen": [0.40, 0.43, 0.41, 0.44], "ood_final": 0.20, "ev": (0.1, 0.5), "retest": 0.005,
}


def build(root, p, frozen=True, retest=True, metrics=True, ceiling=None):
    for algo, finals in (("ppo", p["ppo"]), ("ppo_frozen_critic", {"none": p["frozen"]} if frozen else {})):
        for noise, values in finals.items():
            for seed, v in zip(SEEDS, values):
                extra = {} if ceiling is None else {"ceiling": ceiling[seed] if isinstance(ceiling, list) else ceiling}
                rows = [eval_row(0, "b_id", "ID", p["start_id"], **extra), eval_row(0, "b_ood", "OOD", p["start_ood"]),
                        eval_row(10, "b_id", "ID", v, **extra), eval_row(10, "b_ood", "OOD", p["ood_final"])]
                ev = [{"step": s, "critic/explained_var": p["ev"][s >= 5]} for s in range(1, 11)]
                make_cell(root, "s", algo, noise, seed, rows=rows,
                          metrics=ev if (metrics and algo == "ppo") else [{"step": s} for s in range(1, 11)])
    if retest:
        (root / "s" / "retest.json").write_text(json.dumps({"sd": p["retest"], "repeats": 5}))
    return root


def gates_of(root):
    """The suite's gates indexed by (gate, setting), without the rest of the analysis."""
    store = RunStore(root)
    [suite] = suites(store, "ppo")
    df = validity.gates(store, suite, "ppo")
    return df, df.set_index(["gate", "setting"])


def variant(**changes):
    p = json.loads(json.dumps(GOOD))
    for key, value in changes.items():
        if key in ("none", "flip0.2+corrected"):
            p["ppo"][key] = value
        else:
            p[key] = value
    return p


def test_a_valid_store_passes_every_gate_and_keeps_its_answers(tmp_path):
    root = build(tmp_path / "runs", GOOD)
    [report] = analyse(RunStore(root), "ppo")
    g = report.validity.set_index(["gate", "setting"])
    assert set(g["status"]) == {"pass"}
    assert g.loc[("positive control", "flip0.2"), "value"] == pytest.approx(0.33 / 0.43)
    assert "gains +33.0 of the clean +43.0 points ID AVG: 77% recovered (flip0.2 uncorrected: +13.0)" in \
        g.loc[("positive control", "flip0.2"), "detail"]
    assert g.loc[("critic explained variance", "none"), "value"] == pytest.approx(0.5)  # steps 5-10 of 10
    assert g.loc[("PPO vs frozen critic", "none"), "value"] == pytest.approx(0.21)
    assert g.loc[("headroom", "none"), "value"] == pytest.approx(1 - 0.63)
    assert g.loc[("test-retest sd", "all"), "value"] == pytest.approx(0.005)
    assert g.loc[("OOD above floor", "none"), "value"] == pytest.approx(0.10)
    [(suite, sentences)] = answers([report], "ppo")
    assert suite == "s" and sentences[0].startswith("ppo_frozen_critic vs ppo under none: -21.0 points ID AVG")


@pytest.mark.parametrize("changes, gate, setting, by", [
    ({"flip0.2+corrected": [0.28, 0.30, 0.32, 0.34]}, "positive control", "flip0.2",
     "26% recovered (flip0.2 uncorrected: +13.0); short of 70% by 44 points"),  # 0.11 / 0.43 = 25.6 %
    ({"ev": (0.0, 0.05)}, "critic explained variance", "none", "short of 0.30 by 0.25"),
    ({"frozen": [0.58, 0.63, 0.63, 0.66]}, "PPO vs frozen critic", "none", "the critic does not help significantly"),
    ({"none": [0.92, 0.93, 0.94, 0.95], "frozen": [0.70, 0.72, 0.71, 0.74],
      "flip0.2+corrected": [0.80, 0.81, 0.82, 0.83]}, "headroom", "none", "6.5 points of headroom; short of 10.0 by 3.5"),
    ({"retest": 0.03}, "test-retest sd", "all", "sd 3.0 points over repeated evaluations (5 repeats); above 1.0 by 2.0"),
    ({"start_ood": 0.03, "ood_final": 0.035}, "OOD above floor", "none",
     "start below 5.0 % by 2.0 points; no policy moves 2.0 points: short by 1.5"),
])
def test_each_gate_fails_alone_and_withholds_the_answers_saying_by_how_much(tmp_path, changes, gate, setting, by):
    df, g = gates_of(build(tmp_path / "runs", variant(**changes)))
    failed = g[g["status"] == "FAIL"]
    assert list(failed.index) == [(gate, setting)]
    assert by in failed.iloc[0]["detail"]
    sentences = validity.gated(df, ["first answer", "second answer"])
    assert len(sentences) == 1 and sentences[0].startswith("Withheld (2 answers): the testbed failed 1 validity gate")
    assert f"Failed: {gate} ({setting}): " in sentences[0] and by in sentences[0]


def test_headroom_is_measured_against_the_ceiling_the_benchmarks_record(tmp_path):
    """A suite whose problems cap the score (chain's hidden addends) records the best expected score
    in its eval rows, for its seed's problems; the best clean final (0.63 mean) is then 7 points below
    the seeds' mean ceiling of 0.70, not 37 below 100 %: the gate fails. At 0.80 it passes with 17."""
    _, g = gates_of(build(tmp_path / "a", GOOD, ceiling=[0.66, 0.70, 0.74, 0.70]))
    row = g.loc[("headroom", "none")]
    assert row["status"] == "FAIL" and row["value"] == pytest.approx(0.07)
    assert "short of 10.0 by 3.0" in row["detail"] and "70.0 %" in row["needs"]
    _, g = gates_of(build(tmp_path / "b", GOOD, ceiling=0.80))
    assert g.loc[("headroom", "none"), "status"] == "pass"
    assert g.loc[("headroom", "none"), "value"] == pytest.approx(0.17)


def test_the_positive_control_ratio_by_hand(tmp_path):
    _, g = gates_of(build(tmp_path / "runs", variant(**{"flip0.2+corrected": [0.28, 0.30, 0.32, 0.34]})))
    assert g.loc[("positive control", "flip0.2"), "value"] == pytest.approx(0.11 / 0.43)


def test_the_review_of_arith_fails_the_critic_frozen_and_ood_gates(tmp_path):
    """The issue's arith: explained variance about 0, PPO with a frozen critic scores like PPO, OOD
    stays at its floor of about 9 % for every algorithm."""
    p = variant(ev=(0.08, -0.02), frozen=[0.61, 0.60, 0.65, 0.66], start_ood=0.09, ood_final=0.092)
    df, g = gates_of(build(tmp_path / "runs", p))
    assert sorted(g.index[g["status"] == "FAIL"]) == [("OOD above floor", "none"), ("PPO vs frozen critic", "none"),
                                                      ("critic explained variance", "none")]
    assert g.loc[("critic explained variance", "none"), "value"] == pytest.approx(-0.02)
    assert "no policy moves 2.0 points: short by 1.8" in g.loc[("OOD above floor", "none"), "detail"]
    assert validity.gated(df, ["an answer"])[0].startswith("Withheld (1 answer): the testbed failed 3 validity gates")


def test_missing_cells_are_not_measured_and_withhold_nothing(tmp_path):
    df, g = gates_of(build(tmp_path / "runs", GOOD, frozen=False, retest=False, metrics=False))
    assert g.loc[("PPO vs frozen critic", "none"), "status"] == "not measured"
    assert g.loc[("critic explained variance", "none"), "status"] == "not measured"
    assert g.loc[("test-retest sd", "all"), "status"] == "not measured"
    assert "harness eval --retest" in g.loc[("test-retest sd", "all"), "detail"]
    assert set(g["status"]) == {"pass", "not measured"}
    assert validity.gated(df, ["an answer"]) == ["an answer"]


def test_a_noise_without_known_rates_has_no_control(tmp_path):
    root = build(tmp_path / "runs", GOOD)
    for seed in SEEDS:
        make_cell(root, "s", "ppo", "pseudo8", seed, rows=[eval_row(0, "b_id", "ID", 0.2), eval_row(10, "b_id", "ID", 0.3)])
    _, g = gates_of(root)
    assert g.loc[("positive control", "pseudo8"), "status"] == "not measured"
    assert "pseudo8 has no known rates" in g.loc[("positive control", "pseudo8"), "detail"]


def test_an_unreadable_retest_record_is_not_measured(tmp_path):
    root = build(tmp_path / "runs", GOOD)
    (root / "s" / "retest.json").write_text("{not json")
    _, g = gates_of(root)
    assert g.loc[("test-retest sd", "all"), "status"] == "not measured"
    assert "needs a JSON object with a number 'sd'" in g.loc[("test-retest sd", "all"), "detail"]


def test_the_report_has_a_validity_section_and_csv(tmp_path):
    root = build(tmp_path / "runs", variant(retest=0.03))
    out = write_report(root, formats="md,tex,csv")
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "### Validity" in md and "| test-retest sd | all | FAIL | <= 1.0 points |" in md
    rows = [line for line in md.splitlines() if line.startswith("| OOD above floor |")]
    assert len(rows) == 1 and rows[0].count("|") == 6  # five cells: no '|' inside one
    assert "- Withheld (" in md
    assert "Validity" in (out / "report.tex").read_text(encoding="utf-8")
    csv = pd.read_csv(out / "csv" / "validity.csv")
    assert list(csv.columns) == ["suite", "gate", "setting", "status", "value", "needs", "detail"]
    assert (csv["status"] == "FAIL").sum() == 1


def test_the_validity_preset_runs_the_cells_every_gate_reads(tmp_path):
    from harness.resolver import build_cells, parse_seeds
    from tests.test_runfile import parse

    args, origin = parse(["run", "--preset", "validity"])
    cells = build_cells(args.suite, args.algos.split(","), args.noise, parse_seeds(args.seeds), tmp_path,
                        model=args.model, steps=args.steps, overrides=origin.overrides)
    have = {(c.cfg.algo, c.cfg.noise) for c in cells}
    assert {(validity.CRITIC_ALGO, validity.CLEAN), (validity.FROZEN_ALGO, validity.CLEAN),
            (validity.CRITIC_ALGO, "flip0.2" + validity.CONTROL)} <= have
    assert len(parse_seeds(args.seeds)) >= 10  # PPO vs its frozen critic: paired, 10 seeds
    assert args.suite == "chain" and {c.cfg.train.steps for c in cells} == {120}  # the testbed, at its own budget
    assert parse(["run", "--preset", "validity", "--suite", "math"])[0].suite == "math"  # another suite by flag


def test_a_control_without_its_plain_setting_still_has_its_row(tmp_path):
    root = build(tmp_path / "runs", GOOD)
    import shutil
    shutil.rmtree(root / "s" / "ppo" / "flip0.2")
    _, g = gates_of(root)
    assert g.loc[("positive control", "flip0.2"), "status"] == "pass"
    assert g.loc[("positive control", "flip0.2"), "value"] == pytest.approx(0.33 / 0.43)
    assert "uncorrected" not in g.loc[("positive control", "flip0.2"), "detail"]
