"""`harness bench --quick` runs end to end and its last line is `speedup_vs_trl=<ratio>`."""
from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import bench
from harness.errors import HarnessError
from tests.conftest import fast_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_quick_prints_the_speedup_last(cache_dir):
    args = [sys.executable, "-m", "harness.cli", "bench", "--quick", "--cache-dir", str(cache_dir), "--algos", "ppo", *fast_args()]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    key, _, value = lines[-1].partition("=")
    assert key == "speedup_vs_trl"
    ratio = float(value)
    if bench.trl_available():
        assert ratio > 0 and any(line.startswith("trl ") for line in lines)
        paired = next(line for line in lines if line.startswith("paired in one process"))
        assert "(2 pairs," in paired  # --quick: 2 steps x 1 round
        assert f"harness steps {value}x as fast" in paired  # the last line reports the paired ratio
    else:
        assert math.isnan(ratio) and any("TRL comparison skipped" in line for line in lines)
    assert any(line.split()[:2] == ["harness", "grpo"] and "peak RSS" in line for line in lines)
    assert any(line.split()[:2] == ["harness", "ppo"] for line in lines)


FAKE = {"library": "harness", "algo": "grpo", "step_s": 0.1, "cpu_s": 0.1, "tokens_per_s": 10.0, "peak_rss_mib": 1.0,
        "torch_threads": 1, "cpu_per_wall": 1.0, "phases": dict.fromkeys(bench.PHASES, 0.02), "step_s_all": [0.1]}


def test_without_trl_the_comparison_is_skipped_with_a_message(monkeypatch):
    monkeypatch.setattr(bench, "trl_available", lambda: False)
    monkeypatch.setattr(bench, "run_worker", lambda spec: {**FAKE, "algo": spec.get("algo", "grpo")})
    monkeypatch.setattr("harness.models.load_policy", lambda *a, **k: (torch.nn.Linear(2, 2), None))
    lines: list[str] = []
    assert math.isnan(bench.run_bench(1, 0, {}, None, algos=["ppo"], out=lines.append))
    assert any("TRL comparison skipped" in line for line in lines)
    assert lines[-1] == "speedup_vs_trl=nan"


def test_summarise_steps_takes_medians_after_warmup():
    phases = [dict.fromkeys(bench.PHASES, x) for x in (9.0, 1.0, 3.0, 2.0)]
    out = bench.summarise_steps([9.0, 1.0, 3.0, 2.0], phases, [90.0, 10.0, 60.0, 10.0], warmup=1,
                                cpu_seconds=[5.0, 0.5, 1.5, 1.0])
    assert out["step_s"] == 2.0 and out["steps"] == 3 and out["cpu_s"] == 1.0
    assert out["tokens_per_s"] == 10.0  # median of 10/1, 60/3, 10/2 = 10, 20, 5
    assert out["phases"]["update"] == 2.0


def test_trl_config_maps_the_harness_configuration_key_by_key(tmp_path):
    pytest.importorskip("trl")
    from trl import GRPOConfig

    cfg = bench.resolve_config("grpo", {})
    t, o = cfg.train, cfg.algo_options
    trl = GRPOConfig(**bench.trl_grpo_config(cfg, str(tmp_path)), max_steps=4)
    assert trl.num_generations == t.group_size
    assert trl.per_device_train_batch_size * trl.steps_per_generation == t.prompts_per_step * t.group_size
    assert trl.steps_per_generation == t.num_minibatches and trl.num_iterations == t.ppo_epochs == 1
    assert trl.max_completion_length == t.max_new_tokens and trl.learning_rate == t.lr
    assert (trl.epsilon, trl.epsilon_high, trl.beta) == (o.clip_low, o.clip_high, o.kl_coef)
    assert (trl.temperature, trl.top_p, trl.top_k) == (t.temperature, t.top_p, 0)
    assert trl.loss_type == "grpo" and trl.scale_rewards == "group"
    assert trl.gradient_checkpointing is False  # TRL's default is on; the harness's tiny model trains without


def test_paired_ratio_is_trl_median_over_harness_median():
    def side(library, seconds):
        return {"library": library, "algo": "grpo", "step_s_all": seconds, "step_s": sorted(seconds)[len(seconds) // 2],
                "cpu_s": sum(seconds) / len(seconds)}
    harness, trl = side("harness", [0.1, 0.2, 0.1]), side("trl", [0.3, 0.3, 0.9])
    paired = {"harness": harness, "trl": trl, "pair_ratios": [3.0, 1.5, 9.0], "peak_rss_mib": 600.0}
    lines: list[str] = []
    ratio = bench.report_paired(paired, lines.append)
    assert ratio == pytest.approx(0.3 / 0.1)
    assert "3 pairs" in lines[0] and "harness steps 3.00x as fast" in lines[0]
    assert "median 3.00" in lines[0] and "peak RSS of the pair 600 MiB" in lines[0]
    q1, _, q3 = statistics.quantiles([1.5, 3.0, 9.0], n=4)
    assert f"quartiles {q1:.2f}-{q3:.2f}" in lines[0]


def test_trl_config_with_vllm_rollouts_uses_trls_in_process_vllm(tmp_path):
    cfg = bench.resolve_config("grpo", {})
    assert "use_vllm" not in bench.trl_grpo_config(cfg, str(tmp_path))  # HF generate unless asked
    cfg.train.rollout = "vllm"  # set after resolving: resolving it checks that vLLM is installed
    mapped = bench.trl_grpo_config(cfg, str(tmp_path))
    assert mapped["use_vllm"] is True and mapped["vllm_mode"] == "colocate"
    assert mapped["vllm_importance_sampling_correction"] is False  # the harness corrects nothing either
    assert mapped["model_init_kwargs"] == {"dtype": cfg.model.dtype, "trust_remote_code": False}  # passed explicitly


def test_vllm_rows_run_after_the_hf_rows_and_a_row_that_fails_says_why(monkeypatch):
    specs: list[dict] = []

    def fake_worker(spec):
        specs.append(spec)
        rollout = spec["overrides"].get("train.rollout", "hf")
        if spec["library"] == "paired":
            return {"library": "paired", "harness": FAKE, "trl": {**FAKE, "step_s": 0.3}, "pair_ratios": [3.0],
                    "peak_rss_mib": 2.0}
        if spec["library"] == "trl" and rollout == "vllm":
            raise bench.WorkerFailed("benchmark worker trl+vllm/grpo failed: RuntimeError: no GPU", "RuntimeError: no GPU")
        step = 0.05 if rollout == "vllm" else (0.3 if spec["library"] == "trl" else 0.1)
        return {**FAKE, "library": spec["library"], "rollout": rollout, "step_s": step, "setup_s": 12.5}

    monkeypatch.setattr(bench, "trl_available", lambda: True)
    monkeypatch.setattr(bench, "run_worker", fake_worker)
    monkeypatch.setattr("harness.vllm_rollout.check_available", lambda: None)
    monkeypatch.setattr("harness.models.load_policy", lambda *a, **k: (torch.nn.Linear(2, 2), None))
    lines: list[str] = []
    speedup = bench.run_bench(2, 1, {}, None, algos=[], out=lines.append, rounds=2, rollout="vllm")
    assert speedup == pytest.approx(3.0)  # the headline stays the paired HF ratio
    vllm_specs = [s for s in specs if s["overrides"].get("train.rollout") == "vllm"]
    assert [s["library"] for s in vllm_specs] == ["harness", "trl"] and all(s["steps"] == 4 for s in vllm_specs)
    assert all(s["overrides"].get("train.rollout", "hf") == "hf" for s in specs if s not in vllm_specs)
    row = next(line for line in lines if line.startswith("harness+vllm"))
    assert "50.0 ms/step" in row and "setup 12.5 s" in row
    failed = next(line for line in lines if line.startswith("trl+vllm"))
    assert failed.split() == ["trl+vllm", "grpo", "failed:", "RuntimeError:", "no", "GPU"]
    assert any("harness (HF generate) 0.1000, ratio 2.00" in line for line in lines)
    assert lines[-1] == "speedup_vs_trl=3.00"


def test_bench_rejects_an_unknown_rollout():
    with pytest.raises(HarnessError, match="--rollout must be one of hf, vllm"):
        bench.run_bench(1, 0, {}, None, rollout="sglang", out=lambda line: None)


def test_real_model_bench_defaults_sit_under_the_users_set():
    cfg = bench.resolve_config("grpo", {"train.max_new_tokens": "8"}, "smollm2")
    t = cfg.train
    assert (t.prompts_per_step, t.group_size, t.num_minibatches, t.max_new_tokens) == (4, 4, 2, 8)
    assert t.gradient_checkpointing is False and cfg.model.name == "smollm2"
    from harness.resolver import build_cells

    tiny = bench.resolve_config("grpo", {})  # the tiny model's bench is the grid's own default cell
    assert tiny.train == build_cells("arith", ["grpo"], "none", [0], Path("unused"))[0].cfg.train


@pytest.mark.slow
def test_bench_runs_smollm2_and_skips_the_algorithm_table(cache_dir):
    args = [sys.executable, "-m", "harness.cli", "bench", "--model", "smollm2", "--quick", "--no-trl",
            "--cache-dir", str(cache_dir), "--set", "train.prompts_per_step=2", "--set", "train.group_size=2",
            "--set", "train.max_new_tokens=4", "--set", f"train.threads={torch.get_num_threads()}"]  # as tests/test_smollm2.py
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert "smollm2 (134.5M parameters, hidden 576, 30 layers, float32), 2 prompts x 2 samples" in lines[0]
    row = next(line for line in lines if line.split()[:2] == ["harness", "grpo"])
    assert "setup" in row and "tok/s" in row
    assert any("algorithms: skipped on smollm2" in line for line in lines)
    assert lines[-1] == "speedup_vs_trl=nan"


def test_population_ceiling_divides_k_single_steps_by_one_step_on_k_times_the_rows():
    from tests.bench import population_ceiling as pc

    # K = 4: a step of 0.1 s alone, 0.25 s on 4x the rows -> 4 x 0.1 / 0.25 = 1.6; a cell of 200 steps
    # and 1.5 s fixed: 4 x (1.5 + 20) / (1.5 + 50) = 86 / 51.5
    step, cell = pc.ceiling(0.1, 0.25, 4, 1.5)
    assert step == pytest.approx(1.6) and cell == pytest.approx(86 / 51.5)
    assert pc.ceiling(0.1, 0.1, 1, 1.5) == pytest.approx((1.0, 1.0))
    # two algorithms, K = 2: apart 2 x (1 + 200 x 0.1) + 2 x (1 + 200 x 0.3) = 42 + 122 = 164; in populations
    # (1 + 200 x 0.1) + (1 + 200 x 0.5) = 21 + 101 = 122: the slow algorithm's weak batching dominates
    assert pc.mix_ceiling([0.1, 0.3], [0.1, 0.5], 2, 1.0) == pytest.approx(164 / 122)
    assert pc.parse_ks("8, 4") == [1, 4, 8]  # K = 1 is always measured: every ratio divides by it
    for bad in ("0,4", "four", ""):
        with pytest.raises(SystemExit, match="--k"):
            pc.parse_ks(bad)
