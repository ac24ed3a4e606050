"""`harness.fast_llama` computes the Hugging Face Llama's function, and the rollout code around it
keeps the semantics of the plain path.

- logits, final hidden states and every parameter's gradient equal HF's (padded and packed layouts,
  left-padded prompts shared by groups, masked response tails; also grouped-query attention);
- the packed layout holds each distinct prompt once, counted by hand;
- generation through the fast path samples the same tokens as through HF's forward, and the
  rollout's log-probs equal a full forward's;
- inverse-CDF sampling draws from the (top-p truncated) distribution;
- unsupported models fall back under `auto` and are a one-line error under `on`.
"""
from __future__ import annotations

import pytest
import torch
from scipy import stats

from harness.critics import build_critic
from harness import fast_llama
from harness.config import ModelConfig
from harness.errors import HarnessError
from harness.models import tiny_llama
from harness.rollout import FastDecoder, forward_response, generate, position_ids, sample_with_logp

PAD, BOS, EOS, VOCAB = 256, 257, 258, 259


def model(num_kv_heads: int | None = None, seed: int = 0):
    torch.manual_seed(seed)
    m = tiny_llama(ModelConfig(), VOCAB, PAD, BOS, EOS)
    if num_kv_heads is not None:  # grouped-query attention, as SmolLM2 has
        config = m.config
        config.num_key_value_heads = num_kv_heads
        torch.manual_seed(seed)
        m = type(m)(config)
    return m.eval()


def group_batch():
    """4 prompts (two left-padded) x 3 samples, 5 response tokens with some tails masked after EOS."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 256, (4, 6), generator=g)
    prompt_mask = torch.ones(4, 6, dtype=torch.long)
    prompt_mask[0, :2] = 0
    prompt_mask[2, :1] = 0
    response_mask = torch.ones(12, 5, dtype=torch.long)
    response_mask[1, 3:] = 0
    response_mask[7, 1:] = 0
    mask = torch.cat([prompt_mask.repeat_interleave(3, 0), response_mask], dim=1)
    ids = torch.cat([prompts.repeat_interleave(3, 0), torch.randint(0, 256, (12, 5), generator=g)], dim=1)
    return torch.where(mask.bool(), ids, torch.full_like(ids, PAD)), mask


def hf(m, ids, mask):
    out = m(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("prompt_len", [None, 6], ids=["padded", "packed"])
def test_logits_and_hidden_states_equal_hf(kv_heads, prompt_len):
    m = model(kv_heads)
    ids, mask = group_batch()
    ref_logits, ref_hidden = hf(m, ids, mask)
    valid = mask.bool()
    cells = valid.flatten().nonzero().squeeze(-1)
    logits, hidden = fast_llama.forward(m, ids, mask, position_ids(mask), logits_at=cells, want_hidden=True,
                                        prompt_len=prompt_len)
    assert torch.allclose(logits, ref_logits.reshape(-1, VOCAB)[cells], atol=2e-5, rtol=0)
    assert torch.allclose(hidden[valid], ref_hidden[valid], atol=2e-5, rtol=0)
    assert torch.isfinite(hidden).all()


def test_gradients_equal_hf_and_stay_finite_at_padding():
    ids, mask = group_batch()
    grads = []
    for mode in ("off", "on"):
        m = model()
        assert fast_llama.enable(m, mode) == (mode == "on")
        logp, _, _ = forward_response(m, ids, mask, 6)
        (logp * mask[:, 6:]).sum().backward()
        grads.append({name: p.grad for name, p in m.named_parameters()})
    for name, g in grads[0].items():
        assert torch.isfinite(grads[1][name]).all(), name
        assert torch.allclose(grads[1][name], g, atol=1e-5, rtol=1e-4), (name, float((grads[1][name] - g).abs().max()))


def test_packed_layout_holds_each_distinct_prompt_once():
    ids, mask = group_batch()
    layout = fast_llama.Packed(ids, mask, prompt_len=6)
    # prompts: 4 + 6 + 5 + 6 valid tokens, once each; responses: 12 x 5 minus 2 + 4 masked
    assert layout.cells.numel() == (4 + 6 + 5 + 6) + (12 * 5 - 2 - 4)
    grid = layout.to_grid(layout.tokens(ids.unsqueeze(-1).float()))[..., 0]
    assert torch.equal(grid[mask.bool()], ids[mask.bool()].float())  # every valid cell reads its own token
    assert (grid[~mask.bool()] == 0).all()  # padding reads the zero row


def test_first_rows_by_hand():
    a = torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2], [3, 4]])
    b = torch.tensor([[1, 1], [1, 1], [0, 1], [1, 1], [1, 1]])
    assert fast_llama.first_rows(a, b) == [0, 1, 2, 0, 1]


def test_critic_states_equal_hf():
    m = model()
    ids, mask = group_batch()
    plain = build_critic("scalar", m, {})
    fast_llama.enable(m, "on")
    fast = build_critic("scalar", m, {})  # the copied backbone inherits the setting
    assert fast_llama.enabled(fast.backbone) and not fast_llama.enabled(plain.backbone)
    valid = mask[:, 5:-1].bool()  # the states before each response token
    a, b = plain.states(ids, mask, 6), fast.states(ids, mask, 6)
    assert torch.allclose(a[valid], b[valid], atol=2e-5, rtol=0)


def test_generation_samples_the_same_tokens_and_keeps_exact_logps(monkeypatch):
    """Same generator: the fast path (shared prefill, preallocated cache, ended rows dropped) and HF's
    forward sample the same tokens; `Rollout.logp` equals a full forward's log-probs."""
    m = model()
    prompts = [[5, 6, 7], [8, 9], [5, 6, 7], [1], [8, 9], [5, 6, 7]] * 4
    with torch.no_grad():  # EOS likely (logit about 6 along the mean hidden state): rows end at different steps
        ids = torch.tensor([p + [5] * (3 - len(p)) for p in prompts])
        mean = hf(m, ids, torch.ones_like(ids))[1].mean((0, 1))
        m.lm_head.weight[EOS] = 6.0 * mean / mean.square().sum()
    held = []
    drop_ended = FastDecoder.drop_ended

    def spy(self, finished):
        drop_ended(self, finished)
        held.append(len(finished) if self.live is None else len(self.live))

    monkeypatch.setattr(FastDecoder, "drop_ended", spy)
    rolls = []
    for mode in ("off", "on"):
        fast_llama.enable(m, mode)
        rolls.append(generate(m, prompts, max_new_tokens=8, eos_id=EOS, pad_id=PAD,
                              generator=torch.Generator().manual_seed(3)))
    slow, fast = rolls
    lengths = fast.response_mask.sum(-1)
    assert lengths.min() < lengths.max() and (lengths < 8).sum() >= 6
    assert held == sorted(held, reverse=True) and held[-1] < 12  # ended rows were dropped from the cache
    assert torch.equal(fast.responses, slow.responses)
    assert torch.allclose(fast.logp, slow.logp, atol=1e-5, rtol=0)
    fast_llama.enable(m, "off")
    with torch.no_grad():
        full, _, _ = forward_response(m, fast.input_ids, fast.attention_mask, fast.prompt_len)
    assert torch.allclose(full * fast.response_mask, fast.logp, atol=1e-5, rtol=0)


def test_inverse_cdf_sampling_draws_from_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).expand(40000, -1)
    probs = logits[0].softmax(-1)
    tokens, logp = sample_with_logp(logits, 1.0, 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=5)
    assert counts[4] == 0  # a zero-probability token is never drawn
    expected = probs[:4].double() / probs[:4].double().sum() * 40000
    assert stats.chisquare(counts[:4].double().numpy(), expected.numpy()).pvalue > 1e-3
    assert torch.allclose(logp, probs.log()[tokens])
    tokens, logp = sample_with_logp(logits, 1.0, 0.7, torch.Generator().manual_seed(0))  # top-p keeps {0, 1}
    counts = torch.bincount(tokens, minlength=5)
    assert counts[2:].sum() == 0
    assert stats.binomtest(int(counts[0]), 40000, float(probs[0] / probs[:2].sum())).pvalue > 1e-3
    assert torch.allclose(logp, probs.log()[tokens])  # the log-prob is the untruncated distribution's


def test_unsupported_models_fall_back_or_fail_in_one_line():
    m = model()
    m.model.gradient_checkpointing = True
    assert fast_llama.unsupported_reason(m) == "gradient checkpointing"
    assert fast_llama.enable(m, "auto") is False and not fast_llama.enabled(m)
    with pytest.raises(HarnessError, match="train.fast_model=on .* gradient checkpointing"):
        fast_llama.enable(m, "on")
    m = model()
    m.config.rope_parameters = {**m.config.rope_parameters, "rope_type": "dynamic"}
    assert "rope_type 'dynamic'" in fast_llama.unsupported_reason(m)
    assert "not a Llama model" in fast_llama.unsupported_reason(torch.nn.Linear(2, 2))
    with pytest.raises(HarnessError, match="auto, on or off"):
        fast_llama.enable(model(), "fast")
