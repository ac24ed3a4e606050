"""The sharded trainer's meta-device build (harness.sharded): a model's parameters moved to the meta
device keep their ties and its buffers their values; a model rebuilt from its config on another rank
has the same structure; allocation keeps the buffers. (The 2-rank cells' numbers equal to one
process's and to the host-memory build's are tests/test_distributed.py's.)"""
from __future__ import annotations

import torch

from harness.config import ModelConfig
from harness.models import byte_tokenizer, tiny_llama
from harness.sharded import allocate, meta_model, parameters_to_meta, substate


def tiny():
    tok = byte_tokenizer()
    torch.manual_seed(0)
    return tiny_llama(ModelConfig(hidden_size=32, intermediate_size=48, num_layers=2), len(tok), tok.pad_token_id,
                      tok.bos_token_id, tok.eos_token_id)


def test_parameters_to_meta_keeps_ties_and_buffers_and_frees_the_weights():
    model = tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    parameters_to_meta(model)
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)  # not in the state dict: kept
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in state.items()}


def test_a_rank_rebuilds_the_same_meta_model_from_config_and_buffers():
    model = tiny()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    other = meta_model(model.config, torch.float32, buffers)
    assert [(k, v.shape, v.dtype) for k, v in other.named_parameters()] == [
        (k, v.shape, v.dtype) for k, v in model.named_parameters()]
    assert all(p.is_meta for p in other.parameters()) and other.lm_head.weight is other.model.embed_tokens.weight
    assert torch.equal(other.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)


def test_allocate_gives_storage_and_keeps_buffers():
    model = tiny()
    inv_freq = model.model.rotary_emb.inv_freq.clone()
    parameters_to_meta(model)
    allocate(model, "cpu")
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(model.model.rotary_emb.inv_freq, inv_freq)


def test_substate_is_a_submodule_state_dict():
    state = {"model.norm.weight": 1, "model.layers.0.w": 2, "lm_head.weight": 3, "modelx.y": 4}
    assert substate(state, "model") == {"norm.weight": 1, "layers.0.w": 2}
    assert substate(None, "model") is None
