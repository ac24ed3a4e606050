"""`harness bench --quick` runs end to end and its last line is `speedup_vs_trl=<ratio>`."""
from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from harness import bench
from tests.conftest import fast_args

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_quick_prints_the_speedup_last(cache_dir):
    args = [sys.executable, "-m", "harness.cli", "bench", "--quick", "--cache-dir", str(cache_dir), "--algos", "ppo", *fast_args()]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
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
    assert any(line.startswith("harness  grpo") and "peak RSS" in line for line in lines)
    assert any(line.startswith("harness  ppo") for line in lines)


def test_without_trl_the_comparison_is_skipped_with_a_message(monkeypatch):
    fake = {"library": "harness", "algo": "grpo", "step_s": 0.1, "cpu_s": 0.1, "tokens_per_s": 10.0, "peak_rss_mib": 1.0, "torch_threads": 1, "cpu_per_wall": 1.0,
            "phases": dict.fromkeys(bench.PHASES, 0.02), "step_s_all": [0.1]}
    monkeypatch.setattr(bench, "trl_available", lambda: False)
    monkeypatch.setattr(bench, "run_worker", lambda spec: {**fake, "algo": spec.get("algo", "grpo")})
    monkeypatch.setattr("harness.models.load_policy", lambda *a, **k: None)
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
    assert (trl.epsilon, trl.epsilon_high, trl.beta) == (o["clip_low"], o["clip_high"], o["kl_coef"])
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
