"""The most a population of K cells in one process could win over K cells trained apart (issue 31).

A population trains K members that differ by seed with their weights stacked, so each operator of a
step runs once on K members' rows. Whatever its implementation, it cannot do less work than *one*
model stepping on K times the rows (the same FLOPs in the fewest operators: one matmul where the
population needs a batched one, one optimiser step where it needs K members' clipping and Adam). So
this script measures exactly that with the harness's own step (`harness bench`'s worker, each
configuration in its own process): the default `arith` cell of each algorithm at
`train.prompts_per_step` = 32 K, minibatch count unchanged, and prints the ceiling on the per-member
speedup of a step, K * t(32) / t(32 K), and of a cell (200 steps plus a cell's fixed cost in a grid,
`--setup`, paid once for K members instead of K times). t is CPU seconds a step (one torch thread:
steadier than wall seconds on a shared host, whose speed swings within seconds); the wall-clock
step ceiling is printed beside it.

    python tests/bench/population_ceiling.py [--k 1,4,8,16] [--algos ppo,grpo,dvpo,flowrl,dfpo] [--steps 5] [--rounds 2]
                                             [--set KEY=VALUE ...]   (e.g. train.device=cuda on a GPU)

Not part of the test suite: it prints figures (14 minutes at --steps 6 on the 2-core host; on a GPU the
wall-clock column is the one to read).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harness.bench import load_average, pool_rounds, run_worker  # noqa: E402
from harness.config import parse_assignments  # noqa: E402

ROBUSTNESS_ALGOS = "ppo,grpo,dvpo,flowrl,dfpo"  # harness/presets/robustness.yaml
BASE_PROMPTS = 32  # the default arith cell's train.prompts_per_step
CELL_STEPS = 200
# What a cell of a grid costs besides its steps (worker start from the forkserver, setup, 5 greedy
# evaluations, status and metrics), which a population would pay once for K members: measured 1.3-1.7 s
# (`harness run --algos grpo,ppo --noise none --seeds 0,1 --workers 1`, a cell's end minus the sum of its
# steps' time/step; the cached warm start loaded, not built).
GRID_SETUP_S = 1.5


def ceiling(step_1: float, step_k: float, k: int, setup: float, steps: int = CELL_STEPS) -> tuple[float, float]:
    """(step ceiling, cell ceiling) for K members: K single steps against one step on K times the rows;
    K cells (setup + steps x step_1 each) against one setup and `steps` steps on K times the rows."""
    step = k * step_1 / step_k
    cell = k * (setup + steps * step_1) / (setup + steps * step_k)
    return step, cell


def mix_ceiling(steps_1: list[float], steps_k: list[float], k: int, setup: float, steps: int = CELL_STEPS) -> float:
    """The cell ceiling of a grid with as many cells of each algorithm (a preset): its K-cell time
    apart over its time in populations, each algorithm's population paying `setup` once."""
    apart = sum(k * (setup + steps * t1) for t1 in steps_1)
    together = sum(setup + steps * tk for tk in steps_k)
    return apart / together


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise SystemExit(f"--k: a comma list of member counts such as 1,4,8,16, got {text!r}")
    if not ks or ks[0] < 1:
        raise SystemExit(f"--k: member counts must be >= 1, got {text!r}")
    return sorted({1, *ks})  # K = 1 is the reference every ratio divides by


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", default="1,4,8,16", help="member counts (1 is always measured)")
    parser.add_argument("--algos", default=ROBUSTNESS_ALGOS)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per configuration (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds over the member counts, ascending then descending, pooled (drift reaches all alike)")
    parser.add_argument("--setup", type=float, default=GRID_SETUP_S,
                        help="fixed seconds of a cell in a grid that a population would pay once (default: measured)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for every configuration, as for run (e.g. train.device=cuda)")
    parser.add_argument("--cache-dir", default=None, help="warm-start cache (default: $HARNESS_CACHE or ~/.cache/harness)")
    args = parser.parse_args()
    setup = args.setup
    sets = parse_assignments(args.set)
    if "train.prompts_per_step" in sets:
        raise SystemExit("--set train.prompts_per_step: the script sets it (32 K); leave it out")
    ks = parse_ks(args.k)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    print(f"population ceiling: default arith cell, {BASE_PROMPTS} K prompts a step in one model; "
          f"median of {args.steps} steps after {args.warmup} in each of {args.rounds} round(s); {load_average()}")
    print(f"{'algo':7s} {'K':>3s} {'CPU ms':>9s} {'per member':>10s} {'wall ms':>9s} {'step ceiling':>13s} "
          f"{'(wall)':>12s} {'cell ceiling':>13s}")
    cells = {k: [] for k in ks}
    step_cpu = {k: [] for k in ks}
    for algo in algos:
        runs = {k: [] for k in ks}
        for round_ in range(args.rounds):
            for k in ks if round_ % 2 == 0 else ks[::-1]:
                runs[k].append(run_worker({
                    "library": "harness", "algo": algo, "steps": args.steps, "warmup": args.warmup,
                    "overrides": {**sets, "train.prompts_per_step": str(BASE_PROMPTS * k)}, "cache_dir": args.cache_dir,
                    "model": None}))
        pooled = {k: pool_rounds(runs[k]) for k in ks}
        base = pooled[1]
        for k in ks:
            r = pooled[k]
            step, cell = ceiling(base["cpu_s"], r["cpu_s"], k, setup)
            wall_step, _ = ceiling(base["step_s"], r["step_s"], k, setup)
            cells[k].append(cell)
            step_cpu[k].append(r["cpu_s"])
            print(f"{algo:7s} {k:3d} {r['cpu_s'] * 1000:9.1f} {r['cpu_s'] * 1000 / k:10.1f} {r['step_s'] * 1000:9.1f} "
                  f"{step:12.2f}x {wall_step:11.2f}x {cell:12.2f}x", flush=True)
    for k in ks[1:]:
        print(f"K={k}: cell ceiling over {', '.join(algos)}: median {statistics.median(cells[k]):.2f}x, "
              f"range {min(cells[k]):.2f}-{max(cells[k]):.2f}x; as many cells of each (a preset's mix): "
              f"{mix_ceiling(step_cpu[1], step_cpu[k], k, setup):.2f}x (issue 31's target: 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
