"""The critic model: a transformer backbone (a copy of the initial policy's, or the policy's own
with `train.critic_backbone=shared`) plus a head of `algorithms.critics.CRITICS` on every token.
The critic's output for response token t is the head applied to the backbone's last hidden state
at the position of the state s_t, the column just before token t (P - 1 + t).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from algorithms.critics import CRITICS
from harness import fast_llama
from harness.fast_llama import position_ids


class Critic(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Backbone hidden states of the state s_t before each response token: `[B, T, d]`."""
        positions = position_ids(attention_mask)
        if fast_llama.enabled(self.backbone):
            _, hidden = fast_llama.forward(self.backbone, input_ids, attention_mask, positions, prompt_len=prompt_len,
                                           want_hidden=True)
        else:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                   use_cache=False).last_hidden_state
        return hidden[:, prompt_len - 1:-1]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
        return self.head(self.states(input_ids, attention_mask, prompt_len))

    def on_batch(self, mb) -> torch.Tensor:
        """The head's output on a `Batch` (its `input_ids`, `attention_mask`, `prompt_len`)."""
        return self(mb["input_ids"], mb["attention_mask"], mb.prompt_len)


def build_critic(kind: str, policy: nn.Module, options: dict, shared: bool = False) -> Critic:
    """A critic on the policy's transformer backbone: a separate copy of it (initialised from the
    policy, trained on its own), or with `shared` the policy's backbone module itself."""
    head_cls = CRITICS.get(kind)
    backbone = policy.get_decoder() if hasattr(policy, "get_decoder") else policy.model
    if not shared:
        backbone = copy.deepcopy(backbone).requires_grad_(True)
    head = head_cls(policy.config.hidden_size, **options)
    device = next(policy.parameters()).device
    if device.type == "meta":  # a policy whose weights are loaded later (harness.sharded): the head keeps its initial values
        return Critic(backbone, head)
    return Critic(backbone, head).to(device)
