"""Tokenizer, tiny model warm start and its cache, loading from a local folder, rollouts."""
from __future__ import annotations

import pytest
import torch

from harness.config import ModelConfig
from harness.errors import HarnessError
from harness.models import byte_tokenizer, load_policy, load_pretrained, tiny_llama, warmstart_key
from harness.rollout import forward_response, generate
from tasks.arith import ArithOptions, ArithSuite


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    for text in ("12+7=", "is 19", "héllo wörld ∑"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert len(tok(" 9", add_special_tokens=False)["input_ids"]) == 2
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id} == {256, 257, 258}


def test_warm_start_is_cached_and_reloaded_from_a_local_folder(tmp_path):
    cfg = ModelConfig(warmstart_steps=5)
    suite = ArithSuite(ArithOptions(n_train=50, n_eval=10), seed=0)
    model, tok = load_policy(cfg, suite, 0, tmp_path, "cpu", progress=False)
    folder = tmp_path / "warmstart" / warmstart_key(cfg, suite, 0)
    assert (folder / "done").exists() and (folder / "config.json").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again, _ = load_policy(cfg, suite, 0, tmp_path, "cpu", progress=False)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), name
    # The hub-loading path (AutoModelForCausalLM / AutoTokenizer) on a local folder.
    hub_model, hub_tok = load_pretrained(str(folder), "float32", "cpu")
    assert type(hub_model).__name__ == "LlamaForCausalLM" and hub_tok.padding_side == "left"
    # Another seed is another warm start.
    assert warmstart_key(cfg, suite, 1) != warmstart_key(cfg, suite, 0)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(HarnessError, match="cannot load model"):
        load_pretrained(str(tmp_path / "no-such-model"), "float32", "cpu")


def test_generate_masks_after_eos_and_logprobs_match_an_unpadded_forward():
    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = tiny_llama(ModelConfig(), len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id).eval()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("1+2=", "33-11=", "7=")]
    roll = generate(model, prompts, max_new_tokens=5, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                    temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert roll.responses.shape[0] == 3 and roll.responses.shape[1] <= 5
    for row, mask in zip(roll.responses, roll.response_mask):
        eos = (row == tok.eos_token_id).nonzero()
        if len(eos):
            first = int(eos[0])
            assert mask[: first + 1].all() and not mask[first + 1:].any()
        else:
            assert mask.all()
    logp, entropy, _ = forward_response(model, roll.input_ids, roll.attention_mask, roll.prompt_len)
    for i, prompt in enumerate(prompts):
        resp = roll.responses[i][roll.response_mask[i].bool()]
        ids = torch.tensor([prompt + resp.tolist()])
        logits = model(ids).logits[0, len(prompt) - 1:-1]
        ref = torch.log_softmax(logits, -1).gather(-1, resp[:, None]).squeeze(-1)
        torch.testing.assert_close(logp[i, : len(resp)], ref, atol=1e-5, rtol=1e-5)
    assert (entropy >= 0).all()


def test_greedy_generation_is_deterministic_and_seeded_sampling_repeats():
    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = tiny_llama(ModelConfig(), len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id).eval()
    prompts = [tok("5+5=", add_special_tokens=False)["input_ids"]] * 4
    kw = dict(max_new_tokens=4, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    g1 = generate(model, prompts, temperature=0.0, **kw).responses
    assert (g1 == g1[0]).all()
    s1 = generate(model, prompts, temperature=1.0, generator=torch.Generator().manual_seed(3), **kw).responses
    s2 = generate(model, prompts, temperature=1.0, generator=torch.Generator().manual_seed(3), **kw).responses
    assert torch.equal(s1, s2)
