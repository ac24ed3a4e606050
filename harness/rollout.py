"""Rollouts with a transformers model: batched sampling with a KV cache, and token log-probs.

Layout of a rolled-out batch: prompts left-padded to a common width P, responses right-padded
to T, so `input_ids = [prompt | response]` is `[B, P + T]` and response token t sits at column
P + t. The response mask is 1 on generated tokens up to and including EOS.

Models with the fast path on (`harness.fast_llama`) run their forwards through it; others through
their Hugging Face forward with a transformers KV cache.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness import fast_llama
from harness.fast_llama import position_ids


@dataclass
class Rollout:
    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    prompt_len: int  # P
    responses: torch.Tensor  # [B, T]
    response_mask: torch.Tensor  # [B, T] float
    logp: torch.Tensor | None = None  # [B, T] log-probs of the sampled tokens (temperature-scaled); None when greedy


def left_pad(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(t) for t in token_lists)
    ids = torch.tensor([[pad_id] * (width - len(t)) + list(t) for t in token_lists], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in token_lists], dtype=torch.long)
    return ids.reshape(len(token_lists), width), mask.reshape(len(token_lists), width)


def sample_with_logp(logits: torch.Tensor, temperature: float, top_p: float,
                     generator: torch.Generator | None, u: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`logits [B, V]` -> (token ids `[B]`, their log-probs `[B]` under the temperature-scaled softmax,
    before any top-p cut, i.e. the distribution `forward_response` scores; None when greedy). `u`
    `[B, 1]`: the uniform draws, already on the logits' device (default: drawn from `generator`).

    Sampling inverts the CDF at one uniform draw per row (`searchsorted`), an exact draw from the
    (top-p truncated) distribution at a small fraction of `torch.multinomial`'s cost on the CPU.
    """
    if temperature == 0:
        return logits.argmax(-1), None
    log_probs = F.log_softmax(scaled(logits, temperature), dim=-1)
    probs = log_probs.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    cdf = probs.cumsum(-1)
    u = (uniforms(generator, len(cdf)).to(cdf.device) if u is None else u) * cdf[:, -1:]
    # right=True: a token whose probability is 0 never owns an interval; clamp guards rounding at 1
    token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)
    return token, log_probs.gather(-1, token.unsqueeze(-1)).squeeze(-1)


class RowsOf:
    """The uniform draws of rows `rows` of a `batch`-row sampling with `generator`. A rank that samples
    some rows of a step's batch (`harness.sharded`) draws the batch's uniforms and keeps its rows, so a
    row's draws are those one process sampling the whole batch gives it, whatever the number of ranks."""

    def __init__(self, generator: torch.Generator | None, batch: int, rows: slice):
        self.generator, self.batch, self.rows, self.draws = generator, batch, rows, 0

    def rand(self, n: int) -> torch.Tensor:
        assert n == len(range(self.batch)[self.rows]), (n, self.batch, self.rows)
        self.draws += 1
        return uniforms(self.generator, self.batch)[self.rows]

    def rand_block(self, n: int, tokens: int) -> torch.Tensor:
        """`[tokens, n, 1]`: the draws of `tokens` tokens at once (`uniform_block`)."""
        assert n == len(range(self.batch)[self.rows]), (n, self.batch, self.rows)
        self.draws += tokens
        return torch.rand(tokens, self.batch, 1, generator=self.generator)[:, self.rows]

    def skip(self, draws: int) -> None:
        """Advance the generator by `draws` more draws of the whole batch (the tokens other ranks sampled)."""
        for _ in range(draws):
            uniforms(self.generator, self.batch)
        self.draws += max(draws, 0)


class PerRow:
    """One generator per row: row i's t-th token is drawn from `generators[i]` alone, so a row's sample
    is fixed by its own stream (e.g. keyed by problem and sample index), whatever else is in the batch,
    its order or the batch size. `seeds(n)` gives one seed per row for samplers that take seeds (vLLM)."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def rand(self, n: int) -> torch.Tensor:
        assert n == len(self.generators), (n, len(self.generators))
        return torch.cat([torch.rand(1, 1, generator=g) for g in self.generators])

    def rand_block(self, n: int, tokens: int) -> torch.Tensor:
        """`[tokens, n, 1]`: each row's next `tokens` draws from its own generator, in order."""
        assert n == len(self.generators), (n, len(self.generators))
        return torch.stack([torch.rand(tokens, 1, generator=g) for g in self.generators], dim=1)

    def seeds(self, n: int) -> list[int]:
        assert n == len(self.generators), (n, len(self.generators))
        return [int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for g in self.generators]


def uniforms(generator, n: int) -> torch.Tensor:
    """`[n, 1]` U[0, 1) draws for one sampled token per row."""
    if isinstance(generator, (RowsOf, PerRow)):
        return generator.rand(n)
    return torch.rand(n, 1, generator=generator)


def uniform_block(generator, n: int, tokens: int) -> torch.Tensor:
    """`[tokens, n, 1]` U[0, 1) draws for `tokens` tokens of n rows at once: row t is the draw
    `uniforms` would give token t (the CPU generator fills a tensor in order), so a rollout samples the
    same tokens either way; only the generator ends `tokens` draws on, whatever the response length."""
    if isinstance(generator, (RowsOf, PerRow)):
        return generator.rand_block(n, tokens)
    return torch.rand(tokens, n, 1, generator=generator)


def draws_ahead(device: torch.device) -> bool:
    """Whether sampling draws its noise for all tokens up front and checks for the end only every
    `END_CHECK_EVERY` tokens: on an accelerator, where a per-token host-to-device copy and
    `bool(finished.all())` would each wait for the device. The CPU keeps the per-token draws."""
    return device.type != "cpu"


END_CHECK_EVERY = 8


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 logits / temperature (no copy at temperature 1)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


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


def generate(model, prompts: list[list[int]], **kwargs) -> Rollout:
    """Sample one response per prompt (`sample_rollout`) under `torch.inference_mode`, which spares
    every operator autograd's bookkeeping (about a tenth of a tiny model's rollout time); the
    returned tensors are ordinary copies, so the update may use them.

    The model samples in evaluation mode and goes back to its own mode after: a policy with gradient
    checkpointing trains in training mode, and in training mode transformers before 5.20 turns the
    KV cache off ("use_cache=True is incompatible with gradient checkpointing"), so the second
    decoding step would see one token with no cache. Without dropout both modes are the same function."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            roll = sample_rollout(model, prompts, **kwargs)
    finally:
        model.train(was_training)
    return Rollout(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(roll).items()})


def sample_rollout(
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
    """Sample one response per prompt with a KV cache; stops early once every row has ended. The
    rollout keeps each sampled token's log-prob (`Rollout.logp`) when sampling."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    batch, width = prompt_ids.shape
    # One preallocated mask for prompt and response; step t attends to its first width + t + 1 columns.
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, max_new_tokens)], dim=1)
    positions = position_ids(prompt_mask)
    decode = (FastDecoder if fast_llama.enabled(model) else hf_decoder)(model, max_new_tokens)
    logits = decode(prompt_ids, prompt_mask, positions)
    next_pos = positions[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    ahead = draws_ahead(device) and temperature != 0
    noise = uniform_block(generator, batch, max_new_tokens).to(device, non_blocking=True) if ahead else None
    tokens, logps = [], []
    for t in range(max_new_tokens):
        token, logp = sample_with_logp(logits, temperature, top_p, generator, None if noise is None else noise[t])
        token = token.masked_fill(finished, pad_id)
        tokens.append(token)
        logps.append(logp)
        finished |= token == eos_id
        if t == max_new_tokens - 1 or ((not ahead or (t + 1) % END_CHECK_EVERY == 0) and bool(finished.all())):
            break
        logits = decode(token.unsqueeze(1), attention_mask[:, :width + t + 1], next_pos, finished)
        next_pos = next_pos + 1
    responses = torch.stack(tokens, dim=1)
    response_mask = response_mask_from_tokens(responses, eos_id, pad_id)
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    full_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    logp = torch.stack(logps, dim=1) * response_mask if temperature != 0 else None
    return Rollout(input_ids, full_mask, prompt_ids.shape[1], responses, response_mask, logp)


def hf_decoder(model, max_new_tokens: int):
    """`decode(input_ids, attention_mask, position_ids, finished=None) -> next-token logits [B, V]`
    through the model's Hugging Face forward, carrying its KV cache from call to call."""
    past = None

    def decode(input_ids, attention_mask, positions, finished=None):
        nonlocal past
        cache = {cache_argument(model): past} if past is not None else {}
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                    **cache, **last_logits(model, 1))
        past = kv_cache(out)
        return out.logits[:, -1, :]

    return decode


class FastDecoder:
    """`decode` through `harness.fast_llama`: a KV cache preallocated for prompt and response; the
    fused projection weights built once (they are fixed while generating); each distinct prompt
    prefilled once (a group's G samples share it) and its cache rows copied to every sample; and
    rows that have ended dropped from the cache once a quarter of those held have ended (their
    logits are then zeros, and `generate` replaces their tokens with padding)."""

    def __init__(self, model, max_new_tokens: int):
        self.model, self.max_new_tokens = model, max_new_tokens
        self.decoder = fast_llama.decoder_of(model)
        self.weights = fast_llama.fused_weights(self.decoder)
        self.cache: fast_llama.KVCache | None = None
        self.live: torch.Tensor | None = None  # batch rows held in the cache, in cache order; None: all

    def __call__(self, input_ids, attention_mask, positions, finished=None):
        if self.cache is None:
            return self.prefill(input_ids, attention_mask, positions)
        if finished is not None:
            self.drop_ended(finished)
        rows = self.live
        if rows is not None:
            input_ids, attention_mask, positions = input_ids[rows], attention_mask[rows], positions[rows]
        logits = self.next_logits(input_ids, attention_mask, positions)
        if rows is None:
            return logits
        return logits.new_zeros(len(finished), logits.shape[-1]).index_copy_(0, rows, logits)

    def prefill(self, input_ids, attention_mask, positions):
        first = fast_llama.first_rows(input_ids, attention_mask)
        slot = {row: i for i, row in enumerate(dict.fromkeys(first))}  # distinct prompts, in order of appearance
        rows = input_ids.new_tensor([slot[f] for f in first])  # each row's prompt among the distinct ones
        distinct = input_ids.new_tensor(list(slot))
        self.cache = fast_llama.KVCache.empty(self.decoder, len(distinct), input_ids.shape[1] + self.max_new_tokens)
        logits = self.next_logits(input_ids[distinct], attention_mask[distinct], positions[distinct])
        self.cache = self.cache.select_rows(rows)
        return logits.index_select(0, rows)

    def next_logits(self, input_ids, attention_mask, positions):
        """Logits after each row's last column `[B, V]` (the padded grid's hidden states are a view)."""
        _, hidden = fast_llama.forward(self.model, input_ids, attention_mask, positions, want_hidden=True,
                                       cache=self.cache, weights=self.weights)
        return self.model.lm_head(hidden[:, -1])

    def drop_ended(self, finished: torch.Tensor) -> None:
        going = ~(finished if self.live is None else finished[self.live])
        if int(going.sum()) > 0.75 * len(going):
            return
        keep = going.nonzero().squeeze(-1)
        self.cache = self.cache.select_rows(keep)
        self.live = keep if self.live is None else self.live[keep]


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
    positions = position_ids(attention_mask)
    responses = input_ids[:, prompt_len:]
    if fast_llama.enabled(model):  # logits only where a response token is scored
        scored = attention_mask[:, prompt_len:].bool()
        rows, cols = scored.nonzero(as_tuple=True)
        logits, hidden = fast_llama.forward(model, input_ids, attention_mask, positions, prompt_len=prompt_len,
                                            logits_at=rows * input_ids.shape[1] + prompt_len - 1 + cols,
                                            want_hidden=want_hidden)
        logp, entropy = token_logp_entropy(logits, responses[scored], temperature, entropy_grad)
        grid = lambda values: values.new_zeros(scored.shape).masked_scatter(scored, values)  # noqa: E731
        return grid(logp), grid(entropy), hidden
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                output_hidden_states=want_hidden, use_cache=False, **last_logits(model, width + 1))
    logp, entropy = token_logp_entropy(out.logits[:, -(width + 1):-1, :], responses, temperature, entropy_grad)
    return logp, entropy, out.hidden_states[-1] if want_hidden else None


def token_logp_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                       entropy_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `tokens` and entropies under `logits [..., V]` / temperature."""
    log_probs = F.log_softmax(scaled(logits, temperature), dim=-1)
    logp = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def merge_rollouts(parts: list[tuple[Rollout, torch.Tensor]], pad_id: int) -> Rollout:
    """Rows `index` of each rollout, in order, as one rollout: prompts left-padded to the widest
    prompt P, responses right-padded to the longest T (padding is masked out)."""
    width_p = max(r.prompt_len for r, _ in parts)
    width_t = max(r.responses.shape[1] for r, _ in parts)
    ids, attn, resp, rmask, logps = [], [], [], [], []
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
        if r.logp is not None:
            logps.append(F.pad(r.logp[index], (0, right), value=0.0))
    logp = torch.cat(logps) if len(logps) == len(parts) else None
    return Rollout(torch.cat(ids), torch.cat(attn), width_p, torch.cat(resp), torch.cat(rmask), logp)
