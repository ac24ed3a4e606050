"""The trained policy kept: `harness run --save-model final|final+critic|none`.

A finished cell writes, atomically (a temporary folder renamed into place),

    model/              save_pretrained: config.json, model.safetensors, generation_config.json,
                        the tokenizer's files; loads with AutoModelForCausalLM.from_pretrained
    model/critic/       with final+critic, when the algorithm has a critic: critic.safetensors (the
                        critic's backbone and head, or only its head on a shared backbone) and
                        critic.json (kind, options, backbone)
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
        trainer.policy.save_pretrained(tmp, safe_serialization=True)
        trainer.tokenizer.save_pretrained(tmp)
        if with_critic and trainer.critic is not None:
            (tmp / "critic").mkdir()
            module = trainer.critic.head if trainer.shared_critic else trainer.critic
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
