"""LoRA (`model.lora_rank > 0`, harness/lora.py): adapters on one frozen base, for every algorithm.

Only adapters and heads train; the reference is the base model (adapters off) exactly; a cell
stopped mid-run resumes exactly from checkpoints that hold only what trains."""
from __future__ import annotations

import pytest
import torch

from algorithms import ALGOS  # noqa: E402
from harness import checkpoints, lora  # noqa: E402
from harness.cli import main  # noqa: E402
from harness.models import load_policy  # noqa: E402
from harness.rollout import forward_response  # noqa: E402
from harness.trainer import Trainer  # noqa: E402
from tests import test_resume  # noqa: E402
from tests.conftest import FAST, built_once, fast_args  # noqa: E402
from tests.test_training import changed, make_trainer, snapshot  # noqa: E402

LORA = {"model.lora_rank": "4", "model.lora_alpha": "8"}
FAST_LORA = {**FAST, **LORA}


@pytest.mark.parametrize("algo", ALGOS.names())
def test_lora_trains_only_adapters_and_heads_and_the_reference_is_the_base(algo, tmp_path, cache_dir):
    trainer = make_trainer(algo, tmp_path, cache_dir, noise="flip0.5",
                           **{**LORA, "train.lr": "1e-2", "train.critic_lr": "1e-2"})
    assert trainer.reference is None and not trainer.fast_model  # no reference copy; HF forward under peft
    before = snapshot(trainer.policy)
    critic_before = snapshot(trainer.critic) if trainer.critic is not None else None
    heads_before = snapshot(trainer.heads)
    for step in (1, 2, 3):
        trainer.train_step(step)

    moved = changed(before, trainer.policy)
    base = {n for n in moved if "lora_" not in n}
    policy_adapter = {n for n in moved if f"lora_B.{lora.POLICY_ADAPTER}." in n}
    assert base and policy_adapter
    assert not any(moved[n] for n in base), "the base must stay frozen"
    assert all(moved[n] for n in policy_adapter), "every policy adapter's B must train"
    assert all(changed(heads_before, trainer.heads).values())
    if trainer.critic is not None:
        critic_moved = changed(critic_before, trainer.critic)
        assert all(v for n, v in critic_moved.items() if n.startswith("head.")), "the critic head must train"
        critic_adapter = [n for n in critic_moved if f"lora_B.{lora.CRITIC_ADAPTER}." in n]
        assert critic_adapter and all(critic_moved[n] for n in critic_adapter), "the critic adapter must train"
        actor_ids = {id(p) for g in trainer.actor_opt.param_groups for p in g["params"]}
        critic_ids = {id(p) for g in trainer.critic_opt.param_groups for p in g["params"]}
        assert not actor_ids & critic_ids
    frozen = {id(p) for n, p in trainer.policy.named_parameters() if "lora_" not in n}
    optimised = {id(p) for opt in (trainer.actor_opt, trainer.critic_opt) if opt is not None
                 for g in opt.param_groups for p in g["params"]}
    assert not frozen & optimised, "no optimiser holds a base parameter"

    # The reference (adapters off) computes the base model's log-probs exactly, the policy does not.
    base_model, _ = load_policy(trainer.cfg.model, trainer.suite, trainer.cfg.seed, cache_dir, "cpu", progress=False)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected, _, _ = forward_response(base_model.eval(), ids, mask, 3)
        with trainer.reference_context():
            reference, _, _ = trainer.response_forward(trainer.reference_model(), ids, mask, 3)
        adapted, _, _ = trainer.response_forward(trainer.policy, ids, mask, 3)
    assert torch.equal(reference, expected)
    assert not torch.equal(adapted, expected)


@pytest.mark.parametrize("algo", ALGOS.names())
def test_lora_resume_is_exact_and_checkpoints_hold_only_what_trains(algo, tmp_path, cache_dir, monkeypatch):
    monkeypatch.setattr(test_resume, "SMALL", {**test_resume.SMALL, **LORA})
    test_resume.test_resume_mid_run_repeats_the_uninterrupted_run(algo, tmp_path, cache_dir, monkeypatch)
    cell = next((tmp_path / "resumed").rglob("ckpt")).parent
    state = torch.load(checkpoints.latest_checkpoint(cell)[1] / checkpoints.STATE_FILE, weights_only=True)
    assert state["policy"] and all("lora_" in name for name in state["policy"])
    if "critic" in state:  # its head (its adapter is with the policy's); no frozen base weight anywhere
        assert state["critic"]
    frozen = ("base_layer", "embed_tokens", "norm.weight", "lm_head")
    assert not any(part in name for key in ("policy", "critic") for name in state.get(key, {}) for part in frozen)


def test_lora_critic_copy_trains_its_own_adapter_on_a_frozen_copy(tmp_path, cache_dir):
    trainer = make_trainer("ppo", tmp_path, cache_dir, noise="flip0.5",
                           **{**LORA, "model.lora_critic": "copy", "train.critic_lr": "1e-2"})
    assert trainer.critic.backbone is not trainer.policy.get_decoder()
    before = snapshot(trainer.critic)
    trainer.train_step(1)
    moved = changed(before, trainer.critic)
    assert not any(v for n, v in moved.items() if n.startswith("backbone.") and "lora_" not in n)
    assert any(v for n, v in moved.items() if "lora_B" in n) and moved["head.linear.weight"]
    assert {id(p) for g in trainer.critic_opt.param_groups for p in g["params"]} == {
        id(p) for p in trainer.critic.parameters() if p.requires_grad}


@pytest.mark.parametrize("setting, message", [
    ("model.lora_rank=-1", "model.lora_rank must be >= 0"),
    ("model.lora_alpha=0", "model.lora_alpha must be > 0"),
    ("model.lora_dropout=0.1", "model.lora_dropout must be 0"),
    ("model.lora_targets= , ", "model.lora_targets must name at least one module"),
    ("model.lora_critic=twin", "model.lora_critic must be adapter or copy"),
    ("model.lora_save=both", "model.lora_save must be adapter or merged"),
])
def test_bad_lora_options_are_one_line_errors(setting, message, tmp_path, capsys):
    code = main(["run", "--suite", "arith", "--algos", "grpo", "--noise", "none", "--seeds", "1", "--steps", "1",
                 "--out", str(tmp_path / "out"), *fast_args({"model.lora_rank": "4"}), "--set", setting])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1


def test_lora_save_model_writes_the_adapter_and_a_merged_model_that_eval_loads(tmp_path, cache_dir):
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from harness.model_eval import ModelEvaluation
    from harness.resolver import eval_config
    from harness.export import save_model
    from harness.resolver import build_cells

    cell = build_cells("arith", ["ppo"], "flip0.2", [0], tmp_path, steps=2,
                       overrides={**FAST_LORA, "model.lora_save": "merged"})[0]
    cell.path.mkdir(parents=True)
    (cell.path / "config.json").write_text(json.dumps(cell.cfg.to_dict()))
    trainer = Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=False)
    trainer.eval_responses = []
    trainer.run()
    folder = cell.path / "model"
    save_model(trainer, folder, with_critic=True)
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # no copy of the frozen base
    adapter = load_file(folder / "adapter_model.safetensors")
    assert adapter and all("lora_" in n and ".critic." not in n for n in adapter)
    critic = load_file(folder / "critic" / "critic.safetensors")
    assert "head.linear.weight" in critic and all(n.startswith("head.") or ".critic." in n for n in critic)
    assert any(".critic." in n for n in critic)

    # The merged model computes the adapted policy's function.
    merged = AutoModelForCausalLM.from_pretrained(folder / "merged").eval()
    ids, mask = torch.tensor([[5, 6, 7, 8, 9, 10, 11]]), torch.ones(1, 7, dtype=torch.long)
    with torch.no_grad():
        want, _, _ = forward_response(trainer.policy, ids, mask, 3)
        got, _, _ = forward_response(merged, ids, mask, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # harness eval loads the adapter folder (base + adapter) and gives the last evaluation's responses.
    last = [r for r in trainer.eval_responses if r["step"] == 2]
    for model in (folder, folder / "merged"):
        cfg, _ = eval_config(str(model), "arith", {"eval.limit": "0"}) if model.name == "merged" else \
            eval_config(str(model), None, {})
        evaluation = ModelEvaluation(cfg, cache_dir)
        evaluation.evaluate(2)
        if model == folder:
            assert [(r["problem"], r["response"]) for r in evaluation.eval_responses] == \
                [(r["problem"], r["response"]) for r in last]
    assert main(["eval", "--model", str(folder), "--out", str(tmp_path / "evals"), "--eval-limit", "4"]) == 0
    assert (tmp_path / "evals" / "arith" / "ppo-model" / "flip0.2" / "seed0" / "eval.jsonl").is_file()


def test_merged_weights_are_the_plain_models_names_with_the_policy_adapter_merged(tmp_path, cache_dir):
    """What the vLLM backend syncs under LoRA (and a GGUF model's safetensors copy holds): the plain model's
    state dict names exactly, the policy's adapter merged, the critic's adapter left out; loaded into the
    plain model it computes the adapted policy's log-probs."""
    trainer = make_trainer("ppo", tmp_path, cache_dir, noise="flip0.5", **LORA)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct non-zero adapters (at B = 0 the merge would be the base)
        for name, p in trainer.policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.3 if ".default." in name else 3.0))
    plain, _ = load_policy(trainer.cfg.model, trainer.suite, trainer.cfg.seed, cache_dir, "cpu", progress=False)
    weights = dict(lora.merged_weights(trainer.policy))
    assert list(weights) == list(plain.state_dict())
    base = {n: t.clone() for n, t in plain.state_dict().items()}
    plain.load_state_dict(weights, strict=True)
    assert not torch.equal(plain.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(plain.state_dict()["model.norm.weight"], base["model.norm.weight"])
    ids, mask = torch.tensor([[5, 6, 7, 8, 9, 10, 11]]), torch.ones(1, 7, dtype=torch.long)
    with torch.no_grad():
        want, _, _ = forward_response(trainer.policy, ids, mask, 3)
        got, _, _ = forward_response(plain.eval(), ids, mask, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert dict(lora.merged_weights(plain)).keys() == weights.keys()  # no adapters: the state dict as it is


@pytest.mark.parametrize("algo, critic", [(a, "adapter") for a in ALGOS.names()] + [("ppo", "copy")])
def test_plan_counts_the_lora_trainers_bytes_exactly(algo, critic, tmp_path, cache_dir):
    """`harness plan` under LoRA: the shared base, the adapters, their Adam states, heads and critic
    equal a real trainer's bytes after one step; no reference is planned."""
    from harness.plan import GiB, plan_cell
    from harness.plan_measure import trainer_bytes
    from tests.test_plan import configs

    (cfg,) = configs(algo, sets={**FAST_LORA, "model.lora_critic": critic})
    plan = plan_cell(cfg, prompt_len=16, device_bytes=80 * GiB)
    trainer = Trainer(cfg, tmp_path, cache_dir=cache_dir, progress=False)
    trainer.train_step(1)
    real = trainer_bytes(trainer)
    assert real["gradients"] > 0 and "reference" not in plan.persistent
    assert {k: plan.persistent[k] for k in real} == real
    assert set(plan.persistent) == set(real)


LEARN_ARGS = ["run", "--suite", "arith", "--algos", "grpo", "--noise", "none", "--seeds", "1", "--steps", "80", "--quiet",
              "--set", "model.warmstart_steps=500", "--set", "train.prompts_per_step=16", "--set", "suite.n_eval=16"]


def clean_reward_gain(out) -> float:
    """Mean clean reward of the last 10 steps minus that of the first 10 (160 prompts x 4 samples each)."""
    import json

    rows = [json.loads(line) for line in next(out.rglob("metrics.jsonl")).read_text().splitlines()]
    mean = lambda part: sum(r["reward/clean_mean"] for r in part) / len(part)  # noqa: E731
    return mean(rows[-10:]) - mean(rows[:10])


@pytest.mark.slow
def test_lora_gains_at_least_half_of_what_full_fine_tuning_gains(tmp_path, cache_dir):
    """GRPO on the clean arith testbed, the same budget (80 steps x 16 prompts x 4 samples, lr 3e-4) from the
    same warm start: LoRA at rank 8 gains at least half the clean reward full fine-tuning gains. Measured (CPU,
    torch 2.13): full fine-tuning +0.028, LoRA +0.052; one seed, and a window's mean has a standard error of
    about 0.014, so the bar on full fine-tuning's own gain is low (it only keeps the ratio from being vacuous)."""
    gains = {}
    for name, sets in (("full", []), ("lora", ["--set", "model.lora_rank=8"])):
        assert main([*LEARN_ARGS, *sets, "--out", str(tmp_path / name), "--cache-dir", str(cache_dir)]) == 0
        gains[name] = clean_reward_gain(tmp_path / name)
    print(f"clean reward gain, steps 1-10 -> 71-80: full fine-tuning {gains['full']:+.3f}, LoRA r=8 {gains['lora']:+.3f}")
    assert gains["full"] > 0.01, gains  # full fine-tuning learns here: the ratio below means something
    assert gains["lora"] >= 0.5 * gains["full"], gains


def test_lora_adapter_count_by_hand():
    """Tiny Llama h=32, I=48, 3 layers, r=4: per layer q, k, v, o (32 -> 32): 4 * 4 * (32 + 32); gate,
    up (32 -> 48) 2 * 4 * (32 + 48); down (48 -> 32) 4 * (48 + 32)."""
    from harness.plan import lora_module_bytes, model_config
    from tests.test_plan import SMALL, algorithm, configs

    (cfg,) = configs("grpo", sets={**SMALL, **LORA})
    m = lora_module_bytes(cfg, algorithm(cfg), model_config(cfg))
    per_layer = 4 * 4 * 64 + 2 * 4 * 80 + 4 * 80
    assert sum(t.numel() for t in m["adapter_tensors"]) == 3 * per_layer
    assert m["actor_adam"] == 2 * 4 * 3 * per_layer + 4 * 3 * 7 * 2 and m["reference"] == 0


@pytest.mark.parametrize("algo, adapters", [("ppo", 2), ("grpo", 1)])
def test_lora_plan_with_two_ranks_shards_what_trains_and_replicates_the_adapted_policy(algo, adapters):
    """`--nproc 2` under LoRA: the adapters' gradients (dim 0: r = 4, or 32 and 48) split exactly in two; the rollout replica is the whole adapted policy: the base and every adapter (the policy's,
    and with a critic the critic's), 3 layers x 1984 adapter elements each (`test_lora_adapter_count_by_hand`),
    float32 here."""
    from harness.plan import lora_module_bytes, model_config, shard_bytes, unique_params
    from tests.test_plan import SMALL, algorithm, configs

    (one,), (two,) = configs(algo, 1, sets={**SMALL, **LORA}), configs(algo, 2, sets={**SMALL, **LORA})
    m1, m2 = (lora_module_bytes(cfg, algorithm(cfg), model_config(cfg)) for cfg in (one, two))
    assert 2 * m2["actor_grads"] == m1["actor_grads"] > 0
    # the critic's scalar head (weight 1 x 32, bias 1: dim 0 of size 1) stays whole on each rank
    assert 2 * m2["critic_grads"] - m1["critic_grads"] == (4 * (32 + 1) if adapters == 2 else 0)
    assert (m1["critic_grads"] > 0) == (adapters == 2)
    assert m2["policy"] < m1["policy"] and m2["policy_full"] == m1["policy_full"]
    base = shard_bytes(unique_params(m2["policy_model"]), 1)
    assert m2["replica"] == base + adapters * 3 * 1984 * 4


def test_lora_critic_adapter_under_gradient_checkpointing_gets_the_same_gradients(tmp_path, cache_dir):
    """Checkpointing recomputes the critic's forward in its backward: with the critic's adapter active
    (not the policy's), so the critic's gradients equal those without checkpointing. The adapters get
    distinct random B and the zero-initialised head a random one first (at B = 0 both adapters compute the
    same function, and a zero head passes no gradient to the adapter: the test could not fail)."""
    grads = []
    for ckpt in ("false", "true"):
        trainer = make_trainer("ppo", tmp_path / ckpt, cache_dir, noise="flip0.5",
                               **{**LORA, "train.gradient_checkpointing": ckpt, "train.num_minibatches": "1"})
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            randomised = [p for n, p in trainer.policy.named_parameters() if "lora_B" in n]
            for p in randomised + list(trainer.critic.head.parameters()):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        trainer.train_step(1)  # one minibatch: the gradients left are those of the only update
        grads.append({n: p.grad.clone() for n, p in trainer.policy.named_parameters() if f".{lora.CRITIC_ADAPTER}." in n})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    assert all(g.abs().max() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


# ---- two ranks (FSDP2 on the CPU with gloo, harness.sharded) ------------------------------------------

SHARDED_STEPS, SHARDED_CKPT = 3, 2  # a checkpoint at step 2, from which a copy of the cell resumes step 3


def sharded_cell(algo: str, out, steps: int = SHARDED_STEPS):
    from harness.resolver import build_cells

    sets = {**test_resume.SMALL, **LORA, "suite.n_eval": "4", "train.nproc": "2", "train.lr": "1e-2",
            "train.critic_lr": "1e-2"}
    cell = build_cells("arith", [algo], "flip0.5", [0], out, steps=steps,
                       overrides={k: v for k, v in sets.items() if k.split(".")[0] in (*test_resume.SECTIONS, algo)})[0]
    cell.path.mkdir(parents=True, exist_ok=True)
    return cell


def full_parameters(module) -> dict[str, torch.Tensor]:
    """Every parameter of a sharded module, gathered whole (a collective: every rank calls it)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in module.named_parameters()}


def sharded_ranks(algos: list[str], out: str, cache_dir: str) -> None:
    """Each rank of a 2-rank group, for every algorithm: a LoRA cell run straight through 3 steps (which
    parameters moved; the reference's log-probs), whose folder is copied as it stands at its step-2
    checkpoint (a run stopped there); the copy then resumes in a fresh trainer. Rank 0 leaves what it saw
    in `out/<algo>.json`."""
    import json
    import shutil
    from pathlib import Path

    from harness import distributed
    from harness.sharded import ShardedTrainer

    world = distributed.init("cpu", 300)
    for algo in algos:
        cell = sharded_cell(algo, Path(out) / "straight" / algo)
        stopped = Path(out) / "resumed" / algo / cell.path.relative_to(Path(out) / "straight" / algo)
        trainer = ShardedTrainer(cell.cfg, cell.path, cache_dir=Path(cache_dir), progress=False)
        save = trainer.save_checkpoint

        def save_and_copy(step, summary, save=save, cell=cell, stopped=stopped):
            save(step, summary)
            if step == SHARDED_CKPT and world.main:
                shutil.copytree(cell.path, stopped)
            distributed.barrier(world)

        trainer.save_checkpoint = save_and_copy
        modules = {"policy": trainer.policy, "heads": trainer.heads}
        if trainer.critic is not None:
            modules["critic"] = trainer.critic
        before = {k: full_parameters(m) for k, m in modules.items()}
        trainer.run(ckpt_every=SHARDED_CKPT)
        after = {k: full_parameters(m) for k, m in modules.items()}
        moved = {k: {n: not torch.equal(before[k][n], after[k][n]) for n in before[k]} for k in modules}

        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            with trainer.reference_context():
                reference, _, _ = trainer.response_forward(trainer.reference_model(), ids, mask, 3)
            adapted, _, _ = trainer.response_forward(trainer.policy, ids, mask, 3)
            base_model, _ = load_policy(cell.cfg.model, trainer.suite, cell.cfg.seed, Path(cache_dir), "cpu",
                                        progress=False)
            base, _, _ = forward_response(base_model.eval(), ids, mask, 3)

        resumed = ShardedTrainer(cell.cfg, stopped, cache_dir=Path(cache_dir), progress=False)
        resumed.run(ckpt_every=SHARDED_CKPT)
        if world.main:
            (Path(out) / f"{algo}.json").write_text(json.dumps({
                "moved": moved, "start_step": resumed.start_step,
                "reference_vs_base": (reference - base).abs().max().item(),
                "adapted_vs_base": (adapted - base).abs().max().item()}))
        distributed.barrier(world)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, cache_dir):
    """Every registered algorithm with LoRA as 2 ranks, in one launch (a launch costs seconds)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    def build(out):
        Trainer(sharded_cell("grpo", out / "warm", steps=1).cfg, out / "warm", cache_dir=cache_dir, progress=False)  # the warm start, once
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, rdzv_backend="c10d", rdzv_endpoint="localhost:0",
                              run_id="lora-sharded", max_restarts=0, monitor_interval=0.1, start_method="spawn")
        elastic_launch(config, sharded_ranks)(ALGOS.names(), str(out), str(cache_dir))

    return built_once(tmp_path_factory, "lora-sharded", build)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGOS.names())
def test_lora_on_two_ranks_trains_only_adapters_and_heads_and_resumes_exactly(algo, sharded):
    import json

    from torch.distributed.checkpoint import FileSystemReader

    from tests.test_training import strip_timing

    seen = json.loads((sharded / f"{algo}.json").read_text())
    policy = seen["moved"]["policy"]
    base = [n for n in policy if "lora_" not in n]
    adapter = [n for n in policy if f"lora_B.{lora.POLICY_ADAPTER}." in n]
    assert base and not any(policy[n] for n in base), "the base must stay frozen"
    assert adapter and all(policy[n] for n in adapter), "every policy adapter's B must train"
    assert all(seen["moved"]["heads"].values())
    if "critic" in seen["moved"]:
        critic = seen["moved"]["critic"]
        assert all(v for n, v in critic.items() if n.startswith("head.")), "the critic head must train"
        assert not any(v for n, v in critic.items() if "lora_" not in n and not n.startswith("head."))
        critic_adapter = [n for n in critic if f"lora_B.{lora.CRITIC_ADAPTER}." in n]
        assert critic_adapter and all(critic[n] for n in critic_adapter), "the critic adapter must train"
    # The reference (adapters off, sharded) is the base model; the adapted policy is not.
    assert seen["reference_vs_base"] < 1e-5 < seen["adapted_vs_base"]

    assert seen["start_step"] == SHARDED_CKPT
    straight, resumed = (next((sharded / kind / algo).rglob("metrics.jsonl")).parent for kind in ("straight", "resumed"))
    for name in ("metrics.jsonl", "eval.jsonl"):
        expected, got = strip_timing(straight / name), strip_timing(resumed / name)
        assert len(got) == len(expected) > 0 and got == expected
    # The DCP checkpoint holds the adapters, heads and their optimiser states, no frozen base weight.
    keys = FileSystemReader(str(next((resumed / "ckpt").iterdir()) / "dcp")).read_metadata().state_dict_metadata
    assert any("lora_B" in k for k in keys)
    assert not any(part in k for k in keys for part in ("base_layer", "embed_tokens", "layernorm"))
