"""The trained policy kept (`--save-model`) and `harness eval` on any model: the saved folder loads
with `AutoModelForCausalLM.from_pretrained` and reproduces the trainer's last evaluation, response
by response; lm-eval runs on the same loaded model with task files that read local data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.model_eval import ModelEvaluation
from harness.resolver import eval_config
from harness.export import save_model
from harness.resolver import build_cells
from harness.trainer import Trainer
from tests.conftest import FAST, fast_args

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROW_KEYS = ("step", "benchmark", "role", "metric", "value", "n_problems", "grader", "prompt_template", "seed",
            "temperature", "top_p", "k", "max_new_tokens", "greedy")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """A PPO cell trained for 3 steps in this process, its model saved with the critic, and the
    responses of its last evaluation."""
    out = tmp_path_factory.mktemp("runs")
    cell = build_cells("arith", ["ppo"], "flip0.2", [0], out, steps=3, overrides=dict(FAST))[0]
    cell.path.mkdir(parents=True)
    (cell.path / "config.json").write_text(json.dumps(cell.cfg.to_dict()))
    trainer = Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=False)
    trainer.eval_responses = []
    trainer.run()
    save_model(trainer, cell.path / "model", with_critic=True)
    last = [r for r in trainer.eval_responses if r["step"] == 3]
    return cell, trainer, last


def test_saved_model_loads_with_from_pretrained_and_gives_the_last_evaluations_responses(trained, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cell, trainer, last = trained
    folder = cell.path / "model"
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for name, tensor in trainer.policy.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert tokenizer("12+3=")["input_ids"] == trainer.tokenizer("12+3=")["input_ids"]

    cfg, _ = eval_config(str(folder), None, {})
    evaluation = ModelEvaluation(cfg, cache_dir)
    rows = evaluation.evaluate(3)
    assert len(last) == sum(r["n_problems"] for r in rows) > 0
    assert [(r["problem"], r["response"], r["score"]) for r in evaluation.eval_responses] == \
        [(r["problem"], r["response"], r["score"]) for r in last]
    assert not all(r["response"] == last[0]["response"] for r in last)  # real, varied outputs


def test_critic_and_heads_are_saved_beside_the_policy(trained):
    from safetensors.torch import load_file

    cell, trainer, _ = trained
    critic_dir = cell.path / "model" / "critic"
    info = json.loads((critic_dir / "critic.json").read_text())
    assert info["kind"] == "scalar" and info["backbone"] == "separate" and info["algo"] == "ppo"
    saved = load_file(critic_dir / "critic.safetensors")
    state = trainer.critic.state_dict()
    assert set(saved) <= set(state) and len(saved) > 0
    for name, tensor in saved.items():
        assert torch.equal(tensor, state[name]), name
    assert not (cell.path / "model" / "heads").exists()  # PPO has no extra heads


def test_harness_eval_of_a_cells_model_writes_the_cells_last_eval_rows(trained, tmp_path, capsys):
    cell, _, _ = trained
    out = tmp_path / "evals"
    assert main(["eval", "--model", str(cell.path / "model"), "--out", str(out)]) == 0
    folder = out / "arith" / "ppo-model" / "flip0.2" / "seed0"
    assert f"wrote {folder}" in capsys.readouterr().out
    rows = [json.loads(line) for line in (folder / "eval.jsonl").read_text().splitlines()]
    cell_rows = [json.loads(line) for line in (cell.path / "eval.jsonl").read_text().splitlines()]
    last = [r for r in cell_rows if r["step"] == 3]
    assert [{k: r[k] for k in ROW_KEYS if k != "step"} for r in rows] == [{k: r[k] for k in ROW_KEYS if k != "step"} for r in last]
    assert all(r["model"] == str(cell.path / "model") for r in rows)
    assert json.loads((folder / "status.json").read_text())["state"] == "done"

    # The report reads it as a row of its own.
    assert main(["report", "--runs", str(out), "--format", "md"]) == 0
    assert "| ppo-model | flip0.2 | 1 |" in (out / "report" / "report.md").read_text()


def test_harness_eval_of_a_base_model_uses_the_suites_protocol(tmp_path, cache_dir):
    out = tmp_path / "evals"
    keys = {k: FAST[k] for k in ("model.warmstart_steps", "suite.n_eval", "suite.n_train")}  # the cached warm start
    keys["train.max_new_tokens"] = "5"
    assert main(["eval", "--model", "tiny", "--out", str(out), "--cache-dir", str(cache_dir), "--eval-limit", "8",
                 *[arg for k, v in keys.items() for arg in ("--set", f"{k}={v}")]]) == 0
    rows = [json.loads(line) for line in (out / "arith/base/none/seed0/eval.jsonl").read_text().splitlines()]
    assert [(r["benchmark"], r["role"], r["n_problems"], r["max_new_tokens"], r["greedy"]) for r in rows] == \
        [("arith_id", "ID", 8, 5, True), ("arith_ood", "OOD", 8, 5, True)]
    responses = [json.loads(line) for line in (out / "arith/base/none/seed0/eval_responses.jsonl").read_text().splitlines()]
    assert len(responses) == 16
    assert rows[0]["value"] == sum(r["score"] for r in responses if r["role"] == "ID") / 8


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny", "--set", "ppo.kl_coef=1"], "harness eval takes model.*, train.*, eval.* and suite.* keys"),
    (["--model", "tiny", "--suite", "nope"], "unknown suite 'nope'"),
    (["--model", "tiny", "--name", "a/b"], "--name must be a non-empty name without '/'"),
    (["--model", "tiny", "--lm-eval", "harness_gsm8k", "--lm-eval-include", "/does/not/exist"], "is not a folder"),
])
def test_bad_eval_input_is_one_line_and_writes_nothing(args, message, tmp_path, capsys, monkeypatch, cache_dir):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", *args, "--cache-dir", str(cache_dir), "--eval-limit", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("harness: error: ") and message in err
    assert list(tmp_path.iterdir()) == []


def test_lm_eval_runs_on_the_loaded_model_with_local_gsm8k(trained, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="needs the [lm-eval] extra")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cell, _, _ = trained
    out = tmp_path / "evals"
    assert main(["eval", "--model", str(cell.path / "model"), "--out", str(out), "--eval-limit", "2",
                 "--lm-eval", "harness_gsm8k", "--data-dir", str(SHARED_DATA),
                 "--lm-eval-gen-kwargs", "max_gen_toks=4"]) == 0
    folder = out / "arith" / "ppo-model" / "flip0.2" / "seed0"
    rows = [json.loads(line) for line in (folder / "lm_eval.jsonl").read_text().splitlines()]
    assert sorted(r["metric"] for r in rows) == ["exact_match,flexible-extract", "exact_match,strict-match",
                                                 "grader_agreement,flexible-extract", "grader_agreement,strict-match"]
    assert all(r["task"] == "harness_gsm8k" and r["n_samples"] == 2 and 0 <= r["value"] <= 1 for r in rows)
    for row in (r for r in rows if r["metric"].startswith("grader_agreement")):
        counts = [row[k] for k in ("both_correct", "both_wrong", "harness_only", "lm_eval_only")]
        assert sum(counts) == 2 and row["value"] == (counts[0] + counts[1]) / 2
    results = json.loads((folder / "lm_eval_results.json").read_text())
    gold = [json.loads(line) for line in (SHARED_DATA / "math" / "gsm8k_test.jsonl").read_text().splitlines()[:2]]
    samples = results["samples"]["harness_gsm8k"]
    assert {s["doc"]["question"] for s in samples} == {g["question"] for g in gold}  # one sample per doc and filter
    assert results["configs"]["harness_gsm8k"]["num_fewshot"] == 5  # lm-eval's own gsm8k protocol
    # Our rows are there too, beside lm-eval's.
    assert (folder / "eval.jsonl").read_text().count("\n") == 2


def test_lm_eval_tasks_need_a_data_dir(trained, tmp_path, capsys, monkeypatch):
    pytest.importorskip("lm_eval", reason="needs the [lm-eval] extra")
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    cell, _, _ = trained
    assert main(["eval", "--model", str(cell.path / "model"), "--out", str(tmp_path / "e"), "--eval-limit", "1",
                 "--lm-eval", "harness_gsm8k"]) == 2
    assert "give --data-dir" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_save_model_default_is_none_for_the_tiny_model(tmp_path, cache_dir):
    out = tmp_path / "runs"
    assert main(["run", "--algos", "grpo", "--noise", "none", "--seeds", "1", "--steps", "1", "--out", str(out),
                 "--cache-dir", str(cache_dir), "--quiet", *fast_args()]) == 0
    assert not (out / "arith/grpo/none/seed0/model").exists()
    assert main(["run", "--algos", "flowrl", "--noise", "none", "--seeds", "1", "--steps", "1", "--out", str(out),
                 "--cache-dir", str(cache_dir), "--quiet", "--save-model", "final+critic", *fast_args()]) == 0
    model = out / "arith/flowrl/none/seed0/model"
    assert (model / "model.safetensors").exists() and (model / "heads" / "heads.safetensors").exists()
    assert not (model / "critic").exists()  # FlowRL has no critic
    assert not list(model.parent.glob(".model.*"))  # no temporary folder left


def test_grader_agreement_counts_and_kappa_by_hand():
    from harness.lm_eval_tasks import grader_agreement

    docs = [json.loads(line) for line in (SHARED_DATA / "math" / "gsm8k_test.jsonl").read_text().splitlines()[:4]]
    golds = [d["answer"].split("####")[-1].strip() for d in docs]
    # Ours right on docs 0 and 1 (the gold answer), wrong on 2 and 3; lm-eval says right on 0 and 2.
    responses = [f"The answer is {golds[0]}.", f"The answer is {golds[1]}.", "The answer is -12345.", "no idea"]
    lm_eval = [1.0, 0.0, 1.0, 0.0]
    samples = [{"doc": d, "resps": [[r]], "exact_match": e, "filter": "strict-match"}
               for d, r, e in zip(docs, responses, lm_eval)]
    samples += [{"doc": docs[0], "resps": [[responses[0]]], "exact_match": 1.0, "filter": "flexible-extract"}]
    rows = {r["filter"]: r for r in grader_agreement("harness_gsm8k", samples, "gsm8k")}
    strict = rows["strict-match"]
    assert (strict["both_correct"], strict["both_wrong"], strict["harness_only"], strict["lm_eval_only"]) == (1, 1, 1, 1)
    # Agreement 2/4; both graders say "right" half the time, so chance agreement is 1/2 and kappa 0.
    assert strict["value"] == 0.5 and strict["kappa"] == pytest.approx(0.0) and strict["n_samples"] == 4
    # One sample, both right: agreement 1, chance agreement 1, kappa undefined (None, a dash in tables).
    assert rows["flexible-extract"]["value"] == 1.0 and rows["flexible-extract"]["kappa"] is None
