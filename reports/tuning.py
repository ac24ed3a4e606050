"""The tuning section of a report: `harness tune`'s trials, tuned against default results, and a
sensitivity plot per algorithm.

    tuning.md                         the search (spaces, seeds, rule); per algorithm every trial with its
                                      searched values and validation score (mean, sd over its cells, n),
                                      the chosen one marked; tuned against defaults on the tuning seeds
                                      (validation, ID, OOD), and, given both reporting stores, on the
                                      reporting seeds (ID and OOD per noise setting, paired by seed)
    figures/sensitivity_<algo>.png    one panel per searched key: the final validation score of each trial
                                      against its value (log axis for log-uniform keys), per noise setting
                                      the mean over tuning seeds with a band of +-1 sd over seeds (bars; no
                                      bar with one seed); the defaults are squares, the chosen trial ringed

The score of a tuning cell is its final score on the selected validation benchmarks (role VAL);
ID/OOD columns are shown for information and never enter the selection (`harness.tune`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from harness import store
from reports import stats
from reports.load import RunStore, sort_noise


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def trial_lines(plan, choice, scores: pd.DataFrame) -> list[str]:
    """One algorithm's trials: values, validation mean / sd / n, ID and OOD means, why a trial cannot win."""
    keys = list(plan.defaults.get(choice.algo, {})) or sorted({k for d in plan.draws[choice.algo] for k in d})
    rows = []
    for row in choice.table.itertuples():
        values = plan.draws[choice.algo][row.trial] or plan.defaults.get(choice.algo, {})
        mine = scores[(scores["algo"] == choice.algo) & (scores["trial"] == row.trial)]
        mark = " (chosen)" if row.trial == choice.trial else ""
        name = f"{row.trial}{' defaults' if row.trial == 0 else ''}{mark}"
        rows.append([name, *(_value(values.get(k, "-")) for k in keys),
                     f"{_pct(row.score)} ± {_pct(row.sd)} (n={row.n})", _pct(mine["id_acc"].mean()),
                     _pct(mine["ood_acc"].mean()), "" if row.state == "ok" else row.state])
    return _md(["trial", *keys, "validation %", "ID %", "OOD %", "cannot win"], rows)


def paired_line(label: str, a: pd.Series, b: pd.Series) -> list[str]:
    """Default (a) and tuned (b) by seed: means and the paired difference with its 95 % t-interval."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1).dropna()
    if len(both):  # the means over the seeds both have, so the columns agree with the paired difference
        a, b = both["a"], both["b"]
    diff, low, high = stats.t_interval((both["b"] - both["a"]).to_numpy())
    ci = f" [{100 * low:+.1f}, {100 * high:+.1f}]" if not math.isnan(low) else ""
    return [label, _pct(a.mean()), _pct(b.mean()), f"{100 * diff:+.1f}{ci}" if len(both) else "-", str(len(both))]


def tuning_store_comparison(plan, choices, scores: pd.DataFrame) -> list[str]:
    """Tuned (chosen trial) against defaults (trial 0) on the tuning seeds, paired by (noise, seed)."""
    rows = []
    for algo, c in choices.items():
        mine = scores[scores["algo"] == algo].set_index(["trial", "noise", "seed"])
        for label, col in (("validation", "score"), ("ID", "id_acc"), ("OOD", "ood_acc")):
            rows.append(paired_line(f"{algo} {label}", mine.loc[0][col], mine.loc[c.trial][col]))
    return ["### Tuned against defaults on the tuning seeds", "",
            "Scores in %, mean over the tuning cells (noise x tuning seed); tuned - defaults paired by cell, "
            "95 % t-interval. The tuned trial was chosen on validation, so its validation gain is biased upward "
            "(the winner of several); ID/OOD on these seeds are for information.", "",
            *_md(["algorithm", "defaults", "tuned", "tuned - defaults", "n"], rows)]


def reporting_comparison(default_runs: Path, tuned_runs: Path, algos: list[str]) -> list[str]:
    """Default and tuned reporting stores side by side: ID and OOD per (algorithm, noise), paired by seed."""
    d, t = RunStore(default_runs).done(), RunStore(tuned_runs).done()
    rows = []
    for algo in algos:
        for noise in sort_noise(set(d.loc[d["algo"] == algo, "noise"]) | set(t.loc[t["algo"] == algo, "noise"])):
            a = d[(d["algo"] == algo) & (d["noise"] == noise)].set_index("seed")
            b = t[(t["algo"] == algo) & (t["noise"] == noise)].set_index("seed")
            for label, col in (("ID", "id_acc"), ("OOD", "ood_acc")):
                rows.append(paired_line(f"{algo} {noise} {label}", a[col], b[col]))
    return ["### Tuned against defaults on the reporting seeds", "",
            f"Defaults: {default_runs}; tuned: {tuned_runs}. Final ID/OOD averages in %, mean over the seeds both have "
            "(each store's own where they share none); "
            "tuned - defaults paired by seed (the same seeds, warm starts, data order and noise draws), 95 % "
            "t-interval; n = seeds both have.", "",
            *_md(["algorithm / noise / score", "defaults", "tuned", "tuned - defaults", "n"], rows)]


def sensitivity(plan, algo: str, scores: pd.DataFrame) -> pd.DataFrame:
    """Per (trial, searched key): the key's value and the trial's validation scores per noise
    setting (mean and sd over tuning seeds, n). Columns: key, trial, value, noise, mean, sd, n."""
    rows = []
    for trial, drawn in enumerate(plan.draws[algo]):
        values = drawn or plan.defaults.get(algo, {})
        mine = scores[(scores["algo"] == algo) & (scores["trial"] == trial)]
        for key, value in values.items():
            for noise, group in mine.groupby("noise"):
                s = group["score"].dropna()
                rows.append({"key": key, "trial": trial, "value": value, "noise": noise, "mean": s.mean(),
                             "sd": s.std(ddof=1) if len(s) > 1 else math.nan, "n": len(s)})
    return pd.DataFrame(rows, columns=["key", "trial", "value", "noise", "mean", "sd", "n"])


def rank_correlations(table: pd.DataFrame) -> dict[str, float]:
    """Spearman correlation of each numeric key's value with the trial's mean validation score."""
    out = {}
    for key, group in table.groupby("key"):
        per_trial = group.groupby("trial").agg(value=("value", "first"), mean=("mean", "mean")).dropna()
        if len(per_trial) >= 3 and per_trial["value"].nunique() > 1 and per_trial["mean"].nunique() > 1 and \
                all(isinstance(v, (int, float)) for v in per_trial["value"]):
            out[key] = float(per_trial["value"].rank().corr(per_trial["mean"].rank()))
    return out


def sensitivity_figure(plan, data: dict, algo: str, choice, table: pd.DataFrame, folder: Path) -> str | None:
    """figures/sensitivity_<algo>.png (see the module doc); None when nothing was searched."""
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(table["key"]))
    if not keys:
        return None
    spaces = data.get("spaces", {}).get(algo, {})
    fig = Figure(figsize=(3.6 * len(keys), 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(keys), sharey=True))
    noises = sort_noise(table["noise"])
    for ax, key in zip(axes, keys):
        for i, noise in enumerate(noises):
            rows = table[(table["key"] == key) & (table["noise"] == noise)]
            color = f"C{i % 10}"
            for r in rows.itertuples():
                marker = "s" if r.trial == 0 else "o"
                ax.errorbar([r.value], [100 * r.mean], yerr=None if math.isnan(r.sd) else [100 * r.sd],
                            fmt=marker, color=color, capsize=3, ms=5, label=noise if r.trial == 0 else None)
                if r.trial == choice.trial:
                    ax.plot([r.value], [100 * r.mean], "o", ms=12, mfc="none", mec="k")
        low, high = spaces.get(key, {}).get("range", [None, None])
        if spaces.get(key, {}).get("log_scale"):
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            if low is not None:
                ax.set_xlim(low / 1.25, high * 1.25)  # the whole searched range
        elif low is not None:
            ax.set_xlim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        ax.set_xlabel(key)
        ax.set_title(spaces.get(key, {}).get("distribution", ""), fontsize=8)
    axes[0].set_ylabel("final validation score (%)")
    axes[0].legend(fontsize=7, title="noise (square: defaults)", title_fontsize=7)
    fig.suptitle(f"{algo}: sensitivity (bars: +-1 sd over tuning seeds; ring: chosen)", fontsize=9)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    stem = f"sensitivity_{algo}"
    fig.savefig(folder / "figures" / f"{stem}.png", dpi=150, bbox_inches="tight")
    return stem


def write_tuning_report(tune_dir: Path, folder: Path, tuned_runs: Path | None = None,
                        default_runs: Path | str | None = None, formats: list[str] | None = None) -> Path:
    """Write `<folder>/tuning.md` (and the sensitivity figures with png in `formats`, the default);
    returns the Markdown file's path."""
    from harness.tune_plan import cell_scores, read_plan, select

    plan, data = read_plan(Path(tune_dir))
    formats = formats or ["md", "png"]
    scores = cell_scores(Path(tune_dir), plan)
    choices = select(scores, plan)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# Tuning", "",
             f"Tuning store {tune_dir}: {plan.trials} configurations per algorithm (trial 0 the grid's own), each "
             f"trained on tuning seeds {', '.join(map(str, plan.tune_seeds))} (reporting seeds: "
             f"{len(plan.report_seeds)}, disjoint) under noise {', '.join(plan.noise)}; selected on "
             f"{', '.join(plan.select)} by the mean final validation score over its cells, ties to the lower trial. "
             "The ID/OOD test benchmarks never enter the selection.", ""]
    for algo, c in choices.items():
        spaces = data.get("spaces", {}).get(algo, {})
        lines += [f"## {algo}", "", "Searched: " + "; ".join(f"{k} {v['distribution']}" for k, v in spaces.items()), ""]
        lines += trial_lines(plan, c, scores)
        table = sensitivity(plan, algo, scores)
        corr = rank_correlations(table)
        if corr:
            lines += ["Spearman correlation of each value with the trial's validation score: "
                      + ", ".join(f"{k} {v:+.2f}" for k, v in corr.items()), ""]
        if "png" in formats:
            stem = sensitivity_figure(plan, data, algo, c, table, folder)
            if stem:
                lines += [f"![sensitivity of {algo}](figures/{stem}.png)", ""]
    lines += tuning_store_comparison(plan, choices, scores)
    if default_runs is not None and tuned_runs is not None:
        lines += reporting_comparison(Path(default_runs), Path(tuned_runs), plan.algos)
    path = folder / "tuning.md"
    store.atomic_write_text(path, "\n".join(lines) + "\n")
    return path
