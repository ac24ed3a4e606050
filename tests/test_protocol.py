"""The cross-domain protocol through the CLI: suites built from benchmarks, data sources (data
folder, per-benchmark file, hub id as a local dataset folder), errors before any output, and
evaluation records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from algorithms import ALGOS
from harness.cli import main
from tasks import SUITES
from tasks.data import BENCHMARKS, DataSources

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# A real suite on the tiny model, as small as a unit test allows: the point is the plumbing.
TINY_REAL = ["--set", "model.warmstart_steps=2", "--set", "suite.n_train=8", "--set", "train.prompts_per_step=2",
             "--set", "train.group_size=2", "--set", "train.max_new_tokens=8", "--steps", "1", "--eval-limit", "3",
             "--seeds", "1", "--quiet", "--workers", "1"]


@pytest.fixture
def offline(monkeypatch):
    """No hub: the tests must not depend on (or wait for) the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)


def test_suites_registered_with_the_papers_protocol():
    math_opts, science_opts = SUITES.get("math").Options(), SUITES.get("science").Options()
    assert math_opts.id == ("math500", "aime24", "amc23", "minerva")
    assert math_opts.ood == ("gpqa", "hle", "simpleqa")
    assert (science_opts.id, science_opts.ood) == (math_opts.ood, math_opts.id)
    dialogue = SUITES.get("dialogue").Options(heldout="life_services")
    assert dialogue.ood == ("sgd_life_services",)
    assert dialogue.train == ("sgd_transportation_travel_train", "sgd_financial_services_train")


def test_math_suite_end_to_end_on_the_tiny_model(tmp_path, cache_dir, offline):
    out = tmp_path / "runs"
    args = ["run", "--suite", "math", "--algos", "grpo", "--noise", "flip0.2", "--data-dir", str(SHARED_DATA),
            "--ood", "simpleqa", "--out", str(out), "--cache-dir", str(cache_dir), *TINY_REAL]
    assert main(args) == 0
    cell = out / "math" / "grpo" / "flip0.2" / "seed0"
    config = json.loads((cell / "config.json").read_text())
    assert config["suite_options"]["ood"] == ["simpleqa"]
    assert config["train"]["max_new_tokens"] == 8  # the user's --set beats the suite's run default
    rows = [json.loads(line) for line in (cell / "eval.jsonl").read_text().splitlines()]
    final = {r["benchmark"]: r for r in rows if r["step"] == 1}
    assert set(final) == {"math500", "aime24", "amc23", "minerva", "simpleqa"}
    assert {final[b]["role"] for b in ("math500", "aime24", "amc23", "minerva")} == {"ID"}
    assert final["simpleqa"]["role"] == "OOD"
    assert final["math500"]["grader"] == "math_verify-v1"
    assert final["math500"]["prompt_template"] == "math-boxed-v1/raw"  # the byte tokenizer has no chat template
    assert final["simpleqa"]["grader"] == "normalized_match-v1"
    assert all(r["n_problems"] == 3 and r["seed"] == 0 and r["greedy"] for r in rows)
    assert all(r["ceiling"] == 1.0 for r in rows)  # every problem can be solved


def test_run_defaults_of_a_suite_apply_when_the_user_sets_nothing(tmp_path, offline):
    from harness.resolver import build_cells

    cells = build_cells(suite="math", algos=["grpo"], noise="none", seeds=[0], out=tmp_path,
                        overrides={"suite.data_dir": str(SHARED_DATA), "suite.ood": ""})
    assert cells[0].cfg.train.max_new_tokens == int(SUITES.get("math").run_defaults["train.max_new_tokens"])
    assert cells[0].cfg.suite_options.ood == ()


def test_missing_benchmark_data_fails_before_any_output(tmp_path, offline, capsys):
    out = tmp_path / "runs"
    code = main(["run", "--suite", "math", "--algos", "grpo", "--data-dir", str(SHARED_DATA), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "benchmark gpqa (OOD) cannot be loaded" in err
    assert "--ood hle,simpleqa" in err and "--data-dir" in err
    assert not out.exists()


def test_no_data_folder_and_no_hub_is_one_clear_error(tmp_path, offline, capsys):
    code = main(["run", "--suite", "dialogue", "--algos", "grpo", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "no data folder given and the Hugging Face hub" in err and "--data-dir DIR" in err


@pytest.mark.parametrize("args, message", [
    (["--id", "math500,nope"], "unknown benchmark 'nope' (valid:"),
    (["--id", "math500", "--ood", "math500"], "both ID and OOD"),
    (["--data-dir", "/does/not/exist"], "data folder '/does/not/exist' does not exist"),
    (["--set", "suite.paths=math500"], "suite.paths entries look like NAME=VALUE"),
    (["--set", "suite.paths=math500=/no/such.jsonl", "--ood", ""], "suite.paths file '/no/such.jsonl' does not exist"),
    (["--set", "suite.heldout=space"], "suite.heldout must be one of"),
])
def test_bad_suite_input(tmp_path, offline, capsys, args, message):
    suite = "dialogue" if "suite.heldout=space" in args else "math"
    data = [] if "--data-dir" in args else ["--data-dir", str(SHARED_DATA)]
    code = main(["run", "--suite", suite, "--algos", "grpo", "--out", str(tmp_path / "r"), *data, *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "r").exists()


def test_per_benchmark_file_and_hub_path(tmp_path, offline):
    """`suite.paths` reads one file; `suite.hub` goes through `datasets.load_dataset`, here with a
    local dataset folder standing in for a hub id (the same code path users take online)."""
    rows = [json.loads(line) for line in (SHARED_DATA / "math" / "aime24.jsonl").read_text().splitlines()[:5]]
    single = tmp_path / "aime_subset.jsonl"
    single.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hub_folder = tmp_path / "hub-aime"
    hub_folder.mkdir()
    (hub_folder / "test.jsonl").write_text(single.read_text())

    spec = BENCHMARKS.get("aime24")
    from_file = DataSources.from_options("", (f"aime24={single}",), ()).problems(spec)
    from_hub = DataSources.from_options("", (), (f"aime24={hub_folder}",)).problems(spec)
    assert [p.answer for p in from_file] == [str(r["answer"]) for r in rows]
    assert [(p.id, p.prompt, p.answer) for p in from_hub] == [(p.id, p.prompt, p.answer) for p in from_file]
    assert DataSources.from_options("", (), (f"aime24={hub_folder}",)).describe(spec) == f"hub:{hub_folder}"


def test_hub_id_that_cannot_load_names_the_local_file_option(tmp_path, offline):
    from harness.errors import HarnessError

    sources = DataSources.from_options("", (), (f"aime24={tmp_path / 'empty-folder'}",))
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(HarnessError, match="suite.paths=aime24=FILE"):
        sources.problems(BENCHMARKS.get("aime24"))


def test_a_real_model_trains_on_every_core_unless_told(tmp_path, offline):
    import os

    from harness.resolver import build_cells

    def threads(model, overrides=None):
        return build_cells(suite="arith", algos=["grpo"], noise="none", seeds=[0], out=tmp_path, model=model,
                           overrides=overrides)[0].cfg.train.threads

    assert threads(None) == 1 and threads("tiny") == 1
    assert threads("smollm2") == (os.cpu_count() or 1)
    assert threads("smollm2", {"train.threads": "1"}) == 1


def test_gradient_checkpointing_is_exact(tmp_path, cache_dir):
    """Checkpointed and plain forwards/backwards give the same log-probs and gradients."""
    import torch

    from harness.config import RunConfig
    from harness.rollout import forward_response
    from harness.trainer import Trainer

    grads = []
    for checkpointing in (False, True):
        cfg = RunConfig(suite="arith", algo="grpo", noise="none", seed=0, algo_options=ALGOS.get("grpo").Options(),
                        suite_options=SUITES.get("arith").Options(n_train=50, n_eval=8))
        cfg.model.warmstart_steps = 2
        cfg.train.gradient_checkpointing = checkpointing
        trainer = Trainer(cfg, tmp_path / str(checkpointing), cache_dir=cache_dir, progress=False)
        assert getattr(trainer.policy, "is_activation_checkpointing", None) in (checkpointing, None)
        assert trainer.policy.model.gradient_checkpointing == checkpointing
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        logp, _, _ = forward_response(trainer.policy, ids, torch.ones_like(ids), 3)
        logp.sum().backward()
        grads.append((logp.detach(), [p.grad.clone() for p in trainer.policy.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))
