"""The grid: resolve every cell's configuration up front (bad input fails before anything is
written), then run the cells one by one, skipping those already done and containing failures."""
from __future__ import annotations

import dataclasses
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from algorithms import ALGOS
from harness import store
from harness.config import (RunConfig, apply_section_overrides, options_dataclass, set_dataclass_field,
                            split_overrides)
from harness.errors import HarnessError
from noise import parse_noise_list
from tasks import SUITES

# The mission's algorithms, in this order, as far as they are registered.
MISSION_ALGOS = ("ppo", "grpo", "dvpo", "flowrl", "dfpo")


def default_algos() -> list[str]:
    return [name for name in MISSION_ALGOS if name in ALGOS]


@dataclass
class Cell:
    cfg: RunConfig
    path: Path

    @property
    def label(self) -> str:
        return f"{self.cfg.suite}/{self.cfg.algo}/{self.cfg.noise}/seed{self.cfg.seed}"


def parse_seeds(text: str) -> list[int]:
    """`"3"` -> [0, 1, 2]; `"0,5,7"` -> [0, 5, 7]."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise HarnessError(f"--seeds takes a count (e.g. 2) or a comma list of seeds (e.g. 0,1,5), got {text!r}") from None
    if len(values) == 1 and "," not in str(text):
        if values[0] < 1:
            raise HarnessError(f"--seeds count must be at least 1, got {values[0]}")
        return list(range(values[0]))
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise HarnessError(f"--seeds list must hold distinct non-negative integers, got {text!r}")
    return values


def parse_algos(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise HarnessError(f"--algos needs at least one algorithm (valid: {', '.join(ALGOS.names())})")
    for name in names:
        ALGOS.get(name)
    if len(set(names)) != len(names):
        raise HarnessError(f"--algos lists an algorithm twice: {text!r}")
    return names


def resolve_options(options_cls: type, groups: dict[str, dict[str, str]], shared: str, own: str) -> dict[str, Any]:
    """Options of one algorithm (or the suite): shared keys it has, then its own keys."""
    field_names = {f.name for f in dataclasses.fields(options_cls)}
    overrides = {k: v for k, v in groups.get(shared, {}).items() if k in field_names}
    overrides.update(groups.get(own, {}))
    return dataclasses.asdict(options_dataclass(options_cls, overrides, own))


def build_cells(suite: str, algos: list[str], noise: str, seeds: list[int], out: Path,
                model: str | None = None, steps: int | None = None, eval_limit: int | None = None,
                overrides: dict[str, str] | None = None) -> list[Cell]:
    suite_cls = SUITES.get(suite)
    noise_specs = parse_noise_list(noise)
    groups = split_overrides(overrides or {}, ALGOS.names())
    for key in groups.get("algo", {}):
        if not any(key in {f.name for f in dataclasses.fields(ALGOS.get(a).Options)} for a in algos):
            raise HarnessError(f"config key 'algo.{key}' is an option of none of: {', '.join(algos)}")
    for name in groups:
        if name in ALGOS and name not in algos:
            raise HarnessError(f"--set {name}.* given but {name!r} is not in --algos ({', '.join(algos)})")
    suite_options = resolve_options(suite_cls.Options, groups, "suite", "suite")
    cells = []
    for algo in algos:
        algo_options = resolve_options(ALGOS.get(algo).Options, groups, "algo", algo)
        for spec in noise_specs:
            for seed in seeds:
                cfg = RunConfig(suite=suite, algo=algo, noise=spec.name, seed=seed,
                                algo_options=algo_options, suite_options=suite_options)
                if model is not None:
                    cfg.model.name = model
                if steps is not None:
                    if steps < 1:
                        raise HarnessError(f"--steps must be a positive integer, got {steps}")
                    cfg.train.steps = steps
                if eval_limit is not None:
                    set_dataclass_field(cfg.eval, "limit", str(eval_limit), "--eval-limit")
                apply_section_overrides(cfg, groups)
                cells.append(Cell(cfg, store.cell_dir(out, suite, algo, spec.name, seed)))
    return cells


def run_grid(cells: list[Cell], cache_dir: Path | None = None, progress: bool = True) -> dict[str, int]:
    """Run every cell not yet done. Returns counts of done / skipped / failed cells."""
    from harness.trainer import Trainer

    counts = {"done": 0, "skipped": 0, "failed": 0}
    bar = tqdm(cells, desc="grid", unit="cell", disable=not progress)
    for cell in bar:
        bar.set_postfix_str(cell.label)
        status = store.read_status(cell.path)
        if status and status.get("state") == "done":
            counts["skipped"] += 1
            continue
        store.reset_cell(cell.path)
        store.atomic_write_json(cell.path / "config.json", cell.cfg.to_dict())
        store.write_status(cell.path, "running")
        try:
            summary = Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=progress).run()
        except KeyboardInterrupt:
            store.write_status(cell.path, "failed", reason="interrupted")
            raise
        except HarnessError as exc:  # bad input met inside a cell (a model that cannot load): stop the grid
            store.write_status(cell.path, "failed", reason=str(exc))
            raise
        except Exception as exc:  # a failing cell must not stop the grid
            reason = f"{type(exc).__name__}: {exc}"
            store.write_status(cell.path, "failed", reason=reason, traceback=traceback.format_exc())
            tqdm.write(f"cell {cell.label} failed: {reason}")
            counts["failed"] += 1
            continue
        store.write_status(cell.path, "done", **summary)
        counts["done"] += 1
    return counts
