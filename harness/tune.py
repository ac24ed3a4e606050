"""`harness tune`: the same random-search budget for every algorithm of a grid, selected on a
validation split, written out as a grid file that `harness run --config` takes.

    harness tune --preset robustness --trials 8 --tune-seeds 2      # -> runs/robustness-tune/tuned.yaml
    harness run --config runs/robustness-tune/tuned.yaml             # the study, tuned: runs/robustness-tuned

For each algorithm, `--trials` configurations. Trial 0 is the grid's own configuration (the
defaults: tuning never loses them); trials 1.. draw every key of the algorithm's search space
(`algorithms.search`: lr, critic lr, KL coefficient and the algorithm's own knobs), each value a
pure function of (`--search-seed`, algorithm, trial, key), so adding an algorithm, a trial or a key
leaves every other draw as it was.

Every trial trains on each tuning seed (`--tune-seeds`: a count n is seeds 10000..10000+n-1; a list
is taken as given; never one of the reporting `--seeds`) under each noise setting (`--tune-noise`,
default the grid's), as cells of a tuning store run by the grid runner, so an interrupted tune
(even `kill -9`) resumes like `harness run`:

    <tune-out>/<suite>/<algo>.t<NN>/<noise>/seed<k>/     one cell per (algorithm, trial, noise, seed)
    <tune-out>/tune.json                                 the search: spaces, draws, seeds, selection rule
    <tune-out>/tuned.yaml                                the grid file written (default of --write)
    <tune-out>/report/                                   tuning.md and a sensitivity plot per algorithm

The tuning cells hold out a validation split of the suite's training data (`suite.n_val`, default
`DEFAULT_N_VAL`; see the suite's docs) and evaluate it as benchmarks of role VAL. Selection: a
trial's score is the mean, over its cells, of the final score on the validation benchmarks
(`--select`, default all of them). The highest score wins; a tie goes to the lower trial index
(the defaults first). A trial with a cell that failed or has no final validation score cannot win.
Selecting on an ID or OOD test benchmark is refused: the test sets stay unseen until the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from algorithms import ALGOS
from algorithms.search import search_space
from harness import store
from harness.config import SECTIONS
from harness.errors import HarnessError
from harness.cell import Cell
from harness.resolver import build_cells, comma_list, parse_seeds
from harness.seeding import uniform
from harness.tune_plan import Choice, Plan, cell_scores, select, trial_dir

TUNE_SEED_BASE = 10_000  # `--tune-seeds N` is seeds 10000..10000+N-1, far from any reporting seed
DEFAULT_N_VAL = 100  # validation problems held out of the train split when the grid sets none
TEST_ROLES = ("ID", "OOD")
VAL_ROLE = "VAL"


@dataclass
class TrialCell(Cell):
    """A cell of the tuning store: one trial of one algorithm."""

    trial: int = 0

    @property
    def label(self) -> str:
        return f"{self.cfg.suite}/{trial_dir(self.cfg.algo, self.trial)}/{self.cfg.noise}/seed{self.cfg.seed}"


def parse_tune_seeds(text: str, report_seeds: list[int]) -> list[int]:
    """`--tune-seeds`: a count n (seeds TUNE_SEED_BASE..+n-1) or a list; refused when it shares a
    seed with the reporting seeds (a tuned configuration must not be chosen on the seeds it is
    reported on)."""
    seeds = parse_seeds(text)
    if str(text).strip().isdigit():
        seeds = [TUNE_SEED_BASE + s for s in seeds]
    shared = sorted(set(seeds) & set(report_seeds))
    if shared:
        raise HarnessError(f"--tune-seeds {text} shares seed(s) {', '.join(map(str, shared))} with the reporting "
                           f"--seeds: tuning seeds must be disjoint from them (e.g. --tune-seeds 2, seeds "
                           f"{TUNE_SEED_BASE} and {TUNE_SEED_BASE + 1})")
    return seeds


def draw_trial(algo: str, trial: int, search_seed: int) -> dict[str, Any]:
    """The searched values of a trial, {space key: value}; trial 0 is the grid's own configuration ({})."""
    if trial == 0:
        return {}
    space = search_space(ALGOS.get(algo))
    return {key: dist.sample(uniform(search_seed, "tune", algo, trial, key)) for key, dist in space.items()}


def set_key(algo: str, key: str) -> str:
    """A space key as the `--set` key for that algorithm alone: train.lr -> ppo.train.lr, algo.beta -> flowrl.beta."""
    section, _, name = key.partition(".")
    return f"{algo}.{key}" if section in SECTIONS else f"{algo}.{name}"


def config_value(cfg, key: str) -> Any:
    """A space key's value in a cell's resolved configuration (`RunConfig`)."""
    section, _, name = key.partition(".")
    return getattr(cfg.algo_options if section == "algo" else getattr(cfg, section), name)


def trial_overrides(algo: str, values: dict[str, Any]) -> dict[str, str]:
    return {set_key(algo, key): str(value) for key, value in values.items()}


# ---- the grid file ------------------------------------------------------------------------------

def tuned_overrides(choices: dict[str, Choice]) -> dict[str, Any]:
    """The `set:` keys a tuned grid file adds: each chosen trial's values, for its algorithm alone."""
    return {set_key(c.algo, key): value for c in choices.values() for key, value in c.values.items()}


def grid_file_text(options: dict[str, Any], overrides: dict[str, Any], choices: dict[str, Choice],
                   plan: Plan, tune_out: Path) -> str:
    """A grid file (harness.runfile) of the tuned configurations, with how each was chosen."""
    import yaml

    lines = [f"# Tuned by harness tune: {plan.trials} configurations per algorithm, selected on "
             f"{', '.join(plan.select)} (never on the ID/OOD test benchmarks)",
             f"# Tuning store {tune_out}: seeds {', '.join(map(str, plan.tune_seeds))} (disjoint from the reporting "
             f"seeds), noise {', '.join(plan.noise)}, search seed {plan.search_seed}. Per algorithm: the chosen trial "
             "and its mean validation score (the defaults' in brackets)."]
    for c in choices.values():
        chosen = "the defaults" if c.trial == 0 else ", ".join(f"{k}={v}" for k, v in c.values.items())
        lines.append(f"#   {c.algo}: trial {c.trial} ({chosen}): {c.score:.3f} [{c.default_score:.3f}]")
    body = dict(options)
    if overrides:
        body["set"] = overrides
    return "\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


PINNED = ("suite", "algos", "noise", "seeds")  # written even at their defaults: the file names its grid


def file_options(args: argparse.Namespace, run_parser: argparse.ArgumentParser, out: str,
                 algos: list[str]) -> dict[str, Any]:
    """The run options of the tuned grid file: the suite, algorithms, noise and seeds, every other
    `harness run` option the tune was given (from the grid file or the command line) that differs
    from its default, and `out`."""
    from harness.runfile import run_options

    options: dict[str, Any] = {}
    for dest, action in run_options(run_parser).items():
        value = algos if dest == "algos" else getattr(args, dest, None)
        if dest in ("out", "quiet") or value is None or (value == action.default and dest not in PINNED):
            continue
        if dest == "seeds":
            text = str(value).strip()
            value = int(text) if text.isdigit() else parse_seeds(text)
        if dest == "noise":
            value = comma_list(value, "--noise")
        options[dest.replace("_", "-")] = value
    options["out"] = out
    return options


# ---- the command --------------------------------------------------------------------------------

def run_flag_overrides(args: argparse.Namespace, overrides: dict[str, str]) -> dict[str, str]:
    """The config keys `harness run`'s flags set, over `overrides` (a copy): used by `harness run` and `harness tune`."""
    out = dict(overrides)
    if args.rollout:
        out["train.rollout"] = args.rollout
    if args.nproc is not None:
        out["train.nproc"] = str(args.nproc)
    if args.nnodes is not None:
        out["train.nnodes"] = str(args.nnodes)
    for flag, key in (("data_dir", "suite.data_dir"), ("train_data", "suite.train"), ("id", "suite.id"),
                      ("ood", "suite.ood")):
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    return out


def validation_benchmarks(cell: Cell) -> tuple[list[str], dict[str, str]]:
    """The VAL benchmarks of a tuning cell's suite, and every benchmark's role."""
    from tasks import SUITES

    suite_cls = SUITES.get(cell.cfg.suite)
    suite = suite_cls(cell.cfg.suite_options, cell.cfg.seed)
    roles = {b.name: b.role for b in suite.eval_benchmarks()}
    return [name for name, role in roles.items() if role == VAL_ROLE], roles


def check_select(text: str | None, val: list[str], roles: dict[str, str]) -> list[str]:
    """`--select`: validation benchmarks only; a test benchmark (ID/OOD) is refused."""
    if text is None:
        return val
    names = comma_list(text, "--select")
    if not names:
        raise HarnessError(f"--select needs at least one validation benchmark (valid: {', '.join(val)})")
    for name in names:
        role = roles.get(name, name if name in TEST_ROLES else None)
        if role in TEST_ROLES:
            raise HarnessError(f"--select {name}: {name} is a test benchmark ({role}); tune selects on the validation "
                               f"split only, never on the ID/OOD test benchmarks (valid: {', '.join(val)})")
        if role != VAL_ROLE:
            raise HarnessError(f"--select {name}: not a benchmark of this suite (valid: {', '.join(val)})")
    return names


def build_trial_cells(args: argparse.Namespace, overrides: dict[str, str], plan_args: dict[str, Any],
                      tune_out: Path) -> list[TrialCell]:
    """Every tuning cell, each configuration resolved and validated before anything is written."""
    cells: list[TrialCell] = []
    for algo in plan_args["algos"]:
        for trial in range(plan_args["trials"]):
            values = draw_trial(algo, trial, plan_args["search_seed"])
            built = build_cells(suite=args.suite, algos=[algo], noise=",".join(plan_args["noise"]),
                                seeds=plan_args["tune_seeds"], out=tune_out, model=args.model, steps=args.steps,
                                eval_limit=args.eval_limit, overrides={**overrides, **trial_overrides(algo, values)})
            for cell in built:
                fields = {f.name: getattr(cell, f.name) for f in dataclasses.fields(Cell)}
                fields["path"] = store.cell_dir(tune_out, cell.cfg.suite, trial_dir(algo, trial), cell.cfg.noise,
                                                cell.cfg.seed)
                cells.append(TrialCell(**fields, trial=trial))
    return cells


@dataclass
class Job:
    """A tune, resolved and checked before anything is written."""

    plan: Plan
    cells: list[TrialCell]
    tune_out: Path
    write: Path  # the tuned grid file
    options: dict[str, Any]  # its run options
    overrides: dict[str, str]  # its grid-wide `set:` keys (the grid's own, less the validation split)


def prepare(args: argparse.Namespace, overrides: dict[str, str], run_parser: argparse.ArgumentParser) -> Job:
    """Resolve the tune: seeds, algorithms, noise, every tuning cell, the validation benchmarks to
    select on; every refusal happens here."""
    from harness.resolver import default_algos, parse_algos
    from noise import parse_noise_list
    from tasks import SUITES

    if args.trials < 1:
        raise HarnessError(f"--trials must be a positive integer, got {args.trials}")
    report_seeds = parse_seeds(args.seeds)
    tune_seeds = parse_tune_seeds(args.tune_seeds, report_seeds)
    algos = parse_algos(args.algos) if args.algos is not None else default_algos()
    noise = [spec.name for spec in parse_noise_list(args.tune_noise or args.noise)]
    suite_cls = SUITES.get(args.suite)
    option = suite_cls.validation_option
    if not option:
        raise HarnessError(f"suite {args.suite!r} has no validation split, and tune never selects on its test "
                           f"benchmarks (suites with one: {', '.join(n for n in SUITES.names() if SUITES.get(n).validation_option)})")
    out = str(args.out).rstrip("/") or "runs"
    tune_out = Path(args.tune_out or f"{out}-tune")
    if tune_out.resolve() in (Path(out).resolve(), Path(f"{out}-tuned").resolve()):
        raise HarnessError(f"--tune-out {str(tune_out)!r} is the grid's run store or its tuned one; give the tuning "
                           f"store a folder of its own (default: {out}-tune)")
    plan_args = {"algos": algos, "trials": args.trials, "search_seed": args.search_seed, "tune_seeds": tune_seeds,
                 "noise": noise}
    tune_overrides = {f"suite.{option}": str(DEFAULT_N_VAL), **run_flag_overrides(args, overrides)}
    cells = build_trial_cells(args, tune_overrides, plan_args, tune_out)
    if max(c.cfg.train.nnodes for c in cells) > 1:
        raise HarnessError("harness tune runs its cells on this node (train.nnodes 1); tune a multi-node grid with "
                           "--nproc on one node, or run its trials as grids of their own")
    val, roles = validation_benchmarks(cells[0])
    if not val:
        raise HarnessError(f"suite.{option}=0 leaves no validation split to select on: give it a positive size")
    plan = Plan(suite=args.suite, report_seeds=report_seeds, select=check_select(args.select, val, roles),
                draws={a: [draw_trial(a, t, args.search_seed) for t in range(args.trials)] for a in algos},
                defaults={c.cfg.algo: {key: config_value(c.cfg, key) for key in search_space(ALGOS.get(c.cfg.algo))}
                          for c in cells if c.trial == 0}, **plan_args)
    write = Path(args.write) if args.write else tune_out / "tuned.yaml"
    if write.is_dir():
        raise HarnessError(f"--write {str(write)!r} is a folder; give a file name for the tuned grid file")
    # The study trains on the whole train split: the tuned file does not hold the validation split out.
    kept = {k: v for k, v in overrides.items() if k != f"suite.{option}"}
    return Job(plan, cells, tune_out, write, file_options(args, run_parser, f"{out}-tuned", algos), kept)


def tune_command(args: argparse.Namespace, overrides: dict[str, str], run_parser: argparse.ArgumentParser) -> int:
    from harness.grid import default_workers, run_grid
    from harness.tracking import parse_backends
    from reports.tuning import write_tuning_report

    job = prepare(args, overrides, run_parser)
    log_to = parse_backends(args.log_to)
    for cell in job.cells:  # tuning cells keep no model (--save-model applies to the tuned grid's run)
        cell.grid, cell.log_to = job.tune_out.resolve().name, log_to
    workers = args.workers if args.workers is not None else default_workers(job.cells)
    store.claim_store(job.tune_out)
    store.atomic_write_json(job.tune_out / "tune.json", job.plan.to_dict())
    try:
        counts = run_grid(job.cells, cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                          progress=not args.quiet, workers=workers, backend=args.backend, ray_address=args.ray_address,
                          ckpt_every=args.ckpt_every, retry_failed=args.retry_failed, out=job.tune_out)
    except KeyboardInterrupt:
        print(f"harness: interrupted: the same command resumes the tuning cells from their last checkpoints "
              f"({job.tune_out})", file=sys.stderr)
        return 130
    failed = counts["failed"] + counts["left_failed"] + counts["unreadable"]
    print(f"tune: {counts['done']} cells done, {counts['skipped']} already done, {failed} failed"
          f"{' (their trials cannot win; harness status --out ' + str(job.tune_out) + ' lists them)' if failed else ''}"
          f" -> {job.tune_out}")
    choices = select(cell_scores(job.tune_out, job.plan), job.plan)
    job.write.parent.mkdir(parents=True, exist_ok=True)
    store.atomic_write_text(job.write, grid_file_text(job.options, {**job.overrides, **tuned_overrides(choices)},
                                                      choices, job.plan, job.tune_out))
    for c in choices.values():
        chosen = "the defaults" if c.trial == 0 else ", ".join(f"{k}={v}" for k, v in c.values.items())
        print(f"  {c.algo:10s} trial {c.trial} ({chosen}): validation {c.score:.3f} (defaults {c.default_score:.3f})")
    report = write_tuning_report(job.tune_out, job.tune_out / "report", formats=["md", "png"])
    print(f"wrote {job.write} (harness run --config {job.write}) and {report}")
    return 0
