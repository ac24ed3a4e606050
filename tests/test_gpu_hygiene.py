"""GPU hygiene, checked on the CPU: TF32, the device bound before the process group, --nproc beyond the
visible GPUs refused, sampling noise drawn ahead (no per-token host sync), a one-rank sharded cell."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import distributed, precision, rollout
from harness.config import ModelConfig
from harness.errors import HarnessError
from harness.resolver import build_cells
from harness.models import tiny_llama
from harness.rollout import PerRow, RowsOf, generate, uniform_block
from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]


def test_tf32_is_on_by_default_on_cuda_only():
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        assert precision.tf32("auto", "cpu") is False and torch.get_float32_matmul_precision() == "highest"
        assert precision.tf32("on", "cpu") is False and torch.get_float32_matmul_precision() == "highest"
        assert precision.tf32("auto", "cuda") is True and torch.get_float32_matmul_precision() == "high"
        assert precision.tf32("off", "cuda") is False and torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
    with pytest.raises(HarnessError, match="train.tf32 must be auto, on or off, got 'yes'"):
        build_cells("arith", ["grpo"], "none", [0], Path("unused"), overrides={**FAST, "train.tf32": "yes"})


def test_more_ranks_than_visible_gpus_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(HarnessError, match=r"^train.nproc=2 ranks per node on CUDA need 2 GPUs, but 1 is visible"):
        build_cells("arith", ["grpo"], "none", [0], tmp_path, overrides={**FAST, "train.device": "cuda", "train.nproc": "2"})


def test_the_gpu_is_set_before_the_process_group_with_device_id(monkeypatch):
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw.get("device_id"))))
    distributed.init("cuda", 60)
    assert calls == [("set_device", 1), ("init", "nccl", torch.device("cuda", 1))]


def tiny_model():
    torch.manual_seed(0)
    return tiny_llama(ModelConfig(), 40, 0, 1, 2).eval()


@pytest.mark.parametrize("rows", [None, slice(2, 5), "per-row"])
def test_noise_drawn_ahead_samples_the_same_tokens(monkeypatch, rows):
    """On an accelerator the rollout draws every token's uniforms at once (one copy to the device, the
    end checked every few tokens): the same tokens and log-probs as the per-token draws of the CPU."""
    model, prompts = tiny_model(), [[3, 4, 5], [6, 7], [8, 9, 10, 11], [3, 4, 5], [12]]
    prompts = prompts[rows] if isinstance(rows, slice) else prompts

    def sample():
        gen = torch.Generator().manual_seed(7)
        if rows == "per-row":  # the evaluation's sampler: a generator per problem and sample
            gen = PerRow([torch.Generator().manual_seed(100 + i) for i in range(len(prompts))])
        elif rows is not None:
            gen = RowsOf(gen, 5, rows)
        return generate(model, prompts, max_new_tokens=12, eos_id=2, pad_id=0, temperature=1.0, generator=gen)

    per_token = sample()
    monkeypatch.setattr(rollout, "draws_ahead", lambda device: True)
    ahead = sample()
    width = per_token.responses.shape[1]
    assert torch.equal(ahead.responses[:, :width], per_token.responses)
    assert torch.equal(ahead.logp[:, :width], per_token.logp)
    assert not ahead.response_mask[:, width:].any()  # anything past the end is padding


def test_uniform_block_is_the_per_token_draws():
    block = uniform_block(torch.Generator().manual_seed(3), 4, 6)
    gen = torch.Generator().manual_seed(3)
    assert torch.equal(block, torch.stack([rollout.uniforms(gen, 4) for _ in range(6)]))
    rows = RowsOf(torch.Generator().manual_seed(3), 4, slice(1, 3))
    assert torch.equal(uniform_block(rows, 2, 6), block[:, 1:3]) and rows.draws == 6
    per_row = uniform_block(PerRow([torch.Generator().manual_seed(s) for s in (5, 6)]), 2, 6)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    assert torch.equal(per_row, torch.stack([rollout.uniforms(PerRow(gens), 2) for _ in range(6)]))


@pytest.mark.slow
def test_one_rank_sharded_cell_with_a_reference_trains(cache_dir, tmp_path):
    """FSDP2 with one rank (torchrun, gloo): the reference forward under inference mode used to fail
    ("Inference tensors do not track version counter")."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HARNESS_CACHE": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           "-m", "tests.gpu.check", "precision", "--device", "cpu", "--algos", "grpo,ppo",
                           "--out", str(tmp_path)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    records = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert [r["algo"] for r in records] == ["grpo", "ppo"], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all(r["ok"] and r["sharded"] and r["ranks"] == 1 for r in records), records
