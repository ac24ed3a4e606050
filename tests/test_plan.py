"""`harness plan`: byte counts by hand for a small config, exactly the real modules' sizes for every
mission algorithm, FSDP sharding over N ranks, the fits / does-not-fit verdict, bad input."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from harness.cli import main, plan_configs
from harness.resolver import MISSION_ALGOS
from harness.plan import GiB, module_bytes, plan_cell, shard_bytes
from harness.plan_measure import trainer_bytes
from algorithms import ALGOS
from tests.conftest import FAST

SMALL = {"model.hidden_size": "32", "model.intermediate_size": "48", "model.num_layers": "3", "model.num_heads": "4"}


def configs(algos: str, nproc: int = 1, model: str = "tiny", sets: dict[str, str] | None = None, nnodes: int = 1):
    args = SimpleNamespace(model=model, algos=algos, nproc=nproc, nnodes=nnodes, suite=None, rollout=None,
                           set=[f"{k}={v}" for k, v in (sets or {}).items()])
    return plan_configs(args)


def algorithm(cfg):
    return ALGOS.get(cfg.algo)(cfg.algo_options)


def tiny_param_count(h: int, inter: int, layers: int, vocab: int) -> tuple[int, int]:
    """(numel, tensors) of the tied tiny Llama by hand: embeddings; per layer q, k, v, o (h x h each,
    as many kv heads as heads), gate, up, down (h x I), two RMSNorm weights; the final norm."""
    per_layer = 4 * h * h + 3 * h * inter + 2 * h
    return vocab * h + layers * per_layer + h, 1 + layers * 9 + 1


def test_grpo_bytes_by_hand_for_a_small_config():
    (cfg,) = configs("grpo", sets=SMALL)
    numel, tensors = tiny_param_count(32, 48, 3, 259)  # the byte tokenizer: 256 bytes + 3 specials
    m = module_bytes(cfg, algorithm(cfg))
    assert m["policy"] == 4 * numel  # float32
    assert m["actor_grads"] == 4 * numel
    assert m["actor_adam"] == 2 * 4 * numel + 4 * tensors  # exp_avg, exp_avg_sq, a float32 step per tensor
    assert m["reference"] == 4 * numel
    assert m["critic"] == 0


def test_bfloat16_halves_the_frozen_copies_but_trained_masters_stay_float32():
    (f32,) = configs("flowrl", sets=SMALL)
    (b16,) = configs("flowrl", sets={**SMALL, "model.dtype": "bfloat16"})
    a, b = module_bytes(f32, algorithm(f32)), module_bytes(b16, algorithm(b16))
    assert b["policy"] == a["policy"] and b["actor_adam"] == a["actor_adam"]  # float32 masters (harness.precision)
    assert b["reference"] * 2 == a["reference"] > 0 and b["replica"] * 2 == a["replica"]
    assert a["heads"] == b["heads"] > 0
    (low,) = configs("flowrl", sets={**SMALL, "model.dtype": "bfloat16", "train.master_dtype": "model"})
    assert module_bytes(low, algorithm(low))["policy"] * 2 == a["policy"]  # asked for: no master copy


def test_sharded_start_up_and_replica_refresh():
    """With N > 1 the modules are built on the meta device, sharded, and filled from rank 0 one tensor
    at a time: the device's start-up holds the shards, the replica (model.dtype) and one full float32
    tensor; the replica refresh gathers one float32 tensor at a time (the largest: Qwen3-8B's embedding
    or output layer). Rank 0 holds the float32 weights once in host memory (counted on a CPU cell)."""
    sets = {"model.dtype": "bfloat16", "train.mixed_precision": "bf16"}
    (cfg,) = configs("ppo", 8, "Qwen/Qwen3-8B", sets=sets)
    plan = plan_cell(cfg, 768, 80 * GiB)
    largest = 151936 * 4096 * 4
    assert plan.rollout["replica refresh"] == largest
    assert plan.persistent["rollout replica"] == 2 * 8_190_735_360  # every Qwen3-8B parameter in bf16
    assert plan.startup == {"one tensor broadcast": largest, "modules sharded, and the replica": sum(
        plan.persistent[k] for k in ("parameters", "reference", "critic", "rollout replica"))}
    assert f"start-up: rank 0 reads the weights once, {4 * 8_190_735_360 / GiB:.2f} GiB in host memory" in plan.notes
    assert plan.host_weights == 4 * 8_190_735_360


@pytest.mark.parametrize("algo", MISSION_ALGOS)
def test_bytes_equal_the_real_modules(algo, tmp_path, cache_dir):
    """Parameters, gradients, Adam states, reference and critic of a real trainer after one step."""
    from harness.trainer import Trainer

    (cfg,) = configs(algo, sets=FAST)
    plan = plan_cell(cfg, prompt_len=16, device_bytes=80 * GiB)
    trainer = Trainer(cfg, tmp_path, cache_dir=cache_dir, progress=False)
    trainer.train_step(1)
    real = trainer_bytes(trainer)
    assert real["gradients"] > 0
    assert {k: plan.persistent[k] for k in real} == real
    assert set(plan.persistent) == set(real)  # nothing planned that the trainer does not hold


def test_sharding_divides_by_n():
    one, eight = configs("dfpo", 1, "Qwen/Qwen3-8B")[0], configs("dfpo", 8, "Qwen/Qwen3-8B")[0]
    p1, p8 = plan_cell(one, 768, 80 * GiB), plan_cell(eight, 768, 80 * GiB)
    for key in ("parameters", "gradients", "reference", "critic", "critic gradients"):
        assert p1.persistent[key] / 8 <= p8.persistent[key] <= p1.persistent[key] / 8 + 64 * 1024 ** 2, key
    assert p8.persistent["rollout replica"] == p1.persistent["parameters"]  # the unsharded copy
    assert "rollout replica" not in p1.persistent


def test_shard_bytes_rounds_dim0_up():
    import torch

    params = [torch.empty(10, 3, device="meta"), torch.empty(7, device="meta")]
    assert shard_bytes(params, 1) == (30 + 7) * 4
    assert shard_bytes(params, 4) == (math.ceil(10 / 4) * 3 + math.ceil(7 / 4)) * 4


def test_qwen3_8b_parameter_count():
    """Qwen3-8B's 8.19e9 parameters (its model card: 8.2B), untied output layer."""
    (cfg,) = configs("grpo", 1, "Qwen/Qwen3-8B")
    plan = plan_cell(cfg, 768, 80 * GiB)
    h, inter, layers, vocab, q, kv = 4096, 12288, 36, 151936, 32 * 128, 8 * 128
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h + 2 * 128  # + q_norm, k_norm
    numel = 2 * vocab * h + layers * per_layer + h
    assert plan.persistent["parameters"] == 4 * numel


def test_verdict_follows_the_device_memory(capsys):
    argv = ["plan", "--model", "Qwen/Qwen3-8B", "--algos", "grpo", "--nproc", "8", "--json"]
    assert main([*argv, "--device-memory", "1000GB"]) == 0
    fits = json.loads(capsys.readouterr().out)[0]
    assert fits["fits"] and fits["peak_bytes"] < 1000 * GiB
    assert main([*argv, "--device-memory", f"{fits['peak_bytes'] // 1024 ** 2 - 1}MB"]) == 1
    assert not json.loads(capsys.readouterr().out)[0]["fits"]
    assert main(argv[:-1] + ["--device-memory", "10GB"]) == 1
    assert "grpo: does not fit" in capsys.readouterr().out


def test_two_nodes_of_four_plan_as_eight_ranks(capsys):
    """Per-device memory depends on the ranks of a cell, not on how they are spread over nodes."""
    base = ["plan", "--model", "Qwen/Qwen3-8B", "--algos", "dfpo", "--json"]
    assert main([*base, "--nproc", "8"]) in (0, 1)
    one_node = json.loads(capsys.readouterr().out)[0]
    assert main([*base, "--nproc", "4", "--nnodes", "2"]) in (0, 1)
    two_nodes = json.loads(capsys.readouterr().out)[0]
    assert main([*base, "--nproc", "4"]) in (0, 1)
    four = json.loads(capsys.readouterr().out)[0]
    assert two_nodes["peak_bytes"] == one_node["peak_bytes"] < four["peak_bytes"]


def test_checkpointing_and_vllm_change_the_plan(capsys):
    base = ["plan", "--model", "Qwen/Qwen3-8B", "--algos", "grpo", "--json"]
    main([*base, "--set", "train.gradient_checkpointing=false"])
    off = json.loads(capsys.readouterr().out)[0]
    main([*base, "--set", "train.gradient_checkpointing=true"])
    on = json.loads(capsys.readouterr().out)[0]
    assert on["update"]["activations"] < off["update"]["activations"] == on["activations"]["no_checkpointing"]
    main([*base, "--rollout", "vllm", "--device-memory", "100GB"])
    vllm = json.loads(capsys.readouterr().out)[0]
    assert vllm["vllm_bytes"] == int(0.3 * 100 * GiB) and vllm["rollout"] == {}


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such/model"], "no shape known for model 'no-such/model' (valid: tiny, Qwen/Qwen3-8B"),
    (["--algos", "nope"], "nope"),
    (["--device-memory", "lots"], "--device-memory 'lots': expected a positive size"),
    (["--device-memory=-3GB"], "expected a positive size"),
    (["--nproc", "0"], "train.nproc must be a positive integer"),
    (["--nproc", "2", "--rollout", "vllm"], "train.nproc > 1 supports train.rollout=hf only"),
    (["--prompt-len", "0"], "--prompt-len must be a positive integer"),
    (["--set", "train.nope=1"], "unknown config key 'train.nope'"),
])
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harness: error: ") and message in err and err.count("\n") == 1, err


def test_table_names_every_component(capsys):
    assert main(["plan", "--model", "Qwen/Qwen3-8B", "--algos", "ppo,dfpo", "--nproc", "8"]) in (0, 1)
    out = capsys.readouterr().out
    for label in ("parameters", "gradients", "optimiser (Adam)", "reference", "critic optimiser", "rollout replica",
                  "update: activations (checkpointing)", "activations with no checkpointing", "rollout: KV cache",
                  "peak", "device"):
        assert label in out, label
    assert "ppo: " in out and "dfpo: " in out
