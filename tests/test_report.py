"""`harness report` on fixture run stores with known answers."""
import json
import math
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from harness.errors import HarnessError
from reports import collect_final_scores, write_report
from reports import stats


def eval_row(step, benchmark, role, value, metric="accuracy", **decoding):
    return {"step": step, "benchmark": benchmark, "role": role, "metric": metric, "value": value,
            "temperature": 0.0, "n": 1, **decoding}


def make_cell(root, suite, algo, noise, seed, state="done", rows=(), metrics=(), problems=()):
    cell = root / suite / algo / noise / f"seed{seed}"
    cell.mkdir(parents=True)
    (cell / "status.json").write_text(json.dumps({"state": state}))
    (cell / "config.json").write_text("{}")
    (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (cell / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if problems:
        (cell / "eval_problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in problems))
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
    #   ID  = mean(math500, aime24): seed0 40, seed1 50, seed2 45 -> 45.0
    #   OOD = gpqa: 10, 20, 15 -> 15.0
    #   ALL = mean over the three benchmarks: (60 + 30 + 15) / 3 = 35.0 (not (45 + 15) / 2 = 30)
    make_cell(root, "math", "grpo", "none", 0, rows=EARLY + final(100, {"math500": 0.5, "aime24": 0.3}, {"gpqa": 0.1}))
    make_cell(root, "math", "grpo", "none", 1, rows=EARLY + final(100, {"math500": 0.6, "aime24": 0.4}, {"gpqa": 0.2}))
    make_cell(root, "math", "grpo", "none", 2, rows=EARLY + final(100, {"math500": 0.7, "aime24": 0.2}, {"gpqa": 0.15}))
    # math / grpo / flip0.2: seed0 done (ID (35+12)/2 = 23.5, OOD 5.0), seed1 still running.
    make_cell(root, "math", "grpo", "flip0.2", 0, rows=final(100, {"math500": 0.35, "aime24": 0.12}, {"gpqa": 0.05}))
    make_cell(root, "math", "grpo", "flip0.2", 1, state="running", rows=final(40, {"math500": 0.99, "aime24": 0.99}))
    # math / ppo / none: one seed, no OOD rows; math500 has two decoding settings at the last step
    # (0.2 and 0.4 -> 0.3), so ID = mean(30, 10) = 20.0; a pass@k row at the last step is ignored.
    make_cell(root, "math", "ppo", "none", 0, rows=[
        eval_row(80, "math500", "ID", 0.2, temperature=0.0),
        eval_row(80, "math500", "ID", 0.4, temperature=0.6),
        eval_row(80, "aime24", "ID", 0.1),
        eval_row(80, "aime24", "ID", 0.9, metric="pass@16"),
    ])
    # Noise order: 'none' first, then natural order (pseudo8 before pseudo16). math / ppo / flip0.2
    # and math / grpo / pseudo8 / pseudo16 do not exist: missing cells.
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


def test_report_on_partial_grid(runs):
    out = write_report(runs, formats="md,csv")
    assert out == runs / "report"
    assert sorted(p.name for p in out.iterdir()) == [".harness-report", "csv", "report.md"]
    md = (out / "report.md").read_text(encoding="utf-8")
    # Final scores: one row per algo x noise of the suite; missing cells are dashes.
    assert "| grpo | none | 3 | 45.0 [" in md
    assert "| grpo | flip0.2 | 1 | 23.5 | 5.0 | 17.3 | – |" in md  # one seed: no interval; (35+12+5)/3
    assert "| ppo | none | 1 | 20.0 | – | – | – |" in md  # no OOD rows: OOD and ALL missing
    assert "| ppo | flip0.2 | 0 | – | – | – | – |" in md
    assert "| grpo | pseudo8 | 0 | – | – | – | – |" in md
    assert "| ppo | pseudo8 | 1 | – | – | – | – |" in md  # aime24 missing: ID AVG needs both
    assert "| ppo | pseudo8 | 1 | – | 12.5 | – |" in md  # per-benchmark table: aime24 (ID), math500 (ID), gpqa (OOD)
    assert "1 cell not finished or not fully scored (unscored benchmarks excluded): grpo/flip0.2/seed1 (running)" in md
    assert "1 cell not finished or not fully scored (unscored benchmarks excluded): dfpo/flip0.1/seed4 (failed)" in md
    assert "Baseline 'ppo' has no runs in this suite." in md  # arith has only dfpo
    # The baseline is listed first; noise in natural order.
    rows = re.findall(r"^\| (\w+) \| (\S+) \| \d+ \| ", md, flags=re.M)
    assert list(dict.fromkeys(rows)) == [("dfpo", "flip0.1")] + [(a, n) for a in ("ppo", "grpo") for n in ("none", "flip0.2", "pseudo8", "pseudo16")]

    main = pd.read_csv(out / "csv" / "main.csv")
    cell = main[(main.algo == "grpo") & (main.noise == "none")].set_index("score")
    assert cell.loc["ALL AVG", "mean"] == pytest.approx(0.35)
    assert cell.loc["ID AVG", "mean"] == pytest.approx(0.45) and cell.loc["OOD AVG", "mean"] == pytest.approx(0.15)
    assert cell.loc["math500", "ci_low"] <= 0.6 <= cell.loc["math500", "ci_high"]
    assert cell["iqm"].isna().all()  # 3 seeds < 4: no IQM
    assert len(main) == 2 * 4 * 6 + 1 * 1 * 5  # math: 2 algos x 4 noises x (3 benchmarks + 3 averages)
    per_seed = pd.read_csv(out / "csv" / "final_per_seed.csv")
    assert len(per_seed) == 3 * 3 + 3 + 2 + 1 + 1 + 2  # the running and failed cells are left out


def sig_store(root, noises=("none", "flip0.2", "flip0.4", "pseudo8")):
    """Suite 's' with one ID and one OOD benchmark, ppo (baseline) and grpo, 4 seeds, noise none,
    flip0.2, flip0.4 and pseudo8; per-problem results at noise none."""
    ppo = {"none": [0.50, 0.52, 0.54, 0.56], "flip0.2": [0.40, 0.45, 0.50, 0.55], "flip0.4": [0.30, 0.30, 0.30, 0.30],
           "pseudo8": [0.1, 0.1, 0.1, 0.1]}
    grpo = {"none": [0.80, 0.81, 0.82, 0.83], "flip0.2": [0.41, 0.46, 0.51, 0.56], "flip0.4": [0.20, 0.20, 0.20, 0.20],
            "pseudo8": [0.1, 0.1, 0.1, 0.1]}
    for algo, table in (("ppo", ppo), ("grpo", grpo)):
        for noise in noises:
            values = table[noise]
            for seed, v in enumerate(values):
                # The OOD benchmark scores half the ID one; step 0 (the initial model) scored 0.6 ID.
                rows = final(0, {"s_id": 0.6}, {"s_ood": 0.3}) + final(10, {"s_id": 0.7}, {"s_ood": 0.35})
                rows += final(20, {"s_id": v}, {"s_ood": v / 2})
                metrics = [{"step": s, "reward/clean_mean": v * s / 20, "reward/train_mean": 0.5, "actor/entropy": 1.0}
                           for s in (1, 10, 20)]
                problems = []
                if noise == "none":  # problem i scores 1 for grpo and 0.5 for ppo, on both benchmarks
                    problems = [{"step": 20, "benchmark": b, "role": r, "problem": f"p{i}",
                                 "score": 1.0 if algo == "grpo" else 0.5} for b, r in (("s_id", "ID"), ("s_ood", "OOD"))
                                for i in range(5)]
                make_cell(root, "s", algo, noise, seed, rows=rows, metrics=metrics, problems=problems)
    return ppo, grpo


def test_significance_robustness_stability_known_answers(tmp_path):
    root = tmp_path / "runs"
    ppo, grpo = sig_store(root)
    out = write_report(root, tmp_path / "rep", formats="md,csv")
    sig = pd.read_csv(out / "csv" / "significance.csv")
    assert set(sig["score"]) == {"ID AVG", "OOD AVG", "ALL AVG"} and len(sig) == 3 * 4
    s = sig[sig.score == "ID AVG"].set_index("noise")
    p_none = sps.ttest_ind(grpo["none"], ppo["none"], equal_var=False).pvalue
    p_flip = sps.ttest_ind(grpo["flip0.2"], ppo["flip0.2"], equal_var=False).pvalue
    assert s.loc["none", "welch_p"] == pytest.approx(p_none)
    assert s.loc["none", "mwu_p"] == pytest.approx(2 / 70)  # exact: all four above all four, two-sided
    assert s.loc["none", "diff"] == pytest.approx(0.815 - 0.53)
    welch_ci = sps.ttest_ind(grpo["none"], ppo["none"], equal_var=False).confidence_interval()
    assert (s.loc["none", "diff_low"], s.loc["none", "diff_high"]) == pytest.approx((welch_ci.low, welch_ci.high))
    assert s.loc["none", "poi"] == 1.0 and s.loc["flip0.2", "poi"] == pytest.approx(10 / 16)
    assert s.loc["flip0.4", "poi"] == 0.0 and math.isnan(s.loc["none", "poi_low"])  # 4 < 10 seeds: no interval
    # Undefined tests are nan and stay out of their Holm family: flip0.4 has zero variance on both
    # sides (Welch undefined; Mann-Whitney is defined: every grpo seed is below every ppo seed),
    # pseudo8 is one value everywhere (nothing defined).
    assert math.isnan(s.loc["flip0.4", "welch_p"]) and math.isnan(s.loc["pseudo8", "welch_p"])
    assert s.loc["flip0.4", "mwu_p"] == pytest.approx(2 / 70) and math.isnan(s.loc["pseudo8", "mwu_p"])
    assert s.loc["flip0.2", "welch_p_holm"] == pytest.approx(stats.holm([p_none, p_flip])[1])
    assert s["welch_p_m"].tolist() == [2] * 4 and s["mwu_p_m"].tolist() == [3] * 4
    assert bool(s.loc["none", "welch_p_sig"]) and not bool(s.loc["flip0.2", "welch_p_sig"])
    assert not bool(s.loc["flip0.4", "welch_p_sig"])
    # Paired by seed: grpo - ppo per seed is 0.30, 0.29, 0.28, 0.27 at none; a constant 0.01 at flip0.2
    # (zero variance: no interval, no test).
    assert s.loc["none", "n_pairs"] == 4 and s.loc["none", "pair_diff"] == pytest.approx(0.285)
    assert s.loc["none", "pair_p"] == pytest.approx(sps.ttest_rel(grpo["none"], ppo["none"]).pvalue)
    assert s.loc["flip0.2", "pair_diff"] == pytest.approx(0.01) and math.isnan(s.loc["flip0.2", "pair_p"])
    assert math.isnan(s.loc["flip0.2", "pair_low"])
    # Bootstraps over problems where per-problem rows exist: every problem +0.5, no replicate
    # crosses 0 -> p reported as the bound 1/B; elsewhere none.
    assert s.loc["none", "prob_diff"] == pytest.approx(0.5) and bool(s.loc["none", "prob_p_bound"])
    assert s.loc["none", "prob_p"] == pytest.approx(1 / 2000) and s.loc["none", "two_p"] == pytest.approx(1 / 2000)
    assert s.loc["none", "n_problems"] == 5 and s.loc["flip0.2", "n_problems"] == 0
    md = (out / "report.md").read_text(encoding="utf-8")
    # Each test's mark sits on its own p column, never on the difference.
    assert re.search(r"\| none \| grpo \| 4/4 \| \+28\.5 \[[^]]+\] \| < 0\.001 \(< 0\.001\)\* \| 0\.029 \(0\.086\) \| 1\.00 \| 4 \| "
                     r"\+28\.5 \[[^]]+\] \| < 0\.001 \(< 0\.001\)\* \| 5 \| \+50\.0 \[\+50\.0, \+50\.0\] \| < 0\.0005 \(< 0\.001\)\* \|", md)
    assert re.search(r"\| flip0\.4 \| grpo \| 4/4 \| -10\.0 \| – \| 0\.029 \(0\.086\) \| 0\.00 \| 4 \| -10\.0 \| – \|", md)
    assert "Welch p (Holm, m=2)" in md and "MWU exact p (Holm, m=3)" in md
    assert "these checkpoints on this problem set" in md
    # The answers come first, one sentence per comparison, paired by seed.
    assert md.index("## Answers") < md.index("## Methods") < md.index("## s")
    assert ("- grpo vs ppo under flip0.2: +1.0 points ID AVG (paired by seed, 4 seeds), no test possible "
            "(it needs 2 seeds a side and some variance).") in md
    pair = sps.ttest_rel(grpo["none"], ppo["none"])
    low, high = pair.confidence_interval()
    assert pair.pvalue < 0.001  # flip0.2's paired test is undefined: the family is this one comparison
    assert (f"- grpo vs ppo under none: +28.5 points ID AVG [95% CI {100 * low:+.1f}, {100 * high:+.1f}] (paired by "
            f"seed, 4 seeds), significant after Holm (paired t p < 0.001, adjusted < 0.001 over 1 comparison).") in md

    # Gains over step 0 (ID 0.6 at step 0 for every seed): ppo none 0.53 - 0.6.
    main = pd.read_csv(out / "csv" / "main.csv").set_index(["algo", "noise", "score"])
    assert main.loc[("ppo", "none", "ID AVG"), "gain"] == pytest.approx(-0.07)
    assert main.loc[("ppo", "none", "ID AVG"), "n_gain"] == 4
    assert "| ppo | none | 4 | -7.0 [" in md

    # Robustness: rates 0, 0.2, 0.4 (pseudo8 has none). ppo ID curve 0.53, 0.475, 0.30:
    # (0.2 (0.53 + 0.475) / 2 + 0.2 (0.475 + 0.30) / 2) / 0.4 = 0.445.
    auc = pd.read_csv(out / "csv" / "robustness_auc.csv").set_index(["algo", "score"])
    assert auc.loc[("ppo", "ID AVG"), "rates"] == "0 0.2 0.4"
    assert auc.loc[("ppo", "ID AVG"), "auc"] == pytest.approx(0.445)
    assert auc.loc[("ppo", "ALL AVG"), "auc"] == pytest.approx(0.445 * 0.75)  # mean of ID and ID / 2
    per_seed = [(0.2 * (a + b) / 2 + 0.2 * (b + c) / 2) / 0.4 for a, b, c in zip(ppo["none"], ppo["flip0.2"], ppo["flip0.4"])]
    ci = sps.ttest_1samp(per_seed, 0).confidence_interval()  # t-interval of the per-seed AUCs
    assert (auc.loc[("ppo", "ID AVG"), "auc_low"], auc.loc[("ppo", "ID AVG"), "auc_high"]) == pytest.approx((ci.low, ci.high))
    assert auc.loc[("ppo", "ID AVG"), "n_seeds"] == 4
    grpo_seed = [(0.2 * (a + b) / 2 + 0.2 * (b + c) / 2) / 0.4 for a, b, c in zip(grpo["none"], grpo["flip0.2"], grpo["flip0.4"])]
    paired = sps.ttest_rel(grpo_seed, per_seed)
    assert auc.loc[("grpo", "ID AVG"), "base_diff"] == pytest.approx(float(np.mean(grpo_seed) - np.mean(per_seed)))
    assert auc.loc[("grpo", "ID AVG"), "base_p"] == pytest.approx(paired.pvalue)
    assert "| ppo | ID AVG | 53.0 (n=4) | 47.5 (n=4) | 30.0 (n=4) | 10.0 (n=4) | 44.5 [" in md

    # Stability (ALL AVG per seed over steps 0, 10, 20): 0.45, 0.525, then 0.75 v.
    st = pd.read_csv(out / "csv" / "stability.csv").set_index(["algo", "noise", "score"])
    row = st.loc[("ppo", "flip0.4", "ALL AVG")]  # 0.45, 0.525, 0.225: below the start -> collapsed
    assert row.max_drop == pytest.approx(0.3) and row.collapsed == 4 and row.n_initial == 4
    assert row.last_std == pytest.approx(pd.Series([0.45, 0.525, 0.225]).std(ddof=0))
    row = st.loc[("grpo", "none", "ALL AVG")]  # ends above 0.525: no drop, no collapse
    assert row.max_drop == 0.0 and row.collapsed == 0
    assert "| ppo | flip0.4 | 4 | 12.7 | 30.0 | 4/4 |" in md
    curves = pd.read_csv(out / "csv" / "curves.csv")
    assert set(curves["metric"]) == {"clean training reward", "noisy training reward", "ID accuracy", "OOD accuracy", "entropy"}
    c = curves[(curves.metric == "clean training reward") & (curves.algo == "ppo") & (curves.noise == "flip0.2") & (curves.step == 20)]
    assert c[["n_seeds", "mean", "min", "max"]].iloc[0].tolist() == pytest.approx([4, 0.475, 0.40, 0.55])

    # Same seed, same numbers; IQM with 4 seeds.
    again = write_report(root, tmp_path / "rep", formats="csv")
    assert pd.read_csv(again / "csv" / "significance.csv").equals(sig)
    main = pd.read_csv(again / "csv" / "main.csv")
    assert main[(main.algo == "ppo") & (main.noise == "flip0.2") & (main.score == "s_id")]["iqm"].iloc[0] == pytest.approx(0.475)


def check_latex_structure(tex: str) -> None:
    assert tex.startswith("\\documentclass") and tex.rstrip().endswith("\\end{document}")
    assert "\\usepackage{booktabs}" in tex
    assert tex.count("\\begin{tabular}") == tex.count("\\end{tabular}") > 0
    assert tex.count("\\toprule") == tex.count("\\midrule") == tex.count("\\bottomrule") == tex.count("\\begin{tabular}")
    assert tex.count("\\begin{figure}") == tex.count("\\end{figure}") > 0
    depth = 0
    for i, ch in enumerate(tex):
        if ch in "{}" and (i == 0 or tex[i - 1] != "\\"):
            depth += 1 if ch == "{" else -1
            assert depth >= 0
    assert depth == 0
    for line in tex.splitlines():  # every table row has as many cells as its header
        if line.endswith("\\\\"):
            assert "_" not in line.replace("\\_", "") and "%" not in line.replace("\\%", "")


def test_all_formats_latex_and_figures(tmp_path):
    root = tmp_path / "runs"
    sig_store(root, noises=("none", "flip0.2"))
    make_cell(root, "s", "grpo", "flip0.2", 9, state="failed")  # the note is escaped too
    out = write_report(root)
    figures = sorted(p.name for p in (out / "figures").iterdir())
    stems = ["robustness_s", "stability_s_flip0-2", "stability_s_none"]
    assert figures == sorted(f"{s}.{e}" for s in stems for e in ("pdf", "png"))
    assert (out / "figures" / "stability_s_none.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "![stability s flip0.2](figures/stability_s_flip0-2.png)" in md
    tex = (out / "report.tex").read_text(encoding="utf-8")
    check_latex_structure(tex)
    assert "\\includegraphics[width=\\linewidth]{figures/robustness_s.pdf}" in tex
    assert "+28.5 [" in tex and "($<$ 0.001)$^*$" in tex and "$<$ 0.0005" in tex and "--" in tex
    assert tex.index("Answers") < tex.index("Methods") and "\\item grpo vs ppo under none" in tex
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed: LaTeX checked for structure only")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "report.tex"], cwd=out,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (out / "report.pdf").stat().st_size > 0


def test_report_folder_replaced_whole_and_kept_on_failure(runs, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    write_report(runs, out, formats="md")
    (out / "stale.txt").write_text("from an older report")
    write_report(runs, out, formats="csv")
    assert sorted(p.name for p in out.iterdir()) == [".harness-report", "csv"]  # md and stale file gone

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("reports.tables.write_csv", boom)
    with pytest.raises(OSError, match="disk full"):
        write_report(runs, out, formats="md,csv")
    assert sorted(p.name for p in out.iterdir()) == [".harness-report", "csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "runs"]  # no temporary folders left
    assert sorted(p.name for p in runs.iterdir()) == ["arith", "math", "stray.txt"]


def test_bad_report_arguments(runs, tmp_path):
    with pytest.raises(HarnessError, match=r"unknown report format\(s\) 'html' \(valid: md, tex, csv, png, pdf, or all\)"):
        write_report(runs, formats="md,html")
    with pytest.raises(HarnessError, match=r"baseline 'dvpo' has no runs \(algorithms found: dfpo, grpo, ppo\)"):
        write_report(runs, baseline="dvpo")
    with pytest.raises(HarnessError, match="would replace the run store"):
        write_report(runs, out=runs)
    with pytest.raises(HarnessError, match="would replace the run store"):
        write_report(runs, out=runs.parent)
    (tmp_path / "mine").mkdir()
    with pytest.raises(HarnessError, match="exists and is not a report folder"):
        write_report(runs, out=tmp_path / "mine")
    assert not (runs / "report").exists() and list((tmp_path / "mine").iterdir()) == []


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


def test_malformed_line_skips_the_cell_naming_file_and_line(runs):
    path = runs / "math" / "grpo" / "none" / "seed1" / "eval.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = '{"step": 100, "benchmark": '  # a truncated line 3
    path.write_text("\n".join(lines) + "\n")
    skipped = []
    out = write_report(runs, formats="md,csv", skipped=skipped)
    assert skipped == [f"math/grpo/none/seed1: {str(path)!r} line 3: malformed JSON (Expecting value)"]
    text = (out / "report.md").read_text()
    assert f"grpo/none/seed1 (corrupt, skipped: {str(path)!r} line 3: malformed JSON" in text
    # The other two seeds still make the row: ID = mean(seed0 40, seed2 45) = 42.5.
    assert "| grpo | none | 2 | 42.5" in text
    cells = pd.read_csv(out / "csv" / "cells.csv", keep_default_na=False)
    row = cells[(cells.algo == "grpo") & (cells.noise == "none") & (cells.seed == 1)].iloc[0]
    assert row.state == "corrupt" and "line 3: malformed JSON" in row.reason


def test_missing_key_skips_the_cell_naming_file(runs):
    path = runs / "math" / "ppo" / "none" / "seed0" / "eval.jsonl"
    path.write_text(json.dumps({"step": 1, "benchmark": "x", "metric": "accuracy", "value": 0.5}) + "\n")
    df = collect_final_scores(runs).set_index(["suite", "algo", "noise", "seed"])
    assert df.loc[("math", "ppo", "none", 0), "state"] == "corrupt"
    path.write_text(json.dumps(eval_row(80, "math500", "ID", 0.5)) + "\n")
    path = runs / "math" / "ppo" / "pseudo8" / "seed0" / "eval_problems.jsonl"
    path.write_text(json.dumps({"step": 80, "benchmark": "math500", "role": "ID", "score": 1.0}) + "\n")
    skipped = []
    write_report(runs, formats="md", skipped=skipped)
    assert skipped == [f"math/ppo/pseudo8/seed0: {str(path)!r} line 1: lacks the key(s) problem"]


def test_all_seeds_unfinished_row(tmp_path):
    root = tmp_path / "runs"
    make_cell(root, "math", "grpo", "none", 0, state="running", rows=final(5, {"m": 0.5}))
    make_cell(root, "math", "grpo", "none", 1, state="done", rows=[])  # done, but never evaluated
    text = (write_report(root, formats="md") / "report.md").read_text()
    assert "| grpo | none | 0 | – | – | – | – |" in text
    assert ("2 cells not finished or not fully scored (unscored benchmarks excluded): grpo/none/seed0 (running), "
            "grpo/none/seed1 (no evaluation)") in text


def test_avg_at_k_is_the_score_when_k_above_one(tmp_path):
    root = tmp_path / "runs"
    make_cell(root, "math", "grpo", "none", 0, rows=[eval_row(5, "m", "ID", 0.25, metric="avg@4"),
                                                      eval_row(5, "m", "ID", 0.75, metric="pass@4")])
    assert "| grpo | none | 1 | 25.0 | – | 25.0 | – |" in (write_report(root, formats="md") / "report.md").read_text()
    assert sorted(os.listdir(root / "report")) == [".harness-report", "report.md"]


def test_identical_series_on_two_benchmarks_give_the_same_interval_for_id_and_all(tmp_path):
    # Every seed scores the same on its ID and its OOD benchmark: ID AVG, OOD AVG and ALL AVG are one
    # series, so their intervals must be one interval (resampling benchmarks apart narrowed ALL AVG).
    root = tmp_path / "runs"
    values = [0.55, 0.62, 0.58, 0.66, 0.60]
    for seed, v in enumerate(values):
        make_cell(root, "s", "ppo", "none", seed, rows=final(10, {"s_id": v}, {"s_ood": v}))
    main = pd.read_csv(write_report(root, tmp_path / "rep", formats="csv") / "csv" / "main.csv").set_index("score")
    ci = sps.ttest_1samp(values, 0).confidence_interval()
    for score in ("ID AVG", "OOD AVG", "ALL AVG"):
        assert main.loc[score, ["mean", "ci_low", "ci_high"]].tolist() == pytest.approx([np.mean(values), ci.low, ci.high])


def test_nan_or_missing_last_evaluation_is_listed_never_scored_earlier(tmp_path):
    root = tmp_path / "runs"
    good = final(0, {"a": 0.2}, {"b": 0.1}) + final(10, {"a": 0.5}, {"b": 0.3})
    for seed in range(3):
        make_cell(root, "s", "ppo", "none", seed, rows=good)
    # seed 3: the last evaluation is NaN on every benchmark; the earlier 0.9 must not be its score.
    make_cell(root, "s", "ppo", "none", 3, rows=final(5, {"a": 0.9}, {"b": 0.9}) + [
        eval_row(10, "a", "ID", float("nan")), eval_row(10, "b", "OOD", None)])
    # seed 4: NaN on the OOD benchmark only: its ID score counts, OOD AVG and ALL AVG leave it out.
    make_cell(root, "s", "ppo", "none", 4, rows=final(0, {"a": 0.2}, {"b": 0.1}) + final(10, {"a": 0.8}, {"b": 0.9})
              + [eval_row(20, "a", "ID", 0.8), eval_row(20, "b", "OOD", float("nan"))])
    # seed 5: trained 20 steps but evaluated last at step 10: the final evaluation is missing.
    cell = make_cell(root, "s", "ppo", "none", 5, rows=final(10, {"a": 0.9}, {"b": 0.9}))
    (cell / "status.json").write_text(json.dumps({"state": "done", "steps": 20}))
    out = write_report(root, tmp_path / "rep", formats="md,csv")
    main = pd.read_csv(out / "csv" / "main.csv").set_index("score")
    assert main.loc["ID AVG", "n_seeds"] == 4 and main.loc["ID AVG", "mean"] == pytest.approx((3 * 0.5 + 0.8) / 4)
    assert main.loc["OOD AVG", "n_seeds"] == 3 and main.loc["OOD AVG", "mean"] == pytest.approx(0.3)
    assert main.loc["ID AVG", "n_finished"] == 4  # seeds 3 and 5 are not scored at all
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "ppo/none/seed3 (last evaluation (step 10) is NaN on every benchmark)" in md
    assert "ppo/none/seed4 (NaN on b at the last evaluation (step 20): not scored there)" in md
    assert "ppo/none/seed5 (last evaluation at step 10 of 20: the final one is missing)" in md
    # Each number shows its n where it differs from the seeds column (4 finished seeds).
    assert re.search(r"\| ppo \| none \| 4 \| 57\.5 \[[^]]+\] \| 30\.0 \(n=3\) \| 40\.0 \(n=3\) \|", md)
