"""The checks of the GPU acceptance run (`tests/gpu/acceptance.sh`), also run on the CPU (`--cpu`, gloo)
and by the tests (`tests/test_precision.py`). Tiny model, arith suite, no data download. Each check
prints one `RESULT {json}` line (rank 0) and exits non-zero when it fails.

    python -m tests.gpu.check precision --device D --algos ppo,grpo [--mp bf16] [--dtype bfloat16] [--steps 3]
        trains each algorithm `--steps` steps at lr 1e-6 and reports the fraction of the policy's and
        the critic's elements that changed, the parameter and AdamW-state dtypes; under torchrun the
        cell is sharded (FSDP2, any number of ranks, one included). --min-changed F fails the check
        below that fraction or with a non-float32 master.
    python -m tests.gpu.check environment --device D
        versions, the GPU, the optional packages missing here.
    python -m tests.gpu.check resume --device D --algo grpo
        trains 4 steps with a checkpoint every 2 in a child process that SIGKILLs itself at step 3,
        resumes in another, and compares the metrics with an uninterrupted run.

Environment: HARNESS_CACHE (the warm-start cache), CHECK_OUT (a work folder; default a temporary one).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# A small, fast cell: short warm start, 8 rows a step, random rewards (flip0.3) so every algorithm
# has gradients from the first step, the papers' actor learning rate.
SMALL = {"model.warmstart_steps": "30", "suite.n_eval": "16", "suite.n_train": "200", "train.prompts_per_step": "4",
         "train.group_size": "2", "train.eval_every": "1000", "train.lr": "1e-6", "train.critic_lr": "5e-6"}
NOISE = "flip0.3"


def build_config(algo: str, device: str, steps: int, out: Path, overrides: dict[str, str]):
    from harness.resolver import build_cells

    cell = build_cells("arith", [algo], NOISE, [0], out, steps=steps, eval_limit=16,
                       overrides={**SMALL, "train.device": device, **overrides})[0]
    return cell.cfg, cell.path


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_trainer(cfg, cell: Path, cache: str | None):
    """A `ShardedTrainer` under torchrun (FSDP2 even with one rank), else the one-process `Trainer`."""
    cell.mkdir(parents=True, exist_ok=True)
    if "RANK" in os.environ:
        from harness import distributed
        from harness.sharded import ShardedTrainer

        cfg.train.nproc = world_size()
        distributed.init(cfg.train.device, 600)
        return ShardedTrainer(cfg, cell, cache_dir=cache, progress=False)
    from harness.trainer import Trainer

    return Trainer(cfg, cell, cache_dir=cache, progress=False)


def full_state(trainer, module) -> dict[str, torch.Tensor]:
    """The module's full (unsharded) parameters, as float32 CPU copies (a collective when sharded)."""
    if hasattr(trainer, "world"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    else:
        state = module.state_dict()
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def changed(before: dict, after: dict, skip: tuple[str, ...] = ()) -> float:
    """Fraction of the elements (of the tensors whose names contain none of `skip`) that changed."""
    keys = [k for k in before if not any(s in k for s in skip)]
    total = sum(before[k].numel() for k in keys)
    return sum(int((before[k] != after[k]).sum()) for k in keys) / total


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def dtypes(params, opt) -> dict[str, list[str]]:
    """The dtypes of the (local shards of the) trained parameters and of AdamW's moment states."""
    out = {"param": sorted({str(local(p).dtype).removeprefix("torch.") for p in params})}
    for key in ("exp_avg", "exp_avg_sq"):
        out[key] = sorted({str(local(s[key]).dtype).removeprefix("torch.") for s in opt.state.values() if key in s})
    return out


def measure(algo: str, device: str, steps: int, out: Path, overrides: dict[str, str], min_changed: float = 0.99) -> dict:
    """Train one algorithm's cell `steps` steps: the fraction of the policy's and critic's elements that
    changed, the dtypes of their parameters and AdamW states, the last step's metrics."""
    t0 = time.time()
    cfg, cell = build_config(algo, device, steps, out, overrides)
    trainer = make_trainer(cfg, cell, os.environ.get("HARNESS_CACHE"))
    policy0 = full_state(trainer, trainer.policy)
    critic0 = full_state(trainer, trainer.critic) if trainer.critic is not None else None
    metrics = [trainer.train_step(step) for step in range(1, steps + 1)]
    rec = {"check": "precision", "algo": algo, "device": device, "ranks": world_size(), "sharded": "RANK" in os.environ,
           "model_dtype": cfg.model.dtype, "overrides": overrides, "old_logp": cfg.train.old_logp,
           "policy_changed": changed(policy0, full_state(trainer, trainer.policy)),
           "policy_dtypes": dtypes(trainer.policy.parameters(), trainer.actor_opt),
           "final": {k: v for k, v in metrics[-1].items() if k.startswith(("reward/", "actor/", "critic/", "rollout/"))}}
    if critic0 is not None:
        # Token embeddings of tokens never seen get no gradient (the critic has no tied output
        # layer that touches every row): the fraction is over the other elements.
        rec["critic_changed"] = changed(critic0, full_state(trainer, trainer.critic), skip=("embed_tokens",))
        rec["critic_dtypes"] = dtypes(trainer.critic.parameters(), trainer.critic_opt or trainer.actor_opt)
    rec["seconds"] = round(time.time() - t0, 1)
    rec["ok"] = passes(rec, min_changed)
    return rec


def precision(args) -> list[dict]:
    """`measure` for each of `args.algos`."""
    overrides = {"model.dtype": args.dtype, "train.fsdp_mixed_precision": args.mp, **dict(kv.split("=", 1) for kv in args.set)}
    records = []
    for algo in args.algos.split(","):
        records.append(measure(algo, args.device, args.steps, Path(args.out) / f"precision-{world_size()}", overrides,
                               args.min_changed))
        emit(records[-1])
    return records


def passes(rec: dict, min_changed: float) -> bool:
    masters = [rec["policy_dtypes"], rec.get("critic_dtypes", rec["policy_dtypes"])]
    fp32 = all(d[k] == ["float32"] for d in masters for k in ("param", "exp_avg", "exp_avg_sq"))
    return fp32 and rec["policy_changed"] > min_changed and rec.get("critic_changed", 1.0) > min_changed


def resume(args) -> list[dict]:
    """Uninterrupted 4 steps (in this process) vs. a child process killed (SIGKILL at step 3) and
    another that resumes from its step-2 checkpoint."""
    out = Path(args.out) / f"resume-{args.algo}"
    base = [sys.executable, "-m", "tests.gpu.check", "train", "--device", args.device, "--algo", args.algo,
            "--steps", "4", "--dtype", args.dtype, "--mp", args.mp]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = lambda folder, *extra: subprocess.run([*base, "--out", str(out / folder), *extra], env=env, cwd=ROOT,  # noqa: E731
                                                capture_output=True, text=True)
    killed = run("killed", "--kill-at", "3")
    resumed = run("killed")
    train(argparse.Namespace(**{**vars(args), "out": str(out / "whole"), "steps": 4, "kill_at": 0}))  # uninterrupted, here
    rows = {name: metric_rows(out / name) for name in ("whole", "killed")}
    keys = ("reward/clean_mean", "actor/grad_norm", "actor/pg_loss", "actor/tb_loss")
    diff = max((abs(a[k] - b[k]) for a, b in zip(rows["whole"], rows["killed"]) for k in keys if k in a), default=0.0)
    rec = {"check": "resume", "algo": args.algo, "device": args.device, "killed_rc": killed.returncode,
           "resumed_rc": resumed.returncode, "steps": [r["step"] for r in rows["killed"]], "max_abs_diff": diff,
           "tolerance": args.tolerance}
    rec["ok"] = (killed.returncode == -signal.SIGKILL and resumed.returncode == 0 and rec["steps"] == [1, 2, 3, 4]
                 and len(rows["whole"]) == 4 and diff <= args.tolerance)
    if not rec["ok"]:
        rec["log"] = (killed.stderr + resumed.stderr)[-2000:]
    emit(rec)
    return [rec]


def metric_rows(out: Path) -> list[dict]:
    path = next(out.rglob("metrics.jsonl"), None)
    return [json.loads(line) for line in path.read_text().splitlines()] if path else []


def train(args) -> None:
    """A cell run to `--steps` with a checkpoint every 2 steps (resuming from its last one); with
    `--kill-at K` the process SIGKILLs itself when step K starts."""
    cfg, cell = build_config(args.algo, args.device, args.steps, Path(args.out),
                             {"model.dtype": args.dtype, "train.fsdp_mixed_precision": args.mp})
    trainer = make_trainer(cfg, cell, os.environ.get("HARNESS_CACHE"))
    if args.kill_at:
        step = trainer.train_step

        def train_step(k):
            if k == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(k)

        trainer.train_step = train_step
    trainer.run(ckpt_every=2)


def environment(args) -> list[dict]:
    """Versions, the device, and the optional packages this machine lacks (the harness runs the arith
    suite without vllm, math-verify or datasets)."""
    import importlib.util

    import transformers

    import algorithms  # noqa: F401 - the registries import cleanly
    import harness.cli  # noqa: F401
    import harness.sharded  # noqa: F401
    import tasks  # noqa: F401

    optional = ("vllm", "math_verify", "datasets", "accelerate", "pandas", "scipy", "matplotlib", "yaml", "tqdm")
    cuda = torch.cuda.is_available()
    rec = {"check": "environment", "device": args.device, "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name(0) if cuda else None,
           "gpus": torch.cuda.device_count() if cuda else 0, "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
           "nccl": torch.distributed.is_nccl_available(),
           "missing": [m for m in optional if importlib.util.find_spec(m) is None]}
    rec["ok"] = args.device == "cpu" or (cuda and rec["bf16"] and rec["nccl"])
    emit(rec)
    return [rec]


def emit(rec: dict) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(rec), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.gpu.check")
    parser.add_argument("mode", choices=("environment", "precision", "resume", "train"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--algos", default="ppo,grpo,dvpo,flowrl,dfpo")
    parser.add_argument("--algo", default="grpo")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", help="model.dtype")
    parser.add_argument("--mp", default="bf16", help="train.mixed_precision")
    parser.add_argument("--set", action="append", default=[], help="more KEY=VALUE overrides")
    parser.add_argument("--min-changed", type=float, default=0.99)
    parser.add_argument("--tolerance", type=float, default=0.0, help="resume: largest metric difference allowed")
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("CHECK_OUT") or tempfile.mkdtemp(prefix="harness-check"))
    args = parser.parse_args(argv)
    if args.mode == "train":
        train(args)
        return 0
    records = {"environment": environment, "precision": precision, "resume": resume}[args.mode](args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
