import json
import math
import os

import pandas as pd
import pytest

from harness.errors import HarnessError
from reports import collect_final_scores, write_report
import reports.tables as tables


def eval_row(step, benchmark, role, value, metric="accuracy", **decoding):
    return {"step": step, "benchmark": benchmark, "role": role, "metric": metric, "value": value,
            "temperature": 0.0, "n": 1, **decoding}


def make_cell(root, suite, algo, noise, seed, state="done", rows=()):
    cell = root / suite / algo / noise / f"seed{seed}"
    cell.mkdir(parents=True)
    (cell / "status.json").write_text(json.dumps({"state": state}))
    (cell / "config.json").write_text("{}")
    (cell / "metrics.jsonl").write_text("")
    (cell / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return cell


def final(step, id_values, ood_values=None):
    """Rows at one step: id_values / ood_values map benchmark -> accuracy."""
    rows = [eval_row(step, b, "ID", v) for b, v in id_values.items()]
    rows += [eval_row(step, b, "OOD", v) for b, v in (ood_values or {}).items()]
    return rows


# Earlier evaluation step with other numbers: must be ignored (only the last step counts).
EARLY = final(50, {"math500": 0.9, "aime24": 0.9}, {"gpqa": 0.9})


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    # math / grpo / none: three finished seeds.
    #   ID  = mean(math500, aime24): seed0 (50+30)/2 = 40, seed1 (60+40)/2 = 50, seed2 (70+20)/2 = 45
    #         mean 45.0; deviations -5, +5, 0 -> sample var (25+25+0)/2 = 25 -> std 5.0
    #   OOD = gpqa: 10, 20, 15 -> mean 15.0, std 5.0
    make_cell(root, "math", "grpo", "none", 0, rows=EARLY + final(100, {"math500": 0.5, "aime24": 0.3}, {"gpqa": 0.1}))
    make_cell(root, "math", "grpo", "none", 1, rows=EARLY + final(100, {"math500": 0.6, "aime24": 0.4}, {"gpqa": 0.2}))
    make_cell(root, "math", "grpo", "none", 2, rows=EARLY + final(100, {"math500": 0.7, "aime24": 0.2}, {"gpqa": 0.15}))
    # math / grpo / flip0.2: seed0 done (ID (35+12)/2 = 23.5, OOD 5.0), seed1 still running.
    make_cell(root, "math", "grpo", "flip0.2", 0, rows=final(100, {"math500": 0.35, "aime24": 0.12}, {"gpqa": 0.05}))
    make_cell(root, "math", "grpo", "flip0.2", 1, state="running", rows=final(40, {"math500": 0.99, "aime24": 0.99}))
    # math / ppo / none: one seed, no OOD rows; math500 has two decoding settings at the last step
    # (0.2 and 0.4 -> 0.3), so ID = mean(30, 10) = 20.0 (a plain row mean would give 23.3);
    # a pass@k row at the last step is ignored.
    make_cell(root, "math", "ppo", "none", 0, rows=[
        eval_row(80, "math500", "ID", 0.2, temperature=0.0),
        eval_row(80, "math500", "ID", 0.4, temperature=0.6),
        eval_row(80, "aime24", "ID", 0.1),
        eval_row(80, "aime24", "ID", 0.9, metric="pass@16"),
    ])
    # Noise order: 'none' first, then natural order (pseudo8 before pseudo16).
    make_cell(root, "math", "ppo", "pseudo16", 0, rows=final(80, {"math500": 0.25}))
    make_cell(root, "math", "ppo", "pseudo8", 0, rows=final(80, {"math500": 0.125}))
    # arith: one done cell (ID 80.0, OOD 60.0) and one failed cell.
    make_cell(root, "arith", "dfpo", "flip0.1", 3, rows=final(10, {"arith_id": 0.8}, {"arith_ood": 0.6}))
    make_cell(root, "arith", "dfpo", "flip0.1", 4, state="failed", rows=[])
    # Not cells: a non-seed dir, a file at the top level, a dir too deep.
    (root / "math" / "grpo" / "none" / "notes").mkdir()
    (root / "stray.txt").write_text("x")
    (root / "math" / "grpo" / "none" / "seed0" / "ckpt" / "seed9").mkdir(parents=True)
    return root


EXPECTED = """\
# Final evaluation scores

Accuracy in percent at each run's last evaluation step, mean ± sample std (ddof=1) over finished seeds; ID/OOD = mean over the suite's in-domain/out-of-domain benchmarks.

## arith

| algo | noise | seeds | ID acc (mean ± std) | OOD acc (mean ± std) |
|---|---|---:|---:|---:|
| dfpo | flip0.1 | 1 | 80.0 ± n/a | 60.0 ± n/a |

1 cell not finished (excluded from the means): dfpo/flip0.1/seed4 (failed)

## math

| algo | noise | seeds | ID acc (mean ± std) | OOD acc (mean ± std) |
|---|---|---:|---:|---:|
| grpo | none | 3 | 45.0 ± 5.0 | 15.0 ± 5.0 |
| grpo | flip0.2 | 1 | 23.5 ± n/a | 5.0 ± n/a |
| ppo | none | 1 | 20.0 ± n/a | n/a |
| ppo | pseudo8 | 1 | 12.5 ± n/a | n/a |
| ppo | pseudo16 | 1 | 25.0 ± n/a | n/a |

1 cell not finished (excluded from the means): grpo/flip0.2/seed1 (running)
"""


def test_collect_final_scores(runs):
    df = collect_final_scores(runs)
    assert list(df.columns) == ["suite", "algo", "noise", "seed", "state", "step", "id_acc", "ood_acc"]
    assert len(df) == 10
    row = df[(df.algo == "grpo") & (df.noise == "none") & (df.seed == 1)].iloc[0]
    assert (row.suite, row.state, row.step) == ("math", "done", 100)
    assert row.id_acc == pytest.approx(0.5) and row.ood_acc == pytest.approx(0.2)
    running = df[df.state == "running"].iloc[0]
    assert running.step == 40 and running.id_acc == pytest.approx(0.99) and math.isnan(running.ood_acc)
    ppo = df[(df.algo == "ppo") & (df.noise == "none")].iloc[0]
    assert ppo.id_acc == pytest.approx(0.2) and math.isnan(ppo.ood_acc)
    failed = df[df.state == "failed"].iloc[0]
    assert pd.isna(failed.step) and math.isnan(failed.id_acc)
    assert list(df[df.suite == "math"].noise.drop_duplicates()) == ["none", "flip0.2", "pseudo8", "pseudo16"]


def test_report_exact(runs):
    path = write_report(runs)
    assert path == runs / "report.md"
    assert path.read_text(encoding="utf-8") == EXPECTED


def test_report_custom_out_and_no_temp_files(runs, tmp_path):
    out = tmp_path / "reports" / "r.md"
    assert write_report(runs, out) == out
    assert out.read_text(encoding="utf-8") == EXPECTED
    assert os.listdir(out.parent) == ["r.md"]
    write_report(runs)  # overwrite in place twice, nothing else left in the runs dir
    write_report(runs)
    assert sorted(p.name for p in runs.iterdir()) == ["arith", "math", "report.md", "stray.txt"]


def test_atomic_write_keeps_old_file_on_failure(runs, monkeypatch):
    path = runs / "report.md"
    path.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("harness.store.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_report(runs)
    assert path.read_text() == "old"
    assert sorted(p.name for p in runs.iterdir()) == ["arith", "math", "report.md", "stray.txt"]


def test_missing_or_empty_runs_dir(tmp_path):
    for where in (tmp_path / "nope", tmp_path):
        with pytest.raises(HarnessError) as err:
            collect_final_scores(where)
        assert str(err.value) == (
            f"no runs found under {str(where)!r} (expected <runs>/<suite>/<algo>/<noise>/seed<k>/eval.jsonl)"
        )
    with pytest.raises(HarnessError, match="no runs found"):
        write_report(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_malformed_line_names_file_and_line(runs):
    path = runs / "math" / "grpo" / "none" / "seed1" / "eval.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"step": 100, "benchmark": '  # a truncated line 3
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(HarnessError) as err:
        write_report(runs)
    message = str(err.value)
    assert str(path) in message and "line 3" in message and "\n" not in message
    assert not (runs / "report.md").exists()


def test_missing_key_names_file(runs):
    path = runs / "math" / "ppo" / "none" / "seed0" / "eval.jsonl"
    path.write_text(json.dumps({"step": 1, "benchmark": "x", "metric": "accuracy", "value": 0.5}) + "\n")
    with pytest.raises(HarnessError, match=r"eval row 1 of .*seed0/eval.jsonl.* lacks key\(s\) role"):
        collect_final_scores(runs)


def test_all_seeds_unfinished_row(tmp_path):
    root = tmp_path / "runs"
    make_cell(root, "math", "grpo", "none", 0, state="running", rows=final(5, {"m": 0.5}))
    make_cell(root, "math", "grpo", "none", 1, state="done", rows=[])  # done, but never evaluated
    text = write_report(root).read_text()
    assert "| grpo | none | 0 | n/a | n/a |" in text
    assert "2 cells not finished (excluded from the means): grpo/none/seed0 (running), grpo/none/seed1 (no eval)" in text
