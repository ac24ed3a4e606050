"""`harness plan --measure STEPS`: the planner's estimate against a real cell on this machine's CPU.

Each cell is built and trained for STEPS steps in a fresh process (so that one cell's peak does not
hide the next one's), in a temporary folder; a cell of N > 1 ranks (`--nproc N`) as N fresh
processes joined by gloo, each training a `ShardedTrainer`, after its warm start is built in another
process. Measured there, per rank:

- the exact bytes (numel x element size) of the real modules' parameters, gradients and AdamW
  states, and of the reference and critic, to compare with `harness.plan.module_bytes`;
- the peak resident memory of the process (`ru_maxrss`) less its resident memory just before the
  trainer was built: the trainer's share of the peak, allocator and library overheads included
  (and, for N > 1, the same at the end of start-up).

The processes run with glibc's mmap threshold fixed at 64 KiB (`MALLOC_MMAP_THRESHOLD_`): every
tensor of that size or more is its own mapping, returned to the system when freed, as a device's
caching allocator reuses freed blocks. glibc's default raises the threshold after a large free, so
later tensors come from a heap that never shrinks and the high-water mark counted every freed
tensor again (a 2-rank cell of a 13M-parameter model measured 2.1x its plan, 1.17x with it fixed).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import resource
import tempfile
from pathlib import Path
from typing import Any

import torch

from harness.plan import Plan

MiB = 1024 ** 2
MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) parameter or state, else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


def tensor_bytes(tensors) -> int:
    return sum(local(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimiser_bytes(opt) -> int:
    return sum(tensor_bytes(state.values()) for state in opt.state.values()) if opt is not None else 0


def trainer_bytes(trainer) -> dict[str, int]:
    """The exact bytes of a trainer's modules and optimiser states, by the planner's names."""
    actor = trainer.actor_params
    held = actor
    if getattr(trainer, "lora", False):  # the frozen base too, but not the critic's adapter (counted as the critic's)
        from harness.lora import CRITIC_ADAPTER, adapter_parameters

        critic_adapter = {id(p) for p in adapter_parameters(trainer.policy, CRITIC_ADAPTER)}
        ids = {id(p) for p in actor}
        held = actor + [p for p in trainer.policy.parameters() if id(p) not in ids and id(p) not in critic_adapter]
    out = {"parameters": tensor_bytes(held), "gradients": tensor_bytes(p.grad for p in actor),
           "optimiser (Adam)": optimiser_bytes(trainer.actor_opt)}
    if trainer.reference is not None:
        out["reference"] = tensor_bytes(trainer.reference.parameters())
    if trainer.critic_opt is not None:
        critic = list(trainer.critic.parameters())
        trained = critic
        if getattr(trainer, "lora", False):  # a LoRA critic's own: its adapter, head (and a copied base)
            trained = trainer.critic_params
            policy = {id(p) for p in trainer.policy.parameters()}
            critic = trained + [p for p in critic if id(p) not in policy and id(p) not in {id(q) for q in trained}]
        out.update({"critic": tensor_bytes(critic), "critic gradients": tensor_bytes(p.grad for p in trained),
                    "critic optimiser": optimiser_bytes(trainer.critic_opt)})
    if hasattr(trainer, "replica"):  # a sharded cell's unsharded rollout replica
        out["rollout replica"] = tensor_bytes({id(p): p for p in trainer.replica.parameters()}.values())
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _measure(cfg, steps: int, cache_dir: str | None) -> dict[str, Any]:
    from harness.trainer import Trainer

    cfg.train.steps = steps
    if cfg.model.lora_rank > 0:  # the library's code is not the trainer's memory: loaded before the baseline
        import peft  # noqa: F401
    with tempfile.TemporaryDirectory() as cell:
        before = rss_bytes()
        trainer = Trainer(cfg, Path(cell), cache_dir=Path(cache_dir) if cache_dir else None, progress=False)
        for step in range(1, steps + 1):
            trainer.train_step(step)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {"bytes": trainer_bytes(trainer), "peak_delta": peak - before, "peak": peak, "before": before}


def _prepare(cfg, cache_dir: str | None) -> None:
    """Build (or find) the cell's warm start, so that no rank's peak includes its training."""
    from harness.models import load_policy
    from tasks import SUITES

    suite_cls = SUITES.get(cfg.suite)
    load_policy(cfg.model, suite_cls(cfg.suite_options, cfg.seed), cfg.seed,
                Path(cache_dir) if cache_dir else None, "cpu", progress=False)


def _measure_rank(rank: int, size: int, port: int, cfg, steps: int, cache_dir: str | None, cell: str, results) -> None:
    """One rank of a sharded cell (gloo, CPU): build, train `steps` steps, put its measurements."""
    from harness import distributed

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    distributed.init("cpu", cfg.train.dist_timeout)
    from harness.sharded import ShardedTrainer

    before = rss_bytes()
    trainer = ShardedTrainer(cfg, Path(cell), cache_dir=Path(cache_dir) if cache_dir else None, progress=False)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for step in range(1, steps + 1):
        trainer.train_step(step)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results.put({"rank": rank, "bytes": trainer_bytes(trainer), "peak_delta": peak - before, "peak": peak,
                 "before": before, "startup_delta": built - before})
    distributed.barrier(distributed.World.current())
    torch.distributed.destroy_process_group()


def measure_sharded(cfg, steps: int, cache_dir: str | None = None) -> dict[str, Any]:
    """Train `cfg` as `train.nproc` ranks on the CPU for `steps` steps; every rank's measurements."""
    import socket

    from harness.errors import HarnessError

    if cfg.train.nnodes != 1 or cfg.train.device == "cuda":
        raise HarnessError("harness plan --measure runs a cell's ranks on this machine's CPU: use --nnodes 1 and "
                           "train.device=cpu")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        pool.apply(_prepare, (cfg, cache_dir))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg.train.steps = steps
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as cell:
        procs = [ctx.Process(target=_measure_rank, args=(r, cfg.train.nproc, port, cfg, steps, cache_dir, cell, results))
                 for r in range(cfg.train.nproc)]
        for proc in procs:
            proc.start()
        ranks = []
        while len(ranks) < len(procs):
            try:
                ranks.append(results.get(timeout=1))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    for proc in procs:
                        proc.kill()
                    raise HarnessError(f"harness plan --measure: a rank failed (exit codes {[p.exitcode for p in procs]})")
        for proc in procs:
            proc.join()
    return {"ranks": sorted(ranks, key=lambda r: r["rank"])}


@contextlib.contextmanager
def returning_allocator():
    """Processes started inside inherit a fixed 64 KiB mmap threshold (module docstring)."""
    old = os.environ.get(MMAP_THRESHOLD)
    os.environ[MMAP_THRESHOLD] = str(64 * 1024)
    try:
        yield
    finally:
        if old is None:
            del os.environ[MMAP_THRESHOLD]
        else:
            os.environ[MMAP_THRESHOLD] = old


def measure_cell(cfg, steps: int, cache_dir: str | None = None) -> dict[str, Any]:
    """Train `cfg` on the CPU for `steps` steps in fresh processes (one, or one per rank); its measurements."""
    with returning_allocator():
        if cfg.train.world_size != 1:
            return measure_sharded(cfg, steps, cache_dir)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(_measure, (cfg, steps, cache_dir))


def expected_peak(plan: Plan, rank: int) -> int:
    """The planner's peak for `rank` on the CPU, where the device is host memory: rank 0 also holds the
    weights it reads at start-up (`Plan.host_weights`) beside its start-up's allocations."""
    if rank != 0 or not plan.host_weights:
        return plan.peak
    running = sum(plan.persistent.values()) + max(sum(plan.update.values()), sum(plan.rollout.values()))
    return max(running, sum(plan.startup.values()) + plan.host_weights) + plan.vllm_bytes


def format_measurements(pairs: list[tuple[Plan, dict[str, Any]]]) -> str:
    lines = ["measured on this machine (CPU), MiB: component, estimate, measured, measured / estimate"]
    for plan, measured in pairs:
        for one in measured.get("ranks", [measured]):
            who = f"{plan.algo} r{one['rank']}" if "rank" in one else plan.algo
            for name, real in one["bytes"].items():
                estimate = plan.persistent.get(name, 0)
                lines.append(f"{who:10s} {name:22s} {estimate / MiB:10.2f} {real / MiB:10.2f}{ratio(real, estimate)}")
            estimate = expected_peak(plan, one.get("rank", 0))
            lines.append(f"{who:10s} {'peak (trainer share)':22s} {estimate / MiB:10.2f} {one['peak_delta'] / MiB:10.2f}"
                         f"{ratio(one['peak_delta'], estimate)}   (process peak RSS {one['peak'] / MiB:.0f} MiB, "
                         f"{one['before'] / MiB:.0f} MiB before the trainer)")
            if "startup_delta" in one:
                estimate = sum(plan.startup.values()) + (plan.host_weights if one["rank"] == 0 else 0)
                lines.append(f"{who:10s} {'start-up peak':22s} {estimate / MiB:10.2f} {one['startup_delta'] / MiB:10.2f}"
                             f"{ratio(one['startup_delta'], estimate)}")
    return "\n".join(lines)


def ratio(measured: int, estimate: int) -> str:
    return f" {measured / estimate:8.3f}" if estimate else f" {'':8s}"
