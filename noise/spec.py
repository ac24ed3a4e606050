"""The noise-setting grammar.

    list     := setting ("," setting)*        a grid axis: "none,flip0.2,flip0.4"
    setting  := term ("+" term)*              injectors applied left to right: "fn0.3+gauss0.1"
    term     := NAME [NUMBER]                 "none", "flip0.2"
    NAME     := [A-Za-z_]+                    a key of the NOISE registry
    NUMBER   := unsigned decimal, optional exponent: "0.2", ".5", "3", "1e-3"

Whitespace around terms and settings is ignored. Whether a name takes a number, and its range,
come from the injector class, so new injectors need no change here.

Canonical names (``NoiseSpec.name``, used as a directory name) write each number as the
shortest decimal that reads back as the same float, never in exponent form and without a
trailing ".0": ``flip0.20`` -> ``flip0.2``, ``flip0`` -> ``flip0``, ``flip1.0`` -> ``flip1``,
``gauss.5`` -> ``gauss0.5``, ``rm1e-3`` -> ``rm0.001``. Unlike ``f"{p:g}"`` this never rounds,
so two settings with different parameters never share a directory.
``none`` stands alone: it cannot be combined with other injectors.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from harness.errors import HarnessError
from noise.injectors import NOISE, Injector, NoiseContext

_TERM = re.compile(r"([A-Za-z_]*)(.*)", re.DOTALL)
_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_EXAMPLES = "e.g. 'none', 'flip0.2', 'fn0.3+gauss0.1'"
MAX_NAME_LEN = 100  # the canonical name is a folder name (255 bytes at most on common filesystems)


def format_param(value: float) -> str:
    """Shortest round-tripping positional decimal: 0.2 -> '0.2', 1.0 -> '1', 1e-3 -> '0.001'."""
    return np.format_float_positional(float(value), trim="-")


def _format_range(cls: type[Injector]) -> str:
    low, high = cls.param_range
    right = "inf)" if math.isinf(high) else f"{format_param(high)}]"
    return f"[{format_param(low)}, {right}"


@dataclass(frozen=True)
class NoiseSpec:
    """One parsed noise setting: a chain of injectors applied left to right."""

    name: str
    injectors: tuple[Injector, ...] = field(compare=False, repr=False)

    def __str__(self) -> str:
        return self.name

    @property
    def is_clean(self) -> bool:
        return self.name == "none"

    def needs_labels(self) -> int:
        """K when an injector needs K samples per problem from the initial policy (``pseudoK``), else 0."""
        return max(inj.needs_labels() for inj in self.injectors)

    def set_labels(self, votes: dict[str, list[tuple[str | None, float]]]) -> None:
        """Hand per-problem (answer, clean grade) samples of the initial policy to the injectors that asked."""
        for inj in self.injectors:
            if inj.needs_labels():
                inj.set_labels(votes)

    def apply(self, rewards: torch.Tensor, ctx: NoiseContext) -> tuple[torch.Tensor, dict[str, float]]:
        """CLEAN rewards [N] -> (noisy rewards [N], stats). The input tensor is not modified.

        Stats always hold ``noise/changed_frac`` (fraction of rewards whose final value differs
        from the clean one) plus each injector's own stats as ``noise/<key>``; when two injectors
        of a composition report the same key, the later one is written ``noise/<key>.<position>``.
        """
        noisy = rewards
        stats: dict[str, float] = {}
        for inj in self.injectors:
            noisy, own = inj.apply(noisy, ctx)
            for key, value in own.items():
                full = f"noise/{key}"
                stats[full if full not in stats else f"{full}.{inj.position}"] = float(value)
        if noisy is rewards:  # never hand back the caller's tensor
            noisy = rewards.clone()
        n = rewards.numel()
        stats["noise/changed_frac"] = float((noisy != rewards).double().mean()) if n else 0.0
        return noisy, stats


def _parse_term(term: str, position: int) -> tuple[str, Injector]:
    name, rest = _TERM.fullmatch(term).groups()
    if not name:
        raise HarnessError(f"noise term {term!r} must start with an injector name (valid: {', '.join(NOISE.names())})")
    if name not in NOISE:
        raise HarnessError(f"unknown noise {name!r} in {term!r} (valid: {', '.join(NOISE.names())})")
    cls = NOISE.get(name)
    if not cls.takes_param:
        if rest:
            raise HarnessError(f"noise {name!r} takes no parameter, got {term!r} (write {name!r})")
        return name, cls(None, position)
    if not rest:
        raise HarnessError(
            f"noise {name!r} needs a parameter: write {cls.usage()} with {cls.param_symbol} in "
            f"{_format_range(cls)}, e.g. '{name}{format_param(cls.param_range[0])}'"
        )
    if not _NUMBER.fullmatch(rest):
        raise HarnessError(
            f"bad parameter {rest!r} in noise {term!r}: expected a non-negative number, as in {cls.usage()}"
        )
    value = float(rest)
    low, high = cls.param_range
    if not (low <= value <= high):
        raise HarnessError(
            f"noise parameter {cls.param_symbol}={rest} in {term!r} is out of range {_format_range(cls)}"
        )
    if cls.param_integer and value != int(value):
        raise HarnessError(f"noise parameter {cls.param_symbol}={rest} in {term!r} must be a whole number")
    return f"{name}{format_param(value)}", cls(value, position)


def parse_noise(setting: str) -> NoiseSpec:
    """One setting ("flip0.2", "fn0.3+gauss0.1") -> NoiseSpec; HarnessError on bad input."""
    if not isinstance(setting, str) or not setting.strip():
        raise HarnessError(f"empty noise setting ({_EXAMPLES})")
    if "," in setting:
        raise HarnessError(f"noise setting {setting!r} contains ',' which separates a list of settings; give one setting")
    terms = [t.strip() for t in setting.split("+")]
    if "" in terms:
        raise HarnessError(f"empty term in noise setting {setting!r}: '+' must join two injectors ({_EXAMPLES})")
    parsed = [_parse_term(t, i) for i, t in enumerate(terms)]
    if len(parsed) > 1 and any(inj.name == "none" for _, inj in parsed):
        raise HarnessError(f"noise 'none' cannot be combined with other injectors in {setting!r}")
    for name, inj in parsed[:-1]:
        if inj.must_be_last:
            raise HarnessError(f"noise {name!r} must come last in a composition, in {setting!r}")
    for i, (_, inj) in enumerate(parsed):
        inj.follow(tuple(before for _, before in parsed[:i]))
    name = "+".join(n for n, _ in parsed)
    if len(name) > MAX_NAME_LEN:
        raise HarnessError(f"noise setting {setting!r} is {len(name)} characters long written out "
                           f"({name[:24]}...); at most {MAX_NAME_LEN}, as it names a folder: use smaller numbers")
    return NoiseSpec(name, tuple(inj for _, inj in parsed))


def parse_noise_list(text: str) -> list[NoiseSpec]:
    """A comma list ("none,flip0.2") -> specs in the given order; duplicates (after
    canonicalisation, e.g. "flip0.2,flip0.20") are an error."""
    if not isinstance(text, str) or not text.strip():
        raise HarnessError(f"empty noise list ({_EXAMPLES}, or a comma list such as 'none,flip0.2')")
    items = [s.strip() for s in text.split(",")]
    if "" in items:
        raise HarnessError(f"empty item in noise list {text!r}: ',' must separate two settings")
    specs: list[NoiseSpec] = []
    seen: dict[str, str] = {}
    for item in items:
        spec = parse_noise(item)
        if spec.name in seen:
            raise HarnessError(
                f"noise list {text!r} names {spec.name!r} twice ({seen[spec.name]!r} and {item!r})"
            )
        seen[spec.name] = item
        specs.append(spec)
    return specs
