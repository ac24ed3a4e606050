"""lm-evaluation-harness on the model `harness eval` has loaded: `harness eval --lm-eval TASKS`.

The model is handed to lm-eval's Hugging Face wrapper (`HFLM(pretrained=<the loaded model>,
tokenizer=...)`) and evaluated with `lm_eval.simple_evaluate`, so lm-eval's own prompts, filters
and metrics apply. Tasks are lm-eval's (any name its task index knows; stock tasks load their data
from the hub), a folder of your own task YAML files (`--lm-eval-include DIR`), or the ones shipped
here, which read local files and never the hub:

    harness_gsm8k   lm-eval's own `gsm8k` task (5-shot, strict-match and flexible-extract
                    exact match) with its data from `<data dir>/math/gsm8k_{train,test}.jsonl`
                    (`--data-dir`, `$HARNESS_DATA_DIR`), read by lm-eval's json dataset support

Each (task, metric, filter) becomes a row of `lm_eval.jsonl`; lm-eval's whole results dict, with
its per-sample logs (each generation, its filtered answer and score), is kept in `lm_eval_results.json`.
Where a task has the data of a harness benchmark (GSM8K), the harness grader also grades each of
lm-eval's generations, and a `grader_agreement,<filter>` row per filter says how often the two
graders agree (with Cohen's kappa and the four counts).
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

# name -> (lm-eval's task file it includes, split -> local file)
SHIPPED = {"harness_gsm8k": ("gsm8k/gsm8k.yaml", {"train": "math/gsm8k_train.jsonl", "test": "math/gsm8k_test.jsonl"})}
# lm-eval task -> the harness benchmark of the same data, whose grader also grades lm-eval's generations
SAME_BENCHMARK = {"harness_gsm8k": "gsm8k", "gsm8k": "gsm8k"}


def check_available() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise HarnessError("--lm-eval needs lm-eval: pip install 'noise-robust-rl-harness[lm-eval]'")


def check_request(tasks: list[str], data_dir: str | None, include: str | None) -> None:
    """What can be checked before a model is loaded: lm-eval installed, the include folder, the
    shipped tasks' local files."""
    check_available()
    if include is not None and not Path(include).is_dir():
        raise HarnessError(f"--lm-eval-include {include!r} is not a folder")
    for name in tasks:
        if name in SHIPPED:
            local_files(name, data_dir)


def local_files(name: str, data_dir: str | None) -> dict[str, Path]:
    """split -> local file of a shipped task; an error naming the missing file."""
    root = data_root(data_dir)
    paths = {split: root / rel for split, rel in SHIPPED[name][1].items()}
    for path in paths.values():
        if not path.is_file():
            raise HarnessError(f"lm-eval task {name} needs {str(path)!r} (give --data-dir a folder laid out like shared/data)")
    return paths


def data_root(data_dir: str | None) -> Path:
    root = data_dir or os.environ.get("HARNESS_DATA_DIR")
    if not root:
        raise HarnessError("the harness_* lm-eval tasks read local files: give --data-dir (a folder laid out like "
                           "shared/data) or set $HARNESS_DATA_DIR")
    return Path(root).resolve()


def write_shipped_tasks(folder: Path, names: list[str], data_dir: str | None) -> None:
    """YAML files for the shipped tasks among `names`: lm-eval's own task file, included, with the
    dataset pointed at local JSONL files."""
    import lm_eval

    stock = Path(lm_eval.__file__).parent / "tasks"
    for name in names:
        if name not in SHIPPED:
            continue
        paths = local_files(name, data_dir)
        spec = {"include": str(stock / SHIPPED[name][0]), "task": name, "tag": [], "dataset_path": "json", "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: str(p) for split, p in paths.items()}}}
        (folder / f"{name}.yaml").write_text(json.dumps(spec, indent=2) + "\n")  # JSON is YAML


def run_lm_eval(model, tokenizer, tasks: list[str], data_dir: str | None = None, limit: int | None = None,
                include: str | None = None, seed: int = 0, batch_size: int = 16,
                gen_kwargs: str | None = None, max_length: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """Run lm-eval `tasks` on the loaded `model`; returns (rows, lm-eval's results as JSON text).
    `gen_kwargs` ("max_gen_toks=32,...", lm-eval's syntax) and `max_length` (the context lm-eval
    allows, default the model's) go to lm-eval as they are."""
    check_request(tasks, data_dir, include)
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="harness-lm-eval-") as tmp:
        write_shipped_tasks(Path(tmp), tasks, data_dir)
        manager = TaskManager(include_path=[tmp, *([include] if include else [])])
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise HarnessError(f"unknown lm-eval task(s) {', '.join(unknown)} (shipped offline: {', '.join(SHIPPED)}; "
                               "any lm-eval task name, or your own YAML with --lm-eval-include)")
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=min(batch_size, 64), max_length=max_length,
                  device=str(next(model.parameters()).device))
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=True,
                                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                              fewshot_random_seed=seed, gen_kwargs=gen_kwargs, bootstrap_iters=0)
        except AssertionError as exc:  # lm-eval checks its settings with asserts, e.g. a context too short
            raise HarnessError(f"lm-eval: {str(exc).splitlines()[0] if str(exc) else 'assertion failed'}") from None
    rows = []
    for task, metrics in results["results"].items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # "exact_match,strict-match"; alias, sample_len: not metrics
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"task": task, "metric": key, "filter": filt, "value": float(value), "n_samples": n,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None, "source": "lm-eval",
                         "lm_eval_version": lm_eval.__version__})
    for task, samples in results.get("samples", {}).items():
        if task in SAME_BENCHMARK:
            rows += grader_agreement(task, samples, SAME_BENCHMARK[task])
    return rows, json.dumps(results, indent=2, sort_keys=True, default=str) + "\n"


def grader_agreement(task: str, samples: list[dict[str, Any]], benchmark: str) -> list[dict[str, Any]]:
    """Per lm-eval filter: how often the harness grader of `benchmark` (on the raw generation) and
    lm-eval's metric (on its filtered answer) give the same verdict on lm-eval's own generations.
    One row per filter: agreement, Cohen's kappa and the four counts."""
    from tasks.data import BENCHMARKS, GRADERS

    spec = BENCHMARKS.get(benchmark)
    grader = GRADERS.get(spec.grader)
    by_filter: dict[str, list[tuple[int, int]]] = {}
    for sample in samples:
        problem = spec.to_problems([sample["doc"]], spec, 0)[0]
        ours = int(grader.grade(sample["resps"][0][0], problem) >= 1.0)
        theirs = int(float(sample["exact_match"]) >= 1.0)
        by_filter.setdefault(sample["filter"], []).append((ours, theirs))
    rows = []
    for filt, pairs in sorted(by_filter.items()):
        n = len(pairs)
        counts = {"both_correct": sum(a and b for a, b in pairs), "both_wrong": sum(not a and not b for a, b in pairs),
                  "harness_only": sum(a and not b for a, b in pairs), "lm_eval_only": sum(b and not a for a, b in pairs)}
        observed = (counts["both_correct"] + counts["both_wrong"]) / n
        p_ours, p_theirs = sum(a for a, _ in pairs) / n, sum(b for _, b in pairs) / n
        chance = p_ours * p_theirs + (1 - p_ours) * (1 - p_theirs)
        kappa = (observed - chance) / (1 - chance) if chance < 1 else None
        rows.append({"task": task, "metric": f"grader_agreement,{filt}", "filter": filt, "value": observed,
                     "n_samples": n, "kappa": kappa, "harness_grader": grader.name, "benchmark": benchmark,
                     "source": "harness", **counts})
    return rows
