"""Option resolution: from the command line's `--set key=value` strings (and a suite's run
defaults, the tiny model's and a real model's defaults) to every cell's typed, validated
configuration. `harness run`, `eval`, `plan`, `bench` and `tune` all resolve here; the checks that
need an installed backend (vLLM, torch.distributed, peft) run here too, after `validate_core`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from algorithms import ALGOS
from harness import store
from harness.cell import Cell
from harness.config import (SECTIONS, EvalConfig, ModelConfig, RunConfig, TrainConfig, apply_section_overrides, convert,
                            options_dataclass, resolved_old_logp, set_dataclass_field, split_overrides, validate_core)
from harness.errors import HarnessError
from harness.models import MODEL_ALIASES, check_local_model
from noise import parse_noise_list
from tasks import SUITES

# The mission's algorithms, in this order, as far as they are registered.
MISSION_ALGOS = ("ppo", "grpo", "dvpo", "flowrl", "dfpo")


# The spec's head sizes are meant for 8B policies. On the tiny offline model (hidden size 64) a
# 1024-wide flow head costs 16x PPO's step; 64 wide it costs 1.55x (measured on the default arith
# configuration). Applied only with --model tiny, only where the user sets nothing else, and
# written to config.json like every other option.
TINY_MODEL_OVERRIDES = {"dfpo.flow_width": "64"}


def check_backends(cfg: RunConfig) -> None:
    """What a valid configuration (`validate_core`) needs installed or supported: vLLM for
    train.rollout=vllm, the sharded trainer's limits for more than one rank, peft for LoRA."""
    if cfg.train.rollout == "vllm":
        from harness.vllm_rollout import check_available

        check_available()
    if cfg.train.world_size > 1:
        from harness.distributed import check_config

        check_config(cfg)
    if cfg.model.lora_rank > 0:
        from harness.lora import check_available as check_peft

        check_peft()


def with_tiny_model_overrides(overrides: dict[str, str], algos: list[str], model: str | None) -> dict[str, str]:
    if (model or overrides.get("model.name", "tiny")) != "tiny":
        return overrides
    out = dict(overrides)
    for key, value in TINY_MODEL_OVERRIDES.items():
        base, _, name = key.partition(".")
        for algo in algos:  # the algorithm and its named variants (subclasses, e.g. dfpo_tails_off)
            if (base in ALGOS and issubclass(ALGOS.get(algo), ALGOS.get(base)) and f"{algo}.{name}" not in out
                    and f"algo.{name}" not in out):
                out[f"{algo}.{name}"] = value
    return out


def with_real_model_defaults(overrides: dict[str, str], model: str | None) -> dict[str, str]:
    """Defaults for a real model, under anything the user sets: one torch thread per core (its cells
    run one at a time, see `default_workers`, while tiny-model cells run one per core,
    single-threaded), and gradient checkpointing (the activations of long responses are what fills
    memory)."""
    if (model or overrides.get("model.name", "tiny")) == "tiny":
        return overrides
    return {"train.threads": str(os.cpu_count() or 1), "train.gradient_checkpointing": "true", **overrides}


def default_algos() -> list[str]:
    return [name for name in MISSION_ALGOS if name in ALGOS]


def comma_list(text: str, flag: str) -> list[str]:
    """`"a, b"` -> ["a", "b"]; an empty item (`"a,,b"`, a trailing comma) is refused."""
    parts = [p.strip() for p in str(text).split(",")]
    if "" in parts and any(parts):
        raise HarnessError(f"{flag} has an empty item in {text!r}: ',' must separate two names")
    return [p for p in parts if p]
MAX_SEED = 2 ** 63
MAX_SEED_COUNT = 10_000


def parse_seeds(text: str) -> list[int]:
    """`"3"` -> [0, 1, 2]; `"0,5,7"` -> [0, 5, 7]; `"5,"` -> [5] (a list of one seed, as a grid file's [5])."""
    text = str(text).strip()
    one_seed = text.endswith(",") and text.count(",") == 1
    parts = comma_list(text[:-1] if one_seed else text, "--seeds")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise HarnessError(f"--seeds takes a count (e.g. 2) or a comma list of seeds (e.g. 0,1,5), got {text!r}") from None
    if len(values) == 1 and "," not in text:
        if values[0] < 1:
            raise HarnessError(f"--seeds count must be at least 1, got {values[0]}")
        if values[0] > MAX_SEED_COUNT:
            raise HarnessError(f"--seeds count must be at most {MAX_SEED_COUNT}, got {values[0]}")
        return list(range(values[0]))
    if not values or any(v < 0 for v in values) or len(set(values)) != len(values):
        raise HarnessError(f"--seeds list must hold distinct non-negative integers, got {text!r}")
    if any(v >= MAX_SEED for v in values):
        raise HarnessError(f"--seeds must be below 2**63 (a seed names a folder and seeds 64-bit streams), got {text!r}")
    return values


def parse_algos(text: str) -> list[str]:
    names = comma_list(text, "--algos")
    if not names:
        raise HarnessError(f"--algos needs at least one algorithm (valid: {', '.join(ALGOS.names())})")
    for name in names:
        ALGOS.get(name)
    if len(set(names)) != len(names):
        raise HarnessError(f"--algos lists an algorithm twice: {text!r}")
    return names


def resolve_options(options_cls: type, groups: dict[str, dict[str, str]], shared: str, own: str) -> Any:
    """The typed, validated options of one algorithm (or the suite): shared keys it has, then its own keys."""
    field_names = {f.name for f in dataclasses.fields(options_cls)}
    overrides = {k: v for k, v in groups.get(shared, {}).items() if k in field_names}
    overrides.update(groups.get(own, {}))
    return options_dataclass(options_cls, overrides, own)


def algo_sections(own: dict[str, str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Split the `<algo>.*` keys into core keys for that algorithm's cells only (`ppo.train.lr=1e-4`
    -> {"train": {"lr": "1e-4"}}; what a tuned grid file sets) and the algorithm's own options."""
    sections: dict[str, dict[str, str]] = {}
    options: dict[str, str] = {}
    for key, value in own.items():
        section, dot, name = key.partition(".")
        if dot and section in SECTIONS:
            sections.setdefault(section, {})[name] = value
        else:
            options[key] = value
    return sections, options


def build_cells(suite: str, algos: list[str], noise: str, seeds: list[int], out: Path,
                model: str | None = None, steps: int | None = None, eval_limit: int | None = None,
                overrides: dict[str, str] | None = None, check_data: bool = True) -> list[Cell]:
    """The grid's cells, every configuration resolved and validated; with `check_data`, the suite's
    benchmarks are also checked to be had (`harness plan` needs no data)."""
    suite_cls = SUITES.get(suite)
    noise_specs = parse_noise_list(noise)
    overrides = {**getattr(suite_cls, "run_defaults", {}), **(overrides or {})}  # the user's --set wins
    overrides = with_real_model_defaults(with_tiny_model_overrides(overrides, algos, model), model)
    groups = split_overrides(overrides, ALGOS.names())
    for key in groups.get("algo", {}):
        if not any(key in {f.name for f in dataclasses.fields(ALGOS.get(a).Options)} for a in algos):
            raise HarnessError(f"config key 'algo.{key}' is an option of none of: {', '.join(algos)}")
    for name in groups:
        if name in ALGOS and name not in algos:
            raise HarnessError(f"--set {name}.* given but {name!r} is not in --algos ({', '.join(algos)})")
    suite_options = resolve_options(suite_cls.Options, groups, "suite", "suite")
    model_name = model or overrides.get("model.name", "tiny")
    if model_name in MODEL_ALIASES:
        MODEL_ALIASES[model_name]()  # a missing offline model stops the grid before it writes anything
    trust = convert(overrides.get("model.trust_remote_code", "false"), bool, "model.trust_remote_code")
    check_local_model(model_name, trust, weights=check_data)  # so does a local folder that is not there, or a damaged one
    data_check = getattr(suite_cls, "check_data", None) if check_data else None
    if data_check is not None:  # data that cannot be had stops the grid before it writes anything
        data_check(suite_options)
    cells = []
    for algo in algos:
        sections, own = algo_sections(groups.get(algo, {}))
        algo_options = resolve_options(ALGOS.get(algo).Options, {**groups, algo: own}, "algo", algo)
        for spec in noise_specs:
            for seed in seeds:
                cfg = RunConfig(suite=suite, algo=algo, noise=spec.name, seed=seed,
                                algo_options=dataclasses.replace(algo_options),  # a cell's own copy
                                suite_options=dataclasses.replace(suite_options))
                if model is not None:
                    cfg.model.name = model
                apply_section_overrides(cfg, groups)  # a suite's run defaults among them: --steps beats them
                if steps is not None:
                    if steps < 1:
                        raise HarnessError(f"--steps must be a positive integer, got {steps}")
                    cfg.train.steps = steps
                if eval_limit is not None:
                    set_dataclass_field(cfg.eval, "limit", str(eval_limit), "--eval-limit")
                for section, items in sections.items():  # `<algo>.train.lr`: after the grid-wide keys
                    for name, text in items.items():
                        set_dataclass_field(getattr(cfg, section), name, text, f"{algo}.{section}.{name}")
                if sections or steps is not None or eval_limit is not None:
                    validate_core(cfg)
                check_backends(cfg)
                need = ALGOS.get(algo)(algo_options).min_group_size()
                if cfg.train.group_size < need:
                    raise HarnessError(f"{algo} compares the samples of a group: train.group_size must be >= {need} "
                                       f"(a group of {cfg.train.group_size} trains nothing), got {cfg.train.group_size}")
                if cfg.train.rollout_correction != "off" and not ALGOS.get(algo).supports_rollout_correction:
                    raise HarnessError(f"train.rollout_correction={cfg.train.rollout_correction}: {algo}'s actor loss takes "
                                       f"no per-token importance weights (the PPO-clip algorithms do); set it to off")
                cfg.algo_options = ALGOS.get(algo).cell_options(cfg.algo_options, cfg.train)
                cfg.train.old_logp = resolved_old_logp(cfg)
                cells.append(Cell(cfg, store.cell_dir(out, suite, algo, spec.name, seed)))
    return cells


def cell_config(model: str) -> dict[str, Any] | None:
    """The config.json of the cell whose `model/` folder `model` is, or None."""
    path = Path(model).parent / "config.json"
    saved = any((Path(model) / name).exists() for name in ("config.json", "adapter_config.json"))  # full or LoRA
    if Path(model).is_dir() and saved and path.exists():
        data = store.read_json(path)
        if isinstance(data, dict) and {"suite", "algo", "noise", "seed", "model", "train", "eval"} <= set(data):
            return data
    return None


def eval_config(model: str, suite: str | None, overrides: dict[str, str], seed: int = 0,
                eval_limit: int | None = None) -> tuple[RunConfig, dict[str, Any] | None]:
    """The configuration `harness eval` evaluates with: a cell's own for a cell's `model/` (its
    suite, decoding and suite options), else the suite's defaults as `harness run` resolves them;
    `overrides` (model.*, train.*, eval.*, suite.*) on top. Returns (config, the cell's config or None)."""
    cell = cell_config(model)
    suite = suite or (cell["suite"] if cell else "arith")
    suite_cls = SUITES.get(suite)
    extra = {k.partition(".")[0] for k in overrides if "." in k} - {"model", "train", "eval", "suite"}
    if extra:
        raise HarnessError(f"harness eval takes model.*, train.*, eval.* and suite.* keys, not {', '.join(sorted(extra))}.*")
    groups = split_overrides(overrides, [])
    if cell is not None:
        cfg = RunConfig(suite=suite, algo=cell["algo"], noise=cell["noise"], seed=cell["seed"],
                        model=ModelConfig(**cell["model"]), train=TrainConfig(**cell["train"]),
                        eval=EvalConfig(**cell["eval"]))
        same_suite = suite == cell["suite"]
        options = suite_cls.Options(**cell["suite_options"]) if same_suite else suite_cls.Options()
        for name, text in groups.get("suite", {}).items():
            set_dataclass_field(options, name, text, f"suite.{name}")
        if hasattr(options, "validate"):
            options.validate()
        cfg.suite_options = options
        if not same_suite:  # the other suite's generation length, as `harness run` would take it
            groups = split_overrides({**suite_cls.run_defaults, **overrides}, []) if hasattr(suite_cls, "run_defaults") else groups
    else:
        merged = with_real_model_defaults({**getattr(suite_cls, "run_defaults", {}), **overrides}, model)
        groups = split_overrides(merged, [])
        cfg = RunConfig(suite=suite, algo="base", noise="none", seed=seed,
                        suite_options=resolve_options(suite_cls.Options, groups, "suite", "suite"))
    cfg.model.name = model
    if eval_limit is not None:
        set_dataclass_field(cfg.eval, "limit", str(eval_limit), "--eval-limit")
    apply_section_overrides(cfg, {k: v for k, v in groups.items() if k != "suite"})
    check_backends(cfg)
    check_data = getattr(suite_cls, "check_data", None)
    if check_data is not None:
        check_data(cfg.suite_options)
    return cfg, cell
