"""`harness eval`: any model alone (a hub id, a local folder, a cell's `model/`), evaluated as
training evaluates it (`harness.evaluation.PolicyEvaluator`), its configuration resolved by
`harness.resolver.eval_config`.

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
import statistics
from pathlib import Path

import torch

from harness import fast_llama, store
from harness.config import RunConfig
from harness.errors import HarnessError
from harness.evaluation import PolicyEvaluator
from harness.metrics import role_scores
from harness.models import check_local_model, load_policy
from harness.resolver import cell_config, eval_config
from harness.rollout import generate
from tasks import SUITES


class ModelEvaluation(PolicyEvaluator):
    """A model alone, loaded as training loads it, evaluated as training evaluates."""

    def __init__(self, cfg: RunConfig, cache_dir: Path | None = None, progress: bool = False):
        torch.set_num_threads(cfg.train.threads)
        device = cfg.train.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        suite_cls = SUITES.get(cfg.suite)
        suite = suite_cls(cfg.suite_options, cfg.seed)
        self.policy, tokenizer = load_policy(cfg.model, suite, cfg.seed, cache_dir, device, progress)
        self.policy.eval()
        fast_llama.enable(self.policy, cfg.train.fast_model)
        super().__init__(cfg, suite, tokenizer, functools.partial(generate, self.policy), suite.eval_benchmarks(),
                         eval_responses=[])


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

        check_request(lm_eval_tasks, data_dir or getattr(cfg.suite_options, "data_dir", "") or None, lm_eval_include)
    name = name if name is not None else (f"{cell['algo']}-model" if cell else "base")
    folder = row_folder(out, cfg, name)
    check_local_model(model, cfg.model.trust_remote_code)  # a damaged model folder: one line, before any load
    evaluation = ModelEvaluation(cfg, cache_dir, progress)
    rows = [{**row, "model": model} for row in evaluation.evaluate(0)]
    lm_rows, lm_results = [], None
    if lm_eval_tasks:
        from harness.lm_eval_tasks import run_lm_eval

        data_dir = data_dir or getattr(cfg.suite_options, "data_dir", "") or None
        lm_rows, lm_results = run_lm_eval(evaluation.policy, evaluation.tokenizer, lm_eval_tasks, data_dir=data_dir,
                                          limit=cfg.eval.limit or None, include=lm_eval_include, seed=cfg.seed,
                                          batch_size=cfg.eval.batch_size, gen_kwargs=lm_eval_gen_kwargs,
                                          max_length=lm_eval_max_length)
    scores = role_scores(rows)
    summary = {f"{role}_accuracy": scores[role] for role in ("ID", "OOD") if role in scores}
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

