"""Numeric precision of a cell: float32 master weights, low-precision compute, generation dtype.

The recipe (verl, torchtitan and NeMo-RL do the same):

- **Master weights.** Every trained module (the policy, the critic's backbone and head, extra heads)
  keeps float32 parameters, and AdamW's states follow them, whatever `model.dtype` says: an update of
  lr 1e-6 is far below half a bfloat16 step (2^-8 relative) and would round away. Only
  `train.master_dtype=model` (an explicit opt-in) trains in `model.dtype`.
- **Compute.** `train.mixed_precision=bf16` (old name `train.fsdp_mixed_precision`) runs the trained
  modules' forwards and backwards in bfloat16: FSDP2's `MixedPrecisionPolicy` (bf16 gathered
  parameters, float32 gradient reduction) when sharded, `torch.autocast` in one process. The heads
  (critic heads, FlowRL's log-partition head) always compute in float32: they cast their input.
- **Generation and frozen modules.** `model.dtype` is the dtype of what only generates or is frozen:
  the reference policy, the sharded cell's rollout replica, the vLLM engine; a one-process cell,
  whose policy itself samples, samples under autocast in `model.dtype`.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
from torch import nn

from harness.errors import HarnessError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIXED_PRECISION = ("off", "bf16")
MASTER_DTYPES = ("float32", "model")


def compute_precision(train) -> str:
    """`train.mixed_precision`, or its old name `train.fsdp_mixed_precision`: "bf16" if either says so."""
    return "bf16" if "bf16" in (train.mixed_precision, train.fsdp_mixed_precision) else "off"


def compute_dtype(train) -> torch.dtype | None:
    """The trained modules' compute dtype under mixed precision; None: their own (float32) dtype."""
    return torch.bfloat16 if compute_precision(train) == "bf16" else None


def master_dtype(cfg) -> str:
    """The dtype name the trained modules' parameters (and AdamW states) are kept in."""
    return cfg.model.dtype if cfg.train.master_dtype == "model" else "float32"


def generation_dtype(cfg) -> torch.dtype:
    """The dtype of the reference, the rollout replica, the vLLM engine: `model.dtype`."""
    return DTYPES[cfg.model.dtype]


def autocast(device: str, dtype: torch.dtype | None):
    """`torch.autocast` to `dtype` on `device`'s type; a no-op context for None or float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def autocast_fn(fn: Callable, device: str, dtype: torch.dtype | None) -> Callable:
    """`fn` run under `autocast(device, dtype)`; `fn` itself when that is a no-op."""
    if dtype is None or dtype == torch.float32:
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with autocast(device, dtype):
            return fn(*args, **kwargs)

    return run


def check_master(modules: dict[str, nn.Module | None], cfg) -> None:
    """Refuse to train a module whose parameters are not in the master dtype (a low-precision
    parameter without a float32 master silently drops small updates)."""
    if cfg.train.master_dtype == "model":
        return
    for name, module in modules.items():
        if module is None:
            continue
        found = {p.dtype for p in module.parameters() if p.requires_grad}
        if found - {torch.float32}:
            bad = ", ".join(sorted(str(d).removeprefix("torch.") for d in found - {torch.float32}))
            raise HarnessError(f"refusing to train the {name} in {bad}: trained modules keep float32 master weights "
                               f"(set train.master_dtype=model to train in model.dtype without them)")


def tf32(mode: str, device: str) -> bool:
    """Allow TF32 for float32 matmuls and convolutions on CUDA (`train.tf32`: auto = on for CUDA,
    on, off); returns whether it is on. A no-op on the CPU, where there is no TF32."""
    cuda = torch.device(device).type == "cuda"
    on = cuda and mode in ("on", "auto")
    if cuda:  # process-wide settings: only a CUDA cell's process changes them
        torch.set_float32_matmul_precision("high" if on else "highest")  # "high": TF32 matmuls
        torch.backends.cudnn.allow_tf32 = on
    return on
