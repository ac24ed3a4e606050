"""The trained policy kept: `harness run --save-model final|final+critic|none`.

A finished cell writes, atomically (a temporary folder renamed into place),

    model/              save_pretrained: config.json, model.safetensors, generation_config.json,
                        the tokenizer's files; loads with AutoModelForCausalLM.from_pretrained
    model/critic/       with final+critic, when the algorithm has a critic: critic.safetensors (the
                        critic's backbone and head, or only its head on a shared backbone) and
                        critic.json (kind, options, backbone)
    model/ under LoRA   (model.lora_rank > 0) the policy's adapter instead: adapter_config.json and
                        adapter_model.safetensors (peft save_pretrained; the base is named in the config),
                        the tokenizer's files; with model.lora_save=merged also model/merged/, the adapter
                        merged into the base (save_pretrained). `harness eval` loads either. A LoRA
                        critic's critic.safetensors holds its head and its adapter only.
    model/heads/        with final+critic, when the algorithm has extra heads (FlowRL's log Z):
                        heads.safetensors and heads.json
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from harness import store

if TYPE_CHECKING:
    from harness.trainer import Trainer

MODES = ("final", "final+critic", "none")


def save_model(trainer: "Trainer", folder: Path, with_critic: bool = False) -> Path:
    from safetensors.torch import save_model as save_module
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with store.atomic_dir(Path(folder)) as tmp:
        if trainer.lora:
            save_adapter(trainer, tmp)
        else:
            trainer.policy.save_pretrained(tmp, safe_serialization=True)
        trainer.tokenizer.save_pretrained(tmp)
        if with_critic and trainer.critic is not None:
            (tmp / "critic").mkdir()
            module = trainer.critic.head if trainer.shared_critic else trainer.critic
            if trainer.lora and not trainer.shared_critic:  # its head and adapter, not the frozen base
                from safetensors.torch import save_file

                from harness.lora import critic_state

                save_file(critic_state(module), str(tmp / "critic" / "critic.safetensors"))
            else:
                save_module(module, str(tmp / "critic" / "critic.safetensors"))
            info = {"kind": trainer.algo.critic, "options": trainer.algo.critic_options(), "algo": trainer.cfg.algo,
                    "backbone": "shared (the policy's, in model/)" if trainer.shared_critic else "separate"}
            (tmp / "critic" / "critic.json").write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
        if with_critic and len(trainer.heads):
            (tmp / "heads").mkdir()
            save_module(trainer.heads, str(tmp / "heads" / "heads.safetensors"))
            info = {"algo": trainer.cfg.algo, "heads": sorted(trainer.heads.keys())}
            (tmp / "heads" / "heads.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return Path(folder)


def save_adapter(trainer: "Trainer", folder: Path) -> None:
    """The policy's LoRA adapter (peft save_pretrained) in `folder`; with model.lora_save=merged also
    `folder`/merged: a copy of the base with the adapter merged in, with the tokenizer."""
    from harness import lora

    trainer.peft.save_pretrained(str(folder), selected_adapters=[lora.POLICY_ADAPTER], safe_serialization=True)
    if trainer.cfg.model.lora_save == "merged":
        merged = lora.merged_copy(trainer.peft)
        merged.save_pretrained(folder / "merged", safe_serialization=True)
        trainer.tokenizer.save_pretrained(folder / "merged")
