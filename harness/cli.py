"""`harness run | tune | status | report | eval | bench | plan | list`.

Bad input ends with one line `harness: error: ...` (at most 2000 characters) and exit status 2, before
anything is written. SIGINT or SIGTERM ends any command with one line `harness: interrupted...` and
exit status 130; a closed pipe (`harness list config | head`) ends it quietly with status 141.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from harness.cli_parser import build_parser, subparser
from harness.errors import HarnessError


def with_trust(args, overrides: dict[str, str]) -> dict[str, str]:
    """`--trust-remote-code` as the config key it sets."""
    if getattr(args, "trust_remote_code", False):
        overrides["model.trust_remote_code"] = "true"
    return overrides


# Upper bounds of the numbers only the command line gives (the config keys' are harness.config.UPPER_BOUNDS).
MAX_WORKERS = 1024
MAX_BENCH = {"--steps": 100_000, "--warmup": 10_000, "--rounds": 100}
MAX_PROMPT_LEN = 1_048_576
MAX_MEASURE = 100_000


def check_at_most(flag: str, value: int | None, bound: int) -> None:
    if value is not None and value > bound:
        raise HarnessError(f"{flag} must be at most {bound}, got {value}")


def cmd_run(args, origin=None) -> int:
    from harness.config import parse_assignments

    cli_overrides = parse_assignments(args.set)
    try:
        return run_command(args, {**(origin.overrides if origin else {}), **cli_overrides})
    except HarnessError as exc:
        raise (origin.blame(exc, cli_overrides) if origin else exc) from None


def run_command(args, overrides: dict[str, str]) -> int:
    from harness.config import MAX_STEPS
    from harness.cell import NodeLaunch
    from harness.bootstrap import usable_cpus
    from harness.grid import default_workers, oversubscription, run_grid
    from harness.launch import check_nodes
    from harness.resolver import build_cells, default_algos, parse_algos, parse_seeds
    from harness.tracking import parse_backends
    from harness.tune import run_flag_overrides

    algos = parse_algos(args.algos) if args.algos is not None else default_algos()
    with_trust(args, overrides)
    check_at_most("--workers", args.workers, MAX_WORKERS)
    check_at_most("--ckpt-every", args.ckpt_every, MAX_STEPS)
    overrides = run_flag_overrides(args, overrides)
    cells = build_cells(
        suite=args.suite, algos=algos, noise=args.noise, seeds=parse_seeds(args.seeds), out=Path(args.out),
        model=args.model, steps=args.steps, eval_limit=args.eval_limit, overrides=overrides,
    )
    log_to = parse_backends(args.log_to)
    workers = args.workers if args.workers is not None else default_workers(cells)
    if args.backend == "local" and (note := oversubscription(cells, workers, usable_cpus())):
        print(f"harness: {note}", file=sys.stderr)
    grid = Path(args.out).resolve().name
    node = NodeLaunch(rank=args.node_rank, endpoint=args.rdzv_endpoint, run_id=args.rdzv_id or grid)
    check_nodes(max(c.cfg.train.nnodes for c in cells), node, args.backend, workers)
    for cell in cells:
        cell.log_to = log_to
        cell.grid = grid
        cell.save_model = args.save_model or ("none" if cell.cfg.model.name == "tiny" else "final")
        cell.node = node
    try:
        counts = run_grid(cells, cache_dir=Path(args.cache_dir) if args.cache_dir else None, progress=not args.quiet,
                          workers=workers,
                          backend=args.backend, ray_address=args.ray_address,
                          ckpt_every=args.ckpt_every, retry_failed=args.retry_failed, out=Path(args.out))
    except KeyboardInterrupt:  # SIGINT or SIGTERM, to the process or its group (harness.grid.interrupt_signals)
        print(f"harness: interrupted: cells that were running are marked interrupted; the same command "
              f"resumes them from their last checkpoints ({args.out})", file=sys.stderr)
        return 130
    line = f"grid: {counts['done']} done, {counts['skipped']} already done, {counts['failed']} failed"
    if counts["resumed"]:
        line += f", {counts['resumed']} resumed from a checkpoint"
    if counts["left_failed"]:
        line += f", {counts['left_failed']} failed earlier and left as they are (--retry-failed re-runs them)"
    if counts["unreadable"]:
        line += f", {counts['unreadable']} finished with an unreadable status.json and left as they are"
    print(f"{line} -> {args.out}")
    return 1 if counts["failed"] or counts["left_failed"] or counts["unreadable"] else 0


def cmd_tune(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    from harness.config import parse_assignments
    from harness.runfile import parse_with_file
    from harness.tune import tune_command

    args, origin = parse_with_file(parser, subparser(parser, "tune"), argv)
    cli_overrides = parse_assignments(args.set)
    try:
        return tune_command(args, {**(origin.overrides if origin else {}), **cli_overrides}, subparser(parser, "run"))
    except HarnessError as exc:
        raise (origin.blame(exc, cli_overrides) if origin else exc) from None


def cmd_status(args) -> int:
    from harness import store
    from harness.status import grid_status

    rows = grid_status(Path(args.out))
    holder = store.lock_holder(Path(args.out))
    by_state = {s: sum(r["state"] == s for r in rows) for s in ("done", "running", "failed", "pending")}
    if any(r["state"] == "corrupt" for r in rows):
        by_state["corrupt"] = sum(r["state"] == "corrupt" for r in rows)
    print(f"{args.out}: {len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in by_state.items())
          + (f"; harness run pid {holder} is using it" if holder else ""))
    width = max([len(r["cell"]) for r in rows] + [4])
    print(f"{'cell':{width}s}  {'state':8s}  {'step':>9s}  detail")
    for r in rows:
        step = f"{r['step']}/{r['steps'] if r['steps'] is not None else '?'}"
        print(f"{r['cell']:{width}s}  {r['state']:8s}  {step:>9s}  {r['detail']}")
    return 0


def cmd_report(args) -> int:
    from harness.runfile import grid_file, read_mapping
    from reports import write_report

    runs = args.runs
    if args.default_runs and not args.tuning:
        raise HarnessError("--default-runs needs --tuning (the tuning store whose tuned grid --runs ran)")
    if args.tuning:
        from harness.tune_plan import read_plan

        read_plan(Path(args.tuning))  # not a tuning store: refused before the report is written
    if args.default_runs and not Path(args.default_runs).is_dir():
        raise HarnessError(f"--default-runs {args.default_runs!r}: no such run store")
    path = grid_file(args)
    if runs is None:  # an explicit --runs beats the grid file's out
        runs = str(read_mapping(path).get("out", "runs")) if path is not None else "runs"
    corrupt: list[str] = []
    out = write_report(Path(runs), Path(args.out) if args.out else None, args.baseline, args.format,
                       skipped=corrupt, margin=parse_margin(args.margin))
    if (out / "report.md").exists():
        print((out / "report.md").read_text(encoding="utf-8"))
    print(f"wrote {out}")
    if args.tuning:
        from reports.tables import parse_formats
        from reports.tuning import write_tuning_report

        print(f"wrote {write_tuning_report(Path(args.tuning), out, Path(runs), args.default_runs, parse_formats(args.format))}")
    if corrupt:
        level = "error: --strict" if args.strict else "warning"
        from harness.store import one_line

        print(one_line(f"harness: {level}: {len(corrupt)} cell(s) skipped, their files are corrupt: " + "; ".join(corrupt)),
              file=sys.stderr)  # every one is listed in the report too
    return 1 if corrupt and args.strict else 0


def parse_margin(text: str | None) -> float | None:
    """`--margin POINTS` as a fraction (None: the default); a one-line error unless 0 < POINTS < 100."""
    if text is None:
        return None
    try:
        points = float(text)
    except ValueError:
        points = math.nan
    if not 0 < points < 100:
        raise HarnessError(f"--margin takes percentage points between 0 and 100 (exclusive), e.g. 2.3; got {text!r}")
    return points / 100


def cmd_bench(args) -> int:
    from harness.bench import QUICK, run_bench
    from harness.config import parse_assignments
    from harness.resolver import parse_algos

    steps, warmup, rounds = (QUICK["steps"], QUICK["warmup"], QUICK["rounds"]) if args.quick \
        else (args.steps, args.warmup, args.rounds)
    for flag, value in (("--steps", steps), ("--warmup", warmup), ("--rounds", rounds)):
        check_at_most(flag, value, MAX_BENCH[flag])
    overrides = with_trust(args, parse_assignments(args.set))
    rollout = args.rollout or overrides.get("train.rollout", "hf")  # the HF rows stay HF; vllm adds rows
    overrides.pop("train.rollout", None)
    run_bench(steps, warmup, overrides, args.cache_dir, with_trl=not args.no_trl,
              algos=parse_algos(args.algos) if args.algos else None, rounds=rounds, model=args.model, rollout=rollout)
    return 0


def plan_configs(args) -> list:
    """The resolved configuration of each algorithm's cell, as `harness run` would build it, without
    the data check (a plan needs no benchmark files) and without importing vLLM."""
    import tempfile

    from harness.config import parse_assignments
    from harness.resolver import build_cells, default_algos, parse_algos

    overrides = with_trust(args, parse_assignments(args.set))
    overrides["train.nproc"] = str(args.nproc)
    overrides["train.nnodes"] = str(args.nnodes)
    # train.rollout is set after build_cells, whose check of `vllm` would need vLLM installed.
    set_rollout = overrides.pop("train.rollout", "hf")
    rollout = args.rollout or set_rollout
    if rollout not in ("hf", "vllm"):
        raise HarnessError(f"train.rollout must be hf or vllm, got {rollout!r}")
    algos = parse_algos(args.algos) if args.algos is not None else default_algos()
    suite = args.suite or ("arith" if args.model == "tiny" else "math")
    cells = build_cells(suite=suite, algos=algos, noise="none", seeds=[0], out=Path(tempfile.gettempdir()),
                        model=args.model, overrides=overrides, check_data=False)
    for cell in cells:
        cell.cfg.train.rollout = rollout
        if cell.cfg.train.world_size > 1:
            from harness.distributed import check_config

            check_config(cell.cfg)  # what a sharded cell refuses (vLLM among them), refused here too
    return [cell.cfg for cell in cells]


def cmd_plan(args) -> int:
    from harness.plan import format_plans, parse_memory, plan_cell, plans_json

    device = parse_memory(args.device_memory)
    if args.prompt_len is not None and args.prompt_len < 1:
        raise HarnessError(f"--prompt-len must be a positive integer, got {args.prompt_len}")
    if args.measure < 0:
        raise HarnessError(f"--measure must be a number of steps >= 0, got {args.measure}")
    check_at_most("--prompt-len", args.prompt_len, MAX_PROMPT_LEN)
    check_at_most("--measure", args.measure, MAX_MEASURE)
    cfgs = plan_configs(args)
    t = cfgs[0].train
    prompt_len = args.prompt_len or max(cfgs[0].model.max_positions - t.max_new_tokens, 1)
    plans = [plan_cell(cfg, prompt_len, device) for cfg in cfgs]
    print(plans_json(plans) if args.json else format_plans(plans, args.model, prompt_len, cfgs[0]))
    if args.measure:
        from harness.plan_measure import format_measurements, measure_cell

        print(format_measurements([(plan, measure_cell(cfg, args.measure, cache_dir=args.cache_dir))
                                   for plan, cfg in zip(plans, cfgs)]))
    return 0 if all(p.fits for p in plans) else 1


def cmd_list(args) -> int:
    if args.what == "algos":
        from algorithms import ALGOS

        for name in ALGOS.names():
            cls = ALGOS.get(name)
            print(f"{name:12s} {cls.description} [{cls.paper}]")
    elif args.what == "suites":
        from tasks import SUITES

        for name in SUITES.names():
            print(f"{name:12s} {SUITES.get(name).description}")
    elif args.what == "presets":
        from harness.runfile import list_presets

        for name, description in list_presets():
            print(f"{name:20s} {description}")
    elif args.what == "config":
        from harness.catalog import config_rows, format_rows

        print("\n".join(format_rows(config_rows())))
    else:
        from noise import list_noise

        for usage, description in list_noise():
            print(f"{usage:12s} {description}")
    return 0


MAX_RETEST = 100  # harness eval --retest R: R final scores of one policy


def cmd_eval(args) -> int:
    from harness.config import MAX_SEED, parse_assignments
    from harness.model_eval import run_eval

    overrides = with_trust(args, parse_assignments(args.set))
    for flag, key in (("id", "suite.id"), ("ood", "suite.ood")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    if not 0 <= args.seed <= MAX_SEED:
        raise HarnessError(f"--seed must be in 0..{MAX_SEED}, got {args.seed}")
    if args.lm_eval_max_length is not None and not 1 <= args.lm_eval_max_length <= MAX_PROMPT_LEN:
        raise HarnessError(f"--lm-eval-max-length must be in 1..{MAX_PROMPT_LEN}, got {args.lm_eval_max_length}")
    if args.retest_into is not None and not args.retest:
        raise HarnessError("--retest-into records a test-retest sd: give --retest R with it")
    if args.retest:
        if args.retest > MAX_RETEST:
            raise HarnessError(f"--retest must be in 2..{MAX_RETEST} (repeats of the final score), got {args.retest}")
        return retest_command(args, overrides)
    lm_tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
    try:
        folder = run_eval(args.model, args.suite, overrides, Path(args.out), seed=args.seed, name=args.name,
                          data_dir=args.data_dir, eval_limit=args.eval_limit, lm_eval_tasks=lm_tasks,
                          lm_eval_include=args.lm_eval_include, lm_eval_gen_kwargs=args.lm_eval_gen_kwargs,
                          lm_eval_max_length=args.lm_eval_max_length,
                          cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    except KeyboardInterrupt:  # SIGINT or SIGTERM (main's interrupt_signals)
        print(f"harness: interrupted: the evaluation stopped; no row was written to {args.out} (a row is written "
              "whole or not at all)", file=sys.stderr)
        return 130
    print(f"wrote {folder}")
    return 0


def retest_command(args, overrides: dict[str, str]) -> int:
    """`harness eval --retest R`: the test-retest sd of one policy's score (harness.model_eval.retest)."""
    from harness import store
    from harness.model_eval import retest
    from harness.resolver import cell_config

    if args.lm_eval:
        raise HarnessError("--retest and --lm-eval do not go together (--retest evaluates the suite's benchmarks only)")
    if args.data_dir is not None:  # as run_eval: the suites that read files take it
        import dataclasses

        from tasks import SUITES

        options = SUITES.get(args.suite or (cell_config(args.model) or {}).get("suite", "arith")).Options
        if "data_dir" in {f.name for f in dataclasses.fields(options)}:
            overrides = {"suite.data_dir": args.data_dir, **overrides}
    if args.retest_into is not None:
        store.check_out_dir(Path(args.retest_into))  # before the evaluations: a run store or a new folder
    result = retest(args.model, args.suite, overrides, args.retest, seed=args.seed, eval_limit=args.eval_limit,
                    cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    for role, r in result.items():
        print(f"{role:3s} final score {100 * r['mean']:.2f} %: test-retest sd {100 * r['sd']:.2f} points over "
              f"{r['repeats']} repeats (each the mean of {r['final_evals']} evaluation(s) at k={r['k']}); "
              f"one evaluation's sd {100 * r['sd_one_evaluation']:.2f} points")
    if args.retest_into is not None:
        record_retest(Path(args.retest_into), args.suite or (cell_config(args.model) or {}).get("suite", "arith"), result)
    return 0


def record_retest(runs: Path, suite: str, result: dict) -> None:
    """RUNS/<suite>/retest.json for the report's gate (reports/validity.py): the larger of the ID and OOD
    test-retest sds (the gate holds only if both do), with the repeats and each role's figures."""
    from harness import store
    from reports.validity import RETEST_FILE

    store.claim_store(runs)
    path = runs / suite / RETEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    store.atomic_write_json(path, {"sd": max(r["sd"] for r in result.values()),
                                   "repeats": min(r["repeats"] for r in result.values()), "roles": result})
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    from harness.runfile import parse_with_file
    from harness.signals import interrupt_signals
    from harness.store import one_line, os_error_message

    try:
        with interrupt_signals():  # SIGTERM as Ctrl-C, for every command: one line below, clean-ups done
            parser = build_parser()
            args, origin = parse_with_file(parser, subparser(parser, "run"), argv)
            if args.command == "run":
                return cmd_run(args, origin)
            if args.command == "tune":
                return cmd_tune(parser, argv)
            return {"status": cmd_status, "report": cmd_report, "eval": cmd_eval, "bench": cmd_bench,
                    "plan": cmd_plan, "list": cmd_list}[args.command](args)
    except HarnessError as exc:
        print(f"harness: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`harness list config | head`): end quietly, as `cat` does
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, a pipe writer's status
    except OSError as exc:  # full disk, read-only folder, a file where a folder should be
        print(f"harness: error: {one_line(os_error_message(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
