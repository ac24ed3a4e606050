"""Reward-noise injectors: the ``NOISE`` registry and one class per injector.

An injector corrupts the TRAINING rewards of one batch; evaluation always uses clean graders.
Each class declares what the grammar in ``noise.spec`` needs to parse and validate it:

    name          registry key, also the text of a setting (``flip`` in ``flip0.2``)
    takes_param   whether the name must be followed by a number
    param_symbol  letter shown in usage strings (``flipP``)
    param_range   inclusive (low, high) bounds of the number
    param_integer whether the number must be a whole number (e.g. a future ``pseudoK``)

Adding an injector (``fpP``, ``fnP``, ``gaussS``, ``pseudoK``, ``rmP``, ``lengthC``) is one class
with ``@injector("name")``; the parser does not change.

Random draws are seeded per (step, prompt, sample) through ``harness.seeding.uniform`` with the
labels ``("noise", position, name, step, prompt_id, sample_idx)``, so a sample's noise does not
depend on which other samples share its batch or in which order. ``position`` is the injector's
0-based place in a ``+`` composition. The labels hold the injector's name but not its parameter,
so ``flip0.2`` and ``flip0.3`` share their uniforms (common random numbers): every reward that
``flip0.2`` flips is also flipped by ``flip0.3`` under the same seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from harness.registry import Registry
from harness.seeding import uniform

NOISE: Registry[type["Injector"]] = Registry("noise")


@dataclass(frozen=True)
class NoiseContext:
    """Where a batch of rewards comes from; everything an injector may seed or scale by.

    ``prompt_ids[i]`` and ``sample_idx[i]`` identify sample ``i`` (its problem and its index
    within the problem's group of G samples); both have the batch length N.
    """

    seed: int
    step: int
    prompt_ids: list[str]
    sample_idx: list[int]
    response_lengths: list[int] | None = None
    max_length: int | None = None


class Injector:
    """Base class. Subclasses set the class attributes below and implement ``_apply``."""

    name: ClassVar[str] = ""
    takes_param: ClassVar[bool] = False
    param_symbol: ClassVar[str] = "P"
    param_range: ClassVar[tuple[float, float]] = (0.0, math.inf)
    param_integer: ClassVar[bool] = False

    def __init__(self, param: float | None = None, position: int = 0):
        self.param = param
        self.position = position

    @classmethod
    def usage(cls) -> str:
        """How the injector is written in a setting: ``flipP`` or ``none``."""
        return cls.name + (cls.param_symbol if cls.takes_param else "")

    @classmethod
    def describe(cls) -> str:
        """One line for ``harness list noise``."""
        raise NotImplementedError

    def uniforms(self, ctx: NoiseContext) -> torch.Tensor:
        """One U[0, 1) draw per sample, float64 [N], seeded per (step, prompt, sample)."""
        return torch.tensor(
            [
                uniform(ctx.seed, "noise", self.position, self.name, ctx.step, pid, int(k))
                for pid, k in zip(ctx.prompt_ids, ctx.sample_idx)
            ],
            dtype=torch.float64,
        )

    def apply(self, rewards: torch.Tensor, ctx: NoiseContext) -> tuple[torch.Tensor, dict[str, float]]:
        """rewards [N] -> (new noisy tensor [N], stats with keys WITHOUT the ``noise/`` prefix)."""
        if rewards.dim() != 1:
            raise ValueError(f"noise expects rewards of shape [N], got {tuple(rewards.shape)}")
        n = rewards.shape[0]
        if len(ctx.prompt_ids) != n or len(ctx.sample_idx) != n:
            raise ValueError(
                f"noise context has {len(ctx.prompt_ids)} prompt_ids and {len(ctx.sample_idx)} "
                f"sample_idx for {n} rewards"
            )
        return self._apply(rewards, ctx)

    def _apply(self, rewards: torch.Tensor, ctx: NoiseContext) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


def injector(name: str) -> Callable[[type[Injector]], type[Injector]]:
    """Class decorator: set ``cls.name`` and register the class in ``NOISE``."""

    def decorator(cls: type[Injector]) -> type[Injector]:
        cls.name = name
        NOISE.add(name, cls)
        return cls

    return decorator


def list_noise() -> list[tuple[str, str]]:
    """(usage, one-line description) for every registered injector, sorted by name."""
    return [(NOISE.get(n).usage(), NOISE.get(n).describe()) for n in NOISE.names()]


@injector("none")
class NoNoise(Injector):
    @classmethod
    def describe(cls) -> str:
        return "clean rewards (no noise)"

    def _apply(self, rewards, ctx):
        return rewards.clone(), {}


@injector("flip")
class Flip(Injector):
    """Symmetric label noise on a binary verifier: with probability P, r <- 1 - r.

    Rewards must be exactly 0 or 1 (a ValueError otherwise). ±1 rewards are not accepted:
    "is this batch of all-ones {0,1} or {-1,+1}?" cannot be decided from the values alone,
    so a suite with ±1 rewards must map them to {0, 1} before noise.
    """

    takes_param = True
    param_symbol = "P"
    param_range = (0.0, 1.0)

    @classmethod
    def describe(cls) -> str:
        return "flip each binary 0/1 reward (r -> 1 - r) independently with probability P in [0, 1]"

    def _apply(self, rewards, ctx):
        binary = (rewards == 0) | (rewards == 1)
        if not bool(binary.all()):
            bad = rewards[~binary][:3].tolist()
            raise ValueError(f"flip noise needs binary 0/1 rewards, got values such as {bad}")
        flip = self.uniforms(ctx) < float(self.param)
        noisy = torch.where(flip.to(rewards.device), 1 - rewards, rewards)
        rate = float(flip.double().mean()) if len(flip) else 0.0
        return noisy, {"flip_rate": rate}
