"""torch.distributed primitives for a cell that runs as N ranks (`train.nproc`).

The ranks of a cell are started by torchrun (`harness.launch`) or by Ray Train's `TorchTrainer`;
either sets up the environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, ...) that `init` reads. What
this module gives the sharded trainer (`harness.sharded`):

- `World`: this process's rank and the world size; `rows(n)`, the contiguous share of n rows a rank
  computes;
- `gather_rows`: every rank's rows, concatenated in rank order, with gradients flowing back to the
  rank that computed them (`torch.distributed.nn.functional.all_gather`);
- `shard`: FSDP2 (`fully_shard`) per decoder layer and at the root, with the mixed-precision and
  CPU-offload policies of the configuration;
- `check_config`: the settings that do not work with more than one rank, refused before anything
  is written.
"""
from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from harness.errors import HarnessError

# Methods of a critic head or an extra head that the algorithms call directly instead of through
# `forward()` (the flow critic's velocity field): FSDP must gather the parameters around them too.
HEAD_FORWARD_METHODS = ("velocity",)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "World":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()

    def share(self, n: int, rank: int) -> slice:
        return slice(rank * n // self.size, (rank + 1) * n // self.size)

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of `n` rows (the shares differ by at most one row)."""
        return self.share(n, self.rank)


def init(device: str, timeout_s: int) -> World:
    """Join the process group the launcher described in the environment (a no-op when it is already
    up, as under Ray Train): gloo on the CPU, NCCL on GPUs, each rank on its local GPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":  # before the group: NCCL binds each rank to its own GPU (device_id) up front
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        extra = {"device_id": torch.device("cuda", local_rank)} if device == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **extra)
    return World.current()


def gather_rows(x: torch.Tensor, n: int, world: World) -> torch.Tensor:
    """`x` holds this rank's rows `world.rows(n)` of an n-row tensor: return all n rows on every rank.
    The shares may differ by one row, so each is padded to the largest before the all-gather. With
    gradients on, the backward sends each rank the gradient of its own rows (summed over ranks, whose
    losses are the same replicated loss; FSDP's reduce-scatter then averages over ranks)."""
    sizes = [len(range(n)[world.share(n, r)]) for r in range(world.size)]
    width = max(sizes)
    padded = torch.cat([x, x.new_zeros(width - len(x), *x.shape[1:])]) if len(x) < width else x
    if torch.is_grad_enabled() and x.requires_grad:
        import torch.distributed.nn.functional as dist_nn

        parts = list(dist_nn.all_gather(padded))
    else:
        parts = [torch.empty_like(padded) for _ in range(world.size)]
        dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


@functools.lru_cache(maxsize=1)
def device_mesh():
    """The one 1-D mesh of all ranks. Every sharded module must share it: DTensors of different mesh
    objects do not combine (a gradient norm over a critic's backbone and head came out 0)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu", (World.current().size,))


def shard(module: nn.Module, layers: list[nn.Module], mixed_precision: str = "off", offload: bool = False) -> None:
    """FSDP2 in place: each of `layers` (the decoder layers) its own unit, then `module` as the root
    (embeddings, final norm, tied output layer)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs = {"mesh": device_mesh()}
    if mixed_precision == "bf16":  # the shards stay float32 masters; compute and gathers in bf16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in layers:
        fully_shard(layer, **kwargs)
    # The root resharded after forward too (FSDP keeps a root gathered by default): between a forward
    # and its backward the module's parameters would otherwise be the gathered tensors, and a
    # parameter list taken then (the trainer lists the critic's for its optimiser step) would miss
    # the gradients, which land on the sharded parameters.
    fully_shard(module, reshard_after_forward=True, **kwargs)
    for name in HEAD_FORWARD_METHODS:
        if callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def check_gpus(device: str, nproc: int) -> None:
    """A cell on CUDA runs one rank per GPU: refuse more ranks per node than visible GPUs."""
    if device == "cpu" or not torch.cuda.is_available():
        return
    visible = torch.cuda.device_count()
    if nproc > visible:
        raise HarnessError(f"train.nproc={nproc} ranks per node on CUDA need {nproc} GPUs, but {visible} "
                           f"{'is' if visible == 1 else 'are'} visible (CUDA_VISIBLE_DEVICES); use train.nproc <= {visible}")


def check_config(cfg) -> None:
    """Refuse, with the reason, the settings a cell of more than one rank does not support."""
    t = cfg.train
    if t.critic_backbone == "shared":
        raise HarnessError("train.nproc > 1 needs train.critic_backbone=separate (a critic head on the sharded "
                           "policy's backbone would split the policy's root FSDP unit)")
    if t.rollout == "vllm":
        raise HarnessError("train.nproc > 1 supports train.rollout=hf only for now (vLLM with sharded weights is "
                           "not implemented); use train.nproc=1 with vllm")
    if t.fast_model == "on":
        raise HarnessError("train.fast_model=on is not supported with train.nproc > 1: the fast Llama path bypasses "
                           "forward(), so FSDP never gathers the sharded weights (the rollout replica uses it under "
                           "auto); use auto or off")
    if t.fsdp_mixed_precision not in ("off", "bf16"):
        raise HarnessError(f"train.fsdp_mixed_precision must be off or bf16, got {t.fsdp_mixed_precision!r}")
    check_gpus(t.device, t.nproc)
    rows = t.prompts_per_step * t.group_size // t.num_minibatches
    if rows < t.world_size:
        raise HarnessError(f"{t.world_size} ranks (train.nproc x train.nnodes) need at least one row each in every minibatch, but a "
                           f"minibatch has {rows} (prompts_per_step x group_size / num_minibatches)")
    from noise import parse_noise

    if parse_noise(cfg.noise).needs_labels():
        raise HarnessError(f"noise {cfg.noise!r} (pseudo-labels from the initial policy) is not supported with "
                           f"train.nproc > 1 yet; use train.nproc=1")
