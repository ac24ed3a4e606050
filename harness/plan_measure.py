"""`harness plan --measure STEPS`: the planner's estimate against a real one-rank cell on this machine.

Each cell is built and trained for STEPS steps in a fresh process (so that one cell's peak does not
hide the next one's), in a temporary folder. Measured there:

- the exact bytes (numel x element size) of the real modules' parameters, gradients and AdamW
  states, and of the reference and critic, to compare with `harness.plan.module_bytes`;
- the peak resident memory of the process (`ru_maxrss`) less its resident memory just before the
  trainer was built: the trainer's share of the peak, allocator and library overheads included.
"""
from __future__ import annotations

import multiprocessing
import resource
import tempfile
from pathlib import Path
from typing import Any

import torch

from harness.plan import Plan

MiB = 1024 ** 2


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


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
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _measure(cfg, steps: int, cache_dir: str | None) -> dict[str, Any]:
    from harness.trainer import Trainer

    cfg.train.steps = steps
    with tempfile.TemporaryDirectory() as cell:
        before = rss_bytes()
        trainer = Trainer(cfg, Path(cell), cache_dir=Path(cache_dir) if cache_dir else None, progress=False)
        for step in range(1, steps + 1):
            trainer.train_step(step)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {"bytes": trainer_bytes(trainer), "peak_delta": peak - before, "peak": peak, "before": before}


def measure_cell(cfg, steps: int, cache_dir: str | None = None) -> dict[str, Any]:
    """Train `cfg` (one rank, on the CPU) for `steps` steps in a fresh process; its measurements."""
    if cfg.train.world_size != 1:
        from harness.errors import HarnessError

        raise HarnessError("harness plan --measure trains one rank in this process: use --nproc 1")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (cfg, steps, cache_dir))


def format_measurements(pairs: list[tuple[Plan, dict[str, Any]]]) -> str:
    lines = ["measured on this machine (one rank, CPU), MiB: component, estimate, measured"]
    for plan, measured in pairs:
        for name, real in measured["bytes"].items():
            lines.append(f"{plan.algo:8s} {name:22s} {plan.persistent.get(name, 0) / MiB:10.2f} {real / MiB:10.2f}")
        estimate = plan.peak
        lines.append(f"{plan.algo:8s} {'peak (trainer share)':22s} {estimate / MiB:10.2f} {measured['peak_delta'] / MiB:10.2f}"
                     f"   (process peak RSS {measured['peak'] / MiB:.0f} MiB, {measured['before'] / MiB:.0f} MiB before the trainer)")
    return "\n".join(lines)
