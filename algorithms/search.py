"""Hyperparameter search spaces, declared by the algorithms and drawn by `harness tune`.

A search space maps a config key to a distribution. Keys are written as for `--set`, relative to
one algorithm: `train.lr`, `train.critic_lr`, `train.group_size` (core keys, applied to that
algorithm's cells only) and `algo.NAME` (the algorithm's own option NAME). Every algorithm gets
the shared knobs (`shared_space`): the actor learning rate, the critic learning rate when it has a
critic, and the KL coefficient when its defaults use a KL term; an algorithm class adds its own in
`SEARCH_SPACE` (FlowRL's beta, GRPO's group size, ...), next to its `Options`.

A distribution turns one uniform draw u in [0, 1) into a value, so a draw is a pure function of
(seed, algorithm, trial, key) (`harness.tune`): adding an algorithm, a trial or a key never
changes another's values.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# The ranges shared by every algorithm: a decade either side of the defaults that predate them
# (train.lr 3e-4 sits near a cliff: at 1e-3 PPO and DFPO collapse under flip0.2), and KL
# coefficients from almost none to four times the largest default (0.05).
LR = (3e-5, 1e-3)
CRITIC_LR = (1e-4, 3e-3)
KL_COEF = (1e-3, 0.2)


@dataclass(frozen=True)
class LogUniform:
    """Log-uniform on [low, high]: equal mass per decade."""

    low: float
    high: float

    def __post_init__(self):
        if not 0 < self.low < self.high:
            raise ValueError(f"LogUniform needs 0 < low < high, got {self.low}, {self.high}")

    def sample(self, u: float) -> float:
        value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        return float(f"{value:.3g}")  # three significant digits: a readable grid file

    @property
    def log_scale(self) -> bool:
        return True

    def describe(self) -> str:
        return f"log-uniform [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Uniform:
    """Uniform on [low, high]."""

    low: float
    high: float

    def __post_init__(self):
        if not self.low < self.high:
            raise ValueError(f"Uniform needs low < high, got {self.low}, {self.high}")

    def sample(self, u: float) -> float:
        return float(f"{self.low + u * (self.high - self.low):.3g}")

    @property
    def log_scale(self) -> bool:
        return False

    def describe(self) -> str:
        return f"uniform [{self.low:g}, {self.high:g}]"


@dataclass(frozen=True)
class Choice:
    """One of `values`, each equally likely."""

    values: tuple

    def __post_init__(self):
        if not self.values:
            raise ValueError("Choice needs at least one value")

    def sample(self, u: float) -> Any:
        return self.values[min(int(u * len(self.values)), len(self.values) - 1)]

    @property
    def log_scale(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in self.values) and \
            max(self.values) / min(self.values) >= 8

    def describe(self) -> str:
        return "one of " + ", ".join(str(v) for v in self.values)


Distribution = LogUniform | Uniform | Choice


def _default_options(algo_cls: type) -> Any:
    return algo_cls.Options()


def shared_space(algo_cls: type) -> dict[str, Distribution]:
    """The knobs every algorithm is tuned on: `train.lr`; `train.critic_lr` with a critic;
    `algo.kl_coef` when the default options put a KL term anywhere (kl_mode other than none and a
    positive coefficient)."""
    space: dict[str, Distribution] = {"train.lr": LogUniform(*LR)}
    if algo_cls.critic != "none":
        space["train.critic_lr"] = LogUniform(*CRITIC_LR)
    opts = _default_options(algo_cls)
    if getattr(opts, "kl_coef", 0) > 0 and getattr(opts, "kl_mode", "loss") != "none":
        space["algo.kl_coef"] = LogUniform(*KL_COEF)
    return space


def pinned_by_variant(algo_cls: type, key: str) -> bool:
    """Whether a named variant (an ablation: `algorithms.base.register_variant`) fixes the option
    of `key` at a default of its own, unlike the class that declared the key's search: the search
    then leaves it alone (`dvpo_risk_off` keeps its risk weight at 0)."""
    section, _, name = key.partition(".")
    owner = next((k for k in algo_cls.__mro__ if key in k.__dict__.get("SEARCH_SPACE", {})), None)
    if section != "algo" or owner is None or owner is algo_cls:
        return False
    return getattr(_default_options(algo_cls), name) != getattr(_default_options(owner), name)


def search_space(algo_cls: type) -> dict[str, Distribution]:
    """The algorithm's whole space: the shared knobs, then its own `SEARCH_SPACE` (which may
    replace a shared one), less what a variant pins. Every `algo.NAME` key must be an option of the
    algorithm."""
    own = {k: v for k, v in getattr(algo_cls, "SEARCH_SPACE", {}).items() if not pinned_by_variant(algo_cls, k)}
    space = {**shared_space(algo_cls), **own}
    names = {f.name for f in dataclasses.fields(algo_cls.Options)}
    for key in space:
        section, _, name = key.partition(".")
        if section == "algo" and name not in names:
            raise ValueError(f"{algo_cls.name}: search key {key!r} is not one of its options")
        if section not in ("algo", "train", "model", "eval"):
            raise ValueError(f"{algo_cls.name}: search key {key!r} must start with algo., train., model. or eval.")
    return space
