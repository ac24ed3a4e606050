"""Figures of the report (matplotlib ``Figure`` objects, no pyplot state: headless, Agg).

    robustness_<suite>.{png,pdf}          score against noise rate per algorithm: mean over seeds with its
                                          95 % t-interval, each point labelled with its n; a point without an
                                          interval (1 seed, or seeds all equal) is hollow
    stability_<suite>_<noise>.{png,pdf}   training curves: mean over seeds (drawn only at steps every seed
                                          of the cell has, so it never jumps where one drops out; the
                                          legend gives n), band = min..max over seeds
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from reports.analysis import AVERAGES, CURVE_METRICS, SuiteReport, noise_rate

PERCENT_KEYS = {"ID AVG", "OOD AVG"}
UNITS = {  # metric key -> unit shown in the panel title
    "reward/clean_mean": "mean per sample",
    "reward/train_mean": "mean per sample",
    "ID AVG": "%", "OOD AVG": "%",
    "actor/kl_ref": "nats per token",
    "actor/entropy": "nats per token",
    "critic/dist_std": "reward units",
}


def file_stem(*parts: str) -> str:
    """A file name safe for LaTeX's \\includegraphics: 'arith', 'flip0.2' -> 'arith_flip0-2'."""
    return "_".join(re.sub(r"[^A-Za-z0-9-]", "-", p) for p in parts)


def _save(fig: Figure, folder: Path, stem: str, exts: list[str]) -> None:
    for ext in exts:
        fig.savefig(folder / f"{stem}.{ext}", dpi=150 if ext == "png" else None, bbox_inches="tight")


def _colors(algos: list[str]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {a: palette[i % len(palette)] for i, a in enumerate(algos)}


def robustness_figure(report: SuiteReport, folder: Path, exts: list[str]) -> str | None:
    """Score (percent) against noise rate, one panel per average; None without >= 2 rates."""
    curve = report.robustness_curve.dropna(subset=["rate"])
    if curve["rate"].nunique() < 2 or curve["mean"].notna().sum() == 0:
        return None
    colors = _colors(report.suite.algos)
    families = sorted(set(report.robustness["family"])) or ["none"]
    styles = dict(zip(families, ["-", "--", ":", "-."] * 4))
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    span = curve["rate"].max() - curve["rate"].min()
    axes = fig.subplots(1, len(AVERAGES), sharey=True)
    for ax, score in zip(axes, AVERAGES):
        for i, algo in enumerate(report.suite.algos):
            dodge = (i - (len(report.suite.algos) - 1) / 2) * 0.012 * span  # CI bars side by side
            for family in families:
                names = [n for n in report.suite.noises if (noise_rate(n) or ("",))[0] in (family, "none")]
                d = curve[(curve["algo"] == algo) & (curve["score"] == score) & curve["noise"].isin(names)]
                d = d.dropna(subset=["mean"]).sort_values("rate")
                if d.empty:
                    continue
                low = (d["mean"] - d["ci_low"]).fillna(0).clip(lower=0) * 100
                high = (d["ci_high"] - d["mean"]).fillna(0).clip(lower=0) * 100
                label = algo if len(families) == 1 else f"{algo} ({family})"
                x, y = d["rate"] + dodge, d["mean"] * 100
                ax.errorbar(x, y, yerr=[low, high], color=colors[algo], linestyle=styles[family], marker="none",
                            capsize=3, label=label)
                single = d["ci_low"].isna().to_numpy()  # no interval (one seed): hollow marker
                ax.plot(x[~single], y[~single], "o", color=colors[algo])
                ax.plot(x[single], y[single], "o", markerfacecolor="white", color=colors[algo])
                for xi, yi, n in zip(x, y, d["n_seeds"]):
                    ax.annotate(f"n={int(n)}", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=6,
                                color=colors[algo])
        ax.set_title(score)
        ax.set_xlabel("noise rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("score (%): mean, 95% t-interval")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"{report.suite.name}: final score against noise rate (hollow: no interval, from 1 seed or seeds all equal)")
    stem = file_stem("robustness", report.suite.name)
    _save(fig, folder, stem, exts)
    return stem


def stability_figures(report: SuiteReport, folder: Path, exts: list[str]) -> dict[str, str]:
    """One figure per noise setting: a panel per metric present, a line per algorithm (mean over
    seeds) with a min..max band. Returns noise -> file stem."""
    sc = report.stability_curves
    colors = _colors(report.suite.algos)
    out = {}
    for noise in report.suite.noises:
        d = sc[sc["noise"] == noise]
        labels = [label for label, _, _ in CURVE_METRICS if (d["metric"] == label).any()]
        if not labels:
            continue
        ncols = min(4, len(labels))
        nrows = int(np.ceil(len(labels) / ncols))
        fig = Figure(figsize=(3.4 * ncols, 2.8 * nrows))
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, label in zip(axes, labels):
            m = d[d["metric"] == label]
            percent = m["key"].iloc[0] in PERCENT_KEYS
            scale = 100 if percent else 1
            for algo in report.suite.algos:
                a = m[m["algo"] == algo].sort_values("step")
                if a.empty:
                    continue
                n = int(a["n_seeds"].max())
                a = a[a["n_seeds"] == n]  # only steps every seed has: the mean never jumps
                ax.plot(a["step"], a["mean"] * scale, color=colors[algo], label=f"{algo} (n={n})",
                        marker="." if len(a) < 30 else None)
                ax.fill_between(a["step"], a["min"] * scale, a["max"] * scale, color=colors[algo], alpha=0.2, linewidth=0)
            ax.set_title(f"{label}\n({UNITS.get(m['key'].iloc[0], m['key'].iloc[0])})", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in axes[len(labels):]:
            ax.set_visible(False)
        legend = {}  # every algorithm of any panel, with its n
        for ax in axes[:len(labels)]:
            for handle, text in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(text.split(" (")[0], (handle, text))
        axes[0].legend([h for h, _ in legend.values()], [t for _, t in legend.values()], fontsize=8)
        fig.suptitle(f"{report.suite.name}, noise {noise}: mean over seeds, band = min..max")
        fig.tight_layout()
        stem = file_stem("stability", report.suite.name, noise)
        _save(fig, folder, stem, exts)
        out[noise] = stem
    return out
