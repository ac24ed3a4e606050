"""A vLLM rollout backend for GPUs (`--rollout vllm`, config key `train.rollout`; default `hf`).

vLLM only generates. The trainer keeps the policy, recomputes every log-prob it trains on with its
own forward (`old_logp`, `ref_logp`), and after each update pushes the policy's weights into the
engine, so the next rollout samples from the current policy. Extra heads (FlowRL's log-partition
head, ...) live in `Trainer.heads`, not in the policy, and are never sent: only the policy's own
`state_dict()` is.

The engine is anything with two methods (`VLLMEngine` wraps `vllm.LLM`; the tests use a CPU
stand-in with the same interface):

    generate(prompts: list[list[int]], max_tokens, temperature, top_p, seeds: list[int], stop_token_ids)
        -> list[list[int]]          one response per prompt, in order, EOS included when it ended
    load_weights(weights: list[tuple[str, Tensor]])   Hugging Face parameter names
"""
from __future__ import annotations

import importlib.util
import os
from typing import Protocol

import torch

from harness.errors import HarnessError
from harness.rollout import Rollout, left_pad

ROLLOUTS = ("hf", "vllm")
GPU_MEMORY_UTILIZATION = 0.3  # the engine shares the GPU with the trainer's policy, reference and critic


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], *, max_tokens: int, temperature: float, top_p: float,
                 seeds: list[int], stop_token_ids: list[int]) -> list[list[int]]: ...

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None: ...


def check_available() -> None:
    """One-line error unless vLLM is installed and a CUDA GPU is visible."""
    if importlib.util.find_spec("vllm") is None:
        raise HarnessError("train.rollout=vllm needs vLLM: pip install 'noise-robust-rl-harness[vllm]' on a CUDA "
                           "machine (or use train.rollout=hf)")
    if not torch.cuda.is_available():
        raise HarnessError("train.rollout=vllm needs a CUDA GPU and none is visible (use train.rollout=hf on the CPU)")


class VLLMEngine:
    """`vllm.LLM` in this process, behind the `Engine` interface."""

    def __init__(self, model: str, dtype: str, seed: int, max_model_len: int | None = None):
        check_available()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights load by reference
        from vllm import LLM

        self.llm = LLM(model=model, dtype=dtype, seed=seed, gpu_memory_utilization=GPU_MEMORY_UTILIZATION,
                       max_model_len=max_model_len, enable_prefix_caching=True)

    def generate(self, prompts, *, max_tokens, temperature, top_p, seeds, stop_token_ids):
        from vllm import SamplingParams

        params = [SamplingParams(n=1, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                 stop_token_ids=stop_token_ids, detokenize=False) for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]

    def load_weights(self, weights):
        self.llm.apply_model(lambda model: model.load_weights(weights))


class VLLMRollout:
    """Rollouts from an engine, in the layout of `harness.rollout.generate` (same arguments, minus the model)."""

    def __init__(self, engine: Engine, policy: torch.nn.Module):
        self.engine = engine
        self.device = next(policy.parameters()).device
        self.sync_weights(policy)  # the engine starts from the trainer's weights, whatever it loaded

    @classmethod
    def for_policy(cls, policy: torch.nn.Module, dtype: str, seed: int) -> "VLLMRollout":
        source = getattr(policy.config, "_name_or_path", "")
        if not source:
            raise HarnessError("train.rollout=vllm needs a policy loaded from a hub id or a folder")
        return cls(VLLMEngine(source, dtype, seed, getattr(policy.config, "max_position_embeddings", None)), policy)

    @torch.no_grad()
    def sync_weights(self, policy: torch.nn.Module) -> int:
        """Send the policy's parameters and buffers to the engine; returns how many tensors were sent."""
        weights = [(name, tensor.detach()) for name, tensor in policy.state_dict().items()]
        self.engine.load_weights(weights)
        return len(weights)

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
                 temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
        """One response per prompt. Each request gets its own seed drawn from `generator`, so that the G
        copies of a prompt sample independently and a run is reproducible from the global seed."""
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        outputs = self.engine.generate(prompts, max_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p if temperature > 0 else 1.0, seeds=seeds, stop_token_ids=[eos_id])
        roll = pack_rollout(prompts, outputs, pad_id, max_new_tokens)
        for name in ("input_ids", "attention_mask", "responses", "response_mask"):
            setattr(roll, name, getattr(roll, name).to(self.device))
        return roll


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
