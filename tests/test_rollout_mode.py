"""Rollouts sample in evaluation mode, whatever mode the policy trains in, and leave that mode as it was."""
from __future__ import annotations

import pytest
import torch

from harness.config import ModelConfig
from harness.rollout import generate
from harness.models import enable_gradient_checkpointing


def checkpointed_tiny_llama():
    """A random-init tiny Llama in training mode with gradient checkpointing, as the trainer holds a real
    model: the case where transformers before 5.20 turns the KV cache off and decoding breaks."""
    from harness.models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(ModelConfig(hidden_size=32, intermediate_size=64, num_heads=2), 40, 0, 1, 2)
    enable_gradient_checkpointing(model)
    return model


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_generation_runs_in_eval_mode_and_restores_the_mode(mode):
    model = checkpointed_tiny_llama()
    model.train(mode == "train")
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    roll = generate(model, prompts, max_new_tokens=5, eos_id=2, pad_id=0,
                    generator=torch.Generator().manual_seed(0))
    assert len(seen) >= 2, "prefill and at least one cached decoding step"
    assert not any(seen), "every forward of the rollout runs in evaluation mode"
    assert model.training == (mode == "train"), "the policy is back in the mode it was in"
    # The cached decode is the model's function: each sampled token's log-prob equals a full forward's.
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=roll.input_ids, attention_mask=roll.attention_mask,
                       position_ids=(roll.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    width = roll.responses.shape[1]
    full = torch.log_softmax(logits[:, roll.prompt_len - 1:-1].float(), -1).gather(-1, roll.responses.unsqueeze(-1))
    mask = roll.response_mask.bool()
    assert torch.allclose(roll.logp[mask], full.squeeze(-1)[:, :width][mask], atol=1e-5)


def test_the_mode_is_restored_when_generation_fails():
    model = checkpointed_tiny_llama()
    with pytest.raises(IndexError):
        generate(model, [[5, 500]], max_new_tokens=3, eos_id=2, pad_id=0)  # a token outside the vocabulary
    assert model.training
