"""Critic heads: a critic is a transformer backbone (a copy of the initial policy's) plus a head on
every token (`harness.critics.Critic`, the model side); this module holds the heads.

A critic kind is a head class registered in `CRITICS`. The critic's output for response token t
is the head applied to the backbone's last hidden state at the position of the state s_t, i.e.
the column just before token t (P - 1 + t). Shapes: scalar `[B, T]`; other kinds add trailing
dimensions (quantiles `[B, T, H, N]`, ...).
"""
from __future__ import annotations

import torch
from torch import nn

from harness.registry import Registry

CRITICS: Registry[type[nn.Module]] = Registry("critic kind")


@CRITICS.register("scalar")
class ScalarHead(nn.Module):
    """A linear value head, zero-initialised so the first values are 0 (N+ implementation details)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)
