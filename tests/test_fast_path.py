"""The fast CPU path computes what the straightforward implementation computes.

- generation (the trainer's policy: `harness.fast_llama`, a preallocated cache) samples exactly what
  a textbook loop over HF's forward that grows the mask does;
- `old_logp` reused from the first minibatch's forward equals a separate full-batch no-grad forward;
- the GRPO loss on a fixed batch equals a per-sequence, per-token reference written from the math;
- one full step of the fast path (fast forward, the rollout's log-probs as old_logp) leaves the
  same parameters as the plain step (HF forward, every log-prob recomputed).

`tests/test_fast_llama.py` checks the fast forward itself against HF's.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from algorithms.base import Batch
from harness.config import resolved_old_logp
from harness.errors import HarnessError
from harness.resolver import build_cells
from harness.rollout import (cache_argument, forward_response, generate, kv_cache, left_pad, position_ids,
                             response_mask_from_tokens, sample_with_logp)
from harness.seeding import torch_generator
from harness.trainer import Trainer
from tests.conftest import FAST


def make_trainer(tmp_path: Path, cache_dir: Path, algo: str = "grpo", **overrides: str) -> Trainer:
    cell = build_cells("arith", [algo], "flip0.5", [0], tmp_path, steps=3, overrides={**FAST, **overrides})[0]
    cell.path.mkdir(parents=True, exist_ok=True)
    return Trainer(cell.cfg, cell.path, cache_dir=cache_dir, progress=False)


def test_left_pad_by_hand():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


@torch.no_grad()
def grown_mask_generate(model, prompts, max_new_tokens, eos_id, pad_id, generator):
    """The textbook loop: concatenate one column to the attention mask per generated token."""
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    mask, pos = prompt_mask, position_ids(prompt_mask)
    out = model(input_ids=prompt_ids, attention_mask=mask, position_ids=pos, use_cache=True)
    next_pos, finished, tokens = pos[:, -1:] + 1, torch.zeros(len(prompts), dtype=torch.bool), []
    for t in range(max_new_tokens):
        token, _ = sample_with_logp(out.logits[:, -1, :], 1.0, 1.0, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        finished |= token == eos_id
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=next_pos,
                    use_cache=True, **{cache_argument(model): kv_cache(out)})
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1)


def test_preallocated_mask_generation_samples_the_same_tokens(tmp_path, cache_dir):
    trainer = make_trainer(tmp_path, cache_dir)
    tok = trainer.tokenizer
    prompts = [trainer.encode(p) for p in trainer.step_problems(1)] + [[tok.eos_token_id]]  # ragged widths
    fast = generate(trainer.policy, prompts, max_new_tokens=6, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                    generator=torch_generator(0, "t"))
    slow = grown_mask_generate(trainer.policy, prompts, 6, tok.eos_token_id, tok.pad_token_id, torch_generator(0, "t"))
    assert torch.equal(fast.responses, slow)
    assert torch.equal(fast.response_mask, response_mask_from_tokens(slow, tok.eos_token_id, tok.pad_token_id))


@pytest.mark.parametrize("fast_model", ["on", "off"])
def test_generation_records_no_autograd_graph(tmp_path, cache_dir, fast_model):
    """A rollout keeps no graph: with one, a 135M model's 256-token rollout outgrew 24 GiB."""
    trainer = make_trainer(tmp_path, cache_dir, **{"train.fast_model": fast_model})
    grad_modes = []
    embeddings = trainer.policy.get_input_embeddings()  # both paths call it once per forward
    hook = embeddings.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    prompts = [trainer.encode(p) for p in trainer.step_problems(1)]
    roll = generate(trainer.policy, prompts, max_new_tokens=4, eos_id=-1, pad_id=trainer.tokenizer.pad_token_id,
                    generator=torch_generator(0, "t"))
    hook.remove()
    assert len(grad_modes) == 4 and not any(grad_modes)
    assert not roll.logp.requires_grad


def rollout_batch(trainer: Trainer, step: int) -> Batch:
    t = trainer.cfg.train
    problems = [p for p in trainer.step_problems(step) for _ in range(t.group_size)]
    roll = generate(trainer.policy, [trainer.encode(p) for p in problems], max_new_tokens=t.max_new_tokens,
                    eos_id=trainer.tokenizer.eos_token_id, pad_id=trainer.tokenizer.pad_token_id,
                    generator=torch_generator(0, "rollout", step))
    n = len(problems)
    scores = torch.tensor([float(i % 3 == 0) for i in range(n)])  # fixed rewards, different within groups
    return Batch(input_ids=roll.input_ids, attention_mask=roll.attention_mask, responses=roll.responses,
                 response_mask=roll.response_mask, scores=scores, clean_scores=scores,
                 group_ids=torch.arange(n) // t.group_size, prompt_len=roll.prompt_len)


def test_reused_old_logp_equals_a_full_forward(tmp_path, cache_dir):
    trainer = make_trainer(tmp_path, cache_dir)
    batch = rollout_batch(trainer, 1)
    minibatches = trainer.minibatches(batch.size, 1)
    first_fwd = trainer.policy_forward(batch.select(minibatches[0]))
    fast = trainer.old_logp(batch, minibatches[0], first_fwd.logp.detach())
    with torch.no_grad():
        full, _, _ = forward_response(trainer.policy, batch["input_ids"], batch["attention_mask"], batch.prompt_len)
    assert torch.allclose(fast, full, atol=1e-6, rtol=0), float((fast - full).abs().max())
    assert len(minibatches) == 2 and not torch.equal(minibatches[0].sort().values, torch.arange(batch.size))


def reference_grpo_loss(rows, logp, old_logp, ref_logp, scores, groups, mask, clip=0.2, beta=0.04, eps=1e-6):
    """GRPO (DeepSeekMath eq. 3, k3 KL in the loss) in plain Python floats, sequence by sequence and
    token by token. Advantages come from whole groups (all of `scores`); the loss is averaged over
    `rows`, whose per-row lists `logp`, `old_logp`, `ref_logp`, `mask` are given in that order."""
    n = len(scores)
    adv = []
    for i in range(n):
        g = [scores[j] for j in range(n) if groups[j] == groups[i]]
        mean = sum(g) / len(g)
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / (len(g) - 1))
        adv.append((scores[i] - mean) / (std + eps))
    total = 0.0
    for k, i in enumerate(rows):
        terms = []
        for t in range(len(mask[k])):
            if mask[k][t]:
                ratio = math.exp(logp[k][t] - old_logp[k][t])
                surrogate = min(ratio * adv[i], min(max(ratio, 1 - clip), 1 + clip) * adv[i])
                d = ref_logp[k][t] - logp[k][t]
                terms.append(-surrogate + beta * (math.exp(d) - d - 1))
        total += sum(terms) / len(terms)
    return total / len(rows)


def test_grpo_loss_matches_a_reference_implementation_on_a_fixed_batch(tmp_path, cache_dir):
    trainer = make_trainer(tmp_path, cache_dir)
    batch = rollout_batch(trainer, 1)
    first = trainer.minibatches(batch.size, 1)[0]
    first_fwd = trainer.policy_forward(batch.select(first))
    with torch.no_grad():
        batch["old_logp"] = trainer.old_logp(batch, first, first_fwd.logp.detach())
        batch["ref_logp"] = batch["old_logp"] + 0.1 * torch.randn(batch["old_logp"].shape, generator=torch_generator(0, "x"))
        trainer.algo.advantages(batch)
    # A moved policy, so that ratios leave 1 and some tokens clip.
    moved = first_fwd.logp + 0.3 * torch.randn(first_fwd.logp.shape, generator=torch_generator(0, "y"))
    fast_loss, metrics = trainer.algo.actor_loss(batch.select(first), type(first_fwd)(moved, first_fwd.entropy, None),
                                                 trainer.heads)
    assert metrics["actor/clipfrac"] > 0

    with torch.no_grad():  # the reference takes old log-probs from an independent full forward
        full_old, _, _ = forward_response(trainer.policy, batch["input_ids"], batch["attention_mask"], batch.prompt_len)
    ref = reference_grpo_loss(first.tolist(), moved.tolist(), full_old[first].tolist(), batch["ref_logp"][first].tolist(),
                              batch["scores"].tolist(), batch["group_ids"].tolist(), batch["response_mask"][first].tolist())
    assert abs(float(fast_loss.detach()) - ref) < 1e-6, (float(fast_loss.detach()), ref)


def test_a_fast_step_leaves_the_same_parameters_as_the_reference_step(tmp_path, cache_dir):
    """PPO (policy, reference and critic): the trainer's step against the step written out plainly."""
    from noise import NoiseContext

    fast = make_trainer(tmp_path / "a", cache_dir, "ppo")
    slow = make_trainer(tmp_path / "b", cache_dir, "ppo", **{"train.fast_model": "off", "train.old_logp": "recompute"})
    assert fast.fast_model and fast.old_logp_from_rollout and not slow.fast_model
    before = {name: p.detach().clone() for name, p in slow.policy.named_parameters()}
    fast.train_step(1)

    t = slow.cfg.train
    problems = [p for p in slow.step_problems(1) for _ in range(t.group_size)]
    roll = generate(slow.policy, [slow.encode(p) for p in problems], max_new_tokens=t.max_new_tokens,
                    eos_id=slow.tokenizer.eos_token_id, pad_id=slow.tokenizer.pad_token_id,
                    temperature=t.temperature, top_p=t.top_p, generator=torch_generator(0, "rollout", 1))
    texts = slow.decode(roll.responses, roll.response_mask)
    clean = torch.tensor([slow.suite.grade(x, p) for x, p in zip(texts, problems)], dtype=torch.float32)
    ctx = NoiseContext(seed=0, step=1, prompt_ids=[p.id for p in problems],
                       sample_idx=list(range(t.group_size)) * t.prompts_per_step,
                       response_lengths=roll.response_mask.sum(-1).long().tolist(), max_length=t.max_new_tokens)
    scores, _ = slow.noise.apply(clean, ctx)
    batch = Batch(input_ids=roll.input_ids, attention_mask=roll.attention_mask, responses=roll.responses,
                  response_mask=roll.response_mask, scores=scores, clean_scores=clean,
                  group_ids=torch.arange(t.prompts_per_step).repeat_interleave(t.group_size), prompt_len=roll.prompt_len)
    with torch.no_grad():  # the plain step: one full no-grad forward per model, then every minibatch recomputed
        batch["old_logp"], _, _ = forward_response(slow.policy, roll.input_ids, roll.attention_mask, roll.prompt_len)
        batch["ref_logp"], _, _ = forward_response(slow.reference, roll.input_ids, roll.attention_mask, roll.prompt_len)
        batch["old_values"] = slow.critic(roll.input_ids, roll.attention_mask, roll.prompt_len)
        slow.algo.advantages(batch)
    slow.update(batch, 1)

    # Adam's first step moves each parameter by about lr = 3e-4; the two paths differ in float rounding
    # (a fused forward, the sampler's log-probs), which must stay far below one step
    moved = max(float((p.detach() - before[name]).abs().max()) for name, p in fast.policy.named_parameters())
    assert moved > 2e-4, "the step must train"
    for module in ("policy", "critic"):
        a, b = dict(getattr(fast, module).named_parameters()), dict(getattr(slow, module).named_parameters())
        for name in a:
            gap = float((a[name] - b[name]).detach().abs().max())
            assert gap < 1e-5, (module, name, gap)


def test_old_logp_auto_takes_the_rollouts_only_where_sampler_and_trainer_agree(tmp_path):
    def resolved(**overrides):
        return build_cells("arith", ["ppo"], "none", [0], tmp_path, overrides=overrides)[0].cfg.train.old_logp

    assert resolved() == "rollout"
    assert resolved(**{"model.dtype": "bfloat16"}) == "recompute"
    cfg = build_cells("arith", ["ppo"], "none", [0], tmp_path, overrides={"train.old_logp": "auto"})[0].cfg
    cfg.train.old_logp, cfg.train.rollout = "auto", "vllm"  # set by hand: --rollout vllm needs a GPU
    assert resolved_old_logp(cfg) == "recompute"
    assert resolved(**{"train.old_logp": "recompute"}) == "recompute"
    with pytest.raises(HarnessError, match="train.old_logp must be auto, rollout or recompute"):
        resolved(**{"train.old_logp": "sampler"})
    with pytest.raises(HarnessError, match="train.fast_model must be auto, on or off"):
        resolved(**{"train.fast_model": "yes"})
