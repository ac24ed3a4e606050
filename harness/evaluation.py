"""ID/OOD evaluation with the suites' clean graders, shared by training-time evaluation (the trainer)
and `harness eval`, which evaluates any model alone (a hub id, a local folder, a cell's `model/`):
the same prompt templates, decoding protocol and graders, rows in the `eval.jsonl` schema.

    harness eval --model runs/arith/ppo/none/seed0/model        # a cell's model: the cell's configuration
    harness eval --model smollm2 --suite math --data-dir ../shared/data --ood simpleqa --eval-limit 50 \
        --lm-eval harness_gsm8k

A cell's `model/` takes the suite, decoding and suite options from the cell's config.json, so its
rows equal the cell's last evaluation. The rows go to `<out>/<suite>/<name>/<noise>/seed<k>/`
(`eval.jsonl`, `eval_responses.jsonl`, `status.json` done, `config.json`; `lm_eval.jsonl` and
`lm_eval_results.json` with `--lm-eval`), which `harness report --runs <out>` reads like a cell:
`--out` a grid's folder puts the base model as a row beside the trained algorithms.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from harness import fast_llama, store
from harness.config import EvalConfig, ModelConfig, RunConfig, TrainConfig, apply_section_overrides, set_dataclass_field
from harness.errors import HarnessError
from harness.rollout import PerRow, generate
from harness.seeding import torch_generator
from tasks import SUITES
from tasks.base import Benchmark, Problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)



class PolicyEvaluator:
    """Clean-grader evaluation of `self.policy` through `self.rollout` on `self.benchmarks`. A subclass
    sets cfg, suite, tokenizer, rollout, benchmarks, prompt_cache (and eval_responses: a list to
    collect every graded response, or None)."""

    eval_responses: list[dict[str, Any]] | None = None

    def encode(self, problem: Problem) -> list[int]:
        if problem.id not in self.prompt_cache:
            text = self.suite.format_prompt(problem, self.tokenizer)
            self.prompt_cache[problem.id] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.prompt_cache[problem.id]

    def decode(self, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
        lengths = mask.sum(-1).long().tolist()  # one tolist for the whole batch: per-row ones cost ~1 ms a step
        return [self.tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(responses.tolist(), lengths)]

    @torch.no_grad()
    def evaluate(self, step: int) -> list[dict[str, Any]]:
        """Clean-grader evaluation of every benchmark; one row per (benchmark, metric)."""
        e, t = self.cfg.eval, self.cfg.train
        max_new = e.max_new_tokens or t.max_new_tokens
        rows = []
        for bench in self.benchmarks:
            problems = bench.problems[: e.limit] if e.limit else bench.problems
            correct = self.eval_correct(bench, problems, step, max_new)
            decoding = {"temperature": e.temperature, "top_p": e.top_p, "k": e.k, "max_new_tokens": max_new,
                        "greedy": e.temperature == 0}
            base = {"step": step, "benchmark": bench.name, "role": bench.role, "n_problems": len(problems),
                    "grader": bench.grader, "prompt_template": self.prompt_template_id(bench), "seed": self.cfg.seed,
                    **decoding}
            if e.k == 1:
                rows.append({**base, "metric": "accuracy", "value": sum(c[0] for c in correct) / len(problems)})
            else:
                rows.append({**base, "metric": f"avg@{e.k}", "value": sum(sum(c) / e.k for c in correct) / len(problems)})
                rows.append({**base, "metric": f"pass@{e.k}",
                             "value": sum(pass_at_k(e.k, sum(c), e.k) for c in correct) / len(problems)})
        return rows

    def eval_correct(self, bench: Benchmark, problems: list[Problem], step: int, max_new: int) -> list[list[int]]:
        """Grades `[problem][sample]` of k samples per problem. Sample j of a problem draws from its own
        stream (seed, "eval", eval.sample_seed, step, benchmark, problem id, j): a problem's samples do
        not depend on the batch they were generated in, nor on the other problems or the worker."""
        e = self.cfg.eval
        repeated = [(p, j) for p in problems for j in range(e.k)]
        grades: list[int] = []
        for start in range(0, len(repeated), e.batch_size):
            chunk = [p for p, _ in repeated[start:start + e.batch_size]]
            gen = None if e.temperature == 0 else PerRow([
                torch_generator(self.cfg.seed, "eval", e.sample_seed, step, bench.name, p.id, j)
                for p, j in repeated[start:start + e.batch_size]])
            roll = self.rollout([self.encode(p) for p in chunk], max_new_tokens=max_new,
                            eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                            temperature=e.temperature, top_p=e.top_p, generator=gen)
            texts = self.decode(roll.responses, roll.response_mask)
            grades += [int(self.suite.grade(text, p) >= 1.0) for text, p in zip(texts, chunk)]
            if self.eval_responses is not None:
                self.eval_responses += [{"step": step, "benchmark": bench.name, "role": bench.role, "problem": p.id,
                                         "response": text, "score": g} for text, p, g in zip(texts, chunk, grades[start:])]
        return [grades[i * e.k:(i + 1) * e.k] for i in range(len(problems))]

    def prompt_template_id(self, bench: Benchmark) -> str:
        """The benchmark's template id (if it has one) and whether the chat template wrapped it."""
        wrap = "chat" if getattr(self.tokenizer, "chat_template", None) else "raw"
        return f"{bench.template}/{wrap}" if bench.template else wrap


class ModelEvaluation(PolicyEvaluator):
    """A model alone, loaded as training loads it, evaluated as training evaluates."""

    def __init__(self, cfg: RunConfig, cache_dir: Path | None = None, progress: bool = False):
        from harness.models import load_policy

        self.cfg = cfg
        torch.set_num_threads(cfg.train.threads)
        device = cfg.train.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        suite_cls = SUITES.get(cfg.suite)
        self.suite = suite_cls(suite_cls.Options(**cfg.suite_options), cfg.seed)
        self.policy, self.tokenizer = load_policy(cfg.model, self.suite, cfg.seed, cache_dir, device, progress)
        self.policy.eval()
        fast_llama.enable(self.policy, cfg.train.fast_model)
        self.rollout = functools.partial(generate, self.policy)
        self.benchmarks = self.suite.eval_benchmarks()
        self.prompt_cache: dict[str, list[int]] = {}
        self.eval_responses = []


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
    from harness.config import split_overrides
    from harness.grid import resolve_options, with_real_model_defaults

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
        cfg.suite_options = dataclasses.asdict(options)
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
    check_data = getattr(suite_cls, "check_data", None)
    if check_data is not None:
        check_data(suite_cls.Options(**cfg.suite_options))
    return cfg, cell


def row_folder(out: Path, cfg: RunConfig, name: str) -> Path:
    """Where `harness eval` writes its row, `<out>/<suite>/<name>/<noise>/seed<k>/`, checked before
    anything is loaded or written (`harness.store.check_row_folder`): `out` a run store or a new
    folder; every part one folder name; `name` not an algorithm's (a training cell's folder)."""
    from algorithms import ALGOS

    store.check_name(name, "--name")
    if name in ALGOS.names():
        raise HarnessError(f"--name {name!r} is an algorithm's name, the folder of its training cells, which "
                           f"harness eval never writes; give another name (e.g. {name}-model)")
    store.check_name(str(cfg.noise), "the cell's noise")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2 ** 63:
        raise HarnessError(f"--seed must be an integer in 0..2**63-1, got {cfg.seed!r}")
    folder = store.cell_dir(out, cfg.suite, name, cfg.noise, cfg.seed)
    store.check_out_dir(out)
    store.check_row_folder(out, folder)
    return folder


def run_eval(model: str, suite: str | None, overrides: dict[str, str], out: Path, seed: int = 0,
             name: str | None = None, data_dir: str | None = None, eval_limit: int | None = None,
             lm_eval_tasks: list[str] | None = None, lm_eval_include: str | None = None,
             lm_eval_gen_kwargs: str | None = None, lm_eval_max_length: int | None = None,
             cache_dir: Path | None = None, progress: bool = False) -> Path:
    """Evaluate `model` and write its rows as a cell of the run store `out`; returns the cell folder.
    `data_dir` is the suite's data folder (for suites that read files) and the harness_* lm-eval tasks'."""
    suite_cls = SUITES.get(suite or (cell_config(model) or {}).get("suite", "arith"))
    if data_dir is not None and "data_dir" in {f.name for f in dataclasses.fields(suite_cls.Options)}:
        overrides = {"suite.data_dir": data_dir, **overrides}
    cfg, cell = eval_config(model, suite, overrides, seed, eval_limit)
    if lm_eval_tasks:
        from harness.lm_eval_tasks import check_request

        check_request(lm_eval_tasks, data_dir or cfg.suite_options.get("data_dir") or None, lm_eval_include)
    name = name if name is not None else (f"{cell['algo']}-model" if cell else "base")
    folder = row_folder(out, cfg, name)
    from harness.models import check_local_model

    check_local_model(model, cfg.model.trust_remote_code)  # a damaged model folder: one line, before any load
    evaluation = ModelEvaluation(cfg, cache_dir, progress)
    rows = [{**row, "model": model} for row in evaluation.evaluate(0)]
    lm_rows, lm_results = [], None
    if lm_eval_tasks:
        from harness.lm_eval_tasks import run_lm_eval

        data_dir = data_dir or cfg.suite_options.get("data_dir") or None
        lm_rows, lm_results = run_lm_eval(evaluation.policy, evaluation.tokenizer, lm_eval_tasks, data_dir=data_dir,
                                          limit=cfg.eval.limit or None, include=lm_eval_include, seed=cfg.seed,
                                          batch_size=cfg.eval.batch_size, gen_kwargs=lm_eval_gen_kwargs,
                                          max_length=lm_eval_max_length)
    summary = {}
    for role in ("ID", "OOD"):
        values = [r["value"] for r in rows if r["role"] == role and (r["metric"] == "accuracy" or r["metric"].startswith("avg@"))]
        if values:
            summary[f"{role}_accuracy"] = sum(values) / len(values)
    row_folder(out, cfg, name)  # the same checks again: the store may have changed while the model was evaluated
    store.claim_store(out)
    with store.atomic_dir(folder) as tmp:  # the whole folder or nothing
        store.atomic_write_json(tmp / "config.json", {**cfg.to_dict(), "algo": name, "evaluated_model": model})
        store.append_jsonl(tmp / "eval.jsonl", rows)
        store.append_jsonl(tmp / "eval_responses.jsonl", evaluation.eval_responses)
        if lm_eval_tasks:
            store.append_jsonl(tmp / "lm_eval.jsonl", lm_rows)
            store.atomic_write_text(tmp / "lm_eval_results.json", lm_results)
        store.write_status(tmp, "done", final_step=0, evaluated_model=model, **summary)
    for row in rows:
        print(f"{row['role']:3s} {row['benchmark']:24s} {row['metric']:10s} {row['value']:.4f}  (n={row['n_problems']}, {row['grader']})")
    for row in lm_rows:
        print(f"lm-eval {row['task']:20s} {row['metric']:28s} {row['value']:.4f}  (n={row['n_samples']})")
    return folder


def retest(model: str, suite: str | None, overrides: dict[str, str], repeats: int, seed: int = 0,
           eval_limit: int | None = None, cache_dir: Path | None = None, progress: bool = False) -> dict[str, dict[str, float]]:
    """Test-retest of the score of one fixed policy: `repeats` final scores, each the mean of
    `eval.final_evals` evaluations, every evaluation with its own `eval.sample_seed` (0, 1, ...), so
    only the evaluation's dice differ. Returns, per role, the mean and the standard deviation (ddof 1)
    over the repeats of the final score, and the sd of one evaluation (over all repeats x evaluations).
    With greedy decoding every evaluation is the same and both sds are 0."""
    if repeats < 2:
        raise HarnessError(f"--retest needs at least 2 repeats to measure a standard deviation, got {repeats}")
    cfg, _ = eval_config(model, suite, overrides, seed, eval_limit)
    evaluation = ModelEvaluation(cfg, cache_dir, progress)
    evaluation.eval_responses = None
    m = cfg.eval.final_evals
    single: dict[str, list[float]] = {}
    finals: dict[str, list[float]] = {}
    for r in range(repeats):
        window: dict[str, list[float]] = {}
        for i in range(m):
            evaluation.cfg.eval.sample_seed = r * m + i
            for role, value in role_scores(evaluation.evaluate(0)).items():
                window.setdefault(role, []).append(value)
                single.setdefault(role, []).append(value)
        for role, values in window.items():
            finals.setdefault(role, []).append(sum(values) / len(values))
    return {role: {"mean": statistics.fmean(finals[role]), "sd": statistics.stdev(finals[role]),
                   "sd_one_evaluation": statistics.stdev(single[role]), "repeats": repeats, "final_evals": m,
                   "k": cfg.eval.k} for role in finals}


def role_scores(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean primary metric (accuracy or avg@k) over each role's benchmarks: {"ID": .., "OOD": ..}."""
    out: dict[str, list[float]] = {}
    for row in rows:
        if row["metric"] == "accuracy" or row["metric"].startswith("avg@"):
            out.setdefault(row["role"], []).append(row["value"])
    return {role: sum(v) / len(v) for role, v in out.items()}
