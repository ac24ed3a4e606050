"""One `harness bench` measurement in its own process (`python -m harness.bench_worker SPEC`, started
by `harness.bench.run_worker`, so that its peak RSS is its own): the harness alone
(`harness.bench.measure_harness`), TRL's `GRPOTrainer` alone (`measure_trl`), or both paired step by
step in this process (`measure_paired`). The comparison's terms are `harness.bench`'s module doc.
"""
from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from harness.bench import (StepRecord, measure_harness, peak_rss_mib, resolve_config, timed_harness_step,
                           trl_grpo_config)


def measure_trl(steps: int, warmup: int, overrides: dict[str, str], cache_dir: str | None,
                between: Callable[[], None] | None = None, model: str | None = None) -> dict[str, Any]:
    """TRL's seconds per step, where a step is one generation and its optimiser steps. `between`, when
    given, runs after every step, outside the timed intervals (the paired measurement's harness step)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from harness.models import default_cache_dir, load_policy, loadable_source
    from tasks import SUITES

    start = time.perf_counter()
    cfg = resolve_config("grpo", overrides, model)
    torch.set_num_threads(cfg.train.threads)
    suite_cls = SUITES.get(cfg.suite)
    suite = suite_cls(cfg.suite_options, cfg.seed)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    policy, tokenizer = load_policy(cfg.model, suite, cfg.seed, cache, "cpu", progress=False)  # builds if missing
    model_path = loadable_source(policy, cache, tokenizer)  # the tiny warm start's folder; a GGUF model's safetensors copy
    del policy
    problems = suite.train_problems()
    data = Dataset.from_dict({"prompt": [suite.format_prompt(p, tokenizer) for p in problems],
                              "problem": list(range(len(problems)))})

    tokens: list[float] = [0.0]  # cumulative response tokens

    def arith_reward(prompts, completions, completion_ids, problem, **kwargs):
        tokens[0] += sum(len(ids) for ids in completion_ids)
        return [float(suite.grade(text, problems[i])) for text, i in zip(completions, problem)]

    phase_total = dict.fromkeys(("generation", "reward", "forward", "score"), 0.0)
    spg = cfg.train.num_minibatches  # one harness step = one generation = spg optimiser steps
    starts: list[tuple[float, dict[str, float], float, float]] = []  # (time, phase totals, tokens, CPU time)
    ends: list[tuple[float, dict[str, float], float, float]] = []

    def mark() -> tuple[float, dict[str, float], float, float]:
        return time.perf_counter(), dict(phase_total), tokens[0], time.process_time()

    class Marks(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            starts.append(mark())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % spg:
                return
            ends.append(mark())
            if between is not None:
                between()
            starts.append(mark())

    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(**trl_grpo_config(cfg, tmp), max_steps=(warmup + steps) * spg)
        trainer = GRPOTrainer(model=model_path, reward_funcs=arith_reward, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[Marks()])
        timed(trainer, "_generate", phase_total, "generation")
        timed(trainer, "_calculate_rewards", phase_total, "reward")
        timed(trainer, "_generate_and_score_completions", phase_total, "score")
        timed(trainer, "_get_per_token_logps_and_entropies", phase_total, "forward",
              when=lambda: not torch.is_grad_enabled())
        trainer.train()

    record = StepRecord()
    for (t0, p0, n0, c0), (t1, p1, n1, c1) in zip(starts, ends):
        d = {name: p1[name] - p0[name] for name in p1}
        seconds = t1 - t0
        split = {"generation": d["generation"], "reward": d["reward"], "forward": d["forward"],
                 "update": seconds - d["score"]}
        split["other"] = seconds - sum(split.values())
        record.add(seconds, c1 - c0, split, n1 - n0)
    return {"library": "trl", "algo": "grpo", "rollout": cfg.train.rollout, "setup_s": starts[0][0] - start,
            **record.summary(warmup)}


def measure_paired(steps: int, warmup: int, overrides: dict[str, str], cache_dir: str | None,
                   model: str | None = None) -> dict[str, Any]:
    """Harness and TRL in one process, their steps interleaved (a harness step after each TRL step), so
    that the machine's speed at any moment reaches both: the steadiest estimate of their ratio."""
    from harness.trainer import Trainer

    cfg = resolve_config("grpo", overrides, model)
    with tempfile.TemporaryDirectory() as tmp:
        # Built before TRL's trainer, whose seeding then comes last, as in TRL's own process.
        ours = Trainer(cfg, Path(tmp), cache_dir=Path(cache_dir) if cache_dir else None, progress=False)
        record = StepRecord()
        theirs = measure_trl(steps, warmup, overrides, cache_dir, model=model,
                             between=lambda: record.add(*timed_harness_step(ours, len(record.seconds) + 1)))
    harness = {"library": "harness", "algo": "grpo", "rollout": cfg.train.rollout, **record.summary(warmup)}
    ratios = [t / h for t, h in zip(theirs["step_s_all"], harness["step_s_all"])]
    return {"library": "paired", "algo": "grpo", "harness": harness, "trl": theirs, "pair_ratios": ratios}


def timed(obj: Any, method: str, totals: dict[str, float], phase: str, when: Callable[[], bool] | None = None) -> None:
    """Wrap `obj.method` so that its wall time adds to `totals[phase]` (when `when()` holds)."""
    inner = getattr(obj, method)

    def wrapper(*args, **kwargs):
        if when is not None and not when():
            return inner(*args, **kwargs)
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[phase] += time.perf_counter() - start

    setattr(obj, method, wrapper)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process (run as `python -m harness.bench_worker JSON`)."""
    start = time.perf_counter()
    args = (spec["steps"], spec["warmup"], spec["overrides"], spec["cache_dir"])
    if spec["library"] == "trl":
        result = measure_trl(*args, model=spec.get("model"))
    elif spec["library"] == "paired":
        result = measure_paired(*args, model=spec.get("model"))
    else:
        result = measure_harness(spec["algo"], *args, with_eval=spec.get("with_eval", False), model=spec.get("model"))
    import torch

    result["peak_rss_mib"] = peak_rss_mib()
    result["torch_threads"] = torch.get_num_threads()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_per_wall"] = (usage.ru_utime + usage.ru_stime) / (time.perf_counter() - start)  # > 1: several threads busy
    return result


if __name__ == "__main__":
    if len(sys.argv) == 2:
        try:
            result = worker(json.loads(sys.argv[1]))
        except Exception as exc:  # the driver prints the reason on the row (a vLLM row may not run here)
            print(json.dumps({"failed": f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0][:300]}))
            sys.exit(1)
        print(json.dumps(result))
    else:
        sys.exit("usage: python -m harness.cli bench [--quick] (this module is the benchmark workers' entry)")
