"""LoRA training with peft (`model.lora_rank > 0`): adapters on one frozen base.

- **Policy.** The base model is loaded in `model.dtype` and frozen; peft injects a LoRA adapter named
  `default` (float32: peft keeps adapters in float32 whatever the base's dtype) into the projections
  named by `model.lora_targets`. The trainer keeps the *base* module (the Hugging Face model with the
  adapter layers injected in place) as its policy, so the rollout, the update and evaluation run the
  adapted policy through the ordinary forward; the `PeftModel` around it switches adapters.
- **Reference.** The same model with the adapters disabled (`PeftModel.disable_adapter()`): no copy.
- **Critic** (`train.critic_backbone=separate`): a second adapter `critic` on the same base plus the
  critic's head; its forward runs with that adapter active (`use_adapter`). With `model.lora_critic=copy`
  the critic is a separate frozen copy of the base with its own adapter instead. A shared critic
  (`train.critic_backbone=shared`) is its head on the policy's adapted backbone, as without LoRA.
- **What trains.** The adapters and the heads; checkpoints hold only those (`trained_state`).

The fast path of `harness.fast_llama` reads the projection weights directly and so would skip the
adapters: it is off under LoRA (`fast_llama.unsupported_reason`), which falls back to the HF forward.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator

import torch
from torch import nn

from harness.critics import Critic
from harness.errors import HarnessError

POLICY_ADAPTER = "default"  # peft's own default name: save_pretrained writes it at the folder's top
CRITIC_ADAPTER = "critic"
# The attention and MLP projections of Llama-style models (Llama, Qwen2/3, Mistral, SmolLM2)
DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
LORA_CRITICS = ("adapter", "copy")


def check_available() -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise HarnessError("model.lora_rank > 0 needs peft: pip install '.[lora]'")


def targets(model_cfg) -> list[str] | str:
    """`model.lora_targets` as peft's `target_modules`: a list of module names, or "all-linear"."""
    text = model_cfg.lora_targets.strip()
    return "all-linear" if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]


def lora_config(model_cfg):
    from peft import LoraConfig

    return LoraConfig(r=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                      target_modules=targets(model_cfg), bias="none")


def wrap(model: nn.Module, model_cfg):
    """Freeze `model` and inject the policy's adapter. Returns the `PeftModel`; `model` itself (its
    `get_base_model()`) now computes the adapted function."""
    check_available()
    from peft import get_peft_model

    model.requires_grad_(False)
    try:
        peft_model = get_peft_model(model, lora_config(model_cfg), adapter_name=POLICY_ADAPTER)
    except ValueError as exc:  # e.g. no module matches the targets
        raise HarnessError(f"model.lora_targets={model_cfg.lora_targets!r}: {str(exc).splitlines()[0]}") from None
    return peft_model


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The LoRA parameters of `adapter` in `model` (names `...lora_A.<adapter>.weight`)."""
    return [p for name, p in model.named_parameters() if "lora_" in name and f".{adapter}." in name]


def make_trainable(model: nn.Module) -> None:
    """Every adapter of `model` trainable, the base frozen (peft's set_adapter freezes the inactive ones)."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


@contextlib.contextmanager
def use_adapter(peft_model, name: str) -> Iterator[None]:
    """Run the block with adapter `name` active, then switch back; every adapter stays trainable."""
    previous = peft_model.base_model.active_adapter  # the layers' (PeftModel.active_adapter is only its own record)
    if previous == name:
        yield
        return
    peft_model.base_model.set_adapter(name)
    make_trainable(peft_model)
    try:
        yield
    finally:
        peft_model.base_model.set_adapter(previous)
        make_trainable(peft_model)


class LoraCritic(Critic):
    """A critic that is an adapter of its own plus a head on the policy's frozen base: its forward
    runs the base's decoder with the `critic` adapter active. Its trained parameters are that
    adapter's and the head's (`trained_parameters`); a checkpoint keeps its adapter with the policy's."""

    def __init__(self, peft_model, backbone: nn.Module, head: nn.Module):
        super().__init__(backbone, head)
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule: the policy owns it

    def states(self, input_ids, attention_mask, prompt_len):
        with use_adapter(self.peft_model, CRITIC_ADAPTER):
            return super().states(input_ids, attention_mask, prompt_len)

    def trained_parameters(self) -> list[nn.Parameter]:
        return adapter_parameters(self.backbone, CRITIC_ADAPTER) + list(self.head.parameters())


def build_critic(kind: str, peft_model, policy: nn.Module, options: dict, model_cfg) -> Critic:
    """The critic under LoRA (`train.critic_backbone=separate`): `model.lora_critic=adapter` adds the
    `critic` adapter to the policy's base; `copy` copies the base (with the policy's fresh adapter,
    which becomes the critic's own) and trains only that adapter and the head."""
    from algorithms.critics import CRITICS
    from harness.critics import build_critic as build_full

    device = next(policy.parameters()).device
    if model_cfg.lora_critic == "copy":
        critic = build_full(kind, policy, options)  # a deep copy of the adapted decoder
        make_trainable(critic.backbone)
        return critic
    peft_model.add_adapter(CRITIC_ADAPTER, lora_config(model_cfg))
    make_trainable(peft_model)
    head = CRITICS.get(kind)(policy.config.hidden_size, **options)
    return LoraCritic(peft_model, policy.get_decoder(), head.to(device))


def trained_parameters(module: nn.Module) -> list[nn.Parameter]:
    """What an optimiser steps: a LoRA critic's adapter and head, else every parameter that requires grad."""
    if isinstance(module, LoraCritic):
        return module.trained_parameters()
    return [p for p in module.parameters() if p.requires_grad]


def trained_state(module: nn.Module) -> dict[str, Any]:
    """The state_dict entries of the trained parameters of `module` (the adapters, not the frozen base)."""
    names = {name for name, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k in names}


def load_trained_state(module: nn.Module, state: dict[str, Any]) -> None:
    """Load `trained_state`'s entries; anything else missing must be frozen, nothing unexpected."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    if unexpected or trained & set(missing):
        raise RuntimeError(f"adapter state mismatch: unexpected {sorted(unexpected)[:3]}, "
                           f"missing {sorted(trained & set(missing))[:3]}")


def critic_state(critic: nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA critic's trained tensors by name (head and its own adapter), detached and contiguous."""
    own = (lambda n: n.startswith("head.") or f".{CRITIC_ADAPTER}." in n) if isinstance(critic, LoraCritic) else None
    params = trained_parameters(critic)
    ids = {id(p) for p in params}
    return {n: p.detach().contiguous().clone() for n, p in critic.named_parameters()
            if id(p) in ids and (own is None or own(n))}


def merged_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """`model`'s state dict under the plain Hugging Face names, with the policy's adapter merged into each
    adapted weight (W + (alpha / r) B A, peft's `get_delta_weight`, cast to W's dtype) and the other
    adapters left out: what vLLM or a safetensors copy loads. A model without adapters: its state dict."""
    layers = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    if not layers:
        return list(model.state_dict().items())
    out = []
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        owner, found, leaf = name.rpartition(".base_layer.")
        if found:
            layer = layers[owner]
            if leaf == "weight" and POLICY_ADAPTER in layer.lora_A:
                tensor = tensor + layer.get_delta_weight(POLICY_ADAPTER).to(tensor.dtype)
            name = f"{owner}.{leaf}"
        out.append((name, tensor.detach()))
    return out


def merged_copy(peft_model) -> nn.Module:
    """A plain model with the policy's adapter merged into a copy of the base weights."""
    clone = copy.deepcopy(peft_model)
    return clone.merge_and_unload(adapter_names=[POLICY_ADAPTER])


def is_adapter_folder(path) -> bool:
    """Whether `path` is a peft adapter folder (what --save-model writes under LoRA)."""
    from pathlib import Path

    return (Path(path) / "adapter_config.json").is_file()


def check_adapter_folder(folder, trust_remote_code: bool = False, weights: bool = True) -> None:
    """An adapter folder names its base (`base_model_name_or_path`); a local base is checked as a model
    folder (`harness.model_folder`), a hub id is left to load. One-line errors."""
    import json
    from pathlib import Path

    from harness.model_folder import check_model_folder

    try:
        base = json.loads((Path(folder) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise HarnessError(f"--model {str(folder)!r}: unreadable adapter_config.json ({exc})") from None
    if not isinstance(base, str) or not base:
        raise HarnessError(f"--model {str(folder)!r}: adapter_config.json names no base model (base_model_name_or_path)")
    if Path(base).expanduser().is_dir():
        check_model_folder(Path(base).expanduser(), trust_remote_code, weights)
    elif base.startswith(("/", ".", "~")):
        raise HarnessError(f"--model {str(folder)!r}: its base model {base!r} is not there (the adapter needs it)")


def load_adapter_model(folder: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """The base model named by the adapter folder's config with the adapter merged in (a plain model)."""
    check_available()
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(folder, dtype=dtype,
                                                    trust_remote_code=trust_remote_code).merge_and_unload()
