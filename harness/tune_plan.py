"""A tuning store's plan (`tune.json`: the algorithms, the trials' draws, seeds and noise), its
trials' folders, and the selection of each algorithm's trial from the cells' final validation
scores; read by `harness tune` (which writes the store) and `reports.tuning` (which reports it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from algorithms import ALGOS
from algorithms.search import search_space
from harness import store
from harness.errors import HarnessError


def trial_dir(algo: str, trial: int) -> str:
    """The algorithm folder of a trial's cells: `ppo.t03`."""
    return f"{algo}.t{trial:02d}"


def parse_trial_dir(name: str) -> tuple[str, int] | None:
    algo, dot, rest = name.rpartition(".t")
    return (algo, int(rest)) if dot and algo and rest.isdigit() else None


@dataclass
class Plan:
    """What a tune runs: the grid's algorithms, the trials' draws, the tuning seeds and noise."""

    suite: str
    algos: list[str]
    trials: int
    search_seed: int
    tune_seeds: list[int]
    report_seeds: list[int]
    noise: list[str]
    select: list[str]
    draws: dict[str, list[dict[str, Any]]]  # algo -> per trial {space key: value}
    defaults: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # algo -> trial 0's values

    def to_dict(self) -> dict[str, Any]:
        spaces = {algo: {key: {"distribution": dist.describe(), "log_scale": dist.log_scale,
                               "range": [getattr(dist, "low", None), getattr(dist, "high", None)]}
                         for key, dist in search_space(ALGOS.get(algo)).items()} for algo in self.algos}
        return {**dataclasses.asdict(self), "spaces": spaces,
                "rule": "mean final validation score over the trial's cells; ties to the lower trial"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def read_plan(tune_out: Path) -> tuple[Plan, dict[str, Any]]:
    """The plan of a tuning store, and tune.json's whole content (with the spaces)."""
    path = Path(tune_out) / "tune.json"
    if not path.is_file():
        raise HarnessError(f"{str(tune_out)!r} is not a tuning store (no tune.json; `harness tune` writes one)")
    data = store.read_json(path, keys=("suite", "algos", "trials", "tune_seeds", "noise", "select", "draws"))
    return Plan.from_dict(data), data


# ---- selection -----------------------------------------------------------------------------------

def cell_scores(tune_out: Path, plan: Plan):
    """One row per expected tuning cell: algo, trial, noise, seed, state, score (the mean final
    score over the selected validation benchmarks; NaN when the cell has none), id_acc, ood_acc."""
    import pandas as pd

    from reports.load import RunStore

    rs = RunStore(tune_out) if any(Path(tune_out).glob("*/*/*/seed*")) else None
    finals = rs.final_scores() if rs is not None else pd.DataFrame(columns=["algo", "noise", "seed", "benchmark", "value"])
    cells = rs.cells if rs is not None else pd.DataFrame(columns=["algo", "noise", "seed", "state", "id_acc", "ood_acc"])
    rows = []
    for algo in plan.algos:
        for trial in range(plan.trials):
            name = trial_dir(algo, trial)
            for noise in plan.noise:
                for seed in plan.tune_seeds:
                    where = (cells["algo"] == name) & (cells["noise"] == noise) & (cells["seed"] == seed)
                    cell = cells[where]
                    state = str(cell["state"].iloc[0]) if len(cell) else "pending"
                    mine = finals[(finals["algo"] == name) & (finals["noise"] == noise) & (finals["seed"] == seed)]
                    values = [mine.loc[mine["benchmark"] == b, "value"] for b in plan.select]
                    score = (sum(float(v.iloc[0]) for v in values) / len(values)
                             if values and all(len(v) for v in values) else math.nan)
                    rows.append({"algo": algo, "trial": trial, "noise": noise, "seed": seed, "state": state,
                                 "score": score,
                                 "id_acc": float(cell["id_acc"].iloc[0]) if len(cell) else math.nan,
                                 "ood_acc": float(cell["ood_acc"].iloc[0]) if len(cell) else math.nan})
    return pd.DataFrame(rows)


@dataclass
class Choice:
    algo: str
    trial: int  # the chosen trial
    score: float  # its validation score
    default_score: float  # trial 0's (NaN when it cannot be scored)
    values: dict[str, Any]  # the chosen trial's searched values ({} for the defaults)
    table: Any  # per trial: trial, score, sd, n, state (ok / why it cannot win)


def select(scores, plan: Plan) -> dict[str, Choice]:
    """The chosen trial of each algorithm from `cell_scores` rows (see the module doc for the rule).
    A HarnessError when some algorithm has no trial that can win."""
    import pandas as pd

    out = {}
    for algo in plan.algos:
        rows = []
        for trial in range(plan.trials):
            mine = scores[(scores["algo"] == algo) & (scores["trial"] == trial)]
            bad = mine[(mine["state"] != "done") | mine["score"].isna()]
            why = "ok" if len(mine) and not len(bad) else (
                f"{len(bad)} of {len(mine)} cell(s) {'/'.join(sorted(set(bad['state'])))} or without a final validation score")
            rows.append({"trial": trial, "score": float(mine["score"].mean()) if len(mine) else math.nan,
                         "sd": float(mine["score"].std(ddof=1)) if mine["score"].notna().sum() > 1 else math.nan,
                         "n": int(mine["score"].notna().sum()), "state": why})
        table = pd.DataFrame(rows)
        ok = table[table["state"] == "ok"]
        if not len(ok):
            raise HarnessError(f"no trial of {algo} can be selected: every trial has a cell that failed or has no "
                               f"final validation score (harness status --out <tune-out> lists them)")
        best = ok.sort_values(["score", "trial"], ascending=[False, True]).iloc[0]
        trial = int(best["trial"])
        default = table.iloc[0]
        out[algo] = Choice(algo, trial, float(best["score"]),
                           float(default["score"]) if default["state"] == "ok" else math.nan,
                           plan.draws[algo][trial], table)
    return out
