"""The trainer of a cell that runs as N ranks: `Trainer` with FSDP2-sharded modules.

Every rank runs the same step on the same data; only the heavy parts are divided:

- **Modules.** Rank 0 reads the policy's weights into host memory once (one full copy, its state
  dict) and sends the others the model with its parameters on the meta device (no storage). Policy,
  reference, critic backbone and replica are built from it on the meta device, sharded with
  `fully_shard` per decoder layer and at the root (`distributed.shard`), allocated (`to_empty`) and
  loaded from rank 0's state dict one tensor at a time (`set_model_state_dict` with
  `broadcast_from_rank0`), each rank keeping its shard; rank 0 then drops its copy. So before the
  optimisers are built each rank holds 1/N of every parameter, gradient and Adam state and no
  unsharded copy but the rollout replica. The heads are built whole (small) from the seed.
- **LoRA** (`model.lora_rank > 0`, harness.lora): the modules are built in host memory on every rank
  and sharded from there; the policy's frozen base and its adapters are sharded together; a LoRA
  critic (its own adapter on the policy's base) is not sharded again: its states run as a forward
  method of the policy's root unit (`lora_critic_states`). Checkpoints hold only what trains.
- **Forwards.** Each rank runs its contiguous share of a batch's rows through a sharded module;
  the outputs (log-probs, entropies, hidden states, critic states) are all-gathered with autograd.
  The algorithm's advantages and losses then run unchanged and identically on every rank, and
  FSDP reduces the gradients.
- **Rollout.** Each rank samples whole groups (consecutive rows of the same prompt) with a plain
  replica of the policy in model.dtype, refreshed from the sharded weights after each update (one tensor
  gathered at a time),
  so sampling needs no collective and ranks may stop at different lengths. A row's uniform draws
  are those of one process sampling the whole batch (`rollout.RowsOf`): sampling is keyed by
  (seed, step, prompt, sample), never by rank. The rollouts are then all-gathered, so grading,
  noise and dynamic sampling see the whole batch. The replica may use the fast Llama path; the
  sharded modules never do (it bypasses `forward()`, so FSDP would not gather their weights).
- **Files.** Rank 0 writes metrics.jsonl and eval.jsonl. Checkpoints are `torch.distributed.checkpoint`
  folders of every module and optimiser, written by all ranks into `ckpt/step<k>.tmp` and renamed
  by rank 0 after a barrier, with each rank's RNG states.
"""
from __future__ import annotations

import copy
import functools
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from harness import checkpoints, distributed, fast_llama, lora, precision, store
from harness.precision import DTYPES
from harness.rollout import Rollout, RowsOf, draws_ahead, generate, merge_rollouts
from harness.seeding import rng_state, set_rng_state
from harness.trainer import Trainer


def prompt_groups(prompts: list[list[int]]) -> list[int]:
    """Start rows of the runs of equal consecutive prompts (a group's G samples), then len(prompts)."""
    starts = [i for i in range(len(prompts)) if i == 0 or prompts[i] != prompts[i - 1]]
    return starts + [len(prompts)]


def group_share(prompts: list[list[int]], world: distributed.World) -> slice:
    """This rank's rows: whole groups, contiguous, each group to the rank its first row falls to."""
    n, bounds = len(prompts), prompt_groups(prompts)
    owner = [min(start * world.size // max(n, 1), world.size - 1) for start in bounds[:-1]]
    mine = [i for i, r in enumerate(owner) if r == world.rank]
    if not mine:
        return slice(0, 0)
    return slice(bounds[mine[0]], bounds[mine[-1] + 1])


def parameters_to_meta(model: nn.Module) -> None:
    """Replace every parameter of `model` by one of the same shape and dtype on the meta device (no
    storage), in place; a parameter shared by two modules (tied embeddings) stays shared. Buffers
    (the rotary frequencies, not in the state dict) keep their values."""
    meta: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                if id(param) not in meta:
                    meta[id(param)] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
                module._parameters[name] = meta[id(param)]


def meta_model(config, dtype: torch.dtype, buffers: dict[str, torch.Tensor], trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of `config` with its parameters in `dtype` on the meta device and its buffers set
    from `buffers` (rank 0's, by name: the rotary frequencies, which are in no state dict)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value
    return model


def allocate(module: nn.Module, device: str | torch.device) -> None:
    """Give `module`'s meta parameters (sharded or not) uninitialised storage on `device`
    (`to_empty`), keeping its buffers' values (`to_empty` would leave them uninitialised too)."""
    buffers = dict(module.named_buffers())
    module.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])


def load_from_rank0(module: nn.Module, state: dict[str, torch.Tensor] | None) -> None:
    """Fill the (allocated, sharded) `module` from rank 0's full state dict `state` (None on the other
    ranks): one tensor at a time rank 0 broadcasts it and every rank copies its shard, cast to the
    module's dtype (`set_model_state_dict` with `broadcast_from_rank0`)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(module, dict(state) if state is not None else {}, options=options)  # a copy: it is updated in place


def substate(state: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor] | None:
    """The entries of `state` under `prefix.`, without it (a submodule's state dict)."""
    if state is None:
        return None
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


def outside_inference_mode(fn):
    """`fn` run under no_grad instead of inference mode: FSDP gathers a module's parameters into
    buffers it reuses, and buffers made under inference mode cannot be written by a later training
    forward (the trainer's frozen critic pass comes before the critic's update)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return fn(*args, **kwargs)

    return run


class ShardedTrainer(Trainer):
    build_on_cpu = True  # rank 0 reads the weights into host memory (under LoRA every rank builds there): no unsharded copy on the device

    def __init__(self, cfg, cell: Path, cache_dir: Path | None = None, progress: bool = True):
        self.world = distributed.World.current()
        self.full_state = None  # rank 0, until the sharded modules are loaded: the policy's weights
        super().__init__(cfg, cell, cache_dir, progress and self.world.main)
        self.rollout = self.sharded_rollout

    # ---- building (called by Trainer.__init__) -----------------------------------------------

    def build_policy(self, cache_dir: Path | None, progress: bool, dtype: str):
        """Rank 0 loads the policy into host memory, keeps its state dict (the one full copy, until
        `load_weights`) and moves its parameters to the meta device; every other rank receives that
        meta model and the tokenizer from rank 0 and reads no weights. Under LoRA every rank loads it."""
        if self.cfg.model.lora_rank > 0:
            return super().build_policy(cache_dir, progress, dtype)
        sent = [None, None, None]
        if self.world.main:
            model, tokenizer = super().build_policy(cache_dir, progress, dtype)
            self.full_state = model.state_dict()
            parameters_to_meta(model)
            sent = [model.config, tokenizer, dict(model.named_buffers())]
        dist.broadcast_object_list(sent, src=0)
        if self.world.main:
            return model, tokenizer
        config, tokenizer, buffers = sent
        return meta_model(config, DTYPES[dtype], buffers, self.cfg.model.trust_remote_code), tokenizer

    def load_weights(self) -> None:
        """Allocate the sharded policy, reference and critic backbone (built on the meta device) and
        load rank 0's weights into them; rank 0 then frees its full copy."""
        t, state = self.cfg.train, self.full_state
        allocate(self.policy, self.device)
        load_from_rank0(self.policy, state)
        if self.reference is not None:
            allocate(self.reference, "cpu" if t.reference_offload else self.device)
            load_from_rank0(self.reference, state)
        if self.critic is not None:
            decoder = fast_llama.decoder_of(self.policy)
            prefix = next(name for name, module in self.policy.named_modules() if module is decoder)
            allocate(self.critic.backbone, self.device)
            load_from_rank0(self.critic.backbone, substate(state, prefix))
        self.full_state = None

    # ---- sharding (called by Trainer.__init__ before the optimisers) -------------------------

    def distribute(self) -> None:
        t = self.cfg.train
        # The rollout replica: a plain copy of the policy in the generation dtype, model.dtype (keeping the
        # fast path where it is on); refreshed from the float32 masters, cast tensor by tensor.
        on_meta = next(self.policy.parameters()).is_meta  # built on the meta device (`build_policy`)
        self.replica = copy.deepcopy(self.policy).to(precision.generation_dtype(self.cfg))
        if on_meta:  # filled by the first refresh
            allocate(self.replica, self.device)
            self.replica.tie_weights()  # allocation gives tied tensors storage of their own
        else:
            self.replica.to(self.device)
        self.replica.requires_grad_(False).eval()
        fast_llama.enable(self.replica, t.fast_model)  # auto decides on the replica's own device
        self.replica_stale = on_meta
        modules = [self.policy, self.reference, self.critic.backbone if self.critic is not None else None]
        for module in modules:
            if module is not None:
                fast_llama.enable(module, "off")
        decoder = fast_llama.decoder_of
        # Backbones compute in the mixed precision (FSDP2 casts the gathered float32 shards); the heads
        # stay float32 in compute too: they cast their (bf16) inputs to float32 (harness.precision).
        mp = precision.compute_precision(t)
        distributed.shard(self.policy, list(decoder(self.policy).layers), mp)
        if self.reference is not None:
            distributed.shard(self.reference, list(decoder(self.reference).layers), mp, offload=t.reference_offload)
        if self.critic is not None:
            if isinstance(self.critic, lora.LoraCritic):
                states = self.lora_critic_states()
            else:
                distributed.shard(self.critic.backbone, list(self.critic.backbone.layers), mp)
                states = self.critic.states  # each rank its rows; the states of all rows on every rank
            distributed.shard(self.critic.head, [], "off")

            def sharded_states(input_ids, attention_mask, prompt_len):
                rows = self.world.rows(len(input_ids))
                return distributed.gather_rows(states(input_ids[rows], attention_mask[rows], prompt_len),
                                               len(input_ids), self.world)

            self.critic.states = sharded_states
            self.critic.forward = outside_inference_mode(self.critic.forward)
        for head in self.heads.values():
            distributed.shard(head, [], "off")
        if on_meta:
            self.load_weights()

    def lora_critic_states(self):
        """A LoRA critic's states (its adapter on the policy's base, `harness.lora.LoraCritic`) as a forward
        method of the sharded policy: its backbone is the policy's decoder, whose embeddings and final norm
        are in the policy's root unit, which FSDP gathers only around the root's forward methods."""
        from torch.distributed.fsdp import register_fsdp_forward_method

        critic = self.critic
        self.policy.lora_critic_states = functools.partial(lora.LoraCritic.states, critic)
        register_fsdp_forward_method(self.policy, "lora_critic_states")
        return self.policy.lora_critic_states

    def response_forward(self, model, input_ids, attention_mask, prompt_len: int, **kwargs):
        rows, n = self.world.rows(len(input_ids)), len(input_ids)
        # The trainer runs the reference under inference mode; FSDP's gather buffers made there break the
        # next gather (with one rank: "Inference tensors do not track version counter"), so no_grad instead.
        forward = outside_inference_mode(super().response_forward)
        logp, entropy, hidden = forward(model, input_ids[rows], attention_mask[rows], prompt_len, **kwargs)
        gather = lambda x: distributed.gather_rows(x, n, self.world)  # noqa: E731
        return gather(logp), gather(entropy), gather(hidden) if hidden is not None else None

    def update(self, *args, **kwargs) -> dict[str, float]:
        metrics = super().update(*args, **kwargs)
        self.replica_stale = True
        return metrics

    # ---- rollout -----------------------------------------------------------------------------

    @torch.no_grad()
    def refresh_replica(self) -> None:
        """Copy the sharded policy's current weights into the replica (a collective: every rank), one
        tensor at a time: each float32 master is gathered, cast into the replica's (model.dtype) tensor
        and freed, so the refresh needs one full tensor on the device, not a full state dict."""
        if self.replica_stale:
            target = self.replica.state_dict()
            for name, value in self.policy.state_dict().items():
                full = value.full_tensor() if hasattr(value, "full_tensor") else value
                target[name].copy_(full)
                del full
            self.replica_stale = False

    def sharded_rollout(self, prompts: list[list[int]], *, generator=None, temperature: float = 1.0,
                        **kwargs) -> Rollout:
        """Sample this rank's whole groups with the replica, then all-gather every rank's rollout."""
        self.refresh_replica()
        rows = group_share(prompts, self.world)
        draws = RowsOf(generator, len(prompts), rows)
        mine = None
        if rows.stop > rows.start:
            mine = generate(self.replica, prompts[rows], generator=draws, temperature=temperature, **kwargs)
            mine = Rollout(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in vars(mine).items()})
        parts: list[Rollout | None] = [None] * self.world.size
        dist.all_gather_object(parts, mine)
        parts = [p for p in parts if p is not None]
        roll = merge_rollouts([(p, torch.arange(len(p.input_ids))) for p in parts], kwargs["pad_id"])
        if temperature != 0:  # later calls with this generator continue where one process would
            drawn = kwargs["max_new_tokens"] if draws_ahead(torch.device(self.device)) else roll.responses.shape[1]
            draws.skip(drawn - draws.draws)
        return Rollout(**{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in vars(roll).items()})

    # ---- files and checkpoints ---------------------------------------------------------------

    def write_rows(self, path: Path, rows: list[dict[str, Any]]) -> None:
        if self.world.main:
            super().write_rows(path, rows)

    def stateful(self) -> dict[str, tuple[nn.Module, torch.optim.Optimizer | None]]:
        """The trained modules of the cell, each with its optimiser, as DCP state-dict pairs."""
        out = {"actor": (nn.ModuleDict({"policy": self.policy, "heads": self.heads}), self.actor_opt)}
        if self.critic is not None:
            out["critic"] = (self.critic, self.critic_opt)
        return out

    def dcp_options(self) -> StateDictOptions:
        """Under LoRA a checkpoint holds only what trains (adapters and heads; the frozen base is rebuilt
        from the model), so loading leaves the frozen entries as they are."""
        return StateDictOptions(ignore_frozen_params=self.lora, strict=not self.lora)

    def dcp_state(self) -> dict[str, Any]:
        state = {}
        for name, (module, opt) in self.stateful().items():
            model_sd, optim_sd = get_state_dict(module, opt, options=self.dcp_options())
            state[name] = {"model": model_sd, "optim": optim_sd}
        return state

    def save_checkpoint(self, step: int, summary: dict[str, float]) -> None:
        """Every rank writes its shards into `ckpt/step<k>.tmp` (DCP) and its RNG states; after a
        barrier rank 0 adds the step's record (`state.pt`) and renames the folder into place."""
        final = checkpoints.checkpoint_dir(self.cell, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.world.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        distributed.barrier(self.world)
        dcp.save(self.dcp_state(), checkpoint_id=str(tmp / "dcp"))
        checkpoints.save_tensors(rng_state(), tmp / f"rng_rank{self.world.rank}.pt")
        distributed.barrier(self.world)
        if self.world.main:
            record = {"step": step, "summary": summary, "config": self.cfg.to_dict(), "world_size": self.world.size,
                      "files": {name: store.file_size(self.cell / name) for name in ("metrics.jsonl", "eval.jsonl")}}
            for name, obj in (("algo", self.algo), ("noise", self.noise)):
                if hasattr(obj, "state_dict"):
                    record[name] = obj.state_dict()
            checkpoints.save_tensors(record, tmp / checkpoints.STATE_FILE)
            store.atomic_write_json(tmp / checkpoints.MANIFEST_FILE, checkpoints.checkpoint_manifest(self.cell, tmp, step))
            for path in tmp.rglob("*"):
                if path.is_file():
                    with open(path, "rb") as fh:
                        os.fsync(fh.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            store.fsync_dir(final.parent)
            checkpoints.prune_checkpoints(self.cell, keep=final)
        distributed.barrier(self.world)

    def restore_latest(self) -> int:
        found = checkpoints.usable_checkpoint(self.cell)
        if found is None:
            return 0
        step, path = found
        record = torch.load(path / checkpoints.STATE_FILE, map_location="cpu", weights_only=True)
        if record["world_size"] != self.world.size:
            raise RuntimeError(f"checkpoint {path} was written by {record['world_size']} ranks, this cell has "
                               f"{self.world.size}")
        state = self.dcp_state()
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        for name, (module, opt) in self.stateful().items():
            set_state_dict(module, opt, model_state_dict=state[name]["model"], optim_state_dict=state[name]["optim"],
                           options=self.dcp_options())
        for name, obj in (("algo", self.algo), ("noise", self.noise)):
            if name in record:
                obj.load_state_dict(record[name])
        set_rng_state(torch.load(path / f"rng_rank{self.world.rank}.pt", map_location="cpu", weights_only=True))
        distributed.barrier(self.world)  # every rank has read the checkpoint before rank 0 cuts the files
        if self.world.main:
            for name, size in record["files"].items():
                store.truncate(self.cell / name, size)
        self.resumed_summary = record["summary"]
        self.replica_stale = True
        self.step = step
        return step
