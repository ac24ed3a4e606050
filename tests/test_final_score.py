"""A score that measures the policy: avg@k with a sample stream per problem, the final score as the
mean of the last `eval.final_evals` evaluations, and `harness eval --retest`."""
from __future__ import annotations

import json
import math
import statistics

import pytest

from harness.cli import main
from harness.model_eval import ModelEvaluation
from harness.resolver import eval_config
from reports import collect_final_scores
from reports.load import RunStore, final_steps
from tests.conftest import FAST
from tests.test_report import eval_row, make_cell


def cell_with(root, seed, rows, final_evals=None, problems=()):
    cell = make_cell(root, "chain", "ppo", "none", seed, rows=rows, problems=problems)
    if final_evals is not None:
        (cell / "config.json").write_text(json.dumps({"eval": {"final_evals": final_evals}}))
    (cell / "status.json").write_text(json.dumps({"state": "done", "steps": 100}))
    return cell


def curve(values_by_step):
    return [eval_row(step, "chain_id", "ID", v) for step, v in values_by_step.items()]


def test_final_steps_are_the_last_m_after_step_0():
    assert final_steps([0, 50, 100], 2) == [50, 100]
    assert final_steps([0, 50, 100], 5) == [50, 100]  # fewer evaluations than m: those there are
    assert final_steps([100, 0, 50, 50], 1) == [100]
    assert final_steps([0], 3) == [0]  # only the initial evaluation: it is the last one
    assert final_steps([], 2) == []


def test_the_final_score_is_the_mean_of_the_cells_last_evaluations(tmp_path):
    root = tmp_path / "runs"
    steps = {0: 0.1, 25: 0.2, 50: 0.3, 75: 0.5, 100: 0.6}
    cell_with(root, 0, curve(steps), final_evals=3)  # (0.3 + 0.5 + 0.6) / 3
    cell_with(root, 1, curve(steps), final_evals=1)  # the last alone
    cell_with(root, 2, curve(steps))  # no eval.final_evals in its config (an older cell): 1
    store = RunStore(root)
    finals = store.final_scores().set_index("seed")["value"]
    assert finals[0] == pytest.approx(1.4 / 3) and finals[1] == pytest.approx(0.6) and finals[2] == pytest.approx(0.6)
    cells = collect_final_scores(root).set_index("seed")
    assert cells.loc[0, "id_acc"] == pytest.approx(1.4 / 3) and cells.loc[0, "step"] == 100
    assert store.cells.set_index("seed").loc[0, "final_steps"] == "50,75,100"
    # The initial score stays step 0, so the gain is final - initial.
    assert store.initial_scores().set_index("seed")["value"][0] == pytest.approx(0.1)


def test_a_nan_in_the_window_leaves_that_benchmark_without_a_final_score(tmp_path):
    root = tmp_path / "runs"
    rows = curve({0: 0.1, 50: float("nan"), 100: 0.6}) + [eval_row(s, "chain_ood", "OOD", 0.2) for s in (0, 50, 100)]
    cell_with(root, 0, rows, final_evals=2)
    finals = RunStore(root).final_scores()
    assert list(finals["benchmark"]) == ["chain_ood"] and finals["value"].iloc[0] == pytest.approx(0.2)
    assert math.isnan(collect_final_scores(root)["id_acc"].iloc[0])


def test_per_problem_final_scores_average_the_window(tmp_path):
    root = tmp_path / "runs"
    problems = [{"step": s, "benchmark": "chain_id", "role": "ID", "problem": "p1", "score": v}
                for s, v in ((0, 0.0), (50, 0.25), (100, 0.75))]
    cell_with(root, 0, curve({0: 0.0, 50: 0.25, 100: 0.75}), final_evals=2, problems=problems)
    got = RunStore(root).final_problems()
    assert len(got) == 1 and got["score"].iloc[0] == pytest.approx(0.5) and got["step"].iloc[0] == 100


def test_a_bad_final_evals_in_a_config_marks_the_cell_corrupt(tmp_path):
    root = tmp_path / "runs"
    cell_with(root, 0, curve({0: 0.1, 100: 0.6}), final_evals=0)
    cells = RunStore(root).cells
    assert cells["state"].iloc[0] == "corrupt" and "final_evals must be a positive integer" in cells["reason"].iloc[0]


# ---- sampling: a stream per problem ----------------------------------------------------------------

SAMPLED = {**{k: FAST[k] for k in ("model.warmstart_steps", "suite.n_eval", "suite.n_train")},
           "eval.k": "4", "eval.temperature": "1.0"}


def responses(cache_dir, **extra):
    cfg, _ = eval_config("tiny", "arith", {**SAMPLED, **extra})
    evaluation = ModelEvaluation(cfg, cache_dir)
    rows = evaluation.evaluate(7)
    by_problem: dict[tuple[str, str], list[str]] = {}
    for r in evaluation.eval_responses:
        by_problem.setdefault((r["benchmark"], r["problem"]), []).append(r["response"])
    return rows, by_problem


def test_a_problems_samples_do_not_depend_on_the_batch_or_the_other_problems(cache_dir):
    rows, full = responses(cache_dir)
    assert [r["metric"] for r in rows] == ["avg@4", "pass@4", "avg@4", "pass@4"]
    _, small_batches = responses(cache_dir, **{"eval.batch_size": "3"})
    _, fewer = responses(cache_dir, **{"eval.limit": "5"})
    assert small_batches == full
    assert all(fewer[key] == full[key] for key in fewer) and len(fewer) == 10
    assert len({tuple(v) for v in full.values()}) > 1 and any(len(set(v)) > 1 for v in full.values())
    # Another evaluation seed draws other samples of the same policy.
    _, other = responses(cache_dir, **{"eval.sample_seed": "1"})
    assert other.keys() == full.keys() and other != full


def test_retest_prints_the_sd_of_repeated_final_scores(cache_dir, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--model", "tiny", "--suite", "arith", "--cache-dir", str(cache_dir), "--eval-limit", "6",
            *[a for k, v in SAMPLED.items() for a in ("--set", f"{k}={v}")], "--set", "eval.final_evals=2"]
    assert main([*args, "--retest", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["ID", "OOD"]
    assert "over 3 repeats (each the mean of 2 evaluation(s) at k=4)" in out[0]
    assert list(tmp_path.iterdir()) == []  # writes nothing
    # The sd is that of the repeats' means of 2 evaluations under sample seeds 0..5, by hand.
    cfg, _ = eval_config("tiny", "arith", {**SAMPLED, "eval.limit": "6"})
    evaluation = ModelEvaluation(cfg, cache_dir)
    ids = []
    for s in range(6):
        evaluation.cfg.eval.sample_seed = s
        ids.append(next(r["value"] for r in evaluation.evaluate(0) if r["metric"] == "avg@4" and r["role"] == "ID"))
    finals = [(ids[0] + ids[1]) / 2, (ids[2] + ids[3]) / 2, (ids[4] + ids[5]) / 2]
    assert f"final score {100 * statistics.fmean(finals):.2f} %: test-retest sd {100 * statistics.stdev(finals):.2f}" in out[0]
    # Greedy: every evaluation is the same; --retest-into records the sd where the report's gate reads it.
    assert main(["eval", "--model", "tiny", "--suite", "arith", "--cache-dir", str(cache_dir), "--eval-limit", "6",
                 "--set", "model.warmstart_steps=30", "--set", "suite.n_eval=16", "--set", "suite.n_train=200",
                 "--retest", "2", "--retest-into", str(tmp_path / "runs")]) == 0
    assert "test-retest sd 0.00 points" in capsys.readouterr().out
    record = json.loads((tmp_path / "runs" / "arith" / "retest.json").read_text())
    assert record["sd"] == 0.0 and record["repeats"] == 2 and set(record["roles"]) == {"ID", "OOD"}
    from reports.validity import retest_gate
    from tasks import SUITES

    gate = retest_gate(tmp_path / "runs", SUITES.get("arith"))
    assert gate["status"] == "pass" and gate["value"] == 0.0


def test_retest_needs_two_repeats(capsys, cache_dir):
    assert main(["eval", "--model", "tiny", "--cache-dir", str(cache_dir), "--retest", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--retest needs at least 2 repeats" in err


@pytest.mark.parametrize("args, message", [
    (["--retest", "101"], "--retest must be in 2..100"),
    (["--retest-into", "runs"], "--retest-into records a test-retest sd: give --retest R"),
])
def test_retest_bad_options_are_one_line_and_write_nothing(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []
