"""`harness bench`: seconds per training step of this harness against TRL's `GRPOTrainer`, and of
every registered mission algorithm, with peak resident memory.

What is compared. One *step* is one rollout of `prompts_per_step x group_size` completions and the
updates made from it (`num_minibatches` optimiser steps per `ppo_epochs`). Both libraries train
the same GRPO configuration, the harness's resolved `arith` default (plus any `--set`):

    harness                                 TRL GRPOConfig
    train.prompts_per_step x group_size     generation batch = per_device_train_batch_size x steps_per_generation
    train.group_size                        num_generations
    train.num_minibatches                   steps_per_generation (one optimiser step per minibatch)
    train.max_new_tokens                    max_completion_length
    train.lr, weight_decay, max_grad_norm   learning_rate (constant), weight_decay, max_grad_norm
    train.gradient_checkpointing (off)      gradient_checkpointing (TRL's default is on)
    train.temperature, top_p                temperature, top_p (top_k 0)
    grpo.clip_low / clip_high               epsilon / epsilon_high
    grpo.kl_coef (k3, in the loss)          beta (k3, in the loss)
    grpo.adv_scale std | none               scale_rewards group | none
    grpo.agg_mode seq-mean-token-mean       loss_type grpo

from the same warm-started tiny Llama (the harness's cached warm start folder is TRL's model
path) with the byte tokenizer, the same prompts (arith train split) and reward (the arith grader),
on the CPU with `train.threads` torch threads on both sides. The remaining differences: TRL's
group-std epsilon is 1e-4 (harness 1e-6), TRL draws its own prompt order, and TRL's logging is
switched off (which only helps TRL).

Seconds per step are wall-clock from a step's start to its end (everything the library does per
step), median over `--steps` steps after `--warmup` steps. Each configuration runs in its own
subprocess so that its peak RSS (`ru_maxrss`) and phase split are its own. The two libraries run in
alternating rounds (`--rounds`, harness then TRL, each a fresh process) and each side's figure is
the median over the steps of all its rounds. A shared host's speed drifts within seconds, more
than rounds can cancel, so the ratio that the last line reports comes from a *paired* run: both
libraries in one process, a harness step after each TRL step (outside TRL's timed intervals), as
many pairs as the rounds' pooled steps; the ratio is TRL's median seconds per step over the
harness's, printed with the quartiles of the per-pair ratios. Phases:

    generation   harness: rollout (KV-cache sampling, decoding)     TRL: _generate
    reward       harness: grader + noise injector                   TRL: _calculate_rewards
    forward      harness: old log-probs, reference, critic values   TRL: no-grad log-prob passes
    update       harness: minibatch forward/backward/optimiser      TRL: the step minus _generate_and_score_completions
    other        the rest (advantages, padding, bookkeeping)

`--model smollm2` (or any Hugging Face id or folder) runs the same comparison on a real model: a step
small enough for a few CPU cores (`REAL_MODEL_BENCH`, under any `--set`), gradient checkpointing off on
both sides, TRL loading the model in the harness's dtype from the folder the harness loads (a GGUF
model's safetensors copy); the algorithm table runs only for the algorithms named with `--algos`.
`--rollout vllm` adds two rows, one process each: the harness with its vLLM backend and TRL with its
own vLLM option (in-process "colocate" mode, no importance-sampling correction); a row that cannot run
where the bench runs prints `failed: <reason>`. `setup` is each process's seconds before its first
step (loading models and optimiser; a vLLM engine's start).

The last line printed is `speedup_vs_trl=<paired ratio>` (`nan` when TRL is not installed).
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from harness.errors import HarnessError

PHASES = ("generation", "reward", "forward", "update", "other")
HARNESS_PHASES = {  # time/* key -> bench phase
    "rollout": "generation", "reward": "reward", "noise": "reward", "old_logp": "forward",
    "reference": "forward", "critic": "forward", "update": "update",
}
QUICK = {"steps": 2, "warmup": 1, "rounds": 1}
# A real model's bench configuration, under the user's --set: a step small enough to measure on a few
# CPU cores, and gradient checkpointing off on both sides (harness real-model default: on; TRL's: on).
REAL_MODEL_BENCH = {"train.prompts_per_step": "4", "train.group_size": "4", "train.max_new_tokens": "16",
                    "train.num_minibatches": "2", "train.lr": "1e-6", "train.gradient_checkpointing": "false"}


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (Linux reports `ru_maxrss` in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def resolve_config(algo: str, overrides: dict[str, str], model: str | None = None):
    """The resolved default `arith` configuration of one algorithm on `model` (default: the tiny Llama),
    with `--set` overrides; a real model gets `REAL_MODEL_BENCH` under them."""
    from harness.resolver import build_cells

    if (model or overrides.get("model.name", "tiny")) != "tiny":
        overrides = {**REAL_MODEL_BENCH, **overrides}
    cells = build_cells("arith", [algo], "none", [0], Path(tempfile.gettempdir()) / "harness-bench", model=model,
                        overrides=overrides)
    return cells[0].cfg


def summarise_steps(step_seconds: list[float], phases: list[dict[str, float]], tokens: list[float], warmup: int,
                    cpu_seconds: list[float] | None = None) -> dict[str, Any]:
    """Medians over the steps after `warmup`: seconds per step, response tokens per second, phases, and
    CPU seconds per step (process time: with one torch thread, much less sensitive to other load)."""
    kept = slice(warmup, None)
    cpu = (cpu_seconds or [math.nan] * len(step_seconds))[kept]
    secs, toks, ph = step_seconds[kept], tokens[kept], phases[kept]
    if not secs:
        raise HarnessError("no measured steps: --steps must be at least 1")
    return {
        "step_s": statistics.median(secs),
        "cpu_s": statistics.median(cpu) if cpu else math.nan,
        "step_s_all": secs,
        "tokens_per_s": statistics.median(t / s for t, s in zip(toks, secs)),
        "phases": {p: statistics.median(d.get(p, 0.0) for d in ph) for p in PHASES},
        "steps": len(secs),
    }


# ---- this harness ----------------------------------------------------------------------------


def measure_harness(algo: str, steps: int, warmup: int, overrides: dict[str, str], cache_dir: str | None,
                    with_eval: bool = False, model: str | None = None) -> dict[str, Any]:
    from harness.trainer import Trainer

    cfg = resolve_config(algo, overrides, model)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()  # setup: loading the model(s), the optimiser, a vLLM engine's start
        trainer = Trainer(cfg, Path(tmp), cache_dir=Path(cache_dir) if cache_dir else None, progress=False)
        setup = time.perf_counter() - start
        record = StepRecord()
        for step in range(1, warmup + steps + 1):
            record.add(*timed_harness_step(trainer, step))
        if with_eval:
            trainer.evaluate(0)
    return {"library": "harness", "algo": algo, "rollout": cfg.train.rollout, "setup_s": setup, **record.summary(warmup)}


class StepRecord:
    """Per-step seconds, CPU seconds, phase split and response tokens, summarised by `summarise_steps`."""

    def __init__(self):
        self.seconds: list[float] = []
        self.cpu: list[float] = []
        self.phases: list[dict[str, float]] = []
        self.tokens: list[float] = []

    def add(self, seconds: float, cpu: float, phases: dict[str, float], tokens: float) -> None:
        self.seconds.append(seconds)
        self.cpu.append(cpu)
        self.phases.append(phases)
        self.tokens.append(tokens)

    def summary(self, warmup: int) -> dict[str, Any]:
        return summarise_steps(self.seconds, self.phases, self.tokens, warmup, self.cpu)


def timed_harness_step(trainer, step: int) -> tuple[float, float, dict[str, float], float]:
    """One harness training step: (seconds, CPU seconds, phase split, response tokens)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = trainer.train_step(step)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    split = dict.fromkeys(PHASES, 0.0)
    for key, value in metrics.items():
        if key.startswith("time/") and key != "time/step":
            split[HARNESS_PHASES.get(key[5:], "other")] += value
    split["other"] += seconds - sum(split.values())
    t = trainer.cfg.train
    return seconds, cpu, split, metrics["response/length_mean"] * t.prompts_per_step * t.group_size


# ---- TRL -------------------------------------------------------------------------------------


def trl_available() -> bool:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def trl_grpo_config(cfg, output_dir: str) -> dict[str, Any]:
    """GRPOConfig keyword arguments equivalent to the harness's GRPO configuration `cfg`. With
    `train.rollout=vllm`, TRL's own vLLM option in its in-process mode ("colocate"), with no
    importance-sampling correction between engine and trainer (the harness applies none either)."""
    t, o = cfg.train, cfg.algo_options
    if t.ppo_epochs != 1:
        raise HarnessError("the TRL comparison needs train.ppo_epochs=1 (TRL's num_iterations is per minibatch)")
    loss_types = {"seq-mean-token-mean": "grpo"}
    if o.agg_mode not in loss_types or o.kl_loss_kind != "k3" or o.dual_clip is not None:
        raise HarnessError("the TRL comparison needs grpo.agg_mode=seq-mean-token-mean, kl_loss_kind=k3, no dual_clip")
    batch = t.prompts_per_step * t.group_size
    if batch % t.num_minibatches:
        raise HarnessError("the TRL comparison needs prompts_per_step x group_size divisible by num_minibatches")
    return dict(
        output_dir=output_dir, per_device_train_batch_size=batch // t.num_minibatches,
        steps_per_generation=t.num_minibatches, gradient_accumulation_steps=1, num_iterations=1,
        num_generations=t.group_size, max_completion_length=t.max_new_tokens,
        learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, temperature=t.temperature, top_p=t.top_p, top_k=0,
        epsilon=o.clip_low, epsilon_high=o.clip_high,
        beta=o.kl_coef if o.kl_mode == "loss" else 0.0,
        scale_rewards={"std": "group", "none": "none"}[o.adv_scale], loss_type="grpo",
        gradient_checkpointing=t.gradient_checkpointing,  # TRL's default is on; the tiny model trains without
        use_cpu=True, bf16=False, fp16=False, seed=cfg.seed, report_to=[], save_strategy="no",
        logging_strategy="no", disable_dropout=True, dataloader_num_workers=0,
        model_init_kwargs={"dtype": cfg.model.dtype,  # TRL's default "auto" would follow the checkpoint
                           "trust_remote_code": cfg.model.trust_remote_code},
        **({"use_vllm": True, "vllm_mode": "colocate", "vllm_importance_sampling_correction": False}
           if t.rollout == "vllm" else {}),
    )


# ---- driver ----------------------------------------------------------------------------------


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh subprocess, so that its peak RSS is its own."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "harness.bench_worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or not result or "failed" in result:
        reason = result.get("failed") or ((proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"])[0]
        raise WorkerFailed(f"benchmark worker {label(spec)}/{spec.get('algo')} failed: {reason}", reason)
    return result


class WorkerFailed(HarnessError):
    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def label(r: dict[str, Any]) -> str:
    """harness, trl, harness+vllm or trl+vllm: the library and, when it is vLLM, the rollout backend."""
    vllm = r.get("rollout") == "vllm" or r.get("overrides", {}).get("train.rollout") == "vllm"
    return r["library"] + ("+vllm" if vllm else "")


def load_average() -> str:
    try:
        return "load average %.2f, %.2f, %.2f" % os.getloadavg()
    except OSError:
        return "load average unknown"


def format_result(r: dict[str, Any]) -> str:
    ph = r["phases"]
    split = "  ".join(f"{p} {ph[p] * 1000:7.1f}" for p in PHASES)
    setup = f"  setup {r['setup_s']:.1f} s" if r.get("setup_s") is not None else ""
    return (f"{label(r):12s} {r['algo']:7s} {r['step_s'] * 1000:9.1f} ms/step ({r['cpu_s'] * 1000:.1f} CPU ms)  "
            f"{r['tokens_per_s']:9.1f} tok/s  "
            f"peak RSS {r['peak_rss_mib']:7.0f} MiB{setup}  | ms: {split}  | {r['torch_threads']} torch thread(s), "
            f"CPU/wall {r['cpu_per_wall']:.2f}  ({load_average()})")


def pool_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's rounds as one result: seconds per step over the steps of every round;
    the other figures are medians of the rounds' (peak RSS: the largest)."""
    pooled = dict(runs[0])
    pooled["step_s_all"] = [s for r in runs for s in r["step_s_all"]]
    pooled["step_s"] = statistics.median(pooled["step_s_all"])
    for key in ("cpu_s", "tokens_per_s", "cpu_per_wall"):
        pooled[key] = statistics.median(r[key] for r in runs)
    pooled["phases"] = {p: statistics.median(r["phases"][p] for r in runs) for p in PHASES}
    pooled["peak_rss_mib"] = max(r["peak_rss_mib"] for r in runs)
    if all(r.get("setup_s") is not None for r in runs):
        pooled["setup_s"] = statistics.median(r["setup_s"] for r in runs)
    pooled["steps"] = len(pooled["step_s_all"])
    pooled["round_step_s"] = [r["step_s"] for r in runs]
    return pooled


def run_bench(steps: int, warmup: int, overrides: dict[str, str], cache_dir: str | None, with_trl: bool = True,
              algos: list[str] | None = None, out: Callable[[str], None] = print, rounds: int = 3,
              model: str | None = None, rollout: str = "hf") -> float:
    """Print the benchmark; return the speedup (harness steps per second / TRL's), nan without TRL.
    `model`: the tiny Llama by default; `rollout` vllm adds rows with vLLM rollouts on both sides."""
    from algorithms import ALGOS
    from harness.resolver import MISSION_ALGOS
    from harness.models import default_cache_dir, load_policy
    from tasks import SUITES

    if steps < 1 or warmup < 0 or rounds < 1:
        raise HarnessError(f"--steps and --rounds must be >= 1 and --warmup >= 0, got {steps}, {rounds}, {warmup}")
    from harness.vllm_rollout import ROLLOUTS, check_available

    if rollout not in ROLLOUTS:
        raise HarnessError(f"--rollout must be one of {', '.join(ROLLOUTS)}, got {rollout!r}")
    if rollout == "vllm":
        check_available()  # before any row: each would fail the same way
    cfg = resolve_config("grpo", overrides, model)
    t = cfg.train
    suite_cls = SUITES.get(cfg.suite)
    policy, _ = load_policy(cfg.model, suite_cls(cfg.suite_options, cfg.seed),
                            cfg.seed, Path(cache_dir) if cache_dir else default_cache_dir(), "cpu", progress=False)  # warm start once
    out(f"bench: arith, {describe_model(cfg.model, policy)}, "
        f"{t.prompts_per_step} prompts x {t.group_size} samples, {t.max_new_tokens} new tokens, "
        f"{t.num_minibatches} minibatches, lr {t.lr}, gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}, "
        f"{t.threads} thread(s), CPU; median of {steps} steps after {warmup} warm-up, {rounds} round(s); {load_average()}")
    del policy
    out("phases: generation | reward | forward (old log-probs, reference, critic) | update | other; "
        "peak RSS per configuration, each in its own process; setup = loading models and optimiser (and a vLLM engine's start)")
    base = {"steps": steps, "warmup": warmup, "overrides": overrides, "cache_dir": cache_dir, "model": model}
    out("-- GRPO, harness vs TRL GRPOTrainer")
    compare = with_trl and trl_available()
    ours_runs, theirs_runs = [], []
    for _ in range(rounds):  # alternating, so that drift in the machine's speed reaches both sides
        ours_runs.append(run_worker({**base, "library": "harness", "algo": "grpo"}))
        if compare:
            theirs_runs.append(run_worker({**base, "library": "trl", "algo": "grpo"}))
    ours = pool_rounds(ours_runs)
    out(format_result(ours))
    speedup = math.nan
    if not with_trl:
        out("trl: skipped (--no-trl)")
    elif not compare:
        out("trl: not installed, TRL comparison skipped (pip install 'noise-robust-rl-harness[bench]')")
    else:
        theirs = pool_rounds(theirs_runs)
        out(format_result(theirs))
        out(f"separate processes, {rounds} alternating round(s): seconds per step harness {ours['step_s']:.4f}, "
            f"TRL {theirs['step_s']:.4f}, ratio {theirs['step_s'] / ours['step_s']:.2f}; tokens/s ratio "
            f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}; CPU seconds per step ratio "
            f"{theirs['cpu_s'] / ours['cpu_s']:.2f}")
        per_round = [t / h for t, h in zip(theirs["round_step_s"], ours["round_step_s"])]
        out(f"per round: harness {fmt_list(ours['round_step_s'])} s/step, TRL {fmt_list(theirs['round_step_s'])} s/step, "
            f"ratio {fmt_list(per_round, 2)}")
        out(f"step seconds (after warm-up): harness {fmt_list(ours['step_s_all'])}; TRL {fmt_list(theirs['step_s_all'])}")
        # The headline ratio: both libraries in one process, steps interleaved, as many pairs as pooled steps.
        paired = run_worker({**base, "steps": steps * rounds, "library": "paired", "algo": "grpo"})
        speedup = report_paired(paired, out)
    if rollout == "vllm":
        vllm_rows({**base, "steps": steps * rounds}, ours, compare, out)
    if algos is None and cfg.model.name != "tiny":
        out(f"-- algorithms: skipped on {cfg.model.name} (each is a long run here; name them with --algos)")
        names = []
    else:
        names = algos if algos is not None else [a for a in MISSION_ALGOS if a in ALGOS]
    if names:
        out(f"-- algorithms on the default arith configuration ({', '.join(names)}); "
            "peak RSS includes one ID/OOD evaluation")
    for name in names:
        out(format_result(run_worker({**base, "library": "harness", "algo": name, "with_eval": True})))
    out(f"speedup_vs_trl={speedup:.2f}" if not math.isnan(speedup) else "speedup_vs_trl=nan")
    return speedup


def vllm_rows(base: dict[str, Any], ours_hf: dict[str, Any], with_trl: bool, out: Callable[[str], None]) -> None:
    """GRPO with vLLM rollouts: the harness's backend, and TRL's own vLLM option when TRL is there. One
    process each (an engine's start is minutes), as many steps as the HF rows' rounds pooled. A row that
    cannot run says why instead of stopping the bench."""
    out(f"-- GRPO with vLLM rollouts (one process each, {base['steps']} steps after {base['warmup']} warm-up; "
        "setup includes the engine's start)")
    spec = {**base, "overrides": {**base["overrides"], "train.rollout": "vllm"}, "algo": "grpo"}
    rows = {}
    for library in ("harness", "trl") if with_trl else ("harness",):
        try:
            rows[library] = run_worker({**spec, "library": library})
        except WorkerFailed as exc:
            out(f"{library + '+vllm':12s} grpo    failed: {exc.reason}")
            continue
        out(format_result(rows[library]))
    if "harness" in rows:
        theirs = rows.get("trl")
        versus = f"; TRL+vLLM {theirs['step_s']:.4f}, ratio {theirs['step_s'] / rows['harness']['step_s']:.2f}" if theirs else ""
        out(f"seconds per step: harness+vLLM {rows['harness']['step_s']:.4f}, harness (HF generate) "
            f"{ours_hf['step_s']:.4f}, ratio {ours_hf['step_s'] / rows['harness']['step_s']:.2f}{versus}")


def describe_model(model_cfg, policy) -> str:
    """The bench header's model: name, parameters, shape, dtype."""
    config = getattr(policy, "config", None)
    params = sum(p.numel() for p in policy.parameters()) / 1e6
    name = "tiny Llama" if model_cfg.name == "tiny" else model_cfg.name
    shape = f", hidden {config.hidden_size}, {config.num_hidden_layers} layers" if config is not None else ""
    return f"{name} ({params:.1f}M parameters{shape}, {model_cfg.dtype})"


def report_paired(paired: dict[str, Any], out: Callable[[str], None]) -> float:
    """Print the paired measurement; return its ratio, TRL's median seconds per step over the harness's."""
    ours, theirs, ratios = paired["harness"], paired["trl"], sorted(paired["pair_ratios"])
    speedup = theirs["step_s"] / ours["step_s"]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    out(f"paired in one process ({len(ratios)} pairs, a harness step after each TRL step): seconds per step "
        f"harness {ours['step_s']:.4f}, TRL {theirs['step_s']:.4f}; harness steps {speedup:.2f}x as fast "
        f"(per-pair ratios: median {statistics.median(ratios):.2f}, quartiles {quartiles[0]:.2f}-{quartiles[2]:.2f}); "
        f"CPU seconds per step ratio {theirs['cpu_s'] / ours['cpu_s']:.2f}; peak RSS of the pair "
        f"{paired['peak_rss_mib']:.0f} MiB")
    return speedup


def fmt_list(values: list[float], digits: int = 3) -> str:
    return "[" + ", ".join(f"{v:.{digits}f}" for v in values) + "]"
