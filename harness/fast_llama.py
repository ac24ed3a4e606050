"""A lean forward pass for Hugging Face `LlamaForCausalLM`, for small models on the CPU.

On the tiny model a step's time goes to many small operators and to matmuls over padding and
repeated prompts. This module computes the HF model's function with the model's own parameters
(no copies: the optimiser, checkpoints and the reference and critic copies are unchanged) and
less work:

- `Packed` tokens: no padding, and each distinct prompt of a batch once (a GRPO group's G samples
  share it), with attention gathering every row's keys on the `[B, L]` grid;
- one matmul for q, k and v and one for the MLP's gate and up projections (weights concatenated
  per call, so gradients reach the original parameters), `F.rms_norm`, rotary as
  `x * cos + roll(x) * sin_signed`, an additive mask built once per forward;
- logits only at the cells asked for (the scored response tokens);
- for generation (`harness.rollout.FastDecoder`): a preallocated KV cache, decoding attention as
  multiply-and-sum, each distinct prompt prefilled once, and ended rows dropped from the cache.

Semantics are HF's, tested equal within float tolerance, gradients included
(`tests/test_fast_llama.py`). Supported: Llama configs without biases, with SiLU, a static rotary
table (`default`, `linear`, `llama3`) and no gradient checkpointing; `unsupported_reason(model)`
says why not otherwise. A query with no visible key (a padding cell) attends to itself, so its
(unused) output stays finite and the backward pass does not turn 0 * NaN into NaN gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: `attention_mask [B, L]` -> `[B, L]`, 0 on the padding
    and 0, 1, ... from each row's first real token (what both the rollout and a critic feed the model)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)

ATTRIBUTE = "_harness_fast_llama"  # set on a model (and inherited by deep copies) when the fast path is on
STATIC_ROPE = ("default", "linear", "llama3")


def decoder_of(model: nn.Module) -> nn.Module:
    """The `LlamaModel` of a `LlamaForCausalLM`, or the module itself when it is a `LlamaModel`."""
    return model.model if hasattr(model, "lm_head") else model


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fast path cannot compute `model`'s function, or None when it can."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return f"not a Llama model ({type(model).__name__})"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    checks = {
        "attention or MLP biases": getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False),
        f"hidden_act {config.hidden_act!r} (needs silu)": config.hidden_act != "silu",
        f"rope_type {rope!r} (needs one of {', '.join(STATIC_ROPE)})": rope not in STATIC_ROPE,
        "pretraining_tp > 1": getattr(config, "pretraining_tp", 1) > 1,
        "gradient checkpointing": getattr(decoder_of(model), "gradient_checkpointing", False),
        # the fast path reads the projections' weights directly, which would skip the adapters
        "peft (LoRA) adapters": any(hasattr(m, "lora_A") for m in model.modules()),
        "a head_dim other than hidden_size / heads":
            getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads),
    }
    return next((why for why, failed in checks.items() if failed), None)


def enable(model: nn.Module, mode: str) -> bool:
    """Switch the fast path on `model` for `train.fast_model` `mode`: `auto` where supported and on
    the CPU (on a GPU, HF's fused attention kernels serve larger models better), `on` wherever
    supported (an error where not), `off`. Returns whether it is on."""
    if mode not in ("auto", "on", "off"):
        raise HarnessError(f"train.fast_model must be auto, on or off, got {mode!r}")
    reason = unsupported_reason(model) if mode != "off" else "off"
    if mode == "auto" and reason is None and next(model.parameters()).device.type != "cpu":
        reason = "auto applies on the CPU only"
    if mode == "on" and reason is not None:
        raise HarnessError(f"train.fast_model=on but the model is not supported: {reason}; use auto or off")
    for module in {model, decoder_of(model)}:  # a critic copies the decoder alone
        setattr(module, ATTRIBUTE, reason is None)
    return reason is None


def enabled(model: nn.Module) -> bool:
    return getattr(model, ATTRIBUTE, False)


def rotary_tables(decoder: nn.Module, positions: torch.Tensor, dtype: torch.dtype,
                  bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's cos and sin `[N, 1, D]` at token positions `[N]` (all `< bound`), with sin's first half
    negated so that `rotate_half(x) * sin == roll(x, D / 2) * sin_signed`. Looked up in a table
    built once per model (decoding asks for a few rows a step) and grown when `bound` needs it."""
    table = getattr(decoder, "_harness_rotary_table", None)
    if table is None or table[0].dtype != dtype or table[0].device != positions.device or len(table[0]) < bound:
        rows = max(bound, decoder.config.max_position_embeddings)
        with torch.inference_mode(False):  # a table built during a rollout serves the update too
            table = rotary_rows(decoder, torch.arange(rows, device=positions.device), dtype)
        decoder._harness_rotary_table = table
    return table[0].index_select(0, positions), table[1].index_select(0, positions)


def rotary_rows(decoder: nn.Module, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rotary = decoder.rotary_emb
    freqs = positions[:, None].float() * rotary.inv_freq.to(positions.device, torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling
    half = freqs.shape[-1]
    sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


def rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalise in float32, cast back, then scale."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), None, norm.variance_epsilon).to(x.dtype)


def fused_weights(decoder: nn.Module) -> dict[str, list[torch.Tensor]]:
    """The concatenated q/k/v and gate/up weights of every layer (differentiable in the parameters)."""
    cat = lambda *linears: torch.cat([linear.weight for linear in linears])  # noqa: E731
    return {
        "qkv": [cat(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in decoder.layers],
        "gate_up": [cat(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in decoder.layers],
    }


class KVCache:
    """Per-layer key and value buffers `[B, kv_heads, capacity, D]`, filled left to right."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], length: int = 0):
        self.keys, self.values, self.length = keys, values, length

    @classmethod
    def empty(cls, decoder: nn.Module, batch: int, capacity: int) -> "KVCache":
        config = decoder.config
        shape = (batch, config.num_key_value_heads, capacity, config.hidden_size // config.num_attention_heads)
        like = decoder.embed_tokens.weight
        layers = range(config.num_hidden_layers)
        return cls([like.new_empty(shape) for _ in layers], [like.new_empty(shape) for _ in layers])

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select_rows(self, rows: torch.Tensor) -> "KVCache":
        """A cache whose row i is this cache's row `rows[i]` (prompts shared by several samples)."""
        select = lambda t: t.index_select(0, rows)  # noqa: E731
        return KVCache([select(k) for k in self.keys], [select(v) for v in self.values], self.length)


class Padded:
    """Tokens as the `[B, L]` grid itself: token rows are the grid's B * L cells."""

    def __init__(self, batch: int, length: int):
        self.batch, self.length = batch, length

    def tokens(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.reshape(self.batch * self.length, *grid.shape[2:])

    def to_grid(self, rows: torch.Tensor, zero_padding: bool = True) -> torch.Tensor:
        return rows.view(self.batch, self.length, *rows.shape[1:])

    def token_at(self, cells: torch.Tensor) -> torch.Tensor:
        return cells


class Packed:
    """Only the tokens that need computing: each distinct prompt once, then each row's response
    tokens; no padding. Attention gathers every row's keys into the `[B, L]` grid (a prompt
    shared by a group is read by all its rows, so gradients through it add up), and each token
    takes its output from one grid cell (for a shared prompt, its first row's).

    `attention_mask [B, L]` holds left-padded prompts in columns `< prompt_len` and responses after.
    """

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int):
        self.batch, self.length = batch, length = attention_mask.shape
        valid = attention_mask.bool()
        device = valid.device
        rows = torch.arange(batch, device=device)
        owner = rows.new_tensor(first_rows(input_ids[:, :prompt_len] * valid[:, :prompt_len], valid[:, :prompt_len]))
        in_prompt = torch.arange(length, device=device) < prompt_len
        own = valid & (~in_prompt | (owner == rows)[:, None])
        self.cells = own.flatten().nonzero().squeeze(-1)  # token i's grid cell (row-major)
        n = self.cells.numel()
        token_of_cell = torch.full((batch * length,), n, device=device)
        token_of_cell[self.cells] = torch.arange(n, device=device)
        source_row = torch.where(in_prompt, owner[:, None], rows[:, None])
        columns = torch.arange(length, device=device)
        # every valid cell reads its token (shared prompts: the owner's); padding reads row n, zeros
        self.gather = torch.where(valid, token_of_cell[source_row * length + columns], n).flatten()
        self.gather_no_zero_row = self.gather.masked_fill(self.gather == n, 0)

    def tokens(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.reshape(self.batch * self.length, *grid.shape[2:]).index_select(0, self.cells)

    def to_grid(self, rows: torch.Tensor, zero_padding: bool = True) -> torch.Tensor:
        """`[B, L, ...]` from token rows. Padding cells are zeros, or with `zero_padding=False` a
        copy of token 0 (cheaper, and enough inside attention: padding keys are masked, padding
        queries' outputs are never read back, so no gradient reaches token 0 through them)."""
        if zero_padding:
            rows = torch.cat([rows, rows.new_zeros(1, *rows.shape[1:])])
        gather = self.gather if zero_padding else self.gather_no_zero_row
        return rows.index_select(0, gather).view(self.batch, self.length, *rows.shape[1:])

    def token_at(self, cells: torch.Tensor) -> torch.Tensor:
        """The token rows that hold grid cells `cells` (flat indices; valid cells only)."""
        return self.gather[cells]


def first_rows(*parts: torch.Tensor) -> list[int]:
    """For each row, the first row whose `parts` are all equal to its own (a dict over a few
    dozen short rows is much cheaper than `torch.unique(dim=0)`)."""
    first: dict[tuple, int] = {}
    keys = zip(*(part.tolist() for part in parts))
    return [first.setdefault(tuple(map(tuple, key)), i) for i, key in enumerate(keys)]


def additive_mask(attention_mask: torch.Tensor, queries: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """`[B, 1, queries, S]` with 0 where query i (at column offset + i) may see key j (j <= offset + i and
    `attention_mask[b, j]`, or j is the query itself) and -inf elsewhere."""
    keys = attention_mask.shape[1]
    if queries == 1 and offset == keys - 1:  # decoding: every earlier valid key (the query's own column is valid)
        mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        return mask.masked_fill_(attention_mask == 0, float("-inf"))[:, None, None]
    q_cols = torch.arange(offset, offset + queries, device=attention_mask.device)[:, None]
    k_cols = torch.arange(keys, device=attention_mask.device)[None, :]
    allowed = ((k_cols <= q_cols) & attention_mask.bool()[:, None, :]) | (k_cols == q_cols)
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill_(~allowed, float("-inf"))[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T scale + mask) v for q `[B, H, L, D]`, k and v `[B, H, S, D]`; returns `[B, L, H D]`.
    Batched matmuls for L > 1 (mask `[B H, L, S]`); one query per row (decoding, mask `[B, 1, 1, S]`)
    multiplies and sums instead, several times faster than B H matrix-vector products."""
    batch, heads, length, head_dim = q.shape
    if length == 1:
        probs = torch.add(mask, (q * k).sum(-1).unsqueeze(2), alpha=scale).softmax(-1)  # [B, H, 1, S]
        return (probs.transpose(2, 3) * v).sum(2).view(batch, 1, heads * head_dim)
    scores = torch.baddbmm(mask, q.reshape(batch * heads, length, head_dim),
                           k.reshape(batch * heads, -1, head_dim).transpose(1, 2), alpha=scale)
    out = torch.bmm(scores.softmax(-1), v.reshape(batch * heads, -1, head_dim))
    return out.view(batch, heads, length, head_dim).transpose(1, 2).reshape(batch, length, heads * head_dim)


def forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    logits_at: torch.Tensor | None = None,
    want_hidden: bool = False,
    prompt_len: int | None = None,
    cache: KVCache | None = None,
    weights: dict | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`(logits [M, V] at the M grid cells logits_at (flat indices b * L + column), or None;
    final normed hidden states [B, L, d] when want_hidden, or None)`. Padding cells of the hidden
    states hold zeros in the packed layout and unused (finite) values in the padded one.

    With `prompt_len` (and no cache) the tokens are `Packed`; otherwise computed on the padded grid.
    `attention_mask [B, S]` covers the cache and the new tokens (S = cache.length + L); with a
    cache the new keys and values are written at columns cache.length.. and cache.length advances.
    `weights` are `fused_weights`, for no-grad loops over fixed weights.
    """
    decoder = decoder_of(model)
    config = decoder.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    batch, length = input_ids.shape
    offset = cache.length if cache is not None else 0
    layout = Packed(input_ids, attention_mask, prompt_len) if prompt_len is not None and cache is None \
        else Padded(batch, length)
    x = decoder.embed_tokens(layout.tokens(input_ids))  # [N, d]
    # position ids count the valid columns before a token, so they stay below the mask's width
    cos, sin = rotary_tables(decoder, layout.tokens(position_ids), x.dtype, bound=attention_mask.shape[1])
    mask = additive_mask(attention_mask, length, offset, x.dtype)
    if length > 1:
        mask = mask.expand(batch, heads, length, -1).reshape(batch * heads, length, -1)
    weights = weights or fused_weights(decoder)
    rotated = (heads + kv_heads) * head_dim  # q and k, rotated alike; v follows in qkv's columns
    for i, layer in enumerate(decoder.layers):
        qkv = F.linear(rms_norm(x, layer.input_layernorm), weights["qkv"][i])
        qk = rotate(qkv[:, :rotated].view(-1, heads + kv_heads, head_dim), cos, sin)
        qk = layout.to_grid(qk, zero_padding=False).transpose(1, 2)  # [B, H + H_kv, L, D]
        q, k = qk[:, :heads], qk[:, heads:]
        v = layout.to_grid(qkv[:, rotated:].view(-1, kv_heads, head_dim), zero_padding=False).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(i, offset, k, v)
        if kv_heads != heads:
            k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
        out = attend(q, k, v, mask, head_dim ** -0.5)  # [B, L, H D]
        x = torch.addmm(x, layout.tokens(out), layer.self_attn.o_proj.weight.t())  # x + o_proj(out), one op
        gate, up = F.linear(rms_norm(x, layer.post_attention_layernorm), weights["gate_up"][i]).chunk(2, dim=-1)
        x = torch.addmm(x, F.silu(gate) * up, layer.mlp.down_proj.weight.t())
    if cache is not None:
        cache.length = offset + length
    x = rms_norm(x, decoder.norm)
    logits = model.lm_head(x.index_select(0, layout.token_at(logits_at))) if logits_at is not None else None
    return logits, layout.to_grid(x) if want_hidden else None
