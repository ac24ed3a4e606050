"""Memory per device of a cell before it is launched (`harness plan`): what the trainer holds, from
the model's shape alone, without its weights.

The model is built on PyTorch's `meta` device from its transformers config (a local folder's
config.json, the Hugging Face cache, or `KNOWN_MODELS` offline), so every parameter count is the
real module's, and the algorithm's critic head and extra heads are the algorithm's own modules.
What the trainer does with them (harness.trainer, harness.sharded, harness.distributed), and so
what is counted here:

- **Parameters** of the trained modules (policy, critic backbone and head, extra heads) are float32
  masters (`harness.precision`; `model.dtype` with `train.master_dtype=model`); the frozen reference
  and the rollout replica are in `model.dtype`. Mixed precision (`train.mixed_precision=bf16`) casts
  only the gathered copies (FSDP2) or the operands (autocast) used in forward and backward.
- **Gradients** have the sharded parameter's dtype (FSDP2 reduces in float32 and casts back).
- **Optimiser**: fused AdamW, `exp_avg` and `exp_avg_sq` like the parameter, plus a float32 `step`
  scalar per parameter tensor.
- **Sharding** (N = `train.nproc` > 1): `fully_shard` splits every parameter on dim 0 into N chunks
  of ceil(dim0 / N) rows (the largest rank's share is counted), for the policy, the reference, the
  critic (backbone and head) and the extra heads. With `train.reference_offload` the reference's
  shards sit on the CPU. With N > 1 every rank also keeps an unsharded **rollout replica** of the
  policy in `model.dtype`, refreshed after each update one tensor at a time: the largest float32
  master tensor gathered for a moment (**replica refresh**). FSDP gathers one decoder layer at a
  time, prefetching the next, and the root (embeddings, final norm, output layer) for the whole
  forward: **FSDP buffers** = root + 2 largest layers in the compute dtype, + one layer's unsharded
  gradient in the reduce dtype.
- **Activations** of the update's forward with gradients on one minibatch: r rows per rank
  (r = ceil(prompts_per_step * group_size / num_minibatches / N)), S = prompt_len + max_new_tokens
  tokens each, compute dtype of b bytes (2 under bf16 mixed precision, else the masters').
  Per token and decoder layer (Llama/Qwen block, SDPA attention that keeps no S x S scores, SwiGLU):

      act_layer = b * (4 h + 3 q + 3 kv + 4 I) + 8 h

  (h hidden size, q = heads * head_dim, kv = kv_heads * head_dim, I the MLP width: the two norms'
  inputs and outputs, q, k, v, rotated q and k, the attention output, gate, up, SiLU(gate) and the
  product; 8 h for the float32 copies the two RMSNorms keep). The output layer's logits over the
  T = max_new_tokens + 1 scored positions: r * T * V * (b + 4 + 4) (logits, float32 log-softmax,
  its exp for the entropy). Then

      without checkpointing:  r * S * L * act_layer + logits
      with checkpointing:     r * S * L * b * h  (each layer's input)  + r * S * act_layer  + logits

  A separate critic's update runs after the actor's, so the larger of the two counts (its backbone
  without the logits, plus its head on the response tokens; the flow head: M samples x width x
  (4 layers + 2) float32 values per token, twice for the loss's two passes).
- **Rollout**: the KV cache of the rows a rank samples, rows * S * 2 * L * kv * b, for the training
  batch (prompts_per_step * group_size / N rows) and for an evaluation batch (eval.batch_size / N
  rows of prompt_len + eval.max_new_tokens); with `train.rollout=vllm` (one rank only) vLLM takes
  `GPU_MEMORY_UTILIZATION` of the device instead and the trainer the rest.

- **Start-up** (N > 1, harness.sharded): rank 0 reads the policy once into host memory (its state
  dict in the masters' dtype: a note gives the bytes, `Plan.host_weights`; on a CPU cell, where the
  device is host memory, rank 0 holds it beside its start-up); every module is built on the meta device, sharded, allocated
  (its shards and the replica) and filled from rank 0 one tensor at a time, so the device holds the
  shards, the replica and one full tensor in the masters' dtype (the largest) being broadcast.
  Under LoRA every rank still builds its modules whole in host memory. With N = 1 the modules are
  built on the device: the persistent part.

- **LoRA** (`model.lora_rank` = r > 0, harness.lora): the base is held once, frozen, in `model.dtype`;
  the trained parameters are the adapters, r * (in + out) float32 values per targeted linear layer,
  and the heads; gradients and Adam states follow only those. No reference copy (the base with the
  adapters off). A separate critic is a second adapter and its head on the same base
  (`model.lora_critic=copy`: plus a frozen copy of the base's decoder in `model.dtype`). Activations
  as above (the backward still runs through the frozen layers), plus per targeted layer and token the
  adapter's input in float32 when the compute dtype is not (peft casts it) and its r-wide output.

Peak = the larger of the start-up and: the persistent part (shards, gradients, optimiser, reference,
replica) + the larger of the update phase (FSDP buffers + activations) and the rollout phase
(replica refresh, KV cache).
Activation and KV figures are estimates; parameter, gradient and optimiser bytes are exact.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.errors import HarnessError

GiB = 1024 ** 3
MAX_DEVICE_BYTES = 1024 ** 5  # --device-memory's upper bound
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Architectures known offline, as their config.json (checked against the hub's files).
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-8B": {"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                      "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                      "tie_word_embeddings": False, "attention_bias": False},
    "smollm2": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
                "tie_word_embeddings": True},
}
KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M-Instruct"] = KNOWN_MODELS["smollm2"]


def model_config(cfg) -> Any:
    """The transformers config of `cfg.model`, without weights: the tiny model's own, a local
    folder's config.json, an entry of KNOWN_MODELS, or a hub id's config already in the HF cache."""
    from transformers import AutoConfig

    from harness.model_folder import check_model_folder, check_shape, load_error

    name = cfg.model.name
    if name == "tiny":
        from harness.models import byte_tokenizer, tiny_llama_config

        tokenizer = byte_tokenizer()
        return tiny_llama_config(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                                 tokenizer.eos_token_id)
    trust = cfg.model.trust_remote_code
    if Path(name).expanduser().is_dir() and name not in KNOWN_MODELS:
        check_model_folder(Path(name), trust, weights=False)  # one line for a config that is not one
        return AutoConfig.from_pretrained(str(Path(name).expanduser()), trust_remote_code=trust)
    if name in KNOWN_MODELS:
        known = dict(KNOWN_MODELS[name])
        return AutoConfig.for_model(known.pop("model_type"), **known)
    try:
        config = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        if "trust_remote_code" in str(exc):
            raise load_error(name, exc, local=False) from None
        choices = ", ".join(["tiny", *KNOWN_MODELS, "a local folder with config.json",
                             "a hub id in the Hugging Face cache"])
        raise HarnessError(f"no shape known for model {name!r} (valid: {choices})") from None
    check_shape(config.to_dict(), f"model {name!r}")
    return config


def meta_model(config, dtype: str, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code)


def backbone_of(model: nn.Module) -> nn.Module:
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def unique_params(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters())  # nn.Module.parameters() yields a tied weight once


def shard_bytes(params: list[torch.Tensor], nproc: int, element_size: int | None = None) -> int:
    """Bytes of the largest rank's FSDP2 shards (dim 0 in chunks of ceil(dim0 / N))."""
    total = 0
    for p in params:
        size = element_size or p.element_size()
        if p.dim() == 0:
            total += size
            continue
        rows = math.ceil(p.shape[0] / nproc)
        total += rows * (p.numel() // p.shape[0]) * size
    return total


def adam_bytes(params: list[torch.Tensor], nproc: int) -> int:
    """Fused AdamW's state: exp_avg and exp_avg_sq like each (sharded) parameter, a float32 step each."""
    return 2 * shard_bytes(params, nproc) + 4 * len(params)


@dataclass
class Plan:
    """Bytes per device of one algorithm's cell, by phase: `persistent` (held throughout), `update`
    (the update's extra, with checkpointing as configured), `rollout` (sampling's extra)."""

    algo: str
    nproc: int
    device_bytes: int
    checkpointing: bool
    persistent: dict[str, int] = field(default_factory=dict)
    update: dict[str, int] = field(default_factory=dict)
    rollout: dict[str, int] = field(default_factory=dict)
    startup: dict[str, int] = field(default_factory=dict)
    activations: dict[bool, int] = field(default_factory=dict)  # checkpointing on/off -> activation bytes
    vllm_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    host_weights: int = 0  # N > 1: the weights rank 0 reads into host memory at start-up, then frees

    @property
    def peak(self) -> int:
        running = sum(self.persistent.values()) + max(sum(self.update.values()), sum(self.rollout.values()))
        return max(running, sum(self.startup.values())) + self.vllm_bytes

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_bytes

    def rows(self) -> list[tuple[str, int]]:
        ckpt = "checkpointing" if self.checkpointing else "no checkpointing"
        other = "no checkpointing" if self.checkpointing else "checkpointing"
        rows = list(self.persistent.items())
        rows += [(f"update: {k}" + (f" ({ckpt})" if k == "activations" else ""), v) for k, v in self.update.items()]
        rows.append((f"  (activations with {other}, not counted)", self.activations[not self.checkpointing]))
        rows += [(f"rollout: {k}", v) for k, v in self.rollout.items()]
        rows += [(f"start-up: {k}", v) for k, v in self.startup.items()]
        if self.vllm_bytes:
            rows.append(("vLLM share", self.vllm_bytes))
        return rows + [("peak", self.peak), ("device", self.device_bytes)]

    def to_dict(self) -> dict[str, Any]:
        return {"algo": self.algo, "nproc": self.nproc, "device_bytes": self.device_bytes,
                "persistent": self.persistent, "update": self.update, "rollout": self.rollout, "startup": self.startup,
                "activations": {"checkpointing": self.activations[True], "no_checkpointing": self.activations[False]},
                "vllm_bytes": self.vllm_bytes, "gradient_checkpointing": self.checkpointing,
                "peak_bytes": self.peak, "fits": self.fits, "notes": self.notes}


def module_bytes(cfg, algo) -> dict[str, Any]:
    """The exact parameter, gradient and optimiser bytes per device of every trained or frozen module
    of a cell (policy, reference, critic backbone and head, extra heads), on the meta device."""
    from algorithms.critics import CRITICS

    from harness.precision import master_dtype

    t, n = cfg.train, cfg.train.world_size
    config = model_config(cfg)
    if cfg.model.lora_rank > 0:
        return lora_module_bytes(cfg, algo, config)
    policy = meta_model(config, master_dtype(cfg), cfg.model.trust_remote_code)
    frozen = unique_params(meta_model(config, cfg.model.dtype, cfg.model.trust_remote_code))  # the reference and the replica
    hidden = config.hidden_size
    with torch.device("meta"):
        heads = list(nn.ModuleDict(algo.extra_heads(hidden)).parameters())
        critic_head = CRITICS.get(algo.critic)(hidden, **algo.critic_options()) if algo.critic != "none" else None
    policy_params = unique_params(policy)
    out: dict[str, Any] = {"config": config, "policy_model": policy, "policy": shard_bytes(policy_params, n),
                           "policy_numel": sum(p.numel() for p in policy_params),
                           "replica": shard_bytes(frozen, 1), "policy_full": shard_bytes(policy_params, 1),
                           "largest_tensor": max(shard_bytes([p], 1) for p in policy_params)}
    actor = policy_params + heads
    shared = critic_head is not None and t.critic_backbone == "shared"
    if shared:
        actor = actor + list(critic_head.parameters())
    out["heads"] = shard_bytes(heads, n) + (shard_bytes(list(critic_head.parameters()), n) if shared else 0)
    out["actor_grads"] = shard_bytes(actor, n)
    out["actor_adam"] = adam_bytes(actor, n)
    out["reference"] = shard_bytes(frozen, n) if algo.needs_reference() else 0
    out["reference_full"] = shard_bytes(frozen, 1) if algo.needs_reference() else 0
    out["critic"] = out["critic_grads"] = out["critic_adam"] = out["critic_full"] = 0
    if critic_head is not None and not shared:
        critic = unique_params(backbone_of(policy)) + list(critic_head.parameters())
        out["critic"] = out["critic_grads"] = shard_bytes(critic, n)
        out["critic_adam"] = adam_bytes(critic, n)
        out["critic_full"] = shard_bytes(critic, 1)
    out["critic_head"] = critic_head
    return out


def lora_targets_of(model: nn.Module, model_cfg) -> list[nn.Linear]:
    """The linear layers peft puts an adapter on (`model.lora_targets`; all-linear: all but the output layer)."""
    from harness.lora import targets

    wanted = targets(model_cfg)
    output = model.get_output_embeddings()
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not output
            and (wanted == "all-linear" or name.rsplit(".", 1)[-1] in wanted)]


def lora_adapter_tensors(model: nn.Module, model_cfg) -> list[torch.Tensor]:
    """One adapter's tensors on the meta device: A [r, in] and B [out, r] per targeted layer, float32."""
    r = model_cfg.lora_rank
    with torch.device("meta"):
        return [t for m in lora_targets_of(model, model_cfg)
                for t in (torch.empty(r, m.in_features), torch.empty(m.out_features, r))]


def lora_module_bytes(cfg, algo, config) -> dict[str, Any]:
    """`module_bytes` under LoRA: the frozen base once, float32 adapters and heads trained, all sharded in N
    (`train.world_size`) like full fine-tuning's modules; the rollout replica (N > 1) is a copy of the
    adapted policy in the base's dtype: the base and every adapter (harness.sharded)."""
    from algorithms.critics import CRITICS

    n = cfg.train.world_size
    base = meta_model(config, cfg.model.dtype, cfg.model.trust_remote_code)
    base_params = unique_params(base)
    adapter = lora_adapter_tensors(base, cfg.model)
    hidden = config.hidden_size
    with torch.device("meta"):
        heads = list(nn.ModuleDict(algo.extra_heads(hidden)).parameters())
        critic_head = CRITICS.get(algo.critic)(hidden, **algo.critic_options()) if algo.critic != "none" else None
    shared = critic_head is not None and cfg.train.critic_backbone == "shared"
    actor = adapter + heads + (list(critic_head.parameters()) if shared else [])
    adapters = adapter * (2 if critic_head is not None and not shared and cfg.model.lora_critic == "adapter" else 1)
    replica = shard_bytes(base_params, 1) + shard_bytes(adapters, 1, base_params[0].element_size())
    out: dict[str, Any] = {"config": config, "policy_model": base, "policy": shard_bytes(base_params + actor, n),
                           "policy_numel": sum(p.numel() for p in base_params), "replica": replica,
                           "policy_full": shard_bytes(base_params + actor, 1),
                           "largest_tensor": max(shard_bytes([p], 1) for p in base_params),
                           "heads": 0, "actor_grads": shard_bytes(actor, n), "actor_adam": adam_bytes(actor, n),
                           "reference": 0, "reference_full": 0, "critic_head": critic_head,
                           "adapter_tensors": adapter}
    out["critic"] = out["critic_grads"] = out["critic_adam"] = out["critic_full"] = 0
    if critic_head is not None and not shared:
        trained = lora_adapter_tensors(base, cfg.model) + list(critic_head.parameters())
        copy = unique_params(backbone_of(base)) if cfg.model.lora_critic == "copy" else []
        out["critic"], out["critic_full"] = shard_bytes(trained + copy, n), shard_bytes(trained + copy, 1)
        out["critic_grads"] = shard_bytes(trained, n)
        out["critic_adam"] = adam_bytes(trained, n)
    return out


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def minibatch_rows_per_rank(t) -> int:
    """Rows of one update minibatch on the largest rank."""
    return math.ceil(t.prompts_per_step * t.group_size / t.num_minibatches / t.world_size)


def layer_activation_bytes(config, b: int) -> int:
    """act_layer: bytes one token keeps for the backward in one decoder layer (module docstring)."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = head_dim_of(config)
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return b * (4 * h + 3 * q + 3 * kv + 4 * inter) + 8 * h


def kv_cache_bytes(config, rows: int, seq: int, b: int) -> int:
    return rows * seq * 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim_of(config) * b



def plan_cell(cfg, prompt_len: int, device_bytes: int) -> Plan:
    """The memory plan of one cell's configuration `cfg` (a RunConfig), per device."""
    from algorithms import ALGOS
    from harness.precision import compute_precision, master_dtype
    from harness.vllm_rollout import GPU_MEMORY_UTILIZATION

    t, n = cfg.train, cfg.train.world_size
    algo = ALGOS.get(cfg.algo)(cfg.algo_options)
    m = module_bytes(cfg, algo)
    config, policy = m["config"], m["policy_model"]
    plan = Plan(cfg.algo, n, device_bytes, checkpointing=t.gradient_checkpointing)
    plan.persistent = {"parameters": m["policy"] + m["heads"], "gradients": m["actor_grads"],
                       "optimiser (Adam)": m["actor_adam"]}
    if m["reference"]:
        plan.persistent["reference"] = 0 if t.reference_offload and n > 1 else m["reference"]
        if t.reference_offload and n > 1:
            plan.notes.append(f"reference shards on the CPU: {m['reference'] / GiB:.2f} GiB per rank")
    if m["critic"]:
        plan.persistent["critic"] = m["critic"]
        plan.persistent["critic gradients"] = m["critic_grads"]
        plan.persistent["critic optimiser"] = m["critic_adam"]
    if n > 1:
        plan.persistent["rollout replica"] = m["replica"]
    if n > 1 and cfg.model.lora_rank > 0:
        host = m["policy_full"] + m["reference_full"] + m["critic_full"]
        plan.notes.append(f"start-up: {host / GiB:.2f} GiB of unsharded modules per rank in host memory")
    elif n > 1:
        plan.notes.append(f"start-up: rank 0 reads the weights once, {m['policy_full'] / GiB:.2f} GiB in host memory")

    mixed = compute_precision(t) == "bf16"
    b = 2 if mixed else DTYPE_BYTES[master_dtype(cfg)]
    rows = minibatch_rows_per_rank(t)
    seq, width = prompt_len + t.max_new_tokens, t.max_new_tokens + 1
    layers, hidden = config.num_hidden_layers, config.hidden_size
    act_layer = layer_activation_bytes(config, b)
    logits = rows * width * config.vocab_size * (b + 4 + 4)
    critic_head, head_act = m["critic_head"], 0
    if critic_head is not None and hasattr(critic_head, "n_samples"):  # the flow head's M samples per token
        blocks = len(getattr(critic_head, "blocks", []))
        head_act = 2 * rows * t.max_new_tokens * critic_head.n_samples * critic_head.out.in_features * (4 * blocks + 2) * 4
    # The output layer's share: the actor's logits, or a separate critic's head in its own (later) update.
    output = max(logits, head_act) if m["critic"] else logits + head_act
    if cfg.model.lora_rank > 0:  # per token: each targeted layer's input cast to float32 (unless it is) and A x
        per_token = sum((4 * lin.in_features if b != 4 else 0) + 4 * cfg.model.lora_rank
                        for lin in lora_targets_of(policy, cfg.model))
        act_layer += per_token // layers
    plan.activations = {True: rows * seq * layers * b * hidden + rows * seq * act_layer + output,
                        False: rows * seq * layers * act_layer + output}
    plan.update = {"activations": plan.activations[t.gradient_checkpointing]}
    if n > 1:
        decoder_layers = list(backbone_of(policy).layers)
        layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in decoder_layers)
        root = m["policy_numel"] - sum(p.numel() for layer in decoder_layers for p in layer.parameters())
        reduce_b = 4 if mixed else DTYPE_BYTES[master_dtype(cfg)]
        plan.update["FSDP buffers"] = (root + 2 * layer_params) * b + layer_params * reduce_b
        plan.startup = {"modules sharded, and the replica": sum(v for k, v in plan.persistent.items()
                                                                if "gradients" not in k and "optimiser" not in k)}
        if cfg.model.lora_rank > 0:  # built whole in host memory, each FSDP unit moved to the device as it is sharded
            plan.startup["one unit before sharding"] = root * DTYPE_BYTES[master_dtype(cfg)]
        else:  # built on the meta device, filled from rank 0 one full tensor at a time
            plan.startup["one tensor broadcast"] = m["largest_tensor"]
        plan.host_weights = m["policy_full"] if cfg.model.lora_rank == 0 else 0
    kv_b = DTYPE_BYTES[cfg.model.dtype]
    train_kv = kv_cache_bytes(config, math.ceil(t.prompts_per_step * t.group_size / n), seq, kv_b)
    eval_kv = kv_cache_bytes(config, math.ceil(cfg.eval.batch_size / n),
                             prompt_len + (cfg.eval.max_new_tokens or t.max_new_tokens), kv_b)
    plan.rollout = {"KV cache": max(train_kv, eval_kv)}
    if n > 1:
        plan.rollout["replica refresh"] = m["largest_tensor"]
    if t.rollout == "vllm":
        plan.vllm_bytes = int(GPU_MEMORY_UTILIZATION * device_bytes)
        plan.rollout = {}  # vLLM's share holds its own weights and KV cache
        plan.notes.append(f"vLLM reserves {GPU_MEMORY_UTILIZATION:.0%} of the device (its weights and KV cache)")
    return plan


def format_plans(plans: list[Plan], model: str, prompt_len: int, cfg) -> str:
    """A table, one column per algorithm, one row per component (GiB per device), then the verdicts."""
    t = cfg.train
    rows_per_rank = minibatch_rows_per_rank(t)
    ranks = f"{t.world_size} rank(s) per cell" + (f" ({t.nnodes} nodes x {t.nproc})" if t.nnodes > 1 else "")
    from harness.precision import compute_precision, master_dtype

    lines = [f"harness plan: {model}, {ranks}, model.dtype={cfg.model.dtype}, masters {master_dtype(cfg)}, "
             f"mixed_precision={compute_precision(t)}, {rows_per_rank} row(s) per rank in a minibatch of "
             f"{prompt_len}+{t.max_new_tokens} tokens, gradient_checkpointing={str(t.gradient_checkpointing).lower()}",
             "GiB per device"]
    labels: list[str] = []
    for plan in sorted(plans, key=lambda p: -len(p.rows())):  # the fullest plan's order, then the rest
        labels += [label for label, _ in plan.rows() if label not in labels]
    tables = [dict(plan.rows()) for plan in plans]
    width = max(len(label) for label in labels)
    lines.append(f"{'':{width}s}" + "".join(f"  {p.algo:>9s}" for p in plans))
    for label in labels:
        lines.append(f"{label:{width}s}" + "".join(f"  {table.get(label, 0) / GiB:9.2f}" for table in tables))
    for p in plans:
        lines.append(f"{p.algo}: {'fits' if p.fits else 'does not fit'}: {p.peak / GiB:.2f} GiB of "
                     f"{p.device_bytes / GiB:.2f} GiB per device" + "".join(f"; {note}" for note in p.notes))
    return "\n".join(lines)


def parse_memory(text: str) -> int:
    """'80GB', '80GiB', '80G', '40960MB' -> bytes (GB and GiB are both read as GiB, as GPU sizes are)."""
    units = {"": GiB, "g": GiB, "gb": GiB, "gib": GiB, "m": 1024 ** 2, "mb": 1024 ** 2, "mib": 1024 ** 2,
             "t": 1024 ** 4, "tb": 1024 ** 4, "tib": 1024 ** 4}
    s = text.strip().lower()
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):].strip()
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in units or not math.isfinite(value) or value <= 0 or value * units.get(unit, 1) > MAX_DEVICE_BYTES:
        raise HarnessError(f"--device-memory {text[:40]!r}: expected a positive size up to 1024TB, such as 80GB, 141GiB "
                           "or 40960MB")
    return int(value * units[unit])


def plans_json(plans: list[Plan]) -> str:
    return json.dumps([p.to_dict() for p in plans], indent=2)
