"""Rollouts with a transformers model: batched sampling with a KV cache, and token log-probs.

Layout of a rolled-out batch: prompts left-padded to a common width P, responses right-padded
to T, so `input_ids = [prompt | response]` is `[B, P + T]` and response token t sits at column
P + t. The response mask is 1 on generated tokens up to and including EOS.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    prompt_len: int  # P
    responses: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T] float


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t) for t in token_lists)
    ids = torch.tensor([[pad_id] * (width - len(t)) + list(t) for t in token_lists], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in token_lists], dtype=torch.long)
    return ids.reshape(len(token_lists), width), mask.reshape(len(token_lists), width)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """`logits [B, V]` -> token ids `[B]`; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def kv_cache(out):
    """The KV cache of a forward's output: `cache` from transformers 5.24, `past_key_values` before."""
    return out["cache"] if "cache" in out else out.past_key_values


@functools.lru_cache(maxsize=None)
def _forward_takes_cache(cls: type) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters


def cache_argument(model) -> str:
    """The keyword a model's forward takes its KV cache by (renamed in transformers 5.24)."""
    return "cache" if _forward_takes_cache(type(model)) else "past_key_values"


@functools.lru_cache(maxsize=None)
def _forward_keeps_logits(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def last_logits(model, n: int) -> dict[str, int]:
    """Forward kwargs that compute logits for the last `n` positions only, where the model allows:
    with a 49k vocabulary, logits over whole prompts are most of a step's memory."""
    return {"logits_to_keep": n} if _forward_keeps_logits(type(model)) else {}


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample one response per prompt with a KV cache; stops early once every row has ended."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    batch, width = prompt_ids.shape
    # One preallocated mask for prompt and response; step t attends to its first width + t + 1 columns.
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, max_new_tokens)], dim=1)
    positions = position_ids(prompt_mask)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                **last_logits(model, 1))
    past = kv_cache(out)
    next_pos = positions[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens = []
    for t in range(max_new_tokens):
        token = sample_next(out.logits[:, -1, :], temperature, top_p, generator)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        finished |= token == eos_id
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        out = model(input_ids=token.unsqueeze(1), attention_mask=attention_mask[:, :width + t + 1], position_ids=next_pos,
                    use_cache=True, **{cache_argument(model): past})
        past = kv_cache(out)
        next_pos = next_pos + 1
    responses = torch.stack(tokens, dim=1)
    response_mask = response_mask_from_tokens(responses, eos_id, pad_id)
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    full_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return Rollout(input_ids, full_mask, prompt_ids.shape[1], responses, response_mask)


def response_mask_from_tokens(responses: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """1 on every token up to and including the first EOS; 0 after it."""
    is_eos = responses == eos_id
    ended_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~ended_before).float()


def forward_response(model, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0,
                     want_hidden: bool = False, entropy_grad: bool = True):
    """Token log-probs and entropies of the response under `model`.

    Returns `(logp [B, T], entropy [B, T], hidden [B, P + T, d] or None)`. Logits are divided by
    the rollout temperature so that `logp` is the log-prob of the distribution that sampled. With
    `entropy_grad=False` the entropy is a detached diagnostic, which spares the backward pass two
    [B, T, vocab] tensors.
    """
    width = input_ids.shape[1] - prompt_len  # response tokens; their logits sit one position earlier
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                output_hidden_states=want_hidden, use_cache=False, **last_logits(model, width + 1))
    logits = out.logits[:, -(width + 1):-1, :].float() / temperature
    log_probs = F.log_softmax(logits, dim=-1)
    responses = input_ids[:, prompt_len:]
    logp = log_probs.gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    hidden = out.hidden_states[-1] if want_hidden else None
    return logp, entropy, hidden


def merge_rollouts(parts: list[tuple[Rollout, torch.Tensor]], pad_id: int) -> Rollout:
    """Rows `index` of each rollout, in order, as one rollout: prompts left-padded to the widest
    prompt P, responses right-padded to the longest T (padding is masked out)."""
    width_p = max(r.prompt_len for r, _ in parts)
    width_t = max(r.responses.shape[1] for r, _ in parts)
    ids, attn, resp, rmask = [], [], [], []
    for r, index in parts:
        index = index.to(r.input_ids.device)
        left, right = width_p - r.prompt_len, width_t - r.responses.shape[1]
        prompt_ids = F.pad(r.input_ids[index, :r.prompt_len], (left, 0), value=pad_id)
        prompt_mask = F.pad(r.attention_mask[index, :r.prompt_len], (left, 0), value=0)
        responses = F.pad(r.responses[index], (0, right), value=pad_id)
        response_mask = F.pad(r.response_mask[index], (0, right), value=0.0)
        ids.append(torch.cat([prompt_ids, responses], dim=1))
        attn.append(torch.cat([prompt_mask, response_mask.long()], dim=1))
        resp.append(responses)
        rmask.append(response_mask)
    return Rollout(torch.cat(ids), torch.cat(attn), width_p, torch.cat(resp), torch.cat(rmask))
